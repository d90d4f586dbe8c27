from hub_access.disk_space import DiskFullError

from .export import ModelCardInfo, PublishError
from .pipeline_ddpm_paper import DDPMPaperPipeline, DDPMPaperPipelineOutput
from .utils import image_grid, model_range_to_unit, pixels_to_model_range

__all__ = [
    "DDPMPaperPipeline",
    "DDPMPaperPipelineOutput",
    "DiskFullError",
    "ModelCardInfo",
    "PublishError",
    "image_grid",
    "model_range_to_unit",
    "pixels_to_model_range",
]
