"""Time the authors' own BrushNet code (their diffusers fork) beside this package, on the same models.

`bench/bench_pipeline.py` replays the authors' step inside this package; this tool runs the
authors' code itself: their fork of diffusers (TencentARC/BrushNet, `src/diffusers`, 0.27.0.dev0)
installed in an environment of its own, since it replaces the `diffusers` package. Run by hand,
outside CI (no hub access is needed: the models are random weights written here).

The separate environment (these commands worked with Python 3.11 and the CPU torch wheel this
repo's install uses):

    git clone https://github.com/TencentARC/BrushNet /tmp/BrushNet
    python3 -m venv /tmp/ref-venv
    /tmp/ref-venv/bin/pip install torch==2.13.0 "transformers<4.46" "huggingface_hub<0.26" safetensors \\
        importlib_metadata filelock regex requests pillow numpy
    /tmp/ref-venv/bin/pip install --no-deps -e /tmp/BrushNet

(`huggingface_hub<0.26`: the fork imports `cached_download`, which later releases removed.) Then,
from the repo root:

    OMP_NUM_THREADS=2 .venv/bin/python tools/bench_reference.py --reference-python /tmp/ref-venv/bin/python \\
        --size 256 --steps 3 --repeats 2 [--dtype fp32|bf16] [--workdir /tmp/bench-reference]

What it does: builds the models bench/bench_pipeline.py times (a full-size SD1.5 UNet, the
BrushNet made from it, the SD VAE; random weights, seed 0) and saves them under WORKDIR/models
with the inputs (a 256x256 image, a square hole, random prompt embeddings), once. Then each side
runs in a process of its own (so each peak memory is its own), the reference first: the side
loads the folder with its own classes, makes one call to warm up and REPEATS timed ones (the
median is reported), and saves its image. Last it prints both, the speed-up and the largest
difference between the two images ([0, 1] pixels): the same call on the same weights, so it is
float noise.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_models(folder: Path, size: int, tiny: bool) -> None:
    """The timed models and inputs, saved so that either implementation loads them."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from bench_pipeline import sd15_pipeline, timed_inputs

    if tiny:  # tests: the same layout, a few channels
        from diffusers import AutoencoderKL, UNet2DConditionModel, UniPCMultistepScheduler

        from brushnet import BrushNetModel

        torch.manual_seed(0)
        unet = UNet2DConditionModel(sample_size=8, cross_attention_dim=32, attention_head_dim=2,
                                    block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
        vae = AutoencoderKL(block_out_channels=(8, 8), latent_channels=4, norm_num_groups=4,
                            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
        brushnet = BrushNetModel.from_unet(unet)
        scheduler = UniPCMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                            final_sigmas_type="sigma_min")  # what the fork always did
        width = 32
    else:
        pipe = sd15_pipeline("cpu", torch.float32)
        unet, vae, brushnet, scheduler = pipe.unet, pipe.vae, pipe.brushnet, pipe.scheduler
        width = 768
    staging = folder.with_name(folder.name + ".partial")
    for name, module in (("unet", unet), ("vae", vae), ("brushnet", brushnet), ("scheduler", scheduler)):
        module.save_pretrained(staging / name)
    image, mask = timed_inputs(size)
    image.save(staging / "image.png")
    mask.save(staging / "mask.png")
    torch.save(torch.randn(1, 77, width, generator=torch.Generator().manual_seed(0)), staging / "embeds.pt")
    staging.rename(folder)  # whole or not there: an interrupted build is not mistaken for one


def load_side(side: str, folder: Path, dtype):
    """The pipeline of `side` ("reference": the fork's classes; "ours": this package's) on the saved models."""
    if side == "reference":
        import diffusers

        if not hasattr(diffusers, "BrushNetModel"):
            raise SystemExit(f"error: {sys.executable}'s diffusers ({diffusers.__version__}, {diffusers.__file__}) is "
                             "not the authors' fork: install it there (see this tool's docstring)")
        from diffusers import BrushNetModel, StableDiffusionBrushNetPipeline
    else:
        from brushnet import BrushNetModel, StableDiffusionBrushNetPipeline
    from diffusers import AutoencoderKL, UNet2DConditionModel, UniPCMultistepScheduler

    pipe = StableDiffusionBrushNetPipeline(
        vae=AutoencoderKL.from_pretrained(folder / "vae"), text_encoder=None, tokenizer=None,
        unet=UNet2DConditionModel.from_pretrained(folder / "unet"),
        brushnet=BrushNetModel.from_pretrained(folder / "brushnet"),
        scheduler=UniPCMultistepScheduler.from_pretrained(folder / "scheduler"),
        **({"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
           if side == "reference" else {}))
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dtype=dtype)


def run_side(side: str, folder: Path, out: Path, steps: int, repeats: int, dtype_name: str) -> None:
    """Time `side`'s call on the saved models; write its seconds, peak memory and image to OUT."""
    import resource

    from PIL import Image

    dtype = DTYPES[dtype_name]
    pipe = load_side(side, folder, dtype)
    image, mask = Image.open(folder / "image.png").convert("RGB"), Image.open(folder / "mask.png").convert("RGB")
    embeds = torch.load(folder / "embeds.pt").to(dtype)

    def call():
        return pipe(prompt_embeds=embeds, negative_prompt_embeds=torch.zeros_like(embeds), image=image, mask=mask,
                    num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="np").images

    start = time.perf_counter()
    call()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = call()
        times.append(time.perf_counter() - start)
    np.save(out / f"{side}.npy", np.asarray(result, dtype=np.float32))
    (out / f"{side}.json").write_text(json.dumps({
        "seconds": times, "first_call": first, "threads": torch.get_num_threads(),
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference-python", help="the python of the environment with the authors' fork")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench-reference"))
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    parser.add_argument("--tiny", action="store_true", help="tiny models instead of full-size ones (tests)")
    parser.add_argument("--side", choices=["reference", "ours"], help=argparse.SUPPRESS)  # one side, in its env
    args = parser.parse_args(argv)
    if args.size <= 0 or args.size % 8 or args.steps < 1 or args.repeats < 1:
        parser.error("--size must be a positive multiple of 8, --steps and --repeats at least 1")
    models = args.workdir / f"models-{'tiny' if args.tiny else 'sd15'}-{args.size}"
    out = args.workdir / f"results-{args.dtype}"
    if args.side:
        return run_side(args.side, models, out, args.steps, args.repeats, args.dtype)
    if not args.reference_python:
        parser.error("--reference-python is required: the python of an environment with the authors' fork")
    if not os.access(args.reference_python, os.X_OK) or os.path.isdir(args.reference_python):
        parser.error(f"--reference-python {args.reference_python} is not a python to run: give the environment's "
                     "bin/python (see this tool's docstring)")
    if not models.exists():
        build_models(models, args.size, args.tiny)
    out.mkdir(parents=True, exist_ok=True)
    side_args = ["--workdir", str(args.workdir), "--size", str(args.size), "--steps", str(args.steps),
                 "--repeats", str(args.repeats), "--dtype", args.dtype] + (["--tiny"] if args.tiny else [])
    # The reference's environment must not see this package's source on its path.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for side, python in (("reference", args.reference_python), ("ours", sys.executable)):
        done = subprocess.run([python, __file__, "--side", side, *side_args], env=env if side == "reference" else None)
        if done.returncode:
            raise SystemExit(f"error: the {side} side failed (exit {done.returncode}); its output is above")
    rows = {side: json.loads((out / f"{side}.json").read_text()) for side in ("reference", "ours")}
    images = {side: np.load(out / f"{side}.npy") for side in rows}
    medians = {side: statistics.median(row["seconds"]) for side, row in rows.items()}
    print(f"{args.size}x{args.size}, {args.steps} UniPC steps, {args.dtype}, {rows['ours']['threads']} threads, "
          f"median of {args.repeats} calls after one to warm up")
    print("| side | s/call | s/step | first call (s) | peak memory (RSS) |")
    print("| --- | --- | --- | --- | --- |")
    for side, name in (("reference", "the authors' code (their fork)"), ("ours", "this package")):
        row = rows[side]
        print(f"| {name} | {medians[side]:.2f} | {medians[side] / args.steps:.2f} | {row['first_call']:.2f} | "
              f"{row['peak_rss_gib']:.2f} GiB |")
    print(f"speed-up: {medians['reference'] / medians['ours']:.2f}x; largest image difference "
          f"{np.abs(images['reference'] - images['ours']).max():.2e}")


if __name__ == "__main__":
    main()
