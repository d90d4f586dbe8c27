"""
Hub and offline probing: the one low room that every other room may import (it imports nothing of ours).

Loading a Hub name without a network makes `datasets` and `huggingface_hub` retry for about 25 s a name. Every
loader of ours asks `work_offline()` first: offline mode asked for by the user, or a Hub that does not answer within
`HUB_PROBE_TIMEOUT` seconds, and the loader goes straight to the local cache (`forced_offline_mode`).
"""

from __future__ import annotations

import contextlib
import os
import urllib.error
import urllib.request
from collections.abc import Iterator

import datasets
import huggingface_hub

HUB_PROBE_TIMEOUT = 3.0
"""Seconds to wait for the Hub before loading in offline mode (without it, `datasets` retries for ~25 s a name)."""

_TRUE_VALUES = {"1", "ON", "YES", "TRUE"}


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").upper() in _TRUE_VALUES


def offline_mode_requested() -> bool:
    r"""
    Whether the user asked for offline mode (`HF_HUB_OFFLINE` / `HF_DATASETS_OFFLINE`, read now or at import).
    """
    return (
        _env_flag("HF_HUB_OFFLINE")
        or _env_flag("HF_DATASETS_OFFLINE")
        or bool(huggingface_hub.constants.HF_HUB_OFFLINE)
        or bool(datasets.config.HF_HUB_OFFLINE)
    )


def hub_is_reachable(timeout: float = HUB_PROBE_TIMEOUT) -> bool:
    r"""
    Whether the Hugging Face Hub endpoint (`huggingface_hub.constants.ENDPOINT`) answers within `timeout` seconds.

    Any HTTP answer, even an error status, counts as reachable; DNS failures, refused connections and timeouts do not.
    """
    request = urllib.request.Request(huggingface_hub.constants.ENDPOINT, method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            return True
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):
        return False


def work_offline() -> bool:
    """Whether to load from the local cache only: offline mode was asked for, or the Hub does not answer."""
    return offline_mode_requested() or not hub_is_reachable()


@contextlib.contextmanager
def forced_offline_mode() -> Iterator[None]:
    r"""
    Put `huggingface_hub` and `datasets` in offline mode for the duration of the block.

    Both libraries read `HF_HUB_OFFLINE` once at import, so setting the environment variable now would not be seen;
    their module-level flags are switched instead and restored afterwards.
    """
    saved = (huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE)
    huggingface_hub.constants.HF_HUB_OFFLINE = True
    datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved
