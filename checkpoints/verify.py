"""Verifying a checkpoint folder once, before anything of it is loaded, and keeping what the checks read.

`verify_checkpoint` hashes every file once against `manifest.json` (sizes and SHA-256, written last by the save),
parses what the resume will read (the trainer state, the safetensors headers, every pickle with `weights_only=True`)
and returns a `VerifiedCheckpoint`: the path, the `TrainerState` and the model's parameter shapes, so that the model
fit (`model_mismatch`) and the load read none of it again. The manifest proves integrity, not origin, which is why no
file of a checkpoint is ever unpickled with `weights_only=False`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors import safe_open

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
TRAINER_STATE_NAME = "trainer_state.json"
MODEL_FILE_NAME = "model.safetensors"  # accelerate's name for the first prepared model
CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINT_RE = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")
_PICKLE_SUFFIXES = (".bin", ".pkl", ".pt")
_CHUNK = 1 << 20


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read."""


@dataclass
class TrainerState:
    r"""
    Where training stands, beyond what `accelerator.save_state` holds.

    Args:
        global_step (`int`): Optimizer steps taken (including skipped non-finite ones).
        epoch (`int`): The epoch in progress.
        batches_in_epoch (`int`): Batches (per process) of `epoch` consumed since it started on this many processes
            (since the resume, when a resume changed the number mid-epoch).
        images_in_epoch (`int`): Images of `epoch` consumed by all processes together: the first this many of the
            epoch's permutation (`training.data_position`). The position a resume on another number of processes
            continues from. A checkpoint written without it: `batches_in_epoch` x batch size x processes.
        skipped_nonfinite_steps (`int`): Optimizer steps skipped because the gradient was not finite.
        consecutive_nonfinite_steps (`int`): How many of those came last, in a row.
        num_processes (`int`): Processes of the run that wrote the checkpoint (the data position depends on it).
        training_args (`dict`): The resolved flags of the run that wrote the checkpoint.
    """

    global_step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    images_in_epoch: int = 0
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
        """
        Raises:
            `ValueError`: not a JSON object, or a count that is not a whole number in its range.
        """
        with open(path, encoding="utf-8") as file:
            values = json.load(file)
        if not isinstance(values, dict):
            raise ValueError(f"it holds a JSON {type(values).__name__}, not an object")
        known = {f.name for f in dataclasses.fields(cls)}
        values = {key: value for key, value in values.items() if key in known}  # a key of another version: unused
        for name, value in values.items():
            if name == "training_args":
                if not isinstance(value, dict):
                    raise ValueError("training_args is not an object")
            elif not isinstance(value, int) or isinstance(value, bool) or value < (name == "num_processes"):
                raise ValueError(f"{name} is {value!r}, not a whole number >= {int(name == 'num_processes')}")
        if "images_in_epoch" not in values:  # written before the count was recorded
            batch_size = values.get("training_args", {}).get("train_batch_size") or 0
            values["images_in_epoch"] = values.get("batches_in_epoch", 0) * batch_size * values.get("num_processes", 1)
        return cls(**values)


@dataclass
class VerifiedCheckpoint:
    r"""
    A checkpoint folder that verified, with what the checks read of it.

    Args:
        path (`str`): The checkpoint folder.
        state (`TrainerState`): Its `trainer_state.json`.
        model_shapes (`dict`, *optional*): The name and shape of each tensor of its `model.safetensors`; None if it
            holds none.
    """

    path: str
    state: TrainerState
    model_shapes: dict[str, tuple[int, ...]] | None = None


def first_line(error: BaseException) -> str:
    """The first line of an error's message (torch's weights_only errors go on to suggest weights_only=False)."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


# The manifest: every file's name, size and SHA-256 -------------------------------------------------------------------
def file_digest(path: str) -> str:
    """The SHA-256 of the file at `path`, in hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def list_files(folder: str) -> list[str]:
    """The files under `folder` (recursively) as sorted '/'-separated relative paths, the manifest excepted."""
    files = []
    for root, _, names in os.walk(folder):
        for name in names:
            relative = os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
            if relative != MANIFEST_NAME:
                files.append(relative)
    return sorted(files)


def write_manifest(folder: str) -> str:
    """Write `folder/manifest.json` for the files now in `folder`, flushed to disk; returns its path."""
    files = {}
    for relative in list_files(folder):
        path = os.path.join(folder, relative)
        files[relative] = {"size": os.path.getsize(path), "sha256": file_digest(path)}
    path = os.path.join(folder, MANIFEST_NAME)
    with open(path, "w", encoding="utf-8") as file:
        json.dump({"format": MANIFEST_FORMAT, "files": files}, file, indent=2, sort_keys=True)
        file.write("\n")
        file.flush()
        os.fsync(file.fileno())
    return path


def _read_manifest(folder: str) -> dict[str, dict[str, Any]]:
    path = os.path.join(folder, MANIFEST_NAME)
    if not os.path.isfile(path):
        raise CheckpointError(
            f"{folder} has no {MANIFEST_NAME}: checkpoints written before the manifest are not read. Resume from a "
            "checkpoint that has one, or start a new run (--overwrite_output_dir, no --resume_from_checkpoint)."
        )
    try:
        with open(path, encoding="utf-8") as file:
            manifest = json.load(file)
    except (OSError, ValueError) as error:  # ValueError: not JSON, not UTF-8
        raise CheckpointError(f"{path} cannot be read ({error})") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise CheckpointError(f"{path} is not a manifest of format {MANIFEST_FORMAT}")
    for relative, entry in files.items():
        parts = relative.split("/")
        if relative.startswith("/") or "\\" in relative or any(part in ("", ".", "..") for part in parts):
            raise CheckpointError(f"{path} names '{relative}', which is not a plain path inside the checkpoint")
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("size"), int)
            or not isinstance(entry.get("sha256"), str)
        ):
            raise CheckpointError(f"{path} has no size and SHA-256 for '{relative}'")
    return files


def _verify_manifest(folder: str) -> None:
    """The folder holds exactly the files of its manifest, with their sizes and digests (each file hashed once)."""
    expected = _read_manifest(folder)
    for relative, entry in sorted(expected.items()):
        path = os.path.join(folder, *relative.split("/"))
        if not os.path.isfile(path):
            raise CheckpointError(f"{path} is missing (it is in the manifest)")
        size = os.path.getsize(path)
        if size != entry["size"]:
            raise CheckpointError(f"{path} has {size} bytes, the manifest says {entry['size']} (truncated or altered)")
        if file_digest(path) != entry["sha256"]:
            raise CheckpointError(f"{path} does not match the SHA-256 in the manifest (damaged or altered)")
    extra = [relative for relative in list_files(folder) if relative not in expected]
    if extra:
        raise CheckpointError(
            f"{os.path.join(folder, extra[0])} is not in the manifest (added after the checkpoint was written, or its "
            "entry removed)"
        )


# The parse checks: what the resume reads parses, and no pickle needs more than weights_only=True ---------------------
def _safe_globals() -> list[Any]:
    """The globals accelerate allows when it unpickles with weights_only=True (numpy arrays of the RNG states)."""
    try:
        from accelerate.utils.other import TORCH_SAFE_GLOBALS
    except ImportError:  # another accelerate: torch's own allow-list
        return []
    return list(TORCH_SAFE_GLOBALS)


def safe_torch_load(path: str) -> Any:
    """`torch.load` with `weights_only=True` (no code can run), the globals accelerate allows, onto the CPU."""
    with torch.serialization.safe_globals(_safe_globals()):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def _read_trainer_state(path: str) -> TrainerState:
    file = os.path.join(path, TRAINER_STATE_NAME)
    try:
        return TrainerState.load(file)
    except Exception as error:  # missing, not JSON, not an object, unknown types
        raise CheckpointError(f"{file} cannot be read: {first_line(error)}") from error


def _parse_files(path: str) -> dict[str, tuple[int, ...]] | None:
    """Parse every other file the resume reads; the shapes in the header of `model.safetensors` (None if absent)."""
    shapes = None
    for name in sorted(os.listdir(path)):
        file = os.path.join(path, name)
        if name in (MANIFEST_NAME, TRAINER_STATE_NAME) or not os.path.isfile(file):
            continue  # both already parsed
        try:
            if name.endswith(".safetensors"):
                with safe_open(file, framework="pt", device="cpu") as opened:
                    header = {key: tuple(opened.get_slice(key).get_shape()) for key in opened.keys()}  # noqa: SIM118
                if name == MODEL_FILE_NAME:
                    shapes = header
            elif name.endswith(_PICKLE_SUFFIXES):
                safe_torch_load(file)
            elif name.endswith(".json"):
                with open(file, encoding="utf-8") as opened:
                    json.load(opened)
        except Exception as error:
            raise CheckpointError(f"{file} cannot be loaded safely: {first_line(error)}") from error
    return shapes


def verify_checkpoint(path: str) -> VerifiedCheckpoint:
    r"""
    Check the checkpoint folder `path` before anything of it is loaded: its files match `manifest.json` (sizes and
    SHA-256, each file hashed once), and every file parses, pickles with `weights_only=True` only.

    Returns:
        `VerifiedCheckpoint`: the path with its trainer state and model shapes, read here once.

    Raises:
        `CheckpointError`: the first problem, naming the file; a checkpoint without a manifest is refused.
    """
    _verify_manifest(path)
    state = _read_trainer_state(path)
    shapes = _parse_files(path)
    named = CHECKPOINT_RE.match(os.path.basename(os.path.normpath(path)))
    if named and int(named.group(1)) != state.global_step:  # a copy under another step's name is not that step
        raise CheckpointError(
            f"{path} holds step {state.global_step} ({TRAINER_STATE_NAME}), not the step its name says: a renamed or "
            f"copied checkpoint. Rename it {CHECKPOINT_PREFIX}{state.global_step} or move it out of the output folder."
        )
    return VerifiedCheckpoint(path, state, shapes)


# The model fit: a checkpoint of other model flags is named, not met as a size-mismatch traceback ---------------------
MODEL_FLAGS = ("model_preset", "model_config_name_or_path", "num_channels", "variance_type")
"""The flags that decide the shapes of the model's parameters (with the contents of a model config file)."""
SHOWN_PARAMETERS = 3
INPUT_CONVOLUTION = "conv_in.weight"  # (out, in_channels, k, k) in a UNet2DModel


def shape_differences(saved: dict[str, tuple[int, ...]], model: dict[str, tuple[int, ...]]) -> list[str]:
    """What differs between the saved shapes and the model's, one phrase per parameter, in the model's order."""
    differences = []
    for name, shape in model.items():
        if name not in saved:
            differences.append(f"{name} is not in the checkpoint")
        elif saved[name] != shape:
            differences.append(f"{name} is {list(saved[name])} there, {list(shape)} here")
    differences += [f"{name} is only in the checkpoint" for name in saved if name not in model]
    return differences


def _with_channels(args: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """`args` with `num_channels` read from the input convolution where the flag was left unset (digits: 1)."""
    if args.get("num_channels") is not None or INPUT_CONVOLUTION not in shapes:
        return args
    return {**args, "num_channels": shapes[INPUT_CONVOLUTION][1]}


def _flag(name: str, value: Any) -> str:
    return f"--{name} {value}" if value is not None else f"no --{name}"


def changed_model_flags(saved_args: dict[str, Any], args: dict[str, Any]) -> list[str]:
    """The model flags (`MODEL_FLAGS`) whose values differ, as `--num_channels 1 (this run: 3)`."""
    return [
        f"{_flag(name, saved_args.get(name))} (this run: {_flag(name, args.get(name))})"
        for name in MODEL_FLAGS
        if name in saved_args and saved_args.get(name) != args.get(name)
    ]


def model_mismatch(checkpoint: VerifiedCheckpoint, model: dict[str, torch.Tensor], args: dict[str, Any]) -> str | None:
    r"""
    None if the verified `checkpoint` holds a model of the shapes of `model` (a state dict), else the message that
    says which flags of `args` (or, when none of them differs, which parameters) differ and what to do. Nothing is
    read from disk: the shapes and flags are those read when the checkpoint was verified.
    """
    saved, saved_args = checkpoint.model_shapes, checkpoint.state.training_args
    if saved is None:
        return None
    shapes = {name: tuple(tensor.shape) for name, tensor in model.items()}
    differences = shape_differences(saved, shapes)
    if not differences:
        return None
    flags = changed_model_flags(_with_channels(saved_args, saved), _with_channels(args, shapes))
    if flags:
        why = f"it was written with {', '.join(flags)}"
    else:
        more = len(differences) - SHOWN_PARAMETERS
        why = (
            "its parameters differ: "
            + "; ".join(differences[:SHOWN_PARAMETERS])
            + (f"; {more} more" if more > 0 else "")
        )
        if saved_args.get("model_config_name_or_path"):
            why += f" (has {saved_args['model_config_name_or_path']} changed since?)"
    return (
        f"{checkpoint.path} holds a model of another shape than this run's: {why}. Resume with the flags of the run "
        "that wrote it, or train this model in a new --output_dir (or start over with --overwrite_output_dir)."
    )
