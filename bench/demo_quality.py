"""The paper's comparison in miniature, on the demo model's held-out scenes.

For every held-out scene the top shape is removed (its mask grown by 2 px is the hole) and the
prompt names it ("a red circle"). Methods:

- brushnet+blend / brushnet: the shipped demo model through `brushnet.inpaint` (the CLI's path),
  with and without blurred blending;
- blended-latent: the same base model without BrushNet, sampling with the known region re-noised
  and pasted into the latent at every step, only the hole left to the model (the "sampling
  strategy" family the paper compares to; Avrahami et al., Blended Latent Diffusion);
- masked-image: the hole left as the masked image has it (black): a floor, not a method.

Scores: PSNR and MSE (x1e3, per channel, [0, 1] pixels) on the kept region; PSNR in the hole
against the ground-truth scene; prompt adherence as the fraction of hole pixels whose nearest
palette colour is the named one, and the fraction of scenes where the named colour covers at least
half of the removed shape's own pixels.

    OMP_NUM_THREADS=1 python bench/demo_quality.py [--scenes 200] [--steps 25] [--model DIR]
"""

import argparse
import json
import math
import time

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from brushnet.demo.model import DEMO_MODEL_DIR
from brushnet.demo.scenes import HELDOUT_SEEDS, colour_fraction, make_scene, removal_example
from brushnet.inpaint import InpaintSettings, default_blend_kernel, inpaint
from brushnet.loading import load_pipeline
from brushnet.pipelines.blending import blend

METHODS = ("brushnet+blend", "brushnet", "blended-latent", "masked-image")


def to_tensor(image: PIL.Image.Image) -> torch.Tensor:
    """(1, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32)).permute(2, 0, 1)[None] / 127.5 - 1


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


def psnr(a: np.ndarray, b: np.ndarray, where: np.ndarray) -> tuple[float, float]:
    """(PSNR dB, MSE) per channel over the pixels of `where`, images in [0, 255] -> [0, 1]."""
    mse = float(np.mean(((a[where].astype(np.float64) - b[where]) / 255) ** 2))
    return (100.0 if mse < 1e-10 else 10 * math.log10(1 / mse)), mse


def score(result, example, shape_mask) -> dict:
    ours, truth = np.asarray(result.convert("RGB")), np.asarray(example.image.convert("RGB"))
    hole = np.asarray(example.mask) > 0
    kept_psnr, kept_mse = psnr(ours, truth, ~hole)
    hole_psnr, _ = psnr(ours, truth, hole)
    colour = example.prompt.split()[1]
    return {"kept_psnr": kept_psnr, "kept_mse": kept_mse, "hole_psnr": hole_psnr,
            "hole_colour": colour_fraction(ours, hole, colour),
            "shape_covered": float(colour_fraction(ours, shape_mask, colour) >= 0.5)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEMO_MODEL_DIR), help="a BrushNet pipeline folder (default: the demo model)")
    parser.add_argument("--brushnet", help="a BrushNet folder (default: MODEL/brushnet)")
    parser.add_argument("--scenes", type=int, default=len(HELDOUT_SEEDS))
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--json", help="also write the per-method means here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    pipe = load_pipeline(args.model, args.brushnet or f"{args.model}/brushnet", torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)

    totals = {m: [] for m in METHODS}
    seconds = {m: 0.0 for m in METHODS}
    for number, seed in enumerate(HELDOUT_SEEDS[: args.scenes]):
        scene = make_scene(seed)
        example = removal_example(scene, len(scene.shapes) - 1)
        shape_mask = scene.shapes[-1].mask
        settings = InpaintSettings(prompt=example.prompt, steps=args.steps, guidance=args.guidance, seed=number,
                                   blend=False)
        start = time.perf_counter()
        raw = inpaint(pipe, scene.image, example.mask, settings)[0]  # settings.blend is False
        brushnet_seconds = time.perf_counter() - start
        start = time.perf_counter()
        latent_blended = blended_latent_inpaint(pipe, scene.image, example.mask, example.prompt, args.steps,
                                                args.guidance, number)
        results = {
            # Exactly what inpaint(blend=True) returns for this generation: one generation, two rows.
            "brushnet+blend": blend(scene.image, raw, example.mask, default_blend_kernel(pipe)),
            "brushnet": raw,
            "blended-latent": latent_blended,
            "masked-image": example.masked_image,
        }
        seconds["blended-latent"] += time.perf_counter() - start
        seconds["brushnet"] += brushnet_seconds
        seconds["brushnet+blend"] += brushnet_seconds
        for method in METHODS:
            totals[method].append(score(results[method], example, shape_mask))

    summary = {}
    print(f"{args.scenes} held-out scenes, {args.steps} steps, guidance {args.guidance}\n")
    print("| method | kept PSNR | kept MSE x1e3 | hole PSNR | hole pixels of the named colour | shape covered | s/image |")
    print("|---|---|---|---|---|---|---|")
    for method in METHODS:
        means = {key: float(np.mean([row[key] for row in totals[method]])) for key in totals[method][0]}
        means["seconds"] = seconds[method] / args.scenes
        summary[method] = means
        kept = "exact" if means["kept_mse"] == 0 else f"{means['kept_psnr']:.2f}"
        print(f"| {method} | {kept} | {means['kept_mse'] * 1e3:.3f} | {means['hole_psnr']:.2f} | "
              f"{means['hole_colour']:.3f} | {means['shape_covered']:.3f} | {means['seconds']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
