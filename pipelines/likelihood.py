# Copyright 2026 The ddpm-paper authors. Licensed under the Apache License, Version 2.0.
"""The likelihood evaluations of Ho et al. 2020 over a trained noise predictor: `bits_per_dim` (the bound of Eq. 5,
Table 2, over all T terms or estimated without bias from K), `respaced_bits_per_dim` (the bound of a K-step respaced
chain) and `rate_distortion` (Sec. 4.3, Fig. 5). Images are floats in [-1, 1]; term t is the paper's L_t (0-based
timesteps); a list of generators, one per image, makes each image's result independent of the batch and process."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from schedulers import DDPMPaperScheduler
from schedulers.scheduling_ddpm_paper import _mean_over_dims, normal_kl

from .utils import as_paper_scheduler, model_device_and_dtype

Generator = torch.Generator | list[torch.Generator] | None


@dataclass
class BitsPerDimOutput(BaseOutput):
    """
    Output of [`bits_per_dim`]; every value is per image, in bits per dimension.

    Args:
        total (`torch.Tensor` of shape `(batch_size,)`):
            The bound L_T + sum_t L_t (Eq. 5): exact sum over all T terms, or the unbiased K-term estimate.
        prior (`torch.Tensor` of shape `(batch_size,)`):
            L_T = KL(q(x_T|x_0) || N(0, I)).
        terms (`torch.Tensor` of shape `(batch_size, num_train_timesteps)`):
            L_t at each 0-based timestep t (t = 0: the decoder NLL); NaN at the timesteps an estimate did not draw.
        pred_original_sample_mse (`torch.Tensor` of shape `(batch_size, num_train_timesteps)`):
            Mean squared error of the model's x_0 prediction from x_t, on the [-1, 1] scale; NaN where not drawn.
        timesteps (`torch.Tensor` of shape `(batch_size, num_timesteps)`):
            The timesteps evaluated for each image (all T of them, descending, for the exact sum).
    """

    total: torch.Tensor
    prior: torch.Tensor
    terms: torch.Tensor
    pred_original_sample_mse: torch.Tensor
    timesteps: torch.Tensor


@dataclass
class RateDistortionOutput(BaseOutput):
    """
    Output of [`rate_distortion`]: the receiver of progressive lossy compression (Sec. 4.3) holds x_t.

    Args:
        timesteps (`torch.Tensor` of shape `(n,)`):
            0-based model timesteps t, descending (the receiver's progress is `num_train_timesteps - t` steps).
        rate (`torch.Tensor` of shape `(n,)`):
            Bits/dim received so far, L_T + sum_{s > t} L_s, averaged over the images (at t = 0 it is the bound
            minus the decoder term L_0, the paper's "rate" of 1.78 bits/dim on CIFAR-10).
        distortion (`torch.Tensor` of shape `(n,)`):
            Root mean squared error of the x_0 predicted from x_t on the [0, 255] scale, over all images and pixels.
    """

    timesteps: torch.Tensor
    rate: torch.Tensor
    distortion: torch.Tensor


def _generator_slice(generator: Generator, batch: slice) -> Generator:
    return generator[batch] if isinstance(generator, list) else generator


def _check_generator(generator: Generator, batch_size: int) -> None:
    if isinstance(generator, list) and len(generator) != batch_size:
        raise ValueError(f"Got {len(generator)} generators for {batch_size} images; pass one per image, or one.")


def exact_head(num_timesteps: int) -> int:
    """
    How many of the K timesteps of an estimate are the first ones, t = 0..k-1, evaluated exactly: K // 2. The bound's
    mass sits there (the decoder L_0 and the first KL terms are orders of magnitude above the rest), so a uniform
    draw that misses or hits them makes a heavy-tailed estimate whose standard error over a few hundred images is far
    too narrow.
    """
    return num_timesteps // 2


def _strata(num_train_timesteps: int, k: int) -> torch.Tensor:
    """
    The K - k + 1 bounds of the strata that split the timesteps k..T-1 (k = `exact_head(K)`, at least 1 for the
    spacing): spaced geometrically, as the terms fall steeply with t (a stratum of equal size near the head would
    weigh a term of 0.2 bits/dim and one of 0.005 alike), each stratum at least one timestep wide; K = T gives
    strata of one timestep each, the exact sum.
    """
    head, draws = exact_head(k), k - exact_head(k)
    start = max(head, 1)
    bounds = [head]
    for j in range(1, draws + 1):
        geometric = round(start * (num_train_timesteps / start) ** (j / draws))
        bounds.append(min(max(geometric, bounds[-1] + 1), num_train_timesteps - (draws - j)))
    return torch.tensor(bounds)


def _draw_timesteps(generator: Generator, batch_size: int, num_train_timesteps: int, k: int) -> torch.Tensor:
    """
    K distinct timesteps per image: t = 0..k-1 (k = `exact_head(K)`), then one uniform draw in each of the K - k
    strata (`_strata`) that split k..T-1. Term t of stratum j is drawn with probability 1 / n_j (n_j its size).
    """
    head, draws = exact_head(k), k - exact_head(k)
    if isinstance(generator, list):
        uniform = torch.stack(
            [torch.rand(draws, generator=g, device=g.device, dtype=torch.float64).cpu() for g in generator]
        )
    else:
        device = generator.device if generator is not None else "cpu"
        uniform = torch.rand(batch_size, draws, generator=generator, device=device, dtype=torch.float64).cpu()
    bounds = _strata(num_train_timesteps, k)
    sizes = bounds.diff()
    drawn = bounds[:-1] + (uniform * sizes).floor().long().clamp(max=sizes - 1)
    return torch.cat([torch.arange(head).expand(batch_size, head), drawn], dim=1)


def _timestep_weights(num_train_timesteps: int, k: int) -> torch.Tensor:
    """The weight of each of the K terms of an estimate (the columns of `_draw_timesteps`): 1 for the exact head, the
    stratum's size for each stratified draw, so that the weighted sum is an unbiased estimate of the sum of all T."""
    head = exact_head(k)
    return torch.cat([torch.ones(head, dtype=torch.float64), _strata(num_train_timesteps, k).diff().double()])


@torch.no_grad()
def bits_per_dim(
    unet: torch.nn.Module,
    scheduler: DDPMPaperScheduler,
    images: torch.Tensor,
    *,
    num_timesteps: int | None = None,
    generator: Generator = None,
    batch_size: int | None = None,
    clip_denoised: bool = True,
    bits: int = 8,
) -> BitsPerDimOutput:
    r"""
    The negative log-likelihood bound of Eq. 5 in bits/dim, L_T + sum_{t>1} L_{t-1} + L_0 (Sec. 3.3, Table 2).

    Each term draws its own x_t ~ q(x_t|x_0) (Eq. 4) and costs one model call; L_T needs none. The model runs in its
    own device and dtype, the terms are computed in float32.

    Args:
        unet (`torch.nn.Module`):
            The noise predictor: `unet(x_t, t).sample`, with t a tensor of 0-based timesteps of shape (B,). For the
            learned variance types it outputs 2C channels (the scheduler splits them).
        scheduler ([`DDPMPaperScheduler`]):
            The diffusion; a `DDPMScheduler` is converted through its config.
        images (`torch.Tensor` of shape `(batch_size, channels, height, width)`):
            Data x_0 in [-1, 1], 8-bit values (the decoder integrates over bins of width 2/255).
        num_timesteps (`int`, *optional*):
            `None`: sum all T terms. K: an unbiased estimate of the sum from K terms per image (independently for
            every image): the first `exact_head(K)` = K // 2 terms exactly (t = 0, 1, ...: where the bound's mass
            sits), and one term drawn uniformly from each of K - K // 2 strata that split the rest (geometrically spaced),
            weighted by its stratum's size. The spread of the per-image estimates is then a fair error bar: a uniform
            draw of K terms makes rare huge values (whenever it hits t = 0) that a few hundred images mostly miss.
        generator (`torch.Generator` or `list[torch.Generator]`, *optional*):
            Source of the timesteps and of the noise; one per image makes each image's result independent of the
            batching and of the process split.
        batch_size (`int`, *optional*):
            Images per model call; all at once by default.
        clip_denoised (`bool`, defaults to `True`):
            Clip the predicted x_0 as the scheduler's sampler does (`clip_sample` / `thresholding` of its config), so
            the bound is that of the model `step` samples from; the paper's reported bits/dim are computed this way.
            `False` gives `scheduler.vlb_terms` exactly (Eq. 11 unclipped).
        bits (`int`, defaults to 8):
            The data's bit depth: the decoder L_0 integrates over bins of width 2/(2^bits - 1) (16: 65,536 levels).

    Returns:
        [`BitsPerDimOutput`]: per-image `total`, `prior`, `terms`, `pred_original_sample_mse` and `timesteps`.
    """
    scheduler = as_paper_scheduler(scheduler)
    num_images = images.shape[0]
    T = scheduler.config.num_train_timesteps
    _check_generator(generator, num_images)
    if num_timesteps is None:
        timesteps = torch.arange(T - 1, -1, -1).expand(num_images, T)
    elif not 0 < num_timesteps <= T:
        raise ValueError(f"num_timesteps must be between 1 and num_train_timesteps={T}, got {num_timesteps}.")
    else:
        timesteps = _draw_timesteps(generator, num_images, T, num_timesteps)
    device, dtype = model_device_and_dtype(unet, images)
    x0 = images.to(device=device, dtype=torch.float32)
    batch_size = batch_size or num_images

    num_drawn = timesteps.shape[1]
    drawn_terms = torch.empty(num_images, num_drawn)
    drawn_mse = torch.empty(num_images, num_drawn)
    # Timesteps outer, images inner: every image consumes its generator in the same order whatever the batching.
    for k in range(num_drawn):
        for start in range(0, num_images, batch_size):
            batch = slice(start, start + batch_size)
            t = timesteps[batch, k].to(device)
            noise = randn_tensor(
                x0[batch].shape, generator=_generator_slice(generator, batch), device=device, dtype=torch.float32
            )
            xt = scheduler.add_noise(x0[batch], noise, t)  # x_t ~ q(x_t|x_0), Eq. 4
            model_output = unet(xt.to(dtype), t).sample.float()
            vlb = scheduler.vlb_terms(model_output, x0[batch], xt, t, clip_denoised=clip_denoised, bits=bits)
            drawn_terms[batch, k] = vlb.bpd.cpu()
            drawn_mse[batch, k] = _mean_over_dims((vlb.pred_original_sample - x0[batch]) ** 2).cpu()

    prior = scheduler.prior_bpd(x0).cpu()  # L_T
    if num_timesteps is None:
        total = prior + drawn_terms.sum(dim=1)
    else:  # the exact head plus each stratum's draw times its size: unbiased for the sum of all T terms
        weights = _timestep_weights(T, num_timesteps)
        total = prior + (drawn_terms.double() * weights).sum(dim=1).float()
    terms = torch.full((num_images, T), float("nan")).scatter_(1, timesteps, drawn_terms)
    mse = torch.full((num_images, T), float("nan")).scatter_(1, timesteps, drawn_mse)
    return BitsPerDimOutput(
        total=total, prior=prior, terms=terms, pred_original_sample_mse=mse, timesteps=timesteps.clone()
    )


def rate_distortion_curve(
    bpd: BitsPerDimOutput, timesteps: Sequence[int] | torch.Tensor | None = None
) -> RateDistortionOutput:
    r"""
    Rate and distortion of progressive lossy compression (Sec. 4.3, Fig. 5) from an exact [`bits_per_dim`] output.

    Args:
        bpd ([`BitsPerDimOutput`]):
            Computed over all T terms (`num_timesteps=None`).
        timesteps (`Sequence[int]`, *optional*):
            0-based timesteps to report, all of them by default; returned in descending order.
    """
    if torch.isnan(bpd.terms).any():
        raise ValueError("rate_distortion_curve needs every term: compute bits_per_dim with num_timesteps=None.")
    T = bpd.terms.shape[1]
    timesteps = torch.arange(T) if timesteps is None else torch.as_tensor(timesteps, dtype=torch.long).flatten()
    timesteps = timesteps.sort(descending=True).values
    # Bits received once x_t is known: L_T, then L_{T-1}, ..., L_{t+1} (0-based terms s > t).
    received_after = bpd.terms.flip(1).cumsum(1).flip(1) - bpd.terms  # [:, t] = sum_{s > t} L_s
    rate = (bpd.prior[:, None] + received_after).mean(dim=0)
    distortion = bpd.pred_original_sample_mse.mean(dim=0).sqrt() * 127.5  # RMSE on the [0, 255] scale
    return RateDistortionOutput(timesteps=timesteps, rate=rate[timesteps], distortion=distortion[timesteps])


@torch.no_grad()
def rate_distortion(
    unet: torch.nn.Module,
    scheduler: DDPMPaperScheduler,
    images: torch.Tensor,
    *,
    timesteps: Sequence[int] | torch.Tensor | None = None,
    generator: Generator = None,
    batch_size: int | None = None,
    clip_denoised: bool = True,
) -> RateDistortionOutput:
    r"""
    Progressive lossy compression (Sec. 4.3, Fig. 5, Table 4): rate in bits/dim against distortion, the RMSE on the
    [0, 255] scale of the x_0 predicted from x_t, at each timestep t.

    Runs [`bits_per_dim`] over all T terms (T model calls per image) and reads the curve off it with
    [`rate_distortion_curve`]; the arguments are those of `bits_per_dim`, plus `timesteps` (the 0-based timesteps
    to report, all by default).
    """
    bpd = bits_per_dim(
        unet, scheduler, images, generator=generator, batch_size=batch_size, clip_denoised=clip_denoised
    )
    return rate_distortion_curve(bpd, timesteps)


@torch.no_grad()
def respaced_bits_per_dim(
    unet: torch.nn.Module,
    scheduler: DDPMPaperScheduler,
    images: torch.Tensor,
    num_inference_steps: int,
    *,
    generator: Generator = None,
    batch_size: int | None = None,
    clip_denoised: bool = True,
    bits: int = 8,
) -> torch.Tensor:
    r"""
    The bound of Eq. 5 in bits/dim of the K-step model that respaced ancestral sampling draws from: K timesteps
    evenly spaced from T-1 down to 0 (improved-diffusion's respacing, `timestep_spacing="linspace"`), each step a
    Gaussian whose betas are 1 - abar_t / abar_s (Nichol & Dhariwal 2021, Appendix). That chain is a diffusion of its
    own, so the sum L_{t_K} + sum_k KL(q(x_s|x_t,x_0) || p_theta(x_s|x_t)) + L_0 is a valid bound on the likelihood
    of the respaced model; K = T gives [`bits_per_dim`]'s exact sum.

    Args:
        unet, images, generator, batch_size, clip_denoised, bits: as for [`bits_per_dim`].
        scheduler ([`DDPMPaperScheduler`]): The diffusion; a copy is respaced, the one given is left as it is.
        num_inference_steps (`int`): K, the steps of the respaced chain (one model call per step and image).

    Returns:
        `torch.Tensor` of shape `(batch_size,)`: the bound per image, in bits/dim.
    """
    scheduler = DDPMPaperScheduler.from_config(as_paper_scheduler(scheduler).config, timestep_spacing="linspace")
    scheduler.set_timesteps(num_inference_steps)
    chain = scheduler.timesteps.tolist()
    num_images = images.shape[0]
    _check_generator(generator, num_images)
    device, dtype = model_device_and_dtype(unet, images)
    x0 = images.to(device=device, dtype=torch.float32)
    batch_size = batch_size or num_images
    total = torch.zeros(num_images, dtype=torch.float64)
    for t in chain:  # timesteps outer, images inner: each image's generator is consumed alike whatever the batching
        for start in range(0, num_images, batch_size):
            batch = slice(start, start + batch_size)
            steps = torch.full((x0[batch].shape[0],), t, device=device, dtype=torch.long)
            noise = randn_tensor(
                x0[batch].shape, generator=_generator_slice(generator, batch), device=device, dtype=torch.float32
            )
            xt = scheduler.add_noise(x0[batch], noise, steps)  # x_t ~ q(x_t|x_0), Eq. 4
            model_output = unet(xt.to(dtype), steps).sample.float()
            vlb = scheduler.vlb_terms(
                model_output, x0[batch], xt, steps, clip_denoised=clip_denoised, bits=bits, chain="respaced"
            )
            total[batch] += vlb.bpd.double().cpu()
    # L_T of the respaced chain: KL(q(x_{t_K}|x_0) || N(0, I)) at its first timestep (T-1 with this spacing)
    mean, _, log_variance = scheduler.q_mean_variance(x0, chain[0])
    zeros = torch.zeros_like(mean)
    prior = _mean_over_dims(normal_kl(mean, log_variance, zeros, zeros)) / math.log(2.0)
    return (total + prior.double().cpu()).float()
