"""The flags of train_ddpm.py: one typed dataclass (each numeric flag with its range), the run defaults of the embedded
digits (`RUN_DEFAULTS`) and `resolve_args`; the parser and flag files are command_line's. Every flag of diffusers'
train_unconditional.py keeps its name, default and meaning when a dataset is given (docs/differences.md)."""

from __future__ import annotations

import dataclasses
import os
import re
from argparse import ArgumentDefaultsHelpFormatter, RawDescriptionHelpFormatter
from dataclasses import dataclass
from typing import Any, Literal

from diffusers.optimization import SchedulerType

from command_line.fields import (
    FEATURE_EXTRACTOR_NAMES,
    POSITIVE,
    SEED,
    UNIT_CLOSED,
    UNIT_OPEN_ABOVE,
    ZERO_OR_MORE,
    default_feature_extractor,
    first_range_error,
    flag,
    no_dataset_given,
)
from command_line.flag_files import parse_flags_or_file
from command_line.parsing import FlagParser, flags_holding_tokens, token_in_flags_message
from hub_access.secrets import known_tokens, public_path, redact_values
from schedulers import BETA_SCHEDULES, VARIANCE_TYPES
from training.losses import LOSS_TYPES, check_objective
from training.models import MODEL_PRESETS

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


@dataclass
class TrainingArguments:
    """Flags of train_ddpm.py. Those marked "(new)" are not in diffusers' train_unconditional.py."""

    # Data ------------------------------------------------------------------------------------------------------------
    dataset_name: str | None = flag(
        help="A Hub dataset id, or a local folder laid out like a Hub dataset repo (data/train-*.parquet). With "
        "neither this nor --train_data_dir, the embedded 8x8 digits (no network needed)."
    )
    dataset_config_name: str | None = flag(help="The dataset's config, if it has several.")
    train_data_dir: str | None = flag(help="A folder of images (the `imagefolder` layout).")
    image_column: str | None = flag(help="(new) The column holding the images; by default the first image column.")
    cache_dir: str | None = flag(help="Where downloaded datasets and model configs are stored.")
    streaming: bool = flag(
        False, help="(new) Read the dataset lazily, for data larger than memory or disk; needs --max_train_steps."
    )
    resolution: int | None = flag(help="Images are resized (short side) and cropped to this size.", range=POSITIVE)
    center_crop: bool = flag(
        False,
        help="Crop the center of the resized image. Without it, one random crop per image, drawn once when the "
        "cache is built (train_unconditional.py draws one every epoch: docs/differences.md).",
    )
    random_flip: bool = flag(False, help="Flip images left-right at random (the paper does, on CIFAR-10 and LSUN).")
    dataloader_num_workers: int = flag(
        0, help="Worker processes of the DataLoader (0: the main process).", range=ZERO_OR_MORE
    )
    preprocessing_num_workers: int | None = flag(
        help="(new) Processes that decode and resize the images once, before training.",
        range=POSITIVE,
    )
    num_channels: int | None = flag(
        help="(new) Channels of the model: 1 (grayscale), 3 (RGB) or 4 (RGBA). By default the majority of the first "
        "64 images' modes decides (docs/data.md). Digits: 1.",
        choices=[1, 3, 4],
    )
    preserve_input_precision: bool = flag(
        False,
        help="Keep 16-bit images 16-bit (bits/dim over 65,536 levels); without it they are scaled to 8 bits "
        "(docs/data.md).",
    )

    # Model and diffusion ---------------------------------------------------------------------------------------------
    model_preset: str | None = flag(
        help="(new) A UNet2DModel preset: ddpm-cifar10 (the paper's 35.7M net), ddpm-256 (its 114M 256x256 net, the "
        "layout of train_unconditional.py's model), tiny (0.7M, for CPUs).",
        choices=list(MODEL_PRESETS),
    )
    model_config_name_or_path: str | None = flag(
        help="A UNet2DModel config instead of a preset: a config.json, a model folder or a Hub id."
    )
    prediction_type: Literal["epsilon", "sample", "v_prediction", "mean"] = flag(
        "epsilon",
        help="What the net predicts: epsilon (the paper's), sample (x0, SNR-weighted loss as in "
        "train_unconditional.py), v_prediction (new) or mean (new: mu-tilde, Table 2; --loss_type vlb or mse).",
    )
    loss_type: str = flag(
        "simple",
        help="(new) The objective (Table 2 of the paper, see training/losses.py): simple (L_simple, Eq. 14), vlb (the "
        "true variational bound, Eq. 5) or mse (mean prediction only: unweighted MSE of mu-tilde).",
        choices=list(LOSS_TYPES),
    )
    variance_type: str = flag(
        "fixed_small",
        help="(new) sigma_t^2 of the reverse process: fixed_small (the paper), fixed_large, their _log variants, or "
        "learned_range (Nichol & Dhariwal 2021: twice the output channels, trained with L_simple + L_vlb/1000).",
        # `learned` (the extra channels are sigma_t^2 itself) has no training loss in train_ddpm.py.
        choices=[v for v in VARIANCE_TYPES if v != "learned"],
    )
    ddpm_num_steps: int = flag(1000, help="T, the number of diffusion steps.", range=POSITIVE)
    ddpm_num_inference_steps: int = flag(1000, help="Sampling steps for the sample grids.", range=POSITIVE)
    ddpm_beta_schedule: str = flag("linear", help="The beta schedule.", choices=list(BETA_SCHEDULES))
    gradient_checkpointing: bool = flag(False, help="(new) Recompute activations in backward to save memory.")
    enable_xformers_memory_efficient_attention: bool = flag(False, help="Use xformers attention (needs xformers).")
    compile: bool = flag(False, help="(new) torch.compile the U-Net.")
    compile_mode: str | None = flag(
        help="(new) The torch.compile mode with --compile: default, reduce-overhead (CUDA graphs), max-autotune or "
        "max-autotune-no-cudagraphs.",
        choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
    )
    channels_last: bool = flag(False, help="(new) channels-last memory format (faster convolutions on GPUs).")

    # Optimisation ----------------------------------------------------------------------------------------------------
    seed: int = flag(
        0, help="(new) Seed of the initialisation, the data order, the noise and the sample grids.", range=SEED
    )
    train_batch_size: int | None = flag(help="Batch size per process.", range=POSITIVE)
    eval_batch_size: int = flag(16, help="Images in each sample grid.", range=POSITIVE)
    num_epochs: int = flag(100, help="Passes over the data (unless --max_train_steps is given).", range=POSITIVE)
    max_train_steps: int | None = flag(
        help="(new) Optimizer steps to train for; overrides --num_epochs.", range=POSITIVE
    )
    gradient_accumulation_steps: int = flag(1, help="Batches accumulated per optimizer step.", range=POSITIVE)
    learning_rate: float | None = flag(help="Peak learning rate (the paper: 2e-4).", range=POSITIVE)
    lr_scheduler: str = flag(
        "cosine",
        help="The learning rate schedule (the paper: constant_with_warmup).",
        choices=[s.value for s in SchedulerType if s.value != "piecewise_constant"],
    )
    lr_warmup_steps: int | None = flag(help="Warm-up optimizer steps (the paper: 5000).", range=ZERO_OR_MORE)
    adam_beta1: float = flag(0.95, help="AdamW beta1 (the paper: 0.9).", range=UNIT_OPEN_ABOVE)
    adam_beta2: float = flag(0.999, help="AdamW beta2.", range=UNIT_OPEN_ABOVE)
    adam_weight_decay: float = flag(1e-6, help="AdamW weight decay (the paper: 0).", range=ZERO_OR_MORE)
    adam_epsilon: float = flag(1e-8, help="AdamW epsilon.", range=POSITIVE)
    max_grad_norm: float = flag(
        1.0, help="(new) Clip the gradient norm to this (the paper: 1.0); 0 disables.", range=ZERO_OR_MORE
    )
    max_nonfinite_steps: int = flag(
        100,
        help="(new) Stop with an error after this many optimizer steps in a row with a non-finite gradient.",
        range=POSITIVE,
    )
    use_ema: bool | None = flag(
        help="Keep an exponential moving average of the weights (the paper's, decay 0.9999) and export it. "
        "`--use_ema false` turns it off.",
        nargs="?",
        const=True,
    )
    ema_inv_gamma: float = flag(1.0, help="EMA warm-up: decay = 1 - (1 + step / inv_gamma) ** -power.", range=POSITIVE)
    ema_power: float = flag(3 / 4, help="EMA warm-up power.", range=POSITIVE)
    ema_max_decay: float = flag(0.9999, help="Largest EMA decay (the paper: 0.9999).", range=UNIT_CLOSED)
    mixed_precision: Literal["no", "fp16", "bf16"] = flag(
        "no",
        help="Mixed precision; wins over the accelerate config's, as in train_unconditional.py: pass it here.",
    )
    allow_tf32: bool = flag(True, help="(new) TF32 matmuls and convolutions on Ampere or newer GPUs.")
    cpu: bool = flag(
        False,
        help="(new) Train on the CPU. With `accelerate launch --multi_gpu --num_processes N` it runs N CPU "
        "processes (gloo).",
    )

    # Outputs ---------------------------------------------------------------------------------------------------------
    output_dir: str | None = flag(help="Where checkpoints, samples and the exported pipeline go.")
    overwrite_output_dir: bool = flag(
        False,
        help="Start over in an --output_dir with an earlier run's checkpoints: its checkpoint-* folders are removed "
        "before training (docs/checkpoints.md).",
    )
    logger: Literal["tensorboard", "wandb"] = flag("tensorboard", help="Experiment tracker.")
    logging_dir: str = flag("logs", help="Tracker logs, under --output_dir.")
    logging_steps: int = flag(
        10, help="(new) Log loss, lr, grad norm and images/s every this many steps.", range=POSITIVE
    )
    checkpointing_steps: int = flag(
        500, help="Write a resumable checkpoint every this many optimizer steps.", range=POSITIVE
    )
    checkpoints_total_limit: int | None = flag(
        help="Keep at most this many checkpoints (the oldest are removed).", range=POSITIVE
    )
    resume_from_checkpoint: str | None = flag(
        help="`latest` (the newest complete checkpoint in --output_dir, if any) or a checkpoint path / name. The "
        "optimizer, LR-schedule, EMA and length flags of this command line are applied from the step reached (named "
        "in the log); --seed is the checkpoint's; other model shapes, or --use_ema without an EMA, are refused."
    )
    save_images_epochs: int | None = flag(
        help="Save a sample grid every this many epochs (0: never).", range=ZERO_OR_MORE
    )
    save_images_steps: int | None = flag(help="(new) Save a sample grid every this many steps.", range=POSITIVE)
    save_model_epochs: int | None = flag(
        help="Export the pipeline every this many epochs (0: never).", range=ZERO_OR_MORE
    )
    save_model_steps: int | None = flag(help="(new) Export the pipeline every this many steps.", range=POSITIVE)
    push_to_hub: bool = flag(False, help="Push each export to the Hub.")
    hub_token: str | None = flag(
        help="Hub token; prefer HF_TOKEN or `huggingface-cli login` (the launcher prints a failed command line). "
        "Masked everywhere, never saved."
    )
    hub_model_id: str | None = flag(help="Hub repo to push to; by default the name of --output_dir.")
    hub_private_repo: bool = flag(False, help="Create the Hub repo as private.")
    local_rank: int = flag(
        -1,
        help="Accepted for compatibility; accelerate sets the rank.",
        range=(-1, None, True, False),  # -1: not set
    )

    # Evaluation during training (evaluation.evaluate on held-out images, with the EMA weights) ------------------
    eval_steps: int | None = flag(
        help="(new) Evaluate bits/dim, FID, KID and precision/recall on held-out images every this many steps and "
        "at the end (docs/evaluation.md). 0 or unset: never.",
        range=POSITIVE,
    )
    eval_split: str | None = flag(
        help="(new) The split to evaluate on (e.g. test). Unset: the last --eval_holdout_images training images are "
        "held out of training."
    )
    eval_holdout_images: int = flag(
        256,
        help="(new) Size of the held-out set (see --eval_split); the samples are compared with all of it.",
        range=POSITIVE,
    )
    eval_num_images: int = flag(
        64, help="(new) Held-out images whose bits/dim is computed (the first ones).", range=ZERO_OR_MORE
    )
    eval_bpd_timesteps: int = flag(
        50,
        help="(new) K: bits/dim as the unbiased estimate from K random timesteps per image; 0: all T terms.",
        range=ZERO_OR_MORE,
    )
    eval_num_samples: int = flag(
        256, help="(new) Samples generated for FID, KID and precision/recall; 0 skips them.", range=ZERO_OR_MORE
    )
    eval_feature_extractor: str | None = flag(
        help="(new) The feature network of FID/KID/precision/recall. Default: digits for the embedded digits, "
        "inception otherwise.",
        choices=list(FEATURE_EXTRACTOR_NAMES),
    )
    eval_num_inference_steps: int | None = flag(
        help="(new) Sampling steps of the evaluation samples. Default: --ddpm_num_inference_steps.",
        range=POSITIVE,
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


def image_channels(args: TrainingArguments) -> int | None:
    """`--num_channels`; else 1 for the embedded (grayscale) digits, None (decided from the data) for a dataset."""
    if args.num_channels is not None:
        return args.num_channels
    return 1 if no_dataset_given(args.dataset_name, args.train_data_dir) else None


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
    column = 1 if no_dataset_given(args.dataset_name, args.train_data_dir) else 0
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

    message = first_range_error(args)  # the ranges declared with the fields; --num_channels's choices are argparse's
    if message is not None:
        raise ArgumentError(message)
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
    if args.eval_split is not None and no_dataset_given(args.dataset_name, args.train_data_dir):
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


def make_parser() -> FlagParser:
    return FlagParser(
        TrainingArguments,
        prog="train_ddpm.py",
        description="Train a DDPM (Ho et al. 2020, Algorithm 1) with Accelerate and export a diffusers pipeline.",
        epilog=_EPILOG,
        formatter_class=_HelpFormatter,
    )


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
