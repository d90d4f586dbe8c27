from .pipeline_ddpm_paper import (
    DDPMPaperPipeline,
    DDPMPaperPipelineOutput,
    ModelCardInfo,
    PublishError,
)

__all__ = ["DDPMPaperPipeline", "DDPMPaperPipelineOutput", "ModelCardInfo", "PublishError"]
