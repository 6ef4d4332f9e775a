"""`brushnet bench`: generate and score BrushBench / EditBench.

Wiring (in brushnet/cli.py's `build_parser`): `from .evaluation.cli import add_bench_command;
add_bench_command(commands)`. The sub-command's `func` is `cmd_bench`.

    brushnet bench data/BrushBench --mask-key inpainting_mask --base stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --brushnet data/ckpt/segmentation_mask_brushnet_ckpt --out runs/brushbench-inside \\
        --lpips-weights squeezenet1_1-b8a52dc0.pth squeeze.pth --clip-model clip-vit-large-patch14 \\
        --aesthetic-weights sa_0_4_vit_l_14_linear.pth --hps-weights HPS_v2.1_compressed.pt --paper-compat
    # several GPUs: items split by index % world_size, summary written by process 0
    accelerate launch --num_processes 4 -m brushnet bench data/BrushBench ... --out runs/brushbench-inside
    # results made elsewhere (<id>.png / .jpg, or laid out as the benchmark's images)
    brushnet bench data/BrushBench --images other_method/ --out runs/other --metrics psnr,mse
"""

from __future__ import annotations

import argparse

from ..options import (
    UserError,
    add_model_options,
    check_generation_args,
    load_pipeline_from_args,
    model_params,
    resolve_device,
    resolve_dtype,
)
from .benchmark import DEFAULT_GRID, MASK_KEYS

NO_MODEL = ("brushnet bench needs --base and --brushnet to generate the images, or --images DIR to score "
            "results made elsewhere.")


def add_bench_command(commands) -> argparse.ArgumentParser:
    """Add the `bench` sub-command to an argparse sub-parsers object; returns its parser."""
    bench = commands.add_parser(
        "bench", help="generate and score BrushBench / EditBench (the paper's protocol)",
        description="Inpaint every item of a BrushBench/EditBench folder (mapping_file.json) with the paper's "
                    "protocol (UniPC, 50 steps, CFG 7.5, seed 1234 for every image, no blending) and score the "
                    "results: per_image.csv, summary.csv/.json/.md (the paper's units) and gallery.html in --out. "
                    "Finished images are reused (the run resumes). Several GPUs: accelerate launch -m brushnet "
                    "bench ...")
    bench.add_argument("bench_dir", metavar="BENCH_DIR", help="folder with mapping_file.json and the images")
    bench.add_argument("--mask-key", default="inpainting_mask", choices=MASK_KEYS,
                       help="which mask to fill (EditBench has only inpainting_mask)")
    bench.add_argument("--out", "-o", required=True, metavar="DIR", help="output folder (images/, reports)")
    bench.add_argument("--grid", type=int, default=DEFAULT_GRID, help=argparse.SUPPRESS)

    add_model_options(bench, demo_default=False)

    gen = bench.add_argument_group("generation")
    gen.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    gen.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    gen.add_argument("--scale", type=float, default=1.0, help="BrushNet conditioning scale (default 1.0)")
    gen.add_argument("--start", type=float, default=0.0, help="fraction of the steps where BrushNet starts")
    gen.add_argument("--end", type=float, default=1.0, help="fraction of the steps where BrushNet stops")
    gen.add_argument("--seed", type=int, default=1234, help="seed of every image (default 1234, the paper's)")
    gen.add_argument("--negative-prompt", "-n", default="", help="what to avoid (default none)")
    gen.add_argument("--blend", action=argparse.BooleanOptionalAction, default=False,
                     help="paste the result over the original through a blurred mask (the paper's * rows; "
                          "default off)")
    gen.add_argument("--blend-kernel", type=int, default=21, help="blur kernel of the blending (odd, default 21)")

    ev = bench.add_argument_group("evaluation")
    ev.add_argument("--images", metavar="DIR",
                    help="score results made elsewhere (<id>.png/.jpg, or the benchmark's relative paths) "
                         "instead of generating")
    ev.add_argument("--metrics", default="auto",
                    help="auto (default: psnr, mse and every metric whose weights are given), all, or a list "
                         "such as psnr,mse,lpips,clip,aesthetic,hps,image_reward")
    ev.add_argument("--paper-compat", action="store_true",
                    help="PSNR/MSE with the authors' formula (squared error summed over RGB / kept pixels, "
                         "PSNR 1000 when MSE < 1e-10) instead of per-channel values")
    ev.add_argument("--jpeg-roundtrip", action="store_true",
                    help="score each result after a JPEG save/load at quality 75, as the authors' script does "
                         "(it saves results under the benchmark's .jpg names)")
    ev.add_argument("--lpips-weights", nargs=2, metavar=("BACKBONE.pth", "HEADS.pth"),
                    help="torchvision's squeezenet1_1-b8a52dc0.pth and the lpips package's v0.1 squeeze.pth")
    ev.add_argument("--clip-model", metavar="DIR",
                    help="CLIP ViT-L/14 folder (openai/clip-vit-large-patch14 layout; a hub id online)")
    ev.add_argument("--aesthetic-weights", metavar="FILE", help="LAION's sa_0_4_vit_l_14_linear.pth")
    ev.add_argument("--hps-weights", metavar="FILE",
                    help="HPS v2.1's HPS_v2.1_compressed.pt (needs --clip-model for CLIP's tokenizer)")
    ev.add_argument("--image-reward-weights", nargs=2, metavar=("ImageReward.pt", "BERT_TOKENIZER_DIR"),
                    help="ImageReward v1.0's checkpoint and a bert-base-uncased tokenizer folder")
    ev.add_argument("--no-gallery", action="store_true", help="do not write gallery.html and its thumbnails")
    bench.set_defaults(func=cmd_bench)
    return bench


def cmd_bench(args) -> int:
    from ..inpaint import InpaintSettings
    from ..processes import process_info
    from .runner import run_benchmark

    generating = args.images is None
    if generating and (not args.base or not args.brushnet):
        raise ValueError(NO_MODEL)
    if not generating and (args.base or args.brushnet):
        raise ValueError("--images scores existing results: drop --base and --brushnet (or drop --images to generate).")
    check_generation_args(args)  # the numbers and --scheduler
    if args.seed is not None and args.seed < 0:
        # check_generation_args lets -1 through for inpaint's "a random seed"; a benchmark scores one
        # fixed seed, and the pipeline refused -1 only after the models loaded.
        raise UserError(f"--seed must be a whole number >= 0 for a benchmark (one seed for every image); "
                        f"got {args.seed}")

    process = process_info()
    device = resolve_device(args.device, process.device if process.world_size > 1 else None)
    dtype = resolve_dtype(args.dtype, device)
    weights = {"lpips": tuple(args.lpips_weights) if args.lpips_weights else None,
               "clip": args.clip_model, "aesthetic": args.aesthetic_weights, "hps": args.hps_weights,
               "image_reward": tuple(args.image_reward_weights) if args.image_reward_weights else None}
    settings = InpaintSettings(
        prompt="", negative_prompt=args.negative_prompt, steps=args.steps, guidance=args.guidance, scale=args.scale,
        start=args.start, end=args.end, seed=args.seed, blend=args.blend, blend_kernel=args.blend_kernel,
        vae_tiling=args.vae_tiling)

    pipe_loader = params = None
    if generating:
        params = model_params(args, dtype)

        def pipe_loader():
            pipe = load_pipeline_from_args(args, device, dtype)
            pipe.set_progress_bar_config(disable=True)
            return pipe

    summary = run_benchmark(
        args.bench_dir, args.out, mask_key=args.mask_key, pipe_loader=pipe_loader, settings=settings,
        scheduler=args.scheduler, images_dir=args.images, metrics=args.metrics, weights=weights,
        paper_compat=args.paper_compat, jpeg_quality=75 if args.jpeg_roundtrip else None, grid=args.grid,
        device=device, model_params=params, gallery=not args.no_gallery, process=process)
    if summary is not None:
        from .report import summary_markdown

        print(summary_markdown(summary), end="")
        print(f"generated {summary['generated']}, reused {summary['skipped']}; reports in {args.out}")
    return 0
