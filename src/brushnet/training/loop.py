"""The BrushNet training loop, top to bottom: config, models, data, optimiser, loop, checkpoints.

The recipe is the authors': a frozen SD1.5/SDXL UNet, VAE and text encoder(s); a trainable BrushNet
(from `BrushNetModel.from_unet`, or a checkpoint); noise at uniform timesteps; MSE against epsilon
(or v for v-prediction bases); AdamW with gradient clipping; a constant learning rate from step 1
(the reference's 500 warm-up steps do nothing under its constant schedule; other schedules warm
up). `accelerate launch` runs it on one or many GPUs; a plain call runs on CPU or one GPU.
"""

import itertools
import json
import logging
import math
import os
import random
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..files import atomic_write
from .config import TrainConfig, check_options, warmup_steps

logger = logging.getLogger(__name__)


def train(config: TrainConfig) -> Path:
    """Train a BrushNet as `config` says; returns the folder of the final BrushNet."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    from ..masks import latent_keep_mask
    from ..models import BrushNetModel, unet_forward

    _check_config(config)
    output_dir = Path(config.output_dir)
    # A second run in the same process (a notebook, the tests) may ask for another precision;
    # accelerate keeps the first one's state unless it is cleared.
    AcceleratorState._reset_state()
    accelerator = Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=config.mixed_precision,
        log_with=None if config.report_to == "none" else config.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / config.logging_dir)),
    )
    if accelerator.device.type == "cpu" and accelerator.mixed_precision == "fp16":
        # It would fail at the first step, after the models load, in a dtype error.
        raise ValueError("--mixed_precision fp16 needs a GPU: torch's CPU autocast does not run this model in "
                         "fp16; on a CPU use --mixed_precision bf16 or no.")
    if config.report_to not in ("none", "all") and not accelerator.log_with:
        # accelerate drops a tracker it cannot import with a Python warning, and the run logs nothing.
        raise ValueError(f"--report_to {config.report_to}: its package is not installed here: install it "
                         f"(pip install {config.report_to}), or pass --report_to none.")
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and accelerator.num_processes == 1:
        # Each process would train alone and all would write the same files.
        raise ValueError(f"Launched as {launched} processes, but accelerate found no device to run them together; "
                         "on CPUs set ACCELERATE_USE_CPU=1 (or use accelerate launch --cpu).")
    if config.seed is not None:
        set_seed(config.seed)
    seed = config.seed if config.seed is not None else random.randrange(2**31)
    num_warmup_steps, warning = warmup_steps(config)
    if warning and accelerator.is_main_process:
        logger.warning(warning)
    if config.validation_image and config.validation_steps > config.max_train_steps and accelerator.is_main_process:
        logger.warning(f"--validation_steps {config.validation_steps} is more than --max_train_steps "
                       f"{config.max_train_steps}: no validation image will be made (lower --validation_steps).")
    checkpoint = find_checkpoint(output_dir, config.resume_from_checkpoint, ema=config.use_ema,
                                 report=accelerator.is_main_process)
    seed_file = None if checkpoint is None else checkpoint / DATA_SEED_FILE.format(rank=accelerator.process_index)
    if seed_file is not None and config.seed is None and seed_file.is_file():
        # Without --seed the data seed was drawn: the resumed run must read the stream it was reading.
        seed = json.loads(seed_file.read_text())["data_seed"]
    if accelerator.is_main_process:
        remove_interrupted_saves(output_dir)

    # -- data: each process and worker reads its own share of the shards ----------------------------
    dataset = make_dataset(config, seed=seed, rank=accelerator.process_index, world_size=accelerator.num_processes)
    images = len(getattr(dataset, "items", ()))
    per_step = config.train_batch_size * accelerator.num_processes
    if 0 < images < per_step and accelerator.is_main_process:
        logger.warning(f"{images} training image(s) for {per_step} samples a step: every step repeats them "
                       "(a smaller --train_batch_size trains the same data with less work).")
    loader = torch.utils.data.DataLoader(dataset, batch_size=config.train_batch_size,
                                         num_workers=config.dataloader_num_workers, collate_fn=_collate())
    # Made before a resume restores the RNG state: making it draws from torch's RNG, as it did in
    # the run being resumed.
    batches = iter(loader)
    batches = itertools.chain([first_batch(batches, config)], batches)

    # -- models: frozen base, trainable branch -----------------------------------------------------
    base = load_base_components(config)
    unet, vae, text = base["unet"], base["vae"], base["text"]
    sdxl = text.sdxl
    noise_scheduler = DDPMScheduler.from_pretrained(config.pretrained_model_name_or_path, subfolder="scheduler",
                                                    **hub_options(config.pretrained_model_name_or_path,
                                                                  config.revision))
    if config.brushnet_model_name_or_path:
        from ..loading import load_brushnet

        from ..pipelines.base import check_brushnet_matches_unet

        brushnet = load_brushnet(config.brushnet_model_name_or_path, allow_pickle=config.allow_pickle)
        # Else, for an SDXL branch on an SD1.5 base, a library error at the first step.
        check_brushnet_matches_unet(brushnet, unet)
    else:
        brushnet = BrushNetModel.from_unet(unet)
    downsampling = config.mask_downsampling
    if downsampling is None and checkpoint is not None and (checkpoint / "brushnet" / "config.json").is_file():
        # A resumed run goes on with the latent mask it trained with (the weights alone do not say).
        downsampling = json.loads((checkpoint / "brushnet" / "config.json").read_text()).get("mask_downsampling")
    if downsampling is not None:
        brushnet.register_to_config(mask_downsampling=downsampling)  # saved with every checkpoint
    mask_downsampling = brushnet.config.mask_downsampling
    for frozen in (unet, vae, *text.encoders):
        frozen.requires_grad_(False)
    brushnet.train()
    if config.gradient_checkpointing:
        brushnet.enable_gradient_checkpointing()
        unet.enable_gradient_checkpointing()

    # Frozen weights in the training precision; SDXL's VAE stays fp32 unless an fp16-safe one is given.
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    vae_dtype = torch.float32 if sdxl and not config.pretrained_vae_model_name_or_path else weight_dtype
    unet.to(accelerator.device, dtype=weight_dtype)
    vae.to(accelerator.device, dtype=vae_dtype)
    for encoder in text.encoders:
        encoder.to(accelerator.device, dtype=weight_dtype)

    # -- optimiser ---------------------------------------------------------------------------------
    learning_rate = config.learning_rate
    if config.scale_lr:
        learning_rate *= config.gradient_accumulation_steps * config.train_batch_size * accelerator.num_processes
    optimizer = make_optimizer(parameter_groups(brushnet, config.zero_conv_lr_scale), config, learning_rate)
    lr_scheduler = get_scheduler(
        config.lr_scheduler, optimizer,
        num_warmup_steps=num_warmup_steps * accelerator.num_processes,
        num_training_steps=config.max_train_steps * accelerator.num_processes,
    )
    brushnet, optimizer, lr_scheduler = accelerator.prepare(brushnet, optimizer, lr_scheduler)
    ema = None
    if config.use_ema:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(accelerator.unwrap_model(brushnet).parameters(), decay=config.ema_decay)
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)

    # -- resume: weights, optimiser, lr schedule, RNG states, then the data fast-forwarded ----------
    global_step = 0
    if checkpoint is not None:
        accelerator.print(f"resuming from {checkpoint}")
        try:
            accelerator.load_state(str(checkpoint))
        except ValueError as error:
            if "parameter group" not in str(error):
                raise
            raise ValueError(lr_scale_mismatch(checkpoint, config.zero_conv_lr_scale)) from None
        except RuntimeError as error:
            if "size mismatch" not in str(error) and "Missing key" not in str(error):
                raise
            # Else a traceback with a line per mismatched weight (46 for an SDXL checkpoint on SD1.5).
            raise ValueError(f"{checkpoint} holds a BrushNet of another shape than this run's (made for another "
                             "base model or layout): resume it with the base it was trained on, or start a new "
                             "--output_dir.") from None
        check_resumed_lr_scale(optimizer, checkpoint, config.zero_conv_lr_scale)
        if accelerator.is_main_process:
            warn_changed_options(checkpoint, config)
        global_step = _step(checkpoint)
        if global_step >= config.max_train_steps:
            logger.warning("%s is at step %d, not before --max_train_steps %d: nothing to train; its BrushNet "
                           "is written to %s.", checkpoint, global_step, config.max_train_steps, output_dir)
        else:
            # The data streams keep no state in the checkpoint: replaying the batches already used
            # puts them where an uninterrupted run would be, so the run continues the same trajectory.
            for _ in range(global_step * config.gradient_accumulation_steps):
                next(batches)

    if accelerator.is_main_process:
        accelerator.init_trackers(config.tracker_project_name, config={
            k: v for k, v in vars(config).items() if isinstance(v, (int, float, str, bool))
        })
    samples_per_step = config.train_batch_size * config.gradient_accumulation_steps * accelerator.num_processes
    progress = tqdm(total=config.max_train_steps, initial=global_step, desc="steps",
                    disable=not accelerator.is_local_main_process)
    started = time.perf_counter()
    steps_this_run = 0

    # -- the loop ----------------------------------------------------------------------------------
    while global_step < config.max_train_steps:
        batch = next(batches)
        with accelerator.accumulate(brushnet):
            pixel_values = batch["pixel_values"].to(accelerator.device, dtype=vae_dtype)
            masked_pixels = batch["conditioning_pixel_values"].to(accelerator.device, dtype=vae_dtype)
            with torch.no_grad():
                latents = vae.encode(pixel_values).latent_dist.sample() * vae.config.scaling_factor
                masked_latents = vae.encode(masked_pixels).latent_dist.sample() * vae.config.scaling_factor
                latents, masked_latents = latents.to(weight_dtype), masked_latents.to(weight_dtype)
                keep = latent_keep_mask(batch["masks"].to(accelerator.device), latents.shape[-2:],
                                        mask_downsampling).to(weight_dtype)
                prompt_embeds, added_cond_kwargs = text.encode(batch, config, accelerator.device, weight_dtype)

            noise = training_noise(latents, config.noise_offset)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                                      device=latents.device).long()
            noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)

            down, mid, up = brushnet(
                noisy_latents, timesteps, encoder_hidden_states=prompt_embeds,
                brushnet_cond=torch.cat([masked_latents, keep], dim=1), added_cond_kwargs=added_cond_kwargs,
                return_dict=False,
            )
            model_pred = unet_forward(
                unet, noisy_latents, timesteps, prompt_embeds,
                down_block_add_samples=[r.to(weight_dtype) for r in down],
                mid_block_add_sample=mid.to(weight_dtype),
                up_block_add_samples=[r.to(weight_dtype) for r in up],
                added_cond_kwargs=added_cond_kwargs,
            )
            target = noise if noise_scheduler.config.prediction_type == "epsilon" else \
                noise_scheduler.get_velocity(latents, noise, timesteps)
            loss = diffusion_loss(model_pred, target, keep, config.masked_loss_weight)

            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(brushnet.parameters(), config.max_grad_norm)
            step_lr = lr_scheduler.get_last_lr()[0]  # the rate this step uses; step() moves to the next one
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=config.set_grads_to_none)

        if not accelerator.sync_gradients:
            continue
        global_step += 1
        steps_this_run += 1
        if ema is not None:
            ema.step(accelerator.unwrap_model(brushnet).parameters())
        rate = steps_this_run * samples_per_step / (time.perf_counter() - started)
        logs = {"loss": loss.detach().item(), "lr": step_lr, "samples_per_s": rate}
        progress.update(1)
        progress.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}", samples_s=f"{rate:.2f}")
        accelerator.log(logs, step=global_step)

        if global_step % config.checkpointing_steps == 0 or global_step == config.max_train_steps:
            save_checkpoint(accelerator, brushnet, ema, output_dir, global_step, config.checkpoints_total_limit,
                            data_seed=seed, options=resumed_options(config))
        if config.validation_image and global_step % config.validation_steps == 0 and accelerator.is_main_process:
            run_validation(accelerator, brushnet, ema, base, noise_scheduler, config, global_step, weight_dtype)

    # -- the released format: config.json + diffusion_pytorch_model.safetensors ----------------------
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final = accelerator.unwrap_model(brushnet)
        if ema is not None:
            ema.copy_to(final.parameters())
        # Written beside and moved in file by file, so an interrupted save leaves no half a
        # safetensors file where a user would load it (the last checkpoint holds the same weights).
        staging = Path(output_dir) / ".brushnet-final.partial"
        shutil.rmtree(staging, ignore_errors=True)
        final.save_pretrained(staging)
        for written in sorted(staging.iterdir()):
            os.replace(written, Path(output_dir) / written.name)
        staging.rmdir()
    accelerator.end_training()
    progress.close()
    skipped = getattr(dataset, "skipped", 0)
    if skipped and config.dataloader_num_workers == 0:  # workers count their own skips in their warnings
        logger.warning("Skipped %d broken training sample(s): %s", skipped, dict(dataset.skip_reasons))
    return output_dir


# -- pieces the loop calls ------------------------------------------------------------------------

def _check_config(config: TrainConfig) -> None:
    if not config.pretrained_model_name_or_path:
        raise ValueError("--pretrained_model_name_or_path is required: the base SD1.5/SDXL model to train against.")
    if not config.train_data_dir:
        raise ValueError("--train_data_dir is required: BrushData shards or a folder of images with captions.")
    if not any(c in config.train_data_dir for c in "*{") and not Path(config.train_data_dir).exists():
        raise ValueError(f"--train_data_dir {config.train_data_dir} does not exist.")
    if not len(config.validation_image) == len(config.validation_mask) == len(config.validation_prompt):
        raise ValueError("Give as many --validation_image as --validation_mask and --validation_prompt.")
    if config.mixed_precision not in (None, "no", "fp16", "bf16"):
        raise ValueError(f"--mixed_precision must be no, fp16 or bf16; got {config.mixed_precision}.")
    check_options(config)
    output_dir = Path(config.output_dir)
    # The first save would otherwise fail only after the models load and the first steps train.
    existing = next(p for p in (output_dir.absolute(), *output_dir.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"--output_dir {output_dir}: {existing} is a file, not a folder.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--output_dir {output_dir}: {existing} is not writable.")
    _check_validation_files(config)
    holds_model = any((output_dir / name).exists() for name in (
        "config.json", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"))
    if not config.resume_from_checkpoint and (_checkpoints(output_dir) or holds_model):
        raise ValueError(f"{output_dir} already holds another run's checkpoints or BrushNet: pass "
                         "--resume_from_checkpoint latest to continue it, or choose a new --output_dir.")
    if config.resume_from_checkpoint == "latest" and holds_model and not _checkpoints(output_dir):
        # Nothing to resume, and the new run's save would replace the model there (a downloaded
        # BrushNet given as --output_dir to go on from it).
        raise ValueError(f"{output_dir} holds a model but no checkpoint-N to resume: to fine-tune that BrushNet, pass "
                         f"--brushnet_model_name_or_path {output_dir} with a new --output_dir.")


def _check_validation_files(config: TrainConfig) -> None:
    """Open the validation images and masks now, not at the first validation thousands of steps in."""
    from ..masks import load_mask, open_image

    for image, mask in zip(config.validation_image, config.validation_mask):
        size, mask_size = open_image(image).size, load_mask(mask).size
        # Both are resized to --resolution for validation: a mask of another size would land on
        # other pixels than the ones it marks, and the validation images show a wrong inpainting.
        if size != mask_size:
            raise ValueError(f"--validation_image {image} is {size[0]}x{size[1]} but --validation_mask {mask} is "
                             f"{mask_size[0]}x{mask_size[1]}: masks must have the size of their image.")


def first_batch(batches, config: TrainConfig):
    """The first batch now, so data without one usable sample fails before any model loads."""
    try:
        return next(batches)
    except StopIteration:
        raise ValueError(f"--train_data_dir {config.train_data_dir} gave no training sample.") from None
    except ValueError as error:
        # A DataLoader worker's error comes wrapped in the worker's traceback; its last line is the message.
        if "Original Traceback" not in str(error):
            raise
        raise ValueError(str(error).strip().splitlines()[-1].removeprefix("ValueError: ")) from None


class TextConditioning:
    """Tokenizers and frozen text encoders of the base; turns a batch's captions into conditioning."""

    def __init__(self, tokenizers, encoders, sdxl: bool):
        self.tokenizers, self.encoders, self.sdxl = tokenizers, encoders, sdxl

    def _ids(self, tokenizer, captions, device):
        return tokenizer(captions, max_length=tokenizer.model_max_length, padding="max_length", truncation=True,
                         return_tensors="pt").input_ids.to(device)

    def encode(self, batch, config: TrainConfig, device, dtype):
        captions = batch["caption"]
        if not self.sdxl:  # SD1.5: the last hidden state of the CLIP text encoder
            return self.encoders[0](self._ids(self.tokenizers[0], captions, device), return_dict=False)[0], None
        # SDXL: penultimate hidden states of both encoders side by side; pooled output of the second.
        hidden = []
        for tokenizer, encoder in zip(self.tokenizers, self.encoders):
            out = encoder(self._ids(tokenizer, captions, device), output_hidden_states=True)
            pooled = out[0]
            hidden.append(out.hidden_states[-2])
        prompt_embeds = torch.cat(hidden, dim=-1).to(dtype)
        size = config.resolution
        crop = (config.crops_coords_top_left_h, config.crops_coords_top_left_w)
        # (original size, crop top-left, target size) per sample, as SDXL was trained; a fixed crop
        # from the options replaces the sampled one when given, as in the reference's options.
        fixed_crop = crop if any(crop) else None
        time_ids = [list(original) + list(fixed_crop or crop_top_left) + [size, size]
                    for original, crop_top_left in zip(batch["original_size"], batch["crop_top_left"])]
        added = {"text_embeds": pooled.to(dtype), "time_ids": torch.tensor(time_ids, device=device, dtype=dtype)}
        return prompt_embeds, added


def load_base_components(config: TrainConfig) -> dict:
    """The frozen parts of the base model: UNet, VAE, tokenizer(s) and text encoder(s)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from ..loading import detect_base_family

    base = config.pretrained_model_name_or_path
    options = hub_options(base, config.revision)
    sdxl = detect_base_family(base, **options) == "sdxl"
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet", **options)
    if unet.config.in_channels != 4:
        raise ValueError(f"{base} has a {unet.config.in_channels}-channel UNet: BrushNet trains on a plain "
                         "text-to-image base, not an inpainting model.")
    if config.pretrained_vae_model_name_or_path:
        vae_source = config.pretrained_vae_model_name_or_path
        vae = AutoencoderKL.from_pretrained(vae_source, **hub_options(vae_source))
    else:
        vae = AutoencoderKL.from_pretrained(base, subfolder="vae", **options)
    # CLIPTokenizer, the class every SD1.5 and SDXL base names for both its tokenizers (what AutoTokenizer
    # resolves to), asked for by name: AutoTokenizer first looks for a model config.json in the tokenizer
    # folder, which no base has, and from a hub cache without a network that look-up fails.
    tokenizers = [CLIPTokenizer.from_pretrained(base, subfolder="tokenizer", **options)]
    encoders = [CLIPTextModel.from_pretrained(base, subfolder="text_encoder", **options)]
    if sdxl:
        tokenizers.append(CLIPTokenizer.from_pretrained(base, subfolder="tokenizer_2", **options))
        encoders.append(CLIPTextModelWithProjection.from_pretrained(base, subfolder="text_encoder_2", **options))
    return {"unet": unet, "vae": vae, "text": TextConditioning(tokenizers, encoders, sdxl)}


def hub_options(source, revision: str | None = None) -> dict:
    """from_pretrained options for a base part: the revision, and for a hub id when the hub cannot be
    reached, local_files_only (each of the parts' files would otherwise retry for half a minute
    before the cache answered; brushnet.hub)."""
    from .. import hub

    options = {"revision": revision} if revision else {}
    return hub.local_only_if_unreachable(options) if hub.looks_like_hub_id(source) else options


ZERO_CONV_PREFIXES = ("brushnet_down_blocks.", "brushnet_mid_block.", "brushnet_up_blocks.")


def parameter_groups(brushnet, zero_conv_lr_scale: float) -> list[dict]:
    """The branch's trainable parameters for the optimiser: one group, or two when the output convs (the
    ones that add into the UNet) learn at `zero_conv_lr_scale` times the rate. A group's "lr_scale"
    becomes its own lr in `make_optimizer`; the lr schedulers then scale each group's initial lr."""
    named = [(n, p) for n, p in brushnet.named_parameters() if p.requires_grad]
    if zero_conv_lr_scale == 1.0:
        return [{"params": [p for _, p in named]}]
    outputs = [p for n, p in named if n.startswith(ZERO_CONV_PREFIXES)]
    rest = [p for n, p in named if not n.startswith(ZERO_CONV_PREFIXES)]
    return [{"params": rest}, {"params": outputs, "lr_scale": zero_conv_lr_scale}]


def lr_scale_mismatch(checkpoint, zero_conv_lr_scale: float) -> str:
    return (f"{checkpoint} was trained with another --zero_conv_lr_scale than {zero_conv_lr_scale:g}: resume "
            "with the run's own value, or start a new --output_dir.")


def check_resumed_lr_scale(optimizer, checkpoint, zero_conv_lr_scale: float) -> None:
    """The loaded optimiser carries the checkpoint's per-group rates; a run resumed with another
    --zero_conv_lr_scale would silently go on with the old one."""
    initial = [group.get("initial_lr", group["lr"]) for group in optimizer.param_groups]
    saved = initial[1] / initial[0] if len(initial) == 2 else 1.0
    if not math.isclose(saved, zero_conv_lr_scale, rel_tol=1e-6):
        raise ValueError(lr_scale_mismatch(checkpoint, zero_conv_lr_scale))


def make_optimizer(groups: list[dict], config: TrainConfig, learning_rate: float):
    optimizer_class = torch.optim.AdamW
    if config.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ValueError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes (CUDA only).") from None
        optimizer_class = bnb.optim.AdamW8bit
    groups = [{"params": group["params"], "lr": learning_rate * group.get("lr_scale", 1.0)} for group in groups]
    return optimizer_class(groups, lr=learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                           weight_decay=config.adam_weight_decay, eps=config.adam_epsilon)


def make_dataset(config: TrainConfig, seed: int, rank: int, world_size: int):
    from ..data import BrushDataShards, ImageFolderDataset
    from ..data.folder import image_files

    source = Path(config.train_data_dir)
    options = dict(resolution=config.resolution, random_mask=config.random_mask, mask_mix=config.mask_mix,
                   drawn_weights=config.drawn_weights, proportion_empty_prompts=config.proportion_empty_prompts,
                   seed=seed, repeat=True, rank=rank, world_size=world_size)
    shards = sorted(source.glob("*.tar")) if source.is_dir() else []
    images = image_files(source) if shards else []
    if images:
        # Read as shards, the images would be ignored (and a stray .tar read as data).
        raise ValueError(f"--train_data_dir {source} holds both .tar shards ({shards[0].name}, ...) and images "
                         f"({images[0].name}, ...): keep one kind in it (brushnet data pack writes shards into a "
                         "folder of their own).")
    if source.suffix == ".tar" or "*" in str(source) or "{" in str(source) or shards:
        return BrushDataShards(str(source), shuffle_buffer=config.shuffle_buffer, **options)
    return ImageFolderDataset(str(source), **options)


def _collate():
    from ..data import collate

    return collate


def training_noise(latents: torch.Tensor, offset: float = 0.0) -> torch.Tensor:
    """Gaussian noise shaped like `latents`, each (image, channel) shifted by `offset` times one more
    draw (diffusers' --noise_offset) when `offset` is not 0."""
    noise = torch.randn_like(latents)
    if offset:
        # The mean colour leaks through the noise at high t (SNR > 0 at t = 999) and the model
        # learns to read it there; pure noise at inference carries a random one.
        noise = noise + offset * torch.randn((*latents.shape[:2], 1, 1), device=latents.device, dtype=latents.dtype)
    return noise


def diffusion_loss(model_pred, target, keep, masked_loss_weight: float) -> torch.Tensor:
    """MSE in float32; with masked_loss_weight != 1, the hole's latent pixels weigh that much more."""
    if masked_loss_weight == 1.0:
        return F.mse_loss(model_pred.float(), target.float(), reduction="mean")
    weights = 1.0 + (masked_loss_weight - 1.0) * (1.0 - keep.float())
    return ((model_pred.float() - target.float()) ** 2 * weights).sum() / (weights.sum() * model_pred.shape[1])


# A checkpoint is written as checkpoint-N.partial and renamed when complete; one being pruned is
# renamed checkpoint-N.stale before it is deleted. So a checkpoint-N folder is whole, and an
# interruption leaves at most these two kinds of leftovers, never a half-written or half-deleted one.
PARTIAL, STALE = ".partial", ".stale"


def find_checkpoint(output_dir: Path, resume: str | None, ema: bool = False, report: bool = True) -> Path | None:
    """The checkpoint folder to resume from: `resume` itself, or the newest complete one for "latest"."""
    checkpoint = _find_checkpoint(output_dir, resume, report)
    # The EMA state is written before brushnet/, so a folder without it was saved without EMA, not cut short.
    if ema and checkpoint is not None and not (checkpoint / "custom_checkpoint_0.pkl").is_file():
        raise ValueError(f"{checkpoint} was saved without --use_ema (it holds no EMA weights): resume it "
                         "without --use_ema, or start a new run in another --output_dir.")
    return checkpoint


def _find_checkpoint(output_dir: Path, resume: str | None, report: bool) -> Path | None:
    if not resume:
        return None
    if resume != "latest":
        # As in the reference, a bare checkpoint-N names a folder of --output_dir.
        path = next((p for p in (Path(resume), output_dir / resume) if p.is_dir()), None)
        if path is None:
            raise ValueError(f"--resume_from_checkpoint {resume} is not a checkpoint folder (nor is "
                             f"{output_dir / resume}).")
        if _step(path) is None:
            raise ValueError(f"--resume_from_checkpoint {resume}: a checkpoint folder is named checkpoint-N, "
                             "N being the step it was saved at.")
        missing = _missing_state(path)
        if missing:
            raise ValueError(f"--resume_from_checkpoint {resume} is incomplete ({missing}); pass "
                             "--resume_from_checkpoint latest to resume from the newest complete checkpoint.")
        return path
    for candidate in reversed(_checkpoints(output_dir)):
        missing = _missing_state(candidate)
        if not missing:
            return candidate
        if report:
            logger.warning("Skipping %s: incomplete (%s).", candidate, missing)
    if report:
        logger.warning("No checkpoint in %s to resume from: starting a new run.", output_dir)
    return None


def _step(path: Path) -> int | None:
    prefix, _, number = path.name.partition("-")
    return int(number) if prefix == "checkpoint" and number.isdigit() else None


def _checkpoints(output_dir: Path) -> list[Path]:
    found = [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and _step(p) is not None]
    return sorted(found, key=_step)


def _missing_state(checkpoint: Path) -> str | None:
    """What a checkpoint folder lacks to resume from (None: nothing), in the words of a log line.

    Folders written by `save_checkpoint` are complete by construction; this catches those made
    otherwise (an earlier version, a copy cut short). The names cover accelerate's plain, FSDP and
    DeepSpeed layouts (DeepSpeed keeps weights and optimiser in one pytorch_model/ folder).
    """
    if not (checkpoint / "random_states_0.pkl").is_file():
        return "no random_states_0.pkl"
    if not any(checkpoint.glob("model*.safetensors")) and not any(checkpoint.glob("pytorch_model*")):
        return "no model weights"
    if not any(checkpoint.glob("optimizer*")) and not (checkpoint / "pytorch_model").is_dir():
        return "no optimizer state"
    if not (checkpoint / "brushnet" / "diffusion_pytorch_model.safetensors").is_file():
        return "no brushnet/diffusion_pytorch_model.safetensors"
    return None


def remove_interrupted_saves(output_dir: Path) -> None:
    """Delete the leftovers of a save or prune that was interrupted; checkpoint-N folders stay."""
    for leftover in (*output_dir.glob(f"checkpoint-*{PARTIAL}"), *output_dir.glob(f"checkpoint-*{STALE}")):
        if leftover.is_dir():
            logger.warning("Removing %s, left by an interrupted checkpoint save.", leftover)
            shutil.rmtree(leftover)


def _discard(checkpoint: Path) -> None:
    stale = checkpoint.with_name(checkpoint.name + STALE)
    if stale.exists():
        shutil.rmtree(stale)
    checkpoint.rename(stale)
    shutil.rmtree(stale)


DATA_SEED_FILE = "data_seed-{rank}.json"  # in a checkpoint: each process's seed of its data order and masks


# The options a checkpoint's own state fixes (the optimiser's and schedule's numbers) or that shape
# its data stream: given otherwise on resume, they are not what the resumed run does, or not the
# stream the replay skips through.
RESUMED_OPTIONS = ("learning_rate", "lr_scheduler", "lr_warmup_steps", "adam_beta1", "adam_beta2",
                   "adam_weight_decay", "adam_epsilon", "train_batch_size", "gradient_accumulation_steps",
                   "resolution", "mask_mix", "seed", "random_mask", "proportion_empty_prompts")
OPTIONS_FILE = "run_options.json"


def resumed_options(config) -> dict:
    return {name: getattr(config, name, None) for name in RESUMED_OPTIONS}


def warn_changed_options(checkpoint: Path, config) -> None:
    """One warning naming the options given otherwise than the checkpoint's run had them."""
    path = checkpoint / OPTIONS_FILE
    if not path.is_file():  # saved before the file existed
        return
    saved = json.loads(path.read_text())
    changed = [f"--{name} {getattr(config, name)!r} (the checkpoint's run: {saved[name]!r})"
               for name in RESUMED_OPTIONS if name in saved and saved[name] != getattr(config, name, None)]
    if changed:
        logger.warning("Resuming %s with options its run did not have: %s. The optimiser's and the schedule's "
                       "numbers come from the checkpoint, and the data replay assumes the run's batches; start a "
                       "new --output_dir (with --brushnet_model_name_or_path %s/brushnet) to train with them.",
                       checkpoint, "; ".join(changed), checkpoint)


def save_checkpoint(accelerator, brushnet, ema, output_dir: Path, step: int, keep_last: int | None,
                    data_seed: int | None = None, options: dict | None = None) -> None:
    """The full accelerate state (to resume) plus a `brushnet/` folder that `from_pretrained` loads,
    and the data seed (drawn at random without --seed), so that a resume reads the same stream.

    Written as checkpoint-N.partial and renamed when every process has written its part; older
    checkpoints are pruned only after that, so an interruption never costs the previous one.
    """
    path = output_dir / f"checkpoint-{step}"
    partial = path.with_name(path.name + PARTIAL)
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()  # nobody writes into the folder before it is cleared
    accelerator.save_state(str(partial))  # each process writes its own random states into it
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(brushnet)
        if ema is not None:  # the folder holds the EMA weights, the state keeps both
            ema.store(model.parameters())
            ema.copy_to(model.parameters())
            model.save_pretrained(partial / "brushnet")
            ema.restore(model.parameters())
        else:
            model.save_pretrained(partial / "brushnet")
        if options is not None:
            (partial / OPTIONS_FILE).write_text(json.dumps(options))
    if data_seed is not None:  # each process drew its own
        (partial / DATA_SEED_FILE.format(rank=accelerator.process_index)).write_text(json.dumps({"data_seed": data_seed}))
    accelerator.wait_for_everyone()  # every process's files are in before the folder counts as complete
    if not accelerator.is_main_process:
        return
    if path.exists():  # resumed from an earlier checkpoint: this step's old one is superseded
        _discard(path)
    partial.rename(path)
    if keep_last is not None:
        older = [p for p in _checkpoints(output_dir) if p != path]
        for stale in older[: max(0, len(older) - keep_last + 1)]:
            _discard(stale)


def run_validation(accelerator, brushnet, ema, base: dict, noise_scheduler, config: TrainConfig, step: int,
                   weight_dtype) -> list:
    """Inpaint the validation triples with the current weights; images go to the trackers and to disk."""
    import numpy as np
    from PIL import Image

    from ..masks import load_mask, open_image
    from ..pipelines import StableDiffusionBrushNetPipeline, StableDiffusionXLBrushNetPipeline
    from ..schedulers import make_scheduler

    model = accelerator.unwrap_model(brushnet)
    if ema is not None:
        ema.store(model.parameters())
        ema.copy_to(model.parameters())
    model.eval()
    text = base["text"]
    autocast = weight_dtype != torch.float32
    frozen = [(module, module.dtype) for module in (base["vae"], base["unet"], *text.encoders)]
    upcast = autocast and accelerator.device.type == "cpu"
    if upcast:
        # On a CPU, autocast beside the fp32 branch fails in the bf16 UNet's norms ("mixed dtype
        # (CPU)"): validate in fp32, the frozen base upcast for the while (bf16 -> fp32 -> bf16 is exact).
        autocast = False
        for module, _ in frozen:
            module.to(torch.float32)
    components = dict(vae=base["vae"], unet=base["unet"], brushnet=model,
                      scheduler=make_scheduler("unipc", noise_scheduler.config))
    if text.sdxl:
        pipe = StableDiffusionXLBrushNetPipeline(text_encoder=text.encoders[0], text_encoder_2=text.encoders[1],
                                                 tokenizer=text.tokenizers[0], tokenizer_2=text.tokenizers[1],
                                                 **components)
    else:
        pipe = StableDiffusionBrushNetPipeline(text_encoder=text.encoders[0], tokenizer=text.tokenizers[0],
                                               **components)
    pipe.set_progress_bar_config(disable=True)
    folder = Path(config.output_dir) / "validation" / f"step-{step}"
    folder.mkdir(parents=True, exist_ok=True)
    logged = []
    try:
        for index, (image_path, mask_path, prompt) in enumerate(
                zip(config.validation_image, config.validation_mask, config.validation_prompt)):
            image = open_image(image_path).resize((config.resolution, config.resolution))
            mask = load_mask(mask_path).resize((config.resolution, config.resolution), Image.NEAREST)
            generator = torch.Generator(device="cpu").manual_seed(config.seed or 0)
            with torch.autocast(accelerator.device.type, dtype=weight_dtype, enabled=autocast):
                images = pipe(prompt, image=image, mask=mask, num_inference_steps=config.validation_inference_steps,
                              num_images_per_prompt=config.num_validation_images, generator=generator).images
            for k, result in enumerate(images):
                with atomic_write(folder / f"{index}-{k}.png") as f:  # an interrupted run leaves no half a PNG
                    result.save(f, format="PNG")
            logged.append(np.stack([np.asarray(im) for im in images]))
    finally:
        if upcast:
            for module, dtype in frozen:
                module.to(dtype)
        if ema is not None:
            ema.restore(model.parameters())
        model.train()
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            for index, images in enumerate(logged):
                tracker.writer.add_images(f"validation/{index}", images, step, dataformats="NHWC")
    return logged
