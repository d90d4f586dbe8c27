# Copyright 2026 The ddpm-paper authors. Licensed under the Apache License, Version 2.0.
"""
Small helpers shared by the pipeline, the likelihood functions, interpolation and export, and by `evaluation/` and
`training/` (which may import `pipelines/`): the model's pixel scale, the stock-to-paper scheduler conversion, the
device a model runs on, and the image grid of samples.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import torch
from diffusers.utils import make_image_grid

from schedulers import DDPMPaperScheduler


def pixels_to_model_range(pixels: torch.Tensor) -> torch.Tensor:
    r"""
    8-bit images as the model sees them: float32 in [-1, 1], `pixels / 127.5 - 1` (the data scaling of Sec. 3.3).

    The inverse of the pipeline's output scaling ([`model_range_to_unit`], then times 255).

    Args:
        pixels (`torch.Tensor`): uint8 (or integer-valued) images in [0, 255], of any shape.

    Returns:
        `torch.Tensor`: float32, same shape and device.
    """
    return pixels.to(torch.float32) / 127.5 - 1.0


def model_range_to_unit(images: torch.Tensor) -> torch.Tensor:
    r"""
    Images in the model's [-1, 1] (samples, predicted x_0) mapped to [0, 1] and clamped, as the pipeline returns them.

    Args:
        images (`torch.Tensor`): Images on the [-1, 1] scale, of any shape.
    """
    return (images / 2 + 0.5).clamp(0, 1)


def as_paper_scheduler(scheduler) -> DDPMPaperScheduler:
    r"""
    The scheduler itself if it is a [`DDPMPaperScheduler`], else one built from its config: an exported folder names
    a stock `DDPMScheduler` (so that stock diffusers loads it), whose config is the same.

    Args:
        scheduler ([`DDPMPaperScheduler`] or `DDPMScheduler`): The diffusion.
    """
    return scheduler if isinstance(scheduler, DDPMPaperScheduler) else DDPMPaperScheduler.from_config(scheduler.config)


def model_device_and_dtype(unet: torch.nn.Module, images: torch.Tensor) -> tuple[torch.device, torch.dtype]:
    """The device and dtype of the model's parameters; the images' device and float32 for a model without weights."""
    parameter = next(unet.parameters(), None)
    if parameter is None:  # an analytic model without weights
        return images.device, torch.float32
    return parameter.device, parameter.dtype


def image_grid(images: list[PIL.Image.Image], min_width: int = 256) -> PIL.Image.Image:
    """
    The images on a near-square grid (ceil(sqrt(n)) columns, blanks after the last), upscaled by an integer factor
    (nearest neighbour) to at least `min_width` pixels across, so that 8x8 or 32x32 samples stay visible.
    """
    cols = int(np.ceil(np.sqrt(len(images))))
    rows = int(np.ceil(len(images) / cols))
    blank = PIL.Image.new(images[0].mode, images[0].size)
    grid = make_image_grid(list(images) + [blank] * (rows * cols - len(images)), rows=rows, cols=cols)
    if grid.width < min_width:
        scale = int(np.ceil(min_width / grid.width))
        grid = grid.resize((grid.width * scale, grid.height * scale), PIL.Image.NEAREST)
    return grid


def upscale(image: PIL.Image.Image, min_size: int = 256) -> PIL.Image.Image:
    """
    `image` enlarged by the smallest integer factor (nearest neighbour, so pixels stay sharp squares) that makes both
    its sides at least `min_size` pixels: a figure of a few rows of 8x8 images is readable, not a strip 32 px high.
    """
    scale = int(np.ceil(min_size / min(image.size)))
    if scale <= 1:
        return image
    return image.resize((image.width * scale, image.height * scale), PIL.Image.NEAREST)
