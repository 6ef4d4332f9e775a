"""The demo model on holes drawn the way a person draws them, on pictures drawn with PIL (not the
scene generator): one shape on a plain background with a hole wider than it, a box over a square,
a free-hand stroke over the background alone. Issue 11's examples, through `brushnet inpaint`'s
path (blending on, 25 steps) and, once, through the command line itself.

Each case runs a few seeds; the bounds are the measured values (BENCHMARKS.md, "Holes people
draw") with a margin, so a regression of the shipped model fails here.
"""

import math

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from brushnet.cli import main
from brushnet.demo.model import load_demo_pipeline
from brushnet.demo.scenes import PALETTE, nearest_palette_colour
from brushnet.inpaint import InpaintSettings, inpaint

SIZE, STEPS, SEEDS = 64, 25, (0, 1, 2)
# (scene colour of the shape, background, colour the prompt asks for): the examples and
# the same pictures asked for another colour.
CIRCLES = [("red", "yellow", "red"), ("green", "black", "green"), ("blue", "white", "blue"),
           ("blue", "yellow", "red"), ("red", "white", "green"), ("green", "orange", "purple")]
BOXES = [("blue", "green", "blue"), ("yellow", "purple", "white"), ("orange", "white", "blue")]
STROKE_BACKGROUNDS = ("blue", "white", "yellow", "green")
# Measured (mean over the cases and seeds above): the shipped model (stage 7) circles 0.880, boxes
# 0.969, background strokes 0.981; stage 6 0.862, 0.973 and 0.957; stage 5 0.849, 0.960 and 0.858;
# stage 4 (the first drawn-holes BrushNet on the 5500-step base) 0.593, 0.656 and 0.327; the first
# BrushNet (exact shape masks only) 0.376, 0.547 and 0.008. The bounds keep a margin below the
# shipped model's and fail stage 4 and the first BrushNet.
CIRCLE_NAMED_MIN = 0.70
BOX_NAMED_MIN = 0.80
STROKE_BACKGROUND_MIN = 0.70
# The same pictures in PIL's own colour names, not the palette's: PIL's green is (0, 128, 0) where
# the scenes' is (20, 170, 40), its purple (128, 0, 128), its orange (255, 165, 0). Measured: the
# shipped model (stage 7, trained on jittered shades) circles 0.924, strokes over background 0.970;
# stage 6 (palette shades only) 0.987 and 0.881: a stroke over PIL's green came back black. The
# stroke bound fails stage 6.
PIL_CIRCLES = [("red", "green", "blue"), ("black", "green", "orange"), ("blue", "purple", "yellow"),
               ("white", "orange", "green")]
PIL_STROKE_BACKGROUNDS = ("green", "purple", "orange", "blue")
PIL_CIRCLE_NAMED_MIN = 0.80
PIL_STROKE_BACKGROUND_MIN = 0.92
CLI_NAMED_MIN = 0.8  # the command-line case (blue circle, "a red circle ...", seed 0): measured 1.0
KEPT_EXACT_BEYOND = 3  # px: blending leaves every pixel this far from the hole as it was


@pytest.fixture(scope="module")
def pipe():
    pipe = load_demo_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def picture(background: str, draw_shape, colours=PALETTE) -> Image.Image:
    """`draw_shape` on a plain background; `colours` maps names to RGB (PALETTE, or PIL's own names)."""
    image = Image.new("RGB", (SIZE, SIZE), colours[background])
    draw_shape(ImageDraw.Draw(image))
    return image


class PilColours:
    """PIL's colour names as `picture` colours: ImageColor's RGB for each name."""

    def __getitem__(self, name):
        from PIL import ImageColor

        return ImageColor.getrgb(name)


def disc(centre, radius) -> np.ndarray:
    rows, cols = np.mgrid[:SIZE, :SIZE]
    return (rows - centre[1]) ** 2 + (cols - centre[0]) ** 2 <= radius ** 2


def stroke(points, width) -> np.ndarray:
    canvas = Image.new("L", (SIZE, SIZE), 0)
    draw = ImageDraw.Draw(canvas)
    draw.line(points, fill=255, width=width, joint="curve")
    for x, y in (points[0], points[-1]):
        draw.ellipse([x - width / 2, y - width / 2, x + width / 2, y + width / 2], fill=255)
    return np.asarray(canvas) > 127


def fill(pipe, image, hole, prompt, seed) -> np.ndarray:
    mask = Image.fromarray(hole.astype(np.uint8) * 255)
    return np.asarray(inpaint(pipe, image, mask, InpaintSettings(prompt=prompt, steps=STEPS, seed=seed))[0])


def named_fraction(result, where, colour) -> float:
    return float(np.mean(nearest_palette_colour(result[where]) == list(PALETTE).index(colour)))


def grown(hole, pixels) -> np.ndarray:
    return np.asarray(Image.fromarray(hole.astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(2 * pixels + 1))) > 127


def check_kept(result, image, hole):
    far = ~grown(hole, KEPT_EXACT_BEYOND)
    assert np.array_equal(result[far], np.asarray(image)[far]), "blending changed pixels away from the hole"


def circle_case(shape_colour, background, asked, colours=PALETTE):
    """(picture, the circle's pixels, a hole 4 px wider, prompt, the colour asked for)."""
    centre, radius = (31, 30), 10
    image = picture(background, lambda d: d.ellipse([centre[0] - radius, centre[1] - radius,
                                                     centre[0] + radius, centre[1] + radius],
                                                    fill=colours[shape_colour]), colours)
    return (image, disc(centre, radius), disc(centre, radius + 4),
            f"a {asked} circle on a {background} background", asked)


def box_case(square_colour, background, asked):
    """(picture, the square's pixels, a box 3 px wider, prompt, the colour asked for)."""
    image = picture(background, lambda d: d.rectangle([22, 20, 41, 39], fill=PALETTE[square_colour]))
    square, hole = np.zeros((SIZE, SIZE), dtype=bool), np.zeros((SIZE, SIZE), dtype=bool)
    square[20:40, 22:42] = True
    hole[17:43, 19:45] = True
    return image, square, hole, f"a {asked} square on a {background} background", asked


def background_stroke_case(number, background, colours=PALETTE):
    """(picture with a shape in a corner, the stroke, the stroke, prompt, the background colour)."""
    other = "red" if background != "red" else "blue"
    image = picture(background, lambda d: d.rectangle([44, 44, 58, 58], fill=colours[other]), colours)
    angle = number * math.pi / 5
    hole = stroke([(8 + 4 * math.cos(angle), 12), (24, 26 + 6 * math.sin(angle)), (36, 14)], 7)  # clear of the shape
    return image, hole, hole, f"a {background} background", background


def scored(pipe, cases, what) -> float:
    """Mean fraction of each case's scored pixels in its colour, over the cases and SEEDS."""
    fractions = []
    for image, region, hole, prompt, colour in cases:
        for seed in SEEDS:
            result = fill(pipe, image, hole, prompt, seed)
            check_kept(result, image, hole)
            fractions.append(named_fraction(result, region, colour))
    print(f"{what}:", np.round(fractions, 2), f"mean {np.mean(fractions):.3f}")
    return float(np.mean(fractions))


def test_a_hole_wider_than_a_circle_comes_back_the_colour_asked_for(pipe):
    assert scored(pipe, [circle_case(*c) for c in CIRCLES], "circles") > CIRCLE_NAMED_MIN


def test_a_box_over_a_square_comes_back_the_square_asked_for(pipe):
    assert scored(pipe, [box_case(*c) for c in BOXES], "boxes") > BOX_NAMED_MIN


def test_a_stroke_over_plain_background_comes_back_background(pipe):
    cases = [background_stroke_case(n, b) for n, b in enumerate(STROKE_BACKGROUNDS)]
    assert scored(pipe, cases, "strokes over background") > STROKE_BACKGROUND_MIN


def test_pictures_in_pils_colour_names(pipe):
    circles = scored(pipe, [circle_case(*c, colours=PilColours()) for c in PIL_CIRCLES], "PIL circles")
    strokes = scored(pipe, [background_stroke_case(n, b, PilColours()) for n, b in enumerate(PIL_STROKE_BACKGROUNDS)],
                     "PIL strokes over background")
    assert circles > PIL_CIRCLE_NAMED_MIN and strokes > PIL_STROKE_BACKGROUND_MIN


def test_the_command_line_paints_the_colour_asked_for(tmp_path):
    image, shape, hole, prompt, _ = circle_case("blue", "yellow", "red")
    image.save(tmp_path / "circle.png")
    Image.fromarray(hole.astype(np.uint8) * 255).save(tmp_path / "hole.png")
    out = tmp_path / "result.png"
    assert main(["inpaint", str(tmp_path / "circle.png"), str(tmp_path / "hole.png"), "-p", prompt,
                 "--steps", str(STEPS), "--seed", "0", "-o", str(out)]) == 0
    result = np.asarray(Image.open(out).convert("RGB"))
    check_kept(result, image, hole)
    assert named_fraction(result, shape, "red") > CLI_NAMED_MIN
