"""Selecting what to fill: SAM prompts from points and boxes, detector boxes from words, their union."""

import PIL.Image

from ..arguments import check_number
from ..masks import load_mask
from .defaults import BOX_THRESHOLD
from .detection import Detector, split_phrases
from .sam import Prompt, Segmenter


class NothingFound(ValueError):
    """The detector found no object for the words, or SAM selected no pixel."""


def build_prompts(size: tuple[int, int], points=(), negative_points=(), boxes=(), has_text: bool = False
                  ) -> list[Prompt]:
    """The SAM prompts of the points and boxes, checked against an image of `size` (W, H): one
    object for the points (within the box, when one box is given), else one per box."""
    points, negative_points, boxes = list(points), list(negative_points), list(boxes)
    if not (points or negative_points or boxes or has_text):
        raise ValueError("Nothing to select: give a point, a box or words naming the object.")
    if (points or negative_points) and len(boxes) > 1:
        raise ValueError(f"Points refine one object, but {len(boxes)} boxes were given: give one box with the "
                         "points, or the boxes alone.")
    if points or negative_points:
        prompts = [Prompt(points, negative_points, boxes[0] if boxes else None)]
    else:
        prompts = [Prompt(box=box) for box in boxes]
    for prompt in prompts:
        prompt.check(size)
    return prompts


def check_dilate(dilate, image_size: tuple[int, int], name: str = "dilate") -> int:
    """`dilate` if it is a whole number of pixels the mask may grow by on an image of `image_size`
    (at most its longer side), else a ValueError naming `name`."""
    return check_number(dilate, name, low=0, high=max(image_size), integer=True)


def select_mask(image: PIL.Image.Image, segmenter: Segmenter, *, points=(), negative_points=(), boxes=(),
                text=(), detector: Detector | None = None, threshold: float = BOX_THRESHOLD,
                dilate: int = 0) -> PIL.Image.Image:
    """The "L" mask (255 = fill) of everything selected on `image`: the object under `points`
    (minus `negative_points`, within the box when one box is given), each of `boxes`, and every
    object the `text` phrases name; their union, grown by `dilate` pixels.

    Points are (x, y) and boxes (x0, y0, x1, y1) in the image's pixels.
    """
    phrases = split_phrases(list(text))
    dilate = check_dilate(dilate, image.size)
    prompts = build_prompts(image.size, points, negative_points, boxes, has_text=bool(phrases))
    if phrases:
        if detector is None:
            raise ValueError("Selecting by words needs an open-vocabulary detector (e.g. "
                             "IDEA-Research/grounding-dino-tiny) besides SAM.")
        check_number(threshold, "threshold", low=0.0, high=1.0, low_inclusive=False)
        found = detector.detect(image, phrases, threshold)
        if not found:
            raise NothingFound(f"The detector found nothing matching {' / '.join(map(repr, phrases))} above its "
                               f"threshold {threshold:g}: try other words or a lower threshold.")
        prompts += [Prompt(box=box) for box in found]
    hole = segmenter.segment(image, prompts)
    if not hole.any():
        raise NothingFound("SAM selected no pixel for these prompts: move the point or widen the box.")
    mask = PIL.Image.fromarray(hole.astype("uint8") * 255, mode="L")
    return load_mask(mask, dilate=dilate) if dilate else mask
