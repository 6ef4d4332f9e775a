"""BrushNet training data: BrushData webdataset shards, custom image folders, and the reference
trainer's per-sample recipe (mask choice, opening, inversion, resize, crop).

Items are dicts {"pixel_values", "conditioning_pixel_values", "masks", "caption", "original_size",
"crop_top_left"} (the last two: SDXL's size conditioning); tokenizing the
caption is left to the trainer (SD1.5 and SDXL differ). `collate` batches them.
"""

import torch

from .brushdata import BrushDataShards
from .folder import ImageFolderDataset
from .pack import pack_folder
from .transforms import INVERSION_PROBABILITY, OPENING_PROBABILITY, training_sample

__all__ = [
    "BrushDataShards",
    "ImageFolderDataset",
    "pack_folder",
    "training_sample",
    "collate",
    "OPENING_PROBABILITY",
    "INVERSION_PROBABILITY",
]


def collate(examples: list[dict]) -> dict:
    """A batch: tensors stacked (contiguous float), everything else (the captions) as lists."""
    if not examples:
        raise ValueError("Cannot collate an empty list of examples.")
    batch = {}
    for key in examples[0]:
        values = [example[key] for example in examples]
        if isinstance(values[0], torch.Tensor):
            batch[key] = torch.stack(values).contiguous()
        else:
            batch[key] = values
    return batch
