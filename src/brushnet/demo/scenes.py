"""Procedural scenes for the built-in demo model: coloured shapes on simple backgrounds.

Every scene is a 64x64 RGB image drawn from its seed alone (`make_scene(seed)`), with a caption in
one fixed grammar over a small closed vocabulary (`VOCABULARY`) and an exact boolean mask per
shape. Shapes and flat/striped/checkered backgrounds use palette colours only, drawn without
antialiasing, so "which colour is this pixel" has an exact answer (`nearest_palette_colour`) and
inpainting results can be scored by colour (`colour_fraction`).

Caption grammar (articles "a"/"an" as English wants them; commas are separate tokens, see
`caption_words`):

    caption    := shapes " on " article background " background"
    shapes     := shape | shape " and " shape | shape ", " shape " and " shape | ...
    shape      := article colour " " kind                          e.g. "a red circle"
    background := colour | colour " and " colour " " pattern       pattern: gradient, striped, checkered
"""

import json
import os
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import PIL.Image
import PIL.ImageDraw

from ..masks import rle_encode

SIZE = 64
"""Side of every scene image, in pixels."""

# Far apart in RGB (closest pair: orange/yellow, ~90) so a pixel's nearest palette colour is
# unambiguous even after a model's small colour errors.
PALETTE: "OrderedDict[str, tuple[int, int, int]]" = OrderedDict(
    [
        ("red", (220, 20, 20)),
        ("green", (20, 170, 40)),
        ("blue", (30, 60, 220)),
        ("yellow", (250, 225, 20)),
        ("purple", (140, 40, 170)),
        ("orange", (250, 135, 10)),
        ("white", (250, 250, 250)),
        ("black", (10, 10, 10)),
    ]
)
COLOURS = tuple(PALETTE)
_PALETTE_RGB = np.array(list(PALETTE.values()), dtype=np.int32)  # (8, 3), index = colour index

SHAPES = ("circle", "square", "triangle", "star", "ring")
BACKGROUNDS = ("flat", "gradient", "stripes", "checker")
# The caption word of each two-colour background kind.
_PATTERN_WORDS = {"gradient": "gradient", "stripes": "striped", "checker": "checkered"}

MIN_SHAPE_SIZE, MAX_SHAPE_SIZE = 14, 30  # side of a shape's square box, in pixels (inclusive)
MAX_SHAPES = 4
MIN_VISIBLE = 0.5  # every shape keeps at least this fraction of its own pixels visible
PLACEMENT_TRIES = 10  # placements tried per shape before it is dropped (the scene has fewer shapes)
REMOVAL_DILATION = 2  # pixels the hole of `removal_example` extends beyond the shape

VOCABULARY = sorted(
    {"a", "an", "and", "on", "background", ","} | set(COLOURS) | set(SHAPES) | set(_PATTERN_WORDS.values())
)
"""Every token a caption can contain (words and ","), sorted; see `caption_words`."""

TRAIN_SEEDS = range(50_000)
HELDOUT_SEEDS = range(1_000_000, 1_000_200)
"""Fixed, disjoint seed splits: train the demo model on the first, evaluate on the second."""


@dataclass(frozen=True)
class Background:
    """How the background was drawn. `colours` has one name (flat) or two (the others, first =
    top/left). `axis` is the image axis the colour changes along (0 = down the rows, 1 = across
    the columns) for gradients and stripes; `period` is the stripe/checker cell width in pixels."""

    kind: str
    colours: tuple[str, ...]
    axis: int | None = None
    period: int | None = None


@dataclass
class SceneShape:
    """One drawn shape. `mask` (bool, SIZE x SIZE) = the pixels where it is visible in the final
    image (later shapes occlude earlier ones); `box` = (left, top, right, bottom), right/bottom
    exclusive, of the whole shape as drawn, occluded parts included."""

    kind: str
    colour: str
    mask: np.ndarray
    box: tuple[int, int, int, int]


@dataclass
class Scene:
    image: PIL.Image.Image
    caption: str
    shapes: list[SceneShape]
    background: Background
    seed: int
    case: str = "standard"  # which of SCENE_CASES drew it


class RemovalExample(NamedTuple):
    """An inpainting task: fill `mask`'s hole (255) of `masked_image` (black there) given `prompt`;
    `target_colour` is the removed shape's RGB and `image` the full scene (the ground truth)."""

    masked_image: PIL.Image.Image
    mask: PIL.Image.Image
    prompt: str
    target_colour: tuple[int, int, int]
    image: PIL.Image.Image


# ---------------------------------------------------------------------------------- colours


def nearest_palette_colour(pixels) -> np.ndarray:
    """The index into PALETTE (COLOURS) of the nearest palette colour of each RGB pixel: (..., 3) -> (...)."""
    pixels = np.asarray(pixels)
    if pixels.shape[-1:] != (3,):
        raise ValueError(f"Expected RGB pixels of shape (..., 3); got {pixels.shape}.")
    # Squared Euclidean distance in int32: at most 3 * 255^2, no overflow, no float rounding ties.
    difference = pixels.astype(np.int32)[..., None, :] - _PALETTE_RGB
    return np.argmin((difference * difference).sum(axis=-1), axis=-1)


def colour_fraction(image, mask, colour_name: str) -> float:
    """The fraction of the pixels of `mask` (nonzero = counted) whose nearest palette colour is `colour_name`."""
    if colour_name not in PALETTE:
        raise ValueError(f"Unknown colour {colour_name!r}; the palette has {', '.join(COLOURS)}.")
    pixels = np.asarray(image.convert("RGB") if isinstance(image, PIL.Image.Image) else image)
    mask = np.asarray(mask) != 0
    if mask.shape != pixels.shape[:2]:
        raise ValueError(f"The mask is {mask.shape} but the image is {pixels.shape[:2]} (HxW).")
    if not mask.any():
        raise ValueError("The mask is empty: no pixels to take a colour fraction of.")
    return float(np.mean(nearest_palette_colour(pixels[mask]) == COLOURS.index(colour_name)))


# ---------------------------------------------------------------------------------- captions


def _with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def shape_caption(kind: str, colour: str) -> str:
    """The phrase naming one shape, e.g. "a red circle", "an orange star" (also the removal prompt)."""
    if kind not in SHAPES or colour not in PALETTE:
        raise ValueError(f"Unknown shape {kind!r} or colour {colour!r}.")
    return _with_article(f"{colour} {kind}")


def background_caption(background: Background) -> str:
    """e.g. "a yellow background", "a purple and orange striped background"."""
    if background.kind == "flat":
        return _with_article(f"{background.colours[0]} background")
    first, second = background.colours
    return _with_article(f"{first} and {second} {_PATTERN_WORDS[background.kind]} background")


def scene_caption(shapes: list[tuple[str, str]], background: Background) -> str:
    """The caption of (kind, colour) shapes, in drawing order, on a background."""
    phrases = [shape_caption(kind, colour) for kind, colour in shapes]
    listed = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return f"{listed} on {background_caption(background)}"


def caption_words(caption: str) -> list[str]:
    """A caption's tokens: its words, with each comma a token of its own (all in VOCABULARY)."""
    return caption.replace(",", " ,").split()


# ---------------------------------------------------------------------------------- drawing


def _flat_background(palette: np.ndarray, colour: int) -> tuple[np.ndarray, Background, np.ndarray]:
    """`_draw_background`'s triple for a plain background of `palette[colour]`."""
    pixels = np.broadcast_to(palette[colour].astype(np.uint8), (SIZE, SIZE, 3)).copy()
    return pixels, Background("flat", (COLOURS[colour],)), palette[[colour]]


def _draw_background(rng: np.random.Generator, palette: np.ndarray) -> tuple[np.ndarray, Background, np.ndarray]:
    """(SIZE, SIZE, 3) uint8 pixels in `palette`'s shades, their description, and the (N, 3) colours they use."""
    kind = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    first = int(rng.integers(len(COLOURS)))
    if kind == "flat":
        return _flat_background(palette, first)
    second = int(rng.choice([i for i in range(len(COLOURS)) if i != first]))
    colours = (COLOURS[first], COLOURS[second])
    rgb = palette[[first, second]]
    position = np.arange(SIZE)
    if kind == "checker":
        period = int(rng.integers(4, 9))
        cells = (position[:, None] // period + position[None, :] // period) % 2
        return rgb[cells].astype(np.uint8), Background(kind, colours, period=period), rgb
    axis = int(rng.integers(2))
    if kind == "gradient":
        t = (position / (SIZE - 1))[:, None]
        profile, period = np.rint(rgb[0] * (1 - t) + rgb[1] * t), None
    else:  # stripes
        period = int(rng.integers(4, 9))
        profile = rgb[(position // period) % 2]
    # The profile runs along `axis`; repeat it along the other one.
    line = profile[:, None, :] if axis == 0 else profile[None, :, :]
    pixels = np.broadcast_to(line, (SIZE, SIZE, 3)).astype(np.uint8)
    return pixels, Background(kind, colours, axis=axis, period=period), profile


def _shape_mask(kind: str, left: int, top: int, size: int) -> np.ndarray:
    """The bool (SIZE, SIZE) pixels of a shape in the size x size box at (left, top), hard-edged."""
    canvas = PIL.Image.new("1", (SIZE, SIZE), 0)
    draw = PIL.ImageDraw.Draw(canvas)  # ImageDraw never antialiases: edges stay exact
    right, bottom = left + size - 1, top + size - 1  # PIL boxes are inclusive
    centre_x, centre_y, radius = left + (size - 1) / 2, top + (size - 1) / 2, (size - 1) / 2
    if kind == "circle":
        draw.ellipse([left, top, right, bottom], fill=1)
    elif kind == "square":
        draw.rectangle([left, top, right, bottom], fill=1)
    elif kind == "triangle":
        draw.polygon([(centre_x, top), (right, bottom), (left, bottom)], fill=1)
    elif kind == "star":
        # Five points, upright; inner radius 0.45 (fatter than a geometric star) keeps small stars solid.
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, radius, 0.45 * radius)
        draw.polygon(list(zip(centre_x + radii * np.cos(angles), centre_y + radii * np.sin(angles))), fill=1)
    elif kind == "ring":
        draw.ellipse([left, top, right, bottom], outline=1, width=max(3, size // 4))
    else:
        raise ValueError(f"Unknown shape {kind!r}; expected one of {SHAPES}.")
    return np.asarray(canvas, dtype=bool)


def _bounding_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, columns = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return int(columns[0]), int(rows[0]), int(columns[-1]) + 1, int(rows[-1]) + 1


LAYOUTS = ("standard", "varied")
"""`make_scene` layouts: "standard" (the held-out scenes, the shipped model's training scenes) or
"varied": a quarter standard, the rest the simple cases a person tries first (`SCENE_CASES`)."""
SCENE_CASES = ("standard", "one-on-plain", "two", "overlap", "border")
_CASE_WEIGHTS = (0.25, 0.25, 0.15, 0.15, 0.2)
_VARIED_SALT = 0x5CE7E  # keeps a varied scene's draws apart from the standard scene of the same seed
_JITTER_SALT = 0xC0103  # the shades' own stream: a jittered scene keeps the layout of the plain one
MIN_OVERLAP = 0.15  # an "overlap" scene's second shape covers at least this much of the first


def _place(rng, kind: str, areas, visible, *, border: bool, near: tuple[int, int] | None, overlap_with=None):
    """A placement of `kind` that keeps every earlier shape MIN_VISIBLE in view (None if none found).

    `border`: the box may stick out of the image by up to half its side, and must (the shape is cut).
    `near`: the box's top-left is drawn around this point; `overlap_with`: the shape must cover at
    least MIN_OVERLAP of these pixels."""
    for _ in range(PLACEMENT_TRIES if near is None and not border else 3 * PLACEMENT_TRIES):
        size = int(rng.integers(MIN_SHAPE_SIZE, MAX_SHAPE_SIZE + 1))
        if border:
            left, top = (int(v) for v in rng.integers(-(size // 2), SIZE - size + size // 2 + 1, size=2))
        elif near is not None:
            left, top = (int(np.clip(c + rng.integers(-size // 2, size // 2 + 1), 0, SIZE - size)) for c in near)
        else:
            left, top = (int(v) for v in rng.integers(0, SIZE - size + 1, size=2))
        mask = _shape_mask(kind, left, top, size)
        if border and not (min(left, top) < 0 or max(left, top) + size > SIZE):
            continue
        if not mask.any():
            continue
        if overlap_with is not None and (overlap_with & mask).sum() < MIN_OVERLAP * overlap_with.sum():
            continue
        # Accept only if every earlier shape keeps MIN_VISIBLE of its own pixels in view.
        if all((seen & ~mask).sum() >= MIN_VISIBLE * area for area, seen in zip(areas, visible)):
            return mask, (left, top)
    return None


def jittered_palette(seed: int, jitter: int) -> np.ndarray:
    """The (8, 3) palette with each colour moved by up to `jitter` per channel, drawn from `seed`
    (its own stream), each shade still nearest its own colour so that captions stay true: "green"
    is then also PIL's darker (0, 128, 0) or a photo's. jitter 0: the palette itself."""
    if jitter == 0:
        return _PALETTE_RGB
    rng = np.random.default_rng([seed, _JITTER_SALT])
    shades = _PALETTE_RGB.copy()
    for index in range(len(COLOURS)):
        for _ in range(10):  # rejection: a shade that crossed into another colour's cell is drawn again
            shade = np.clip(_PALETTE_RGB[index] + rng.integers(-jitter, jitter + 1, size=3), 0, 255)
            if nearest_palette_colour(shade[None])[0] == index:
                shades[index] = shade
                break
    return shades


def make_scene(seed: int, layout: str = "standard", colour_jitter: int = 0) -> Scene:
    """The scene of `seed` in `layout` (LAYOUTS): identical on every call and machine (its own
    numpy Generator only). The standard layout is the one the held-out seeds are scored on.
    `colour_jitter` draws the scene in `jittered_palette` shades: the plain scene's layout and
    captions, except where a jittered gradient's in-between shades rule out other shape colours."""
    if layout not in LAYOUTS:
        raise ValueError(f"Unknown layout {layout!r}; expected one of {LAYOUTS}.")
    palette = jittered_palette(seed, colour_jitter)
    if layout == "standard":
        rng, case = np.random.default_rng(seed), "standard"
    else:
        rng = np.random.default_rng([seed, _VARIED_SALT])
        case = SCENE_CASES[int(rng.choice(len(SCENE_CASES), p=_CASE_WEIGHTS))]
    if case == "one-on-plain":
        pixels, background, shades = _flat_background(palette, int(rng.integers(len(COLOURS))))
    else:
        pixels, background, shades = _draw_background(rng, palette)
    # A shape colour must not occur in the background, including a gradient's in-between colours
    # (a red-to-yellow gradient is orange in the middle), so that every shape stands out.
    hidden = set(nearest_palette_colour(shades).tolist())
    allowed = [i for i in range(len(COLOURS)) if i not in hidden]
    count = {"one-on-plain": 1, "two": 2, "overlap": 2}.get(case)
    if count is None:
        count = int(rng.integers(1, (3 if case == "border" else MAX_SHAPES) + 1))
    areas: list[int] = []  # each shape's pixel count as drawn, occluded parts included
    visible: list[np.ndarray] = []  # each shape's visible pixels, updated as later shapes cover them
    shapes: list[SceneShape] = []
    origins: list[tuple[int, int]] = []
    for number in range(count):
        kind = SHAPES[rng.integers(len(SHAPES))]
        colour = allowed[rng.integers(len(allowed))]
        overlapping = case == "overlap" and number == 1 and visible
        placed = _place(rng, kind, areas, visible, border=case == "border" and number == 0,
                        near=origins[0] if overlapping else None, overlap_with=visible[0] if overlapping else None)
        if placed is None:
            continue  # no room for this shape: the scene has one shape fewer
        mask, origin = placed
        for seen in visible:
            seen &= ~mask
        areas.append(int(mask.sum()))
        visible.append(mask.copy())
        origins.append(origin)
        pixels[mask] = palette[colour]
        shapes.append(SceneShape(kind, COLOURS[colour], visible[-1], _bounding_box(mask)))
    caption = scene_caption([(shape.kind, shape.colour) for shape in shapes], background)
    return Scene(PIL.Image.fromarray(pixels, "RGB"), caption, shapes, background, seed, case)


def iter_scenes(seeds: Iterable[int], layout: str = "standard", colour_jitter: int = 0) -> Iterator[Scene]:
    """The scenes of `seeds`, in order, made lazily."""
    for seed in seeds:
        yield make_scene(int(seed), layout, colour_jitter)


# ---------------------------------------------------------------------------------- tasks and files


def dilate(mask: np.ndarray, pixels: int) -> np.ndarray:
    """`mask` grown by `pixels` in every direction, diagonals included (a square structuring element)."""
    grown = np.asarray(mask, dtype=bool)
    height, width = grown.shape
    for _ in range(pixels):
        padded = np.pad(grown, 1)
        grown = np.zeros_like(grown)
        for dy in range(3):
            for dx in range(3):
                grown |= padded[dy : dy + height, dx : dx + width]
    return grown


def removal_example(scene: Scene, index: int, *, dilation: int = REMOVAL_DILATION) -> RemovalExample:
    """Shape `index` of `scene` as an inpainting task: its mask grown by `dilation` pixels (so the
    hole also swallows the shape's outline) is the hole, blacked out in the masked image as
    BrushNet's `image * (1 - mask)` does, and the prompt names the shape."""
    shape = scene.shapes[index]
    hole = dilate(shape.mask, dilation)
    masked = np.asarray(scene.image).copy()
    masked[hole] = 0
    return RemovalExample(
        masked_image=PIL.Image.fromarray(masked, "RGB"),
        mask=PIL.Image.fromarray(hole.astype(np.uint8) * 255, "L"),
        prompt=shape_caption(shape.kind, shape.colour),
        target_colour=PALETTE[shape.colour],
        image=scene.image,
    )


def scene_stem(seed: int) -> str:
    """The file stem of a scene in `write_folder`'s output; zero-padded so file order = seed order."""
    return f"{seed:08d}"


def write_folder(out_dir, seeds: Iterable[int], *, masks: str | None = "segmentation",
                 layout: str = "standard", colour_jitter: int = 0) -> Path:
    """Write the scenes of `seeds` as a training folder for `brushnet.data.ImageFolderDataset`.

    Per scene: `{stem}.png`, `{stem}.txt` (the caption) and, with masks="segmentation",
    `{stem}.json` = {"mask": [rle, ...], "shapes": [{"kind", "colour"}, ...], "captions": [...],
    "background_caption"}, one column-major RLE (`rle_encode(mask, order="F")`) of each shape's
    visible pixels, in drawing order, with the phrase naming that shape ("a red circle") and the
    background's caption ("a yellow background"); masks=None
    writes no masks; `layout` and `colour_jitter` are `make_scene`'s. The folder is built next to
    `out_dir` and renamed into place at the end, so a crash leaves no half-written folder; an existing non-empty
    `out_dir` is refused.
    """
    if masks not in ("segmentation", None):
        raise ValueError(f'masks must be "segmentation" or None; got {masks!r}.')
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} exists and is not an empty folder; not overwriting it.")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Same parent, so the final rename stays on one file system (atomic on POSIX).
    temporary = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        for scene in iter_scenes(seeds, layout, colour_jitter):
            stem = scene_stem(scene.seed)
            scene.image.save(temporary / f"{stem}.png")
            (temporary / f"{stem}.txt").write_text(scene.caption + "\n", encoding="utf-8")
            if masks == "segmentation":
                background = background_caption(scene.background)
                segmentation = {
                    "mask": [rle_encode(shape.mask, order="F") for shape in scene.shapes],
                    "shapes": [{"kind": shape.kind, "colour": shape.colour} for shape in scene.shapes],
                    # What a person types for a hole over this shape ("a red circle") or over
                    # background only ("a yellow background"): the prompts the demo is used with.
                    "captions": [shape_caption(shape.kind, shape.colour) for shape in scene.shapes],
                    "background_caption": background,
                }
                (temporary / f"{stem}.json").write_text(json.dumps(segmentation), encoding="utf-8")
        os.chmod(temporary, 0o755)  # mkdtemp makes it private (0700); the result is an ordinary folder
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above); rename cannot replace it portably
        temporary.rename(out_dir)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return out_dir
