#!/usr/bin/env python
# Copyright 2026 The ddpm-paper authors. Licensed under the Apache License, Version 2.0.
"""
Evaluate a trained DDPM as Ho et al. 2020 (arXiv:2006.11239) do, and plot what the paper plots.

    python evaluate_ddpm.py --pipeline ddpm-output                       # the embedded digits, digits features
    python evaluate_ddpm.py --pipeline me/ddpm-cifar10 --dataset_name uoft-cs/cifar10 --split test \\
        --bpd_timesteps 100 --num_samples 50000

Writes to `--output_dir`:
- `metrics.json`: bits/dim (Table 2) with its standard error and the prior term L_T, FID, KID, precision and recall
  of generated samples against the dataset, their Inception Score (mean and std over 10 splits), the settings, and the curves behind the plots;
- `rate_distortion.png`: progressive lossy compression, rate and distortion against reverse steps (Sec. 4.3, Fig. 5);
- `bpd_terms.png`: the terms L_t of the bound per timestep;
- `progressive.png`: the predicted x_0 along sampling chains, progressive generation (Fig. 6);
- `interpolation.png`: interpolation in x_t decoded by the reverse process, one row per t (Figs. 8 and 9).

The data flags are those of train_ddpm.py. Under `accelerate launch --multi_gpu --num_processes N` (add `--device cpu`
on a machine without GPUs) the images and samples are split across the processes, and only the main one writes;
every image and sample has its own random stream, so the numbers do not depend on N.

The scalar metrics come from `evaluation.evaluate(pipeline, images, ...)`, which train_ddpm.py also calls during
training; this script adds the command line, the plots and metrics.json.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import re
import signal
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import torch
from accelerate import Accelerator
from diffusers import UNet2DModel
from diffusers.utils import make_image_grid, numpy_to_pil
from transformers import HfArgumentParser

from checkpoints.checkpointing import CHECKPOINT_PREFIX
from evaluation import evaluate, load_feature_extractor, reference_id
from evaluation.features import FeatureExtractorUnavailableError
from evaluation.pipeline_metrics import BPD_STREAM, SAMPLE_STREAM, as_pixels, model_range_and_bits, stream_generators
from evaluation.sample_quality import sample_quality_metrics
from hub_access.atomic_folder import INDEX_NAME
from hub_access.disk_space import first_line, format_bytes, free_bytes, is_disk_full
from hub_access.secrets import (
    flags_holding_tokens,
    is_local_path,
    mask_logs_and_errors,
    public_path,
    redact,
    register,
    token_in_flags_message,
)
from image_data.image_modes import channels_of_data
from image_data.pixels import load_pixels
from image_data.sources import (
    FINGERPRINT_OF,
    DatasetUnavailableError,
    ImageDataError,
    data_fingerprint,
    find_image_column,
    load_image_dataset,
)
from pipelines import DDPMPaperPipeline, model_range_to_unit
from pipelines.export import TRAINING_DATA_FILE, TrainingDataError, read_training_data
from pipelines.interpolation import interpolate
from pipelines.likelihood import BitsPerDimOutput, bits_per_dim, rate_distortion_curve
from pipelines.samplers import SAMPLERS, SamplerError, check_sampler, make_sampler
from pipelines.utils import upscale
from schedulers import DDPMPaperScheduler
from training import flag_ranges
from training.args import default_feature_extractor, parse_flags_or_file
from training.launch import LaunchError, ensure_one_job

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
PLOT_FILES = ("rate_distortion.png", "bpd_terms.png", "progressive.png", "interpolation.png")


@dataclass
class EvaluationArguments:
    pipeline: str = field(metadata={"help": "A pipeline folder (as train_ddpm.py exports it) or a Hub model id."})
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Hub dataset id or local Hub-layout folder (as for training). Default: the training data the "
            "export records (training_data.json), else the embedded digits."
        },
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "The dataset's configuration."})
    train_data_dir: str | None = field(default=None, metadata={"help": "A plain folder of images (imagefolder)."})
    image_column: str | None = field(default=None, metadata={"help": "The image column (auto-detected)."})
    split: str | None = field(
        default=None, metadata={"help": "The split to evaluate on and to compare samples with (default: train)."}
    )
    resolution: int | None = field(
        default=None, metadata={"help": "Image side; must be the model's (its sample_size), the default."}
    )
    num_channels: int | None = field(
        default=None,
        metadata={
            "help": "Convert the images to 1, 3 or 4 channels, as train_ddpm.py's flag; default: the training "
            "record's, else decided from the data. Must be the model's.",
            "choices": [1, 3, 4],
        },
    )
    # `nargs="?", const=True`: a switch as in train_ddpm.py (HfArgumentParser gives a None default no switch form).
    center_crop: bool | None = field(
        default=None,
        metadata={
            "help": "Center crop (else one random crop per image); default: as in training.",
            "nargs": "?",
            "const": True,
        },
    )
    preserve_input_precision: bool | None = field(
        default=None,
        metadata={
            "help": "Keep 16-bit images 16-bit (bits/dim over 65,536 levels); default: as in training.",
            "nargs": "?",
            "const": True,
        },
    )
    cache_dir: str | None = field(default=None, metadata={"help": "The `datasets` cache folder."})
    num_images: int | None = field(
        default=None, metadata={"help": "Dataset images whose bits/dim is computed (default: 256, or all if fewer)."}
    )
    bpd_timesteps: int = field(
        default=0,
        metadata={"help": "K > 0: unbiased estimate of the bound from K random timesteps per image. 0: all T terms."},
    )
    rate_distortion_images: int | None = field(
        default=None,
        metadata={
            "help": "Images for the rate-distortion and per-term plots (all T terms each); default: 16, or all if "
            "fewer."
        },
    )
    num_samples: int = field(default=1000, metadata={"help": "Samples generated for FID, KID, precision/recall."})
    num_inference_steps: int | None = field(
        default=None, metadata={"help": "Sampling steps (respaced chain); defaults to the T of training."}
    )
    scheduler: str = field(
        default="ddpm",
        metadata={
            "help": "The sampler of the samples (docs/sampling.md says which at which step count): ddpm (the "
            "export's spacing), ddpm-respaced (T-1 to 0 evenly), or a diffusers scheduler built from the export's "
            "config. Bits/dim and the plots always use DDPM.",
            "choices": list(SAMPLERS),
        },
    )
    ddim_eta: float = field(
        default=0.0, metadata={"help": "DDIM's eta (--scheduler ddim): 0 deterministic, 1 DDPM-like noise."}
    )
    num_reference_images: int | None = field(
        default=None, metadata={"help": "Dataset images the samples are compared with; all by default."}
    )
    feature_extractor: str | None = field(
        default=None,
        metadata={"help": "inception or digits; defaults to digits for the embedded dataset, inception otherwise."},
    )
    interpolation_timesteps: list[int] | None = field(
        default=None,
        metadata={
            "help": "0-based timesteps of the interpolation rows; default T/20, T/4 and T/2 (minus 1): fine to coarse "
            "as Fig. 9, the last one Fig. 8's 500 of 1000."
        },
    )
    batch_size: int = field(default=256, metadata={"help": "Images per model call."})
    seed: int = field(default=0, metadata={"help": "Seed of every random draw."})
    output_dir: str = field(default="ddpm-evaluation", metadata={"help": "Where metrics.json and the plots go."})
    device: str | None = field(
        default=None, metadata={"help": "cpu, cuda, ...; defaults to CUDA when available (or accelerate's)."}
    )
    allow_other_data: bool = field(
        default=False,
        metadata={
            "help": "Evaluate data whose fingerprint differs from the one training_data.json records under the same "
            "name (refused by default: the scores would be reported under the training data's name)."
        },
    )


# Which model, and which data --------------------------------------------------------------------------------------
class EvaluationInputError(ValueError):
    """The pipeline or the data flags cannot give a meaningful evaluation; the message says what to pass instead."""


SOURCE_FLAGS = ("dataset_name", "dataset_config_name", "train_data_dir", "image_column", "split", "num_channels")
"""Data flags that describe where the images come from: taken from the record only when no dataset is given."""
PREPROCESSING_FLAGS = ("resolution", "center_crop", "preserve_input_precision")
"""Data flags that describe what the model saw of each image: taken from the record unless given."""
DATA_FLAG_DEFAULTS = {"split": "train", "center_crop": False, "preserve_input_precision": False}
"""The defaults of the data flags that are not None, for an export without a record (before training_data.json)."""
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def check_pipeline_folder(pipeline: str) -> None:
    """
    Fails with a message that says what to pass when `--pipeline` names no exported pipeline: a missing folder, a
    training checkpoint (`checkpoint-N`), or a training output folder that holds checkpoints but no export yet.
    A name of the form `user/name` that is not a local folder is left to the Hub.
    """
    path = Path(pipeline).expanduser()
    if (path / INDEX_NAME).is_file():
        return
    if not path.exists():
        local = pipeline.startswith((".", "~", os.sep)) or Path(path.parts[0]).exists()  # e.g. ddpm-output/typo
        if _HUB_ID.fullmatch(pipeline) and not local:
            return
        raise EvaluationInputError(f"--pipeline {pipeline}: no such folder (a Hub model id has the form user/name).")
    if not path.is_dir():
        raise EvaluationInputError(f"--pipeline {pipeline} is a file, not an exported pipeline folder.")
    if not _is_checkpoint(path) and not any(_is_checkpoint(child) for child in path.iterdir()):
        raise EvaluationInputError(
            f"--pipeline {pipeline} has no {INDEX_NAME}: it is not an exported pipeline (train_ddpm.py exports one "
            "into its --output_dir)."
        )
    run = path.parent if _is_checkpoint(path) else path
    run_name = str(run) if path.is_absolute() else os.path.normpath(os.path.relpath(run))
    finish = (
        f"let train_ddpm.py finish (its flags with --output_dir {run_name} --resume_from_checkpoint latest), which "
        f"exports into {run_name}"
    )
    if run == path:
        raise EvaluationInputError(
            f"--pipeline {pipeline} holds training checkpoints but no export yet (no {INDEX_NAME}): {finish}, then "
            "pass it again."
        )
    what = f"--pipeline {pipeline} is a training checkpoint, not an exported pipeline"
    if (run / INDEX_NAME).is_file():
        raise EvaluationInputError(f"{what}: pass --pipeline {run_name}, the export of its run.")
    raise EvaluationInputError(
        f"{what}, and its run's folder {run_name} has no export yet: {finish}, then pass --pipeline {run_name}."
    )


def _is_checkpoint(path: Path) -> bool:
    return path.is_dir() and re.fullmatch(rf"{CHECKPOINT_PREFIX}\d+", path.name) is not None


def fill_data_flags(args: EvaluationArguments, record: dict | None) -> tuple[EvaluationArguments, list[str]]:
    """
    The data flags the user left unset, filled from the export's training record (`training_data.json`): where the
    images come from when no dataset is given, and how they were cropped, sized and stored unless given. Without a
    record, the previous defaults (the embedded digits, split train). Returns the arguments and the names of the
    flags that came from the record.

    Raises:
        `EvaluationInputError`: the record names a local folder (by its base name) that is not in the working folder.
    """
    values = {}
    if record is not None:
        recorded = {name: record.get(name) for name in SOURCE_FLAGS + PREPROCESSING_FLAGS}
        recorded["num_channels"] = record.get("channels")
        recorded["preserve_input_precision"] = record.get("bit_depth") == 16
        dataset_given = args.dataset_name is not None or args.train_data_dir is not None
        names = PREPROCESSING_FLAGS + (() if dataset_given else SOURCE_FLAGS)
        values = {name: recorded[name] for name in names if getattr(args, name) is None}
    from_export = sorted(values)
    for name, default in DATA_FLAG_DEFAULTS.items():
        if values.get(name, getattr(args, name)) is None:
            values[name] = default
    args = replace(args, **values)
    for flag in ("train_data_dir", "dataset_name"):
        if flag in from_export and record.get("source") in ("image-folder", "local-dataset"):
            folder = getattr(args, flag)
            if folder is not None and not os.path.isdir(folder):
                raise EvaluationInputError(
                    f"The model was trained on the folder {folder!r} ({TRAINING_DATA_FILE} of --pipeline {args.pipeline} "
                    f"names it by its base name), which is not in the working folder {os.getcwd()}: pass "
                    f"--{flag} with its path."
                )
    return args, from_export


def describe_data(args: EvaluationArguments) -> str:
    """The evaluation data as a message names it."""
    if args.dataset_name is not None:
        return f"--dataset_name {args.dataset_name}"
    if args.train_data_dir is not None:
        return f"--train_data_dir {args.train_data_dir}"
    return "the embedded digits (no --dataset_name or --train_data_dir)"


def check_model_fits_data(
    args: EvaluationArguments, from_export: list[str], sample_size: int, in_channels: int, data_channels: int | None
) -> None:
    """
    Fails when the evaluation images would not be what the model samples: another resolution, or other channels
    (`data_channels`, None when not known yet). Bits/dim and FID of such images measure nothing.
    """
    plural = "" if in_channels == 1 else "s"
    model = f"the model samples {sample_size}x{sample_size} images with {in_channels} channel{plural}"
    if args.resolution != sample_size:
        given = f"{TRAINING_DATA_FILE} records" if "resolution" in from_export else "--resolution"
        raise EvaluationInputError(
            f"{model}, but {given} {args.resolution} asks for {args.resolution}x{args.resolution} evaluation images: "
            f"its bits/dim and FID would score images it never saw. Leave --resolution out (the model's "
            f"{sample_size})."
        )
    if data_channels is not None and data_channels != in_channels:
        data_plural = "" if data_channels == 1 else "s"
        if "num_channels" in from_export:
            given = f"the training record ({TRAINING_DATA_FILE}) says {data_channels}"
        elif args.num_channels is not None:
            given = f"--num_channels {args.num_channels} asks for {data_channels}"
        else:
            given = f"the evaluation data, {describe_data(args)}, has {data_channels} channel{data_plural}"
        raise EvaluationInputError(
            f"{model}, but {given}: pass the data it was trained on (--dataset_name or --train_data_dir), or "
            f"--num_channels {in_channels} to convert these images as train_ddpm.py would."
        )


def check_bit_depth(args: EvaluationArguments, record: dict | None, from_export: list[str]) -> None:
    """
    Fails when `--preserve_input_precision`, given, contradicts the bit depth the model was trained at (the record's
    `bit_depth`): bits/dim over 65,536 levels of a model trained on 256, or the other way round, measure nothing.
    """
    if record is None or "preserve_input_precision" in from_export or record.get("bit_depth") not in (8, 16):
        return
    trained_bits, asked_bits = record["bit_depth"], 16 if args.preserve_input_precision else 8
    if asked_bits != trained_bits:
        raise EvaluationInputError(
            f"--preserve_input_precision {args.preserve_input_precision} asks for {asked_bits}-bit evaluation images, "
            f"but the model was trained on {trained_bits}-bit ones ({TRAINING_DATA_FILE} of --pipeline "
            f"{args.pipeline}): its bits/dim would count levels it never saw. Leave --preserve_input_precision out."
        )


def check_schedule_flags(args: EvaluationArguments, num_train_timesteps: int) -> None:
    """
    Fails when a flag asks for more diffusion steps than the model has (its scheduler's T), or for a timestep it does
    not have: `--num_inference_steps` in [1, T], `--bpd_timesteps` in [0, T], `--interpolation_timesteps` in [0, T-1].
    """
    T = num_train_timesteps
    model = f"the model (--pipeline {args.pipeline})"
    if args.num_inference_steps is not None and not 1 <= args.num_inference_steps <= T:
        raise EvaluationInputError(
            f"--num_inference_steps {args.num_inference_steps} is more than the T = {T} diffusion steps of {model}: "
            f"pass 1 to {T}, or leave it out (all {T})."
        )
    if args.bpd_timesteps > T:
        raise EvaluationInputError(
            f"--bpd_timesteps {args.bpd_timesteps} is more than the T = {T} terms of the bound of {model}: pass at "
            f"most {T}, or 0 for all {T} terms."
        )
    for t in args.interpolation_timesteps or []:
        if not 0 <= t <= T - 1:
            raise EvaluationInputError(
                f"--interpolation_timesteps {t} is not a timestep of {model}, which has T = {T}: pass 0-based "
                f"timesteps from 0 to {T - 1}, or leave the flag out (T/20, T/4 and T/2, minus 1)."
            )


OUTPUT_MIN_BYTES = 100_000
"""Bytes the two matplotlib plots take at least (about 120 KB for any model); metrics.json adds `OUTPUT_STEP_BYTES` a
diffusion step (its curves), the two image grids more."""
OUTPUT_STEP_BYTES = 100


def check_output_dir(output_dir: str, num_train_timesteps: int) -> None:
    """
    Fails before any work when `--output_dir` cannot take the results: it (or a folder in its path) is a file, its
    nearest existing folder cannot be written (a probe file is written there and removed: a read-only or full disk),
    or its disk has less room than metrics.json and the plots take at least. Creates nothing.
    """
    path = Path(output_dir).expanduser()
    if (path.exists() or path.is_symlink()) and not path.is_dir():
        raise EvaluationInputError(
            f"--output_dir {output_dir} is a file, not a folder: pass a folder (created if missing), or move the "
            "file away."
        )
    existing = path
    while not existing.exists() and not existing.is_symlink() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise EvaluationInputError(
            f"--output_dir {output_dir} lies under {existing}, a file, not a folder: pass a folder path (created if "
            "missing)."
        )
    try:  # a few KB written for real: a read-only disk, a full one, or a folder without write permission
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".evaluate_ddpm-probe-") as probe:
            probe.write(b"\0" * 4096)
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as error:
        if is_disk_full(error):
            raise EvaluationInputError(
                f"--output_dir {output_dir}: the disk of {existing} is full ({first_line(error)}; "
                f"{format_bytes(free_bytes(existing))} free). Free space there, or pass another --output_dir."
            ) from error
        raise EvaluationInputError(
            f"--output_dir {output_dir}: cannot write in {existing} ({first_line(error)}). Pass a folder you can "
            "write to."
        ) from error
    needed, free = OUTPUT_MIN_BYTES + OUTPUT_STEP_BYTES * num_train_timesteps, free_bytes(existing)
    if free < needed:
        raise EvaluationInputError(
            f"--output_dir {output_dir}: its disk has {format_bytes(free)} free, but metrics.json and the plots take "
            f"more than {format_bytes(needed)}. Free space there, or pass another --output_dir."
        )


def check_data_count(args: EvaluationArguments, record: dict | None, from_export: list[str], count: int) -> None:
    """
    Fails when the data the record names (taken from it, not from flags) holds another number of images than the
    model was trained on (the record's `num_images`, the whole split): other data behind the same base name.
    """
    if record is None or "dataset_name" not in from_export or not isinstance(record.get("num_images"), int):
        return  # the data was given by flags, or an older record without the count
    if args.split != record.get("split", "train") or record["num_images"] == count:
        return
    folder = args.train_data_dir if args.train_data_dir is not None else args.dataset_name
    where = f"'{os.path.abspath(folder)}'" if record.get("source") in ("image-folder", "local-dataset") else folder
    if args.train_data_dir is not None:
        what_to_pass = "the folder it was trained on with --train_data_dir (a dataset with --dataset_name)"
    else:
        what_to_pass = "the dataset it was trained on with --dataset_name (a plain folder with --train_data_dir)"
    raise EvaluationInputError(
        f"The model was trained on {record['num_images']} images of split '{args.split}' of {folder!r} "
        f"({TRAINING_DATA_FILE} of --pipeline {args.pipeline}), but {where} has {count}: other data of the same "
        f"name. Pass {what_to_pass}."
    )


def same_name_as_recorded(args: EvaluationArguments, record: dict | None, from_export: list[str]) -> bool:
    """Whether the evaluation data goes by the name the training record gives its data: taken from the record, or
    given by flags that name the same kind of source with the same (base) name, configuration and split."""
    if record is None or args.split != record.get("split", "train"):
        return False
    if "dataset_name" in from_export:
        return True
    source = record.get("source")
    if source == "image-folder":
        return (
            args.dataset_name is None
            and args.train_data_dir is not None
            and (_base_name(args.train_data_dir) == record.get("train_data_dir"))
        )
    if args.train_data_dir is not None or args.dataset_name is None:
        return False
    if source == "local-dataset":
        return is_local_path(args.dataset_name) and _base_name(args.dataset_name) == record.get("dataset_name")
    return source == "hub-dataset" and (args.dataset_name, args.dataset_config_name) == (
        record.get("dataset_name"),
        record.get("dataset_config_name"),
    )


def _base_name(path: str) -> str:
    return os.path.basename(os.path.normpath(os.path.abspath(os.path.expanduser(path))))


def check_data_fingerprint(args: EvaluationArguments, record: dict, fingerprint: str) -> None:
    """
    Fails when the data evaluated under the recorded name (see `same_name_as_recorded`) has another fingerprint
    (`image_data.sources.data_fingerprint`) than the record's, unless --allow_other_data: other images of the same name
    (and count), which metrics.json would report as the training data.
    """
    if args.allow_other_data or fingerprint == record["fingerprint"]:
        return
    if args.train_data_dir is not None:
        where, name = f"--train_data_dir '{os.path.abspath(args.train_data_dir)}'", args.train_data_dir
        what_to_pass = "--train_data_dir with the folder it was trained on (or a copy of it)"
    elif args.dataset_name is not None:
        local = is_local_path(args.dataset_name)
        where = f"--dataset_name '{os.path.abspath(args.dataset_name) if local else args.dataset_name}'"
        name = args.dataset_name
        what_to_pass = "--dataset_name with the dataset it was trained on"
    else:
        where, name = "the embedded digits of this machine's scikit-learn", "embedded digits"
        what_to_pass = "--dataset_name or --train_data_dir with the data it was trained on"
    raise EvaluationInputError(
        f"The model was trained on images with fingerprint {record['fingerprint']} ({TRAINING_DATA_FILE} of "
        f"--pipeline {args.pipeline}), but {where} (split '{args.split}') has fingerprint {fingerprint} "
        f"({FINGERPRINT_OF}): other images under the name {name!r}. Pass {what_to_pass}, or add --allow_other_data "
        "to evaluate these images anyway."
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


COUNT_DEFAULTS = {"num_images": 256, "rate_distortion_images": 16}
"""The defaults of the image counts (None in `EvaluationArguments`, to tell a count given from the default)."""


def used_counts(args: EvaluationArguments, given: set[str], available: int) -> dict[str, int]:
    """
    How many dataset images each count flag uses of the `available` ones, logged when fewer than asked: a warning
    for a count given (`given`), a note for a default.
    """
    used = {
        "num_images": min(args.num_images, available),
        "num_reference_images": min(args.num_reference_images or available, available) if args.num_samples else 0,
        "rate_distortion_images": min(args.rate_distortion_images, available),
    }
    for name, count in used.items():
        asked = getattr(args, name)
        if asked is not None and asked > count and (name != "num_reference_images" or args.num_samples):
            log = logger.warning if name in given else logger.info
            how = "asks for" if name in given else "defaults to"
            log(
                "--%s %s %d images, but %s has %d: using %d.", name, how, asked, describe_data(args), available, count
            )  # fmt: skip
    return used


# Plots ----------------------------------------------------------------------------------------------------------------
def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError(
            "The plots of evaluate_ddpm.py need matplotlib, a dependency of this package: `pip install matplotlib` "
            "(or reinstall this package: `pip install -e .`)."
        ) from error
    return plt


def plot_rate_distortion(curve, num_train_timesteps: int, path: Path) -> None:
    """Fig. 5: distortion and rate against reverse-process steps, and distortion against rate."""
    plt = _pyplot()
    steps = (num_train_timesteps - curve.timesteps).numpy()
    rate, distortion = curve.rate.numpy(), curve.distortion.numpy()
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.6), constrained_layout=True)
    axes[0].plot(steps, distortion)
    axes[0].set(xlabel="Reverse process steps (T - t)", ylabel="Distortion (RMSE [0, 255])")
    axes[1].plot(steps, rate)
    axes[1].set(xlabel="Reverse process steps (T - t)", ylabel="Rate (bits/dim)")
    axes[2].plot(rate, distortion)
    axes[2].set(xlabel="Rate (bits/dim)", ylabel="Distortion (RMSE [0, 255])")
    for axis in axes:
        axis.grid(alpha=0.3)
    figure.suptitle("Progressive lossy compression (Ho et al. 2020, Fig. 5)")
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_bpd_terms(bpd: BitsPerDimOutput, path: Path) -> None:
    """The terms of the bound per timestep, averaged over images (t = 0 is the decoder L_0)."""
    plt = _pyplot()
    terms = bpd.terms.double().mean(dim=0).numpy()
    figure, axis = plt.subplots(figsize=(6.5, 4), constrained_layout=True)
    axis.semilogy(np.arange(1, len(terms)), np.clip(terms[1:], 1e-12, None), label="L_t = KL(q || p_theta), t > 0")
    axis.semilogy([0], [terms[0]], "o", label=f"L_0 decoder NLL ({terms[0]:.3f})")
    prior = bpd.prior.double().mean().item()
    axis.axhline(max(prior, 1e-12), color="gray", linestyle="--", label=f"L_T prior ({prior:.2e})")
    axis.set(
        xlabel="timestep t (0-based)", ylabel="bits/dim", title=f"Terms of the bound: {bpd.total.mean():.3f} bits/dim"
    )
    axis.grid(alpha=0.3, which="both")
    axis.legend()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _grid(rows: torch.Tensor) -> PIL.Image.Image:
    """(R, C, channels, H, W) in [0, 1] -> a PIL grid of R rows and C columns, upscaled (nearest) to >= 256 px a side."""
    num_rows, num_cols = rows.shape[:2]
    tiles = numpy_to_pil(rows.flatten(0, 1).clamp(0, 1).permute(0, 2, 3, 1).cpu().float().numpy())
    return upscale(make_image_grid(tiles, rows=num_rows, cols=num_cols))


def write_plots(
    pipeline: DDPMPaperPipeline,
    images: torch.Tensor,
    output_dir: Path,
    *,
    rate_distortion_images: int = 16,
    num_inference_steps: int | None = None,
    interpolation_timesteps: list[int] | None = None,
    batch_size: int = 256,
    seed: int = 0,
) -> dict:
    """
    Writes the four plots for uint8 (or uint16) `images` and returns the curves behind them (`rate_distortion`,
    `bpd_terms`).
    """
    unet, scheduler = pipeline.unet, pipeline.scheduler
    T = scheduler.config.num_train_timesteps
    data, bits = model_range_and_bits(images[:rate_distortion_images])

    # 1. Rate-distortion and per-term bits/dim: one exact pass over all T terms.
    generator = stream_generators(seed, BPD_STREAM, range(len(data)))
    bpd = bits_per_dim(unet, scheduler, data, generator=generator, batch_size=batch_size, bits=bits)
    curve = rate_distortion_curve(bpd)
    plot_rate_distortion(curve, T, output_dir / "rate_distortion.png")
    plot_bpd_terms(bpd, output_dir / "bpd_terms.png")

    # 2. Progressive generation: x_0 predicted along four sampling chains (rows), over time (columns).
    trajectory = pipeline(
        batch_size=4,
        generator=stream_generators(seed, SAMPLE_STREAM, range(4)),
        num_inference_steps=num_inference_steps or T,
        output_type="pt",
        return_x0_trajectory=True,
    ).x0_trajectory
    _grid(trajectory.transpose(0, 1)).save(output_dir / "progressive.png")

    # 3. Interpolation between the first two images, one row per t (small t keeps details, large t only the layout:
    #    Fig. 9; t = 500 of 1000 is Fig. 8), the two sources at both ends.
    if interpolation_timesteps is None:
        interpolation_timesteps = sorted({max(T // d - 1, 0) for d in (20, 4, 2)})
    pair, _ = model_range_and_bits(images[:2])
    rows = []
    for t in interpolation_timesteps:
        generator = torch.Generator(device="cpu").manual_seed(seed)
        mixed = interpolate(unet, scheduler, pair[0], pair[-1], t=t, generator=generator).cpu()
        rows.append(torch.cat([pair[:1], mixed, pair[-1:]]))
    _grid(model_range_to_unit(torch.stack(rows))).save(output_dir / "interpolation.png")

    return {
        "rate_distortion": {
            "timesteps": curve.timesteps.tolist(),
            "rate_bits_per_dim": curve.rate.tolist(),
            "distortion_rmse": curve.distortion.tolist(),
        },
        "bpd_terms": {
            "timesteps": list(range(T)),
            "bits_per_dim": bpd.terms.double().mean(dim=0).tolist(),
            "prior_bpd": bpd.prior.double().mean().item(),
            "num_images": len(data),
        },
        "interpolation_timesteps": list(interpolation_timesteps),
    }


def _finite_or_null(value):
    """NaN and infinities as JSON null (a single image has no standard error), so metrics.json is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite_or_null(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite_or_null(item) for item in value]
    return value


# Command line ---------------------------------------------------------------------------------------------------------
EVALUATION_RANGES: dict[str, flag_ranges.Range] = {
    "resolution": flag_ranges.POSITIVE,
    "num_channels": (1, 4, True, True),  # its choices (1, 3, 4) are argparse's, also in a JSON / YAML file
    "num_images": flag_ranges.ZERO_OR_MORE,
    "bpd_timesteps": flag_ranges.ZERO_OR_MORE,
    "rate_distortion_images": flag_ranges.POSITIVE,
    "num_samples": flag_ranges.ZERO_OR_MORE,
    "num_inference_steps": flag_ranges.POSITIVE,
    "num_reference_images": flag_ranges.POSITIVE,
    "interpolation_timesteps": flag_ranges.ZERO_OR_MORE,
    "batch_size": flag_ranges.POSITIVE,
    "seed": flag_ranges.SEED,
}
"""The range of each numeric flag, checked by `parse_args` before any work starts."""


def parse_args(argv: list[str] | None = None) -> EvaluationArguments:
    """
    The flags in `argv` (`sys.argv[1:]` by default), or a single JSON or YAML file that holds them. Flags must be
    spelled in full; a numeric flag out of its range (`EVALUATION_RANGES`) exits with status 2 and says why.
    """
    parser = HfArgumentParser(EvaluationArguments, description=__doc__.split("\n\n")[0].strip(), allow_abbrev=False)
    parser.prog = "evaluate_ddpm.py"
    (args,) = parse_flags_or_file(parser, argv)
    message = flag_ranges.first_range_error(args, EVALUATION_RANGES)
    holding = flags_holding_tokens(asdict(args))  # metrics.json's settings hold every flag
    if message is None and holding:
        message = token_in_flags_message(holding)
    if message is not None:
        parser.error(message)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    register()  # tokens of the environment and the login are masked in every log line, by value
    mask_logs_and_errors()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        return evaluate_pipeline(args)
    except (
        DatasetUnavailableError,
        EvaluationInputError,
        FeatureExtractorUnavailableError,
        ImageDataError,
        LaunchError,
        TrainingDataError,
    ) as error:  # expected failures: one line, as train_ddpm.py ends them
        exit_with_one_line(f"evaluate_ddpm.py: error: {redact(str(error))}", error)
    except Exception as error:  # a disk filled: the metrics and plots, or the datasets cache
        if not is_disk_full(error):
            raise
        folders = {
            "--output_dir": args.output_dir,
            "the datasets cache": args.cache_dir or datasets.config.HF_DATASETS_CACHE,
        }
        free = ", ".join(f"{name} '{folder}' {format_bytes(free_bytes(folder))}" for name, folder in folders.items())
        message = f"A disk is full: {first_line(error)}. Free now: {free}. Free space there, then run again."
        exit_with_one_line(f"evaluate_ddpm.py: error: {redact(message)}", error)


def launch_rank() -> int:
    """This process's rank among those a launcher started (`RANK`, which torchrun sets); 0 without a launcher. Read
    from the environment, not the Accelerator: processes that each run alone all believe they are the main one."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


OTHERS_WAIT_S = 30.0
"""How long a process other than the main one waits, before it reports an error itself, for the launcher to stop it."""


def exit_with_one_line(message: str, error: BaseException) -> None:
    """
    Ends the run with `message` (exit status 1). Under a launcher the checks fail alike on every process, so only the
    main one (rank 0) prints it: the others wait up to `OTHERS_WAIT_S` for the launcher, which stops the rest once
    the main process has ended, and then exit with status 1 too, silently; one still running after that failed on
    its own, and says so with its rank.
    """
    rank = launch_rank()
    if rank != 0 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        logging.disable(logging.CRITICAL)
        signal.signal(signal.SIGTERM, lambda *_: os._exit(1))  # stopped by the launcher: the same status, quietly
        time.sleep(OTHERS_WAIT_S)
        message = message.replace("evaluate_ddpm.py: error:", f"evaluate_ddpm.py: error (process {rank}):", 1)
    raise SystemExit(message) from error


def evaluate_pipeline(args: EvaluationArguments) -> dict:
    """Every metric and plot of `args.pipeline` (the work of `main` once the flags are parsed)."""
    # 1. The model, the data it was trained on (training_data.json), the flags that depend on them, and --output_dir:
    #    checked before any long work.
    given = {name for name in (*COUNT_DEFAULTS, "num_reference_images") if getattr(args, name) is not None}
    args = replace(args, **{name: COUNT_DEFAULTS[name] for name in COUNT_DEFAULTS if name not in given})
    check_pipeline_folder(args.pipeline)
    record = read_training_data(args.pipeline)
    if record is None and args.dataset_name is None and args.train_data_dir is None and launch_rank() == 0:
        logger.warning(
            "%s has no %s (an export older than the record): evaluating on the embedded digits unless "
            "--dataset_name or --train_data_dir says otherwise.", args.pipeline, TRAINING_DATA_FILE,
        )  # fmt: skip
    args, from_export = fill_data_flags(args, record)
    configs = {}
    for component, config_class in (("unet", UNet2DModel), ("scheduler", DDPMPaperScheduler)):
        try:
            configs[component] = config_class.load_config(args.pipeline, subfolder=component)
        except OSError as error:  # a Hub id that is not there, or not reachable
            raise EvaluationInputError(
                f"--pipeline {args.pipeline}: cannot load its {component} config ({first_line(error)})"
            ) from error
    sample_size, in_channels = configs["unet"]["sample_size"], configs["unet"]["in_channels"]
    default_T = inspect.signature(DDPMPaperScheduler).parameters["num_train_timesteps"].default
    num_train_timesteps = configs["scheduler"].get("num_train_timesteps", default_T)
    args = replace(args, resolution=args.resolution or sample_size)
    embedded = args.dataset_name is None and args.train_data_dir is None
    check_model_fits_data(args, from_export, sample_size, in_channels, args.num_channels or (1 if embedded else None))
    check_bit_depth(args, record, from_export)
    check_schedule_flags(args, num_train_timesteps)
    try:  # before any sampling: a mean-prediction export with a diffusers sampler, for one
        check_sampler(args.scheduler, configs["scheduler"].get("prediction_type", "epsilon"))
    except SamplerError as error:
        raise EvaluationInputError(f"{error} (--pipeline {args.pipeline})") from error
    check_sample_count(args.num_samples, "--num_samples {count} generated samples are")
    check_output_dir(args.output_dir, num_train_timesteps)

    # One process, or one of `accelerate launch --num_processes N`: the Accelerator's state says which.
    accelerator = Accelerator(cpu=args.device == "cpu")
    ensure_one_job(accelerator, "evaluate_ddpm.py", "--device cpu")  # e.g. `--multi_gpu` without GPUs
    # Several processes take the device accelerate gives each; one process may be sent to any device.
    multi_process = accelerator.num_processes > 1
    device = accelerator.device if multi_process or args.device is None else torch.device(args.device)
    is_main = accelerator.is_main_process

    # The main process fills the caches first (the feature network, downloads, the decoded images); the others read.
    with accelerator.main_process_first():
        # The feature network first: a missing one fails in seconds, not after the bound.
        extractor_name = args.feature_extractor or default_feature_extractor(args.dataset_name, args.train_data_dir)
        extractor = load_feature_extractor(extractor_name) if args.num_samples > 0 else None
        channels = args.num_channels
        if channels is None:  # a dataset given without --num_channels: its images decide, as in training
            channels = channels_of_data(
                args.dataset_name,
                args.dataset_config_name,
                args.train_data_dir,
                image_column=args.image_column,
                cache_dir=args.cache_dir,
                split=args.split,
            )
            check_model_fits_data(args, from_export, sample_size, in_channels, channels)
        # The images are listed (not decoded) to count them: other data behind the recorded name fails now.
        listed = load_image_dataset(
            args.dataset_name,
            args.dataset_config_name,
            args.train_data_dir,
            cache_dir=args.cache_dir,
            split=args.split,
        )
        count = len(listed)
    # Every process checks (none waits for another that failed).
    check_data_count(args, record, from_export, count)
    fingerprint = None
    if record is not None and record.get("fingerprint") and same_name_as_recorded(args, record, from_export):
        fingerprint = data_fingerprint(listed, find_image_column(listed, args.image_column))  # bytes, not decoded
        check_data_fingerprint(args, record, fingerprint)
    if args.num_samples:
        compared = min(args.num_reference_images or count, count)
        check_sample_count(compared, f"{describe_data(args)} has {count} images; {{count}} of them are")

    with accelerator.main_process_first():
        pipeline = DDPMPaperPipeline.from_pretrained(args.pipeline).to(device)
        pipeline.unet.eval()
        resolution = args.resolution

        pixels, _ = load_pixels(
            args.dataset_name,
            args.dataset_config_name,
            args.train_data_dir,
            resolution=resolution,
            channels=channels,
            image_column=args.image_column,
            cache_dir=args.cache_dir,
            split=args.split,
            center_crop=args.center_crop,
            seed=args.seed,
            preserve_input_precision=args.preserve_input_precision,
        )
    used = used_counts(args, given, len(pixels)) if is_main else {}

    metrics = evaluate(
        pipeline,
        pixels,
        num_images=args.num_images,
        bpd_timesteps=args.bpd_timesteps,
        num_samples=args.num_samples,
        num_inference_steps=args.num_inference_steps,
        feature_extractor=extractor if extractor is not None else extractor_name,
        sampler=make_sampler(args.scheduler, pipeline.scheduler.config),
        eta=args.ddim_eta,
        num_reference_images=args.num_reference_images,
        dataset_id=reference_id(args.dataset_name, args.train_data_dir, args.dataset_config_name, args.split),
        batch_size=args.batch_size,
        seed=args.seed,
        accelerator=accelerator,
        show_progress=is_main,
    )
    if not is_main:
        return metrics

    # The results: a folder this run creates is removed again (with what it wrote) if writing them fails.
    output_dir = Path(args.output_dir)
    created = [folder for folder in (output_dir, *output_dir.parents) if not folder.exists()]
    output_dir.mkdir(parents=True, exist_ok=True)
    try:
        report = write_results(
            args,
            pipeline,
            pixels,
            output_dir,
            metrics,
            used,
            extractor_name,
            from_export,
            accelerator.num_processes,
            {"fingerprint": fingerprint, "training_fingerprint": (record or {}).get("fingerprint")},
        )
    except BaseException:  # a full disk, an interruption: no half-written folder of this run stays behind
        if created:
            for name in [METRICS_FILE, *PLOT_FILES]:
                (output_dir / name).unlink(missing_ok=True)
        for folder in created:  # the deepest first
            try:
                folder.rmdir()
            except OSError:  # not empty: something else wrote there meanwhile
                break
        raise
    summary = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
    logger.info("Wrote %s and the plots to %s: %s", METRICS_FILE, output_dir, summary)
    return report


PUBLIC_PATH_FLAGS = ("pipeline", "dataset_name", "train_data_dir", "cache_dir", "output_dir")
"""Flags whose values may be local paths: metrics.json holds them as `public_path` gives them."""


def write_results(
    args: EvaluationArguments,
    pipeline: DDPMPaperPipeline,
    pixels,
    output_dir: Path,
    metrics: dict,
    used: dict[str, int],
    extractor_name: str,
    from_export: list[str],
    num_processes: int,
    fingerprints: dict | None = None,
) -> dict:
    """
    The plots and metrics.json in `output_dir`: the report, `metrics` with the settings and the curves. Local paths
    in the settings are public, as training publishes them (`hub_access.secrets.public_path`): relative to the working
    folder when under it, else the base name.
    """
    curves = write_plots(
        pipeline,
        as_pixels(pixels, max(args.rate_distortion_images, 2)),
        output_dir,
        rate_distortion_images=args.rate_distortion_images,
        num_inference_steps=args.num_inference_steps,
        interpolation_timesteps=args.interpolation_timesteps,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    settings = {
        **asdict(args),
        **{name: public_path(getattr(args, name)) for name in PUBLIC_PATH_FLAGS},
        "feature_extractor": extractor_name,
        "resolution": args.resolution,
        **{f"{name}_used": count for name, count in used.items()},
        "num_train_timesteps": pipeline.scheduler.config.num_train_timesteps,
        "variance_type": pipeline.scheduler.config.variance_type,
        "num_processes": num_processes,
        "data_flags_from_export": from_export,
        # The fingerprint of the data evaluated, when compared with the record's (same name), and the record's.
        "data_fingerprint": (fingerprints or {}).get("fingerprint"),
        "training_data_fingerprint": (fingerprints or {}).get("training_fingerprint"),
    }
    report = {**metrics, "settings": settings, **curves}
    (output_dir / METRICS_FILE).write_text(json.dumps(_finite_or_null(report), indent=2, allow_nan=False) + "\n")
    return report


if __name__ == "__main__":
    main()
