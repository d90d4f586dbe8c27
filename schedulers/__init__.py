from .scheduling_ddpm_paper import (
    BETA_SCHEDULES,
    DIFFUSERS_PREDICTION_TYPES,
    PREDICTION_TYPES,
    VARIANCE_TYPES,
    DDPMPaperMeanVarianceOutput,
    DDPMPaperScheduler,
    DDPMPaperSchedulerOutput,
    DDPMPaperVLBOutput,
)

__all__ = [
    "BETA_SCHEDULES",
    "DIFFUSERS_PREDICTION_TYPES",
    "PREDICTION_TYPES",
    "VARIANCE_TYPES",
    "DDPMPaperMeanVarianceOutput",
    "DDPMPaperScheduler",
    "DDPMPaperSchedulerOutput",
    "DDPMPaperVLBOutput",
]
