"""Build the built-in demo model from scratch: scenes -> VAE -> text encoder + UNet -> BrushNet.

Every stage checkpoints into OUT and resumes where it stopped, so the build can run in several
sittings (on a 2-core CPU) or at once on a GPU:

    OMP_NUM_THREADS=1 python tools/build_demo_model.py OUT --install [--stage all|data|vae|base|decoder|brushnet|assemble]

The defaults are the shipped model's settings (4000 scenes; VAE 1300 steps at batch 16; base 3000
steps at batch 32; BrushNet 2000 steps at batch 32, lr 3e-4): about 1 h 50 min on one CPU core
(BENCHMARKS.md has the measured time per stage); stop it at any time (Ctrl-C) and run the same
command again to go on from the last checkpoint (every 100 steps). `--install` copies the
assembled model into the package (src/brushnet/demo/model), replacing the shipped one.

The shipped model pairs that BrushNet with the base trained on to 5500 steps (plug-and-play: a
"fine-tuned" base; measured better in BENCHMARKS.md), made on the second core while the BrushNet
trained:

    mkdir B2 && ln -s $PWD/OUT/data B2/data && cp -r OUT/vae OUT/tokenizer OUT/base.pt B2/   # after `base`
    python tools/build_demo_model.py B2 --stage base --base-steps 5500
    mkdir F && ln -s $PWD/B2/base F/base && ln -s $PWD/OUT/brushnet F/brushnet            # after `brushnet`
    python tools/build_demo_model.py F --stage assemble --install

Fine-tuning the shipped BrushNet instead (against the shipped base, which stays as it is): the
`brushnet` stage with `--brushnet-from shipped` copies the shipped model into OUT/shipped once,
writes the scenes if OUT/data is missing, and trains from there; `--mask-mix` picks the training
holes (`brushnet.data.mask_mix`; the shipped BrushNet was trained with `reference`) and
`--scene-layout varied` adds the simple scenes (one shape on a plain background, two shapes,
overlaps, shapes cut by the border); `--brushnet-from DIR` starts from any BrushNet folder.
`--mask-downsampling max` trains (and stores in the BrushNet's config, which the pipelines
follow) a latent mask where a 4x4 latent cell is hole if any of its pixels is: with the
reference's nearest sampling a quarter of a drawn stroke's pixels sit in cells marked keep, where
the masked image is black (BENCHMARKS.md). `--drawn-weights` sets how often `--mask-mix drawn`
draws each kind of hole. Base stage: `--base-from shipped` (or a base folder) goes on training
that base, `--base-schedule linear` takes the learning rate down to 0 over the run (how the shipped
base's last sittings ran, BENCHMARKS.md), and
`--base-captions partial` trains on image, shape, background and empty captions (measured worse,
not shipped). `--decoder-steps N` (the `decoder` stage) trains the VAE's decoder on with its
encoder frozen, so the latents, the base and the BrushNet stay valid; `assemble` ships it.
`--decoder-latent-noise S` trains it on latents with noise up to S (in the latents' std) added,
so a generated latent a little off the encoder's decodes to clean colours. `--colour-jitter N`
draws the training scenes in shades up to N per channel off the palette (each still nearest its
named colour), so that "green" is also PIL's (0, 128, 0). `--latent-size 32` builds on a finer
latent grid (the VAE downsamples 2x instead of 4x; the base's UNet gets one level more and no
attention at 32x32; `--vae-lr`, `--vae-schedule` set the VAE's run): at 16x16 even the scenes' own
latents decode a star to 80 % of its colour in only 62 % of the held-out scenes.
`--zero-terminal-snr` trains the base on SD1.5's betas rescaled so that t = 999 is pure noise, with
v-prediction, and saves a sampler with trailing timesteps; the BrushNet stage reads the base's
schedule, so a BrushNet trained against it follows. With SD1.5's schedule a latent at t = 999
still shows its image's mean colour, and the models learn to read it there (BENCHMARKS.md,
sitting 4).

The shipped model is the first one fine-tuned on drawn holes in seven stages, each resuming and
each starting from the last one's checkpoint with `--brushnet-from`; the fifth also trains the base
on (2500 steps, `--base-schedule linear`) and the decoder (`--decoder-steps 3000`) and fine-tunes
the BrushNet against that base; the sixth fine-tunes that BrushNet on (`--brushnet-schedule
linear`: the learning rate down to 0 over the run; `--masked-loss-weight` weighs the hole's latent
pixels more in the loss, measured no better); the seventh fine-tunes it on scenes in jittered shades
(`--colour-jitter 45`) and the decoder on noisy latents (`--decoder-latent-noise`). BENCHMARKS.md
("Holes people draw") has every stage's command and what it measured. The first stage:

    OMP_NUM_THREADS=1 python tools/build_demo_model.py FT --stage brushnet --brushnet-from shipped \
        --mask-mix drawn --scene-layout varied --brushnet-steps 2200 --brushnet-lr 1e-4

Stages: `data` writes the training scenes (images, captions, per-shape RLE masks); `vae` trains an
AutoencoderKL (64x64 -> 16x16x4, or 32x32x4); `base` trains a CLIP text encoder over the closed vocabulary
together with an SD1.5-shaped UNet (epsilon prediction, 10 % empty captions) and saves a
StableDiffusionPipeline folder; `decoder` (only with --decoder-steps) sharpens the VAE's decoder;
`brushnet` runs `brushnet.training.train` on it with the scenes'
segmentation masks; `assemble` writes the BrushNet pipeline folder the package ships, its
weights stored in float16. `snapshot` (only when asked for) saves the base stage's checkpoint as
it stands as OUT/base-at-STEP, a base folder a BrushNet can start training against while the
base trains on, on the other core.
"""

import argparse
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from brushnet.demo.scenes import SIZE, TRAIN_SEEDS, shape_caption, write_folder
from brushnet.demo.tokenizer import write_tokenizer
from brushnet.masks import MASK_DOWNSAMPLINGS


# The latent grids a build can train (`--latent-size`): 16x16 (the VAE downsamples 4x; every shipped
# stage so far) or 32x32 (2x), where a star's arm or a 4 px checker is a latent cell of its own
# instead of a quarter of one (BENCHMARKS.md, "Holes people draw").
LATENT_SIZES = (16, 32)


def vae_model(latent_size: int = 16):
    from diffusers import AutoencoderKL

    if latent_size == 16:
        return AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, sample_size=SIZE, layers_per_block=1,
            block_out_channels=(32, 64, 64), norm_num_groups=16,
            down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        )
    # 2x: one downsampling; no attention in its mid block (1024 tokens there, and a 3x compression
    # needs none: measured 1.0 s/step at batch 16 without against 1.3 with, one core).
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=SIZE, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=16, mid_block_add_attention=False,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    )


def latent_size_of(vae) -> int:
    """The latent grid of a VAE: the scenes' size over its downsampling."""
    return SIZE // 2 ** (len(vae.config.block_out_channels) - 1)


def base_models(tokenizer, latent_size: int = 16):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    vocab = tokenizer.get_vocab()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=vocab[tokenizer.bos_token], eos_token_id=vocab[tokenizer.eos_token],
        pad_token_id=vocab[tokenizer.pad_token], projection_dim=128,
    ))
    if latent_size == 16:
        unet = UNet2DConditionModel(
            sample_size=latent_size, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(32, 64, 128),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=128, attention_head_dim=4, norm_num_groups=16,
        )
    else:
        # 32x32: the 16x16 UNet above with one level added outside it, at 32x32 and without attention
        # (1024 tokens there cost more than the level's convolutions): 0.75 s/step at batch 32 on
        # one core. The inner levels keep the 16x16 UNet's shapes, so a 16x16 base can seed them
        # (grown_unet_state).
        unet = UNet2DConditionModel(
            sample_size=latent_size, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(32, 32, 64, 128),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=128, attention_head_dim=4, norm_num_groups=16,
        )
    return text_encoder, unet


def grown_unet_state(state: dict) -> dict:
    """A 16x16 base UNet's weights renamed for the 32x32 one (base_models): its down blocks move one
    place in, behind the new outer level; its mid and up blocks, whose shapes and places the new
    UNet shares, keep their names. What the 32x32 UNet has on top (the outer down and up blocks and
    the upsampler into them) keeps its fresh initialisation."""
    grown = {}
    for key, value in state.items():
        if key.startswith("down_blocks."):
            _, index, rest = key.split(".", 2)
            key = f"down_blocks.{int(index) + 1}.{rest}"
        grown[key] = value
    return grown


def grown_brushnet_state(state: dict) -> dict:
    """A 16x16 BrushNet's weights renamed for one of a 32x32 base (grown_unet_state's move): its
    down blocks one place in, its down residual convs two (the outer level's resnet and downsampler
    come first); its up residual convs keep their places, the new upsampler's and the outer up
    block's come after them."""
    grown = {}
    for key, value in state.items():
        for prefix, shift in (("down_blocks.", 1), ("brushnet_down_blocks.", 2)):
            if key.startswith(prefix):
                index, rest = key[len(prefix):].split(".", 1)
                key = f"{prefix}{int(index) + shift}.{rest}"
                break
        grown[key] = value
    return grown


def grown_brushnet(out: Path, source: str) -> str:
    """The BrushNet `source` (a folder) as the start of one for this build's base: itself when it
    has the base's levels, else (a 16x16 BrushNet, a 32x32 base) a new BrushNet made from the base
    (BrushNetModel.from_unet) with the source's weights grown into it, saved once in OUT/brushnet-seed."""
    from diffusers import UNet2DConditionModel

    from brushnet import BrushNetModel

    # The configs tell the levels apart; the weights load only when a seed is to be made (the trainer
    # loads the BrushNet itself).
    levels = (len(BrushNetModel.load_config(source)["down_block_types"]),
              len(UNet2DConditionModel.load_config(base_folder(out) / "unet")["down_block_types"]))
    if levels[0] == levels[1]:
        return source
    if levels != (3, 4):
        raise SystemExit(f"--brushnet-from {source}: its {levels[0]} levels cannot seed a BrushNet for a base of "
                         f"{levels[1]}")
    target = out / "brushnet-seed"
    if not target.exists():
        base_unet = UNet2DConditionModel.from_pretrained(base_folder(out) / "unet", torch_dtype=torch.float32)
        source_model = BrushNetModel.from_pretrained(source, torch_dtype=torch.float32)
        model = BrushNetModel.from_unet(base_unet)
        model.register_to_config(mask_downsampling=source_model.config.mask_downsampling)
        state = grown_brushnet_state(source_model.state_dict())
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not unexpected, unexpected
        print(f"brushnet: {source}'s {len(state)} tensors seed the 32x32 BrushNet; {len(missing)} from the base",
              flush=True)
        model.save_pretrained(target.with_name(".brushnet-seed.tmp"))
        target.with_name(".brushnet-seed.tmp").rename(target)
    return str(target)


def load_base_unet(unet, source_unet) -> None:
    """`source_unet`'s weights into `unet`: as they are when both are on one latent grid, grown
    (grown_unet_state) when the source is a 16x16 base and `unet` a 32x32 one."""
    state = source_unet.state_dict()
    if source_unet.config.sample_size != unet.config.sample_size:
        if (source_unet.config.sample_size, unet.config.sample_size) != (16, 32):
            raise SystemExit(f"--base-from: a {source_unet.config.sample_size}x{source_unet.config.sample_size} "
                             f"base cannot seed a {unet.config.sample_size}x{unet.config.sample_size} one")
        state = grown_unet_state(state)
        missing, unexpected = unet.load_state_dict(state, strict=False)
        assert not unexpected, unexpected
        print(f"base: the 16x16 base's {len(state)} tensors seed the 32x32 UNet; {len(missing)} start fresh")
        return
    unet.load_state_dict(state)


def scene_batches(data: Path, batch: int, seed: int | None, device, epochs: int | None = None):
    """Batches of (images in [-1, 1], captions) from the written scenes, reproducibly shuffled
    (seed None: in file order, the last batch may be short); endless unless `epochs` is given."""
    import itertools

    import numpy as np
    from PIL import Image

    images = sorted(data.glob("*.png"))
    rng = np.random.default_rng(seed)
    for _ in itertools.count() if epochs is None else range(epochs):
        order = np.arange(len(images)) if seed is None else rng.permutation(len(images))
        last = len(images) if seed is None else len(images) - batch + 1
        for start in range(0, last, batch):
            picked = [images[i] for i in order[start:start + batch]]
            pixels = torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB"), dtype=np.float32))
                                  for p in picked]).permute(0, 3, 1, 2) / 127.5 - 1
            captions = [p.with_suffix(".txt").read_text().strip() for p in picked]
            yield pixels.to(device), captions


def encode_scenes(vae, data: Path, device):
    """Every written scene through the (frozen) VAE's encoder once: its posterior's parameters
    (mean and log-variance), the captions, and the pixels as uint8 (N, 3, H, W) on the CPU."""
    moments, captions, pixels = [], [], []
    with torch.no_grad():
        for batch, batch_captions in scene_batches(data, 50, None, device, epochs=1):
            moments.append(vae.encode(batch).latent_dist.parameters)
            captions += batch_captions
            pixels.append(((batch + 1) * 127.5).round().to("cpu", torch.uint8))  # exactly the PNG's values
    return torch.cat(moments), captions, torch.cat(pixels)


def train_steps(name, out: Path, modules: dict, steps: int, lr: float, step_fn, device, log_every=100,
                schedule: str = "constant"):
    """A resumable loop: AdamW over `modules`, `step_fn()` returns the loss; checkpoints in out/name.pt.
    `schedule` "linear" takes the learning rate from `lr` down to 0 at `steps` (a function of the step,
    so a resumed run follows the same curve)."""
    params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    checkpoint, step = out / f"{name}.pt", 0
    if checkpoint.exists():
        state = torch.load(checkpoint, map_location=device)
        for key, module in modules.items():
            module.load_state_dict(state[key])
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
        print(f"{name}: resuming at step {step}")
    started, first = time.perf_counter(), step
    while step < steps:
        if schedule == "linear":
            for group in optimizer.param_groups:
                group["lr"] = lr * (1 - step / steps)
        loss = step_fn()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        step += 1
        if step % log_every == 0 or step == steps:
            seconds = (time.perf_counter() - started) / (step - first)
            print(f"{name}: step {step}/{steps} loss {loss.item():.4f} ({seconds:.2f} s/step)", flush=True)
            tmp = checkpoint.with_suffix(".tmp")
            torch.save({**{k: m.state_dict() for k, m in modules.items()}, "optimizer": optimizer.state_dict(),
                        "step": step}, tmp)
            tmp.replace(checkpoint)


def stage_vae(out: Path, args, device):
    vae = vae_model(args.latent_size).to(device).train()
    batches = scene_batches(out / "data", args.vae_batch, 1, device)

    def step():
        pixels, _ = next(batches)
        posterior = vae.encode(pixels).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        return F.l1_loss(reconstruction, pixels) + F.mse_loss(reconstruction, pixels) + 1e-6 * posterior.kl().mean()

    train_steps("vae", out, {"vae": vae}, args.vae_steps, args.vae_lr, step, device, schedule=args.vae_schedule)
    # Latents at unit variance, as SD's scaling factor does for its VAE.
    with torch.no_grad():
        pixels, _ = next(batches)
        std = vae.encode(pixels).latent_dist.mode().std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    vae.save_pretrained(out / "vae")


def vae_folder(out: Path) -> Path:
    """The VAE the base was trained on: this build's, else the shipped one (copied once)."""
    if (out / "vae").exists():
        return out / "vae"
    from brushnet.demo.model import DEMO_MODEL_DIR

    copy_once(DEMO_MODEL_DIR / "vae", out / "shipped-vae")
    return out / "shipped-vae"


def stage_decoder(out: Path, args, device):
    """Train the VAE's decoder on with its encoder frozen: the latents, hence the base and the
    BrushNet trained on them, stay as they are (plug-and-play, as SD's fine-tuned decoders are);
    only the pixels decoded from them get sharper."""
    from diffusers import AutoencoderKL
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    write_data(out, args)
    vae = AutoencoderKL.from_pretrained(vae_folder(out), torch_dtype=torch.float32).to(device)
    vae.requires_grad_(False)
    vae.decoder.requires_grad_(True).train()
    vae.post_quant_conv.requires_grad_(True).train()
    moments, _, pixels = encode_scenes(vae, out / "data", device)
    generator = torch.Generator().manual_seed(0)

    def step():
        picked = torch.randint(0, len(moments), (args.vae_batch,), generator=generator)
        target = pixels[picked].to(device).float() / 127.5 - 1
        latents = DiagonalGaussianDistribution(moments[picked.to(device)]).sample()
        if args.decoder_latent_noise:
            # Noise of a random level (up to the flag's, in units of the latents' std) teaches the
            # decoder to map a generated latent that is off the encoder's manifold to clean colours.
            level = torch.rand(len(picked), 1, 1, 1, generator=generator) * args.decoder_latent_noise
            noise = torch.randn(latents.shape, generator=generator) * level / vae.config.scaling_factor
            latents = latents + noise.to(device)
        reconstruction = vae.decode(latents).sample
        return F.l1_loss(reconstruction, target) + F.mse_loss(reconstruction, target)

    train_steps("decoder", out, {"vae": vae}, args.decoder_steps, args.decoder_lr, step, device, schedule="linear")
    vae.save_pretrained(out / "decoder")


# How often the base trains on each kind of caption with `--base-captions partial`: the whole
# image's, one shape's phrase alone ("a red circle": what a person types for a hole), one shape on
# the background, the background alone, and none (classifier-free guidance's empty prompt).
PARTIAL_CAPTION_WEIGHTS = {"image": 0.45, "shape": 0.25, "shape on background": 0.1, "background": 0.1, "empty": 0.1}


def scene_captions(png: Path) -> dict:
    """The captions `--base-captions partial` picks from for one written scene."""
    import json

    segmentation = json.loads(png.with_suffix(".json").read_text())
    background = segmentation["background_caption"]
    phrases = [shape_caption(s["kind"], s["colour"]) for s in segmentation["shapes"]]
    return {"image": png.with_suffix(".txt").read_text().strip(), "shape": phrases,
            "shape on background": [f"{p} on {background}" for p in phrases], "background": background}


def pick_caption(captions: dict, generator: torch.Generator) -> str:
    kinds = list(PARTIAL_CAPTION_WEIGHTS)
    kind = kinds[torch.multinomial(torch.tensor(list(PARTIAL_CAPTION_WEIGHTS.values())), 1,
                                   generator=generator).item()]
    if kind == "empty":
        return ""
    choice = captions[kind]
    if isinstance(choice, list):  # a scene of only background has no shape phrase
        return choice[torch.randint(len(choice), (), generator=generator).item()] if choice else captions["image"]
    return choice


def stage_base(out: Path, args, device):
    from diffusers import AutoencoderKL, DDPMScheduler
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    from brushnet.training.loop import training_noise

    tokenizer = write_tokenizer(out / "tokenizer")
    source = None
    if args.base_from != "scratch":
        # Go on training the shipped base, or a base folder (its VAE unchanged): the VAE copied once
        # next to the run. With this build's own VAE (the vae stage ran, e.g. --latent-size 32) that
        # VAE stays, and the source's UNet and text encoder only seed the new base.
        from brushnet.demo.model import DEMO_MODEL_DIR

        source = DEMO_MODEL_DIR if args.base_from == "shipped" else Path(args.base_from)
        copy_once(source / "vae", out / "vae")
    vae = AutoencoderKL.from_pretrained(out / "vae", torch_dtype=torch.float32).to(device).requires_grad_(False)
    text_encoder, unet = (m.to(device).train() for m in base_models(tokenizer, latent_size_of(vae)))
    if source is not None:
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        load_base_unet(unet, UNet2DConditionModel.from_pretrained(source / "unet", torch_dtype=torch.float32))
        text_encoder.load_state_dict(CLIPTextModel.from_pretrained(
            source / "text_encoder", torch_dtype=torch.float32).state_dict())
    noise_scheduler = DDPMScheduler(**recorded_noise_schedule(out, args.zero_terminal_snr))
    # The VAE is frozen here: encode every scene once (mean and log-variance) instead of every step.
    moments, all_captions, _ = encode_scenes(vae, out / "data", device)
    if args.base_captions == "partial":
        all_captions = [scene_captions(p) for p in sorted((out / "data").glob("*.png"))]
    generator = torch.Generator().manual_seed(0)

    def caption(i: int) -> str:
        if args.base_captions == "partial":
            return pick_caption(all_captions[i], generator)
        return "" if torch.rand((), generator=generator) < 0.1 else all_captions[i]

    def step():
        picked = torch.randint(0, len(moments), (args.batch,), generator=generator)
        captions = [caption(i) for i in picked.tolist()]
        with torch.no_grad():
            posterior = DiagonalGaussianDistribution(moments[picked.to(device)])
            latents = posterior.sample() * vae.config.scaling_factor
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(device)
        noise = training_noise(latents, args.noise_offset)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=device)
        prediction = unet(noise_scheduler.add_noise(latents, noise, t), t, text_encoder(ids)[0]).sample
        target = noise if noise_scheduler.config.prediction_type == "epsilon" else \
            noise_scheduler.get_velocity(latents, noise, t)
        return F.mse_loss(prediction, target)

    train_steps("base", out, {"unet": unet, "text_encoder": text_encoder}, args.base_steps, args.base_lr, step, device,
                schedule=args.base_schedule)
    save_base(out / "base", vae, text_encoder, tokenizer, unet, noise_scheduler.config)


def noise_schedule(zero_terminal_snr: bool) -> dict:
    """The base's training noise schedule: SD1.5's, or (zero_terminal_snr) its betas rescaled so that
    t = 999 is pure noise, with v-prediction (epsilon cannot be predicted from pure noise) and
    sampling that starts at t = 999 (trailing spacing): Lin et al., "Common Diffusion Noise Schedules
    and Sample Steps are Flawed", as diffusers' options spell it."""
    if not zero_terminal_snr:
        return NOISE_SCHEDULE
    return {**NOISE_SCHEDULE, "rescale_betas_zero_snr": True, "prediction_type": "v_prediction",
            "timestep_spacing": "trailing"}


def recorded_noise_schedule(out: Path, zero_terminal_snr: bool) -> dict:
    """noise_schedule's, kept in OUT/noise-schedule.json the first time the base stage runs, so that a
    resumed run or a snapshot cannot silently train or save the checkpoint under another schedule."""
    import json

    schedule, record = noise_schedule(zero_terminal_snr), out / "noise-schedule.json"
    if record.exists():
        if json.loads(record.read_text()) != schedule:
            flag = "without" if zero_terminal_snr else "with"
            raise SystemExit(f"base: {out}'s base was trained {flag} --zero-terminal-snr ({record}); give the same "
                             "flag to go on, or use a new OUT")
    else:
        record.write_text(json.dumps(schedule, indent=2) + "\n")
    return schedule


def save_base(target: Path, vae, text_encoder, tokenizer, unet, schedule) -> None:
    """The base as a StableDiffusionPipeline folder (UniPC over the training noise schedule `schedule`,
    a scheduler config), written whole under a temporary name first: a folder cut short never passes
    for a base."""
    from diffusers import StableDiffusionPipeline, UniPCMultistepScheduler

    scheduler = UniPCMultistepScheduler.from_config(schedule)
    partial = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(partial, ignore_errors=True)
    StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                            scheduler=scheduler, safety_checker=None,
                            feature_extractor=None, requires_safety_checker=False).save_pretrained(partial)
    partial.rename(target)


def stage_snapshot(out: Path, device) -> Path:
    """OUT/base-at-STEP: the base stage's checkpoint (OUT/base.pt) as it stands, saved as a base folder,
    so that a BrushNet can start training against a base that is still training (on the other core)."""
    from diffusers import AutoencoderKL

    checkpoint = out / "base.pt"
    if not checkpoint.exists():
        raise SystemExit(f"snapshot: no {checkpoint}: run the base stage in {out} first (it checkpoints every "
                         "100 steps)")
    state = torch.load(checkpoint, map_location=device)
    target = out / f"base-at-{state['step']}"
    if not target.exists():
        tokenizer = write_tokenizer(out / "tokenizer")
        vae = AutoencoderKL.from_pretrained(out / "vae", torch_dtype=torch.float32)
        text_encoder, unet = base_models(tokenizer, latent_size_of(vae))
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
        import json

        from diffusers import DDPMScheduler

        record = out / "noise-schedule.json"  # the base stage's (a run from before it kept one: SD1.5's)
        schedule = json.loads(record.read_text()) if record.exists() else NOISE_SCHEDULE
        save_base(target, vae, text_encoder, tokenizer, unet, DDPMScheduler(**schedule).config)
    print(f"snapshot: the base at step {state['step']} in {target}", flush=True)
    return target


def copy_once(source: Path, target: Path) -> None:
    """Copy `source` to `target` unless it is there; a copy cut short never passes for a whole one."""
    if not target.exists():
        partial = target.with_name(f".{target.name}.tmp")
        shutil.copytree(source, partial, dirs_exist_ok=True)
        partial.rename(target)


def write_data(out: Path, args) -> None:
    """The training scenes in OUT/data, written once."""
    if not (out / "data").exists():
        write_folder(out / "data", TRAIN_SEEDS[: args.scenes], layout=args.scene_layout,
                     colour_jitter=args.colour_jitter)


def base_folder(out: Path) -> Path:
    """The base the BrushNet trains against: the one this build trained, else the shipped one."""
    return out / "base" if (out / "base").exists() else out / "shipped"


def stage_brushnet(out: Path, args, device):
    from brushnet.training import TrainConfig, train

    brushnet_from = None
    if args.brushnet_from != "scratch":
        from brushnet.demo.model import DEMO_MODEL_DIR

        # A copy, so that installing the result later does not pull the base away from under a
        # resumed run, and so the run's starting point is on record next to it.
        copy_once(DEMO_MODEL_DIR, out / "shipped")
        write_data(out, args)
        brushnet_from = str(out / "shipped" / "brushnet") if args.brushnet_from == "shipped" else args.brushnet_from
        brushnet_from = grown_brushnet(out, brushnet_from)
    # The reference mix at 64x64 means segmentation masks only (like the authors'
    # segmentation_mask_brushnet): its random brush strokes are 128 px wide, the whole scene here;
    # "strokes" and "drawn" scale them to the resolution.
    steps = args.brushnet_steps
    train(TrainConfig(
        pretrained_model_name_or_path=str(base_folder(out)), brushnet_model_name_or_path=brushnet_from,
        mask_mix=args.mask_mix, drawn_weights=args.drawn_weights, mask_downsampling=args.mask_downsampling,
        train_data_dir=str(out / "data"),
        output_dir=str(out / "brushnet"), resolution=SIZE, train_batch_size=args.batch, max_train_steps=steps,
        learning_rate=args.brushnet_lr, masked_loss_weight=args.masked_loss_weight, noise_offset=args.noise_offset,
        zero_conv_lr_scale=args.zero_conv_lr_scale, proportion_empty_prompts=args.brushnet_empty_prompts,
        # linear: from --brushnet-lr down to 0 over the run, no warm-up (a fine-tune starts from trained weights)
        lr_scheduler=args.brushnet_schedule, lr_warmup_steps=0, checkpointing_steps=max(min(steps // 10, 100), 1),
        checkpoints_total_limit=2, resume_from_checkpoint="latest", random_mask=False, report_to="none", seed=0,
    ))
    print(f"brushnet: done at step {steps}", flush=True)


def stage_assemble(out: Path, install: bool):
    from brushnet import BrushNetModel, StableDiffusionBrushNetPipeline
    from brushnet.demo.model import DEMO_MODEL_DIR

    pipe = StableDiffusionBrushNetPipeline.from_pretrained(base_folder(out), brushnet=BrushNetModel.from_pretrained(
        out / "brushnet"))
    if (out / "decoder").exists():  # the decoder stage's VAE: the same encoder, so the same latents
        from diffusers import AutoencoderKL

        pipe.register_modules(vae=AutoencoderKL.from_pretrained(out / "decoder"))
    # float16 on disk halves the package; the weights load back as float32 (measured in
    # BENCHMARKS.md on the shipped files, so the figures are the shipped model's).
    pipe.to(torch.float16)
    target = out / "demo-model"
    if target.exists():
        shutil.rmtree(target)
    pipe.save_pretrained(target)
    size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
    print(f"demo model in {target}: {size / 2**20:.1f} MiB", flush=True)
    if install:
        staging = DEMO_MODEL_DIR.with_name(".model.new")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(target, staging)
        shutil.rmtree(DEMO_MODEL_DIR, ignore_errors=True)
        staging.rename(DEMO_MODEL_DIR)
        print(f"installed into {DEMO_MODEL_DIR}", flush=True)


# The stages in the order `--stage all` runs them; `snapshot` only when asked for.
STAGES = ("data", "vae", "base", "decoder", "brushnet", "assemble")
# The training noise schedule (SD1.5's), which the saved base's sampler follows.
NOISE_SCHEDULE = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1)
# How a stage's learning rate moves over its run (train_steps' `schedule`; the trainer's --lr_scheduler).
LR_SCHEDULES = ("constant", "linear")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--stage", default="all", choices=["all", *STAGES, "snapshot"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--scenes", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=32, help="batch of the base and BrushNet stages")
    parser.add_argument("--vae-batch", type=int, default=16)
    parser.add_argument("--vae-steps", type=int, default=1300)
    parser.add_argument("--latent-size", type=int, default=16, choices=LATENT_SIZES,
                        help="vae: the latent grid of the 64x64 scenes, 16 (4x downsampling) or 32 (2x); the "
                             "base stage follows its VAE")
    parser.add_argument("--vae-lr", type=float, default=1e-3)
    parser.add_argument("--vae-schedule", default="constant", choices=LR_SCHEDULES,
                        help="vae: the learning rate constant, or from --vae-lr down to 0 over the run")
    parser.add_argument("--base-steps", type=int, default=3000)
    parser.add_argument("--brushnet-steps", type=int, default=2000)
    parser.add_argument("--base-lr", type=float, default=3e-4)
    parser.add_argument("--base-schedule", default="constant", choices=LR_SCHEDULES,
                        help="base: the learning rate constant, or from --base-lr down to 0 over the run")
    parser.add_argument("--decoder-steps", type=int, default=0,
                        help="decoder: train the VAE's decoder on this many steps, its encoder frozen (0: skip)")
    parser.add_argument("--decoder-lr", type=float, default=3e-4,
                        help="decoder: the learning rate, down to 0 over the run")
    parser.add_argument("--decoder-latent-noise", type=float, default=0.0,
                        help="train the decoder on latents with Gaussian noise up to this std (in the latents' "
                             "std) added, so generated latents decode to clean colours (default 0: none)")
    parser.add_argument("--base-from", default="scratch",
                        help="base: train the text encoder and UNet from scratch, or go on from the shipped "
                             "base (shipped) or a base folder (a path); the VAE kept")
    parser.add_argument("--base-captions", default="image", choices=["image", "partial"],
                        help="base: train on the image's caption (10 %% empty), or on a mix of the image's, "
                             "one shape's, the background's and none (PARTIAL_CAPTION_WEIGHTS)")
    parser.add_argument("--brushnet-lr", type=float, default=3e-4)
    parser.add_argument("--brushnet-schedule", default="constant", choices=LR_SCHEDULES,
                        help="brushnet: the learning rate constant, or from --brushnet-lr down to 0 over the run")
    parser.add_argument("--masked-loss-weight", type=float, default=1.0,
                        help="brushnet: how much more the hole's latent pixels weigh in the loss (1: plain MSE, "
                             "the paper's; the trainer's --masked_loss_weight)")
    parser.add_argument("--noise-offset", type=float, default=0.0,
                        help="base and brushnet: a per-image, per-channel shift of the training noise (the "
                             "trainer's --noise_offset; 0: plain noise, the paper's)")
    parser.add_argument("--brushnet-empty-prompts", type=float, default=0.0, metavar="P",
                        help="brushnet: train this fraction of samples with the empty caption (the trainer's "
                             "--proportion_empty_prompts; 0: always the caption), so that CFG's unconditional half "
                             "continues the known region too")
    parser.add_argument("--zero-conv-lr-scale", type=float, default=1.0,
                        help="brushnet: the branch's output convs learn this much faster (the trainer's "
                             "--zero_conv_lr_scale; 1: one rate, the paper's)")
    parser.add_argument("--zero-terminal-snr", action="store_true",
                        help="base: train on betas rescaled to zero SNR at t=999, with v-prediction, and save a "
                             "sampler that starts there (the brushnet stage follows the base's schedule); default: "
                             "SD1.5's schedule, where the image's mean colour shows through the noise at t=999")
    parser.add_argument("--brushnet-from", default="scratch",
                        help="brushnet: start from the base UNet (scratch), fine-tune the shipped BrushNet "
                             "(shipped) or a BrushNet folder (a path; against the shipped base)")
    parser.add_argument("--mask-mix", default="reference", choices=["reference", "strokes", "drawn"],
                        help="brushnet: the training holes (brushnet.data.mask_mix)")
    parser.add_argument("--drawn-weights", help="brushnet: --mask-mix drawn's kind=weight,... "
                                                "(brushnet.data.mask_mix.parse_drawn_weights)")
    parser.add_argument("--mask-downsampling", choices=MASK_DOWNSAMPLINGS,
                        help="brushnet: the keep mask at latent size (brushnet.masks.latent_keep_mask; default: "
                             "the BrushNet's own, nearest for a new one)")
    parser.add_argument("--scene-layout", default="standard", choices=["standard", "varied"],
                        help="data: the training scenes' layout (brushnet.demo.scenes.LAYOUTS)")
    parser.add_argument("--colour-jitter", type=int, default=0, metavar="N",
                        help="data: draw each training scene in shades up to N per channel off the palette, each "
                             "still nearest its named colour (brushnet.demo.scenes.jittered_palette; default 0)")
    parser.add_argument("--install", action="store_true",
                        help="assemble: also copy the model into the package (src/brushnet/demo/model)")
    args = parser.parse_args()
    if args.base_from not in ("scratch", "shipped") and not all(
            (Path(args.base_from) / part).is_dir() for part in ("unet", "text_encoder", "vae")):
        parser.error(f"--base-from {args.base_from}: not a base folder (unet/, text_encoder/ and vae/); "
                     "give scratch, shipped or a base stage's OUT/base")
    if not 0 <= args.noise_offset <= 1:  # NaN fails too; the trainer checks its own copy the same way
        parser.error(f"--noise-offset {args.noise_offset}: give a number from 0 to 1 (0.1 is diffusers' usual)")
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    stages = STAGES if args.stage == "all" else [args.stage]
    for stage in stages:
        if stage == "data":
            write_data(args.out, args)
        elif stage == "vae" and not (args.out / "vae").exists():
            stage_vae(args.out, args, args.device)
        elif stage == "base" and not (args.out / "base").exists():
            write_data(args.out, args)
            stage_base(args.out, args, args.device)
        elif stage == "decoder" and args.decoder_steps and not (args.out / "decoder").exists():
            stage_decoder(args.out, args, args.device)
        elif stage == "brushnet":
            stage_brushnet(args.out, args, args.device)
        elif stage == "assemble":
            stage_assemble(args.out, args.install)
        elif stage == "snapshot":
            stage_snapshot(args.out, args.device)


if __name__ == "__main__":
    main()
