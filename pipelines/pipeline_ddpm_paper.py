# Copyright 2026 The ddpm-paper authors. Licensed under the Apache License, Version 2.0.
"""Sampling (Algorithm 2), progressive generation, and a portable export of a DDPM (Ho et al. 2020)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import DDPMPipeline, DDPMScheduler, DiffusionPipeline, UNet2DModel
from diffusers.utils import BaseOutput, make_image_grid
from diffusers.utils.torch_utils import randn_tensor
from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData
from huggingface_hub.errors import HfHubHTTPError

from pipelines.atomic_folder import atomic_folder
from schedulers import DDPMPaperScheduler

SAMPLE_GRID_FILE = "samples.png"
CARD_TAGS = ["pytorch", "diffusers", "unconditional-image-generation", "ddpm", "ddpm-paper"]

CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ model_name }}

A denoising diffusion probabilistic model ([Ho et al. 2020](https://arxiv.org/abs/2006.11239)) for unconditional
image generation{% if dataset_name %}, trained on [{{ dataset_name }}]({{ dataset_link }}){% endif %}:
{{ resolution }}x{{ resolution }} images with {{ channels }} channel{{ "s" if channels > 1 else "" }},
a `UNet2DModel` of {{ num_parameters }} parameters and {{ num_train_timesteps }} diffusion steps
({{ beta_schedule }} betas, `{{ variance_type }}` variance, `{{ prediction_type }}` prediction).

![Samples]({{ sample_grid }})

## Usage

The folder is a stock `diffusers` pipeline:

```python
from diffusers import DDPMPipeline

pipeline = DDPMPipeline.from_pretrained("{{ repo_id }}")
images = pipeline(batch_size=16).images
```
{% if metrics %}
## Evaluation

| metric | value |
| --- | --- |
{% for name, value in metrics.items() %}| {{ name }} | {{ value }} |
{% endfor %}{% endif %}{% if command or training_args %}
## Training
{% if command %}
```bash
{{ command }}
```
{% endif %}{% if training_args %}
| setting | value |
| --- | --- |
{% for name, value in training_args.items() %}| `{{ name }}` | `{{ value }}` |
{% endfor %}{% endif %}{% endif %}"""


class PublishError(RuntimeError):
    """Publishing to the Hub failed; the message says why, and the local export is left as it was."""


@dataclass
class ModelCardInfo:
    """
    What the model card of an export says beyond what the pipeline itself knows.

    Args:
        dataset_name (`str`, *optional*): The dataset's Hub id or local name (linked when it is a Hub id).
        training_args (`dict`, *optional*): The resolved training settings, shown as a table.
        metrics (`dict`, *optional*): Evaluation results, e.g. `{"bits_per_dim": 3.75, "fid": 3.17}`.
        sample_images (`list[PIL.Image.Image]`, *optional*): Samples for the grid; drawn at export when absent.
        command (`str`, *optional*): The command line that trained the model.
        license (`str`, defaults to `"apache-2.0"`): The license in the card's metadata.
        num_samples (`int`, defaults to 16): How many samples to draw when `sample_images` is absent.
        num_inference_steps (`int`, *optional*): Steps for those samples (defaults to the full chain).
    """

    dataset_name: str | None = None
    training_args: dict[str, Any] | None = None
    metrics: dict[str, float] | None = None
    sample_images: list[PIL.Image.Image] | None = None
    command: str | None = None
    license: str = "apache-2.0"
    num_samples: int = 16
    num_inference_steps: int | None = None
    extra_tags: list[str] = field(default_factory=list)


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


def _to_unit_range(x: torch.Tensor) -> torch.Tensor:
    return (x / 2 + 0.5).clamp(0, 1)


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
        if not isinstance(scheduler, DDPMPaperScheduler):
            # An exported folder names DDPMScheduler (so stock diffusers loads it); the config is the same.
            scheduler = DDPMPaperScheduler.from_config(scheduler.config)
        self.register_modules(unet=unet, scheduler=scheduler)

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
        """
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}.")
        config = self.unet.config
        size = config.sample_size if isinstance(config.sample_size, (tuple, list)) else (config.sample_size,) * 2
        shape = (batch_size, config.in_channels, *size)
        device = self._execution_device
        image = randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)

        self.scheduler.set_timesteps(num_inference_steps)
        timesteps = self.scheduler.timesteps.tolist()  # plain ints: no device sync per step
        every = trajectory_every or max(1, len(timesteps) // 10)
        snapshots, snapshot_timesteps = [], []
        for i, t in enumerate(self._progress(timesteps, show_progress)):
            model_output = self.unet(image, t).sample  # eps_theta(x_t, t)
            step = self.scheduler.step(model_output, t, image, generator=generator)
            image = step.prev_sample  # x_{t-1} = mu_theta + sigma_t z (Algorithm 2, line 4)
            if return_x0_trajectory and (i % every == 0 or i == len(timesteps) - 1):
                snapshots.append(_to_unit_range(step.pred_original_sample.float()).cpu())
                snapshot_timesteps.append(t)

        image = _to_unit_range(image)
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

    # The paper's evaluations (Sec. 3.3 and 4.3) -----------------------------------------------------------------------
    def bits_per_dim(self, images: torch.Tensor, **kwargs):
        """The negative log-likelihood bound L_T + sum L_{t-1} + L_0 in bits/dim (Table 2); see `likelihood`."""
        from . import likelihood

        return likelihood.bits_per_dim(self.unet, self.scheduler, images, **kwargs)

    def rate_distortion(self, images: torch.Tensor, **kwargs):
        """Rate (bits/dim) against distortion (RMSE on [0, 255]) of progressive lossy compression (Fig. 5)."""
        from . import likelihood

        return likelihood.rate_distortion(self.unet, self.scheduler, images, **kwargs)

    def interpolate(self, image_a: torch.Tensor, image_b: torch.Tensor, **kwargs) -> torch.Tensor:
        """Interpolation in x_t, decoded by the reverse process (Sec. 4.3, Fig. 8)."""
        from . import likelihood

        return likelihood.interpolate(self.unet, self.scheduler, image_a, image_b, **kwargs)

    # Portable export ------------------------------------------------------------------------------------------------
    def to_stock_pipeline(self) -> DDPMPipeline:
        """The same model as a stock `DDPMPipeline` with a `DDPMScheduler` of the same betas."""
        return DDPMPipeline(unet=self.unet, scheduler=DDPMScheduler.from_config(self.scheduler.to_diffusers_config()))

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        card: ModelCardInfo | None = None,
        safe_serialization: bool = True,
        repo_id: str | None = None,
        **kwargs,
    ) -> None:
        """
        Writes a folder that stock `diffusers.DDPMPipeline.from_pretrained` loads where this project is not installed:
        `model_index.json` naming diffusers' classes, `unet/` in safetensors, `scheduler/` as a `DDPMScheduler`
        config (a schedule it lacks as `trained_betas`), and a model card `README.md` with a sample grid.

        Args:
            save_directory (`str` or `os.PathLike`): The folder to write, atomically (`atomic_folder`): other files
                in it stay, and a failure midway leaves the previous export there loadable.
            card ([`ModelCardInfo`], *optional*): Dataset, settings, metrics and samples for the model card.
            safe_serialization (`bool`, defaults to `True`): Must stay `True`: exports are safetensors.
            repo_id (`str`, *optional*): The Hub id shown in the card's usage snippet.
        """
        if not safe_serialization:
            raise ValueError("Exports are always safetensors; pickled weights are not portable.")
        if kwargs.pop("push_to_hub", False):
            raise ValueError("Use DDPMPaperPipeline.push_to_hub(repo_id, card=...) to publish.")
        save_directory = Path(save_directory)
        with atomic_folder(save_directory) as folder:  # killed midway: the previous export stays loadable
            self.to_stock_pipeline().save_pretrained(folder, safe_serialization=True, **kwargs)
            self._write_model_card(folder, card or ModelCardInfo(), repo_id or save_directory.name)

    def _write_model_card(self, save_directory: Path, card: ModelCardInfo, repo_id: str) -> None:
        images = card.sample_images
        if images is None:
            generator = torch.Generator(device="cpu").manual_seed(0)
            steps = card.num_inference_steps or self.scheduler.config.num_train_timesteps
            images = self(batch_size=card.num_samples, generator=generator, num_inference_steps=steps).images
        image_grid(images).save(save_directory / SAMPLE_GRID_FILE)

        is_hub_dataset = card.dataset_name is not None and not os.path.exists(card.dataset_name)
        eval_results = None
        if card.metrics:
            eval_results = [
                EvalResult(
                    task_type="unconditional-image-generation",
                    dataset_type=card.dataset_name or "unknown",
                    dataset_name=card.dataset_name or "unknown",
                    metric_type=name,
                    metric_value=value,
                )
                for name, value in card.metrics.items()
            ]
        card_data = ModelCardData(
            library_name="diffusers",
            license=card.license,
            tags=CARD_TAGS + list(card.extra_tags),
            datasets=[card.dataset_name] if is_hub_dataset else None,
            pipeline_tag="unconditional-image-generation",
            model_name=repo_id,
            eval_results=eval_results,
        )
        config = self.scheduler.config
        model_card = ModelCard.from_template(
            card_data,
            template_str=CARD_TEMPLATE,
            model_name=repo_id,
            repo_id=repo_id,
            dataset_name=card.dataset_name,
            dataset_link=f"https://huggingface.co/datasets/{card.dataset_name}"
            if is_hub_dataset
            else card.dataset_name,
            resolution=self.unet.config.sample_size,
            channels=self.unet.config.in_channels,
            num_parameters=f"{sum(p.numel() for p in self.unet.parameters()):,}",
            num_train_timesteps=config.num_train_timesteps,
            beta_schedule=config.beta_schedule if config.trained_betas is None else "custom",
            variance_type=config.variance_type,
            prediction_type=config.prediction_type,
            sample_grid=SAMPLE_GRID_FILE,
            metrics=card.metrics,
            command=card.command,
            training_args=card.training_args,
        )
        model_card.save(save_directory / "README.md")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> DDPMPaperPipeline:
        """Loads an exported folder or Hub repo (a stock DDPMPipeline layout) with [`DDPMPaperScheduler`]."""
        stock = DDPMPipeline.from_pretrained(pretrained_model_name_or_path, **kwargs)
        return cls(unet=stock.unet, scheduler=DDPMPaperScheduler.from_config(stock.scheduler.config))

    def push_to_hub(
        self,
        repo_id: str,
        card: ModelCardInfo | None = None,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | None = None,
        create_pr: bool = False,
        **kwargs,
    ) -> str:
        """
        Exports to a temporary folder and uploads it with `huggingface_hub`: creates the repo if missing, then one
        commit. The token comes from `token` or the usual places (`HF_TOKEN`, `hf auth login`) and is never printed.
        A failure raises [`PublishError`] saying why; nothing local is touched.

        Returns:
            `str`: The URL of the commit.
        """
        api = HfApi(token=token)
        with _publish_errors(repo_id, token):
            # The full id ("user/name" for a bare "name") goes into the card's usage snippet.
            repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, card=card, repo_id=repo_id, **kwargs)
            with _publish_errors(repo_id, token):
                commit = api.upload_folder(
                    repo_id=repo_id,
                    folder_path=folder,
                    commit_message=commit_message or "Upload DDPM pipeline",
                    create_pr=create_pr,
                )
        return commit.commit_url


@contextlib.contextmanager
def _publish_errors(repo_id: str, token: str | None):
    """Turns what a Hub call raises into a [`PublishError`] that says why, with the token redacted."""
    try:
        yield
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else None
        raise PublishError(
            f"Publishing to the Hub repo {repo_id!r} failed (HTTP {status}): "
            f"{error.server_message or _redact(str(error), token)}.{_HTTP_HINTS.get(status, '')} "
            "Nothing local was changed; publish again once this is fixed."
        ) from None
    except Exception as error:  # network and offline errors come from several libraries
        raise PublishError(
            f"Publishing to the Hub repo {repo_id!r} failed: {type(error).__name__}: "
            f"{_redact(str(error), token)}. Check the network and HF_ENDPOINT / HF_HUB_OFFLINE; nothing local was "
            "changed."
        ) from None


_HTTP_HINTS = {
    401: " Check the token (--hub_token, HF_TOKEN or `hf auth login`).",
    403: " The token has no write access to that namespace.",
}


def _redact(message: str, token: str | None) -> str:
    return message.replace(token, "***") if token else message
