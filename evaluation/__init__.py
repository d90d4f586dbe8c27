# Copyright 2026 The ddpm-paper authors. Licensed under the Apache License, Version 2.0.
"""The metrics of a DDPM: bits/dim and sample quality (FID, KID, IS, precision/recall) over pluggable feature networks;
`inputs` holds evaluate_ddpm.py's checks of its flags against the model."""

from .features import (
    FEATURE_EXTRACTORS,
    DigitsFeatures,
    FeatureExtractorUnavailableError,
    cache_dir,
    extract_features,
    extract_logits,
    load_feature_extractor,
    weights_digest,
)
from .pipeline_metrics import evaluate, reference_id
from .sample_quality import (
    frechet_distance,
    inception_score,
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
    "evaluate",
    "extract_features",
    "extract_logits",
    "frechet_distance",
    "inception_score",
    "kernel_distance",
    "load_feature_extractor",
    "precision_recall",
    "reference_features",
    "reference_id",
    "sample_quality_metrics",
    "weights_digest",
]
