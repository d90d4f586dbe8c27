"""The denoising network of train_ddpm.py: `UNet2DModel` presets and configs.

The paper presets reproduce Ho et al. 2020, Appendix B (https://arxiv.org/abs/2006.11239) with diffusers'
`UNet2DModel`: a PixelCNN++-style U-Net with GroupNorm, two residual blocks per resolution, single-head
self-attention at 16x16 and the Transformer sinusoidal timestep embedding. They have the parameter counts of the
converted checkpoints `google/ddpm-cifar10-32` (35,746,307) and `google/ddpm-church-256` (113,673,219).
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import huggingface_hub
import torch
from diffusers import UNet2DModel
from huggingface_hub.errors import EntryNotFoundError, HFValidationError

from hub_access import work_offline
from hub_access.secrets import is_local_path

logger = logging.getLogger(__name__)

# Settings shared by the paper's networks: the original TensorFlow code's sinusoidal embedding ([sin, cos], frequencies
# exp(-log(10000) * i / (half_dim - 1))), GroupNorm(32, eps=1e-6), single-head attention, stride-2 convolutions padded
# on the bottom/right only.
_PAPER_UNET = {
    "time_embedding_type": "positional",
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "layers_per_block": 2,
    "downsample_padding": 0,
    "act_fn": "silu",
    "attention_head_dim": None,
    "norm_num_groups": 32,
    "norm_eps": 1e-6,
    "resnet_time_scale_shift": "default",
}

MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # CIFAR-10 (32x32): ch 128, multipliers (1, 2, 2, 2), attention at 16x16, dropout 0.1. 35.7M parameters.
    "ddpm-cifar10": {
        **_PAPER_UNET,
        "block_out_channels": (128, 256, 256, 256),
        "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        "dropout": 0.1,
    },
    # LSUN / CelebA-HQ (256x256): ch 128, multipliers (1, 1, 2, 2, 4, 4), attention at 16x16, dropout 0. 114M parameters.
    "ddpm-256": {
        **_PAPER_UNET,
        "block_out_channels": (128, 128, 256, 256, 512, 512),
        "down_block_types": (
            "DownBlock2D",
            "DownBlock2D",
            "DownBlock2D",
            "DownBlock2D",
            "AttnDownBlock2D",
            "DownBlock2D",
        ),
        "up_block_types": ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
        "dropout": 0.0,
    },
    # For the embedded 8x8 digits on a CPU: 0.7M parameters (one channel), one residual block per level, attention
    # at the lowest level (2x2 for 8x8 input) and in the middle; no dropout, since a short run underfits rather than
    # overfits. Works at any multiple of 4.
    "tiny": {
        **_PAPER_UNET,
        "block_out_channels": (32, 48, 48),
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "down_block_types": ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        "up_block_types": ("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        "dropout": 0.0,
    },
}


class ModelConfigUnavailableError(RuntimeError):
    """The requested model config can neither be downloaded nor found locally."""


def count_parameters(model: torch.nn.Module) -> int:
    """Number of parameters of `model`, trainable or not (also for models on the `meta` device)."""
    return sum(parameter.numel() for parameter in model.parameters())


def _num_downsamples(unet_or_config: UNet2DModel | Mapping[str, Any]) -> int:
    if isinstance(unet_or_config, UNet2DModel):
        return sum(block.downsamplers is not None for block in unet_or_config.down_blocks)
    down_block_types = unet_or_config.get("down_block_types")
    if down_block_types is None:
        down_block_types = inspect.signature(UNet2DModel.__init__).parameters["down_block_types"].default
    # UNet2DModel downsamples at the end of every down block but the last.
    return len(down_block_types) - 1


def check_resolution(
    unet_or_config: UNet2DModel | Mapping[str, Any], resolution: int, model_name: str | None = None
) -> None:
    r"""
    Check that images of side `resolution` go through the U-Net: it must be divisible by 2**(downsampling blocks).

    Args:
        unet_or_config (`UNet2DModel` or `dict`):
            The model, or its config.
        resolution (`int`):
            Side of the square training images.
        model_name (`str`, *optional*):
            Name of the model (preset or config path) for the error message.

    Raises:
        `ValueError`: naming the resolution, the model and the nearest valid resolutions.
    """
    factor = 2 ** _num_downsamples(unet_or_config)
    if resolution > 0 and resolution % factor == 0:
        return
    below = resolution // factor * factor
    nearest = [r for r in (below, below + factor) if r > 0]
    name = f"'{model_name}'" if model_name else "the model"
    raise ValueError(
        f"--resolution {resolution} does not fit {name}: it halves the image {factor.bit_length() - 1} times, so "
        f"the resolution must be a multiple of {factor}. Nearest valid resolutions: "
        f"{' and '.join(str(r) for r in nearest)}."
    )


def _read_config(path: str) -> dict[str, Any]:
    """A UNet2DModel config file: a JSON object, or `ModelConfigUnavailableError` naming the file and the fault."""
    try:
        with open(path, encoding="utf-8") as file:
            config = json.load(file)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        raise ModelConfigUnavailableError(
            f"--model_config_name_or_path: cannot read '{path}' as a JSON config ({reason})."
        ) from None
    if not isinstance(config, dict):
        raise ModelConfigUnavailableError(
            f"--model_config_name_or_path: '{path}' holds a JSON {type(config).__name__}, not an object of "
            "UNet2DModel settings (as UNet2DModel.save_config writes)."
        )
    return config


def _load_unet_config(name_or_path: str, cache_dir: str | None) -> dict[str, Any]:
    if os.path.isfile(name_or_path):
        return _read_config(name_or_path)
    if os.path.isdir(name_or_path):
        for candidate in ("config.json", os.path.join("unet", "config.json")):
            path = os.path.join(name_or_path, candidate)
            if os.path.isfile(path):
                return _read_config(path)
        raise ModelConfigUnavailableError(
            f"Found neither config.json nor unet/config.json in the folder '{name_or_path}'. Pass a UNet2DModel config "
            "file, a folder saved by UNet2DModel.save_pretrained, or a pipeline folder."
        )
    if is_local_path(name_or_path) or name_or_path.endswith(".json") or name_or_path.count("/") > 1:
        raise ModelConfigUnavailableError(  # a path, not a Hub id (user/name): no need to ask the Hub
            f"--model_config_name_or_path '{name_or_path}': no such file or folder (the working folder is "
            f"{os.getcwd()}). Pass a UNet2DModel config.json, a model or pipeline folder, or a Hub id (user/name)."
        )

    offline = work_offline()
    errors = []
    for subfolder in (None, "unet"):
        try:
            path = huggingface_hub.hf_hub_download(
                name_or_path, "config.json", subfolder=subfolder, cache_dir=cache_dir, local_files_only=offline
            )
        except HFValidationError as error:
            raise ModelConfigUnavailableError(
                f"--model_config_name_or_path '{name_or_path}' is neither a local config file or folder nor a valid "
                f"Hub model id ({str(error).strip().splitlines()[0]})."
            ) from None
        except (OSError, EntryNotFoundError) as error:
            errors.append(f"{error.__class__.__name__}: {str(error).strip().splitlines()[0]}")
            continue
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    reason = (
        "the Hugging Face Hub cannot be reached (or offline mode is on) and no cached copy was found"
        if offline
        else "the Hub has no config.json or unet/config.json for it (or no such repository, or it is private)"
    )
    raise ModelConfigUnavailableError(
        f"Model config '{name_or_path}' is not available: {reason} ({'; '.join(dict.fromkeys(errors))}). Check the name; run once "
        "with network access so that it is cached; or pass a local config.json or model folder with "
        "--model_config_name_or_path, or use --model_preset."
    )


def build_unet(
    model_preset: str | None,
    model_config_name_or_path: str | None,
    resolution: int,
    in_channels: int,
    out_channels: int | None = None,
    cache_dir: str | None = None,
    dropout: float | None = None,
) -> UNet2DModel:
    r"""
    A freshly initialised `UNet2DModel` from a preset or a config, sized for the training data.

    Args:
        model_preset (`str`, *optional*):
            A key of `MODEL_PRESETS`: `ddpm-cifar10`, `ddpm-256` or `tiny`.
        model_config_name_or_path (`str`, *optional*):
            A UNet2DModel config: a local JSON file, a local folder (with config.json or unet/config.json), or a Hub
            id (its config.json, else unet/config.json). Only the config is read, not the weights.
        resolution (`int`):
            Side of the square training images; becomes `sample_size`.
        in_channels (`int`):
            Channels of the training images.
        out_channels (`int`, *optional*):
            Channels of the model output; defaults to `in_channels` (epsilon prediction). Pass `2 * in_channels` for
            a learned variance.
        cache_dir (`str`, *optional*):
            Where Hub configs are cached.
        dropout (`float`, *optional*):
            Overrides the dropout of the preset or config.

    Exactly one of `model_preset` and `model_config_name_or_path` must be given. `sample_size`, `in_channels` and
    `out_channels` always come from the data (a config's values are overridden, with a log message when they differ).

    Raises:
        `ValueError`: an unknown preset (the message lists the presets), neither or both sources given, a config of
        another model class, or a resolution the model cannot take (see `check_resolution`).
        `ModelConfigUnavailableError`: a Hub config that is not cached and cannot be downloaded.
    """
    if (model_preset is None) == (model_config_name_or_path is None):
        raise ValueError(
            "Pass exactly one of --model_preset and --model_config_name_or_path "
            f"(got model_preset={model_preset!r}, model_config_name_or_path={model_config_name_or_path!r})."
        )
    overrides = {
        "sample_size": resolution,
        "in_channels": in_channels,
        "out_channels": in_channels if out_channels is None else out_channels,
    }
    if dropout is not None:
        overrides["dropout"] = dropout

    if model_preset is not None:
        if model_preset not in MODEL_PRESETS:
            raise ValueError(
                f"Unknown --model_preset {model_preset!r}; the presets are: {', '.join(MODEL_PRESETS)}. "
                "Or pass a UNet2DModel config with --model_config_name_or_path."
            )
        name, config = model_preset, dict(MODEL_PRESETS[model_preset])
    else:
        name, config = model_config_name_or_path, _load_unet_config(model_config_name_or_path, cache_dir)
        class_name = config.get("_class_name", UNet2DModel.__name__)
        if class_name != UNet2DModel.__name__:
            raise ValueError(
                f"The config '{name}' is for {class_name}, not UNet2DModel. Pass the config of an unconditional "
                "UNet2DModel (for a pipeline folder, its unet/ subfolder)."
            )
        for key, value in overrides.items():
            if key in config and config[key] != value and key != "dropout":
                logger.info(
                    "Model config '%s': %s=%s replaced by %s from the training data.", name, key, config[key], value
                )

    config.update(overrides)
    check_resolution(config, resolution, model_name=name)
    return UNet2DModel.from_config(config)
