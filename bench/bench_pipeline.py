"""Time one SD1.5 BrushNet inpainting call: this package's step vs the reference's step.

Full-size SD1.5 UNet and BrushNet (random weights: speed does not depend on their values), a
full-size SD VAE, CFG on, precomputed prompt embeddings. "reference" replays the authors' step on
the same models: the branch runs on the whole CFG batch with the conditioning duplicated, and the
masked image is VAE-encoded for the doubled batch. Both give the same images (see
tests/test_pipelines.py); only the work differs.

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_pipeline.py --size 256 --steps 4 --repeats 3
    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_pipeline.py --size 256 --steps 4 --repeats 3 --dtype bf16
    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_pipeline.py --size 256 --steps 4 --repeats 3 --compile
    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_pipeline.py --size 512 --steps 2 --brushnet-every 2
    .venv/bin/python bench/bench_pipeline.py --size 512 --steps 50 --count-flops   # arithmetic only, no timing
"""

import argparse
import statistics
import time

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel, UniPCMultistepScheduler
from PIL import Image

from brushnet import BrushNetModel, StableDiffusionBrushNetPipeline, unet_forward


def sd15_pipeline(device, dtype) -> StableDiffusionBrushNetPipeline:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64, cross_attention_dim=768, attention_head_dim=8,
        block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), latent_channels=4, layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        scaling_factor=0.18215,
    )
    brushnet = BrushNetModel.from_unet(unet)
    scheduler = UniPCMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                        final_sigmas_type="sigma_min")
    pipe = StableDiffusionBrushNetPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet,
                                           brushnet=brushnet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=device, dtype=dtype)


def timed_inputs(size: int) -> tuple[Image.Image, Image.Image]:
    """The image and mask every timed call inpaints: a flat colour, a centred square hole."""
    image = Image.new("RGB", (size, size), (120, 90, 60))
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
    return image, mask


def reference_step(pipe):
    """The authors' step: branch on the full CFG batch, conditioning duplicated."""
    def step(latent_model_input, t, prompt_embeds, conditioning, scale, *, guess_mode, unet_kwargs,
             brushnet_added_cond_kwargs=None):
        down, mid, up = pipe.brushnet(latent_model_input, t, encoder_hidden_states=prompt_embeds,
                                      brushnet_cond=torch.cat([conditioning] * 2), conditioning_scale=scale,
                                      return_dict=False)
        return unet_forward(pipe.unet, latent_model_input, t, prompt_embeds, down_block_add_samples=down,
                            mid_block_add_sample=mid, up_block_add_samples=up, **unet_kwargs)
    return step


def reference_encode(pipe):
    """The authors encode the CFG-doubled batch of masked images."""
    def encode(pixels):
        return pipe.vae.encode(torch.cat([pixels] * 2).to(pipe.vae.dtype)).latent_dist.mode()[: pixels.shape[0]]
    return encode


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-images", type=int, default=1, help="images per call (the batch)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--brushnet-every", type=int, default=1, metavar="K",
                        help="also time this package with the branch run on every K-th step only (an approximation)")
    parser.add_argument("--count-flops", action="store_true",
                        help="print the arithmetic of one call, ours and the reference's, and exit without timing")
    parser.add_argument("--compile", action="store_true",
                        help="also time the fast path (enable_fast_path: torch.compile, CUDA graphs on a GPU)")
    args = parser.parse_args()
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]

    pipe = sd15_pipeline(args.device, dtype)
    if args.count_flops:
        return count_flops(pipe, args.size, args.steps)
    image, mask = timed_inputs(args.size)
    embeds = torch.randn(1, 77, 768, device=args.device, dtype=dtype)

    def call(**kwargs):
        pipe(prompt_embeds=embeds, negative_prompt_embeds=torch.zeros_like(embeds), image=image, mask=mask,
             num_inference_steps=args.steps, num_images_per_prompt=args.num_images,
             generator=torch.Generator().manual_seed(0), output_type="np", **kwargs)
        if args.device == "cuda":
            torch.cuda.synchronize()

    results = {}
    for name in ("ours", "reference", "ours"):  # ours twice: the first run also warms up
        if name == "reference":
            pipe.predict_noise, pipe._vae_encode = reference_step(pipe), reference_encode(pipe)
        else:
            pipe.__dict__.pop("predict_noise", None), pipe.__dict__.pop("_vae_encode", None)
        call()
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        results[name] = statistics.median(times)
    if args.brushnet_every > 1:
        pipe.__dict__.pop("predict_noise", None), pipe.__dict__.pop("_vae_encode", None)
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            call(brushnet_every=args.brushnet_every)
            times.append(time.perf_counter() - start)
        results[f"ours, branch every {args.brushnet_every}"] = statistics.median(times)
    if args.compile:
        pipe.__dict__.pop("predict_noise", None), pipe.__dict__.pop("_vae_encode", None)
        pipe.enable_fast_path()
        start = time.perf_counter()
        call()  # compiles
        warm_up = time.perf_counter() - start
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        results["fast path"] = statistics.median(times)
    print(f"device={args.device} dtype={args.dtype} size={args.size} images={args.num_images} steps={args.steps} "
          f"threads={torch.get_num_threads()} repeats={args.repeats}")
    for name, seconds in results.items():
        print(f"{name:10s} {seconds:8.2f} s/call  {seconds / args.steps:7.2f} s/step  "
              f"{results['reference'] / seconds:.2f}x the reference")
    if args.compile:
        print(f"fast path: first call (compiling) {warm_up:.1f} s; {results['ours'] / results['fast path']:.2f}x eager")
    print(f"peak memory: {peak_memory(args.device)}")


@torch.no_grad()
def count_flops(pipe, size: int, steps: int) -> None:
    """The arithmetic of one call at `size`, counted by torch's FlopCounterMode (attention through
    its math kernel, which the counter sees; the CPU's flash kernel it does not): what no kernel
    speed can change, so the most an exact path can gain over the reference's."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    def gflop(run) -> float:
        with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
            run()
        return counter.get_total_flops() / 1e9

    side = size // pipe.vae_scale_factor
    dtype, t = pipe.unet.dtype, torch.tensor(500)
    latents = torch.randn(2, 4, side, side, dtype=dtype)
    embeds = torch.randn(2, 77, pipe.unet.config.cross_attention_dim, dtype=dtype)
    conditioning = torch.randn(1, 5, side, side, dtype=dtype)
    unet = gflop(lambda: pipe.unet(latents, t, encoder_hidden_states=embeds))
    branch = gflop(lambda: pipe.brushnet(latents[:1], t, encoder_hidden_states=embeds[:1],
                                         brushnet_cond=conditioning, return_dict=False))
    pixels = torch.randn(1, 3, size, size, dtype=dtype)
    encode = gflop(lambda: pipe.vae.encode(pixels))
    decode = gflop(lambda: pipe.vae.decode(torch.randn(1, 4, side, side, dtype=dtype)))
    ours_step, reference_step_ = unet + branch, unet + 2 * branch
    ours, reference = steps * ours_step + encode + decode, steps * reference_step_ + 2 * encode + decode
    print(f"size={size} steps={steps}, GFLOP: UNet on the CFG batch {unet:.0f}, branch once {branch:.0f}, "
          f"VAE encode {encode:.0f}, decode {decode:.0f}")
    print(f"a step: ours {ours_step:.0f}, reference {reference_step_:.0f} ({reference_step_ / ours_step:.3f}x)")
    print(f"a call: ours {ours:.0f}, reference {reference:.0f} ({reference / ours:.3f}x)")


def peak_memory(device: str) -> str:
    """The process's peak so far: GPU memory torch allocated, or the CPU's resident set."""
    if device.startswith("cuda"):
        return f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB allocated on the GPU"
    import resource

    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB resident (CPU)"


if __name__ == "__main__":
    main()
