"""Whether a checkpoint's model fits the model of the run resuming it, decided from the safetensors header alone.

A checkpoint written with other model flags (`--num_channels 1` resumed with 3, another `--model_preset`, other block
widths in `--model_config_name_or_path`, `--variance_type learned_range`, which doubles the output channels) would fail
deep inside `load_state_dict` with a size-mismatch traceback. `model_mismatch` compares the parameter names and shapes
in the header of the checkpoint's `model.safetensors` (no tensor is read) with the new model's `state_dict`, and says
which flags differ, read from the flags the checkpoint saved in `trainer_state.json`.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from safetensors import safe_open

MODEL_FILE_NAME = "model.safetensors"  # accelerate's name for the first prepared model
MODEL_FLAGS = ("model_preset", "model_config_name_or_path", "num_channels", "variance_type")
"""The flags that decide the shapes of the model's parameters (with the contents of a model config file)."""
SHOWN_PARAMETERS = 3
INPUT_CONVOLUTION = "conv_in.weight"  # (out, in_channels, k, k) in a UNet2DModel


def saved_shapes(path: str) -> dict[str, tuple[int, ...]] | None:
    """The name and shape of each tensor in the checkpoint's `model.safetensors` (header only), or None if absent."""
    file = os.path.join(path, MODEL_FILE_NAME)
    if not os.path.isfile(file):
        return None
    with safe_open(file, framework="pt") as opened:
        return {name: tuple(opened.get_slice(name).get_shape()) for name in opened.keys()}  # noqa: SIM118


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


def model_mismatch(
    path: str, model: dict[str, torch.Tensor], saved_args: dict[str, Any], args: dict[str, Any] | None
) -> str | None:
    r"""
    None if the checkpoint at `path` holds a model of the shapes of `model` (a state dict), else the message that
    says which flags (or, when none of them differs, which parameters) differ and what to do.
    """
    saved = saved_shapes(path)
    if saved is None:
        return None
    shapes = {name: tuple(tensor.shape) for name, tensor in model.items()}
    differences = shape_differences(saved, shapes)
    if not differences:
        return None
    flags = changed_model_flags(_with_channels(saved_args, saved), _with_channels(args or {}, shapes))
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
        f"{path} holds a model of another shape than this run's: {why}. Resume with the flags of the run that wrote "
        "it, or train this model in a new --output_dir (or start over with --overwrite_output_dir)."
    )
