# Copyright 2026 The ddpm-paper authors. Licensed under the Apache License, Version 2.0.
"""
What evaluate_ddpm.py checks of its flags against the model before any long work: the images fit what the model
samples, the flags that count diffusion steps stay within its T, enough images for precision and recall, and an
`--output_dir` that can take metrics.json and the plots. The flags come as a mapping by their names; each check raises
`pipelines.export.EvaluationInputError`, as those of the export and its record do.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from hub_access.disk_space import output_folder_problem
from image_data.record import describe_data
from pipelines.export import TRAINING_DATA_FILE, EvaluationInputError

from .sample_quality import sample_quality_metrics


def check_model_fits_data(
    flags: Mapping[str, Any], from_export: list[str], sample_size: int, in_channels: int, data_channels: int | None
) -> None:
    """
    Fails when the evaluation images would not be what the model samples: another `resolution`, or other channels
    (`data_channels`, None when not known yet). Bits/dim and FID of such images measure nothing.
    """
    resolution, num_channels = flags["resolution"], flags["num_channels"]
    plural = "" if in_channels == 1 else "s"
    model = f"the model samples {sample_size}x{sample_size} images with {in_channels} channel{plural}"
    if resolution != sample_size:
        given = f"{TRAINING_DATA_FILE} records" if "resolution" in from_export else "--resolution"
        raise EvaluationInputError(
            f"{model}, but {given} {resolution} asks for {resolution}x{resolution} evaluation images: "
            f"its bits/dim and FID would score images it never saw. Leave --resolution out (the model's "
            f"{sample_size})."
        )
    if data_channels is not None and data_channels != in_channels:
        data_plural = "" if data_channels == 1 else "s"
        if "num_channels" in from_export:
            given = f"the training record ({TRAINING_DATA_FILE}) says {data_channels}"
        elif num_channels is not None:
            given = f"--num_channels {num_channels} asks for {data_channels}"
        else:
            data = describe_data(flags["dataset_name"], flags["train_data_dir"])
            given = f"the evaluation data, {data}, has {data_channels} channel{data_plural}"
        raise EvaluationInputError(
            f"{model}, but {given}: pass the data it was trained on (--dataset_name or --train_data_dir), or "
            f"--num_channels {in_channels} to convert these images as train_ddpm.py would."
        )


def check_schedule_flags(flags: Mapping[str, Any], num_train_timesteps: int) -> None:
    """
    Fails when a flag asks for more diffusion steps than the model has (its scheduler's T), or for a timestep it does
    not have: `--num_inference_steps` in [1, T], `--bpd_timesteps` in [0, T], `--interpolation_timesteps` in [0, T-1].
    """
    T = num_train_timesteps
    model = f"the model (--pipeline {flags['pipeline']})"
    num_inference_steps, bpd_timesteps = flags["num_inference_steps"], flags["bpd_timesteps"]
    if num_inference_steps is not None and not 1 <= num_inference_steps <= T:
        raise EvaluationInputError(
            f"--num_inference_steps {num_inference_steps} is more than the T = {T} diffusion steps of {model}: "
            f"pass 1 to {T}, or leave it out (all {T})."
        )
    if bpd_timesteps > T:
        raise EvaluationInputError(
            f"--bpd_timesteps {bpd_timesteps} is more than the T = {T} terms of the bound of {model}: pass at "
            f"most {T}, or 0 for all {T} terms."
        )
    for t in flags["interpolation_timesteps"] or []:
        if not 0 <= t <= T - 1:
            raise EvaluationInputError(
                f"--interpolation_timesteps {t} is not a timestep of {model}, which has T = {T}: pass 0-based "
                f"timesteps from 0 to {T - 1}, or leave the flag out (T/20, T/4 and T/2, minus 1)."
            )


PRECISION_RECALL_K = inspect.signature(sample_quality_metrics).parameters["k"].default
"""The nearest neighbours of precision and recall: each set of images needs more."""


def check_sample_count(count: int, what: str) -> None:
    """
    Fails when `count` images (samples, or dataset images to compare them with) are too few for precision and recall
    (more than `PRECISION_RECALL_K` each); `what` says what they are, with `{count}` where the count goes.
    """
    if 0 < count <= PRECISION_RECALL_K:
        raise EvaluationInputError(
            f"{what.format(count=count)} too few for the sample metrics (precision and recall compare each image "
            f"with its {PRECISION_RECALL_K} nearest neighbours): they need at least {PRECISION_RECALL_K + 1}. Pass "
            f"more, or --num_samples 0 to skip FID, KID, precision and recall."
        )


OUTPUT_MIN_BYTES = 100_000
"""Bytes the two matplotlib plots take at least (about 120 KB for any model); metrics.json adds `OUTPUT_STEP_BYTES` a
diffusion step (its curves), the two image grids more."""
OUTPUT_STEP_BYTES = 100


def check_output_dir(output_dir: str, num_train_timesteps: int) -> None:
    """
    Fails before any work when `--output_dir` cannot take the results (`output_folder_problem`, the check training's
    preflight makes of its folders): a file in the way, a folder this process cannot write, a probe write that fails
    (a full disk), or less room than metrics.json and the plots take at least. Creates nothing.
    """
    needed = OUTPUT_MIN_BYTES + OUTPUT_STEP_BYTES * num_train_timesteps
    problem = output_folder_problem(
        "--output_dir", output_dir, needed_bytes=needed, contents="metrics.json and the plots", probe=True
    )
    if problem is not None:
        raise EvaluationInputError(problem)
