from .blending import blend
from .pipeline_powerpaint import StableDiffusionPowerPaintPipeline
from .pipeline_sd import StableDiffusionBrushNetPipeline
from .pipeline_sdxl import StableDiffusionXLBrushNetPipeline

__all__ = [
    "StableDiffusionBrushNetPipeline",
    "StableDiffusionPowerPaintPipeline",
    "StableDiffusionXLBrushNetPipeline",
    "blend",
]
