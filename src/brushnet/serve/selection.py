"""Selecting the hole without painting: clicks on the masked preview and words, turned into a mask
by `brushnet.segmentation` (SAM; an open-vocabulary detector for words) with the models named by
`brushnet serve --segmenter/--detector`, loaded on first use.

The selection is kept by the page (its points, words and the mask SAM made) and joins the painted
strokes in the hole, so the brush adds to it. It is not written into the editor's paint layer:
gradio's image editor (6.x) shows a layer a handler sends, but drops it from its value at the next
brush stroke, and the selection would vanish from the hole unseen. Nothing here imports gradio.
"""

import json
import math
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageDraw

from ..segmentation.defaults import BOX_THRESHOLD
from .inputs import InputError, masked_preview

# The preview's shortest display: gradio maps a click to the image's pixels correctly only when the
# image is shown at its own size or smaller, so a small image is sent enlarged (whole pixels).
PREVIEW_MIN_SIDE = 768
POINT_COLOURS = {True: (0, 200, 0), False: (230, 0, 0)}  # on the object / not on it
NO_SEGMENTER = ("Selecting by clicks or words needs SAM: start brushnet serve with --segmenter (a SAM folder, e.g. "
                "facebook/sam-vit-base), or paint the hole.")
NO_DETECTOR = ("Selecting by words needs an open-vocabulary detector: start brushnet serve with --detector as well "
               "(e.g. IDEA-Research/grounding-dino-tiny), or click on the object.")


@dataclass(eq=False)
class Selection:
    """What one page has selected: points on the object, points off it, words, and the mask the
    last selection put into the editor's layer (image pixels; x right, y down)."""

    points: list[tuple[int, int]] = field(default_factory=list)
    negative_points: list[tuple[int, int]] = field(default_factory=list)
    words: str = ""
    threshold: float = BOX_THRESHOLD
    mask: np.ndarray | None = None

    @property
    def empty(self) -> bool:
        return not (self.points or self.negative_points or self.words)


def with_point(selection: Selection | None, point: tuple[int, int], negative: bool) -> Selection:
    selection = selection or Selection()
    if negative:
        return replace(selection, negative_points=[*selection.negative_points, point])
    return replace(selection, points=[*selection.points, point])


def with_words(selection: Selection | None, words: str, threshold) -> Selection:
    selection = selection or Selection()
    return replace(selection, words=(words or "").strip(),
                   threshold=BOX_THRESHOLD if threshold is None else float(threshold))


def resolve_source(source: str, flag: str, model_type: str | None = None) -> str:
    """A local folder for `source`: the folder itself, or a hub id's copy in the Hugging Face cache
    (the server fetches nothing). Its config is read, and its model type checked when given."""
    if Path(source).is_dir():
        folder = Path(source)
    elif Path(source).is_file():  # e.g. the checkpoint's config.json or weights rather than its folder
        raise InputError(f"{flag} {source} is a file: give the folder that holds it (config.json and the weights).")
    else:
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(source, local_files_only=True))
        except Exception:  # noqa: BLE001 - not a repo id, or not in the cache: the same advice
            raise InputError(f"{flag} {source}: no such folder, nor a model in the Hugging Face cache (the server "
                             f"downloads nothing): download it first, e.g. hf download {source}.") from None
    config = folder / "config.json"
    try:
        found = json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        raise InputError(f"{flag} {source}: cannot read {config}: give a transformers model folder.") from None
    if model_type is not None and found != model_type:
        raise InputError(f"{flag} {source} is a {found!r} model, not {model_type!r}: give a SAM or SlimSAM checkpoint "
                         "such as facebook/sam-vit-base.")
    return str(folder)


class Selector:
    """The segmenter and detector of one server, each loaded on its first use and then kept."""

    def __init__(self, segmenter: str | None, detector: str | None = None, device: str = "cpu"):
        self.segmenter_source = segmenter
        self.detector_source = detector
        self.device = device
        self._lock = threading.Lock()
        self._segmenter = None
        self._detector = None

    def mask(self, image: PIL.Image.Image, selection: Selection, on_load=None) -> np.ndarray:
        """The (H, W) bool mask of `selection` on `image`; `on_load(what)` is called before a model
        loads. Raises `ValueError` (InputError, NothingFound) with one sentence."""
        from ..segmentation import build_prompts, select_mask

        if self.segmenter_source is None:
            raise InputError(NO_SEGMENTER)
        if selection.words and self.detector_source is None:
            raise InputError(NO_DETECTOR)
        # Checked before any model loads: a point outside the image, negative points alone.
        build_prompts(image.size, selection.points, selection.negative_points, (), has_text=bool(selection.words))
        segmenter, detector = self._models(bool(selection.words), on_load)
        mask = select_mask(image, segmenter, points=selection.points, negative_points=selection.negative_points,
                           text=[selection.words] if selection.words else (), detector=detector,
                           threshold=selection.threshold)
        return np.asarray(mask) > 0

    def _models(self, words: bool, on_load):
        from ..segmentation import Detector, Segmenter

        with self._lock:
            if self._segmenter is None:
                if on_load is not None:
                    on_load("the segmenter")
                self._segmenter = Segmenter.from_pretrained(self.segmenter_source, self.device)
            if words and self._detector is None:
                if on_load is not None:
                    on_load("the detector")
                self._detector = Detector.from_pretrained(self.detector_source, self.device)
            return self._segmenter, self._detector if words else None


def selection_strokes(strokes: np.ndarray, selection: Selection | None) -> np.ndarray:
    """The painted strokes (H, W) joined by the selection's mask (one made on this image's size)."""
    mask = None if selection is None else selection.mask
    if mask is None or mask.shape != strokes.shape:
        return strokes
    return strokes | mask


def preview_zoom(size: tuple[int, int]) -> int:
    """How many times the preview enlarges an image of `size` (whole pixels, so clicks map back)."""
    return max(1, math.ceil(PREVIEW_MIN_SIDE / max(size)))


def click_pixel(index, size: tuple[int, int]) -> tuple[int, int]:
    """The image pixel under a click on the preview (gradio gives the preview's own pixel)."""
    if not isinstance(index, (list, tuple)) or len(index) != 2:
        raise InputError("Click on the masked image itself to select the object there.")
    zoom = preview_zoom(size)
    x, y = (int(value) // zoom for value in index)
    if not (0 <= x < size[0] and 0 <= y < size[1]):
        raise InputError("Click on the masked image itself to select the object there.")
    return x, y


def page_preview(image: PIL.Image.Image, mask: PIL.Image.Image, selection: Selection | None) -> PIL.Image.Image:
    """The masked preview as the page shows it: enlarged for small images, with the clicked points
    marked (green: on the object, red: not on it)."""
    zoom = preview_zoom(image.size)
    preview = masked_preview(image, mask)
    if zoom > 1:
        preview = preview.resize((image.width * zoom, image.height * zoom), PIL.Image.NEAREST)
    if selection is None:
        return preview
    draw = PIL.ImageDraw.Draw(preview)
    radius = max(3, round(max(preview.size) / 120))
    for positive, points in ((True, selection.points), (False, selection.negative_points)):
        for x, y in points:
            cx, cy = (x + 0.5) * zoom, (y + 0.5) * zoom
            draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=POINT_COLOURS[positive],
                         outline=(255, 255, 255), width=max(1, radius // 3))
    return preview
