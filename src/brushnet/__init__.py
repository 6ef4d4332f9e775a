"""BrushNet inpainting (Ju et al., ECCV 2024) on stock diffusers.

Names are imported on first use, so `brushnet --help` and other light uses do not pay for
importing diffusers.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "BrushNetModel": ".models",
    "BrushNetOutput": ".models",
    "brushnet_residuals": ".models",
    "unet_forward": ".models",
    "StableDiffusionBrushNetPipeline": ".pipelines",
    "StableDiffusionXLBrushNetPipeline": ".pipelines",
    "StableDiffusionPowerPaintPipeline": ".pipelines",
    "blend": ".pipelines",
    "load_brushnet": ".loading",
    "load_pipeline": ".loading",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'brushnet' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
