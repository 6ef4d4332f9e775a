"""Training holes like the ones people draw, at any resolution: the `--mask_mix` of the trainer.

- "reference" (the default): the authors' recipe, untouched (`--random_mask` strokes 128 px wide,
  else a segmentation mask at random).
- "strokes": the reference's random brush strokes with their width scaled to the training
  resolution (`scaled_brush_mask`); at 512 they are the reference's strokes, draw for draw.
- "drawn": per sample one kind of `DRAWN_KINDS`, weighted by `DRAWN_WEIGHTS`: an object's exact
  mask, the object grown by a random margin, a box around it, a free blob, the object together
  with strokes, strokes anywhere, strokes over the background only (no object under them).
  The objects are the sample's segmentation masks; without any, every kind falls back to strokes.
  Where the data gives per-object captions (and a background caption), an object's hole trains
  with its object's caption, a background-strokes hole with the background's, most of the time
  (HOLE_CAPTION_PROBABILITY).

Lengths scale with the image (the reference's stroke lengths already do: they are a fraction of
the diagonal), stroke widths with the training resolution (`resolution / 512`), so a mix written
for 512 px photos draws the same picture on 64 px scenes.

Every function returns the HOLE (True = to fill); `choose_keep` in transforms turns it into keep.
"""

import math

import numpy as np
import PIL.Image
import PIL.ImageDraw

from ..masks import random_brush_mask

MASK_MIXES = ("reference", "strokes", "drawn")
REFERENCE_RESOLUTION = 512
"""The resolution the reference's brush parameters (128 px strokes, 8 px opening) were set for."""
REFERENCE_STROKE_WIDTH = 128

DRAWN_KINDS = ("shape", "grown", "box", "blob", "shape+strokes", "strokes", "background-strokes")
# Why these weights: the shipped demo model failed on grown holes, boxes and strokes over plain
# background (issue 11) while exact shapes already worked, so the kinds it had never seen get most
# of the weight and exact shapes keep enough to stay as good. Measured effect: BENCHMARKS.md.
DRAWN_WEIGHTS = (0.12, 0.18, 0.16, 0.08, 0.14, 0.08, 0.24)


def parse_drawn_weights(text: str | None) -> tuple[float, ...]:
    """`--drawn_weights`: "kind=weight,..." over DRAWN_KINDS (kinds left out weigh 0; the weights
    are normalised), or None for DRAWN_WEIGHTS."""
    if text is None:
        return DRAWN_WEIGHTS
    weights = dict.fromkeys(DRAWN_KINDS, 0.0)
    for item in filter(None, (part.strip() for part in str(text).split(","))):
        kind, _, value = item.partition("=")
        kind = kind.strip()
        if kind not in weights:
            raise ValueError(f"--drawn_weights: unknown kind {kind!r}; the kinds are {', '.join(DRAWN_KINDS)}.")
        try:
            weights[kind] = float(value)
        except ValueError:
            raise ValueError(f"--drawn_weights: {item!r} is not kind=weight (e.g. shape=0.2).") from None
        if not math.isfinite(weights[kind]) or weights[kind] < 0:
            raise ValueError(f"--drawn_weights: the weight of {kind} must be a finite number >= 0; got {value!r}.")
    total = sum(weights.values())
    if total <= 0:
        raise ValueError("--drawn_weights: give at least one kind a weight above 0 (e.g. shape=0.2,grown=0.25).")
    return tuple(w / total for w in weights.values())


DRAWN_INVERSION_PROBABILITY = 0.1
"""The drawn mix rarely swaps hole and kept region: a person paints what is to change (the
reference's 1/2 trains outpainting-like holes half the time)."""


def stroke_scale(resolution: int) -> float:
    return resolution / REFERENCE_RESOLUTION


def scaled_opening_kernel(kernel: int, resolution: int) -> int:
    """The reference's opening kernel (8 px at 512) at `resolution`; 1 means no opening."""
    return max(1, round(kernel * stroke_scale(resolution)))


def scaled_brush_mask(height: int, width: int, rng: np.random.Generator, resolution: int,
                      max_tries: int = 4) -> np.ndarray:
    """The reference's brush strokes (`random_brush_mask`) with the stroke width scaled by
    resolution / 512; at 512 it is `random_brush_mask(height, width, rng, max_tries)` exactly."""
    stroke = max(1, round(REFERENCE_STROKE_WIDTH * stroke_scale(resolution)))
    return random_brush_mask(height, width, rng, max_tries=max_tries, min_width=stroke, max_width=stroke)


def grow(mask: np.ndarray, pixels: int) -> np.ndarray:
    """`mask` grown by `pixels` in a square neighbourhood (a separable max filter)."""
    grown = np.asarray(mask, dtype=bool)
    if pixels <= 0:
        return grown.copy()
    height, width = grown.shape
    for axis, size in ((0, height), (1, width)):
        padded = np.pad(grown, [(pixels, pixels) if a == axis else (0, 0) for a in range(2)])
        out = np.zeros_like(grown)
        for shift in range(2 * pixels + 1):
            out |= padded[shift:shift + size] if axis == 0 else padded[:, shift:shift + size]
        grown = out
    return grown


def _some_strokes(height, width, rng, resolution, forbidden=None, tries: int = 8) -> np.ndarray:
    """One to three scaled strokes (never empty unless `forbidden` covers every try's strokes),
    minus `forbidden`."""
    hole = np.zeros((height, width), dtype=bool)
    for _ in range(tries):
        # max_tries 4 is 0-3 strokes; redrawing an empty draw makes it 1-3.
        hole = scaled_brush_mask(height, width, rng, resolution)
        if forbidden is not None:
            hole &= ~forbidden
        if hole.sum() >= max(4, 0.01 * height * width):
            break
    return hole


def _box(mask: np.ndarray, margin: int) -> np.ndarray:
    height, width = mask.shape
    rows, columns = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    box = np.zeros_like(mask, dtype=bool)
    box[max(rows[0] - margin, 0):rows[-1] + 1 + margin, max(columns[0] - margin, 0):columns[-1] + 1 + margin] = True
    return box


def random_blob(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A free-form blob: the union of two to four overlapping ellipses, 10-40 % of the side across."""
    side = min(height, width)
    canvas = PIL.Image.new("1", (width, height), 0)
    draw = PIL.ImageDraw.Draw(canvas)
    x, y = rng.uniform(0, width), rng.uniform(0, height)
    for _ in range(int(rng.integers(2, 5))):
        rx, ry = rng.uniform(0.05, 0.2, size=2) * side
        draw.ellipse([x - rx, y - ry, x + rx, y + ry], fill=1)
        # The next ellipse starts inside this one, so the blob stays one piece.
        angle = rng.uniform(0, 2 * math.pi)
        x, y = x + rx * math.cos(angle), y + ry * math.sin(angle)
    return np.asarray(canvas, dtype=bool)


OBJECT_KINDS = ("shape", "grown", "box")
"""The kinds whose hole holds one object and background only: its own caption describes the hole."""
HOLE_CAPTION_PROBABILITY = 0.7
"""With per-object captions, how often an object hole trains with the object's caption (and a
background-strokes hole with the background's) instead of the whole image's: a person names what
the hole should hold, and without it the model cannot tell "draw the object" from "fill in"."""


def drawn_hole(objects: list[np.ndarray], height: int, width: int, rng: np.random.Generator,
               resolution: int, kind: str | None = None,
               weights: tuple[float, ...] = DRAWN_WEIGHTS) -> tuple[np.ndarray, str, int | None]:
    """One hole of the drawn mix, its kind and the index in `objects` of the object it is drawn
    around (None for strokes, blobs, background strokes); `objects` are bool (H, W) masks (may be
    empty); the kind is drawn with `weights` (one per DRAWN_KINDS) unless given."""
    if kind is None:
        kind = DRAWN_KINDS[int(rng.choice(len(DRAWN_KINDS), p=weights))]
    if kind not in DRAWN_KINDS:
        raise ValueError(f"Unknown drawn-mask kind {kind!r}; expected one of {DRAWN_KINDS}.")
    indices = [i for i, o in enumerate(objects) if o.any()]
    objects = [objects[i] for i in indices]
    side = min(height, width)
    if not objects and kind in ("shape", "grown", "box", "shape+strokes", "background-strokes"):
        kind = "strokes"
    if kind == "strokes":
        return _some_strokes(height, width, rng, resolution), kind, None
    if kind == "blob":
        return random_blob(height, width, rng), kind, None
    if kind == "background-strokes":
        # A 2 px band (at 64) keeps the brush off the objects' outlines too.
        everything = np.logical_or.reduce(objects)
        band = max(1, round(side / 32))
        return _some_strokes(height, width, rng, resolution, forbidden=grow(everything, band)), kind, None
    number = int(rng.integers(len(objects)))
    chosen, index = objects[number], indices[number]
    if kind == "shape":
        return chosen.copy(), kind, index
    if kind == "grown":
        # 1.5-10 % of the side: 1-6 px at 64, 8-51 px at 512.
        margin = int(rng.integers(max(1, round(0.015 * side)), max(2, round(0.1 * side)) + 1))
        return grow(chosen, margin), kind, index
    if kind == "box":
        return _box(chosen, int(rng.integers(0, max(1, round(0.07 * side)) + 1))), kind, index
    # shape+strokes: the object (grown by 0-2 px at 64) and strokes that need not touch it.
    margin = int(rng.integers(0, max(1, round(0.03 * side)) + 1))
    return grow(chosen, margin) | _some_strokes(height, width, rng, resolution), kind, index
