from .blending import blend
from .pipeline_sd import StableDiffusionBrushNetPipeline
from .pipeline_sdxl import StableDiffusionXLBrushNetPipeline

__all__ = ["StableDiffusionBrushNetPipeline", "StableDiffusionXLBrushNetPipeline", "blend"]
