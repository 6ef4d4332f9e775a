"""Inpainting masks as users give them, turned into the binary hole the model needs.

Convention for users: white (1, 255) = the region to fill. Inside BrushNet the mask channel is the
opposite (1 = keep, 0 = hole); only the pipeline converts between the two.
"""

import math
import re

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageOps
import torch
import torch.nn.functional as F

from .arguments import check_choice


def _as_list(x) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _has_transparency(image: PIL.Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)


def _pil_mask_rgb(mask: PIL.Image.Image) -> PIL.Image.Image:
    # `load_mask`'s rule: a mask with transparent pixels is a painted layer, its alpha where the
    # user painted; an opaque one (a black-and-white mask saved as RGBA) is read by its colours.
    if _has_transparency(mask):
        alpha = mask.convert("RGBA").getchannel("A")
        if alpha.getextrema()[0] < 255:
            return alpha.convert("RGB")
    return as_rgb(mask)


def mask_batch_layout(mask):
    """A mask in diffusers' layouts for a batch of grey masks, made explicit: a 3-D tensor is
    (B, H, W), as diffusers' mask processor reads it, and so is a 3-D array whose last axis is not
    1, 3 or 4 channels; each becomes (B, 1, H, W) / (B, H, W, 1). Anything else is returned as it is."""
    if isinstance(mask, torch.Tensor) and mask.ndim == 3:
        return mask.unsqueeze(1)
    if isinstance(mask, np.ndarray) and mask.ndim == 3 and mask.shape[-1] not in (1, 3, 4):
        return mask[..., None]
    return mask


def _array_mask(mask) -> torch.Tensor:
    """A numpy/torch mask as a float (B, C, H, W) tensor in [0, 1]."""
    if isinstance(mask, np.ndarray):
        array = mask
        tensor = torch.from_numpy(array.astype(np.float32) / 255.0 if array.dtype == np.uint8 else array.astype(np.float32))
        if tensor.ndim == 2:  # (H, W)
            tensor = tensor[None, None]
        elif tensor.ndim == 3:  # (H, W, C)
            tensor = tensor.permute(2, 0, 1)[None]
        elif tensor.ndim == 4:  # (B, H, W, C)
            tensor = tensor.permute(0, 3, 1, 2)
        else:
            raise ValueError(f"A numpy mask must be (H, W), (H, W, C) or (B, H, W, C); got shape {array.shape}.")
        if not torch.isfinite(tensor).all():
            raise ValueError("The mask array holds NaN or infinite values.")
        return tensor
    if isinstance(mask, torch.Tensor):
        tensor = mask.detach().float()
        if mask.dtype == torch.uint8:
            tensor = tensor / 255.0
        if tensor.ndim == 2:  # (H, W)
            tensor = tensor[None, None]
        elif tensor.ndim == 3:  # (B, H, W), diffusers' reading (see mask_batch_layout)
            tensor = tensor[:, None]
        elif tensor.ndim != 4:
            raise ValueError(f"A torch mask must be (H, W), (B, H, W) or (B, C, H, W); got shape {tuple(mask.shape)}.")
        if not torch.isfinite(tensor).all():
            raise ValueError("The mask tensor holds NaN or infinite values.")
        return tensor.cpu()
    raise TypeError(f"A mask must be a PIL image, a numpy array or a torch tensor, not {type(mask).__name__}.")


def image_size(image) -> tuple[int, int]:
    """(height, width) of a PIL image, an (H, W, C)/(B, H, W, C) array or a (C, H, W)/(B, C, H, W) tensor."""
    if isinstance(image, PIL.Image.Image):
        return image.height, image.width
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            return image.shape[0], image.shape[1]
        return (image.shape[0], image.shape[1]) if image.ndim == 3 else (image.shape[1], image.shape[2])
    if isinstance(image, torch.Tensor):
        return tuple(image.shape[-2:])
    raise TypeError(f"Expected a PIL image, numpy array or torch tensor, not {type(image).__name__}.")


def unit_range(image):
    """8-bit arrays and tensors (np.asarray of a PIL image, torchvision's read_image) as floats in
    [0, 1], the range diffusers' preprocess expects of them and would otherwise take 0-255 as;
    PIL images, float data and lists of them pass through as they are."""
    if isinstance(image, (list, tuple)):
        return [unit_range(x) for x in image]
    if isinstance(image, np.ndarray) and image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0
    if isinstance(image, torch.Tensor) and image.dtype == torch.uint8:
        return image.float() / 255.0
    return image


def to_pil(picture, what: str) -> PIL.Image.Image:
    """A PIL image of a PIL image or an (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) array: uint8 0-255,
    bool, or float 0-1 (what `np.asarray(photo)` and `photo / 255` give)."""
    if isinstance(picture, PIL.Image.Image):
        return picture
    if not isinstance(picture, np.ndarray):
        raise TypeError(f"The {what} must be a PIL image or a numpy array, not {type(picture).__name__}.")
    if picture.ndim == 3 and picture.shape[-1] == 1:
        picture = picture[..., 0]
    if picture.ndim not in (2, 3) or (picture.ndim == 3 and picture.shape[-1] not in (3, 4)) or 0 in picture.shape:
        raise ValueError(f"The {what} array has shape {picture.shape}; give (height, width) or (height, width, 3).")
    if picture.dtype == bool:
        picture = picture.astype(np.uint8) * 255
    elif picture.dtype.kind == "f":
        if not np.isfinite(picture).all():
            raise ValueError(f"The {what} array holds NaN or infinite values.")
        picture = np.clip(np.rint(picture * 255.0), 0, 255).astype(np.uint8)
    elif picture.dtype != np.uint8:
        if picture.min() < 0 or picture.max() > 255:
            raise ValueError(f"The {what} array holds {picture.dtype} values outside 0-255: give uint8 or floats in 0-1.")
        picture = picture.astype(np.uint8)
    return PIL.Image.fromarray(np.ascontiguousarray(picture))


def batch_size_of(images) -> int:
    """How many images a pipeline input holds (a list, a batched array/tensor, or one image)."""
    if isinstance(images, (list, tuple)):
        return sum(batch_size_of(x) for x in images)
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return images.shape[0]
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        return images.shape[0]
    return 1


def check_same_size(image, mask) -> None:
    image_sizes = {image_size(x) for x in _as_list(image)}
    mask_sizes = {image_size(x) for x in _as_list(mask)}
    if len(image_sizes) > 1:
        raise ValueError(f"All images of a batch must have the same size; got {sorted(image_sizes)}.")
    if image_sizes != mask_sizes:
        raise ValueError(
            f"The image is {_hw(next(iter(image_sizes)))} but the mask is {', '.join(map(_hw, sorted(mask_sizes)))}: "
            "give a mask of the same size as the image (white = region to fill)."
        )


def _hw(size: tuple[int, int]) -> str:
    return f"{size[1]}x{size[0]} (WxH)"


def preprocess_mask(mask, image_processor, height: int, width: int) -> torch.Tensor:
    """The binary hole (B, 1, height, width) float, 1 = fill, from the user's mask(s).

    PIL masks go through the same resize and normalisation as the images, then a pixel is a hole
    where its mean over RGB is >= 127.5: exactly the reference's `sum(2x - 1) < 0` test for "keep".
    Arrays and tensors are floats in [0, 1] (or uint8), resized bilinearly if needed, same test.
    """
    items = _as_list(mask)
    if all(isinstance(m, PIL.Image.Image) for m in items):
        normalised = image_processor.preprocess([_pil_mask_rgb(m) for m in items], height=height, width=width)
    else:
        tensors = [_array_mask(m) for m in items]
        channels = {t.shape[1] for t in tensors}
        if len(channels) > 1:
            raise ValueError(f"All masks of a batch must have the same number of channels; got {sorted(channels)}.")
        values = torch.cat(tensors)
        if values.shape[-2:] != (height, width):
            values = F.interpolate(values, size=(height, width), mode="bilinear", align_corners=False)
        normalised = 2.0 * values - 1.0
    keep = normalised.float().sum(dim=1, keepdim=True) < 0
    return (~keep).float()


MASK_DOWNSAMPLINGS = ("nearest", "max")


def check_mask_downsampling(mode, name: str = "mask_downsampling") -> None:
    check_choice(mode, MASK_DOWNSAMPLINGS, name)


def latent_keep_mask(keep: torch.Tensor, size: tuple[int, int], mode: str = "nearest") -> torch.Tensor:
    """The branch's mask channel: the keep mask (1 = keep, (B, 1, H, W)) at latent size.

    "nearest" is the reference's (what the released checkpoints were trained with): each latent
    cell takes one of its pixels, so a hole thinner than the VAE's factor is partly marked keep
    where the masked image is black. "max": a cell is hole if any of its pixels is, so every hole
    pixel is regenerated (for models trained so: the demo model, whose 4x latent cells are as wide
    as a painted stroke).
    """
    check_mask_downsampling(mode)
    if mode == "max":
        return 1.0 - F.adaptive_max_pool2d(1.0 - keep, size)
    return F.interpolate(keep, size=size)


def load_mask(source, threshold: int = 128, invert: bool = False, dilate: int = 0) -> PIL.Image.Image:
    """A user's mask file or image as a binary "L" image: 255 = fill, 0 = keep.

    Accepts L, LA, RGB, RGBA, P and 1-bit images. Where the image has transparency (an alpha channel
    with any value below 255), the alpha is the painted region; otherwise the mean of its colour
    channels is used. A pixel is a hole where that value is >= `threshold` (0-255). `invert` swaps
    fill and keep; `dilate` grows the hole by that many pixels (a square neighbourhood).
    """
    if not 0 <= threshold <= 255:
        raise ValueError(f"The mask threshold must be between 0 and 255; got {threshold}.")
    if dilate < 0:
        raise ValueError(f"--dilate must be >= 0 pixels; got {dilate}.")
    # A file is read upright, as its image is (a camera's orientation tag); a given image as it is.
    image = source if isinstance(source, PIL.Image.Image) else PIL.ImageOps.exif_transpose(_open_image(source, "mask"))
    values = _mask_values(image)
    hole = values >= threshold
    if invert:
        hole = ~hole
    if dilate:
        hole = _grow(hole, dilate)
    return PIL.Image.fromarray((hole * 255).astype(np.uint8), mode="L")


def faint_hole(path, threshold: int = 128) -> float | None:
    """The largest value `load_mask` thresholds in a mask file (0-255 scale) when some pixel is above 0
    but none reaches `threshold`, e.g. a 0/1 array saved as an image, whose hole is value 1: what to
    name when such a mask reads as no hole. None otherwise."""
    brightest = float(_mask_values(PIL.ImageOps.exif_transpose(_open_image(path, "mask"))).max())
    return brightest if 0 < brightest < threshold else None


def _grow(hole: np.ndarray, pixels: int) -> np.ndarray:
    """Grow a boolean mask by `pixels` in a square neighbourhood: two 1-D max filters (the square is
    separable), and no wider than the image, past which every row and column is already covered."""
    pixels = min(pixels, max(hole.shape))
    grown = torch.from_numpy(hole)[None, None].float()
    grown = F.max_pool2d(grown, (1, 2 * pixels + 1), stride=1, padding=(0, pixels))
    grown = F.max_pool2d(grown, (2 * pixels + 1, 1), stride=1, padding=(pixels, 0))
    return grown[0, 0].numpy() > 0


def _mask_values(image: PIL.Image.Image) -> np.ndarray:
    if _has_transparency(image):
        alpha = np.asarray(image.convert("RGBA").getchannel("A"))
        if alpha.min() < 255:
            return alpha.astype(np.float32)
    if image.mode == "1":
        return np.asarray(image.convert("L"), dtype=np.float32)
    if image.mode == "F" or image.mode.startswith("I"):
        return high_depth_values(image)
    if image.mode == "L":
        return np.asarray(image, dtype=np.float32)
    return np.asarray(image.convert("RGB"), dtype=np.float32).mean(axis=-1)


def _open_image(path, what: str) -> PIL.Image.Image:
    """Open and decode an image file; every way that can fail becomes one ValueError naming the file."""
    try:
        image = PIL.Image.open(path)
        image.load()
    except FileNotFoundError:
        raise FileNotFoundError(f"The {what} file {path} does not exist.") from None
    except PIL.UnidentifiedImageError:
        raise ValueError(f"The {what} file {path} is not an image PIL can read.") from None
    except IsADirectoryError:
        raise ValueError(f"The {what} {path} is a folder, not an image file.") from None
    except PermissionError:
        raise ValueError(f"The {what} file {path} cannot be read (permission denied).") from None
    except PIL.Image.DecompressionBombError as error:
        claimed = re.search(r"\((\d+) pixels\)", str(error))
        pixels = f"{int(claimed.group(1)):,} pixels" if claimed else "more pixels than allowed"
        raise ValueError(
            f"The {what} file {path} claims {pixels}, more than the {PIL.Image.MAX_IMAGE_PIXELS * 2:,} decoded here "
            "(a guard against decompression bombs): resize the image and try again."
        ) from None
    except MemoryError:
        raise ValueError(f"The {what} file {path} is too large to decode in this machine's memory: resize it.") \
            from None
    except Exception as error:  # truncated or corrupt data: PIL raises OSError, SyntaxError, struct.error, ...
        reason = str(error).strip() or type(error).__name__
        raise ValueError(f"The {what} file {path} is damaged ({reason}): re-export or replace it.") from None
    return image


def open_image(path) -> PIL.Image.Image:
    """An RGB image from a file, with a clear error for missing or unreadable files."""
    image = _open_image(path, "image")
    # Respect the camera's orientation tag, as every photo viewer does.
    return as_rgb(PIL.ImageOps.exif_transpose(image))


def as_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """`image.convert("RGB")`, except for the high-depth grey modes PIL opens 16-bit PNGs and TIFFs as
    (I;16, I, F), which that conversion clips to white instead of scaling: those are brought to 8 bits
    first (16-bit values by 257; float values in [0, 1] by 255)."""
    if image.mode.startswith("I") or image.mode == "F":
        values = high_depth_values(image)
        image = PIL.Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")
    return image.convert("RGB")


def high_depth_values(image: PIL.Image.Image) -> np.ndarray:
    """The values of a high-depth grey image (I;16, I, F) on the 8-bit scale, as float32: 16-bit
    ones (I;16, or any above 255) divided by 257, floats in [0, 1] times 255, others as they are.
    The one rule for pictures (`as_rgb`) and masks (`_mask_values`)."""
    values = np.asarray(image, dtype=np.float32)
    peak = float(values.max()) if values.size else 0.0
    if image.mode.startswith("I;16") or peak > 255:
        return values / 257.0
    if image.mode == "F" and peak <= 1.0:
        return values * 255.0
    return values


def transparent_hole(path) -> PIL.Image.Image | None:
    """The hole an image carries itself: its transparent pixels (alpha below 128), as a mask image
    ("L", 255 = fill), when it has any; else None. What an editor's eraser leaves, and what ComfyUI
    reads as the mask of a loaded image."""
    image = PIL.ImageOps.exif_transpose(_open_image(path, "image"))
    hole = erased_pixels(image) if _has_transparency(image) else None
    return None if hole is None else PIL.Image.fromarray((hole * 255).astype(np.uint8), mode="L")


def erased_pixels(image: PIL.Image.Image) -> np.ndarray | None:
    """An (H, W) bool array of `image`'s transparent pixels (alpha below 128), or None where none is."""
    hole = np.asarray(image.convert("RGBA").getchannel("A")) < 128
    return hole if hole.any() else None


# ---------------------------------------------------------------------------------------------
# Training masks: run-length encoded segmentation masks and random free-form brush strokes.
# ---------------------------------------------------------------------------------------------


def _rle_runs(rle, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Validated 0-indexed (starts, ends) of a flat [start, length, ...] RLE over height*width pixels."""
    try:
        values = np.asarray(rle)
    except ValueError:  # ragged nesting
        raise ValueError("An RLE must be a flat list [start, length, start, length, ...].") from None
    if values.ndim != 1:
        raise ValueError(f"An RLE must be a flat list [start, length, start, length, ...]; got shape {values.shape}.")
    if values.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if values.dtype.kind == "f" and np.all(np.isfinite(values)) and np.all(values == np.round(values)):
        values = values.astype(np.int64)
    if values.dtype.kind not in "iu":
        raise ValueError(f"An RLE must hold integers; got {values.dtype} values.")
    if values.size % 2:
        raise ValueError(f"An RLE must hold (start, length) pairs; got an odd number of values ({values.size}).")
    values = values.astype(np.int64)
    starts, lengths = values[0::2] - 1, values[1::2]
    ends = starts + lengths
    total = height * width
    if starts.min() < 0 or lengths.min() < 0 or ends.max() > total:
        raise ValueError(
            f"RLE run out of range for a {height}x{width} (HxW) mask: starts are 1-based and must satisfy "
            f"1 <= start and start - 1 + length <= {total}."
        )
    return starts, ends


def check_rle(rle, height: int, width: int) -> None:
    """Raise ValueError unless `rle` is a well-formed flat RLE whose runs fit in height*width pixels."""
    _rle_runs(rle, height, width)


def rle_decode(rle, height: int, width: int, order: str = "F") -> np.ndarray:
    """A boolean (height, width) mask from a flat run-length encoding [start, length, start, length, ...].

    Starts are 1-indexed positions in the flattened mask, runs are set to True. `order="F"`
    (default) flattens column-major, as BrushData's segmentation masks and the reference trainer's
    `rle2mask` do; `order="C"` flattens row-major, as the BrushBench benchmark masks (512x512) do.
    Unlike the reference, malformed or out-of-range runs raise ValueError instead of being cut off.
    """
    if order not in ("F", "C"):
        raise ValueError(f"order must be 'F' (column-major) or 'C' (row-major); got {order!r}.")
    starts, ends = _rle_runs(rle, height, width)
    # +1 at each start and -1 at each end, a running sum > 0 is inside some run (overlaps allowed).
    total = height * width
    edges = np.bincount(starts, minlength=total + 1) - np.bincount(ends, minlength=total + 1)
    flat = np.cumsum(edges[:total]) > 0
    return flat.reshape((height, width), order=order)


def rle_encode(mask, order: str = "F") -> list[int]:
    """The flat RLE [start, length, ...] (1-indexed starts) of a 2-D mask's nonzero pixels; `rle_decode`'s inverse."""
    if order not in ("F", "C"):
        raise ValueError(f"order must be 'F' (column-major) or 'C' (row-major); got {order!r}.")
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"rle_encode needs a 2-D (H, W) mask; got shape {mask.shape}.")
    flat = np.concatenate([[False], mask.astype(bool).ravel(order=order), [False]])
    changes = np.flatnonzero(flat[1:] != flat[:-1])
    starts, ends = changes[0::2], changes[1::2]
    runs = np.empty(2 * len(starts), np.int64)
    runs[0::2] = starts + 1
    runs[1::2] = ends - starts
    return runs.tolist()


def random_brush_mask(
    height: int,
    width: int,
    rng: np.random.Generator,
    max_tries: int = 4,
    min_num_vertex: int = 0,
    max_num_vertex: int = 8,
    mean_angle: float = 2 * math.pi / 5,
    angle_range: float = 2 * math.pi / 15,
    min_width: int = 128,
    max_width: int = 128,
) -> np.ndarray:
    """A random free-form brush mask (bool (height, width), True = brush = hole), as BrushNet trains with.

    Statistics of the reference trainer's `random_brush_gen(max_tries, h, w)`: rng.integers(max_tries)
    strokes (0 .. max_tries-1, so with the default 4 a quarter of the masks are empty), each a
    polyline of min_num_vertex .. max_num_vertex-1 segments whose direction alternates around
    `mean_angle` (jittered by up to `angle_range`), segment lengths ~ N(r, floor(r/2)) clipped to
    [0, 2r] with r = sqrt(H^2 + W^2) / 8, drawn `width` pixels wide (uniform in [min_width,
    max_width], 128 by default) with a filled circle at each vertex; finally the mask is flipped
    up-down and left-right with probability 1/2 each. (The reference's per-stroke
    `mask.transpose(...)` calls discard their result, so they are left out.)

    Difference from the reference: it reads `h, w = mask.size` from a PIL image, whose size is
    (width, height), so for non-square masks its start points and clipping use swapped axes.
    Here x is drawn and clipped in [0, width] and y in [0, height]; square masks are unaffected.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"A brush mask needs a positive size; got {height}x{width} (HxW).")
    average_radius = math.sqrt(height * height + width * width) / 8
    canvas = PIL.Image.new("L", (width, height), 0)
    draw = PIL.ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(max_tries))):
        num_vertex = int(rng.integers(min_num_vertex, max_num_vertex))
        angle_min = mean_angle - rng.uniform(0, angle_range)
        angle_max = mean_angle + rng.uniform(0, angle_range)
        angles = [
            2 * math.pi - rng.uniform(angle_min, angle_max) if i % 2 == 0 else rng.uniform(angle_min, angle_max)
            for i in range(num_vertex)
        ]
        vertices = [(int(rng.integers(0, width)), int(rng.integers(0, height)))]
        for angle in angles:
            radius = np.clip(rng.normal(loc=average_radius, scale=average_radius // 2), 0, 2 * average_radius)
            x = np.clip(vertices[-1][0] + radius * math.cos(angle), 0, width)
            y = np.clip(vertices[-1][1] + radius * math.sin(angle), 0, height)
            vertices.append((int(x), int(y)))
        stroke = int(rng.uniform(min_width, max_width))
        draw.line(vertices, fill=1, width=stroke)
        for x, y in vertices:
            draw.ellipse((x - stroke // 2, y - stroke // 2, x + stroke // 2, y + stroke // 2), fill=1)
    mask = np.asarray(canvas, dtype=bool)
    if rng.random() > 0.5:
        mask = mask[::-1]
    if rng.random() > 0.5:
        mask = mask[:, ::-1]
    return np.ascontiguousarray(mask)
