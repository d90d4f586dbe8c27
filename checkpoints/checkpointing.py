"""Saving, resuming and retention of train_ddpm.py's checkpoints (`checkpoint-{step}` folders in the output folder).

A save goes to `checkpoint-{step}.tmp`, writes `trainer_state.json` and then `manifest.json` last, flushes and renames
it into place: a `checkpoint-{step}` with a `trainer_state.json` is complete, anything else is removed as remains.
Nothing of ours is pickled (EMA in safetensors, LR schedule in JSON). A resume verifies once, on the main process
(`checkpoints.verify`), and every process loads from that verified result.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import random
import re
import shutil
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object
from safetensors import safe_open
from safetensors.torch import save_file

from checkpoints.verify import (
    CHECKPOINT_PREFIX,
    CHECKPOINT_RE,
    MANIFEST_NAME,
    TRAINER_STATE_NAME,
    CheckpointError,
    TrainerState,
    VerifiedCheckpoint,
    model_mismatch,
    safe_torch_load,
    verify_checkpoint,
    write_manifest,
)
from checkpoints.verify import first_line as _first_line
from hub_access.atomic_folder import INDEX_NAME, fsync_dir, fsync_tree
from hub_access.disk_space import folder_bytes, format_bytes, free_bytes, is_disk_full
from image_data.sources import held_out_count
from pipelines.export import SAMPLE_GRID_FILE, TRAINING_DATA_FILE

logger = logging.getLogger(__name__)

_INCOMPLETE_RE = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)(\.tmp|\.old)?$")  # ours: a `.bak` copy is the user's
RESUME_INVARIANTS = ("dataset_name", "dataset_config_name", "train_data_dir", "streaming", "resolution", "seed")
RESUME_INVARIANTS += ("train_batch_size", "gradient_accumulation_steps")
"""Flags that fix the data order and position: resuming with other values cannot continue exactly."""
OBJECTIVE_FLAGS = ("prediction_type", "loss_type", "variance_type", "ddpm_num_steps", "ddpm_beta_schedule")
"""Flags that fix what the network learns (the diffusion process and the objective): resumed weights were trained for
the checkpoint's values."""
APPLIED_ON_RESUME = ("learning_rate", "lr_scheduler", "lr_warmup_steps", "max_train_steps", "num_epochs")
APPLIED_ON_RESUME += ("adam_beta1", "adam_beta2", "adam_weight_decay", "adam_epsilon", "max_grad_norm")
APPLIED_ON_RESUME += ("use_ema", "ema_inv_gamma", "ema_power", "ema_max_decay", "max_nonfinite_steps")
"""Flags of the optimisation that a resumed run applies from its command line, over what the checkpoint restores: the
optimizer's param groups take the new values, and the LR schedule is rebuilt from the new flags at the step reached.
Each change is named, old -> new, in the line that starts the resumed run (`changed_training`)."""
FROM_CHECKPOINT = ("seed",)
"""Flags that a resumed run takes from the checkpoint whatever its command line says: the seed fixes the data order
(accelerate restores the checkpoint's sampler seed) and the random crops of the data cache, so another value would mix
two runs. A different value on the command line is named in a warning, and the records show the checkpoint's."""


# State of ours, saved beside accelerate's: safetensors for tensors, JSON for the rest, never pickle ----------------
_REGISTERED: weakref.WeakKeyDictionary[Accelerator, dict[str, Any]] = weakref.WeakKeyDictionary()
_TENSOR_KEY = "__tensor__"


def register_checkpoint_state(accelerator: Accelerator, name: str, obj: Any) -> None:
    r"""
    Save and restore `obj` (anything with `state_dict` / `load_state_dict`, e.g. the EMA or the LR schedule) with the
    checkpoints of `accelerator`, as `{name}.safetensors` (its tensors, the rest of the state as JSON in the header)
    or `{name}.json` when it holds no tensor. It replaces `accelerator.register_for_checkpointing`, whose files are
    pickles that accelerate loads with `weights_only=False` (a checkpoint that runs code).
    """
    if not re.fullmatch(r"[A-Za-z0-9_]+", name):
        raise ValueError(f"'{name}' cannot name a checkpoint file: use letters, digits and '_'.")
    _REGISTERED.setdefault(accelerator, {})[name] = obj


def registered_checkpoint_state(accelerator: Accelerator) -> dict[str, Any]:
    """The objects registered with `register_checkpoint_state`, by name, in registration order."""
    return dict(_REGISTERED.get(accelerator, {}))


def _encode(value: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    """`value` as JSON, its tensors moved into `tensors` (contiguous CPU copies) and replaced by references."""
    if isinstance(value, torch.Tensor):
        tensors[where] = value.detach().to("cpu", copy=True).contiguous()
        return {_TENSOR_KEY: where}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_encode(item, tensors, f"{where}.{index}") for index, item in enumerate(value)]
    if isinstance(value, dict) and all(isinstance(key, str) for key in value) and _TENSOR_KEY not in value:
        return {key: _encode(item, tensors, f"{where}.{key}") for key, item in value.items()}
    raise CheckpointError(f"Cannot save '{where}' ({type(value).__name__}) as safetensors or JSON.")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(item, tensors) for item in value]
    if isinstance(value, dict):
        if set(value) == {_TENSOR_KEY}:
            return tensors[value[_TENSOR_KEY]]  # a KeyError for a reference to no tensor
        return {key: _decode(item, tensors) for key, item in value.items()}
    return value


def save_object_state(folder: str, name: str, obj: Any) -> str:
    """Write `obj.state_dict()` as `folder/{name}.safetensors` or `folder/{name}.json`; returns the file."""
    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(obj.state_dict(), tensors, name)
    if tensors:
        path = os.path.join(folder, f"{name}.safetensors")
        save_file(tensors, path, metadata={"state": json.dumps(structure, allow_nan=True)})
    else:
        path = os.path.join(folder, f"{name}.json")
        with open(path, "w", encoding="utf-8") as file:
            json.dump(structure, file, indent=2)
            file.write("\n")
    return path


def read_object_state(folder: str, name: str) -> dict[str, Any]:
    r"""
    The state dict `save_object_state` wrote for `name` in `folder` (safetensors and JSON only: no code can run).

    Raises:
        `CheckpointError`: there is none, or it cannot be read; the message names the file.
    """
    tensors_path, json_path = os.path.join(folder, f"{name}.safetensors"), os.path.join(folder, f"{name}.json")
    path = tensors_path if os.path.isfile(tensors_path) else json_path
    if not os.path.isfile(path):
        raise CheckpointError(
            f"{folder} holds no state for '{name}' ({name}.safetensors or {name}.json): it was written by a run "
            f"without it (e.g. without --use_ema for 'ema'). Resume with the flags of the run that wrote it."
        )
    try:
        if path == tensors_path:
            with safe_open(path, framework="pt", device="cpu") as file:
                structure = json.loads((file.metadata() or {})["state"])
                tensors = {key: file.get_tensor(key) for key in file.keys()}  # noqa: SIM118 (not a dict)
        else:
            with open(path, encoding="utf-8") as file:
                structure, tensors = json.load(file), {}
        state = _decode(structure, tensors)
    except Exception as error:  # a damaged or crafted file: whatever safetensors or json raise
        raise CheckpointError(f"{path} cannot be read: {_first_line(error)}") from error
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a state dict.")
    return state


def checkpoint_path(output_dir: str, step: int) -> str:
    return os.path.join(output_dir, f"{CHECKPOINT_PREFIX}{step}")


def is_complete_checkpoint(path: str) -> bool:
    """A `checkpoint-{step}` folder whose `trainer_state.json`, written last, exists."""
    name = os.path.basename(os.path.normpath(path))
    return bool(CHECKPOINT_RE.match(name)) and os.path.isfile(os.path.join(path, TRAINER_STATE_NAME))


def find_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """The complete checkpoints in `output_dir` as `(step, path)`, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = CHECKPOINT_RE.match(name)
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


EXPORT_ENTRIES = (INDEX_NAME, "README.md", TRAINING_DATA_FILE, SAMPLE_GRID_FILE, "unet", "scheduler")
"""What an export writes at the top of --output_dir (`pipelines.export`), replacing what is there."""


def check_fresh_start(output_dir: str) -> None:
    r"""
    Refuse to start a new run in `output_dir` while it holds complete checkpoints of an earlier run, or files that
    the export at its end would replace (an earlier run's export, or a README.md of the user's).

    The two runs would mix: `--checkpoints_total_limit` keeps the highest steps, so the new run's first checkpoints
    would be deleted as soon as written, and a later `--resume_from_checkpoint latest` would continue the old run.
    An export is the only copy of a model whose checkpoints were deleted: it is not overwritten unasked.

    Raises:
        `CheckpointError`: `output_dir` holds complete checkpoints or export files; the message says how to continue
            or start over.
    """
    checkpoints = find_checkpoints(output_dir)
    if checkpoints:
        count = f"{len(checkpoints)} checkpoint{'s' if len(checkpoints) > 1 else ''}"
        raise CheckpointError(
            f"'{output_dir}' already holds {count} of an earlier run (the latest {checkpoints[-1][1]}), and this run "
            "does not continue them. Pass --resume_from_checkpoint latest to continue that run, "
            "--overwrite_output_dir to remove its checkpoints and start over, or another --output_dir."
        )
    found = [name for name in EXPORT_ENTRIES if os.path.lexists(os.path.join(output_dir, name))]
    if found:
        what = "the export of an earlier run" if INDEX_NAME in found else "files that this run's export would replace"
        raise CheckpointError(
            f"'{output_dir}' holds {what} ({', '.join(found)}) and no checkpoint to resume: a new run would overwrite "
            "them when it exports. Pass --overwrite_output_dir to replace them, or another --output_dir."
        )


def prepare_output_dir(accelerator: Accelerator, output_dir: str, resume_path: str | None, overwrite: bool) -> None:
    """
    Before a run that does not continue the one in `output_dir` (`resume_path` is None: no --resume_from_checkpoint,
    or `latest` found no checkpoint; or a checkpoint of another folder): remove the checkpoints of an earlier run in
    `output_dir` if `overwrite` (--overwrite_output_dir; its export is replaced when this run exports), else refuse to
    mix with them or to overwrite its export (`check_fresh_start`).
    """
    if resume_path is not None and os.path.realpath(os.path.dirname(os.path.normpath(resume_path))) == (
        os.path.realpath(output_dir)
    ):
        return  # the run of this folder goes on
    if overwrite:
        if accelerator.is_main_process:
            remove_checkpoints(output_dir)
        accelerator.wait_for_everyone()
    else:
        check_fresh_start(output_dir)


def check_model_fits(checkpoint: VerifiedCheckpoint, model: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
    """
    Refuse to resume from the verified `checkpoint` into a model of other shapes (`model`, a state dict), naming the
    flags of `config` (the resuming run's public flags) that differ; nothing is read from disk again.

    Raises:
        `CheckpointError`: the message of `checkpoints.verify.model_mismatch`.
    """
    mismatch = model_mismatch(checkpoint, model, config)
    if mismatch is not None:
        raise CheckpointError(mismatch)


def changed_settings(saved: TrainerState, config: dict[str, Any], num_processes: int) -> list[str]:
    """
    What differs between the run that wrote a checkpoint (`saved`) and the resuming one (its public `config`) in the
    settings that fix the data order and position (`RESUME_INVARIANTS`, the held-out images). Another number of
    processes is not among them: the position is kept in images (`TrainerState.images_in_epoch`), and train_ddpm.py
    says what a resume on another number continues.
    """
    changed = [
        f"--{name} {saved.training_args.get(name)} -> {value}"
        for name, value in config.items()
        if name in RESUME_INVARIANTS and saved.training_args.get(name) != value
    ]
    before, now = held_out_count(saved.training_args), held_out_count(config)
    if before != now:
        changed.append(f"{before} -> {now} images held out of training for --eval_steps")
    return changed


def changed_objective(saved: TrainerState, config: dict[str, Any]) -> list[str]:
    """What differs between the checkpoint's run (`saved`) and the resuming one in `OBJECTIVE_FLAGS`."""
    return [
        f"--{name} {saved.training_args[name]} -> {config.get(name)}"
        for name in OBJECTIVE_FLAGS
        if name in saved.training_args and saved.training_args[name] != config.get(name)
    ]


def changed_training(saved: TrainerState, config: dict[str, Any]) -> list[str]:
    """What differs between the checkpoint's run (`saved`) and the resuming one in `APPLIED_ON_RESUME`, as
    `learning_rate 0.001 -> 0.0001` (the resumed run applies each of them)."""
    return [
        f"{name} {saved.training_args[name]} -> {config.get(name)}"
        for name in APPLIED_ON_RESUME
        if name in saved.training_args and saved.training_args[name] != config.get(name)
    ]


def settings_from_checkpoint(checkpoint: VerifiedCheckpoint, config: dict[str, Any]) -> dict[str, Any]:
    r"""
    Check the resuming run's flags (its public `config`) against the verified `checkpoint` before any long work, and
    return the flags it takes from the checkpoint (`FROM_CHECKPOINT`) where they differ, as `{name: checkpoint's}`.

    Raises:
        `CheckpointError`: a flag that cannot be applied: `--use_ema` for a checkpoint written without it (there is
            no average to continue), or a `--max_train_steps` below the step the checkpoint reached.
    """
    path, state = checkpoint.path, checkpoint.state
    saved = state.training_args
    has_ema = any(os.path.isfile(os.path.join(path, name)) for name in ("ema.safetensors", "ema.json"))
    if config.get("use_ema") and not has_ema:
        raise CheckpointError(
            f"{path} was written without --use_ema: it holds no average of the weights to continue. Resume with "
            "--use_ema false, or train with EMA in a new --output_dir."
        )
    steps = config.get("max_train_steps")
    if steps is not None and steps < state.global_step:
        raise CheckpointError(
            f"--max_train_steps {steps} is below step {state.global_step}, which {path} has reached: there is nothing "
            f"to train. Pass a --max_train_steps of at least {state.global_step}."
        )
    return {name: saved[name] for name in FROM_CHECKPOINT if name in saved and saved[name] != config.get(name)}


def continue_schedule(scheduler, optimizer: torch.optim.Optimizer, values: dict[str, Any], step: int) -> float:
    r"""
    After `load_state`, apply this run's optimizer flags: `values` (`lr`, `betas`, `weight_decay`, `eps`) are written
    into every param group of `optimizer`, and `scheduler` (a `LambdaLR` built from this run's flags, whose
    `last_epoch` and base rates the checkpoint restored) continues from `step` with `values["lr"]` as its base: the
    learning rate becomes the new schedule's value at `step`. Returns it.
    """
    for group in optimizer.param_groups:
        group.update(values)
        group["initial_lr"] = values["lr"]
    scheduler.base_lrs = [values["lr"] for _ in optimizer.param_groups]
    scheduler.last_epoch = step
    rates = [base * factor(step) for factor, base in zip(scheduler.lr_lambdas, scheduler.base_lrs, strict=True)]
    for group, rate in zip(optimizer.param_groups, rates, strict=True):
        group["lr"] = rate
    scheduler._last_lr = list(rates)  # what get_last_lr() returns
    return rates[0]


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


def resolve_resume_checkpoint(
    output_dir: str, resume_from_checkpoint: str | None, accelerator: Accelerator | None = None
) -> VerifiedCheckpoint | None:
    r"""
    The checkpoint `--resume_from_checkpoint` names, verified. With an `accelerator` of several processes, the main
    process alone resolves and verifies it (each file hashed once in all) and every process gets its result, or
    raises the same `CheckpointError`.

    Args:
        output_dir (`str`): The run's output folder.
        resume_from_checkpoint (`str`, *optional*):
            `"latest"`: the newest complete checkpoint in `output_dir` that verifies (`verify_checkpoint`), each newer
            one skipped with a warning that says why; `None` (a fresh start) if there is no checkpoint at all, as in
            train_unconditional.py. Otherwise a checkpoint folder, or the name of one in `output_dir`.
        accelerator (`Accelerator`, *optional*): The run's; every process calls this function.

    Raises:
        `CheckpointError`: the named checkpoint does not exist or is incomplete; or `latest` finds checkpoints but
            none verifies.
    """
    if accelerator is None or accelerator.num_processes == 1:
        return _resolve(output_dir, resume_from_checkpoint)
    found, error, shared = None, None, [None, None]
    if accelerator.is_main_process:
        try:
            found = _resolve(output_dir, resume_from_checkpoint)
        except Exception as raised:
            error = raised
        message = f"Resolving the checkpoint failed on the main process: {_first_line(error)}" if error else None
        shared = [found, str(error) if isinstance(error, CheckpointError) else message]
    broadcast_object_list(shared)
    if error is not None:
        raise error
    if shared[1] is not None:
        raise CheckpointError(shared[1])
    return shared[0]


def _resolve(output_dir: str, resume_from_checkpoint: str | None) -> VerifiedCheckpoint | None:
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        for path in find_incomplete_checkpoints(output_dir):
            logger.warning("Skipping %s: an incomplete checkpoint (the run writing it was interrupted).", path)
        checkpoints = find_checkpoints(output_dir)
        if not checkpoints:
            logger.warning("No checkpoint in '%s' to resume from: starting a new training run.", output_dir)
            return None
        problems = []
        for _, path in reversed(checkpoints):
            try:
                return verify_checkpoint(path)
            except CheckpointError as error:
                logger.warning("Skipping %s: it does not verify: %s", path, error)
                problems.append(str(error))
        raise CheckpointError(
            f"None of the {len(checkpoints)} checkpoint(s) in '{output_dir}' verifies (the newest: {problems[0]}). "
            "Restore a good copy, or start a new run with --overwrite_output_dir and no --resume_from_checkpoint."
        )
    candidates = [resume_from_checkpoint, os.path.join(output_dir, os.path.basename(resume_from_checkpoint))]
    for path in candidates:
        if os.path.isdir(path):
            if os.path.isfile(os.path.join(path, TRAINER_STATE_NAME)):  # complete, whatever its name (a backup copy)
                return verify_checkpoint(path)  # now, not after the data cache is built
            if not _INCOMPLETE_RE.match(os.path.basename(os.path.normpath(path))):
                raise CheckpointError(
                    f"'{path}' is not a checkpoint (a checkpoint is a folder named {CHECKPOINT_PREFIX}<step> in "
                    "--output_dir, written by train_ddpm.py). Pass one of those, or --resume_from_checkpoint latest."
                )
            raise CheckpointError(
                f"'{path}' is not a complete checkpoint (no {TRAINER_STATE_NAME}): its run was probably "
                "interrupted while writing it. Resume from another one, or pass --resume_from_checkpoint latest."
            )
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
        state (`TrainerState`): Step, data position and flags, written as `trainer_state.json` before the manifest.
        weights (`list[torch.Tensor]`): Tensors that must be finite for the checkpoint to be written (the model's
            and the EMA's weights).
        total_limit (`int`, *optional*): Keep only this many complete checkpoints, removing the oldest.

    Returns:
        `str`: The checkpoint folder.

    Raises:
        `CheckpointError`: a weight is not finite (nothing is written); or the disk is full (on any process): the
            partial `checkpoint-{step}.tmp` is removed, and the message says how much room a checkpoint needs and
            which checkpoint still verifies. Any other failure to write also removes the partial folder, and is
            raised as it is.
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
    error = _attempt(accelerator.save_state, temporary)
    failure = _first_failure(accelerator, error, output_dir)  # every process learns of a failure on any (no hang)
    if failure is None and accelerator.is_main_process:
        error = _attempt(_finish_checkpoint, accelerator, output_dir, temporary, final, state, total_limit)
    failure = failure or _first_failure(accelerator, error, output_dir)
    if failure is not None:
        if accelerator.is_main_process:
            shutil.rmtree(temporary, ignore_errors=True)  # nothing half-written stays; saved checkpoints untouched
        accelerator.wait_for_everyone()
        if failure[1]:
            raise CheckpointError(_disk_full_message(accelerator, output_dir, final, failure[0])) from error
        if error is not None:
            raise error
        raise CheckpointError(f"Writing {final} failed on another process: {failure[0]}")
    accelerator.wait_for_everyone()
    return final


def _attempt(function, *args) -> Exception | None:
    """Call `function(*args)`; the exception it raised, or None."""
    try:
        function(*args)
    except Exception as error:
        return error
    return None


def _first_failure(accelerator: Accelerator, error: Exception | None, output_dir: str) -> tuple[str, bool] | None:
    """The first process's failure as (its first line, whether the disk is full), or None; a collective call."""
    failure = None
    if error is not None:
        failure = (
            _first_line(error),
            is_disk_full(error, output_dir, needed=_checkpoint_bytes(accelerator, output_dir)[0]),
        )
    if accelerator.num_processes > 1:
        failures = [found for found in gather_object([failure]) if found]
        failure = failures[0] if failures else None
    return failure


def _finish_checkpoint(
    accelerator: Accelerator, output_dir: str, temporary: str, final: str, state: TrainerState, total_limit: int | None
) -> None:
    """The main process's part: our states, the trainer state, the manifest, the flush, the rename, the limit."""
    for name, obj in registered_checkpoint_state(accelerator).items():
        save_object_state(temporary, name, obj)
    state.save(os.path.join(temporary, TRAINER_STATE_NAME))
    write_manifest(temporary)  # last: it lists every file above
    fsync_tree(temporary)
    if os.path.exists(final):  # a checkpoint of the same step from an earlier run: replace it
        previous = final + ".old"
        shutil.rmtree(previous, ignore_errors=True)
        os.rename(final, previous)
        os.rename(temporary, final)
        shutil.rmtree(previous, ignore_errors=True)
    else:
        os.rename(temporary, final)
    fsync_dir(output_dir)
    if total_limit is not None:  # the newest up to this step: a higher one (an earlier run's, maybe damaged) stays
        kept = [path for step, path in find_checkpoints(output_dir) if step <= state.global_step]
        for path in kept[:-total_limit]:
            logger.info("Removing %s (--checkpoints_total_limit %d).", path, total_limit)
            shutil.rmtree(path, ignore_errors=True)


def _tensor_bytes(value: Any) -> int:
    """The bytes of the tensors in a (nested) state dict."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(item) for item in value)
    return 0


def _checkpoint_bytes(accelerator: Accelerator, output_dir: str) -> tuple[int, str]:
    """What a checkpoint needs: the size of the newest complete one, else the size of the states it will hold."""
    checkpoints = find_checkpoints(output_dir)
    if checkpoints:
        return folder_bytes(checkpoints[-1][1]), f"the size of {os.path.basename(checkpoints[-1][1])}"
    states = [model.state_dict() for model in accelerator._models]
    states += [optimizer.state_dict() for optimizer in accelerator._optimizers]
    states += [obj.state_dict() for obj in registered_checkpoint_state(accelerator).values()]
    return _tensor_bytes(states), "the model, optimizer and EMA states it holds"


def newest_verified_checkpoint(output_dir: str) -> str | None:
    """The newest complete checkpoint in `output_dir` that verifies (`verify_checkpoint`), or None."""
    for _, path in reversed(find_checkpoints(output_dir)):
        try:
            verify_checkpoint(path)
        except CheckpointError:
            continue
        return path
    return None


def intact_checkpoint_sentence(output_dir: str) -> str:
    """Which checkpoint a run can resume from after a failed write, as a sentence for an error message."""
    intact = newest_verified_checkpoint(output_dir)
    if intact is None:
        return f"No intact checkpoint is in '{output_dir}': the run must start again."
    return (
        f"Nothing saved before was touched: {intact} is the newest intact checkpoint (it verifies); "
        "--resume_from_checkpoint latest continues from it."
    )


def _disk_full_message(accelerator: Accelerator, output_dir: str, final: str, failure: str) -> str:
    needed, how = _checkpoint_bytes(accelerator, output_dir)
    return (
        f"The disk holding '{output_dir}' is full: writing {os.path.basename(final)} failed ({failure}). The partial "
        f"{os.path.basename(final)}.tmp was removed; {format_bytes(free_bytes(output_dir))} are free, and a "
        f"checkpoint needs about {format_bytes(needed)} ({how}). Free space on that disk (or keep fewer checkpoints "
        f"with --checkpoints_total_limit), or use an --output_dir on a disk with room. "
        f"{intact_checkpoint_sentence(output_dir)}"
    )


@contextlib.contextmanager
def _accelerate_warnings(path: str) -> Iterator[list[str]]:
    """
    While accelerate loads `path`: its messages that some state could not be restored ("Could not load random
    states", logged at INFO, below the WARNING level train_ddpm.py gives accelerate) become warnings of ours, and are
    collected in the yielded list. Its other INFO messages stay hidden.
    """
    source = logging.getLogger("accelerate.checkpointing")
    collected: list[str] = []

    class Surface(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            message = record.getMessage()
            lowered = message.lower()  # after accelerate's "[RANK 0] " prefix
            if record.levelno >= logging.WARNING or any(word in lowered for word in ("could not", "cannot", "unable")):
                collected.append(message)
                logger.warning("accelerate, loading %s: %s", path, message)

    handler, level, propagate = Surface(), source.level, source.propagate
    source.addHandler(handler)
    source.setLevel(logging.INFO)
    source.propagate = False
    try:
        yield collected
    finally:
        source.removeHandler(handler)
        source.setLevel(level)
        source.propagate = propagate


def _restored_random_states(path: str, process_index: int) -> str | None:
    """None if this process's RNGs now hold the states of `random_states_{process_index}.pkl` (or it has none), else
    what differs: accelerate swallows its failures to restore them (a resume that would silently diverge)."""
    file = os.path.join(path, f"random_states_{process_index}.pkl")
    if not os.path.isfile(file):
        logger.warning("%s is missing: process %d starts from fresh random states.", file, process_index)
        return None
    try:
        states = safe_torch_load(file)
        restored = random.getstate() == states["random_state"] and torch.equal(
            torch.get_rng_state(), states["torch_manual_seed"]
        )
    except Exception as error:
        return f"{file} cannot be restored: {_first_line(error)}"
    return None if restored else f"{file} was not restored (the random states differ from the file's)"


def load_checkpoint(accelerator: Accelerator, checkpoint: VerifiedCheckpoint) -> TrainerState:
    r"""
    Restore what `save_checkpoint` wrote (every process calls it) and return the `TrainerState`.

    Nothing is verified or re-read here: `checkpoint` comes from `verify_checkpoint` (through
    `resolve_resume_checkpoint`), and `check_model_fits` has refused a model of other shapes. The registered
    objects' states are read first (JSON and safetensors); then accelerate loads the model, optimizer and RNG states
    (its pickles with `weights_only=True`), and finally the registered objects take their states.

    Args:
        accelerator (`Accelerator`): The run's, with its model, optimizer and objects prepared / registered.
        checkpoint (`VerifiedCheckpoint`): The checkpoint, as verified.

    Raises:
        `CheckpointError`: a state cannot be restored; the message names the file. The run must stop: the model or
            optimizer may hold part of the checkpoint.
    """
    path = checkpoint.path
    objects = registered_checkpoint_state(accelerator)
    saved = {name: read_object_state(path, name) for name in objects}
    ours = {"model", TRAINER_STATE_NAME.split(".")[0], MANIFEST_NAME.split(".")[0], *objects}
    for name in sorted(os.listdir(path)):
        stem, suffix = os.path.splitext(name)
        if suffix in (".safetensors", ".json") and stem not in ours and not stem.startswith("model_"):
            logger.warning("%s holds the state of '%s', which this run does not use: it is not restored.", path, stem)
    problem = None
    try:
        with _accelerate_warnings(path) as messages:
            accelerator.load_state(path, load_kwargs={"weights_only": True})
    except Exception as error:
        problem = f"{path} cannot be loaded: {_first_line(error)}"
    else:
        problem = _restored_random_states(path, accelerator.process_index)
        if problem is None and messages:
            problem = f"accelerate could not restore all of {path}: {messages[0]}"
    if accelerator.num_processes > 1:  # every process stops if one cannot restore its part
        problems = [found for found in gather_object([problem]) if found]
        problem = problems[0] if problems else None
    if problem:
        raise CheckpointError(f"{problem}. Resuming from it would not continue the run it saved.")
    for name, obj in objects.items():
        try:
            obj.load_state_dict(saved[name])
        except Exception as error:
            raise CheckpointError(
                f"The state of '{name}' in {path} does not fit this run: {_first_line(error)}"
            ) from error
    return dataclasses.replace(checkpoint.state)  # the caller's to change
