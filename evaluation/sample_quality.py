# Copyright 2026 The ddpm-paper authors. Licensed under the Apache License, Version 2.0.
"""Sample quality of generated images against real ones on a pluggable feature network: FID and KID (torchmetrics),
precision/recall (Kynkaanniemi et al. 2019, k = 3) and the Inception Score (Salimans et al. 2016, 10 splits).
Real-image features are cached by content and extractor (`reference_features`); docs/evaluation.md has the details."""

from __future__ import annotations

import hashlib
import math
import re
import warnings

import torch
from safetensors.torch import load_file

from .features import _atomic_save, cache_dir, extract_features, weights_digest


class _Precomputed(torch.nn.Module):
    """The identity as torchmetrics' `feature` module: FID and KID then take features we computed (and cached)."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def _metric_kwargs() -> dict:
    # Each process holds every feature already (see evaluation.evaluate): no all-reduce at compute time.
    return {"sync_on_compute": False}


def frechet_distance(real_features: torch.Tensor, fake_features: torch.Tensor) -> float:
    """FID between two feature sets (N, D), through torchmetrics' `FrechetInceptionDistance` (float64 statistics)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=_Precomputed(real_features.shape[1]), **_metric_kwargs())
    metric.update(real_features.double(), real=True)
    metric.update(fake_features.double(), real=False)
    return float(metric.compute())


def kernel_distance(
    real_features: torch.Tensor,
    fake_features: torch.Tensor,
    subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """
    KID (mean and standard deviation over `subsets` random subsets) through torchmetrics' `KernelInceptionDistance`;
    `subset_size` is capped at the smaller set, and the subsets are drawn from `seed`.
    """
    from torchmetrics.image.kid import KernelInceptionDistance

    subset_size = min(subset_size, real_features.shape[0], fake_features.shape[0])
    with warnings.catch_warnings():  # "saves all extracted features": that is the point here
        warnings.simplefilter("ignore", UserWarning)
        metric = KernelInceptionDistance(
            feature=_Precomputed(real_features.shape[1]),
            subsets=subsets,
            subset_size=subset_size,
            **_metric_kwargs(),
        )
    metric.update(real_features.double(), real=True)
    metric.update(fake_features.double(), real=False)
    with torch.random.fork_rng(devices=[]):  # torchmetrics draws the subsets from the global generator
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def _kth_neighbour_radii(features: torch.Tensor, k: int, batch_size: int) -> torch.Tensor:
    """Distance from each point to its k-th nearest other point of the same set."""
    radii = [
        torch.cdist(features[start : start + batch_size], features).kthvalue(k + 1, dim=1).values  # +1: itself
        for start in range(0, features.shape[0], batch_size)
    ]
    return torch.cat(radii)


def _fraction_inside(manifold: torch.Tensor, radii: torch.Tensor, queries: torch.Tensor, batch_size: int) -> float:
    """Fraction of `queries` inside the union of the balls B(manifold_i, radii_i) (Kynkaenniemi et al., Eq. 1-2)."""
    inside = [
        (torch.cdist(queries[start : start + batch_size], manifold) <= radii[None, :]).any(dim=1)
        for start in range(0, queries.shape[0], batch_size)
    ]
    return torch.cat(inside).double().mean().item()


def precision_recall(
    real_features: torch.Tensor,
    fake_features: torch.Tensor,
    k: int = 3,
    batch_size: int = 1024,
    device: str | torch.device | None = None,
) -> tuple[float, float]:
    """
    Improved precision and recall (Kynkaenniemi et al. 2019, Sec. 2): each set's manifold is the union of balls
    around its points with radius the distance to the k-th nearest neighbour; precision is the fraction of generated
    features inside the real manifold, recall the fraction of real features inside the generated one.

    The pairwise distances are computed in float64 on `device` (the features' by default), `batch_size` rows at a time.

    Returns:
        `(precision, recall)`, each in [0, 1].
    """
    real, fake = real_features.to(device, torch.float64), fake_features.to(device, torch.float64)
    if min(real.shape[0], fake.shape[0]) <= k:
        raise ValueError(f"Precision/recall with k={k} needs more than {k} images in each set.")
    precision = _fraction_inside(real, _kth_neighbour_radii(real, k, batch_size), fake, batch_size)
    recall = _fraction_inside(fake, _kth_neighbour_radii(fake, k, batch_size), real, batch_size)
    return precision, recall


def inception_score(logits: torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """
    Inception Score (Salimans et al. 2016, Sec. 4) of generated images from their class logits (N, K): the images
    are cut into `splits` consecutive equal parts (a remainder of N mod splits is left out, as in the original code;
    fewer parts when N < splits), each part scores exp(mean_x KL(p(y|x) || p_part(y))), and the mean and the
    population standard deviation of the part scores are returned. It lies in [1, K]: K for confident predictions
    spread evenly over the K classes, 1 for the same prediction for every image.
    """
    if logits.ndim != 2 or logits.shape[0] == 0:
        raise ValueError(f"inception_score takes logits of shape (N, K) with N > 0, got {tuple(logits.shape)}.")
    splits = max(1, min(splits, logits.shape[0]))
    log_p_yx = torch.log_softmax(logits.double(), dim=1)
    size = logits.shape[0] // splits
    scores = []
    for k in range(splits):
        part = log_p_yx[k * size : (k + 1) * size]
        log_p_y = torch.logsumexp(part, dim=0) - math.log(part.shape[0])  # log of the marginal p(y) of the part
        kl = (part.exp() * (part - log_p_y)).sum(dim=1).mean()
        scores.append(kl.exp())
    scores = torch.stack(scores)
    return scores.mean().item(), scores.std(unbiased=False).item()


def sample_quality_metrics(
    real_features: torch.Tensor,
    fake_features: torch.Tensor,
    *,
    k: int = 3,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> dict[str, float]:
    """
    FID, KID and precision/recall (k nearest neighbours, on `device`) of generated against real features.

    Returns:
        `dict` with `fid`, `kid_mean`, `kid_std`, `precision`, `recall`.
    """
    kid_mean, kid_std = kernel_distance(real_features, fake_features, kid_subsets, kid_subset_size, seed)
    precision, recall = precision_recall(real_features, fake_features, k=k, device=device)
    return {
        "fid": frechet_distance(real_features, fake_features),
        "kid_mean": kid_mean,
        "kid_std": kid_std,
        "precision": precision,
        "recall": recall,
    }


def reference_features(
    extractor: torch.nn.Module,
    images: torch.Tensor,
    *,
    extractor_name: str,
    dataset_id: str = "images",
    batch_size: int = 256,
    use_cache: bool = True,
) -> torch.Tensor:
    """
    Features of the real images, cached under `cache_dir()/reference/`: the file name holds the dataset id, the image
    shape, the extractor and the count for the reader, a hash of the pixels so that other images (another crop,
    split or version of the dataset) never reuse it, and a hash of the extractor's weights (`weights_digest`) so that
    a retrained or changed network under the same name never reuses it either.

    Args:
        extractor (`torch.nn.Module`): The feature network.
        images (`torch.Tensor`): uint8 (N, C, H, W).
        extractor_name (`str`): Its name in the cache key (e.g. `"digits"`, `"inception"`), beside its weights' hash.
        dataset_id (`str`, defaults to `"images"`): The dataset's name in the cache key.
        batch_size (`int`, defaults to 256): Images per call of the extractor.
        use_cache (`bool`, defaults to `True`): Read and write the cache.
    """
    if not use_cache:
        return extract_features(extractor, images, batch_size)
    digest = hashlib.sha256(images.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]
    count, channels, height, width = images.shape
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", dataset_id).strip("_.")[:80] or "images"
    name = f"{slug}-{channels}x{height}x{width}-{extractor_name}-{count}-{digest}-{weights_digest(extractor)}"
    path = cache_dir() / "reference" / f"{name}.safetensors"
    if path.is_file():
        return load_file(str(path))["features"]
    features = extract_features(extractor, images, batch_size)
    _atomic_save({"features": features}, path)
    return features
