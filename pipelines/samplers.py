# Copyright 2026 The ddpm-paper authors. Licensed under the Apache License, Version 2.0.
"""
The samplers a trained DDPM can be drawn with in fewer steps: the paper's ancestral sampler on a respaced chain, and
diffusers' schedulers built with `.from_config` from the export's scheduler config (their math is theirs, not
copied here). `docs/sampling.md` says which to take at which step count, measured by `benchmarks/sampling.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from schedulers import DDPMPaperScheduler

ALL_PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


@dataclass(frozen=True)
class Sampler:
    """A scheduler class, the config values it overrides, and the prediction types its `step` can sample."""

    scheduler_class: type[SchedulerMixin]
    overrides: dict = field(default_factory=dict)
    prediction_types: tuple[str, ...] = ALL_PREDICTION_TYPES


SAMPLERS: dict[str, Sampler] = {
    # Ancestral sampling (Algorithm 2) on the chain the export's `timestep_spacing` gives (DDPMScheduler's default,
    # `leading`: 10 steps of 1000 start at t = 900, not 999).
    "ddpm": Sampler(DDPMPaperScheduler, prediction_types=(*ALL_PREDICTION_TYPES, "mean")),
    # The same on improved-diffusion's respacing: K timesteps evenly spaced from T-1 down to 0 (both ends kept).
    "ddpm-respaced": Sampler(
        DDPMPaperScheduler, {"timestep_spacing": "linspace"}, prediction_types=(*ALL_PREDICTION_TYPES, "mean")
    ),
    "ddim": Sampler(DDIMScheduler),  # Song et al. 2021; `eta` 0 is deterministic, 1 is DDPM-like
    # Lu et al. 2022, multistep, second order
    "dpmsolver++": Sampler(DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
    "pndm": Sampler(PNDMScheduler, {"skip_prk_steps": True}, ("epsilon", "v_prediction")),  # PLMS, Liu et al. 2022
    "euler": Sampler(EulerDiscreteScheduler),  # Karras et al. 2022, Algorithm 1 (deterministic)
    "euler-ancestral": Sampler(EulerAncestralDiscreteScheduler, prediction_types=("epsilon", "v_prediction")),
    "heun": Sampler(HeunDiscreteScheduler),  # Karras et al. 2022, 2nd order: two model calls a step
    "unipc": Sampler(UniPCMultistepScheduler),  # Zhao et al. 2023
}
"""The values of `evaluate_ddpm.py --scheduler`."""


class SamplerError(ValueError):
    """The sampler cannot sample this model; the message names the sampler, the prediction type and those that can."""


def samplers_for(prediction_type: str) -> list[str]:
    """The names of the samplers that can sample a model of `prediction_type`."""
    return [name for name, sampler in SAMPLERS.items() if prediction_type in sampler.prediction_types]


def check_sampler(name: str, prediction_type: str) -> None:
    """Fails when sampler `name` cannot sample a model of `prediction_type`, naming those that can."""
    if name not in SAMPLERS:
        raise SamplerError(f"Unknown sampler {name!r}: choose one of {', '.join(SAMPLERS)}.")
    if prediction_type not in SAMPLERS[name].prediction_types:
        raise SamplerError(
            f"--scheduler {name} cannot sample a model with prediction_type={prediction_type!r}; the schedulers "
            f"that can: {', '.join(samplers_for(prediction_type))}."
        )


def make_sampler(name: str, config) -> SchedulerMixin:
    """
    Sampler `name` built with `.from_config` from a DDPM scheduler config (an export's `scheduler/`), with its
    overrides; the same betas, T and prediction type.

    Raises:
        `SamplerError`: the sampler cannot sample the config's `prediction_type`.
    """
    prediction_type = config.get("prediction_type", "epsilon")
    check_sampler(name, prediction_type)
    sampler = SAMPLERS[name]
    return sampler.scheduler_class.from_config(config, **sampler.overrides)


def is_ddpm_sampler(scheduler: SchedulerMixin) -> bool:
    """Whether `scheduler` is the paper's ancestral sampler, which reads the learned variance channels itself."""
    return isinstance(scheduler, DDPMPaperScheduler)
