"""BrushNet inpainting (Ju et al., ECCV 2024) on stock diffusers."""

from .models import BrushNetModel, BrushNetOutput, brushnet_residuals, unet_forward
from .pipelines import StableDiffusionBrushNetPipeline, StableDiffusionXLBrushNetPipeline, blend

__version__ = "0.1.0"
__all__ = [
    "BrushNetModel",
    "BrushNetOutput",
    "StableDiffusionBrushNetPipeline",
    "StableDiffusionXLBrushNetPipeline",
    "blend",
    "brushnet_residuals",
    "unet_forward",
]
