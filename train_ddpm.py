#!/usr/bin/env python
# Copyright 2026 The ddpm-paper authors. Licensed under the Apache License, Version 2.0.
"""Train a DDPM (Ho et al. 2020, Algorithm 1) with Accelerate, from a dataset to a pipeline stock diffusers loads.

    accelerate launch --config_file accelerate_config.yaml train_ddpm.py    # the embedded 8x8 digits, ~5 min on a CPU
    accelerate launch --multi_gpu --num_processes 8 train_ddpm.py --dataset_name uoft-cs/cifar10 --resolution 32 \
        --model_preset ddpm-cifar10 --random_flip --output_dir ddpm-cifar10 --push_to_hub

A drop-in for diffusers' examples/unconditional_image_generation/train_unconditional.py: its flags keep their names
and meanings; `--help` marks the added ones. The script reads top to bottom: flags -> Accelerator -> model -> data ->
optimizer -> resume -> the loop of Algorithm 1 -> sample grids, evaluations, checkpoints and exports.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import errno
import functools
import logging
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass
from datetime import timedelta

import datasets
import diffusers
import numpy as np
import PIL.Image
import torch
from accelerate import Accelerator, DataLoaderConfiguration, InitProcessGroupKwargs
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, is_wandb_available, set_seed
from diffusers import UNet2DModel
from diffusers.optimization import get_scheduler

from checkpoints.checkpointing import (
    CheckpointError,
    TrainerState,
    VerifiedCheckpoint,
    changed_objective,
    changed_settings,
    changed_training,
    check_model_fits,
    checkpoint_path,
    continue_schedule,
    intact_checkpoint_sentence,
    load_checkpoint,
    prepare_output_dir,
    register_checkpoint_state,
    remove_incomplete_checkpoints,
    resolve_resume_checkpoint,
    save_checkpoint,
    settings_from_checkpoint,
)
from command_line.parsing import one_line_exit
from evaluation import FeatureExtractorUnavailableError, evaluate, load_feature_extractor, reference_id
from hub_access.disk_space import first_line, format_bytes, free_bytes, is_disk_full, unwritable
from hub_access.secrets import known_tokens, mask_logs_and_errors, public_argv, public_dataset_name, register
from image_data.image_modes import channels_of_data
from image_data.pixels import PixelBatches, collate_pixel_batch, collate_pixels, images_to_model_input, load_pixels
from image_data.record import training_data_record
from image_data.sources import DatasetUnavailableError, ImageDataError, held_out_count, split_held_out
from pipelines import DDPMPaperPipeline, DiskFullError, ModelCardInfo, PublishError, image_grid
from pipelines.export import create_hub_repo
from schedulers import DDPMPaperScheduler
from training.args import ArgumentError, TrainingArguments, image_channels, parse_args, public_config
from training.data_position import images_consumed, rest_of_epoch
from training.ema import EMA
from training.launch import LaunchError, arrive_for_stopped_launcher, ensure_one_job
from training.losses import diffusion_loss  # the loop calls it by this name (tests wrap it)
from training.models import ModelConfigUnavailableError, build_unet, count_parameters
from training.monitor import StepMonitor, end_workers_at_exit, exit_on_signal, ignore_stop_signals, restores_signals
from training.output_lock import OutputDirLockedError, lock_output_dir, release_output_locks
from training.preflight import check_output_paths, check_step_memory, lies_inside, written_folders
from training.sync import adamw, step_unless_nonfinite

logger = get_logger(__name__)

STREAMING_SHUFFLE_BUFFER = 10_000
"""Examples in the shuffle buffer of a streamed dataset."""
DISTRIBUTED_TIMEOUT = timedelta(hours=1)
"""How long processes wait for each other (the main process draws the sample grids while the others wait)."""
SAMPLES_DIR = "samples"
EVAL_LOG_PREFIX = "eval/"


class NonFiniteLossError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


@dataclass
class TrainingOutcome:
    """
    What `main` returns: the trained (unwrapped) model, its EMA, the last step, the signal that stopped it, and the
    metrics of the last evaluation (`--eval_steps`).
    """

    global_step: int
    unet: UNet2DModel
    ema: EMA | None
    stopped_by: str | None = None
    metrics: dict[str, float] | None = None


@dataclass
class ModelAndDiffusion:
    """The model being trained, its EMA and its diffusion: what sample grids, evaluations, checkpoints and exports read."""

    model: UNet2DModel
    ema: EMA | None
    noise_scheduler: DDPMPaperScheduler
    training_data: dict | None = None  # what it was trained on, recorded with each export (`training_data.json`)

    def pipeline(self) -> DDPMPaperPipeline:
        """A pipeline on a copy of the model holding the EMA weights (the model's own without EMA), in eval mode."""
        copied = copy.deepcopy(self.model).eval()
        if self.ema is not None:
            self.ema.copy_to(copied.parameters())
        # Its own scheduler: sampling sets timesteps, which the training scheduler must not see.
        return DDPMPaperPipeline(unet=copied, scheduler=DDPMPaperScheduler.from_config(self.noise_scheduler.config))


def sample_images(trained: ModelAndDiffusion, args: TrainingArguments) -> list[PIL.Image.Image]:
    """`args.eval_batch_size` samples of the EMA weights (the model's, without EMA), always from the same seed."""
    pipeline = trained.pipeline()
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    return pipeline(
        batch_size=args.eval_batch_size,
        generator=generator,
        num_inference_steps=args.ddpm_num_inference_steps,
        show_progress=False,
    ).images


def evaluate_and_log(
    accelerator: Accelerator,
    args: TrainingArguments,
    trained: ModelAndDiffusion,
    held_out: torch.Tensor,
    feature_extractor: torch.nn.Module | None,
    step: int,
) -> dict[str, float]:
    """
    `evaluation.evaluate` of the EMA weights (the model's, without EMA) on the held-out uint8 images, logged to the
    tracker and the console. Every process calls it: the images and samples are split across them, and each one gets
    the same metrics.
    """
    pipeline = trained.pipeline()
    split = args.eval_split or f"train-last-{args.eval_holdout_images}"
    metrics = evaluate(
        pipeline,
        held_out,
        num_images=args.eval_num_images,
        bpd_timesteps=args.eval_bpd_timesteps,
        num_samples=args.eval_num_samples,
        num_inference_steps=args.eval_num_inference_steps,
        feature_extractor=feature_extractor if feature_extractor is not None else args.eval_feature_extractor,
        dataset_id=reference_id(args.dataset_name, args.train_data_dir, args.dataset_config_name, split),
        batch_size=args.train_batch_size,  # a batch that fits in training fits without gradients
        seed=args.seed,
        accelerator=accelerator,
    )
    accelerator.log({EVAL_LOG_PREFIX + name: value for name, value in metrics.items()}, step=step)
    logger.info("Evaluation at step %d: %s", step, ", ".join(f"{name} {value:.4g}" for name, value in metrics.items()))
    return metrics


def log_sample_grid(accelerator: Accelerator, args: TrainingArguments, images: list[PIL.Image.Image], step: int):
    """Save the grid as `samples/step-{step}.png` and show it in the tracker (main process only)."""
    os.makedirs(os.path.join(args.output_dir, SAMPLES_DIR), exist_ok=True)
    path = os.path.join(args.output_dir, SAMPLES_DIR, f"step-{step}.png")
    try:
        image_grid(images).save(path)
    except OSError:
        with contextlib.suppress(OSError):
            os.remove(path)  # no half-written grid
        raise
    logger.info("Saved sample grid %s", path)
    if args.logger == "tensorboard":
        batch = np.stack([np.asarray(image.convert("RGB")) for image in images]).transpose(0, 3, 1, 2)
        accelerator.get_tracker("tensorboard", unwrap=True).add_images("samples", batch, step)
    else:
        import wandb

        accelerator.get_tracker("wandb").log({"samples": [wandb.Image(image) for image in images]}, step=step)


def command_line() -> str:
    """The command that started this run, for the model card: tokens masked by value, local paths made public."""
    argv = public_argv(sys.argv[1:], known_tokens())
    return shlex.join(["accelerate", "launch", os.path.basename(sys.argv[0]), *argv])


def hub_repo_id(args: TrainingArguments) -> str:
    """The Hub repo of the exports: `--hub_model_id`, else the name of `--output_dir` (in the token's namespace)."""
    return args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))


def export_pipeline(
    trained: ModelAndDiffusion,
    args: TrainingArguments,
    images: list[PIL.Image.Image] | None,
    step: int,
    final: bool,
    metrics: dict[str, float] | None = None,
) -> None:
    """Write the EMA weights as a stock `DDPMPipeline` folder with a model card into --output_dir; push it if asked."""
    pipeline = trained.pipeline()
    card = ModelCardInfo(
        # None for the embedded digits (not a Hub dataset); a local folder by its public (relative) name
        dataset_name=public_dataset_name(args.dataset_name, args.train_data_dir),
        training_args={**public_config(args), "global_step": step},
        # The last evaluation (--eval_steps); a NaN (e.g. the standard error of one image) has no place in YAML.
        metrics={name: value for name, value in metrics.items() if math.isfinite(value)} if metrics else None,
        sample_images=images,
        command=command_line(),
        num_samples=args.eval_batch_size,
        num_inference_steps=args.ddpm_num_inference_steps,
        training_data=trained.training_data,
    )
    repo_id = hub_repo_id(args)
    pipeline.save_pretrained(args.output_dir, card=card, repo_id=repo_id)
    logger.info(
        "Exported the pipeline (step %d, %s weights) to %s", step, "EMA" if trained.ema else "raw", args.output_dir
    )
    if not args.push_to_hub:
        return
    try:
        url = pipeline.push_to_hub(
            repo_id,
            card=card,
            private=args.hub_private_repo or None,
            token=args.hub_token,
            commit_message=f"Step {step}" + (" (end of training)" if final else ""),
        )
    except PublishError:
        if final:
            raise
        logger.warning("Pushing the export of step %d failed; training goes on.", step, exc_info=True)
    else:
        logger.info("Pushed to %s", url)


def tracker_config(args: TrainingArguments) -> dict[str, str | int | float | bool]:
    """The flags in the scalar types TensorBoard's hparams accept."""
    return {
        key: value if isinstance(value, (str, int, float, bool)) else str(value)
        for key, value in public_config(args).items()
    }


def make_accelerator(args: TrainingArguments) -> Accelerator:
    """The Accelerator of the run (devices, processes, mixed precision, accumulation, trackers) and the logging."""
    if args.logger == "wandb" and not is_wandb_available():
        raise ArgumentError(
            "--logger wandb needs the wandb package: pip install wandb (or this project's [wandb] extra)."
        )
    accelerator = Accelerator(
        cpu=args.cpu,
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=args.logger,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)
        ),
        # The data order is a function of (seed, epoch) on every process, so a resumed run replays it exactly.
        # non_blocking: pinned batches go to the GPU while the host prepares the next step.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed, non_blocking=True),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=DISTRIBUTED_TIMEOUT)],
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", level="INFO")
    ensure_one_job(accelerator, "train_ddpm.py", "--cpu")  # e.g. `--multi_gpu` on a machine without GPUs
    logger.info(
        "%s: %d process(es), device %s, mixed precision %s",
        accelerator.distributed_type,
        accelerator.num_processes,
        accelerator.device,
        accelerator.mixed_precision,
    )
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one line per checkpoint is ours to write
    verbosity = getattr(logging, "WARNING" if accelerator.is_local_main_process else "ERROR")
    datasets.utils.logging.set_verbosity(verbosity)
    diffusers.utils.logging.set_verbosity(verbosity)
    if args.allow_tf32 and accelerator.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return accelerator


def build_model(args: TrainingArguments) -> tuple[UNet2DModel, DDPMPaperScheduler]:
    """The network eps_theta (a UNet2DModel) and the diffusion q(x_t | x_0) of the flags."""
    channels = image_channels(args)
    out_channels = 2 * channels if args.variance_type == "learned_range" else channels
    try:
        unet = build_unet(
            args.model_preset,
            args.model_config_name_or_path,
            args.resolution,
            channels,
            out_channels=out_channels,
            cache_dir=args.cache_dir,
        )
    except ValueError as error:  # an unknown preset, a config of another class, a resolution the net cannot take
        raise ArgumentError(str(error)) from error
    logger.info(
        "Model: %s, %s parameters, %dx%d images with %d channel(s)",
        args.model_preset or args.model_config_name_or_path,
        f"{count_parameters(unet):,}",
        args.resolution,
        args.resolution,
        channels,
    )
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if args.enable_xformers_memory_efficient_attention:
        from diffusers.utils.import_utils import is_xformers_available

        if not is_xformers_available():
            raise ArgumentError("--enable_xformers_memory_efficient_attention needs xformers: pip install xformers.")
        unet.enable_xformers_memory_efficient_attention()
    noise_scheduler = DDPMPaperScheduler(
        num_train_timesteps=args.ddpm_num_steps,
        beta_schedule=args.ddpm_beta_schedule,
        prediction_type=args.prediction_type,
        variance_type=args.variance_type,
    )
    return unet, noise_scheduler


def load_data(
    args: TrainingArguments, accelerator: Accelerator
) -> tuple[torch.utils.data.DataLoader, torch.Tensor | None, dict]:
    """
    The training batches of uint8 images (decoded and resized once into a cache, the main process first), the
    held-out uint8 images of the evaluation (`--eval_steps`) or None, and the record of the data for the exports
    (main process only; None on the others).
    """
    data_flags = {
        "resolution": args.resolution,
        "channels": image_channels(args),
        "image_column": args.image_column,
        "cache_dir": args.cache_dir,
        "center_crop": args.center_crop,
        "seed": args.seed,
        "num_proc": args.preprocessing_num_workers,
        "preserve_input_precision": args.preserve_input_precision,
    }
    with accelerator.main_process_first():
        dataset, image_column = load_pixels(
            args.dataset_name, args.dataset_config_name, args.train_data_dir, streaming=args.streaming, **data_flags
        )
        num_images = None if args.streaming else len(dataset)  # the whole split, as evaluate_ddpm.py loads it
        if args.streaming:
            dataset = dataset.shuffle(seed=args.seed, buffer_size=STREAMING_SHUFFLE_BUFFER)
        held_out = None
        if args.eval_steps and args.eval_split is None:
            dataset, held_out = split_held_out(dataset, args.eval_holdout_images)
        elif args.eval_steps:
            held_out, _ = load_pixels(
                args.dataset_name,
                args.dataset_config_name,
                args.train_data_dir,
                split=args.eval_split,
                limit=args.eval_holdout_images,
                **data_flags,
            )
        if held_out is not None:
            held_out = PixelBatches(held_out).all()
    if not args.streaming:
        logger.info("Data: %d images from column '%s'", len(dataset), image_column)
    if held_out is not None:
        where = f"split '{args.eval_split}'" if args.eval_split else "the end of the training split, not trained on"
        logger.info("Evaluation every %d steps on %d held-out images (%s)", args.eval_steps, len(held_out), where)
    loader = torch.utils.data.DataLoader(
        # Whole batches straight from the memory-mapped Arrow column; a stream comes example by example.
        dataset if args.streaming else PixelBatches(dataset),
        batch_size=args.train_batch_size,
        shuffle=not args.streaming,
        collate_fn=(
            functools.partial(collate_pixels, dtype=torch.uint16 if args.preserve_input_precision else torch.uint8)
            if args.streaming
            else collate_pixel_batch
        ),
        num_workers=args.dataloader_num_workers,
        persistent_workers=args.dataloader_num_workers > 0,
        pin_memory=accelerator.device.type == "cuda",
        # A signal to the whole process group (scancel, systemd, Ctrl-C) is the main process's to act on: the workers
        # ignore it and keep serving batches until the stop checkpoint is written (kept by `accelerator.prepare`).
        worker_init_fn=ignore_stop_signals if args.dataloader_num_workers > 0 else None,
        # Its own generator, streamed or not, so that starting an epoch (or a resumed run's first, skipping `iter()`)
        # does not draw from the global RNG: the noise and timesteps of a resumed run are the uninterrupted run's.
        generator=torch.Generator().manual_seed(args.seed),
    )
    if args.dataloader_num_workers > 0:
        end_workers_at_exit()  # workers that absorb a SIGTERM are ended by the main process's exit, not waited for
    if not accelerator.is_main_process:  # only the main process exports: the others skip reading every image again
        return loader, held_out, None
    record = training_data_record(
        dataset_name=args.dataset_name,
        dataset_config_name=args.dataset_config_name,
        train_data_dir=args.train_data_dir,
        image_column=image_column,
        resolution=args.resolution,
        channels=data_flags["channels"],
        preserve_input_precision=args.preserve_input_precision,
        center_crop=args.center_crop,
        random_flip=args.random_flip,
        held_out_images=held_out_count(public_config(args)),
        num_images=num_images,
        cache_dir=args.cache_dir,
    )
    return loader, held_out, record


def own_generator(loader: torch.utils.data.DataLoader, seed: int) -> None:
    """
    Give `loader` its own generator where it has none: Accelerate's loader of a stream (`DataLoaderDispatcher`, also
    after `skip_first_batches`) drops the one `load_data` gives, and `iter()` would draw its base seed from the global
    RNG, so that a resumed run's noise and timesteps would not be the uninterrupted run's.
    """
    loader = getattr(loader, "base_dataloader", loader)  # the torch DataLoader inside Accelerate's adapter
    if getattr(loader, "generator", 0) is None:
        loader.generator = torch.Generator().manual_seed(seed)


def checkpoint_flags(args: TrainingArguments, checkpoint: VerifiedCheckpoint) -> TrainingArguments:
    """`args` with the flags a resumed run takes from the verified `checkpoint` (`FROM_CHECKPOINT`), each change
    warned; a flag that cannot be applied is refused (`settings_from_checkpoint`), before any long work."""
    kept = settings_from_checkpoint(checkpoint, public_config(args))
    for name, value in kept.items():
        logger.warning(
            "--%s %s is not applied: a resumed run keeps the checkpoint's --%s %s (it fixes the data order). Start a "
            "new run in another --output_dir for another value.", name, getattr(args, name), name, value,
        )  # fmt: skip
    return dataclasses.replace(args, **kept)


def resume(
    accelerator: Accelerator,
    args: TrainingArguments,
    checkpoint: VerifiedCheckpoint | None,
    optimizer,
    lr_scheduler,
    max_train_steps: int,
) -> TrainerState:
    """
    The state to start from: a new one, or the verified `checkpoint` restored (weights, optimizer, EMA, ...), with this
    run's optimizer flags written into the optimizer and the LR schedule rebuilt from this run's flags at the step
    reached (`APPLIED_ON_RESUME`): one log line names each change.
    """
    state = TrainerState()
    if checkpoint is not None:
        path = checkpoint.path
        state = load_checkpoint(accelerator, checkpoint)
        if state.global_step > max_train_steps:  # --num_epochs too few for the step reached (--max_train_steps is
            raise CheckpointError(  # refused before the data, in settings_from_checkpoint)
                f"--num_epochs {args.num_epochs} gives {max_train_steps} optimizer steps, below step "
                f"{state.global_step}, which {path} has reached: there is nothing to train. Pass more --num_epochs or "
                f"a --max_train_steps of at least {state.global_step}."
            )
        values = {
            "lr": args.learning_rate,
            "betas": (args.adam_beta1, args.adam_beta2),
            "weight_decay": args.adam_weight_decay,
            "eps": args.adam_epsilon,
        }
        lr = continue_schedule(lr_scheduler, optimizer.optimizer, values, state.global_step)
        applied = changed_training(state, public_config(args))
        logger.info(
            "Resumed from %s: step %d, epoch %d, batch %d; continuing with %s (lr now %.4g; %s over %d steps)",
            path, state.global_step, state.epoch, state.batches_in_epoch,
            ", ".join(applied) if applied else "the checkpoint's optimizer settings",
            lr, args.lr_scheduler, max_train_steps,
        )  # fmt: skip
        if state.num_processes != accelerator.num_processes:
            per_batch = args.train_batch_size * accelerator.num_processes
            position = (
                f"the stream goes on after {state.images_in_epoch // per_batch * per_batch} of its "
                f"{state.images_in_epoch} images consumed (whole batches of this run: the rest are seen again)"
                if args.streaming
                else f"epoch {state.epoch} goes on after the first {state.images_in_epoch} images of its order, the "
                "rest split among this run's processes (none twice, none skipped)"
            )
            logger.warning(
                "Resuming on %d process(es) from a checkpoint written by %d: the batch of a step is now %d images (it "
                "was %d); step %d, the LR schedule and the EMA continue; %s.",
                accelerator.num_processes, state.num_processes,
                per_batch * args.gradient_accumulation_steps,
                args.train_batch_size * state.num_processes * args.gradient_accumulation_steps,
                state.global_step, position,
            )  # fmt: skip
        changed = changed_settings(state, public_config(args), accelerator.num_processes)
        if changed:
            logger.warning(
                "Resuming with other settings than the checkpoint's (%s): the run goes on, but it does not continue "
                "the data order exactly.", ", ".join(changed),
            )  # fmt: skip
        changed = changed_objective(state, public_config(args))
        if changed:
            logger.warning(
                "Resuming with another diffusion process or objective than the checkpoint's (%s): the weights were "
                "trained for the checkpoint's, and the export will describe this run's. Resume with the checkpoint's "
                "flags unless you mean to fine-tune.", ", ".join(changed),
            )  # fmt: skip
        state.consecutive_nonfinite_steps = 0  # a resumed run gets a fresh --max_nonfinite_steps budget
    state.training_args, state.num_processes = public_config(args), accelerator.num_processes
    return state


def epoch_batches(
    accelerator: Accelerator,
    args: TrainingArguments,
    train_dataloader,
    state: TrainerState,
    epoch: int,
    written_by: int,
) -> tuple[object, int, int]:
    """
    The batches of `epoch` still to train on (this process's), the batches per process counted as consumed before
    the first of them, and the images of the epoch consumed before those batches' count (`state.images_in_epoch`:
    `start + batches x batch size x processes`). A resumed epoch on the checkpoint's number of processes skips its
    batches (bit for bit); on another number, its images: the rest of its permutation is split among this run's
    processes (`training.data_position`). A stream skips whole batches of this run: at most one batch of every
    process is seen twice. `written_by`: the processes of the run that wrote `state` (the checkpoint's).
    """
    if epoch != state.epoch:
        return train_dataloader, 0, 0
    per_batch = args.train_batch_size * accelerator.num_processes
    same_size = written_by == accelerator.num_processes
    if args.streaming or (same_size and state.images_in_epoch == state.batches_in_epoch * per_batch):
        skip = state.batches_in_epoch if same_size else state.images_in_epoch // per_batch
        return (accelerator.skip_first_batches(train_dataloader, skip) if skip else train_dataloader), skip, 0
    if state.images_in_epoch >= len(train_dataloader.dataset):  # the epoch is over: skip it as a same-size resume
        skip = len(train_dataloader)
        return accelerator.skip_first_batches(train_dataloader, skip), skip, 0
    rest = rest_of_epoch(accelerator, train_dataloader, epoch, state.images_in_epoch, args.train_batch_size)
    return rest, 0, state.images_in_epoch


def clip_and_step(
    accelerator: Accelerator, unet: torch.nn.Module, optimizer, max_grad_norm: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip the gradient norm and take the optimizer step unless it is not finite, decided on the device (no sync).
    Returns the norm before clipping and the skip flag."""
    grad_norm = torch.as_tensor(
        accelerator.clip_grad_norm_(unet.parameters(), max_grad_norm), device=accelerator.device
    )
    nonfinite = ~torch.isfinite(grad_norm)
    step_unless_nonfinite(optimizer, nonfinite, accelerator.scaler)
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, nonfinite


def save(
    accelerator: Accelerator, args: TrainingArguments, state: TrainerState, trained: ModelAndDiffusion, monitor
) -> str:
    """Write the checkpoint of `state.global_step` (every process calls it)."""
    started = time.perf_counter()
    monitor.sync_state()
    ema = trained.ema
    weights = list(trained.model.parameters()) + (ema.shadow_params if ema is not None else [])
    path = save_checkpoint(accelerator, args.output_dir, state, weights, args.checkpoints_total_limit)
    monitor.checkpoint_seconds = time.perf_counter() - started  # for the time a stop is expected to take
    logger.info("Saved checkpoint %s", path)
    return path


def samples_and_export(
    accelerator, args, trained: ModelAndDiffusion, step: int, images, metrics, *, grid: bool, export: bool, final=False
) -> list[PIL.Image.Image] | None:
    """
    A sample grid and/or an export if asked (main process; the others wait). Returns the last grid's images, which
    the model card shows.
    """
    if not (grid or export):
        return images
    if accelerator.is_main_process:
        try:
            if grid or images is None:
                images = sample_images(trained, args)
                log_sample_grid(accelerator, args, images, step)
            if export:
                export_pipeline(trained, args, images, step, final=final, metrics=metrics)
        except Exception as error:
            if not is_disk_full(error):
                raise
            raise DiskFullError(disk_full_message(args.output_dir, error)) from error
    accelerator.wait_for_everyone()
    return images


def disk_full_message(output_dir: str, error: Exception) -> str:
    """The error of a sample grid or an export that filled the disk: what failed, and what is safe."""
    if isinstance(error, DiskFullError):  # the export's own message: what it needs, and the previous export untouched
        what = str(error)
    else:
        what = f"The disk holding '{output_dir}' is full: saving the sample grid failed ({first_line(error)})."
    advice = "Free space on that disk, or use an --output_dir on a disk with room."
    return f"{what} {advice} {intact_checkpoint_sentence(output_dir)}"


def every(period: int | None, count: int) -> bool:
    """Whether `count` is a multiple of `period` (a period of 0 or None: never)."""
    return bool(period) and count % period == 0


@restores_signals
def train(args: TrainingArguments) -> TrainingOutcome:
    # 1. Accelerator, output folder, the checkpoint to resume, the Hub repo and the evaluation's feature network:
    #    what can fail does so now, in seconds, not after the data cache or the training
    exit_on_signal("during the set-up, before the first step: nothing to save yet; run the same command again")
    check_output_paths(args)
    accelerator = make_accelerator(args)
    lock_output_dir(accelerator, args.output_dir)  # one run per folder, held until `main` ends
    checkpoint = resolve_resume_checkpoint(args.output_dir, args.resume_from_checkpoint, accelerator)  # verified once
    resume_path = checkpoint.path if checkpoint is not None else None
    prepare_output_dir(accelerator, args.output_dir, resume_path, args.overwrite_output_dir)
    if resume_path is not None:  # flags that cannot be applied are refused now; those of the checkpoint replace ours
        args = checkpoint_flags(args, checkpoint)
    if args.push_to_hub and accelerator.is_main_process:  # as train_unconditional.py: the repo exists before training
        create_hub_repo(hub_repo_id(args), private=args.hub_private_repo or None, token=args.hub_token)
    feature_extractor = None
    if args.eval_steps and args.eval_num_samples > 0:
        feature_extractor = load_feature_extractor(args.eval_feature_extractor).to(accelerator.device)

    # 2. The model eps_theta and the diffusion q(x_t | x_0) ------------------------------------------------------------
    set_seed(args.seed)  # the same initial weights on every process
    if image_channels(args) is None:  # a dataset without --num_channels: the channels follow its images
        with accelerator.main_process_first():
            channels = channels_of_data(
                args.dataset_name,
                args.dataset_config_name,
                args.train_data_dir,
                image_column=args.image_column,
                cache_dir=args.cache_dir,
                streaming=args.streaming,
            )
        args = dataclasses.replace(args, num_channels=channels)
    unet, noise_scheduler = build_model(args)
    check_step_memory(args, unet.config.block_out_channels, accelerator.device)
    if checkpoint is not None:  # a checkpoint of another model is refused before the data cache is built
        check_model_fits(checkpoint, unet.state_dict(), public_config(args))

    # 3. The data x_0 ~ q(x_0): decoded and resized once into cached uint8 arrays ------------------------------------
    train_dataloader, held_out, training_data = load_data(args, accelerator)

    # 4. Optimizer, EMA, learning-rate schedule ----------------------------------------------------------------------
    unet.to(accelerator.device)
    if args.channels_last:
        unet.to(memory_format=torch.channels_last)
    optimizer = adamw(  # fused where torch has the kernel: it skips a non-finite step on the device
        unet.parameters(),
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )
    unet, optimizer, train_dataloader = accelerator.prepare(unet, optimizer, train_dataloader)
    if args.compile:
        unet = torch.compile(unet, mode=args.compile_mode)
    model = accelerator.unwrap_model(unet, keep_torch_compile=False)  # the bare UNet2DModel (same parameters)
    ema = None
    if args.use_ema:
        ema = EMA(model.parameters(), max_decay=args.ema_max_decay, inv_gamma=args.ema_inv_gamma, power=args.ema_power)
        register_checkpoint_state(accelerator, "ema", ema)  # safetensors, not pickle
    # The schedule counts optimizer steps of this process: len(train_dataloader) is already the per-process number of
    # batches, so the count holds for any number of processes and accumulation steps. The schedule is not passed to
    # `prepare` (whose wrapper steps it num_processes times per step, diffusers issues #6137 and #8384).
    if args.streaming:
        max_train_steps, num_epochs = args.max_train_steps, sys.maxsize
    else:
        updates_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
        max_train_steps = args.max_train_steps or args.num_epochs * updates_per_epoch
        num_epochs = math.ceil(max_train_steps / updates_per_epoch)
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer.optimizer,
        num_warmup_steps=args.lr_warmup_steps,
        num_training_steps=max_train_steps,
    )
    register_checkpoint_state(accelerator, "lr_scheduler", lr_scheduler)  # JSON, not pickle

    # 5. Resume: weights, optimizer, EMA, schedule, RNG states and the position in the data ----------------------------
    set_seed(args.seed, device_specific=True)  # each process draws its own noise and timesteps
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        remove_incomplete_checkpoints(args.output_dir)
    state = resume(accelerator, args, checkpoint, optimizer, lr_scheduler, max_train_steps)
    written_by = checkpoint.state.num_processes if checkpoint is not None else accelerator.num_processes
    if args.max_train_steps and not args.streaming and written_by != accelerator.num_processes:
        # The steps before the resume took other batches: enough epochs of this run's batches to reach the step count.
        epochs_left = math.ceil((max_train_steps - state.global_step) / updates_per_epoch)
        num_epochs = max(num_epochs, state.epoch + 1 + epochs_left)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        accelerator.init_trackers("train_ddpm", config=tracker_config(args))
    logger.info(
        "Training %d optimizer steps (%s epochs) of %d images (%d per process x %d processes x %d accumulated)",
        max_train_steps, "?" if args.streaming else num_epochs,
        args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps, args.train_batch_size,
        accelerator.num_processes, args.gradient_accumulation_steps,
    )  # fmt: skip

    # 6. The loop: Algorithm 1 -----------------------------------------------------------------------------------------
    max_grad_norm = args.max_grad_norm if args.max_grad_norm > 0 else math.inf
    per_batch = args.train_batch_size * accelerator.num_processes  # images of one batch on every process
    epoch_images = sys.maxsize if args.streaming else len(train_dataloader.dataset)
    last_checkpoint_step = state.global_step if resume_path is not None else -1
    images, metrics = None, None  # the last sample grid and evaluation, for the model card
    trained = ModelAndDiffusion(model, ema, noise_scheduler, training_data)
    monitor = StepMonitor(accelerator, state, max_train_steps, args.logging_steps, args.max_nonfinite_steps)
    if accelerator.num_processes == 1 and not args.compile:
        monitor.interrupt_steps_of(model)  # a stop signal abandons the step at once (the launcher waits only 5 s)
    with monitor:
        for epoch in range(state.epoch, num_epochs):
            if state.global_step >= max_train_steps or monitor.stopped_by or monitor.nonfinite_error:
                break
            unet.train()
            train_dataloader.set_epoch(epoch)
            batches, skip, start = epoch_batches(accelerator, args, train_dataloader, state, epoch, written_by)
            own_generator(batches, args.seed)  # a stream's loader, rebuilt by Accelerate without the generator
            state.epoch, state.batches_in_epoch, state.images_in_epoch = epoch, skip, start
            for pixels in batches:
                with monitor.interruptible(optimizer, state):  # a stop signal in here abandons the step (StepMonitor)
                    x0 = images_to_model_input(pixels, args.random_flip)  # Algorithm 1, line 2: x_0 ~ q(x_0)
                    if args.channels_last:
                        x0 = x0.contiguous(memory_format=torch.channels_last)
                    noise = torch.randn_like(x0)  # line 4: eps ~ N(0, I) (drawn before t, as always here)
                    timesteps = torch.randint(0, args.ddpm_num_steps, (x0.shape[0],), device=x0.device)  # line 3
                    with accelerator.accumulate(unet):  # line 5: a gradient step on L_simple (Eq. 14) or --loss_type
                        xt = noise_scheduler.add_noise(x0, noise, timesteps)  # sqrt(abar_t) x_0 + sqrt(1-abar_t) eps
                        output = unet(xt, timesteps).sample
                        loss = diffusion_loss(noise_scheduler, output, x0, noise, xt, timesteps, args.loss_type)
                        accelerator.backward(loss)
                if monitor.abandoned:
                    break
                if accelerator.sync_gradients:  # the step of line 5, on the accumulated gradients
                    grad_norm, nonfinite = clip_and_step(accelerator, unet, optimizer, max_grad_norm)
                monitor.count_batch(loss, x0.shape[0])
                state.batches_in_epoch += 1
                state.images_in_epoch = images_consumed(start, state.batches_in_epoch, per_batch, epoch_images)
                if not accelerator.sync_gradients:
                    continue

                # One optimizer step done (or skipped on the device): schedule, EMA, what the host learns, checkpoints.
                state.global_step += 1
                lr_scheduler.step()
                if ema is not None:  # after a skipped step it averages in the unchanged weights, as EMAModel does
                    ema.update(model.parameters())
                log = {"lr": lr_scheduler.get_last_lr()[0], "epoch": epoch}
                if ema is not None:
                    log["ema_decay"] = ema.decay()
                monitor.end_step(nonfinite, loss, grad_norm, log)
                if monitor.stopped_by or monitor.nonfinite_error:
                    break
                if every(args.checkpointing_steps, state.global_step):
                    save(accelerator, args, state, trained, monitor)
                    last_checkpoint_step = state.global_step
                if state.global_step >= max_train_steps:
                    break  # the last evaluation comes after the last checkpoint, below
                step = state.global_step
                if every(args.eval_steps, step):
                    metrics = evaluate_and_log(accelerator, args, trained, held_out, feature_extractor, step)
                grid, export = every(args.save_images_steps, step), every(args.save_model_steps, step)
                images = samples_and_export(
                    accelerator, args, trained, step, images, metrics, grid=grid, export=export
                )
            else:
                # The epoch is complete: the epoch-based grids and exports of train_unconditional.py.
                if epoch < num_epochs - 1 and state.global_step < max_train_steps:  # the end has its own
                    grid, export = every(args.save_images_epochs, epoch), every(args.save_model_epochs, epoch)
                    images = samples_and_export(
                        accelerator, args, trained, state.global_step, images, metrics, grid=grid, export=export
                    )
        monitor.finish()  # the last step's report

        # 7. The end (or a stop): checkpoint (signals still absorbed), then evaluation, samples and export ---------
        if last_checkpoint_step != state.global_step:
            save(accelerator, args, state, trained, monitor)
    path = checkpoint_path(args.output_dir, state.global_step)
    if monitor.nonfinite_error:  # the weights never took the skipped steps, so they are finite: the work is kept
        raise NonFiniteLossError(
            f"{monitor.nonfinite_error} The weights never took a non-finite step; {path} holds them. Resume with "
            f"--resume_from_checkpoint {path} and a lower --learning_rate, a smaller --max_grad_norm, or "
            "--mixed_precision no, and check the data for broken images."
        )
    if monitor.stop_after_checkpoint() is not None:
        # The main process says it; so does each other node that got the signal itself (its own log says why).
        own_signal = monitor.signal.received is not None and accelerator.is_local_main_process
        logger.warning(
            "Stopped by %s at step %d; resume with --resume_from_checkpoint latest (checkpoint %s).",
            monitor.stopped_by, state.global_step, path, main_process_only=not own_signal,
        )  # fmt: skip
    else:
        # A signal now ends the run with one line (status 128 + the signal: the export asked for is missing).
        exit_on_signal(
            f"during the final evaluation, sample grid and export: {path} holds the trained weights (step "
            f"{state.global_step}); finish with --resume_from_checkpoint latest and the same flags (it goes straight to "
            "the export)"
        )
        if args.eval_steps:
            metrics = evaluate_and_log(accelerator, args, trained, held_out, feature_extractor, state.global_step)
        samples_and_export(
            accelerator, args, trained, state.global_step, images, metrics, grid=True, export=True, final=True
        )
    teardown(accelerator, stopped_by_own_signal=monitor.signal.received is not None)
    return TrainingOutcome(state.global_step, unet=model, ema=ema, stopped_by=monitor.stopped_by, metrics=metrics)


DENIED_WRITE_ERRNOS = (errno.EACCES, errno.EROFS, errno.EPERM)
"""A write refused (permissions, a read-only file system); a full disk (ENOSPC, EDQUOT) is `is_disk_full`'s."""


def write_failure_message(args: TrainingArguments, error: BaseException) -> str | None:
    """
    The one-line error of a write that failed, or None for any other error: a full disk anywhere (the datasets cache,
    the logs, a tracker), or a write refused under a folder of the run (`written_folders`: a file the error names lies
    there, or it no longer takes new files, e.g. remounted read-only or its permissions changed during the run). Both
    name the newest checkpoint that still verifies.
    """
    if is_disk_full(error):
        folders = {
            "the datasets cache": args.cache_dir or datasets.config.HF_DATASETS_CACHE,
            "--output_dir": args.output_dir,
        }
        free = ", ".join(f"{name} '{folder}' {format_bytes(free_bytes(folder))}" for name, folder in folders.items())
        return (
            f"A disk is full: {first_line(error)}. Free now: {free}. Free space there (or set --cache_dir / "
            f"--output_dir to a disk with room), then run again. {intact_checkpoint_sentence(args.output_dir)}"
        )
    chain, denied = error, None
    while chain is not None and denied is None:
        if isinstance(chain, OSError) and chain.errno in DENIED_WRITE_ERRNOS:
            denied = chain
        chain = chain.__cause__ or chain.__context__
    if denied is None:
        return None
    named = [str(name) for name in (denied.filename, denied.filename2) if name is not None]
    for flag, folder in sorted(written_folders(args), key=lambda found: -len(os.path.realpath(found[1]))):
        why = unwritable(folder)  # the innermost folder first: --logging_dir lies under --output_dir
        if why is not None or any(lies_inside(name, folder) for name in named):
            return (
                f"Cannot write under {flag} '{folder}': {first_line(denied)}"
                f"{f'; {why}' if why else ''}. Make it writable (or copy it to a folder you can write, and pass "
                f"that), then run again. {intact_checkpoint_sentence(args.output_dir)}"
            )
    return None


def teardown(accelerator: Accelerator, stopped_by_own_signal: bool = False) -> None:
    """
    The end of a run, explicit: every process reaches it, the trackers are closed, and the process group is destroyed
    (a group left to the interpreter's exit was seen to hang a gloo job, whose launcher then reported a failure).
    After a stop by a signal this process received (its launcher got it too, and exits without waiting for the other
    nodes' launchers), it checks in for its launcher, so that the other nodes' launchers end at once, not 300 s later.
    """
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    if stopped_by_own_signal:
        arrive_for_stopped_launcher()


def main(argv: list[str] | None = None) -> TrainingOutcome:
    """Parse the flags (`argv`, default `sys.argv[1:]`) and train. Expected failures exit with a one-line error."""
    args = parse_args(argv)
    register(args.hub_token)  # from here on, the token is masked in every log line and error, by value
    mask_logs_and_errors()
    try:
        return train(args)
    except (
        ArgumentError,
        CheckpointError,
        DatasetUnavailableError,
        DiskFullError,
        FeatureExtractorUnavailableError,
        ImageDataError,
        LaunchError,
        ModelConfigUnavailableError,
        NonFiniteLossError,
        OutputDirLockedError,
        PublishError,
    ) as error:
        raise one_line_exit("train_ddpm.py", str(error)) from error
    except Exception as error:  # a write failed: a full disk anywhere, or a folder of the run no longer writable
        message = write_failure_message(args, error)
        if message is None:
            raise
        raise one_line_exit("train_ddpm.py", message) from error
    finally:
        release_output_locks()


if __name__ == "__main__":
    main()
