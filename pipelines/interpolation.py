# Copyright 2026 The ddpm-paper authors. Licensed under the Apache License, Version 2.0.
"""
Interpolation of two images through the diffusion (Ho et al. 2020, Sec. 4.3, Figs. 8 and 9): encode both with
q(x_t|x_0), mix linearly in x_t, decode with the reverse process.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers.utils.torch_utils import randn_tensor

from schedulers import DDPMPaperScheduler

from .utils import model_device_and_dtype


def _clone_generator(generator: torch.Generator) -> torch.Generator:
    clone = torch.Generator(device=generator.device)
    clone.set_state(generator.get_state())
    return clone


@torch.no_grad()
def interpolate(
    unet: torch.nn.Module,
    scheduler: DDPMPaperScheduler,
    image_a: torch.Tensor,
    image_b: torch.Tensor,
    *,
    t: int,
    lambdas: Sequence[float] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    r"""
    Interpolation of two images through the diffusion (Sec. 4.3, Fig. 8): encode both with q(x_t|x_0) and the same
    noise, mix x_t = (1 - lambda) x_t^a + lambda x_t^b, and decode with the reverse process from t down to 0.

    Every lambda is decoded with the same reverse-process noise (copies of one generator state), so the images differ
    only through lambda.

    Args:
        unet (`torch.nn.Module`): The noise predictor, `unet(x_t, t).sample`.
        scheduler ([`DDPMPaperScheduler`] or `DDPMScheduler`): The diffusion; it is not modified.
        image_a, image_b (`torch.Tensor` of shape `(channels, height, width)` or `(1, channels, height, width)`):
            The two images, in [-1, 1].
        t (`int`): The 0-based timestep to encode to; the paper's Fig. 8 uses 500 steps of 1000 (t = 499).
        lambdas (`Sequence[float]`, defaults to 0, 0.1, ..., 1): The mixing weights of `image_b`.
        generator (`torch.Generator`, *optional*): Draws the encoding noise, then (continued) the decoding noise.

    Returns:
        `torch.Tensor` of shape `(len(lambdas), channels, height, width)`: the decoded images in [-1, 1].
    """
    T = scheduler.config.num_train_timesteps
    if not 0 <= t < T:
        raise ValueError(f"t must be a 0-based timestep below num_train_timesteps={T}, got {t}.")
    device, dtype = model_device_and_dtype(unet, image_a)
    pair = torch.stack([image_a.reshape(image_a.shape[-3:]), image_b.reshape(image_b.shape[-3:])])
    pair = pair.to(device=device, dtype=torch.float32)
    if generator is None:
        generator = torch.Generator(device="cpu")
        generator.seed()

    # 1. Encode both images with the same draw of q(x_t|x_0) (Eq. 4).
    noise = randn_tensor((1, *pair.shape[1:]), generator=generator, device=device, dtype=torch.float32)
    xt = scheduler.add_noise(pair, noise.expand_as(pair), torch.full((2,), t, device=device, dtype=torch.long))
    # 2. Mix linearly in x_t.
    weights = torch.as_tensor(lambdas, dtype=torch.float32, device=device).view(-1, 1, 1, 1)
    sample = (1 - weights) * xt[0] + weights * xt[1]
    # 3. Decode with the full reverse chain t, t-1, ..., 0 (Algorithm 2 from x_t), the same noise for every lambda.
    decoder = scheduler.__class__.from_config(scheduler.config)  # leaves the caller's sampling chain alone
    decoder.set_timesteps(timesteps=list(range(t, -1, -1)))
    generators = [_clone_generator(generator) for _ in range(len(lambdas))]
    for step_t in decoder.timesteps.tolist():
        model_output = unet(sample.to(dtype), step_t).sample.float()
        sample = decoder.step(model_output, step_t, sample, generator=generators).prev_sample
    return sample.clamp(-1.0, 1.0)
