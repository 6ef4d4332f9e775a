"""Build the built-in demo model from scratch: scenes -> VAE -> text encoder + UNet -> BrushNet.

Every stage checkpoints into OUT and resumes where it stopped, so the build can run in several
sittings (on a 2-core CPU) or at once on a GPU:

    python tools/build_demo_model.py OUT [--stage all|data|vae|base|brushnet|assemble] [--device auto]

Stages: `data` writes the training scenes (images, captions, per-shape RLE masks); `vae` trains an
AutoencoderKL (64x64 -> 16x16x4); `base` trains a CLIP text encoder over the closed vocabulary
together with an SD1.5-shaped UNet (epsilon prediction, 10 % empty captions) and saves a
StableDiffusionPipeline folder; `brushnet` runs `brushnet.training.train` on it, first with the
scenes' segmentation masks, then with random brush masks; `assemble` writes the BrushNet pipeline
folder the package ships.
"""

import argparse
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F

from brushnet.demo.scenes import SIZE, TRAIN_SEEDS, write_folder
from brushnet.demo.tokenizer import write_tokenizer


def vae_model():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=SIZE, layers_per_block=1,
        block_out_channels=(32, 64, 64), norm_num_groups=16,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    )


def base_models(tokenizer):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    vocab = tokenizer.get_vocab()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=vocab[tokenizer.bos_token], eos_token_id=vocab[tokenizer.eos_token],
        pad_token_id=vocab[tokenizer.pad_token], projection_dim=128,
    ))
    unet = UNet2DConditionModel(
        sample_size=SIZE // 4, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64, 128),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=128, attention_head_dim=4, norm_num_groups=16,
    )
    return text_encoder, unet


def scene_batches(data: Path, batch: int, seed: int, device):
    """Endless batches of (images in [-1, 1], captions) from the written scenes, reproducibly shuffled."""
    import numpy as np
    from PIL import Image

    images = sorted(data.glob("*.png"))
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(images))
        for start in range(0, len(images) - batch + 1, batch):
            picked = [images[i] for i in order[start:start + batch]]
            pixels = torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB"), dtype=np.float32))
                                  for p in picked]).permute(0, 3, 1, 2) / 127.5 - 1
            captions = [p.with_suffix(".txt").read_text() for p in picked]
            yield pixels.to(device), captions


def train_steps(name, out: Path, modules: dict, steps: int, lr: float, step_fn, device, log_every=100):
    """A resumable loop: AdamW over `modules`, `step_fn()` returns the loss; checkpoints in out/name.pt."""
    params = [p for m in modules.values() for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    checkpoint, step = out / f"{name}.pt", 0
    if checkpoint.exists():
        state = torch.load(checkpoint, map_location=device)
        for key, module in modules.items():
            module.load_state_dict(state[key])
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
        print(f"{name}: resuming at step {step}")
    while step < steps:
        loss = step_fn()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        step += 1
        if step % log_every == 0 or step == steps:
            print(f"{name}: step {step}/{steps} loss {loss.item():.4f}", flush=True)
            tmp = checkpoint.with_suffix(".tmp")
            torch.save({**{k: m.state_dict() for k, m in modules.items()}, "optimizer": optimizer.state_dict(),
                        "step": step}, tmp)
            tmp.replace(checkpoint)


def stage_vae(out: Path, args, device):
    vae = vae_model().to(device).train()
    batches = scene_batches(out / "data", args.batch, 1, device)

    def step():
        pixels, _ = next(batches)
        posterior = vae.encode(pixels).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        return F.l1_loss(reconstruction, pixels) + F.mse_loss(reconstruction, pixels) + 1e-6 * posterior.kl().mean()

    train_steps("vae", out, {"vae": vae}, args.vae_steps, 1e-3, step, device)
    # Latents at unit variance, as SD's scaling factor does for its VAE.
    with torch.no_grad():
        pixels, _ = next(batches)
        std = vae.encode(pixels).latent_dist.mode().std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    vae.save_pretrained(out / "vae")


def stage_base(out: Path, args, device):
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UniPCMultistepScheduler

    tokenizer = write_tokenizer(out / "tokenizer")
    vae = AutoencoderKL.from_pretrained(out / "vae").to(device).requires_grad_(False)
    text_encoder, unet = (m.to(device).train() for m in base_models(tokenizer))
    noise_scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                    steps_offset=1)
    batches = scene_batches(out / "data", args.batch, 2, device)
    generator = torch.Generator().manual_seed(0)

    def step():
        pixels, captions = next(batches)
        captions = ["" if torch.rand((), generator=generator) < 0.1 else c for c in captions]
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(device)
        noise = torch.randn_like(latents)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=device)
        prediction = unet(noise_scheduler.add_noise(latents, noise, t), t, text_encoder(ids)[0]).sample
        return F.mse_loss(prediction, noise)

    train_steps("base", out, {"unet": unet, "text_encoder": text_encoder}, args.base_steps, 3e-4, step, device)
    scheduler = UniPCMultistepScheduler.from_config(noise_scheduler.config)
    StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                            safety_checker=None, feature_extractor=None, requires_safety_checker=False
                            ).save_pretrained(out / "base")


def stage_brushnet(out: Path, args, device):
    from brushnet.training import TrainConfig, train

    phases = [("segmentation", False, args.brushnet_steps // 2), ("random", True, args.brushnet_steps)]
    for name, random_mask, steps in phases:
        train(TrainConfig(
            pretrained_model_name_or_path=str(out / "base"), train_data_dir=str(out / "data"),
            output_dir=str(out / "brushnet"), resolution=SIZE, train_batch_size=args.batch, max_train_steps=steps,
            learning_rate=1e-4, lr_warmup_steps=100, checkpointing_steps=max(steps // 10, 1),
            checkpoints_total_limit=2, resume_from_checkpoint="latest", random_mask=random_mask,
            report_to="none", seed=0,
        ))
        print(f"brushnet: {name}-mask phase done at step {steps}", flush=True)


def stage_assemble(out: Path):
    from brushnet import BrushNetModel, StableDiffusionBrushNetPipeline

    pipe = StableDiffusionBrushNetPipeline.from_pretrained(out / "base", brushnet=BrushNetModel.from_pretrained(
        out / "brushnet"))
    target = out / "demo-model"
    if target.exists():
        shutil.rmtree(target)
    pipe.save_pretrained(target)
    size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
    print(f"demo model in {target}: {size / 2**20:.1f} MiB", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--stage", default="all", choices=["all", "data", "vae", "base", "brushnet", "assemble"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--scenes", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--vae-steps", type=int, default=3000)
    parser.add_argument("--base-steps", type=int, default=20000)
    parser.add_argument("--brushnet-steps", type=int, default=6000)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    stages = ["data", "vae", "base", "brushnet", "assemble"] if args.stage == "all" else [args.stage]
    for stage in stages:
        if stage == "data" and not (args.out / "data").exists():
            write_folder(args.out / "data", TRAIN_SEEDS[: args.scenes])
        elif stage == "vae" and not (args.out / "vae").exists():
            stage_vae(args.out, args, args.device)
        elif stage == "base" and not (args.out / "base").exists():
            stage_base(args.out, args, args.device)
        elif stage == "brushnet":
            stage_brushnet(args.out, args, args.device)
        elif stage == "assemble":
            stage_assemble(args.out)


if __name__ == "__main__":
    main()
