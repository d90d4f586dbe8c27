from .scheduling_ddpm_paper import (
    BETA_SCHEDULES,
    VARIANCE_TYPES,
    DDPMPaperMeanVarianceOutput,
    DDPMPaperScheduler,
    DDPMPaperSchedulerOutput,
    DDPMPaperVLBOutput,
)

__all__ = [
    "BETA_SCHEDULES",
    "VARIANCE_TYPES",
    "DDPMPaperMeanVarianceOutput",
    "DDPMPaperScheduler",
    "DDPMPaperSchedulerOutput",
    "DDPMPaperVLBOutput",
]
