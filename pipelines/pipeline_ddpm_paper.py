# Copyright 2026 The ddpm-paper authors. Licensed under the Apache License, Version 2.0.
"""Sampling (Algorithm 2) and progressive generation of a DDPM (Ho et al. 2020); the export lives in `export.py`."""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers import DDPMPipeline, DiffusionPipeline, UNet2DModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

# Absolute, unlike the other modules here: diffusers' `custom_pipeline=<this file>` copies this one file and imports it.
from pipelines import export, interpolation, likelihood
from pipelines.export import ModelCardInfo
from pipelines.utils import as_paper_scheduler, model_range_to_unit
from schedulers import DDPMPaperScheduler


@dataclass
class DDPMPaperPipelineOutput(BaseOutput):
    """
    Output of [`DDPMPaperPipeline`].

    Args:
        images (`list[PIL.Image.Image]`, `np.ndarray` or `torch.Tensor`):
            The samples, in [0, 1] for "np" and "pt".
        x0_trajectory (`torch.Tensor` of shape `(num_snapshots, batch_size, channels, height, width)`, *optional*):
            The predicted x_0 in [0, 1] at `trajectory_timesteps`: the paper's progressive generation (Fig. 6).
        trajectory_timesteps (`list[int]`, *optional*):
            The timestep of each snapshot.
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    x0_trajectory: torch.Tensor | None = None
    trajectory_timesteps: list[int] | None = None


class DDPMPaperPipeline(DiffusionPipeline):
    r"""
    Ancestral sampling of a DDPM (Algorithm 2 of Ho et al. 2020) with [`DDPMPaperScheduler`], the paper's likelihood
    evaluations, and an export that stock `diffusers.DDPMPipeline` loads.

    Args:
        unet ([`UNet2DModel`]): The noise predictor eps_theta(x_t, t).
        scheduler ([`DDPMPaperScheduler`]): The diffusion; a `DDPMScheduler` is converted through its config.
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet: UNet2DModel, scheduler: DDPMPaperScheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=as_paper_scheduler(scheduler))

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int = 1000,
        output_type: str = "pil",
        return_dict: bool = True,
        return_x0_trajectory: bool = False,
        trajectory_every: int | None = None,
        show_progress: bool | None = None,
        sampler: SchedulerMixin | None = None,
        eta: float = 0.0,
    ) -> DDPMPaperPipelineOutput | tuple:
        r"""
        Draws samples with Algorithm 2: x_T ~ N(0, I), then x_{t-1} ~ p_theta(x_{t-1}|x_t) down to x_0.

        Args:
            batch_size (`int`, defaults to 1): How many images to generate.
            generator (`torch.Generator`, *optional*): Makes sampling deterministic; consumed as `DDPMPipeline` does.
            num_inference_steps (`int`, defaults to 1000): Steps of the (respaced) reverse chain.
            output_type (`str`, defaults to `"pil"`): `"pil"`, `"np"` (NHWC in [0, 1]) or `"pt"` (NCHW in [0, 1]).
            return_dict (`bool`, defaults to `True`): Return a [`DDPMPaperPipelineOutput`] instead of a tuple.
            return_x0_trajectory (`bool`, defaults to `False`):
                Also return the predicted x_0 every `trajectory_every` steps (progressive generation, Fig. 6).
            trajectory_every (`int`, *optional*): Snapshot spacing in steps; defaults to a tenth of the chain.
            show_progress (`bool`, *optional*): Show the progress bar (default: as `set_progress_bar_config` says).
            sampler (`SchedulerMixin`, *optional*):
                Another scheduler to sample with, built from this one's config (`pipelines.samplers.make_sampler`):
                DDIM, DPM-Solver++, ... Samplers other than DDPM get the model's prediction without its variance
                channels (a learned-variance model is sampled with their own variances).
            eta (`float`, defaults to 0.0): DDIM's eta (0: deterministic, 1: DDPM's sigma); other samplers ignore it.
        """
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}.")
        config = self.unet.config
        size = config.sample_size if isinstance(config.sample_size, (tuple, list)) else (config.sample_size,) * 2
        shape = (batch_size, config.in_channels, *size)
        device = self._execution_device
        image = randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)

        scheduler = self.scheduler if sampler is None else sampler
        scheduler.set_timesteps(num_inference_steps, device=device)
        ancestral = isinstance(scheduler, DDPMPaperScheduler)  # the paper's sampler (any respacing), or diffusers' one
        step_kwargs = {"generator": generator}
        if not ancestral:  # diffusers' samplers: their initial noise scale, DDIM's eta, a generator if they draw
            if return_x0_trajectory:
                raise ValueError("return_x0_trajectory needs a DDPMPaperScheduler sampler (or none).")
            image = image * scheduler.init_noise_sigma
            accepted = inspect.signature(scheduler.step).parameters
            step_kwargs = {name: value for name, value in (("generator", generator), ("eta", eta)) if name in accepted}
        # Plain ints for ours (no device sync per step); diffusers' samplers look their (float) timesteps up as given.
        timesteps = scheduler.timesteps.tolist() if ancestral else scheduler.timesteps
        every = trajectory_every or max(1, len(timesteps) // 10)
        snapshots, snapshot_timesteps = [], []
        for i, t in enumerate(self._progress(timesteps, show_progress)):
            model_input = image if ancestral else scheduler.scale_model_input(image, t)
            model_output = self.unet(model_input, t).sample  # eps_theta(x_t, t)
            if not ancestral:  # they read no variance channels
                model_output = model_output[:, : config.in_channels]
            step = scheduler.step(model_output, t, image, **step_kwargs)
            image = step.prev_sample  # x_{t-1} = mu_theta + sigma_t z (Algorithm 2, line 4)
            if return_x0_trajectory and (i % every == 0 or i == len(timesteps) - 1):
                snapshots.append(model_range_to_unit(step.pred_original_sample.float()).cpu())
                snapshot_timesteps.append(t)

        image = model_range_to_unit(image)
        if output_type != "pt":
            image = image.float().cpu().permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                image = self.numpy_to_pil(image)
        self.maybe_free_model_hooks()
        trajectory = torch.stack(snapshots) if snapshots else None
        if not return_dict:
            return (image, trajectory) if return_x0_trajectory else (image,)
        return DDPMPaperPipelineOutput(
            images=image,
            x0_trajectory=trajectory,
            trajectory_timesteps=snapshot_timesteps if return_x0_trajectory else None,
        )

    def _progress(self, timesteps: list[int], show_progress: bool | None):
        """The progress bar; `show_progress` overrides `set_progress_bar_config(disable=...)` for this call only."""
        default = getattr(self, "_progress_bar_config", {})
        if show_progress is not None:
            self._progress_bar_config = {**default, "disable": not show_progress}
        try:
            return self.progress_bar(timesteps)
        finally:
            self._progress_bar_config = default

    # The paper's evaluations (Sec. 3.3 and 4.3): likelihood.py, interpolation.py -------------------------------------
    def bits_per_dim(self, images: torch.Tensor, **kwargs):
        """The negative log-likelihood bound L_T + sum L_{t-1} + L_0 in bits/dim (Table 2); see `likelihood`."""
        return likelihood.bits_per_dim(self.unet, self.scheduler, images, **kwargs)

    def rate_distortion(self, images: torch.Tensor, **kwargs):
        """Rate (bits/dim) against distortion (RMSE on [0, 255]) of progressive lossy compression (Fig. 5)."""
        return likelihood.rate_distortion(self.unet, self.scheduler, images, **kwargs)

    def interpolate(self, image_a: torch.Tensor, image_b: torch.Tensor, **kwargs) -> torch.Tensor:
        """Interpolation in x_t, decoded by the reverse process (Sec. 4.3, Fig. 8)."""
        return interpolation.interpolate(self.unet, self.scheduler, image_a, image_b, **kwargs)

    # Loading, and the export in export.py ----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> DDPMPaperPipeline:
        """Loads an exported folder or Hub repo (a stock DDPMPipeline layout) with [`DDPMPaperScheduler`]."""
        stock = DDPMPipeline.from_pretrained(pretrained_model_name_or_path, **kwargs)
        return cls(unet=stock.unet, scheduler=stock.scheduler)

    def to_stock_pipeline(self) -> DDPMPipeline:
        """The same model as a stock `DDPMPipeline` with a `DDPMScheduler` of the same betas."""
        return export.to_stock_pipeline(self)

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        card: ModelCardInfo | None = None,
        repo_id: str | None = None,
        **kwargs,
    ) -> None:
        """Writes a folder that stock `DDPMPipeline` loads, with a model card: [`export.save_stock_pipeline`]."""
        export.save_stock_pipeline(self, save_directory, card=card, repo_id=repo_id, **kwargs)

    def push_to_hub(self, repo_id: str, card: ModelCardInfo | None = None, **kwargs) -> str:
        """Exports and uploads to the Hub repo `repo_id`, returns the commit URL: see [`export.push_to_hub`]."""
        return export.push_to_hub(self, repo_id, card=card, **kwargs)
