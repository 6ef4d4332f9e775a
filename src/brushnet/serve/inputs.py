"""What the browser sends, checked: uploads within limits, the hole to fill, the generation settings.

Everything here raises `InputError` (a `ValueError`) with one sentence naming the problem and the
fix; the page shows it as is. Nothing here imports gradio, so it is tested without a server.
"""

import math
import os
import random
import re
from dataclasses import dataclass

import numpy as np
import PIL.Image
import PIL.ImageOps

from ..arguments import check_text
from ..inpaint import InpaintSettings
from ..masks import as_rgb, erased_pixels, load_mask, open_image

# Server-side bounds of the settings: the page's sliders stay inside them, but the API takes any
# number, and one request for 100000 steps would hold the device for everyone.
MAX_STEPS = 200
MAX_IMAGES = 8
MAX_GUIDANCE = 50.0
MAX_SCALE = 10.0
MAX_BLEND_KERNEL = 255
MAX_SEED = 2**53 - 1  # the largest integer a browser's numbers hold exactly
RANDOM_SEED = -1  # asks for a random seed (an empty number field reaches the server as 0, so not "empty")
MAX_OUTPAINT_SIDE = 4096

# PowerPaint v2's tasks as the page names them; the pipeline's own table is the reference
# (a test checks that both list the same names).
TASK_LABELS = {
    "text-guided": "Text-guided (paint what the prompt says)",
    "object-removal": "Object removal (no prompt needed)",
    "context-aware": "Context-aware fill (no prompt needed)",
    "shape-guided": "Shape-guided (the object follows the mask's shape)",
    "outpainting": "Outpainting (no prompt needed)",
}
DEFAULT_TASK = "text-guided"
PROMPT_FREE_TASKS = ("object-removal", "context-aware", "outpainting")  # they fill from the surroundings

# How the preview shows the hole: the image under a translucent magenta, the brush's colour.
PREVIEW_TINT = np.array([255, 0, 255], dtype=np.float32)
PREVIEW_OPACITY = 0.6


class InputError(ValueError):
    """A request the server refuses; the message says what to change."""


@dataclass(frozen=True)
class UploadLimits:
    """Limits on what one request may upload. The byte limit is enforced by gradio's upload route
    (per file; the editor sends its canvas as PNG, so it counts PNG bytes); the pixel limit here."""

    max_pixels: int = 4096 * 4096
    max_upload_bytes: int = 50 * 2**20

    def __post_init__(self):
        if self.max_pixels < 1:
            raise InputError(f"--max-pixels must be at least 1; got {self.max_pixels}.")
        if self.max_upload_bytes < 1:
            raise InputError(f"--max-upload-mb must be more than 0; got {self.max_upload_bytes} bytes.")


def check_pixels(size: tuple[int, int], limits: UploadLimits, what: str) -> None:
    """Refuse an image of more than `limits.max_pixels` pixels before any work is done on it."""
    width, height = size
    if width * height > limits.max_pixels:
        raise InputError(
            f"The {what} is {width}x{height} = {width * height:,} pixels, more than this server's limit of "
            f"{limits.max_pixels:,} (--max-pixels): downscale it, or crop it around the part to edit."
        )


def unreadable_upload(error: BaseException, what: str, limits: UploadLimits) -> str:
    """One sentence for an upload gradio itself could not decode, naming the limit or the problem
    (gradio's own message spans lines and shows the server's temporary paths)."""
    if isinstance(error, PIL.Image.DecompressionBombError):
        claimed = re.search(r"\((\d+) pixels\)", str(error))
        pixels = f"{int(claimed.group(1)):,} pixels" if claimed else "too many pixels"
        return (f"The {what} has {pixels}, more than this server's limit of {limits.max_pixels:,} (--max-pixels): "
                "downscale it, or crop it around the part to edit.")
    if isinstance(error, MemoryError):
        return f"The {what} is too large for this server to decode: downscale it."
    return f"The {what} file is not an image this server can read: upload a PNG, JPEG or WebP."


def check_file(path: str | os.PathLike, limits: UploadLimits, what: str) -> None:
    """Refuse a file over the byte limit, or an image over the pixel limit, before decoding it."""
    size = os.path.getsize(path)
    if size > limits.max_upload_bytes:
        raise InputError(
            f"The {what} file is {size / 2**20:.1f} MB, more than this server's limit of "
            f"{limits.max_upload_bytes / 2**20:.1f} MB (--max-upload-mb): upload a smaller or compressed file."
        )
    try:
        with PIL.Image.open(path) as image:  # reads the header only
            dimensions = image.size
    except Exception as error:  # noqa: BLE001 - PIL raises many types for a damaged or hostile header
        raise InputError(unreadable_upload(error, what, limits)) from None
    check_pixels(dimensions, limits, what)


def open_uploaded_image(path: str | os.PathLike, limits: UploadLimits) -> PIL.Image.Image:
    """An uploaded photo as RGB (its EXIF orientation applied), within the limits."""
    check_file(path, limits, "image")
    return open_image(path)


def open_uploaded_mask(path: str | os.PathLike, limits: UploadLimits) -> PIL.Image.Image:
    """An uploaded mask as binary L (255 = fill), read as the CLI reads --mask files."""
    check_file(path, limits, "mask")
    return load_mask(path)


def flatten(image: PIL.Image.Image) -> PIL.Image.Image:
    """RGB; transparent parts become white, as a viewer shows them."""
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return PIL.Image.alpha_composite(PIL.Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
    return as_rgb(image)  # 16-bit grey scaled, not clipped to white


def editor_image(editor_value: dict | None, limits: UploadLimits) -> PIL.Image.Image:
    """The photo in an image editor's value ({"background", "layers", "composite"}), within limits."""
    background = (editor_value or {}).get("background")
    if background is None:
        raise InputError("No image: upload a PNG, JPEG or WebP in the image box first (a file that is not an image "
                         "does not load there).")
    check_pixels(background.size, limits, "image")
    # A file sent through the API arrives as stored; the browser sends what it shows, already upright.
    return flatten(PIL.ImageOps.exif_transpose(background))


def editor_strokes(editor_value: dict | None, size: tuple[int, int]) -> np.ndarray:
    """Where the user painted: any pixel with some opacity in any brush layer, as an (H, W) bool array.

    The eraser makes pixels transparent again, so it removes them from the hole."""
    painted = np.zeros((size[1], size[0]), dtype=bool)
    for layer in (editor_value or {}).get("layers") or []:
        if layer is None or "A" not in layer.getbands():
            continue
        alpha = layer.getchannel("A")
        if alpha.size != size:  # the canvas matches the image; guard against a client that differs
            alpha = alpha.resize(size, PIL.Image.NEAREST)
        painted |= np.asarray(alpha) > 0
    return painted


def editor_erased(editor_value: dict | None) -> np.ndarray | None:
    """The photo's own transparent pixels (alpha below 128), as the CLI reads an image erased to
    transparent with no mask given: an (H, W) bool array, or None where it has none."""
    background = (editor_value or {}).get("background")
    if background is None or not ("A" in background.getbands() or "transparency" in background.info):
        return None
    return erased_pixels(PIL.ImageOps.exif_transpose(background))


def combine_mask(size: tuple[int, int], strokes: np.ndarray | None, uploaded: PIL.Image.Image | None,
                 invert: bool, erased: np.ndarray | None = None) -> np.ndarray:
    """The hole as an (H, W) bool array: the painted strokes plus the uploaded mask, inverted if asked.
    With neither, the photo's `erased` (transparent) pixels, as the CLI takes them."""
    if erased is not None and uploaded is None and (strokes is None or not strokes.any()) \
            and erased.shape == (size[1], size[0]):
        strokes = erased
    hole = np.zeros((size[1], size[0]), dtype=bool) if strokes is None else strokes.copy()
    if uploaded is not None:
        if uploaded.size != size:
            raise InputError(
                f"The mask is {uploaded.width}x{uploaded.height} but the image is {size[0]}x{size[1]}: "
                "upload a mask of the image's size (white = fill)."
            )
        hole |= np.asarray(uploaded) > 0
    return ~hole if invert else hole


def build_mask(size: tuple[int, int], strokes: np.ndarray | None, uploaded: PIL.Image.Image | None,
               invert: bool, erased: np.ndarray | None = None) -> PIL.Image.Image:
    """The hole to fill as the library takes it (L, 255 = fill); refused if it is empty or everything."""
    hole = combine_mask(size, strokes, uploaded, invert, erased)
    if not hole.any():
        raise InputError("Nothing to fill: paint over the region to replace, upload a mask (white = fill), or "
                         "upload an image with the region erased to transparent.")
    if hole.all():
        raise InputError("The mask covers the whole image: leave some of it to keep (or untick Invert).")
    return mask_image(hole)


def mask_image(hole: np.ndarray) -> PIL.Image.Image:
    return PIL.Image.fromarray((hole * 255).astype(np.uint8))  # 2-D uint8: mode L


def masked_preview(image: PIL.Image.Image, mask: PIL.Image.Image) -> PIL.Image.Image:
    """The image with the hole tinted, so the user sees exactly what will be repainted."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    hole = (np.asarray(mask) > 0)[..., None]
    tinted = pixels * (1 - PREVIEW_OPACITY) + PREVIEW_TINT * PREVIEW_OPACITY
    return PIL.Image.fromarray(np.where(hole, tinted, pixels).round().astype(np.uint8))


def outpaint_sides(left, right, top, bottom) -> dict[str, int]:
    """The pixels to add on each side, as whole numbers within bounds."""
    sides = {"left": left, "right": right, "top": top, "bottom": bottom}
    for name, value in sides.items():
        value = _number(value, f"{name} extension")
        if value != int(value) or not 0 <= value <= MAX_OUTPAINT_SIDE:
            raise InputError(f"The {name} extension must be a whole number of pixels from 0 to "
                             f"{MAX_OUTPAINT_SIDE}; got {value}.")
        sides[name] = int(value)
    if not any(sides.values()):
        raise InputError("Nothing to outpaint: extend at least one side by some pixels.")
    return sides


def powerpaint_task(task, fitting_degree, powerpaint: bool, model: str) -> dict:
    """The pipeline keywords of a PowerPaint task (none for a plain BrushNet, which only does
    text-guided inpainting; asking it for another task is refused). None means the default."""
    task = DEFAULT_TASK if task is None or task == "" else task
    if task not in TASK_LABELS:
        raise InputError(f"Unknown task {task!r}: choose one of {', '.join(TASK_LABELS)}.")
    if not powerpaint:
        if task != DEFAULT_TASK:
            raise InputError(f"The task {task} needs a PowerPaint v2 model, but {model!r} is a BrushNet, which only "
                             "does text-guided inpainting: pick a PowerPaint model, or the text-guided task.")
        return {}
    fitting_degree = _within(1.0 if fitting_degree is None else fitting_degree, "fitting degree", 0.0, 1.0)
    return {"task": task, "fitting_degree": fitting_degree}


def generation_settings(prompt, negative_prompt, steps, guidance, scale, start, end, seed, num_images,
                        blend, blend_kernel, crop_to_mask, strength=None, extra: dict | None = None
                        ) -> InpaintSettings:
    """The form's values as `InpaintSettings`, each checked; seed -1 (or None) means a random one.
    `extra`: the PowerPaint task keywords, whose prompt-free tasks may leave the prompt empty."""
    for text, what in ((prompt, "The prompt"), (negative_prompt, "The negative prompt")):
        try:
            check_text(text, what)
        except ValueError as error:
            raise InputError(str(error)) from None
    prompt = (prompt or "").strip()
    extra = dict(extra or {})
    if not prompt and extra.get("task") not in PROMPT_FREE_TASKS:
        raise InputError("The prompt is empty: describe what to paint in the hole"
                         + (" (object removal, context-aware fill and outpainting need none)." if extra else "."))
    steps = _whole(steps, "steps", 1, MAX_STEPS)
    num_images = _whole(num_images, "number of images", 1, MAX_IMAGES)
    guidance = _within(guidance, "guidance", 0.0, MAX_GUIDANCE)
    scale = _within(scale, "conditioning scale", 0.0, MAX_SCALE)
    start = _within(start, "start", 0.0, 1.0)
    end = _within(end, "end", 0.0, 1.0)
    if start >= end:
        raise InputError(f"Start ({start}) must be below end ({end}): BrushNet acts between the two.")
    seed = _whole(RANDOM_SEED if seed is None or seed == "" else seed, "seed", RANDOM_SEED, MAX_SEED)
    if seed == RANDOM_SEED:
        seed = random_seed()
    kernel = _whole(blend_kernel or 0, "blend kernel", 0, MAX_BLEND_KERNEL)
    if kernel and kernel % 2 == 0:
        raise InputError(f"The blend kernel must be odd (or 0 for the model's default); got {kernel}.")
    strength = 1.0 if strength is None else _number(strength, "strength")
    if not 0.0 < strength <= 1.0:
        raise InputError(f"The strength must be above 0 and at most 1; got {strength:g}.")
    return InpaintSettings(
        prompt=prompt, negative_prompt=(negative_prompt or "").strip(), steps=steps, guidance=guidance, scale=scale,
        start=start, end=end, seed=seed, num_images=num_images, blend=bool(blend), blend_kernel=kernel or None,
        crop_to_mask=bool(crop_to_mask), strength=strength, extra=extra,
    )


def random_seed() -> int:
    return random.randrange(2**31)  # as the CLI draws them


def _number(value, name: str) -> float:
    if value is None or (isinstance(value, str) and not value.strip()):
        raise InputError(f"The {name} is empty: enter a number.")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"The {name} must be a number; got {value!r}.") from None
    if not math.isfinite(number):
        raise InputError(f"The {name} must be a finite number; got {value!r}.")
    return number


def _within(value, name: str, low: float, high: float) -> float:
    number = _number(value, name)
    if not low <= number <= high:
        raise InputError(f"The {name} must be between {low:g} and {high:g}; got {number:g}.")
    return number


def _whole(value, name: str, low: int, high: int) -> int:
    number = _number(value, name)
    if number != int(number) or not low <= number <= high:
        raise InputError(f"The {name} must be a whole number from {low} to {high}; got {value}.")
    return int(number)
