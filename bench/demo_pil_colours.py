"""The demo model on pictures drawn in PIL's own colour names, the way a user's script draws them.

PIL's names are not the demo palette's shades ("green" is (0, 128, 0), the scenes' (20, 170, 40)).
For every 7th (background, circle, asked) triple of distinct names among red, green, blue, yellow,
white, black, orange and purple (48 cases): a 64x64 picture of a circle on a plain background;

- the circle under a hole 4 px wider, the prompt "a {asked} circle": the fraction of the circle's
  pixels whose nearest palette colour is the one asked for (at target: >= 80 %);
- a stroke 6 px wide over the background only, the prompt "a {background} background": the
  fraction of the stroke's pixels whose nearest palette colour is the background's (>= 90 %).

25 steps, the CLI's scheduler and blending, seed 0.

    OMP_NUM_THREADS=1 python bench/demo_pil_colours.py [--model DIR]
"""

import argparse

import numpy as np
import PIL.Image
import PIL.ImageColor
import PIL.ImageDraw
import torch

from brushnet.demo.model import DEMO_MODEL_DIR
from brushnet.demo.scenes import SIZE, nearest_palette_colour
from brushnet.inpaint import InpaintSettings, default_blend_kernel, inpaint
from brushnet.loading import load_pipeline
from brushnet.schedulers import make_scheduler

NAMES = ("red", "green", "blue", "yellow", "white", "black", "orange", "purple")
CIRCLE = (18, 18, 46, 46)
STROKE = [(4, 56), (30, 58), (60, 52)]


def disc(box, grow: int = 0) -> PIL.Image.Image:
    mask = PIL.Image.new("L", (SIZE, SIZE), 0)
    PIL.ImageDraw.Draw(mask).ellipse([box[0] - grow, box[1] - grow, box[2] + grow, box[3] + grow], fill=255)
    return mask


def named(pixels: np.ndarray, name: str) -> np.ndarray:
    """Whether each pixel's nearest palette colour is PIL's `name` colour's nearest."""
    return nearest_palette_colour(pixels) == nearest_palette_colour(np.asarray(PIL.ImageColor.getrgb(name))[None])[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEMO_MODEL_DIR), help="a BrushNet pipeline folder (default: the demo model)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    pipe = load_pipeline(args.model, f"{args.model}/brushnet", torch_dtype=torch.float32)
    pipe.scheduler = make_scheduler("unipc", pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    settings = dict(steps=25, seed=0, blend_kernel=default_blend_kernel(pipe))
    triples = [(b, f, n) for b in NAMES for f in NAMES for n in NAMES if len({b, f, n}) == 3][::7]
    circles, strokes = [], []
    print("| background | circle | asked | circle in the colour asked | stroke in the background's |")
    print("|---|---|---|---|---|")
    for background, colour, asked in triples:
        image = PIL.Image.new("RGB", (SIZE, SIZE), background)
        PIL.ImageDraw.Draw(image).ellipse(CIRCLE, fill=colour)
        result = np.asarray(inpaint(pipe, image, disc(CIRCLE, 4), InpaintSettings(
            prompt=f"a {asked} circle", **settings))[0].convert("RGB"))
        circles.append(float(named(result[np.asarray(disc(CIRCLE)) > 0], asked).mean()))
        stroke = PIL.Image.new("L", (SIZE, SIZE), 0)
        PIL.ImageDraw.Draw(stroke).line(STROKE, fill=255, width=6)
        result = np.asarray(inpaint(pipe, image, stroke, InpaintSettings(
            prompt=f"a {background} background", **settings))[0].convert("RGB"))
        strokes.append(float(named(result[np.asarray(stroke) > 0], background).mean()))
        print(f"| {background} | {colour} | {asked} | {circles[-1]:.2f} | {strokes[-1]:.2f} |", flush=True)
    print(f"\ncircles at target (>= 80 %): {np.mean(np.array(circles) >= 0.8):.1%} (mean {np.mean(circles):.3f}); "
          f"strokes at target (>= 90 %): {np.mean(np.array(strokes) >= 0.9):.1%} (mean {np.mean(strokes):.3f}); "
          f"{len(triples)} cases")


if __name__ == "__main__":
    main()
