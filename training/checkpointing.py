"""Resumable checkpoints of train_ddpm.py, written so that a crash never leaves a half checkpoint behind.

A checkpoint is the folder `checkpoint-{step}` under the output folder. It holds what `accelerator.save_state`
writes (model, optimizer, GradScaler, the objects registered with `register_for_checkpointing`: the EMA and the LR
schedule, the RNG states of every process and the sampler of the data order) and `trainer_state.json`: the step, the
data position and the resolved training flags.

Writing goes to `checkpoint-{step}.tmp`; `trainer_state.json` is written last, every file is flushed to disk, and the
folder is then renamed into place. A folder named `checkpoint-{step}` with a `trainer_state.json` is therefore
complete; anything else (a `.tmp` or `.old` folder, or one without `trainer_state.json`) is the remains of an
interrupted write, which `find_checkpoints` skips and `remove_incomplete_checkpoints` deletes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import Accelerator

from training.data import held_out_images

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
TRAINER_STATE_NAME = "trainer_state.json"
_CHECKPOINT_RE = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")
_INCOMPLETE_RE = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)(\..+)?$")
RESUME_INVARIANTS = ("dataset_name", "dataset_config_name", "train_data_dir", "streaming", "resolution", "seed")
RESUME_INVARIANTS += ("train_batch_size", "gradient_accumulation_steps")
"""Flags that fix the data order and position: resuming with other values cannot continue exactly."""


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read."""


@dataclass
class TrainerState:
    r"""
    Where training stands, beyond what `accelerator.save_state` holds.

    Args:
        global_step (`int`): Optimizer steps taken (including skipped non-finite ones).
        epoch (`int`): The epoch in progress.
        batches_in_epoch (`int`): Batches (per process) of `epoch` already consumed, skipped when resuming.
        skipped_nonfinite_steps (`int`): Optimizer steps skipped because the gradient was not finite.
        consecutive_nonfinite_steps (`int`): How many of those came last, in a row.
        num_processes (`int`): Processes of the run that wrote the checkpoint (the data position depends on it).
        training_args (`dict`): The resolved flags of the run that wrote the checkpoint.
    """

    global_step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    skipped_nonfinite_steps: int = 0
    consecutive_nonfinite_steps: int = 0
    num_processes: int = 1
    training_args: dict[str, Any] = field(default_factory=dict)

    def save(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as file:
            json.dump(dataclasses.asdict(self), file, indent=2, sort_keys=True)
            file.write("\n")
            file.flush()
            os.fsync(file.fileno())

    @classmethod
    def load(cls, path: str) -> TrainerState:
        with open(path, encoding="utf-8") as file:
            values = json.load(file)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in known})


def checkpoint_path(output_dir: str, step: int) -> str:
    return os.path.join(output_dir, f"{CHECKPOINT_PREFIX}{step}")


def is_complete_checkpoint(path: str) -> bool:
    """A `checkpoint-{step}` folder whose `trainer_state.json`, written last, exists."""
    name = os.path.basename(os.path.normpath(path))
    return bool(_CHECKPOINT_RE.match(name)) and os.path.isfile(os.path.join(path, TRAINER_STATE_NAME))


def find_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """The complete checkpoints in `output_dir` as `(step, path)`, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = _CHECKPOINT_RE.match(name)
        path = os.path.join(output_dir, name)
        if match and is_complete_checkpoint(path):
            found.append((int(match.group(1)), path))
    return sorted(found)


def find_incomplete_checkpoints(output_dir: str) -> list[str]:
    """Folders left by interrupted checkpoint writes: `checkpoint-{step}.*`, or `checkpoint-{step}` without state."""
    if not os.path.isdir(output_dir):
        return []
    return sorted(
        os.path.join(output_dir, name)
        for name in os.listdir(output_dir)
        if _INCOMPLETE_RE.match(name)
        and os.path.isdir(os.path.join(output_dir, name))
        and not is_complete_checkpoint(os.path.join(output_dir, name))
    )


def remove_incomplete_checkpoints(output_dir: str) -> list[str]:
    """Delete (with a warning) the remains of interrupted checkpoint writes; returns their paths."""
    removed = find_incomplete_checkpoints(output_dir)
    for path in removed:
        logger.warning("Removing %s: an incomplete checkpoint left by an interrupted run.", path)
        shutil.rmtree(path, ignore_errors=True)
    return removed


def check_fresh_start(output_dir: str) -> None:
    r"""
    Refuse to start a new run in `output_dir` while it holds complete checkpoints of an earlier run.

    The two runs would mix: `--checkpoints_total_limit` keeps the highest steps, so the new run's first checkpoints
    would be deleted as soon as written, and a later `--resume_from_checkpoint latest` would continue the old run.

    Raises:
        `CheckpointError`: `output_dir` holds complete checkpoints; the message says how to continue or start over.
    """
    checkpoints = find_checkpoints(output_dir)
    if checkpoints:
        count = f"{len(checkpoints)} checkpoint{'s' if len(checkpoints) > 1 else ''}"
        raise CheckpointError(
            f"'{output_dir}' already holds {count} of an earlier run (the latest {checkpoints[-1][1]}), and "
            "--resume_from_checkpoint is not given. Pass --resume_from_checkpoint "
            "latest to continue that run, --overwrite_output_dir to remove its checkpoints and start over, or "
            "another --output_dir."
        )


def prepare_output_dir(
    accelerator: Accelerator, output_dir: str, resume_from_checkpoint: str | None, overwrite: bool
) -> None:
    """
    Before a new run (no --resume_from_checkpoint): remove the checkpoints of an earlier run in `output_dir` if
    `overwrite` (--overwrite_output_dir), else refuse to mix with them (`check_fresh_start`).
    """
    if resume_from_checkpoint is not None:
        return
    if overwrite:
        if accelerator.is_main_process:
            remove_checkpoints(output_dir)
        accelerator.wait_for_everyone()
    else:
        check_fresh_start(output_dir)


def changed_settings(saved: TrainerState, config: dict[str, Any], num_processes: int) -> list[str]:
    """
    What differs between the run that wrote a checkpoint (`saved`) and the resuming one (its public `config`) in the
    settings that fix the data order and position (`RESUME_INVARIANTS`, the processes, the held-out images).
    """
    changed = [
        f"--{name} {saved.training_args.get(name)} -> {value}"
        for name, value in config.items()
        if name in RESUME_INVARIANTS and saved.training_args.get(name) != value
    ]
    if saved.num_processes != num_processes:
        changed.append(f"{saved.num_processes} -> {num_processes} processes")
    before, now = held_out_images(saved.training_args), held_out_images(config)
    if before != now:
        changed.append(f"{before} -> {now} images held out of training for --eval_steps")
    return changed


def remove_checkpoints(output_dir: str) -> list[str]:
    """Delete every `checkpoint-{step}` folder in `output_dir`, complete or not (`--overwrite_output_dir`)."""
    removed = [path for _, path in find_checkpoints(output_dir)] + find_incomplete_checkpoints(output_dir)
    for path in removed:
        logger.warning("Removing %s (--overwrite_output_dir).", path)
        shutil.rmtree(path)
    return removed


def latest_checkpoint(output_dir: str) -> str | None:
    """The complete checkpoint with the highest step in `output_dir`, or `None`."""
    checkpoints = find_checkpoints(output_dir)
    return checkpoints[-1][1] if checkpoints else None


def resolve_resume_checkpoint(output_dir: str, resume_from_checkpoint: str | None) -> str | None:
    r"""
    The checkpoint `--resume_from_checkpoint` names.

    Args:
        output_dir (`str`): The run's output folder.
        resume_from_checkpoint (`str`, *optional*):
            `"latest"`: the newest complete checkpoint in `output_dir`, or `None` (a fresh start) if there is none,
            as in train_unconditional.py. Otherwise a checkpoint folder, or the name of one in `output_dir`.

    Raises:
        `CheckpointError`: the named checkpoint does not exist or is incomplete.
    """
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        for path in find_incomplete_checkpoints(output_dir):
            logger.warning("Skipping %s: an incomplete checkpoint (the run writing it was interrupted).", path)
        path = latest_checkpoint(output_dir)
        if path is None:
            logger.warning("No checkpoint in '%s' to resume from: starting a new training run.", output_dir)
        return path
    candidates = [resume_from_checkpoint, os.path.join(output_dir, os.path.basename(resume_from_checkpoint))]
    for path in candidates:
        if os.path.isdir(path):
            if not is_complete_checkpoint(path):
                raise CheckpointError(
                    f"'{path}' is not a complete checkpoint (no {TRAINER_STATE_NAME}, or not named "
                    f"{CHECKPOINT_PREFIX}<step>); its run was probably interrupted while writing it. Resume from "
                    "another one, or pass --resume_from_checkpoint latest."
                )
            return path
    available = [os.path.basename(path) for _, path in find_checkpoints(output_dir)]
    raise CheckpointError(
        f"Checkpoint '{resume_from_checkpoint}' not found (checkpoints in '{output_dir}': {available or 'none'}). "
        "Pass a checkpoint folder, or --resume_from_checkpoint latest."
    )


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every value of `tensors` is finite (one device sync)."""
    if not tensors:
        return True
    flags = torch.stack([torch.isfinite(tensor).all() for tensor in tensors])
    return bool(flags.all())


def _fsync_tree(path: str) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as file:
                os.fsync(file.fileno())


def _fsync_dir(path: str) -> None:
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: str,
    state: TrainerState,
    weights: list[torch.Tensor],
    total_limit: int | None = None,
) -> str:
    r"""
    Write `checkpoint-{state.global_step}` atomically. Every process must call it (as `accelerator.save_state`).

    Args:
        accelerator (`Accelerator`): Its `save_state` writes the model, optimizer, registered objects and RNG states.
        output_dir (`str`): The run's output folder.
        state (`TrainerState`): Step, data position and flags, written last as `trainer_state.json`.
        weights (`list[torch.Tensor]`): Tensors that must be finite for the checkpoint to be written (the model's
            and the EMA's weights).
        total_limit (`int`, *optional*): Keep only this many complete checkpoints, removing the oldest.

    Returns:
        `str`: The checkpoint folder.

    Raises:
        `CheckpointError`: a weight is not finite; nothing is written.
    """
    if not all_finite(weights):
        raise CheckpointError(
            f"Refusing to write the checkpoint at step {state.global_step}: the weights hold NaN or infinite values. "
            "The previous checkpoints are untouched; resume from one of them with a lower --learning_rate."
        )
    final = checkpoint_path(output_dir, state.global_step)
    temporary = final + ".tmp"
    if accelerator.is_main_process:
        os.makedirs(output_dir, exist_ok=True)
        shutil.rmtree(temporary, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(temporary)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state.save(os.path.join(temporary, TRAINER_STATE_NAME))
        _fsync_tree(temporary)
        if os.path.exists(final):  # a checkpoint of the same step from an earlier run: replace it
            previous = final + ".old"
            shutil.rmtree(previous, ignore_errors=True)
            os.rename(final, previous)
            os.rename(temporary, final)
            shutil.rmtree(previous, ignore_errors=True)
        else:
            os.rename(temporary, final)
        _fsync_dir(output_dir)
        if total_limit is not None:
            for _, path in find_checkpoints(output_dir)[:-total_limit]:
                logger.info("Removing %s (--checkpoints_total_limit %d).", path, total_limit)
                shutil.rmtree(path, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, path: str) -> TrainerState:
    """Restore what `save_checkpoint` wrote (every process calls it) and return the `TrainerState`."""
    accelerator.load_state(path)
    return TrainerState.load(os.path.join(path, TRAINER_STATE_NAME))
