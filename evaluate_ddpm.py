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

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from accelerate import Accelerator
from diffusers.utils import make_image_grid, numpy_to_pil
from transformers import HfArgumentParser

from evaluation import evaluate, load_feature_extractor, reference_id
from evaluation.pipeline_metrics import BPD_STREAM, SAMPLE_STREAM, as_pixels, stream_generators
from pipelines import DDPMPaperPipeline, image_grid, model_range_to_unit, pixels_to_model_range
from pipelines.interpolation import interpolate
from pipelines.likelihood import BitsPerDimOutput, bits_per_dim, rate_distortion_curve
from training import flag_ranges
from training.args import default_feature_extractor, parse_flags_or_file
from training.launch import ensure_one_job
from training.pixels import load_pixels
from training.secrets import mask_logs_and_errors, register

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"


@dataclass
class EvaluationArguments:
    pipeline: str = field(metadata={"help": "A pipeline folder (as train_ddpm.py exports it) or a Hub model id."})
    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Hub dataset id or local Hub-layout folder (as for training). None: the embedded digits."},
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "The dataset's configuration."})
    train_data_dir: str | None = field(default=None, metadata={"help": "A plain folder of images (imagefolder)."})
    image_column: str | None = field(default=None, metadata={"help": "The image column (auto-detected)."})
    split: str = field(default="train", metadata={"help": "The split to evaluate on and to compare samples with."})
    resolution: int | None = field(default=None, metadata={"help": "Image side; defaults to the model's."})
    center_crop: bool = field(default=False, metadata={"help": "Center crop (else one random crop per image)."})
    cache_dir: str | None = field(default=None, metadata={"help": "The `datasets` cache folder."})
    num_images: int = field(default=256, metadata={"help": "Dataset images whose bits/dim is computed."})
    bpd_timesteps: int = field(
        default=0,
        metadata={"help": "K > 0: unbiased estimate of the bound from K random timesteps per image. 0: all T terms."},
    )
    rate_distortion_images: int = field(
        default=16, metadata={"help": "Images for the rate-distortion and per-term plots (all T terms each)."}
    )
    num_samples: int = field(default=1000, metadata={"help": "Samples generated for FID, KID, precision/recall."})
    num_inference_steps: int | None = field(
        default=None, metadata={"help": "Sampling steps (respaced chain); defaults to the T of training."}
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
    """(R, C, channels, H, W) in [0, 1] -> a PIL grid of R rows and C columns, upscaled as the pipeline's samples."""
    num_rows, num_cols = rows.shape[:2]
    tiles = numpy_to_pil(rows.flatten(0, 1).clamp(0, 1).permute(0, 2, 3, 1).cpu().float().numpy())
    # `image_grid` of a single picture is that picture upscaled by the shared rule (nearest, to 256 px across).
    return image_grid([make_image_grid(tiles, rows=num_rows, cols=num_cols)])


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
    Writes the four plots for uint8 `images` and returns the curves behind them (`rate_distortion`, `bpd_terms`).
    """
    unet, scheduler = pipeline.unet, pipeline.scheduler
    T = scheduler.config.num_train_timesteps
    data = pixels_to_model_range(images[:rate_distortion_images])

    # 1. Rate-distortion and per-term bits/dim: one exact pass over all T terms.
    bpd = bits_per_dim(
        unet, scheduler, data, generator=stream_generators(seed, BPD_STREAM, range(len(data))), batch_size=batch_size
    )
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
    pair = pixels_to_model_range(images[:2])
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
    if message is not None:
        parser.error(message)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    register()  # tokens of the environment and the login are masked in every log line, by value
    mask_logs_and_errors()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)

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

        pipeline = DDPMPaperPipeline.from_pretrained(args.pipeline).to(device)
        pipeline.unet.eval()
        unet_config = pipeline.unet.config
        resolution = args.resolution or unet_config.sample_size

        pixels, _ = load_pixels(
            args.dataset_name,
            args.dataset_config_name,
            args.train_data_dir,
            resolution=resolution,
            channels=unet_config.in_channels,
            image_column=args.image_column,
            cache_dir=args.cache_dir,
            split=args.split,
            center_crop=args.center_crop,
            seed=args.seed,
        )

    metrics = evaluate(
        pipeline,
        pixels,
        num_images=args.num_images,
        bpd_timesteps=args.bpd_timesteps,
        num_samples=args.num_samples,
        num_inference_steps=args.num_inference_steps,
        feature_extractor=extractor if extractor is not None else extractor_name,
        num_reference_images=args.num_reference_images,
        dataset_id=reference_id(args.dataset_name, args.train_data_dir, args.dataset_config_name, args.split),
        batch_size=args.batch_size,
        seed=args.seed,
        accelerator=accelerator,
        show_progress=is_main,
    )
    if not is_main:
        return metrics

    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
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
        "feature_extractor": extractor_name,
        "resolution": resolution,
        "num_train_timesteps": pipeline.scheduler.config.num_train_timesteps,
        "variance_type": pipeline.scheduler.config.variance_type,
        "num_processes": accelerator.num_processes,
    }
    report = {**metrics, "settings": settings, **curves}
    (output_dir / METRICS_FILE).write_text(json.dumps(_finite_or_null(report), indent=2, allow_nan=False) + "\n")
    summary = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
    logger.info("Wrote %s and the plots to %s: %s", METRICS_FILE, output_dir, summary)
    return report


if __name__ == "__main__":
    main()
