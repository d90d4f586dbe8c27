from .scheduling_ddpm_paper import DDPMPaperScheduler, DDPMPaperSchedulerOutput

__all__ = ["DDPMPaperScheduler", "DDPMPaperSchedulerOutput"]
