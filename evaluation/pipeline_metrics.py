# Copyright 2026 The ddpm-paper authors. Licensed under the Apache License, Version 2.0.
"""
The scalar metrics of a trained DDPM, as Ho et al. 2020 report them: bits/dim on dataset images (Table 2) and the
quality of generated samples (FID, KID, precision/recall, Inception Score), split across the processes of an `Accelerator`.

`evaluate(pipeline, images, ...)` is called by `evaluate_ddpm.py` (which adds the plots) and by `train_ddpm.py`
during training. Every image and sample draws from its own random stream, so the numbers do not depend on the batch
size or on the number of processes.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch

from pipelines import DDPMPaperPipeline, pixels_to_model_range
from pipelines.likelihood import bits_per_dim

from .features import extract_features, extract_logits, load_feature_extractor
from .sample_quality import inception_score, reference_features, sample_quality_metrics

BPD_STREAM, SAMPLE_STREAM = 0, 1  # independent random streams per image (bits/dim) and per sample (generation)


def stream_generators(seed: int, stream: int, indices: range) -> list[torch.Generator]:
    """One CPU generator per image index, seeded from (seed, stream, index): results do not depend on batching."""
    seeds = [int(np.random.SeedSequence([seed, stream, i]).generate_state(1, np.uint64)[0] >> 1) for i in indices]
    return [torch.Generator(device="cpu").manual_seed(s) for s in seeds]


def as_pixels(images, count: int | None) -> torch.Tensor:
    """
    The first `count` images (all if None) as uint8 (N, C, H, W), from a tensor or a `preprocess_images` dataset;
    uint16 images (a cache built with `preserve_input_precision`) stay uint16.
    """
    count = len(images) if count is None else min(count, len(images))
    pixels = images[:count] if isinstance(images, torch.Tensor) else images[:count]["pixels"]
    if isinstance(pixels, list):
        pixels = torch.stack([torch.as_tensor(p) for p in pixels])
    return pixels if pixels.dtype == torch.uint16 else pixels.to(torch.uint8)


def model_range_and_bits(pixels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """uint8 or uint16 images in [-1, 1], and their bit depth (the decoder's bins: 2/255 or 2/65535)."""
    if pixels.dtype == torch.uint16:
        return pixels.to(torch.float32) / 32767.5 - 1.0, 16
    return pixels_to_model_range(pixels), 8


def _as_8_bit(pixels: torch.Tensor) -> torch.Tensor:
    """uint16 images as uint8, round(value * 255 / 65535) (what the feature networks and samples are compared in)."""
    if pixels.dtype != torch.uint16:
        return pixels
    return ((pixels.to(torch.int32) * 255 + 32767) // 65535).to(torch.uint8)


def _shard(count: int, accelerator) -> tuple[range, list[int]]:
    """This process's contiguous share of `count` items and every process's share size."""
    processes = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0
    bounds = [count * r // processes for r in range(processes + 1)]
    return range(bounds[rank], bounds[rank + 1]), [bounds[r + 1] - bounds[r] for r in range(processes)]


def _gather(tensor: torch.Tensor, accelerator, sizes: list[int]) -> torch.Tensor:
    """Concatenate every process's `tensor` (of `sizes[rank]` rows) in rank order."""
    if accelerator is None or accelerator.num_processes == 1:
        return tensor
    padded = accelerator.pad_across_processes(tensor.to(accelerator.device), dim=0)
    gathered = accelerator.gather(padded).cpu()
    rows = gathered.shape[0] // accelerator.num_processes
    return torch.cat([gathered[r * rows : r * rows + size] for r, size in enumerate(sizes)])


@contextlib.contextmanager
def _eval_mode(module: torch.nn.Module):
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def _generate(
    pipeline: DDPMPaperPipeline,
    indices: range,
    *,
    seed: int,
    num_inference_steps: int,
    batch_size: int,
    show_progress: bool,
    sampler=None,
    eta: float = 0.0,
) -> torch.Tensor:
    """Samples number `indices` (each from its own generator) as uint8 (N, C, H, W)."""
    batches = []
    for start in range(indices.start, indices.stop, batch_size):
        batch = range(start, min(start + batch_size, indices.stop))
        images = pipeline(
            batch_size=len(batch),
            generator=stream_generators(seed, SAMPLE_STREAM, batch),
            num_inference_steps=num_inference_steps,
            output_type="pt",
            show_progress=show_progress,
            sampler=sampler,
            eta=eta,
        ).images
        batches.append((images * 255).round().to(torch.uint8).cpu())
    unet = pipeline.unet.config
    return torch.cat(batches) if batches else torch.empty(0, unet.in_channels, *(unet.sample_size,) * 2).byte()


def evaluate(
    pipeline: DDPMPaperPipeline,
    images,
    *,
    num_images: int = 256,
    bpd_timesteps: int | None = None,
    num_samples: int = 1000,
    num_inference_steps: int | None = None,
    feature_extractor: str | torch.nn.Module = "digits",
    num_reference_images: int | None = None,
    dataset_id: str = "images",
    batch_size: int = 256,
    seed: int = 0,
    accelerator=None,
    show_progress: bool = False,
    sampler=None,
    eta: float = 0.0,
) -> dict[str, float]:
    r"""
    The scalar metrics of a DDPM: bits/dim on dataset images and sample quality of generated images.

    Args:
        pipeline ([`DDPMPaperPipeline`]):
            The model, on its device (EMA weights if those are evaluated); its UNet is in eval mode during the call.
        images (`torch.Tensor` or `datasets.Dataset`):
            Real images, uint8 (N, C, H, W), or the (non-streaming) output of `image_data.pixels.preprocess_images`.
            uint16 images (`preserve_input_precision`) get bits/dim over 65,536 levels a value (decoder bins of
            2/65535) and are compared with the samples, for FID and the like, as 8-bit images.
        num_images (`int`, defaults to 256):
            How many of them (the first ones) get their bits/dim computed; 0 skips bits/dim.
        bpd_timesteps (`int`, *optional*):
            K: the unbiased K-term estimate of the bound per image (K model calls per image); None or 0: all T terms.
        num_samples (`int`, defaults to 1000):
            Samples generated for FID, KID and precision/recall; 0 skips them.
        num_inference_steps (`int`, *optional*):
            Sampling steps; the full chain of T steps by default.
        feature_extractor (`str` or `torch.nn.Module`, defaults to `"digits"`):
            `"digits"`, `"inception"` (see `evaluation.features`) or a module mapping uint8 images to features.
        num_reference_images (`int`, *optional*):
            How many real images (the first ones) the samples are compared with; all by default. Their features are
            cached (see `evaluation.reference_features`).
        dataset_id (`str`, defaults to `"images"`):
            The dataset's name in the reference-feature cache.
        batch_size (`int`, defaults to 256):
            Images per model call.
        seed (`int`, defaults to 0):
            Seed of the noise of the bound, of the samples and of KID's subsets.
        accelerator (`accelerate.Accelerator`, *optional*):
            Split the images and samples across its processes; every process returns the same dict. Call it on every
            process.
        show_progress (`bool`, defaults to `False`):
            Show the sampling progress bars.
        sampler (`SchedulerMixin`, *optional*):
            The scheduler the samples are drawn with (`pipelines.samplers.make_sampler`); the pipeline's own DDPM
            scheduler by default. Bits/dim is always the pipeline's scheduler's bound.
        eta (`float`, defaults to 0.0):
            DDIM's eta, when `sampler` is DDIM.

    Returns:
        `dict[str, float]`: `bits_per_dim`, `bits_per_dim_stderr` (standard error over images, which includes the
        timestep sampling of an estimate), `prior_bpd` (L_T), `fid`, `kid_mean`, `kid_std`, `precision`, `recall`,
        `inception_score`, `inception_score_std` (mean and standard deviation over 10 splits; with an extractor that
        has a `logits` classifier head), `num_images`, `num_samples` (keys of skipped parts are absent).
    """
    unet = pipeline.unet
    T = pipeline.scheduler.config.num_train_timesteps
    metrics: dict[str, float] = {}
    with _eval_mode(unet):  # evaluate runs inside the training loop: no dropout here, training mode restored after
        if num_images > 0:
            data = as_pixels(images, num_images)
            indices, sizes = _shard(data.shape[0], accelerator)
            x0, bits = model_range_and_bits(data[indices.start : indices.stop])
            output = bits_per_dim(
                unet,
                pipeline.scheduler,
                x0,
                bits=bits,
                num_timesteps=bpd_timesteps or None,
                generator=stream_generators(seed, BPD_STREAM, indices),
                batch_size=batch_size,
            )
            total = _gather(output.total, accelerator, sizes).double()
            prior = _gather(output.prior, accelerator, sizes).double()
            stderr = total.std().item() / math.sqrt(total.numel()) if total.numel() > 1 else float("nan")
            metrics.update(
                bits_per_dim=total.mean().item(),
                bits_per_dim_stderr=stderr,
                prior_bpd=prior.mean().item(),
                num_images=total.numel(),
            )

        if num_samples > 0:
            extractor = (
                load_feature_extractor(feature_extractor) if isinstance(feature_extractor, str) else feature_extractor
            )
            extractor_name = (
                feature_extractor if isinstance(feature_extractor, str) else type(feature_extractor).__name__
            )
            extractor.to(unet.device)
            indices, sizes = _shard(num_samples, accelerator)
            samples = _generate(
                pipeline,
                indices,
                seed=seed,
                num_inference_steps=num_inference_steps or T,
                batch_size=batch_size,
                show_progress=show_progress,
                sampler=sampler,
                eta=eta,
            )
            fake = _gather(extract_features(extractor, samples, batch_size), accelerator, sizes)
            real_images = _as_8_bit(as_pixels(images, num_reference_images))
            # With several processes the main one fills the reference cache first and the others read it.
            first = accelerator.main_process_first() if accelerator is not None else contextlib.nullcontext()
            with first:
                real = reference_features(
                    extractor, real_images, extractor_name=extractor_name, dataset_id=dataset_id, batch_size=batch_size
                )
            metrics.update(
                sample_quality_metrics(real, fake, seed=seed, device=unet.device), num_samples=fake.shape[0]
            )
            logits = extract_logits(extractor, samples, batch_size)
            if logits is not None:  # an extractor with a classifier head: the Inception Score of the samples
                score, score_std = inception_score(_gather(logits, accelerator, sizes))
                metrics.update(inception_score=score, inception_score_std=score_std)
    return metrics


def reference_id(dataset_name: str | None, train_data_dir: str | None, config_name: str | None, split: str) -> str:
    """The name under which a dataset split's reference features are cached (shared by both scripts)."""
    return f"{dataset_name or train_data_dir or 'digits'}-{config_name or ''}-{split}"
