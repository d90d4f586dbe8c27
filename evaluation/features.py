# Copyright 2026 The ddpm-paper authors. Licensed under the Apache License, Version 2.0.
"""
Feature networks for the sample-quality metrics: they map uint8 images (B, C, H, W) to feature vectors (B, D).

- `"inception"`: the Inception-v3 pool features of FID (Heusel et al. 2017) through torchmetrics, which needs
  `torch-fidelity` (and so `torchvision`) and downloads its weights on first use.
- `"digits"`: a small classifier trained once on scikit-learn's bundled 8x8 digits, the embedded default dataset;
  it needs no network and is cached under `$DDPM_PAPER_CACHE` (default `~/.cache/ddpm-paper`).

Every extractor is an `nn.Module` with an integer `num_features`, the interface torchmetrics' FID and KID accept.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from hub_access import work_offline

CACHE_ENV = "DDPM_PAPER_CACHE"
DIGITS_CLASSIFIER_FILE = "digits-mlp-v1.safetensors"


class FeatureExtractorUnavailableError(RuntimeError):
    """The requested feature network cannot be built here (missing package, or weights that cannot be downloaded)."""


def cache_dir() -> Path:
    """Where this project caches feature networks and reference features: `$DDPM_PAPER_CACHE` or ~/.cache/ddpm-paper."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "ddpm-paper")


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file through a temporary name, so concurrent or interrupted runs never leave half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({name: value.contiguous() for name, value in tensors.items()}, str(temporary), metadata=metadata)
    os.replace(temporary, path)


def weights_digest(module: torch.nn.Module, length: int = 12) -> str:
    """
    A short SHA-256 of the module's `state_dict` (names, dtypes, shapes and bytes): any change to a weight changes it,
    so features cached under it are never reused for a retrained network.
    """
    digest = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        if not isinstance(value, torch.Tensor):  # `get_extra_state` may return any object
            digest.update(f"{name}={value!r};".encode())
            continue
        value = value.detach().cpu().contiguous()
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)};".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:length]


def _to_float_grayscale(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 (B, 1, size, size) in [0, 1]: ITU-R 601 luma (PIL's "L"), antialiased resize."""
    x = images[:, :3].float() / 255.0  # RGBA (--num_channels 4): the colour, without alpha
    if x.shape[1] == 3:
        x = (x * torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)).sum(dim=1, keepdim=True)
    elif x.shape[1] != 1:
        raise ValueError(f"Expected 1 or 3 channels, got {x.shape[1]}.")
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x


class DigitsFeatures(torch.nn.Module):
    """
    A multilayer perceptron 64 -> 128 -> 64 -> 10 trained on scikit-learn's 8x8 digits; its features are the 64 ReLU
    activations of the penultimate layer. Inputs are converted to 8x8 grayscale first.

    Build it with [`DigitsFeatures.pretrained`], which trains it once (full-batch Adam, fixed seed, a few seconds on a
    CPU) and caches the weights.
    """

    num_features = 64
    resolution = 8

    def __init__(self):
        super().__init__()
        self.hidden = torch.nn.Sequential(
            torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64), torch.nn.ReLU()
        )
        self.classifier = torch.nn.Linear(64, 10)
        self.held_out_accuracy: float | None = None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images (B, C, H, W) -> features (B, 64)."""
        x = _to_float_grayscale(images, self.resolution).flatten(1)
        return self.hidden(x.to(self.classifier.weight.dtype))

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self(images))

    @classmethod
    def pretrained(cls, path: str | os.PathLike | None = None) -> DigitsFeatures:
        """The trained network, from the cache file (`cache_dir()/digits-mlp-v1.safetensors`), trained if missing."""
        path = Path(path) if path is not None else cache_dir() / DIGITS_CLASSIFIER_FILE
        model = cls()
        if not path.is_file():
            trained, accuracy = train_digits_classifier()
            _atomic_save(trained.state_dict(), path, metadata={"held_out_accuracy": f"{accuracy:.6f}"})
        model.load_state_dict(load_file(str(path)))
        with safe_open(str(path), framework="pt") as handle:  # the accuracy travels with the weights
            model.held_out_accuracy = float((handle.metadata() or {}).get("held_out_accuracy", "nan"))
        return model.eval().requires_grad_(False)


@functools.cache
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = (
        load_digits()
    )  # the rule of `image_data.sources.digits_dataset` (tests/test_sample_quality.py compares them)
    return np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8), digits.target


def digits_pixels() -> tuple[torch.Tensor, torch.Tensor]:
    """The embedded dataset (as `image_data.sources.digits_dataset` holds it) as uint8 (1797, 1, 8, 8) in 0..255, and its labels."""
    images, labels = _digits_arrays()
    return torch.tensor(images).unsqueeze(1), torch.tensor(labels, dtype=torch.long)


def train_digits_classifier(seed: int = 0, steps: int = 200, held_out: int = 297) -> tuple[DigitsFeatures, float]:
    """
    Train [`DigitsFeatures`] on the bundled digits: full-batch Adam from a fixed seed, so every machine gets the same
    network up to rounding. The last `held_out` images (other writers) are kept out of training to measure accuracy.

    Returns:
        The network (float32) and its accuracy on the held-out images.
    """
    pixels, labels = digits_pixels()
    train_x, train_y = pixels[:-held_out], labels[:-held_out]
    test_x, test_y = pixels[-held_out:], labels[-held_out:]
    threads = torch.get_num_threads()
    # Matrices this small train fastest on one thread (20x faster than two on busy cores), and reproducibly.
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = DigitsFeatures()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-4)
        for _ in range(steps):
            optimizer.zero_grad()
            loss = F.cross_entropy(model.logits(train_x), train_y)
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            accuracy = (model.logits(test_x).argmax(dim=1) == test_y).float().mean().item()
    finally:
        torch.set_num_threads(threads)
    return model.requires_grad_(False), accuracy


class InceptionFeatures(torch.nn.Module):
    """
    The 2048 pool features of the FID Inception-v3 (torchmetrics' `NoTrainInceptionV3`, torch-fidelity's port of the
    TensorFlow graph); grayscale inputs are repeated to three channels. Inputs of any size are resized to 299x299.
    """

    num_features = 2048

    def __init__(self):
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3

        # The pool features, and the classifier's logits for the Inception Score (torchmetrics' `logits_unbiased`).
        self.inception = NoTrainInceptionV3(
            name="inception-v3-compat", features_list=[str(self.num_features), "logits_unbiased"]
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = images[:, :3]  # RGBA (--num_channels 4): the colour, without alpha
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        return self.inception(images).reshape(images.shape[0], -1)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images (B, C, H, W) -> the 1008 class logits of the Inception Score."""
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        return self.inception._torch_fidelity_forward(images)[1].reshape(images.shape[0], -1)


def inception_features() -> InceptionFeatures:
    """
    The FID Inception network, or a [`FeatureExtractorUnavailableError`] within seconds saying what is missing:
    torch-fidelity (which torchmetrics uses for it, and which needs a working torchvision), or the weights when they
    are not cached (`torch.hub`'s checkpoints folder) and cannot be downloaded.
    """
    hint = "For the embedded digits dataset use --feature_extractor digits, which needs neither."
    try:
        import torch_fidelity.feature_extractor_inceptionv3 as fidelity_inception
    except Exception as error:  # ImportError, or torchvision failing to load beside this torch build
        raise FeatureExtractorUnavailableError(
            "The Inception feature extractor needs torch-fidelity with a working torchvision "
            f"(`pip install torch-fidelity`, or `pip install torchmetrics[image]`); importing it failed: "
            f"{type(error).__name__}: {error}. {hint}"
        ) from error
    url = fidelity_inception.URL_INCEPTION_V3
    weights = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    # The Hub probe stands for "is there a network": it answers within seconds where a download would hang.
    if not weights.is_file() and work_offline():
        raise FeatureExtractorUnavailableError(
            f"The Inception weights are not cached ({weights}) and cannot be downloaded from {url} (no network, or "
            f"offline mode is on). Run once with network access, or copy the file there. {hint}"
        )
    return InceptionFeatures()


FEATURE_EXTRACTORS: dict[str, Callable[[], torch.nn.Module]] = {
    "digits": DigitsFeatures.pretrained,
    "inception": inception_features,
}


def load_feature_extractor(name: str) -> torch.nn.Module:
    """A feature network by name (a key of `FEATURE_EXTRACTORS`), in eval mode."""
    if name not in FEATURE_EXTRACTORS:
        raise ValueError(f"Unknown feature extractor {name!r}; choose one of {', '.join(FEATURE_EXTRACTORS)}.")
    return FEATURE_EXTRACTORS[name]().eval()


@torch.no_grad()
def extract_features(
    extractor: torch.nn.Module, images: torch.Tensor, batch_size: int = 256, device: str | torch.device | None = None
) -> torch.Tensor:
    """
    Features of uint8 images (N, C, H, W), computed in batches on `device` (the extractor's by default).

    Returns:
        `torch.Tensor` of shape (N, num_features), float32, on the CPU.
    """
    if images.dtype != torch.uint8:
        raise TypeError(f"Feature extractors take uint8 images in 0..255, got {images.dtype}.")
    parameter = next(extractor.parameters(), None)
    device = device or (parameter.device if parameter is not None else "cpu")
    batches = [
        extractor(images[start : start + batch_size].to(device)).float().cpu()
        for start in range(0, images.shape[0], batch_size)
    ]
    return torch.cat(batches) if batches else torch.empty(0, getattr(extractor, "num_features", 0))


@torch.no_grad()
def extract_logits(
    extractor: torch.nn.Module, images: torch.Tensor, batch_size: int = 256, device: str | torch.device | None = None
) -> torch.Tensor | None:
    """
    Class logits of uint8 images (N, C, H, W) from the extractor's classifier head (its `logits` method: the digits
    classifier, Inception), in batches; None for an extractor without one (no Inception Score then).

    Returns:
        `torch.Tensor` of shape (N, num_classes), float32, on the CPU, or None.
    """
    if not callable(getattr(extractor, "logits", None)):
        return None
    if images.dtype != torch.uint8:
        raise TypeError(f"Feature extractors take uint8 images in 0..255, got {images.dtype}.")
    parameter = next(extractor.parameters(), None)
    device = device or (parameter.device if parameter is not None else "cpu")
    batches = [
        extractor.logits(images[start : start + batch_size].to(device)).float().cpu()
        for start in range(0, images.shape[0], batch_size)
    ]
    return torch.cat(batches)
