import os
import sys

import pytest

# Tests never reach the Hub: a name that is not cached fails at once instead of after retries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# Helpers that live beside the tests (the loopback Hub) import as plain modules, and the repository root's
# `benchmarks` (check_syncs.py) whatever the working directory.
sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="session")
def digits_cache(tmp_path_factory):
    """A private feature cache for the session: the digits classifier is trained once into it."""
    path = tmp_path_factory.getbasetemp() / "ddpm-paper-cache"
    saved = os.environ.get("DDPM_PAPER_CACHE")
    os.environ["DDPM_PAPER_CACHE"] = str(path)
    from evaluation import DigitsFeatures

    DigitsFeatures.pretrained()
    yield path
    if saved is None:
        os.environ.pop("DDPM_PAPER_CACHE", None)
    else:
        os.environ["DDPM_PAPER_CACHE"] = saved
