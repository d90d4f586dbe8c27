# Copyright 2026 The ddpm-paper authors. Licensed under the Apache License, Version 2.0.
"""
Export of a [`DDPMPaperPipeline`] as a folder that stock `diffusers.DDPMPipeline` loads, its model card, and
publishing that folder to the Hugging Face Hub; what an export folder is (`check_pipeline_folder`) and its record of
the training data (`read_training_data`), as evaluate_ddpm.py reads them.

The pipeline's `save_pretrained` and `push_to_hub` call these functions; they read the pipeline's `unet` and
`scheduler` and call it for the card's sample grid. A parameterisation DDPMScheduler cannot sample (`mean`
prediction) is exported as a folder of this project's classes instead, and says so (a warning and the card).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import PIL.Image
import torch
from diffusers import DDPMPipeline, DDPMScheduler, DiffusionPipeline
from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData
from huggingface_hub.errors import HfHubHTTPError

from hub_access.atomic_folder import INDEX_NAME, atomic_folder
from hub_access.disk_space import DiskFullError, first_line, format_bytes, free_bytes, is_disk_full
from hub_access.secrets import known_tokens, redact
from schedulers import DIFFUSERS_PREDICTION_TYPES

from .utils import image_grid

if TYPE_CHECKING:
    from .pipeline_ddpm_paper import DDPMPaperPipeline

SAMPLE_GRID_FILE = "samples.png"
TRAINING_DATA_FILE = "training_data.json"
"""What the model was trained on (data source, resolution, channels, bit depth, crop and flip), beside
`model_index.json`; `evaluate_ddpm.py` takes its data flags from it."""
logger = logging.getLogger(__name__)
CARD_TAGS = ["pytorch", "diffusers", "unconditional-image-generation", "ddpm", "ddpm-paper"]

CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ model_name }}

A denoising diffusion probabilistic model ([Ho et al. 2020](https://arxiv.org/abs/2006.11239)) for unconditional
image generation{% if dataset_name %}, trained on [{{ dataset_name }}]({{ dataset_link }}){% endif %}:
{{ resolution }}x{{ resolution }} images with {{ channels }} channel{{ "s" if channels > 1 else "" }}
(PIL mode "{{ pil_mode }}" samples) from {{ data_bits }}-bit data{% if data_bits == 16 %} (`--preserve_input_precision`:
bits/dim count 65,536 levels a value){% endif %},
a `UNet2DModel` of {{ num_parameters }} parameters and {{ num_train_timesteps }} diffusion steps
({{ beta_schedule }} betas, `{{ variance_type }}` variance, `{{ prediction_type }}` prediction).

![Samples]({{ sample_grid }})

## Usage
{% if stock %}
The folder is a stock `diffusers` pipeline:

```python
from diffusers import DDPMPipeline

pipeline = DDPMPipeline.from_pretrained("{{ repo_id }}")
images = pipeline(batch_size=16).images
```
{% else %}
The net predicts `{{ prediction_type }}`, which stock `diffusers.DDPMScheduler` cannot sample: the folder is a
`DDPMPaperPipeline` of the ddpm-paper project (train_ddpm.py), which must be importable to load it:

```python
from pipelines import DDPMPaperPipeline

pipeline = DDPMPaperPipeline.from_pretrained("{{ repo_id }}")
images = pipeline(batch_size=16).images
```

or, through diffusers' loader, with the project's pipeline file (the project still importable):

```python
from diffusers import DiffusionPipeline

pipeline = DiffusionPipeline.from_pretrained(
    "{{ repo_id }}", custom_pipeline="pipelines/pipeline_ddpm_paper.py", trust_remote_code=True
)
```
{% endif %}{% if metrics %}
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
        extra_tags (`list[str]`, defaults to `[]`): Tags added to the card's metadata.
        training_data (`dict`, *optional*): What the model was trained on, written as `training_data.json` and
            under `training_data:` in the card's metadata: public names only (a local folder by its base name).
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
    training_data: dict[str, Any] | None = None


def is_stock_exportable(pipeline: DDPMPaperPipeline) -> bool:
    """Whether stock `DDPMPipeline` can sample the model (every parameterisation but `mean`)."""
    return pipeline.scheduler.config.prediction_type in DIFFUSERS_PREDICTION_TYPES


def to_stock_pipeline(pipeline: DDPMPaperPipeline) -> DDPMPipeline:
    """The same model as a stock `DDPMPipeline` with a `DDPMScheduler` of the same betas."""
    if not is_stock_exportable(pipeline):
        raise ValueError(
            f"DDPMScheduler cannot sample prediction_type={pipeline.scheduler.config.prediction_type!r} (it knows "
            f"{', '.join(DIFFUSERS_PREDICTION_TYPES)}): save the DDPMPaperPipeline itself (its save_pretrained does)."
        )
    scheduler = DDPMScheduler.from_config(pipeline.scheduler.to_diffusers_config())
    return DDPMPipeline(unet=pipeline.unet, scheduler=scheduler)


def save_stock_pipeline(
    pipeline: DDPMPaperPipeline,
    save_directory: str | os.PathLike,
    card: ModelCardInfo | None = None,
    safe_serialization: bool = True,
    repo_id: str | None = None,
    **kwargs,
) -> None:
    """
    Writes a folder that stock `diffusers.DDPMPipeline.from_pretrained` loads where this project is not installed:
    `model_index.json` naming diffusers' classes, `unet/` in safetensors, `scheduler/` as a `DDPMScheduler`
    config (a schedule it lacks as `trained_betas`), and a model card `README.md` with a sample grid. A model whose
    `prediction_type` DDPMScheduler lacks (`mean`) is written as a `DDPMPaperPipeline` folder instead, with a warning
    and a card that says how to load it.

    Args:
        pipeline ([`DDPMPaperPipeline`]): The model to export.
        save_directory (`str` or `os.PathLike`): The folder to write, atomically (`atomic_folder`): other files in
            it stay, and a failure midway leaves the previous export there loadable.
        card ([`ModelCardInfo`], *optional*): Dataset, settings, metrics and samples for the model card.
        safe_serialization (`bool`, defaults to `True`): Must stay `True`: exports are safetensors.
        repo_id (`str`, *optional*): The Hub id shown in the card's usage snippet; the folder's name by default.
        kwargs: Passed to `DDPMPipeline.save_pretrained`.
    """
    if not safe_serialization:
        raise ValueError("Exports are always safetensors; pickled weights are not portable.")
    if kwargs.pop("push_to_hub", False):
        raise ValueError("Use DDPMPaperPipeline.push_to_hub(repo_id, card=...) to publish.")
    save_directory = Path(save_directory)
    try:
        _write_export(pipeline, save_directory, card, repo_id, **kwargs)
    except Exception as error:
        needed = sum(tensor.numel() * tensor.element_size() for tensor in pipeline.unet.state_dict().values())
        if not is_disk_full(error, save_directory, needed):
            raise
        had_export = (save_directory / INDEX_NAME).is_file()
        raise DiskFullError(
            f"The disk holding '{save_directory}' is full: exporting the pipeline failed ({first_line(error)}). The "
            f"partial export was removed; {format_bytes(free_bytes(save_directory))} are free, and an export needs "
            f"about {format_bytes(needed)} (the weights) plus its model card. "
            + ("The previous export there is untouched." if had_export else "There was no export there before.")
        ) from error


def _write_export(
    pipeline: DDPMPaperPipeline, save_directory: Path, card: ModelCardInfo | None, repo_id: str | None, **kwargs
) -> None:
    with atomic_folder(save_directory) as folder:  # killed midway: the previous export stays loadable
        if is_stock_exportable(pipeline):
            to_stock_pipeline(pipeline).save_pretrained(folder, safe_serialization=True, **kwargs)
        else:
            logger.warning(
                "Stock diffusers cannot sample prediction_type=%r: %s is exported as a DDPMPaperPipeline folder, "
                "which DDPMPaperPipeline.from_pretrained loads (with this project importable), not a stock "
                "DDPMPipeline one.",
                pipeline.scheduler.config.prediction_type,
                save_directory,
            )
            DiffusionPipeline.save_pretrained(pipeline, folder, safe_serialization=True, **kwargs)
        card = card or ModelCardInfo()
        write_model_card(pipeline, folder, card, repo_id or save_directory.name)
        if card.training_data is not None:
            (folder / TRAINING_DATA_FILE).write_text(json.dumps(card.training_data, indent=2) + "\n")
    if card.training_data is None:  # a record left by an earlier export would describe other data
        (save_directory / TRAINING_DATA_FILE).unlink(missing_ok=True)


class EvaluationInputError(ValueError):
    """The export, or what is passed with it to evaluate it (data flags against its record, flags against its model),
    cannot give a meaningful evaluation; the message says what to pass instead."""


CHECKPOINT_NAME = re.compile(r"checkpoint-\d+")
"""A training checkpoint's folder in a run, as `checkpoints.verify` names them (`CHECKPOINT_PREFIX` and the step);
the room of the export cannot import it."""
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def check_pipeline_folder(pipeline: str) -> None:
    """
    Fails with a message that says what to pass when `--pipeline` names no exported pipeline: a missing folder, a
    training checkpoint (`checkpoint-N`), or a training output folder that holds checkpoints but no export yet.
    A name of the form `user/name` that is not a local folder is left to the Hub.

    Raises:
        `EvaluationInputError`: the message names the export to pass, or says to let training finish.
    """
    path = Path(pipeline).expanduser()
    if (path / INDEX_NAME).is_file():
        return
    if not path.exists():
        local = pipeline.startswith((".", "~", os.sep)) or Path(path.parts[0]).exists()  # e.g. ddpm-output/typo
        if _HUB_ID.fullmatch(pipeline) and not local:
            return
        raise EvaluationInputError(f"--pipeline {pipeline}: no such folder (a Hub model id has the form user/name).")
    if not path.is_dir():
        raise EvaluationInputError(f"--pipeline {pipeline} is a file, not an exported pipeline folder.")
    if not _is_checkpoint(path) and not any(_is_checkpoint(child) for child in path.iterdir()):
        raise EvaluationInputError(
            f"--pipeline {pipeline} has no {INDEX_NAME}: it is not an exported pipeline (train_ddpm.py exports one "
            "into its --output_dir)."
        )
    run = path.parent if _is_checkpoint(path) else path
    run_name = str(run) if path.is_absolute() else os.path.normpath(os.path.relpath(run))
    finish = (
        f"let train_ddpm.py finish (its flags with --output_dir {run_name} --resume_from_checkpoint latest), which "
        f"exports into {run_name}"
    )
    if run == path:
        raise EvaluationInputError(
            f"--pipeline {pipeline} holds training checkpoints but no export yet (no {INDEX_NAME}): {finish}, then "
            "pass it again."
        )
    what = f"--pipeline {pipeline} is a training checkpoint, not an exported pipeline"
    if (run / INDEX_NAME).is_file():
        raise EvaluationInputError(f"{what}: pass --pipeline {run_name}, the export of its run.")
    raise EvaluationInputError(
        f"{what}, and its run's folder {run_name} has no export yet: {finish}, then pass --pipeline {run_name}."
    )


def _is_checkpoint(path: Path) -> bool:
    return path.is_dir() and CHECKPOINT_NAME.fullmatch(path.name) is not None


class TrainingDataError(ValueError):
    """An export's `training_data.json` is not a record train_ddpm.py writes; the message names it and what to do."""


TRAINING_DATA_FIELDS: dict[str, tuple[type, ...]] = {
    "source": (str,),
    "dataset_name": (str, type(None)),
    "dataset_config_name": (str, type(None)),
    "train_data_dir": (str, type(None)),
    "image_column": (str, type(None)),
    "split": (str,),
    "resolution": (int,),
    "channels": (int,),
    "bit_depth": (int,),
    "center_crop": (bool,),
    "random_flip": (bool,),
    "held_out_images": (int,),
    "num_images": (int, type(None)),
    "fingerprint": (str, type(None)),
}
"""The type of each field of the record a reader relies on (a field absent from an older record is not checked)."""
TRAINING_DATA_VALUES: dict[str, tuple] = {
    "source": ("embedded-digits", "hub-dataset", "local-dataset", "image-folder"),
    "channels": (1, 3, 4),
    "bit_depth": (8, 16),
}
"""The only values some fields can take."""


def read_training_data(pipeline: str | os.PathLike) -> dict[str, Any] | None:
    """
    The `training_data.json` record of an export: a local folder's, or a Hub model's (None when the Hub cannot be
    reached). None for an export written without one (before the record existed, or not by train_ddpm.py).

    Raises:
        `TrainingDataError`: the file is not JSON, not an object, or a field has the wrong type or value.
    """
    path = Path(pipeline) / TRAINING_DATA_FILE
    if path.is_file():
        return parse_training_data(path.read_text(), str(path))
    if Path(pipeline).exists():
        return None
    from huggingface_hub import hf_hub_download

    try:
        text = Path(hf_hub_download(str(pipeline), TRAINING_DATA_FILE)).read_text()
    except Exception as error:  # no such file, repo or network: evaluate with the flags' own defaults
        logger.info("No %s for %s (%s: %s)", TRAINING_DATA_FILE, pipeline, type(error).__name__, error)
        return None
    return parse_training_data(text, f"{TRAINING_DATA_FILE} of {pipeline}")


def parse_training_data(text: str, name: str) -> dict[str, Any]:
    """
    The record in `text`, checked field by field (`TRAINING_DATA_FIELDS`); `name` is the file as errors name it.

    Raises:
        `TrainingDataError`: one line naming the file, the problem, and what to do.
    """
    what_to_do = (
        "Delete it and pass the data flags (--dataset_name or --train_data_dir, --num_channels, ...) explicitly, or "
        "export the model again with train_ddpm.py."
    )
    try:
        record = json.loads(text)
    except ValueError as error:  # JSONDecodeError, and undecodable bytes
        raise TrainingDataError(f"{name} is not valid JSON ({error}): {what_to_do}") from error
    if not isinstance(record, dict):
        raise TrainingDataError(f"{name} holds a JSON {type(record).__name__}, not an object: {what_to_do}")
    for key, types in TRAINING_DATA_FIELDS.items():
        if key not in record:
            continue
        value = record[key]
        wrong_type = not isinstance(value, types) or (isinstance(value, bool) and bool not in types)
        if wrong_type or (key in TRAINING_DATA_VALUES and value not in TRAINING_DATA_VALUES[key]):
            expected = " or ".join("null" if kind is type(None) else kind.__name__ for kind in types)
            if key in TRAINING_DATA_VALUES:
                expected = "one of " + ", ".join(json.dumps(choice) for choice in TRAINING_DATA_VALUES[key])
            raise TrainingDataError(f"{name}: {key!r} is {json.dumps(value)}, not {expected}: {what_to_do}")
        if isinstance(value, int) and not isinstance(value, bool) and value < 0:
            raise TrainingDataError(f"{name}: {key!r} is {value}, not a count (0 or more): {what_to_do}")
    return record


def write_model_card(pipeline: DDPMPaperPipeline, save_directory: Path, card: ModelCardInfo, repo_id: str) -> None:
    """
    Writes `README.md` (the card: metadata, description, usage, metrics, training settings) and its sample grid.

    Args:
        pipeline ([`DDPMPaperPipeline`]): The model; it draws the samples when `card.sample_images` is absent.
        save_directory (`Path`): The export folder.
        card ([`ModelCardInfo`]): What the card says beyond the pipeline's own config.
        repo_id (`str`): The model's name and the id in the usage snippet.
    """
    images = card.sample_images
    if images is None:
        generator = torch.Generator(device="cpu").manual_seed(0)
        steps = card.num_inference_steps or pipeline.scheduler.config.num_train_timesteps
        images = pipeline(batch_size=card.num_samples, generator=generator, num_inference_steps=steps).images
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
        training_data=card.training_data,
    )
    config = pipeline.scheduler.config
    unet = pipeline.unet
    model_card = ModelCard.from_template(
        card_data,
        template_str=CARD_TEMPLATE,
        model_name=repo_id,
        repo_id=repo_id,
        dataset_name=card.dataset_name,
        dataset_link=f"https://huggingface.co/datasets/{card.dataset_name}" if is_hub_dataset else card.dataset_name,
        resolution=unet.config.sample_size,
        channels=unet.config.in_channels,
        pil_mode={1: "L", 3: "RGB", 4: "RGBA"}.get(unet.config.in_channels, "?"),
        data_bits=16 if (card.training_args or {}).get("preserve_input_precision") else 8,
        num_parameters=f"{sum(p.numel() for p in unet.parameters()):,}",
        num_train_timesteps=config.num_train_timesteps,
        beta_schedule=config.beta_schedule if config.trained_betas is None else "custom",
        variance_type=config.variance_type,
        prediction_type=config.prediction_type,
        stock=is_stock_exportable(pipeline),
        sample_grid=SAMPLE_GRID_FILE,
        metrics=card.metrics,
        command=card.command,
        training_args=card.training_args,
    )
    model_card.save(save_directory / "README.md")


def push_to_hub(
    pipeline: DDPMPaperPipeline,
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

    Args:
        pipeline ([`DDPMPaperPipeline`]): The model to publish.
        repo_id (`str`): The Hub repo, `"user/name"` or a bare `"name"` in the token's namespace.
        card ([`ModelCardInfo`], *optional*): What the model card says (see [`save_stock_pipeline`]).
        commit_message (`str`, *optional*): Defaults to `"Upload DDPM pipeline"`.
        private (`bool`, *optional*): Create the repo as private (an existing repo keeps its visibility).
        token (`str`, *optional*): A Hub token with write access.
        create_pr (`bool`, defaults to `False`): Open a pull request instead of committing to main.
        kwargs: Passed to [`save_stock_pipeline`].

    Returns:
        `str`: The URL of the commit.
    """
    api = HfApi(token=token)
    repo_id = create_hub_repo(repo_id, private=private, token=token)  # the full id goes into the card's snippet
    with tempfile.TemporaryDirectory() as folder:
        save_stock_pipeline(pipeline, folder, card=card, repo_id=repo_id, **kwargs)
        with _publish_errors(repo_id, token):
            commit = api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                commit_message=commit_message or "Upload DDPM pipeline",
                create_pr=create_pr,
            )
    return commit.commit_url


def create_hub_repo(repo_id: str, private: bool | None = None, token: str | None = None) -> str:
    """
    Creates the Hub model repo `repo_id` if missing (an existing one is kept as it is) and returns its full id
    (`user/name` for a bare `name`). train_ddpm.py calls it before training, as train_unconditional.py does, so that
    no token, no write access or no network fails in seconds rather than after the run. Raises [`PublishError`].
    """
    with _publish_errors(repo_id, token):
        return HfApi(token=token).create_repo(repo_id, private=private, exist_ok=True).repo_id


@contextlib.contextmanager
def _publish_errors(repo_id: str, token: str | None):
    """Turns what a Hub call raises into a [`PublishError`] that says why, with the token redacted."""
    try:
        yield
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else None
        raise PublishError(
            f"Publishing to the Hub repo {repo_id!r} failed (HTTP {status}): "
            f"{error.server_message or redact(str(error), [token or '', *known_tokens()])}."
            f"{_HTTP_HINTS.get(status, '')} "
            "Nothing local was changed; publish again once this is fixed."
        ) from None
    except Exception as error:  # network and offline errors come from several libraries
        raise PublishError(
            f"Publishing to the Hub repo {repo_id!r} failed: {type(error).__name__}: "
            f"{redact(str(error), [token or '', *known_tokens()])}. Check the network and HF_ENDPOINT / "
            "HF_HUB_OFFLINE; nothing local was changed."
        ) from None


_HTTP_HINTS = {
    401: " Check the token (--hub_token, HF_TOKEN or `hf auth login`).",
    403: " The token has no write access to that namespace.",
}
