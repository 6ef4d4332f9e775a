"""The paper's comparison in miniature, on the demo model's held-out scenes, per kind of hole.

For every held-out scene the top shape (the last drawn) is the target, and each mask kind makes a
hole a person might draw:

- exact: the shape's own visible pixels;
- grown: the shape grown by 3-6 px;
- box: the shape's bounding box, 1-3 px wider;
- stroke-across: a straight brush stroke 5-9 px wide through the shape's centre, longer than the shape;
- background-stroke: a free stroke (two to four segments, 5-9 px wide) over the background only:
  every pixel within 2 px of a shape is taken out of it;
- removal: the shape grown by 2 px (`removal_example`, the hole of tests/test_demo_model.py).

Each hole's randomness comes from the scene's seed and the kind, so every method sees the same hole.
The prompt names the shape ("a red circle"; `--prompt scene`: "a red circle on a yellow
background", a one-shape scene's caption); for background strokes it names the background ("a
yellow background"). Methods:

- brushnet+blend: the demo model through `brushnet.inpaint` (the CLI's path) with blurred blending;
- blended-latent: the same base model without BrushNet, sampling with the known region re-noised
  and pasted into the latent at every step, only the hole left to the model (the "sampling
  strategy" family the paper compares to; Avrahami et al., Blended Latent Diffusion);
- masked-image: the hole left as the masked image has it (black): a floor, not a method;
- vae-roundtrip: the scene's own latent decoded and blended as the CLI blends: the ceiling of any
  method that decodes through this VAE, not a method (`--vae DIR` swaps in another VAE, e.g. a
  build's before it has a base).

Scores: kept-region PSNR ([0, 1] pixels, per channel; for brushnet+blend also before blending, where a
branch that lets the whole image drift in colour shows); for the shape kinds, the fraction of the
target shape's pixels inside the hole whose nearest palette colour is the named one ("named"),
and the fraction of scenes where that is at least 80 % ("scenes >= 80 %", the issue's target);
for background strokes, the fraction of hole pixels whose nearest palette colour is the true
background's there, and the fraction of scenes where that is at least 90 %.

    OMP_NUM_THREADS=1 python bench/demo_quality.py [--scenes 200] [--steps 25] [--kinds exact grown ...]
        [--colour-jitter 45]
        [--methods brushnet+blend blended-latent masked-image vae-roundtrip] [--model DIR] [--brushnet DIR]
        [--vae DIR] [--json FILE] [--cfg-cutoff R] [--latent-blend]
    python bench/demo_quality.py --merge first.json second.json   # runs over disjoint scenes, one table
"""

import argparse
import json
import math
import time

import numpy as np
import PIL.Image
import PIL.ImageDraw
import torch
import torch.nn.functional as F

from brushnet.demo.model import DEMO_MODEL_DIR
from brushnet.demo.scenes import (
    HELDOUT_SEEDS,
    SHAPES,
    SIZE,
    background_caption,
    colour_fraction,
    dilate,
    make_scene,
    nearest_palette_colour,
    shape_caption,
)
from brushnet.inpaint import InpaintSettings, default_blend_kernel, inpaint
from brushnet.loading import load_pipeline
from brushnet.pipelines.blending import blend
from brushnet.schedulers import make_scheduler

METHODS = ("brushnet+blend", "blended-latent", "masked-image", "vae-roundtrip")
KINDS = ("exact", "grown", "box", "stroke-across", "background-stroke", "removal")
DEFAULT_KINDS = KINDS[:5]
BROKEN_DOWN = ("brushnet+blend", "vae-roundtrip")  # the methods whose losses `breakdown` locates
SHAPE_TARGET, BACKGROUND_TARGET = 0.8, 0.9  # the adherence thresholds


def to_tensor(image: PIL.Image.Image) -> torch.Tensor:
    """(1, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32)).permute(2, 0, 1)[None] / 127.5 - 1


def _line(points, width: int) -> np.ndarray:
    canvas = PIL.Image.new("1", (SIZE, SIZE), 0)
    draw = PIL.ImageDraw.Draw(canvas)
    draw.line(points, fill=1, width=width)
    for x, y in points:  # round joints and ends, as a brush leaves them
        draw.ellipse([x - width / 2, y - width / 2, x + width / 2, y + width / 2], fill=1)
    return np.asarray(canvas, dtype=bool)


def make_hole(scene, kind: str, seed: int) -> np.ndarray | None:
    """The bool hole of `kind` for `scene`'s top shape (None: no background stroke fits this scene)."""
    rng = np.random.default_rng([seed, KINDS.index(kind)])
    shape = scene.shapes[-1].mask
    if kind == "exact":
        return shape.copy()
    if kind == "removal":
        return dilate(shape, 2)
    if kind == "grown":
        return dilate(shape, int(rng.integers(3, 7)))
    if kind == "box":
        margin = int(rng.integers(1, 4))
        rows, columns = np.flatnonzero(shape.any(axis=1)), np.flatnonzero(shape.any(axis=0))
        hole = np.zeros_like(shape)
        top, left = max(rows[0] - margin, 0), max(columns[0] - margin, 0)
        hole[top:rows[-1] + 1 + margin, left:columns[-1] + 1 + margin] = True
        return hole
    if kind == "stroke-across":
        rows, columns = np.nonzero(shape)
        centre_y, centre_x = rows.mean(), columns.mean()
        reach = 0.75 * max(np.ptp(rows), np.ptp(columns)) + 4
        angle = rng.uniform(0, math.pi)
        dx, dy = reach * math.cos(angle), reach * math.sin(angle)
        return _line([(centre_x - dx, centre_y - dy), (centre_x + dx, centre_y + dy)], int(rng.integers(5, 10)))
    # background-stroke
    forbidden = dilate(np.logical_or.reduce([s.mask for s in scene.shapes]), 2)
    for _ in range(20):
        points = [tuple(rng.uniform(4, SIZE - 4, size=2))]
        for _ in range(int(rng.integers(2, 5))):
            angle, length = rng.uniform(0, 2 * math.pi), rng.uniform(8, 24)
            x, y = points[-1]
            points.append((float(np.clip(x + length * math.cos(angle), 0, SIZE - 1)),
                           float(np.clip(y + length * math.sin(angle), 0, SIZE - 1))))
        hole = _line(points, int(rng.integers(5, 10))) & ~forbidden
        if hole.sum() >= 40:
            return hole
    return None


@torch.no_grad()
def blended_latent_inpaint(pipe, image, mask, prompt, steps, guidance, seed) -> PIL.Image.Image:
    """Base-model inpainting by latent blending: after every step the known region is replaced by
    the original's latent noised to the next step's level, so the model only shapes the hole."""
    device = pipe.unet.device
    latents_known = pipe.vae.encode(to_tensor(image).to(device)).latent_dist.mode() * pipe.vae.config.scaling_factor
    hole = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255)[None, None].to(device)
    # A latent cell belongs to the hole if any of its pixels does, so no hole pixel is decoded from
    # the known latent.
    hole = F.max_pool2d(hole, pipe.vae_scale_factor)
    positive, negative = pipe.encode_prompt(prompt, device, 1, True, "")
    embeddings = torch.cat([negative, positive])

    generator = torch.Generator().manual_seed(seed)
    scheduler = pipe.scheduler
    scheduler.set_timesteps(steps, device=device)
    latents = torch.randn(latents_known.shape, generator=generator).to(device) * scheduler.init_noise_sigma
    noise = torch.randn(latents_known.shape, generator=generator).to(device)
    timesteps = scheduler.timesteps
    for i, t in enumerate(timesteps):
        model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        uncond, cond = pipe.unet(model_input, t, encoder_hidden_states=embeddings).sample.chunk(2)
        latents = scheduler.step(uncond + guidance * (cond - uncond), t, latents).prev_sample
        known = latents_known if i + 1 == len(timesteps) else scheduler.add_noise(
            latents_known, noise, timesteps[i + 1:i + 2])
        latents = hole * latents + (1 - hole) * known
    decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return pipe.image_processor.postprocess(decoded, output_type="pil")[0]


def sampling_callbacks(pipe, image, hole: np.ndarray, seed: int, args) -> dict:
    """brushnet+blend's sampling options, as step-end callbacks through InpaintSettings.extra:
    `--cfg-cutoff R`, diffusers' SDCFGCutoffCallback (guidance off after that fraction of the steps);
    `--latent-blend`, BrushNet with the known latent cells replaced after every step by the image's
    latent noised to the next step's level, as blended-latent sampling does (64x64 scenes: no
    resizing, so the latent grid is the pipeline's)."""
    callbacks = []
    if args.cfg_cutoff is not None:
        from diffusers.callbacks import SDCFGCutoffCallback

        callbacks.append(SDCFGCutoffCallback(cutoff_step_ratio=args.cfg_cutoff))
    if args.latent_blend:
        with torch.no_grad():
            known = pipe.vae.encode(to_tensor(image)).latent_dist.mode() * pipe.vae.config.scaling_factor
        cells = F.max_pool2d(torch.from_numpy(hole.astype(np.float32))[None, None], pipe.vae_scale_factor)
        noise = torch.randn(known.shape, generator=torch.Generator().manual_seed(10_000 + seed))

        def latent_blend(pipe_, i, t, kwargs):
            timesteps = pipe_.scheduler.timesteps
            level = known if i + 1 == len(timesteps) else pipe_.scheduler.add_noise(known, noise, timesteps[i + 1:i + 2])
            return {"latents": cells * kwargs["latents"] + (1 - cells) * level}
        callbacks.append(latent_blend)
    if not callbacks:
        return {}

    def step_end(pipe_, i, t, kwargs):
        outputs = {}
        for callback in callbacks:
            outputs.update(callback(pipe_, i, t, {**kwargs, **outputs}))
        return outputs
    return {"callback_on_step_end": step_end, "callback_on_step_end_tensor_inputs": ["latents", "prompt_embeds"]}


@torch.no_grad()
def vae_roundtrip(pipe, image: PIL.Image.Image) -> PIL.Image.Image:
    """`image` through the VAE and back (its latent's mode): what a perfect generator would decode."""
    latents = pipe.vae.encode(to_tensor(image).to(pipe.vae.dtype)).latent_dist.mode()
    return pipe.image_processor.postprocess(pipe.vae.decode(latents).sample, output_type="pil")[0]


def psnr(a: np.ndarray, b: np.ndarray, where: np.ndarray) -> float:
    """PSNR (dB) per channel over the pixels of `where`, images in [0, 255] -> [0, 1]."""
    mse = float(np.mean(((a[where].astype(np.float64) - b[where]) / 255) ** 2))
    return 100.0 if mse < 1e-10 else 10 * math.log10(1 / mse)


def score(result, scene, hole: np.ndarray, kind: str) -> dict:
    ours, truth = np.asarray(result.convert("RGB")), np.asarray(scene.image.convert("RGB"))
    row = {"kept_psnr": psnr(ours, truth, ~hole)}
    if kind == "background-stroke":
        same = nearest_palette_colour(ours[hole]) == nearest_palette_colour(truth[hole])
        row["adherence"] = float(same.mean())
        row["success"] = float(row["adherence"] >= BACKGROUND_TARGET)
    else:
        shape = scene.shapes[-1]
        row["adherence"] = colour_fraction(ours, shape.mask & hole, shape.colour)
        row["success"] = float(row["adherence"] >= SHAPE_TARGET)
    return row


def prompt_for(scene, kind: str, form: str) -> str:
    if kind == "background-stroke":
        return background_caption(scene.background)
    shape = scene.shapes[-1]
    phrase = shape_caption(shape.kind, shape.colour)
    return phrase if form == "shape" else f"{phrase} on {background_caption(scene.background)}"


def report(rows: dict) -> dict:
    """Print the table of `rows` ({kind: {method: [scene scores]}}) and return its means."""
    summary = {}
    print("| mask kind | scenes | method | kept PSNR (dB) | named / background colour | scenes >= target |")
    print("|---|---|---|---|---|---|")
    for kind, methods in rows.items():
        summary[kind] = {}
        for method, scored in methods.items():
            means = {key: float(np.mean([r[key] for r in scored])) for key in ("kept_psnr", "adherence", "success")}
            means["scenes"] = len(scored)
            summary[kind][method] = means
            kept = "exact" if means["kept_psnr"] >= 100 else f"{means['kept_psnr']:.2f}"
            print(f"| {kind} | {len(scored)} | {method} | {kept} | {means['adherence']:.3f} | {means['success']:.3f} |")
    return summary


def raw_kept(rows: dict, method: str = "brushnet+blend") -> None:
    """The kept region's PSNR before blending, per kind (runs that recorded it)."""
    means = {kind: np.mean([r["raw_kept_psnr"] for r in methods[method]]) for kind, methods in rows.items()
             if method in methods and methods[method] and all("raw_kept_psnr" in r for r in methods[method])}
    if means:
        print(f"\n{method} before blending, kept PSNR (dB): "
              + ", ".join(f"{kind} {value:.1f}" for kind, value in means.items()))


def breakdown(rows: dict, method: str = "brushnet+blend") -> None:
    """Scenes at target per target shape and per background (flat or patterned) for `method`:
    where the totals lose their scenes."""
    scored = {kind: methods[method] for kind, methods in rows.items() if method in methods}
    if not scored or not all("shape" in r for rs in scored.values() for r in rs):
        return  # runs written before these fields were recorded
    groups = [("shape", s) for s in SHAPES] + [("background", "flat"), ("background", "patterned")]
    print(f"\n{method}, scenes at target by the target's shape and by background:\n")
    print("| mask kind | " + " | ".join(name for _, name in groups) + " |")
    print("|---|" + "---|" * len(groups))
    for kind, rs in scored.items():
        cells = []
        for field, name in groups:
            picked = [r["success"] for r in rs
                      if (r[field] == name if name != "patterned" else r[field] != "flat")]
            cells.append(f"{100 * np.mean(picked):.0f} % ({len(picked)})" if picked else "-")
        print(f"| {kind} | " + " | ".join(cells) + " |")


def merge(paths: list[str]) -> None:
    """One table from the --json files of runs over different scenes (e.g. one per core)."""
    rows = {}
    for path in paths:
        with open(path) as f:
            for kind, methods in json.load(f)["rows"].items():
                for method, scored in methods.items():
                    rows.setdefault(kind, {}).setdefault(method, []).extend(scored)
    for methods in rows.values():
        for method, scored in methods.items():
            scenes = [r["scene"] for r in scored]
            if len(set(scenes)) != len(scenes):
                raise SystemExit(f"error: the files score some scenes twice ({method}); merge runs over disjoint scenes.")
    report(rows)
    raw_kept(rows)
    for method in BROKEN_DOWN:
        breakdown(rows, method)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEMO_MODEL_DIR),
                        help="a BrushNet pipeline folder (default: the demo model)")
    parser.add_argument("--brushnet", help="a BrushNet folder (default: MODEL/brushnet)")
    parser.add_argument("--scenes", type=int, default=len(HELDOUT_SEEDS))
    parser.add_argument("--first", type=int, default=0, help="start at this held-out scene")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--guidance-rescale", type=float, default=0.0,
                        help="brushnet methods: the pipelines' guidance_rescale (0: plain guidance)")
    parser.add_argument("--kinds", nargs="+", default=list(DEFAULT_KINDS), choices=KINDS)
    parser.add_argument("--cfg-cutoff", type=float, metavar="R",
                        help="brushnet+blend: guidance only for the first R of the steps (SDCFGCutoffCallback)")
    parser.add_argument("--latent-blend", action="store_true",
                        help="brushnet+blend: also paste the known region's noised latent after every step")
    parser.add_argument("--methods", nargs="+", default=list(METHODS[:3]), choices=METHODS)
    parser.add_argument("--vae", help="a VAE folder to decode with instead of MODEL/vae (its encoder must be the "
                                      "model's for brushnet+blend and blended-latent to mean anything)")
    parser.add_argument("--prompt", default="shape", choices=["shape", "scene"])
    parser.add_argument("--colour-jitter", type=int, default=0, metavar="N",
                        help="draw the held-out scenes in shades up to N per channel off the palette "
                             "(brushnet.demo.scenes.jittered_palette): colours as PIL or a photo has them")
    parser.add_argument("--json", help="also write the means and every scene's scores here")
    parser.add_argument("--merge", nargs="+", metavar="JSON",
                        help="print one table from the --json files of earlier runs (over disjoint scenes) and exit")
    args = parser.parse_args()
    if args.merge:
        return merge(args.merge)
    torch.set_num_threads(1)
    pipe = load_pipeline(args.model, args.brushnet or f"{args.model}/brushnet", torch_dtype=torch.float32)
    # The CLI's default --scheduler (UniPC ending at sigma_min), not the folder's own config.
    pipe.scheduler = make_scheduler("unipc", pipe.scheduler.config)
    if args.vae:
        from diffusers import AutoencoderKL

        pipe.register_modules(vae=AutoencoderKL.from_pretrained(args.vae, torch_dtype=torch.float32))
    pipe.set_progress_bar_config(disable=True)
    kernel = default_blend_kernel(pipe)

    rows = {kind: {m: [] for m in args.methods} for kind in args.kinds}
    seconds = {m: 0.0 for m in args.methods}
    skipped = {kind: 0 for kind in args.kinds}
    numbers = range(args.first, args.first + args.scenes)
    for number in numbers:
        scene = make_scene(HELDOUT_SEEDS[number], colour_jitter=args.colour_jitter)
        for kind in args.kinds:
            hole = make_hole(scene, kind, HELDOUT_SEEDS[number])
            if hole is None:
                skipped[kind] += 1
                continue
            mask = PIL.Image.fromarray(hole.astype(np.uint8) * 255, "L")
            prompt = prompt_for(scene, kind, args.prompt)
            for method in args.methods:
                start = time.perf_counter()
                if method == "brushnet+blend":
                    extra = sampling_callbacks(pipe, scene.image, hole, number, args)
                    settings = InpaintSettings(prompt=prompt, steps=args.steps, guidance=args.guidance, seed=number,
                                               guidance_rescale=args.guidance_rescale, blend=False, extra=extra)
                    raw = inpaint(pipe, scene.image, mask, settings)[0]
                    # Exactly what inpaint(blend=True) returns for this generation.
                    result = blend(scene.image, raw, mask, kernel)
                    # Before blending: how well the branch holds the known region. A drifting one
                    # (colours shifted over the whole image) shows here, hidden by the blending.
                    kept_before_blending = psnr(np.asarray(raw.convert("RGB")), np.asarray(scene.image.convert("RGB")), ~hole)
                elif method == "blended-latent":
                    result = blended_latent_inpaint(pipe, scene.image, mask, prompt, args.steps, args.guidance, number)
                elif method == "vae-roundtrip":
                    result = blend(scene.image, vae_roundtrip(pipe, scene.image), mask, kernel)
                else:
                    masked = np.asarray(scene.image).copy()
                    masked[hole] = 0
                    result = PIL.Image.fromarray(masked, "RGB")
                seconds[method] += time.perf_counter() - start
                row = {"scene": number, "shape": scene.shapes[-1].kind, "background": scene.background.kind,
                       **score(result, scene, hole, kind)}
                if method == "brushnet+blend":
                    row["raw_kept_psnr"] = kept_before_blending
                rows[kind][method].append(row)

    jitter = f", shades jittered by up to {args.colour_jitter}" if args.colour_jitter else ""
    sampling = (f", guidance for the first {args.cfg_cutoff:g} of the steps" if args.cfg_cutoff is not None else "") + \
        (", latent blending" if args.latent_blend else "")
    print(f"held-out scenes {args.first}-{args.first + args.scenes - 1}, {args.steps} steps, guidance {args.guidance}, "
          f"prompt form {args.prompt!r}{jitter}{sampling}\n")
    summary = report(rows)
    raw_kept(rows)
    for method in BROKEN_DOWN:
        breakdown(rows, method)
    images = sum(len(rows[k][m]) for k in args.kinds for m in args.methods) / max(len(args.methods), 1)
    print("\ns/image: " + ", ".join(f"{m} {seconds[m] / max(images, 1):.2f}" for m in args.methods))
    if any(skipped.values()):
        print("skipped (no background stroke fits): " + ", ".join(f"{k} {v}" for k, v in skipped.items() if v))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "summary": summary, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
