"""What `brushnet_every=k` (the branch's residuals reused for k-1 steps) costs in quality and saves
in time, on the built-in demo model's held-out scenes: the top shape removed, the prompt naming it.

    OMP_NUM_THREADS=1 .venv/bin/python bench/branch_reuse_quality.py --scenes 100 --steps 25 --every 1 2 3

Per k: the mean fraction of the removed shape's pixels that come back in the named colour, the
fraction of scenes where that is at least 80 %, the kept region's PSNR (blending on), and seconds
per image.
"""

import argparse
import time

import numpy as np

from brushnet.demo.model import load_demo_pipeline
from brushnet.demo.scenes import HELDOUT_SEEDS, colour_fraction, make_scene, removal_example
from brushnet.inpaint import InpaintSettings, inpaint


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=100)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--every", type=int, nargs="+", default=[1, 2, 3])
    args = parser.parse_args()

    pipe = load_demo_pipeline()
    pipe.set_progress_bar_config(disable=True)
    examples = []
    for seed in HELDOUT_SEEDS[: args.scenes]:
        scene = make_scene(seed)
        index = len(scene.shapes) - 1  # the top shape: nothing hides any of it
        examples.append((scene, removal_example(scene, index), scene.shapes[index]))

    print(f"{args.scenes} held-out scenes, {args.steps} steps, blending on")
    print("| k | named colour (mean) | scenes >= 80 % | kept PSNR (dB) | s/image |")
    print("| --- | --- | --- | --- | --- |")
    for every in args.every:
        fractions, psnrs, seconds = [], [], 0.0
        for k, (scene, example, shape) in enumerate(examples):
            settings = InpaintSettings(prompt=example.prompt, steps=args.steps, seed=k, brushnet_every=every)
            start = time.perf_counter()
            result = inpaint(pipe, example.masked_image, example.mask, settings)[0]
            seconds += time.perf_counter() - start
            fractions.append(colour_fraction(result, shape.mask, shape.colour))
            kept = np.asarray(example.mask) == 0
            error = (np.asarray(result, np.float64)[kept] - np.asarray(scene.image, np.float64)[kept]) / 255
            psnrs.append(10 * np.log10(1 / max(np.mean(error**2), 1e-10)))
        fractions = np.array(fractions)
        print(f"| {every} | {fractions.mean():.3f} | {(fractions >= 0.8).mean():.3f} | {np.mean(psnrs):.2f} | "
              f"{seconds / len(examples):.3f} |")


if __name__ == "__main__":
    main()
