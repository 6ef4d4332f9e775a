"""Inpainting masks without painting: clicks and boxes through SAM, words through an open-vocabulary
detector whose boxes SAM turns into masks. White (255) = the region to fill, as everywhere here.

Names are imported on first use, so the command line can describe these options (their defaults
live in `defaults`) without importing torch.
"""

import importlib

from .defaults import BOX_THRESHOLD, TEXT_THRESHOLD

_EXPORTS = {
    "Detector": ".detection",
    "split_phrases": ".detection",
    "Prompt": ".sam",
    "Segmenter": ".sam",
    "NothingFound": ".select",
    "build_prompts": ".select",
    "select_mask": ".select",
}
__all__ = ["BOX_THRESHOLD", "TEXT_THRESHOLD", *_EXPORTS]


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value
