"""Training throughput of `brushnet.training.train` on a full-size SD1.5-shaped model.

Random weights (speed and memory do not depend on their values): the SD1.5 UNet, SD VAE and CLIP
text encoder at full size, built in memory; the real training loop; synthetic 256x256 images.
Each setting runs in its own process so its peak memory (max RSS) is its own.

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_training.py --resolution 256 --batch 1 --steps 3
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

# Any CLIP tokenizer will do: the weights are random. The golden tiny one needs no download.
GOLDEN_TOKENIZER = Path(os.environ.get(
    "BRUSHNET_BENCH_TOKENIZER",
    Path(__file__).resolve().parents[2] / "shared" / "golden" / "sd15_tiny_pipeline" / "tokenizer"))


def full_size_base(cfg):
    """In-memory SD1.5-shaped UNet, VAE and text encoder with random weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from brushnet.training.loop import TextConditioning

    unet = UNet2DConditionModel(
        sample_size=64, cross_attention_dim=768, attention_head_dim=8, block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), latent_channels=4, layers_per_block=2,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        scaling_factor=0.18215)
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                num_attention_heads=12, max_position_embeddings=77))
    tokenizer = CLIPTokenizer.from_pretrained(GOLDEN_TOKENIZER)
    return {"unet": unet, "vae": vae, "text": TextConditioning([tokenizer], [text_encoder], sdxl=False)}


def run_one(args) -> dict:
    import brushnet.training.loop as loop
    from brushnet.training import TrainConfig, train

    work = Path(tempfile.mkdtemp())
    rng = np.random.default_rng(0)
    (work / "data").mkdir()
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (args.resolution, args.resolution, 3), dtype=np.uint8)).save(
            work / "data" / f"{i}.png")
        (work / "data" / f"{i}.txt").write_text("a photo")
    (work / "base" / "scheduler").mkdir(parents=True)
    (work / "base" / "scheduler" / "scheduler_config.json").write_text(json.dumps({
        "_class_name": "DDPMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
        "beta_end": 0.012, "num_train_timesteps": 1000}))

    loop.load_base_components = full_size_base
    step_times = []
    real_loss = loop.diffusion_loss

    def timed_loss(*a):  # called once per step: its timestamps give the step durations
        step_times.append(time.perf_counter())
        return real_loss(*a)

    loop.diffusion_loss = timed_loss
    train(TrainConfig(pretrained_model_name_or_path=str(work / "base"), train_data_dir=str(work / "data"),
                      output_dir=str(work / "out"), resolution=args.resolution, train_batch_size=args.batch,
                      max_train_steps=args.steps + 1, random_mask=True, report_to="none", seed=0,
                      checkpointing_steps=10**9, gradient_checkpointing=args.run == "checkpointing",
                      mixed_precision=args.mixed_precision))
    durations = np.diff(step_times)  # the first step (warm-up) is left out
    import torch

    gpu = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    return {"setting": args.run, "s_per_step": float(np.median(durations)),
            "samples_per_s": args.batch / float(np.median(durations)),
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "peak_gpu_gib": gpu}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    parser.add_argument("--run", choices=["plain", "checkpointing"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        print(json.dumps(run_one(args)))
        return
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"device={device} resolution={args.resolution} batch={args.batch} measured steps={args.steps} "
          f"mixed_precision={args.mixed_precision} threads={torch.get_num_threads()}")
    for setting in ("plain", "checkpointing"):
        out = subprocess.run([sys.executable, __file__, "--run", setting, "--resolution", str(args.resolution),
                              "--batch", str(args.batch), "--steps", str(args.steps),
                              "--mixed-precision", args.mixed_precision],
                             capture_output=True, text=True, check=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        gpu = f"  peak GPU {result['peak_gpu_gib']:5.1f} GiB" if result["peak_gpu_gib"] is not None else ""
        print(f"{setting:14s} {result['s_per_step']:7.2f} s/step  {result['samples_per_s']:6.3f} samples/s  "
              f"peak RSS {result['peak_rss_gib']:5.1f} GiB{gpu}")


if __name__ == "__main__":
    main()
