"""The command line of train_ddpm.py: one typed dataclass, parsed by `transformers.HfArgumentParser`.

Every flag of diffusers' `examples/unconditional_image_generation/train_unconditional.py` keeps its name, default and
meaning whenever a dataset is given (where the paper used another value, `--help` gives it); the flags it lacks are
marked "(new)" in `--help` and default to the paper's values where the paper has one (`--max_grad_norm 1.0`,
`--variance_type fixed_small`). The run with no dataset (the embedded digits, which needs no flags) has its own
defaults for the flags in `RUN_DEFAULTS`, the one table of run-dependent defaults: those flags default to `None` here,
`resolve_args` fills them in from it, and `--help` prints both of its columns.

The same keys work in one JSON or YAML file: `train_ddpm.py config.yaml`.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import sys
from argparse import ArgumentDefaultsHelpFormatter, RawDescriptionHelpFormatter
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml
from diffusers.optimization import SchedulerType
from transformers import HfArgumentParser

from hub_access.secrets import (
    flags_holding_tokens,
    known_tokens,
    parse_strictly,
    public_path,
    redact,
    redact_values,
    token_in_flags_message,
)
from schedulers import BETA_SCHEDULES, VARIANCE_TYPES
from training import flag_ranges
from training.losses import LOSS_TYPES, check_objective
from training.models import MODEL_PRESETS

# The names of `evaluation.FEATURE_EXTRACTORS`, as plain argparse choices: training/ does not import evaluation/
# (tests/test_evaluate_cli.py keeps the two equal).
FEATURE_EXTRACTOR_NAMES = ("digits", "inception")

# The one place where a flag's default depends on the run. With --dataset_name or --train_data_dir every flag of
# train_unconditional.py takes that script's default (the first value; for a flag it lacks, ours: `ddpm-256` has the
# layout of its built-in UNet2DModel). With no dataset, the embedded 8x8 digits run, which must need no flags, takes
# the second: the `tiny` net (0.7M parameters) at the digits' native 8x8 resolution, 100 epochs of batch 64 (2,900
# steps, ~0.09 s each on one CPU core: about 5 minutes with the sample grids) and the paper's EMA. Flags left unset
# take these values; `--help` shows both columns; every other flag has one default for every run.
RUN_DEFAULTS: dict[str, tuple[Any, Any]] = {
    # flag: (with a dataset, with no dataset)
    "model_preset": ("ddpm-256", "tiny"),
    "resolution": (64, 8),
    "output_dir": ("ddpm-model-64", "ddpm-output"),
    "train_batch_size": (16, 64),
    "learning_rate": (1e-4, 1e-3),
    "lr_warmup_steps": (500, 200),
    "use_ema": (False, True),
    "save_images_epochs": (10, 0),
    "save_images_steps": (None, 1000),
    "save_model_epochs": (10, 0),
}
PEER_DEFAULTS: dict[str, Any] = {name: values[0] for name, values in RUN_DEFAULTS.items()}
DIGITS_DEFAULTS: dict[str, Any] = {name: values[1] for name, values in RUN_DEFAULTS.items()}

PAPER_RECIPES = {
    "configs/ddpm-cifar10.yaml": "CIFAR-10 32x32, the 35.7M net, batch 128, 800k steps",
    "configs/ddpm-celebahq256.yaml": "CelebA-HQ 256x256, the 114M net, batch 64, 0.5M steps",
    "configs/ddpm-lsun-church256.yaml": "LSUN Church 256x256, batch 64, 1.2M steps",
    "configs/ddpm-lsun-bedroom256.yaml": "LSUN Bedroom 256x256, batch 64, 2.4M steps, no flips",
    "configs/digits.yaml": "the no-flag default run on the embedded digits, written out",
}
"""The flag files of the paper's experiments (Ho et al. 2020, Appendix B), named in `--help`'s epilog."""

_RECIPE_LINES = "\n".join(f"  {path:34} {what}" for path, what in PAPER_RECIPES.items())
_EPILOG = f"""
With a dataset (--dataset_name or --train_data_dir) every flag of diffusers' train_unconditional.py has that
script's default. With no dataset the run trains on the embedded 8x8 digits, and the flags whose help says "with no
dataset" take that value instead.

Flags can come from a JSON or YAML file with the same keys, followed by flags that override it. The paper's runs:

{_RECIPE_LINES}

  accelerate launch --multi_gpu --num_processes 8 train_ddpm.py configs/ddpm-cifar10.yaml --output_dir ddpm-cifar10
"""


def _arg(default: Any = None, help: str = "", **kwargs) -> Any:
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class TrainingArguments:
    """Flags of train_ddpm.py. Those marked "(new)" are not in diffusers' train_unconditional.py."""

    # Data ------------------------------------------------------------------------------------------------------------
    dataset_name: str | None = _arg(
        help="A Hub dataset id, or a local folder laid out like a Hub dataset repo (data/train-*.parquet). With "
        "neither this nor --train_data_dir, the embedded 8x8 digits (no network needed)."
    )
    dataset_config_name: str | None = _arg(help="The dataset's config, if it has several.")
    train_data_dir: str | None = _arg(help="A folder of images (the `imagefolder` layout).")
    image_column: str | None = _arg(help="(new) The column holding the images; by default the first image column.")
    cache_dir: str | None = _arg(help="Where downloaded datasets and model configs are stored.")
    streaming: bool = _arg(
        False, help="(new) Read the dataset lazily, for data larger than memory or disk; needs --max_train_steps."
    )
    resolution: int | None = _arg(help="Images are resized (short side) and cropped to this size.")
    center_crop: bool = _arg(
        False,
        help="Crop the center of the resized image. Without it, one random crop per image, drawn once when the "
        "cache is built (train_unconditional.py draws one every epoch: docs/differences.md).",
    )
    random_flip: bool = _arg(False, help="Flip images left-right at random (the paper does, on CIFAR-10 and LSUN).")
    dataloader_num_workers: int = _arg(0, help="Worker processes of the DataLoader (0: the main process).")
    preprocessing_num_workers: int | None = _arg(
        help="(new) Processes that decode and resize the images once, before training."
    )
    num_channels: int | None = _arg(
        help="(new) Channels of the model: 1 (grayscale), 3 (RGB) or 4 (RGBA). By default the majority of the first "
        "64 images' modes decides (docs/data.md). Digits: 1.",
        choices=[1, 3, 4],
    )
    preserve_input_precision: bool = _arg(
        False,
        help="Keep 16-bit images 16-bit (bits/dim over 65,536 levels); without it they are scaled to 8 bits "
        "(docs/data.md).",
    )

    # Model and diffusion ---------------------------------------------------------------------------------------------
    model_preset: str | None = _arg(
        help="(new) A UNet2DModel preset: ddpm-cifar10 (the paper's 35.7M net), ddpm-256 (its 114M 256x256 net, the "
        "layout of train_unconditional.py's model), tiny (0.7M, for CPUs).",
        choices=list(MODEL_PRESETS),
    )
    model_config_name_or_path: str | None = _arg(
        help="A UNet2DModel config instead of a preset: a config.json, a model folder or a Hub id."
    )
    prediction_type: Literal["epsilon", "sample", "v_prediction", "mean"] = _arg(
        "epsilon",
        help="What the net predicts: epsilon (the paper's), sample (x0, SNR-weighted loss as in "
        "train_unconditional.py), v_prediction (new) or mean (new: mu-tilde, Table 2; --loss_type vlb or mse).",
    )
    loss_type: str = _arg(
        "simple",
        help="(new) The objective (Table 2 of the paper, see training/losses.py): simple (L_simple, Eq. 14), vlb (the "
        "true variational bound, Eq. 5) or mse (mean prediction only: unweighted MSE of mu-tilde).",
        choices=list(LOSS_TYPES),
    )
    variance_type: str = _arg(
        "fixed_small",
        help="(new) sigma_t^2 of the reverse process: fixed_small (the paper), fixed_large, their _log variants, or "
        "learned_range (Nichol & Dhariwal 2021: twice the output channels, trained with L_simple + L_vlb/1000).",
        # `learned` (the extra channels are sigma_t^2 itself) has no training loss in train_ddpm.py.
        choices=[v for v in VARIANCE_TYPES if v != "learned"],
    )
    ddpm_num_steps: int = _arg(1000, help="T, the number of diffusion steps.")
    ddpm_num_inference_steps: int = _arg(1000, help="Sampling steps for the sample grids.")
    ddpm_beta_schedule: str = _arg("linear", help="The beta schedule.", choices=list(BETA_SCHEDULES))
    gradient_checkpointing: bool = _arg(False, help="(new) Recompute activations in backward to save memory.")
    enable_xformers_memory_efficient_attention: bool = _arg(False, help="Use xformers attention (needs xformers).")
    compile: bool = _arg(False, help="(new) torch.compile the U-Net.")
    compile_mode: str | None = _arg(
        help="(new) The torch.compile mode with --compile: default, reduce-overhead (CUDA graphs), max-autotune or "
        "max-autotune-no-cudagraphs.",
        choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
    )
    channels_last: bool = _arg(False, help="(new) channels-last memory format (faster convolutions on GPUs).")

    # Optimisation ----------------------------------------------------------------------------------------------------
    seed: int = _arg(0, help="(new) Seed of the initialisation, the data order, the noise and the sample grids.")
    train_batch_size: int | None = _arg(help="Batch size per process.")
    eval_batch_size: int = _arg(16, help="Images in each sample grid.")
    num_epochs: int = _arg(100, help="Passes over the data (unless --max_train_steps is given).")
    max_train_steps: int | None = _arg(help="(new) Optimizer steps to train for; overrides --num_epochs.")
    gradient_accumulation_steps: int = _arg(1, help="Batches accumulated per optimizer step.")
    learning_rate: float | None = _arg(help="Peak learning rate (the paper: 2e-4).")
    lr_scheduler: str = _arg(
        "cosine",
        help="The learning rate schedule (the paper: constant_with_warmup).",
        choices=[s.value for s in SchedulerType if s.value != "piecewise_constant"],
    )
    lr_warmup_steps: int | None = _arg(help="Warm-up optimizer steps (the paper: 5000).")
    adam_beta1: float = _arg(0.95, help="AdamW beta1 (the paper: 0.9).")
    adam_beta2: float = _arg(0.999, help="AdamW beta2.")
    adam_weight_decay: float = _arg(1e-6, help="AdamW weight decay (the paper: 0).")
    adam_epsilon: float = _arg(1e-8, help="AdamW epsilon.")
    max_grad_norm: float = _arg(1.0, help="(new) Clip the gradient norm to this (the paper: 1.0); 0 disables.")
    max_nonfinite_steps: int = _arg(
        100, help="(new) Stop with an error after this many optimizer steps in a row with a non-finite gradient."
    )
    use_ema: bool | None = _arg(
        help="Keep an exponential moving average of the weights (the paper's, decay 0.9999) and export it. "
        "`--use_ema false` turns it off.",
        nargs="?",
        const=True,
    )
    ema_inv_gamma: float = _arg(1.0, help="EMA warm-up: decay = 1 - (1 + step / inv_gamma) ** -power.")
    ema_power: float = _arg(3 / 4, help="EMA warm-up power.")
    ema_max_decay: float = _arg(0.9999, help="Largest EMA decay (the paper: 0.9999).")
    mixed_precision: Literal["no", "fp16", "bf16"] = _arg(
        "no",
        help="Mixed precision; wins over the accelerate config's, as in train_unconditional.py: pass it here.",
    )
    allow_tf32: bool = _arg(True, help="(new) TF32 matmuls and convolutions on Ampere or newer GPUs.")
    cpu: bool = _arg(
        False,
        help="(new) Train on the CPU. With `accelerate launch --multi_gpu --num_processes N` it runs N CPU "
        "processes (gloo).",
    )

    # Outputs ---------------------------------------------------------------------------------------------------------
    output_dir: str | None = _arg(help="Where checkpoints, samples and the exported pipeline go.")
    overwrite_output_dir: bool = _arg(
        False,
        help="Start over in an --output_dir with an earlier run's checkpoints: its checkpoint-* folders are removed "
        "before training (docs/checkpoints.md).",
    )
    logger: Literal["tensorboard", "wandb"] = _arg("tensorboard", help="Experiment tracker.")
    logging_dir: str = _arg("logs", help="Tracker logs, under --output_dir.")
    logging_steps: int = _arg(10, help="(new) Log loss, lr, grad norm and images/s every this many steps.")
    checkpointing_steps: int = _arg(500, help="Write a resumable checkpoint every this many optimizer steps.")
    checkpoints_total_limit: int | None = _arg(help="Keep at most this many checkpoints (the oldest are removed).")
    resume_from_checkpoint: str | None = _arg(
        help="`latest` (the newest complete checkpoint in --output_dir, if any) or a checkpoint path / name. The "
        "optimizer, LR-schedule, EMA and length flags of this command line are applied from the step reached (named "
        "in the log); --seed is the checkpoint's; other model shapes, or --use_ema without an EMA, are refused."
    )
    save_images_epochs: int | None = _arg(help="Save a sample grid every this many epochs (0: never).")
    save_images_steps: int | None = _arg(help="(new) Save a sample grid every this many steps.")
    save_model_epochs: int | None = _arg(help="Export the pipeline every this many epochs (0: never).")
    save_model_steps: int | None = _arg(help="(new) Export the pipeline every this many steps.")
    push_to_hub: bool = _arg(False, help="Push each export to the Hub.")
    hub_token: str | None = _arg(
        help="Hub token; prefer HF_TOKEN or `huggingface-cli login` (the launcher prints a failed command line). "
        "Masked everywhere, never saved."
    )
    hub_model_id: str | None = _arg(help="Hub repo to push to; by default the name of --output_dir.")
    hub_private_repo: bool = _arg(False, help="Create the Hub repo as private.")
    local_rank: int = _arg(-1, help="Accepted for compatibility; accelerate sets the rank.")

    # Evaluation during training (evaluation.evaluate on held-out images, with the EMA weights) ------------------
    eval_steps: int | None = _arg(
        help="(new) Evaluate bits/dim, FID, KID and precision/recall on held-out images every this many steps and "
        "at the end (docs/evaluation.md). 0 or unset: never."
    )
    eval_split: str | None = _arg(
        help="(new) The split to evaluate on (e.g. test). Unset: the last --eval_holdout_images training images are "
        "held out of training."
    )
    eval_holdout_images: int = _arg(
        256, help="(new) Size of the held-out set (see --eval_split); the samples are compared with all of it."
    )
    eval_num_images: int = _arg(64, help="(new) Held-out images whose bits/dim is computed (the first ones).")
    eval_bpd_timesteps: int = _arg(
        50, help="(new) K: bits/dim as the unbiased estimate from K random timesteps per image; 0: all T terms."
    )
    eval_num_samples: int = _arg(256, help="(new) Samples generated for FID, KID and precision/recall; 0 skips them.")
    eval_feature_extractor: str | None = _arg(
        help="(new) The feature network of FID/KID/precision/recall. Default: digits for the embedded digits, "
        "inception otherwise.",
        choices=list(FEATURE_EXTRACTOR_NAMES),
    )
    eval_num_inference_steps: int | None = _arg(
        help="(new) Sampling steps of the evaluation samples. Default: --ddpm_num_inference_steps."
    )


class ArgumentError(ValueError):
    """Flags that cannot be used together, or a value out of range."""


PATH_FLAGS = (
    "output_dir",
    "logging_dir",
    "train_data_dir",
    "dataset_name",
    "cache_dir",
    "model_config_name_or_path",
    "resume_from_checkpoint",
)
"""The flags that name (or may name) a local path. `~` and `$VARIABLE` in them are expanded by `resolve_args`, as a
shell expands them on a command line and nothing does in a file of flags (a Hub id starts with neither, `latest` holds
neither); `public_config` publishes them by their public names."""

_VARIABLE = re.compile(r"\$(\w+|\{[^}]*\})")


def _expanded_path(name: str, value: str) -> str:
    """`value` of the path flag `--name` with `~` and `$VARIABLE` expanded; refused where either stays literal."""
    expanded = os.path.expanduser(os.path.expandvars(value))
    unset = _VARIABLE.search(expanded)
    if unset is not None:
        raise ArgumentError(
            f"--{name} '{value}' names the environment variable {unset.group(0)}, which is not set: set it, or pass "
            "the path itself."
        )
    if expanded.startswith("~"):
        raise ArgumentError(
            f"--{name} '{value}': '{expanded.split(os.sep)[0]}' is no user's home folder here: pass the path itself."
        )
    return expanded


def _blank_string_flag(args: TrainingArguments) -> str | None:
    """The one-line error for the first text flag given as an empty (or blank) value, or None."""
    for item in dataclasses.fields(args):
        value = getattr(args, item.name)
        if isinstance(value, str) and not value.strip():
            meaning = "a path or a name" if item.name in PATH_FLAGS or item.name.startswith("hub_") else "a value"
            return f"--{item.name} '{value}' is empty: pass {meaning}, or leave the flag out for its default."
    return None


FLAG_RANGES: dict[str, flag_ranges.Range] = {
    # Data
    "resolution": flag_ranges.POSITIVE,
    "dataloader_num_workers": flag_ranges.ZERO_OR_MORE,
    "preprocessing_num_workers": flag_ranges.POSITIVE,
    "num_channels": (1, 4, True, True),  # its choices (1, 3, 4) are checked too, also in a JSON / YAML file
    # Model and diffusion
    "ddpm_num_steps": flag_ranges.POSITIVE,
    "ddpm_num_inference_steps": flag_ranges.POSITIVE,
    # Optimisation
    "seed": flag_ranges.SEED,
    "train_batch_size": flag_ranges.POSITIVE,
    "eval_batch_size": flag_ranges.POSITIVE,
    "num_epochs": flag_ranges.POSITIVE,
    "max_train_steps": flag_ranges.POSITIVE,
    "gradient_accumulation_steps": flag_ranges.POSITIVE,
    "learning_rate": flag_ranges.POSITIVE,
    "lr_warmup_steps": flag_ranges.ZERO_OR_MORE,
    "adam_beta1": flag_ranges.UNIT_OPEN_ABOVE,
    "adam_beta2": flag_ranges.UNIT_OPEN_ABOVE,
    "adam_weight_decay": flag_ranges.ZERO_OR_MORE,
    "adam_epsilon": flag_ranges.POSITIVE,
    "max_grad_norm": flag_ranges.ZERO_OR_MORE,
    "max_nonfinite_steps": flag_ranges.POSITIVE,
    "ema_inv_gamma": flag_ranges.POSITIVE,
    "ema_power": flag_ranges.POSITIVE,
    "ema_max_decay": flag_ranges.UNIT_CLOSED,
    # Outputs
    "logging_steps": flag_ranges.POSITIVE,
    "checkpointing_steps": flag_ranges.POSITIVE,
    "checkpoints_total_limit": flag_ranges.POSITIVE,
    "save_images_epochs": flag_ranges.ZERO_OR_MORE,
    "save_images_steps": flag_ranges.POSITIVE,
    "save_model_epochs": flag_ranges.ZERO_OR_MORE,
    "save_model_steps": flag_ranges.POSITIVE,
    "local_rank": (-1, None, True, False),  # -1: not set
    # Evaluation (--eval_steps 0 means none: it becomes None before the check)
    "eval_steps": flag_ranges.POSITIVE,
    "eval_holdout_images": flag_ranges.POSITIVE,
    "eval_num_images": flag_ranges.ZERO_OR_MORE,
    "eval_bpd_timesteps": flag_ranges.ZERO_OR_MORE,
    "eval_num_samples": flag_ranges.ZERO_OR_MORE,
    "eval_num_inference_steps": flag_ranges.POSITIVE,
}
"""The range of every numeric flag, checked by `resolve_args` before any work starts (tests/test_errors.py fails for
a numeric flag missing here)."""


def uses_embedded_dataset(args: TrainingArguments) -> bool:
    """Whether the run trains on the embedded digits (no dataset given)."""
    return args.dataset_name is None and args.train_data_dir is None


def image_channels(args: TrainingArguments) -> int | None:
    """`--num_channels`; else 1 for the embedded (grayscale) digits, None (decided from the data) for a dataset."""
    if args.num_channels is not None:
        return args.num_channels
    return 1 if uses_embedded_dataset(args) else None


def default_feature_extractor(dataset_name: str | None, train_data_dir: str | None) -> str:
    """The feature network of FID/KID/precision/recall: `digits` for the embedded digits, `inception` otherwise."""
    return "digits" if dataset_name is None and train_data_dir is None else "inception"


def resolve_args(args: TrainingArguments) -> TrainingArguments:
    r"""
    Fill in the defaults that depend on the run, and check the flags.

    - The flags of `RUN_DEFAULTS` left unset: with a dataset, its first column (the values of train_unconditional.py;
      the `ddpm-256` preset has the layout of its built-in model); with no dataset, its second (the `tiny` net at
      8x8, batch 64, lr 1e-3, 200 warm-up steps, EMA, a sample grid every 1000 steps, output in `ddpm-output/`).
      `--model_preset` stays unset with `--model_config_name_or_path`.
    - `--eval_feature_extractor`: `digits` for the embedded digits, `inception` otherwise.
    - `--eval_num_inference_steps`: `--ddpm_num_inference_steps`. `--eval_steps 0` becomes `None` (no evaluation).

    Raises:
        `ArgumentError`: conflicting or out-of-range flags, with what to do.
    """
    holding = flags_holding_tokens(dataclasses.asdict(args), allowed=("hub_token",))
    if holding:
        raise ArgumentError(token_in_flags_message(holding))
    blank = _blank_string_flag(args)
    if blank is not None:
        raise ArgumentError(blank)
    args = dataclasses.replace(
        args,
        **{name: _expanded_path(name, getattr(args, name)) for name in PATH_FLAGS if getattr(args, name) is not None},
    )
    if args.dataset_name is not None and args.train_data_dir is not None:
        raise ArgumentError("Pass either --dataset_name or --train_data_dir, not both.")
    if args.model_preset is not None and args.model_config_name_or_path is not None:
        raise ArgumentError("Pass either --model_preset or --model_config_name_or_path, not both.")
    updates = {}
    column = 1 if uses_embedded_dataset(args) else 0
    for name, values in RUN_DEFAULTS.items():
        if getattr(args, name) is None and not (name == "model_preset" and args.model_config_name_or_path):
            updates[name] = values[column]
    args = dataclasses.replace(args, **updates)
    args = dataclasses.replace(
        args,
        eval_steps=args.eval_steps or None,
        eval_feature_extractor=args.eval_feature_extractor
        or default_feature_extractor(args.dataset_name, args.train_data_dir),
        eval_num_inference_steps=args.eval_num_inference_steps or args.ddpm_num_inference_steps,
    )

    message = flag_ranges.first_range_error(args, FLAG_RANGES)
    if message is not None:
        raise ArgumentError(message)
    if args.num_channels not in (None, 1, 3, 4):
        raise ArgumentError(f"--num_channels {args.num_channels} is not one of 1 (grayscale), 3 (RGB), 4 (RGBA).")
    at_most_t = ["ddpm_num_inference_steps"]
    at_most_t += ["eval_num_inference_steps", "eval_bpd_timesteps"] if args.eval_steps else []
    for name in at_most_t:
        if getattr(args, name) > args.ddpm_num_steps:
            raise ArgumentError(
                f"--{name} ({getattr(args, name)}) cannot exceed --ddpm_num_steps ({args.ddpm_num_steps})."
            )
    if args.eval_steps and args.eval_num_images > args.eval_holdout_images:
        raise ArgumentError(
            f"--eval_num_images ({args.eval_num_images}) cannot exceed the held-out set (--eval_holdout_images "
            f"{args.eval_holdout_images})."
        )
    if args.eval_split is not None and uses_embedded_dataset(args):
        raise ArgumentError(
            "The embedded digits have only a train split: leave --eval_split out, and the last "
            "--eval_holdout_images digits are held out of training for the evaluation."
        )
    if args.eval_steps and args.streaming and args.eval_split is None:
        raise ArgumentError(
            "--eval_steps with --streaming needs --eval_split: a stream has no last images to hold out."
        )
    if args.overwrite_output_dir and args.resume_from_checkpoint is not None:
        raise ArgumentError(
            "--overwrite_output_dir removes the checkpoints that --resume_from_checkpoint would continue: pass one "
            "of them."
        )
    if args.streaming and args.max_train_steps is None:
        raise ArgumentError("--streaming needs --max_train_steps: a stream has no known length to count epochs in.")
    try:
        check_objective(args.prediction_type, args.loss_type)
    except ValueError as error:
        raise ArgumentError(str(error)) from None
    return args


class _HelpFormatter(ArgumentDefaultsHelpFormatter, RawDescriptionHelpFormatter):
    """Shows defaults (both of a flag in `RUN_DEFAULTS`), and keeps the line breaks of the epilog."""

    def _get_help_string(self, action) -> str:
        if action.dest in RUN_DEFAULTS:
            with_dataset, without = RUN_DEFAULTS[action.dest]
            return f"{action.help} (default: {with_dataset}; with no dataset, the embedded digits: {without})"
        return super()._get_help_string(action)


def make_parser() -> HfArgumentParser:
    parser = HfArgumentParser(
        TrainingArguments,
        description="Train a DDPM (Ho et al. 2020, Algorithm 1) with Accelerate and export a diffusers pipeline.",
        epilog=_EPILOG,
        formatter_class=_HelpFormatter,
        allow_abbrev=False,  # `--hub_tok hf_...` must not pass for --hub_token (nor go unmasked)
    )
    parser.prog = "train_ddpm.py"
    return parser


def parse_flags_or_file(parser: HfArgumentParser, argv: list[str] | None = None) -> tuple:
    r"""
    The dataclasses of `parser` from the flags in `argv` (`sys.argv[1:]` by default), or from a single JSON or YAML
    file with the same keys (`train_ddpm.py config.yaml`, `evaluate_ddpm.py evaluation.json`), optionally followed by
    flags that override the file's (`train_ddpm.py config.yaml --output_dir run1`: a flag after the file wins over
    the file's key of the same flag).

    A file's keys become flags (`learning_rate: 1e-4` is `--learning_rate=1e-4`), so its values are checked exactly
    as on the command line (types, choices); a file that cannot be read, is not a mapping, or has an unknown key
    exits with status 2 and one line that names the file (and the key meant, for a misspelled one).

    Args:
        parser (`transformers.HfArgumentParser`): The parser of the script's argument dataclasses.
        argv (`list[str]`, *optional*): The arguments; `sys.argv[1:]` when `None`.

    Returns:
        `tuple`: One instance of each of the parser's dataclasses.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0].endswith(CONFIG_FILE_SUFFIXES):
        path, given = argv[0], argv[1:]
        overridden = {  # the fields the flags after the file set: the command line wins over the file's key
            parser._option_string_actions[arg.partition("=")[0]].dest
            for arg in given
            if arg.partition("=")[0] in parser._option_string_actions
        }
        report = parser.error

        def error(message: str) -> None:  # a key or path may hold a token; name the file unless the flag is given
            flag = re.search(r"--[\w-]+", message)
            action = parser._option_string_actions.get(flag.group(0)) if flag else None
            given_flags = {arg.partition("=")[0] for arg in given}
            from_file = flag is None or (action.dest not in overridden if action else flag.group(0) not in given_flags)
            report(redact(f"{path}: {message}" if from_file else message))

        parser.error = error
        argv = flags_of_file(parser, path, skip=overridden) + given
    return parse_strictly(parser, argv)  # no abbreviated flags, and no token in an error message


CONFIG_FILE_SUFFIXES = (".json", ".yaml", ".yml")


class _FlagsLoader(yaml.SafeLoader):
    """
    YAML whose scalars all stay strings but `null` (merge keys `<<` still work), for argparse to type as it types the
    command line: YAML 1.1 would read `010` as 8 and `12:30` as 750 (base 60), silently. A key given twice is an error.
    """

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                if key.value in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"the key '{key.value}' is given twice", key.start_mark
                    )
                seen.add(key.value)
        return super().construct_mapping(node, deep=deep)


_FlagsLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag.endswith((":null", ":merge"))]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    for key in keys:
        if keys.count(key) > 1:
            raise ValueError(f"the key '{key}' is given twice")
    return dict(pairs)


def flags_of_file(parser: HfArgumentParser, path: str, skip: set[str] = frozenset()) -> list[str]:
    """
    The flags that the JSON or YAML file at `path` holds, as command-line arguments (`parser.error` on a fault),
    leaving out the keys in `skip` (those the command line sets after the file).
    """
    kind = "JSON" if path.endswith(".json") else "YAML"
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        parser.error(f"cannot read this {kind} file of flags ({reason}).")
    try:
        if kind == "JSON":
            values = json.loads(text, object_pairs_hook=_unique_keys)
        else:
            values = yaml.load(text, Loader=_FlagsLoader)  # a SafeLoader: no Python objects
    except (ValueError, yaml.YAMLError) as error:
        mark = getattr(error, "problem_mark", None)  # YAML's line and column; JSON's message holds its own
        problem = getattr(error, "problem", None) or str(error).strip().splitlines()[0]
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        parser.error(f"not valid {kind}: {problem}{where}.")
    if values is None or values == {}:
        parser.error("holds no flags. Pass at least one, or run the script without arguments for its defaults.")
    if not isinstance(values, dict):
        parser.error(
            f"holds a {kind} {type(values).__name__}, not a mapping of flag names to values (e.g. "
            "`learning_rate: 0.0001`)."
        )
    fields = {field.name: field for dataclass in parser.dataclass_types for field in dataclasses.fields(dataclass)}
    unknown = []
    for key in (key for key in values if key not in fields):
        meant = difflib.get_close_matches(str(key).lstrip("-").replace("-", "_"), list(fields), n=1)
        unknown.append(f"'{key}' (did you mean {meant[0]}?)" if meant else f"'{key}'")
    if unknown:
        parser.error(f"unknown key(s): {', '.join(unknown)}. The keys are the flags' names, without the dashes.")
    argv = []
    for key, value in values.items():
        takes_list = "list[" in str(fields[key].type)
        if value is None:
            continue  # the flag's default
        if isinstance(value, dict) or (isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value)):
            parser.error(f"the value of '{key}' must be a single value{' or a list of values' if takes_list else ''}.")
        if isinstance(value, list) and not takes_list:
            parser.error(f"the value of '{key}' is a list, but --{key} takes a single value.")
        if key in skip:
            continue  # a flag after the file sets it
        if isinstance(value, list):
            argv += [f"--{key}", *(_flag_value(item) for item in value)]
        else:
            argv.append(f"--{key}={_flag_value(value)}")  # `=`: a value may start with a dash
    return argv


def _flag_value(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def parse_args(argv: list[str] | None = None) -> TrainingArguments:
    r"""
    Parse flags (or a single JSON / YAML file with the same keys) into a resolved `TrainingArguments`.

    Argument errors print the usage and the problem, and exit with status 2 (argparse's convention).
    """
    parser = make_parser()
    (args,) = parse_flags_or_file(parser, argv)
    try:
        return resolve_args(args)
    except ArgumentError as error:
        parser.error(str(error))


def public_config(args: TrainingArguments) -> dict[str, Any]:
    """
    The resolved flags as a JSON-ready dict for checkpoints, trackers and model cards: the Hub token left out, any
    token value masked wherever it appears, and local paths made relative or reduced to their base name.
    """
    config = dataclasses.asdict(args)
    config.pop("hub_token")
    config.pop("local_rank")
    for name in PATH_FLAGS:
        if config[name] != "latest":  # --resume_from_checkpoint latest is no path
            config[name] = public_path(config[name])
    return redact_values(config, known_tokens(args.hub_token))
