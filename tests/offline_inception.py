"""A machine with torch-fidelity but without its Inception weights, offline: for the error-path tests."""

import sys
import types

import torch


def torch_fidelity_without_cached_weights(monkeypatch, hub_dir) -> None:
    """A stand-in torch-fidelity whose weights are neither cached (an empty torch.hub folder) nor downloadable."""
    fidelity = types.ModuleType("torch_fidelity")
    inception = types.ModuleType("torch_fidelity.feature_extractor_inceptionv3")
    inception.URL_INCEPTION_V3 = "https://example.invalid/weights-inception-2015-12-05-6726825d.pth"
    fidelity.feature_extractor_inceptionv3 = inception
    monkeypatch.setitem(sys.modules, "torch_fidelity", fidelity)
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", inception)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub_dir))
