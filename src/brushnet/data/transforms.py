"""One BrushNet training sample from an image, a mask and a caption: the reference recipe.

The steps follow the authors' trainer (`MyWebDataset.__call__` in train_brushnet.py):

1. choose the mask, as "keep" (1 = keep, 0 = hole): a random brush stroke mask (keep = 1 - brush)
   with `random_mask`, else one of the segmentation masks picked at random (the object is kept),
   else all ones;
2. with probability OPENING_PROBABILITY, a morphological opening with an 8x8 square (OpenCV's
   erode then dilate, same anchor);
3. masked image = image * keep; with probability INVERSION_PROBABILITY swap the two regions:
   masked image = image * (1 - keep), keep = 1 - keep (so a segmented object is the hole half
   of the time);
4. resize so the shorter side is `resolution`, bicubic, image, masked image and mask alike;
5. a random `resolution` x `resolution` crop, at the same place for all three;
6. tensors in the trainer's scale: images x / 127.5 - 1 in (3, R, R), mask (1, R, R) float.

Resizing uses torch's bicubic interpolation (a = -0.75, half-pixel centres, no antialiasing),
which is the kernel of OpenCV's INTER_CUBIC used by the reference (pixel values agree to 1/255).
The reference's arrays are uint8 except for the random-brush mask, which is float32 until an
opening makes it uint8 again; cv2.resize rounds and saturates uint8 results, so a segmentation
mask stays exactly 0/1 after resizing while a random-brush mask (not opened) comes out soft, with
bicubic overshoot, and so does its masked image. That is reproduced here (`quantize_like_reference`).

All randomness comes from the `numpy.random.Generator` passed in.
"""

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from ..arguments import check_choice
from ..masks import random_brush_mask, rle_decode
from .mask_mix import (
    DRAWN_INVERSION_PROBABILITY,
    DRAWN_WEIGHTS,
    HOLE_CAPTION_PROBABILITY,
    MASK_MIXES,
    OBJECT_KINDS,
    drawn_hole,
    scaled_brush_mask,
    scaled_opening_kernel,
)

OPENING_PROBABILITY = 0.3
"""Probability of the morphological opening of the mask (reference: `random.random() < 0.3`)."""
INVERSION_PROBABILITY = 0.5
"""Probability of swapping kept region and hole (reference: `random.random() < 0.5`)."""
OPENING_KERNEL = 8
"""Side of the square structuring element of the opening (reference: `np.ones((8, 8))`)."""
RANDOM_BRUSH_MAX_TRIES = 4
"""The reference's `random_brush_gen(4, h, w)`: 0 to 3 strokes."""


def as_generator(rng) -> np.random.Generator:
    """A numpy Generator from a Generator, an int seed or a sequence of ints."""
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None:
        raise ValueError("Pass an explicit numpy.random.Generator or seed: training data never uses a global RNG.")
    return np.random.default_rng(rng)


def choose_caption(caption, rng: np.random.Generator, proportion_empty_prompts: float = 0.0) -> str:
    """"" with probability `proportion_empty_prompts`, else the caption (one at random from a list)."""
    if rng.random() < proportion_empty_prompts:
        return ""
    if isinstance(caption, str):
        return caption
    if isinstance(caption, (list, tuple, np.ndarray)) and len(caption) and all(isinstance(c, str) for c in caption):
        return caption[int(rng.integers(len(caption)))]
    raise ValueError(f"A caption must be a string or a non-empty list of strings; got {type(caption).__name__}.")


def choose_keep(
    height: int,
    width: int,
    rng: np.random.Generator,
    *,
    keep=None,
    random_mask: bool = False,
    segmentation_masks=None,
    mask_mix: str = "reference",
    resolution: int | None = None,
) -> tuple[np.ndarray, bool]:
    """The mask to train on, 1 = keep, as (bool (H, W) array, soft).

    `random_mask` wins (keep = 1 - random brush), then an explicit `keep`, then one of
    `segmentation_masks` at random (each a flat column-major RLE over height x width, or an (H, W)
    array; the object is the kept region), else everything is kept. `soft` is True for the random
    brush, which the reference carries as float32 rather than uint8 (see `quantize_like_reference`).

    `mask_mix` "strokes" and "drawn" (see `mask_mix`, they need the training `resolution`) replace
    that choice: keep = 1 - the mix's hole, the segmentation masks being the objects it draws around.
    """
    check_choice(mask_mix, MASK_MIXES, "mask_mix")
    if mask_mix != "reference":
        if resolution is None:
            raise ValueError(f"mask_mix {mask_mix!r} scales with the training resolution: pass `resolution`.")
        if mask_mix == "strokes":
            return ~scaled_brush_mask(height, width, rng, resolution, max_tries=RANDOM_BRUSH_MAX_TRIES), True
        keep, soft, _, _ = _drawn_keep(height, width, rng, segmentation_masks, resolution)
        return keep, soft
    if random_mask:
        return ~random_brush_mask(height, width, rng, max_tries=RANDOM_BRUSH_MAX_TRIES), True
    if keep is not None:
        return _check_mask(keep, height, width, "keep"), False
    if segmentation_masks is not None and len(segmentation_masks):
        # No draw for a single mask, so one mask given as an array or as a one-RLE list is the same sample.
        index = int(rng.integers(len(segmentation_masks))) if len(segmentation_masks) > 1 else 0
        chosen = segmentation_masks[index]
        if isinstance(chosen, np.ndarray) and chosen.ndim == 2:
            return _check_mask(chosen, height, width, "segmentation mask"), False
        return rle_decode(chosen, height, width, order="F"), False
    return np.ones((height, width), dtype=bool), False


def _drawn_keep(height, width, rng, segmentation_masks, resolution, weights=DRAWN_WEIGHTS):
    """(keep, soft, kind, object index) of one drawn-mix hole."""
    objects = [_object_mask(m, height, width) for m in (segmentation_masks or [])]
    hole, kind, index = drawn_hole(objects, height, width, rng, resolution, weights=weights)
    return ~hole, kind in ("strokes", "background-strokes", "shape+strokes"), kind, index


def hole_caption(kind: str, index: int | None, object_captions, background_caption) -> str | None:
    """The caption that describes a drawn hole of `kind` (None: the image's own caption)."""
    if kind in OBJECT_KINDS and index is not None and object_captions and index < len(object_captions):
        return object_captions[index]
    if kind == "background-strokes" and background_caption:
        return background_caption
    return None


def _object_mask(mask, height: int, width: int) -> np.ndarray:
    if isinstance(mask, np.ndarray) and mask.ndim == 2:
        return _check_mask(mask, height, width, "segmentation mask")
    return rle_decode(mask, height, width, order="F")


def _check_mask(mask, height: int, width: int, what: str) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.shape != (height, width):
        raise ValueError(f"The {what} is {mask.shape} but the image is {(height, width)} (H, W).")
    return mask.astype(bool)


def _window_reduce(mask: np.ndarray, size: int, combine, border: bool) -> np.ndarray:
    """`combine` (np.logical_and / np.logical_or) of a bool mask over the window
    [i - size//2, i + size - 1 - size//2] in both axes, outside the image = `border`.

    That is OpenCV's window for a size x size kernel with its default anchor (size//2, size//2),
    for erode and dilate alike; OpenCV's default border value never changes the result, which a
    border of True (erode) or False (dilate) reproduces.
    """
    before = size // 2
    after = size - 1 - before
    height, width = mask.shape
    padded = np.pad(mask, ((before, after), (before, after)), constant_values=border)
    rows = padded[0:height].copy()
    for k in range(1, size):  # a square window is separable: rows first, then columns
        combine(rows, padded[k : k + height], out=rows)
    out = rows[:, 0:width].copy()
    for k in range(1, size):
        combine(out, rows[:, k : k + width], out=out)
    return out


def open_mask(keep: np.ndarray, size: int = OPENING_KERNEL) -> np.ndarray:
    """Morphological opening of a bool mask: erode then dilate with a size x size square of ones.

    Matches `cv2.dilate(cv2.erode(mask, np.ones((size, size))), np.ones((size, size)))`: with the
    default anchor both use the window rows/cols i-4 .. i+3 for size 8 (an even kernel has no centre),
    so the result is the textbook opening shifted by one pixel down and right, as in the reference.
    """
    keep = np.asarray(keep, dtype=bool)
    eroded = _window_reduce(keep, size, np.logical_and, border=True)
    return _window_reduce(eroded, size, np.logical_or, border=False)


def apply_keep(image: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """The masked image, uint8 (H, W, 3): the image where keep is 1, black (0) in the hole."""
    return image * keep[:, :, None].astype(image.dtype)


def maybe_invert(
    image: np.ndarray, masked_image: np.ndarray, keep: np.ndarray, rng: np.random.Generator,
    probability: float = INVERSION_PROBABILITY,
) -> tuple[np.ndarray, np.ndarray]:
    """With `probability`: masked image = image - masked image, keep = 1 - keep."""
    if rng.random() < probability:
        return image - masked_image, ~keep
    return masked_image, keep


def resized_shape(height: int, width: int, resolution: int) -> tuple[int, int]:
    """(H', W') with the shorter side = resolution and the longer side ceil(side * resolution / shorter).

    The reference computes ceil(side * (resolution / shorter)) in floating point, which can give
    resolution + 1 for the shorter side by rounding error; integer arithmetic here never does.
    """
    shorter = min(height, width)
    return -(-height * resolution // shorter), -(-width * resolution // shorter)


def resize_short_side(
    image: np.ndarray, masked_image: np.ndarray, keep: np.ndarray, resolution: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bicubic resize of image and masked image (H, W, 3) and mask (H, W) to `resized_shape`.

    Returns float32 channel-first arrays (3, H', W'), (3, H', W'), (H', W') in the input scale,
    not yet rounded: see `quantize_like_reference`. torch's bicubic (a = -0.75, half-pixel centres,
    edge pixels repeated, no antialiasing) is OpenCV's INTER_CUBIC.
    """
    height, width = keep.shape
    size = resized_shape(height, width, resolution)
    stack = np.empty((7, height, width), np.float32)
    stack[0:3] = image.transpose(2, 0, 1)
    stack[3:6] = masked_image.transpose(2, 0, 1)
    stack[6] = keep
    if size != (height, width):
        resized = F.interpolate(torch.from_numpy(stack)[None], size=size, mode="bicubic", align_corners=False)
        stack = resized[0].numpy()
    return stack[0:3], stack[3:6], stack[6]


def random_crop(arrays, resolution: int, rng: np.random.Generator) -> tuple[list[np.ndarray], tuple[int, int]]:
    """The same random resolution x resolution window of each (..., H, W) array, and its (top, left)."""
    height, width = arrays[0].shape[-2:]
    if height < resolution or width < resolution:
        raise ValueError(f"Cannot crop {resolution}x{resolution} from {height}x{width} (HxW).")
    top = int(rng.integers(0, height - resolution + 1))
    left = int(rng.integers(0, width - resolution + 1))
    return [a[..., top : top + resolution, left : left + resolution] for a in arrays], (top, left)


def quantize_like_reference(
    image: np.ndarray, masked_image: np.ndarray, keep: np.ndarray, soft: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Round and clip resized values as cv2.resize does for the reference's uint8 arrays.

    The image is always uint8 there (0-255). The masked image and the mask are uint8 too (mask
    exactly 0/1 after resizing) unless `soft`: the reference's random-brush mask is float32 until an
    opening, so its resized mask and masked image keep fractional values and bicubic overshoot.
    Per pixel, so it may run after the crop.
    """
    image = _round_clip(image, 255)
    if not soft:
        masked_image = _round_clip(masked_image, 255)
        keep = _round_clip(keep, 1)
    return image, masked_image, keep


def _round_clip(values: np.ndarray, high: int) -> np.ndarray:
    return np.clip(np.floor(values + 0.5), 0, high).astype(np.float32)


def to_tensors(image: np.ndarray, masked_image: np.ndarray, keep: np.ndarray) -> dict[str, torch.Tensor]:
    """The trainer's tensors from channel-first arrays: images (3, R, R) as x / 127.5 - 1, mask (1, R, R)."""

    def pixels(a):
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32) / 127.5 - 1.0)

    return {
        "pixel_values": pixels(image),
        "conditioning_pixel_values": pixels(masked_image),
        "masks": torch.from_numpy(np.ascontiguousarray(keep, dtype=np.float32))[None],
    }


def training_sample(
    image: PIL.Image.Image,
    keep: np.ndarray | None,
    caption,
    *,
    resolution: int,
    rng,
    random_mask: bool = False,
    proportion_empty_prompts: float = 0.0,
    segmentation_masks=None,
    mask_mix: str = "reference",
    object_captions=None,
    background_caption: str | None = None,
    drawn_weights: tuple[float, ...] = DRAWN_WEIGHTS,
) -> dict:
    """One training example: {"pixel_values", "conditioning_pixel_values", "masks", "caption",
    "original_size", "crop_top_left"}.

    `image` is any PIL image (converted to RGB). The mask comes from `choose_keep` (`random_mask`,
    else `keep` (1 = keep, (H, W)), else a random one of `segmentation_masks`, else all kept).
    `pixel_values` and `conditioning_pixel_values` are (3, R, R) float32 in [-1, 1] (the masked
    image is -1 in the hole; a soft random-brush sample may overshoot slightly, as in the
    reference), `masks` (1, R, R) float32 with 1 = keep, 0 = hole, and `caption` a string ("" with
    probability `proportion_empty_prompts`). `rng` is a numpy Generator (or a seed). `mask_mix`
    other than "reference" draws the hole from `brushnet.data.mask_mix` (see `choose_keep`), with
    the opening's kernel scaled to the resolution (no opening below 96 px) and, for "drawn", the
    inversion rarer (DRAWN_INVERSION_PROBABILITY); with `object_captions` (one per segmentation
    mask) and `background_caption`, a drawn hole is captioned by what it holds most of the time
    (`hole_caption`, HOLE_CAPTION_PROBABILITY), unless the regions were swapped.
    """
    if resolution <= 0:
        raise ValueError(f"resolution must be positive; got {resolution}.")
    if not 0.0 <= proportion_empty_prompts <= 1.0:
        raise ValueError(f"proportion_empty_prompts must be in [0, 1]; got {proportion_empty_prompts}.")
    rng = as_generator(rng)
    pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)
    height, width = pixels.shape[:2]
    kind = index = None
    if mask_mix == "drawn":
        keep, soft, kind, index = _drawn_keep(height, width, rng, segmentation_masks, resolution, drawn_weights)
    else:
        keep, soft = choose_keep(
            height, width, rng, keep=keep, random_mask=random_mask, segmentation_masks=segmentation_masks,
            mask_mix=mask_mix, resolution=resolution,
        )
    kernel = OPENING_KERNEL if mask_mix == "reference" else scaled_opening_kernel(OPENING_KERNEL, resolution)
    if rng.random() < OPENING_PROBABILITY and kernel > 1:
        keep, soft = open_mask(keep, kernel), False  # the reference's opening returns uint8
    masked = apply_keep(pixels, keep)
    inversion = DRAWN_INVERSION_PROBABILITY if mask_mix == "drawn" else INVERSION_PROBABILITY
    drawn_keep = keep
    masked, keep = maybe_invert(pixels, masked, keep, rng, inversion)
    if mask_mix == "drawn" and rng.random() < HOLE_CAPTION_PROBABILITY and keep is drawn_keep:
        caption = hole_caption(kind, index, object_captions, background_caption) or caption
    resized = resize_short_side(pixels, masked, keep, resolution)
    cropped, crop_top_left = random_crop(resized, resolution, rng)
    sample = to_tensors(*quantize_like_reference(*cropped, soft=soft))
    sample["caption"] = choose_caption(caption, rng, proportion_empty_prompts)
    # SDXL's size conditioning: the source size and where the crop sits in the resized image.
    sample["original_size"] = (height, width)
    sample["crop_top_left"] = crop_top_left
    return sample
