# Copyright 2026 The ddpm-paper authors. Licensed under the Apache License, Version 2.0.
"""Sample-quality metrics (FID, KID, precision/recall) over pluggable feature networks."""

from .features import (
    FEATURE_EXTRACTORS,
    DigitsFeatures,
    FeatureExtractorUnavailableError,
    cache_dir,
    extract_features,
    load_feature_extractor,
    weights_digest,
)
from .sample_quality import (
    frechet_distance,
    kernel_distance,
    precision_recall,
    reference_features,
    sample_quality_metrics,
)

__all__ = [
    "FEATURE_EXTRACTORS",
    "DigitsFeatures",
    "FeatureExtractorUnavailableError",
    "cache_dir",
    "extract_features",
    "frechet_distance",
    "kernel_distance",
    "load_feature_extractor",
    "precision_recall",
    "reference_features",
    "sample_quality_metrics",
    "weights_digest",
]
