from .brushnet import BrushNetModel, BrushNetOutput
from .injection import brushnet_residuals, count_residuals, unet_forward

__all__ = ["BrushNetModel", "BrushNetOutput", "brushnet_residuals", "count_residuals", "unet_forward"]
