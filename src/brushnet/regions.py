"""Geometry of large images: working sizes, windows around the mask, outpainting canvases.

Boxes are (left, top, right, bottom) in pixels, right/bottom exclusive, as PIL's `crop` takes them.
"""

import math

import numpy as np
import PIL.Image

# An outpainting margin that makes a canvas over these is a typo (a 100000-pixel margin), not a
# photo: refused before the canvas is allocated. A side is checked on its own too: --left 1000000
# on a 64-pixel-high image stays under the area.
MAX_CANVAS_SIDE = 16384
MAX_CANVAS_PIXELS = 8192 * 8192


def working_size(width: int, height: int, native: int, multiple: int = 8) -> tuple[int, int]:
    """The size with the model's native area (native x native) and the same aspect, in multiples.

    A ValueError for an image so narrow that its short side would be under one latent cell there:
    rounding it up would stretch the image, and the result be stretched back into garbage."""
    scale = native / math.sqrt(width * height)
    if min(width, height) * scale < multiple / 2:
        longest = (2 * native / multiple) ** 2  # the most elongated aspect that rounds to one cell
        raise ValueError(f"The image is {width}x{height}: too narrow for this model, which works at about "
                         f"{native}x{native} pixels and needs a side at least 1/{longest:.0f} of the other: "
                         "crop the image, or outpaint fewer pixels.")
    fit = lambda x: max(multiple, int(round(x * scale / multiple)) * multiple)  # noqa: E731
    return fit(width), fit(height)


def hole_box(mask: PIL.Image.Image) -> tuple[int, int, int, int] | None:
    """The bounding box of the white pixels of a binary mask, or None when there are none."""
    return mask.getbbox()


def crop_window(box: tuple[int, int, int, int], image_size: tuple[int, int], context: float,
                min_side: int) -> tuple[int, int, int, int]:
    """A window around `box`, widened by `context` times its size on each side and to at least
    `min_side` pixels a side (so small holes are not upscaled), kept inside the image."""
    if context < 0:
        raise ValueError(f"--context must be >= 0; got {context}.")
    width, height = image_size
    left, top, right, bottom = box
    pad_x, pad_y = context * (right - left), context * (bottom - top)
    left, right = _widen(left - pad_x, right + pad_x, min_side, width)
    top, bottom = _widen(top - pad_y, bottom + pad_y, min_side, height)
    return left, top, right, bottom


def _widen(lo: float, hi: float, min_side: int, limit: int) -> tuple[int, int]:
    lo, hi = math.floor(lo), math.ceil(hi)
    missing = max(0, min(min_side, limit) - (hi - lo))
    lo, hi = lo - missing // 2, hi + missing - missing // 2
    shift = max(0, -lo) - max(0, hi - limit)  # slide back inside the image
    lo, hi = lo + shift, hi + shift
    return max(0, lo), min(limit, hi)


def outpaint_canvas(image: PIL.Image.Image, left: int = 0, right: int = 0, top: int = 0, bottom: int = 0,
                    fill: tuple[int, int, int] = (0, 0, 0)) -> tuple[PIL.Image.Image, PIL.Image.Image]:
    """The enlarged canvas with `image` placed inside, and its mask (255 = the new area to fill)."""
    for name, pixels in (("left", left), ("right", right), ("top", top), ("bottom", bottom)):
        if pixels < 0:  # a crop is not an outpaint: say which side, not only that one was wrong
            raise ValueError(f"--{name} must be >= 0 (pixels to add on that side); got {pixels}.")
    if left + right + top + bottom == 0:
        raise ValueError("Outpainting needs at least one of --left/--right/--top/--bottom > 0 (pixels to add).")
    width, height = image.width + left + right, image.height + top + bottom
    if width * height > MAX_CANVAS_PIXELS or max(width, height) > MAX_CANVAS_SIDE:
        raise ValueError(f"The outpainted canvas would be {width}x{height}, more than {MAX_CANVAS_PIXELS} pixels "
                         f"(8192x8192) or {MAX_CANVAS_SIDE} a side: add fewer pixels.")
    canvas = PIL.Image.new("RGB", (width, height), fill)
    canvas.paste(image.convert("RGB"), (left, top))
    mask = np.full((height, width), 255, dtype=np.uint8)
    mask[top:top + image.height, left:left + image.width] = 0
    return canvas, PIL.Image.fromarray(mask, mode="L")
