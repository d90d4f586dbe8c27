#!/usr/bin/env python
# Copyright 2026 The ddpm-paper authors. Licensed under the Apache License, Version 2.0.
"""Evaluate a trained DDPM as Ho et al. 2020 do, and plot what the paper plots.

    python evaluate_ddpm.py --pipeline ddpm-output                       # the embedded digits, digits features
    python evaluate_ddpm.py configs/eval-paper.yaml --pipeline me/ddpm-cifar10   # 50k samples, the test split's NLL

Writes `metrics.json` (bits/dim, FID, KID, precision/recall, Inception Score, the settings) and the plots of the
paper (rate-distortion, the terms of the bound, progressive generation, interpolation) into `--output_dir`. The input
checks live in the rooms they check; every metric and flag: docs/evaluation.md."""

from __future__ import annotations

import inspect
import json
import logging
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import torch
from accelerate import Accelerator
from diffusers import UNet2DModel
from diffusers.utils import make_image_grid, numpy_to_pil

from command_line.fields import POSITIVE, SEED, ZERO_OR_MORE, default_feature_extractor, first_range_error
from command_line.flag_files import parse_flags_or_file
from command_line.parsing import FlagParser, flags_holding_tokens, launch_rank, one_line_exit, token_in_flags_message
from evaluation import evaluate, load_feature_extractor, reference_id
from evaluation.features import FeatureExtractorUnavailableError
from evaluation.inputs import check_model_fits_data, check_output_dir, check_sample_count, check_schedule_flags
from evaluation.pipeline_metrics import BPD_STREAM, SAMPLE_STREAM, as_pixels, model_range_and_bits, stream_generators
from hub_access.disk_space import first_line, format_bytes, free_bytes, is_disk_full
from hub_access.secrets import mask_logs_and_errors, public_path, register
from image_data.image_modes import channels_of_data
from image_data.pixels import load_pixels
from image_data.record import (
    check_bit_depth,
    check_data_count,
    check_data_fingerprint,
    data_fingerprint,
    describe_data,
    fill_data_flags,
    same_name_as_recorded,
)
from image_data.sources import DatasetUnavailableError, ImageDataError, find_image_column, load_image_dataset
from pipelines import DDPMPaperPipeline, model_range_to_unit
from pipelines.export import (
    TRAINING_DATA_FILE,
    EvaluationInputError,
    TrainingDataError,
    check_pipeline_folder,
    read_training_data,
)
from pipelines.interpolation import interpolate
from pipelines.likelihood import BitsPerDimOutput, bits_per_dim, rate_distortion_curve
from pipelines.samplers import SAMPLERS, SamplerError, check_sampler, make_sampler
from pipelines.utils import upscale
from schedulers import DDPMPaperScheduler
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
        default=None,
        metadata={"help": "Image side; must be the model's (its sample_size), the default.", "range": POSITIVE},
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
        default=None,
        metadata={
            "help": "Dataset images whose bits/dim is computed (default: 256, or all if fewer).",
            "range": ZERO_OR_MORE,
        },
    )
    bpd_timesteps: int = field(
        default=0,
        metadata={
            "help": "K > 0: unbiased estimate of the bound from K random timesteps per image. 0: all T terms.",
            "range": ZERO_OR_MORE,
        },
    )
    rate_distortion_images: int | None = field(
        default=None,
        metadata={
            "help": "Images for the rate-distortion and per-term plots (all T terms each); default: 16, or all if "
            "fewer.",
            "range": POSITIVE,
        },
    )
    num_samples: int = field(
        default=1000, metadata={"help": "Samples generated for FID, KID, precision/recall.", "range": ZERO_OR_MORE}
    )
    num_inference_steps: int | None = field(
        default=None,
        metadata={"help": "Sampling steps (respaced chain); defaults to the T of training.", "range": POSITIVE},
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
        default=0.0,
        metadata={"help": "DDIM's eta (--scheduler ddim): 0 deterministic, 1 DDPM-like noise.", "range": ZERO_OR_MORE},
    )
    num_reference_images: int | None = field(
        default=None,
        metadata={"help": "Dataset images the samples are compared with; all by default.", "range": POSITIVE},
    )
    feature_extractor: str | None = field(
        default=None,
        metadata={"help": "inception or digits; defaults to digits for the embedded dataset, inception otherwise."},
    )
    interpolation_timesteps: list[int] | None = field(
        default=None,
        metadata={
            "help": "0-based timesteps of the interpolation rows; default T/20, T/4 and T/2 (minus 1): fine to coarse "
            "as Fig. 9, the last one Fig. 8's 500 of 1000.",
            "range": ZERO_OR_MORE,
        },
    )
    batch_size: int = field(default=256, metadata={"help": "Images per model call.", "range": POSITIVE})
    seed: int = field(default=0, metadata={"help": "Seed of every random draw.", "range": SEED})
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


# Counts of the data ------------------------------------------------------------------------------------------------
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
    data = describe_data(args.dataset_name, args.train_data_dir)
    for name, count in used.items():
        asked = getattr(args, name)
        if asked is not None and asked > count and (name != "num_reference_images" or args.num_samples):
            log = logger.warning if name in given else logger.info
            how = "asks for" if name in given else "defaults to"
            log("--%s %s %d images, but %s has %d: using %d.", name, how, asked, data, available, count)
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
def parse_args(argv: list[str] | None = None) -> EvaluationArguments:
    """
    The flags in `argv` (`sys.argv[1:]` by default), or a single JSON or YAML file that holds them. Flags must be
    spelled in full; a numeric flag out of the range declared with its field exits with status 2 and says why.
    """
    parser = FlagParser(EvaluationArguments, prog="evaluate_ddpm.py", description=__doc__.split("\n\n")[0].strip())
    (args,) = parse_flags_or_file(parser, argv)
    message = first_range_error(args)
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
    ) as error:  # expected failures: one line, as train_ddpm.py ends them, said once under a launcher
        raise one_line_exit("evaluate_ddpm.py", str(error), main_rank_only=True) from error
    except Exception as error:  # a disk filled: the metrics and plots, or the datasets cache
        if not is_disk_full(error):
            raise
        folders = {
            "--output_dir": args.output_dir,
            "the datasets cache": args.cache_dir or datasets.config.HF_DATASETS_CACHE,
        }
        free = ", ".join(f"{name} '{folder}' {format_bytes(free_bytes(folder))}" for name, folder in folders.items())
        message = f"A disk is full: {first_line(error)}. Free now: {free}. Free space there, then run again."
        raise one_line_exit("evaluate_ddpm.py", message, main_rank_only=True) from error


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
    filled, from_export = fill_data_flags(asdict(args), record, args.pipeline)
    args = replace(args, **filled)
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
    data_channels = args.num_channels or (1 if embedded else None)
    check_model_fits_data(asdict(args), from_export, sample_size, in_channels, data_channels)
    check_bit_depth(args.preserve_input_precision, record, from_export, args.pipeline)
    check_schedule_flags(asdict(args), num_train_timesteps)
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
            check_model_fits_data(asdict(args), from_export, sample_size, in_channels, channels)
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
    check_data_count(asdict(args), record, from_export, count, args.pipeline)
    fingerprint = None
    if record is not None and record.get("fingerprint") and same_name_as_recorded(asdict(args), record, from_export):
        fingerprint = data_fingerprint(listed, find_image_column(listed, args.image_column))  # bytes, not decoded
        check_data_fingerprint(asdict(args), record, fingerprint, args.pipeline, args.allow_other_data)
    if args.num_samples:
        compared = min(args.num_reference_images or count, count)
        data = describe_data(args.dataset_name, args.train_data_dir)
        check_sample_count(compared, f"{data} has {count} images; {{count}} of them are")

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
