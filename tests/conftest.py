import os
import sys

# Tests never reach the Hub: a name that is not cached fails at once instead of after retries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# Helpers that live beside the tests (the loopback Hub) import as plain modules.
sys.path.insert(0, os.path.dirname(__file__))
