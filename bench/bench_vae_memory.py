"""Peak CPU memory and time of VAE decoding at large sizes: whole, in tiles, one image at a time.

A full-size SD1.5-shaped AutoencoderKL built from its config (random weights: memory and time do
not depend on their values; tile size 512 px as SD1.5's VAE config says) decodes random latents.
Each case runs in a fresh process, so its peak resident memory (max RSS) is its own; "decode" is
that peak less the process's memory just before decoding (Python, torch, the weights, the latents).

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_vae_memory.py --sizes 512 1024 --modes off tiled
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_vae_memory.py --sizes 512 --batch 2 --modes off sliced

Modes: off (the whole batch at once, as diffusers decodes by default), tiled (`vae.enable_tiling()`),
sliced (`vae.enable_slicing()`: one image of the batch at a time), tiled+sliced.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

MODES = ("off", "tiled", "sliced", "tiled+sliced")


def sd15_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), latent_channels=4, layers_per_block=2, sample_size=512,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        scaling_factor=0.18215,
    ).eval()


def resident_bytes() -> int:
    """This process's memory now (Linux); elsewhere its peak so far, an upper bound."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_resident_bytes()


def peak_resident_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def measure(size: int, batch: int, mode: str) -> dict:
    """One case, in this process: decode `batch` latents of a `size` x `size` image."""
    import torch

    torch.manual_seed(0)
    vae = sd15_vae()
    if "tiled" in mode:
        vae.enable_tiling()
    if "sliced" in mode:
        vae.enable_slicing()
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    latents = torch.randn(batch, vae.config.latent_channels, size // factor, size // factor)
    before = resident_bytes()
    start = time.perf_counter()
    with torch.no_grad():
        images = vae.decode(latents).sample
    seconds = time.perf_counter() - start
    assert images.shape == (batch, 3, size, size)
    return {"size": size, "batch": batch, "mode": mode, "seconds": seconds, "before": before,
            "peak": peak_resident_bytes(), "threads": torch.get_num_threads()}


def run_case(size: int, batch: int, mode: str) -> dict:
    """`measure` in a fresh process, so that no earlier case's peak is counted."""
    command = [sys.executable, __file__, "--case", str(size), str(batch), mode]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024], help="output sides in pixels")
    parser.add_argument("--batch", type=int, default=1, help="images decoded in one call")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=["off", "tiled"])
    parser.add_argument("--case", nargs=3, metavar=("SIZE", "BATCH", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        size, batch, mode = args.case
        print(json.dumps(measure(int(size), int(batch), mode)))
        return
    if any(size % 8 for size in args.sizes):
        parser.error("--sizes must be multiples of 8 (the VAE's downscaling)")

    gb = 2**30
    print(f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    print("| output | batch | VAE decode | peak RSS (GB) | decode's own (GB) | time (s) |")
    print("|---|---|---|---|---|---|")
    for size in args.sizes:
        for mode in args.modes:
            result = run_case(size, args.batch, mode)
            print(f"| {size}x{size} | {args.batch} | {mode} | {result['peak'] / gb:.2f} | "
                  f"{(result['peak'] - result['before']) / gb:.2f} | {result['seconds']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
