"""What the SD1.5 and SDXL BrushNet pipelines share: inputs, the BrushNet step, decoding, loading."""

import inspect
import json
import logging
import math
import numbers
import os

import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint import StableDiffusionInpaintPipeline
from diffusers.utils.torch_utils import randn_tensor

from ..arguments import (
    check_blend_kernel,
    check_conditioning_scale,
    check_control_window,
    check_custom_timesteps,
    check_guidance,
    check_guidance_rescale,
    check_num_images,
    check_number,
    check_schedule,
    check_steps,
)
from ..masks import batch_size_of, check_same_size, image_size, latent_keep_mask, preprocess_mask, unit_range
from ..models import BrushNetModel, count_residuals, unet_forward
from ..models.injection import install_residual_slots
from ..models.compatibility import mismatch_message
from .blending import blend_tensors

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


class NonFiniteOutputError(ValueError):
    """The sampled image holds NaN or infinite values. Seen in bfloat16 on CPUs, where oneDNN's
    kernels gave NaNs on latents only a few cells tall or wide (the same calls are finite with
    torch.backends.mkldnn disabled, and in float32)."""

logger = logging.getLogger(__name__)
# torch.compile's backend for `enable_fast_path` (tests use "aot_eager": the same graph capture
# and recompilation rules, without inductor's code generation).
COMPILE_BACKEND = "inductor"


def _check_pipeline_class(pipe) -> None:
    """The class that fits the loaded folder, said at load time (at call time it was an error about
    added_cond_kwargs, or a missing second text encoder)."""
    from .pipeline_powerpaint import StableDiffusionPowerPaintPipeline
    from .pipeline_sdxl import StableDiffusionXLBrushNetPipeline

    sdxl = _unwrap(pipe.unet).config.addition_embed_type == "text_time"
    powerpaint = _unwrap(pipe.brushnet).has_attention
    fitting = (StableDiffusionXLBrushNetPipeline if sdxl else
               StableDiffusionPowerPaintPipeline if powerpaint else None)
    if fitting is not None and not isinstance(pipe, fitting):
        raise ValueError(f"This folder holds {'an SDXL' if sdxl else 'a PowerPaint'} model: load it with "
                         f"{fitting.__name__} (or brushnet.load_pipeline, which picks the class).")
    if fitting is None and isinstance(pipe, (StableDiffusionXLBrushNetPipeline, StableDiffusionPowerPaintPipeline)):
        raise ValueError("This folder holds an SD1.5 BrushNet model: load it with StableDiffusionBrushNetPipeline "
                         "(or brushnet.load_pipeline, which picks the class).")


def _unwrap(module):
    return getattr(module, "_orig_mod", module)  # torch.compile wrapper


def check_brushnet_matches_unet(brushnet, unet) -> None:
    """Raise before any denoising if the BrushNet does not fit the base UNet (another family, layout
    or channel count), saying what differs."""
    brushnet, unet = _unwrap(brushnet), _unwrap(unet)
    if not isinstance(brushnet, BrushNetModel):
        raise ValueError(f"The pipeline's brushnet must be a BrushNetModel; got {type(brushnet).__name__}: load one "
                         "with BrushNetModel.from_pretrained(...) and pass brushnet=.")
    message = mismatch_message(brushnet.config, unet.config)
    if message is None and (len(brushnet.brushnet_down_blocks), len(brushnet.brushnet_up_blocks)) != count_residuals(unet):
        message = (f"This BrushNet gives {len(brushnet.brushnet_down_blocks)} down and "
                   f"{len(brushnet.brushnet_up_blocks)} up residuals but the base UNet takes "
                   f"{count_residuals(unet)}: use a BrushNet made for this base model.")
    if message is not None:
        raise ValueError(message)


def brushnet_scale_schedule(scale: float, start: float, end: float, num_steps: int) -> list[float]:
    """The BrushNet conditioning scale at each step: `scale` while i/N >= start and (i+1)/N <= end, else 0."""
    return [scale * (1.0 - float(i / num_steps < start or (i + 1) / num_steps > end)) for i in range(num_steps)]


def _single(value, name: str) -> float:
    # The reference accepts one-element lists (a MultiBrushNet leftover).
    if isinstance(value, (list, tuple)):
        if len(value) != 1:
            raise ValueError(f"`{name}` must be a number; got a list of {len(value)}.")
        value = value[0]
    return value


class BrushNetPipelineMixin:
    """Shared steps of the BrushNet pipelines. Expects `vae`, `unet`, `brushnet`, `scheduler`."""

    _optional_components = ["safety_checker", "feature_extractor", "image_encoder"]

    def enable_fast_path(self, *, mode: str | None = None, backend: str | None = None, fullgraph: bool = False,
                         fuse_qkv: bool = False, channels_last: bool | None = None) -> None:
        """Compile the UNet and the branch with `torch.compile`, the work of every denoising step.

        The residuals still enter the stock UNet through hooks, installed once
        (`install_residual_slots`): dynamo traces them inline and lifts the residual tensors as
        graph inputs, so calls of the same shapes never recompile (prompts, seeds, guidance, conditioning scale, start/end and
        step counts change freely; `tests/test_fast_path.py` checks it). The first call of each
        image size pays the compilation (inductor caches it on disk for the next process).

        - `mode`: torch.compile's; default "reduce-overhead" on CUDA (CUDA graphs: the step is
          launch-bound at 512x512) and the default mode elsewhere.
        - `backend`: default `COMPILE_BACKEND` ("inductor").
        - `fuse_qkv`: fuse each attention's q/k/v projections (diffusers' `fuse_qkv_projections`;
          off by default: it changes the attention processors LoRA and IP-Adapter load into).
        - `channels_last`: NHWC weights and activations; default on CUDA only.
        Call it after moving the pipeline to its device and loading any LoRA.
        """
        cuda = self._execution_device.type == "cuda"
        if mode is None and cuda:
            mode = "reduce-overhead"
        if channels_last is None:
            channels_last = cuda
        unet, branch = _unwrap(self.unet), _unwrap(self.brushnet)
        if fuse_qkv:
            unet.fuse_qkv_projections()
        if channels_last:
            unet.to(memory_format=torch.channels_last)
            branch.to(memory_format=torch.channels_last)
        install_residual_slots(unet)  # hooks the compiled graph can trust (see ResidualSlots)
        options = {"mode": mode, "backend": backend or COMPILE_BACKEND, "fullgraph": fullgraph}
        self.unet = torch.compile(unet, **options)
        self.brushnet = torch.compile(branch, **options)

    def _init_processors(self) -> None:
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 8
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor, do_convert_rgb=True)

    @classmethod
    def load_config(cls, *args, **kwargs):
        # Pipeline folders (the reference's and ours) name the component ["diffusers", "BrushNetModel"],
        # a class stock diffusers does not have. `from_pretrained` loads it itself and passes it in;
        # an empty entry tells diffusers not to look for it.
        out = super().load_config(*args, **kwargs)
        config = out[0] if isinstance(out, tuple) else out
        if "brushnet" in config:
            config["brushnet"] = [None, None]
        return out

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Load a whole pipeline folder or hub id (ours or the reference's), or a base SD1.5/SDXL
        folder or hub id together with `brushnet=BrushNetModel.from_pretrained(...)`.

        No safety checker is loaded unless you pass one.
        """
        if "safety_checker" in inspect.signature(cls.__init__).parameters:
            kwargs.setdefault("safety_checker", None)
        if "brushnet" not in kwargs:
            folder = str(pretrained_model_name_or_path)
            if os.path.isfile(folder):
                raise ValueError(f"{folder} is a file: {cls.__name__}.from_pretrained takes a pipeline folder or hub id "
                                 "(for a single checkpoint file use brushnet.loading.load_pipeline or "
                                 "from_single_file).")
            if not os.path.isdir(folder):
                folder = cls.download(folder, **_hub_kwargs(kwargs))
            if not os.path.isfile(os.path.join(folder, "model_index.json")):
                raise ValueError(f"{pretrained_model_name_or_path} has no model_index.json: it is not a pipeline "
                                 "folder (one with model_index.json, unet/, vae/, brushnet/, ...).")
            if not os.path.isfile(os.path.join(folder, "brushnet", "config.json")):
                raise ValueError(
                    f"{pretrained_model_name_or_path} has no brushnet/ folder: it is a base model. Pass "
                    "brushnet=BrushNetModel.from_pretrained(...) to load a BrushNet with it."
                )
            dtype_kwargs = {k: kwargs[k] for k in ("dtype", "torch_dtype", "variant") if kwargs.get(k) is not None}
            kwargs["brushnet"] = BrushNetModel.from_pretrained(folder, subfolder="brushnet", **dtype_kwargs)
            pretrained_model_name_or_path = folder
        pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        check_brushnet_matches_unet(pipe.brushnet, pipe.unet)
        _check_pipeline_class(pipe)
        return pipe

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save in the reference's layout, so either implementation loads the folder."""
        super().save_pretrained(save_directory, *args, **kwargs)
        index_path = os.path.join(save_directory, "model_index.json")
        with open(index_path) as f:
            index = json.load(f)
        index["brushnet"] = ["diffusers", "BrushNetModel"]
        with open(index_path, "w") as f:
            json.dump(index, f, indent=2, sort_keys=True)

    # -- inputs -----------------------------------------------------------------------------

    def check_brushnet_inputs(self, image, mask, height, width, prompt_batch, num_images_per_prompt, generator,
                              brushnet_conditioning_scale, control_guidance_start, control_guidance_end, blend_kernel):
        if image is None or mask is None:
            raise ValueError("Both `image` and `mask` are required (mask: white = region to fill).")
        check_same_size(image, mask)
        image_height, image_width = image_size(image[0] if isinstance(image, (list, tuple)) else image)
        for name, value, own in (("height", height, image_height), ("width", width, image_width)):
            if value is None and own % self.vae_scale_factor != 0:
                # diffusers would silently crop to a multiple; a result of another size than its
                # input surprises every caller that pastes it back.
                raise ValueError(
                    f"The image is {image_width}x{image_height} (WxH): its width and height must be multiples of "
                    f"{self.vae_scale_factor} (the VAE's scale factor). Resize or pad it, pass height= and width=, "
                    "or use brushnet.inpaint.inpaint(), which works at any size."
                )
            if value is not None and (not isinstance(value, numbers.Integral) or value < self.vae_scale_factor
                                      or value % self.vae_scale_factor != 0):
                raise ValueError(
                    f"`{name}` must be a positive multiple of {self.vae_scale_factor} (the VAE's scale factor); "
                    f"got {value!r}."
                )
        n_images, n_masks = batch_size_of(image), batch_size_of(mask)
        for what, n in (("images", n_images), ("masks", n_masks)):
            if n not in (1, prompt_batch):
                raise ValueError(f"Got {n} {what} for {prompt_batch} prompts: give one, or one per prompt.")
        if isinstance(generator, list) and len(generator) != prompt_batch * num_images_per_prompt:
            raise ValueError(
                f"Got {len(generator)} generators for {prompt_batch} prompts x {num_images_per_prompt} images: "
                f"give one generator or {prompt_batch * num_images_per_prompt}."
            )
        scale = check_conditioning_scale(_single(brushnet_conditioning_scale, "brushnet_conditioning_scale"))
        start, end = check_control_window(_single(control_guidance_start, "control_guidance_start"),
                                          _single(control_guidance_end, "control_guidance_end"))
        blend_kernel = check_blend_kernel(blend_kernel)
        check_brushnet_matches_unet(self.brushnet, self.unet)
        branch, unet = _unwrap(self.brushnet), _unwrap(self.unet)
        if branch.dtype != unet.dtype and not torch.is_autocast_enabled(unet.device.type):
            # It would fail in the first matrix product ("mat1 and mat2 must have the same dtype").
            raise ValueError(f"The BrushNet is in {str(branch.dtype).removeprefix('torch.')} but the UNet in "
                             f"{str(unet.dtype).removeprefix('torch.')}: put both in one precision "
                             "(pipe.to(dtype), or load the BrushNet with the pipeline's torch_dtype).")
        return scale, start, end, blend_kernel

    def check_sampling_inputs(self, num_inference_steps, timesteps, guidance_scale, num_images_per_prompt,
                              eta=0.0, guidance_rescale=0.0, output_type="pil",
                              sigmas=None) -> tuple[int | None, int]:
        """The sampler's numbers, before any work: steps, guidance, images per prompt, eta, and the
        output type (diffusers warns on an unknown one and returns numpy arrays; here it is an error).
        Returns the steps (None with `timesteps`) and images per prompt as ints."""
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(map(repr, OUTPUT_TYPES))}; got {output_type!r}.")
        check_diffusion_scheduler(self.scheduler)
        if sigmas is not None:
            if timesteps is not None:
                raise ValueError("Give `timesteps` or `sigmas`, not both: each sets the whole schedule.")
            check_custom_sigmas(sigmas, self.scheduler)
        elif timesteps is None:
            num_inference_steps = check_steps(num_inference_steps,
                                              num_train_timesteps=self.scheduler.config.num_train_timesteps)
            spaced = getattr(self.scheduler.config, "original_inference_steps", None)  # LCM, TCD
            if spaced is not None and num_inference_steps > spaced:
                raise ValueError(f"{type(self.scheduler).__name__} spaces at most {spaced} steps (its "
                                 f"original_inference_steps): use num_inference_steps <= {spaced} (it is made for 4-8).")
        elif len(timesteps) == 0:
            raise ValueError("`timesteps` is empty: give at least one timestep, or num_inference_steps instead.")
        else:
            check_custom_timesteps(timesteps, self.scheduler.config.num_train_timesteps)
        check_guidance(guidance_scale)
        check_guidance_rescale(guidance_rescale)
        num_images_per_prompt = check_num_images(num_images_per_prompt)
        check_number(eta, "eta", low=0.0, high=1.0)
        return num_inference_steps, num_images_per_prompt

    def check_call_inputs(self, *, image, mask, height, width, batch_size, num_inference_steps, timesteps, sigmas,
                          guidance_scale, num_images_per_prompt, eta, guidance_rescale, output_type, strength,
                          generator, brushnet_conditioning_scale, control_guidance_start, control_guidance_end,
                          blend_kernel):
        """Every pipeline's sampler, strength and BrushNet checks, in the order a call needs them.
        Returns (steps, images per prompt, scale, start, end, blend kernel), whole numbers as ints
        (2.0 from a JSON or YAML file comes back as 2); steps is None with `timesteps` or `sigmas`."""
        num_inference_steps, num_images_per_prompt = self.check_sampling_inputs(
            num_inference_steps, timesteps, guidance_scale, num_images_per_prompt, eta, guidance_rescale, output_type,
            sigmas)
        scheduled = len(timesteps) if timesteps is not None else len(sigmas) if sigmas is not None else None
        self.check_strength(strength, scheduled if scheduled is not None else num_inference_steps)
        scale, start, end, blend_kernel = self.check_brushnet_inputs(
            image, mask, height, width, batch_size, num_images_per_prompt, generator,
            brushnet_conditioning_scale, control_guidance_start, control_guidance_end, blend_kernel,
        )
        return num_inference_steps, num_images_per_prompt, scale, start, end, blend_kernel

    def check_schedule(self, timesteps) -> None:
        """Refuse a schedule the sampler cannot take (two steps on one timestep: a NaN image)."""
        check_schedule(timesteps, getattr(self.scheduler, "sigmas", None), getattr(self.scheduler, "order", 1))

    def prepare_brushnet_inputs(self, image, mask, height, width, batch_size, device):
        """Preprocess image and mask once per call.

        Returns (image in [-1, 1] with the hole blacked out, hole mask with 1 = fill, conditioning
        latents for the branch: masked-image latent + keep mask), each with `batch_size` rows.
        """
        image = unit_range(image)
        # Our own reading of the size: diffusers' takes an (H, W, C) array's W for its height and
        # fails on a (C, H, W) tensor, shapes its preprocess otherwise accepts.
        own_height, own_width = image_size(image[0] if isinstance(image, (list, tuple)) else image)
        height, width = height or own_height, width or own_width
        pixels = self.image_processor.preprocess(image, height=height, width=width).to(torch.float32)
        hole = preprocess_mask(mask, self.image_processor, height, width)
        if pixels.shape[0] != hole.shape[0]:  # one mask for many images, or the reverse
            n = max(pixels.shape[0], hole.shape[0])
            pixels, hole = pixels.expand(n, -1, -1, -1), hole.expand(n, -1, -1, -1)
        fraction = hole.mean().item()
        if fraction == 0.0:
            logger.warning("The mask has no hole (nothing is white): the result will mostly keep the image.")
        elif fraction == 1.0:
            logger.warning("The mask is all hole (everything is white): BrushNet has nothing to keep.")
        # Black out the hole as the reference's users do, so the original or a pre-masked image give
        # the same result.
        masked = torch.where(hole.bool(), torch.full_like(pixels, -1.0), pixels)

        # Encode the distinct images once, with the posterior mode, then repeat to the batch.
        with torch.no_grad():
            latents = self._vae_encode(masked.to(device))
        latents = latents * self.vae.config.scaling_factor
        keep = 1.0 - hole
        branch = _unwrap(self.brushnet)
        keep_latent = latent_keep_mask(keep, latents.shape[-2:], branch.config.mask_downsampling)
        conditioning = torch.cat([latents.to(keep_latent.dtype), keep_latent.to(device)], dim=1)
        repeat = lambda x: x.repeat_interleave(batch_size // x.shape[0], dim=0)  # noqa: E731
        dtype = branch.dtype
        return repeat(pixels).to(device), repeat(hole).to(device), repeat(conditioning).to(device=device, dtype=dtype)

    def _vae_encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(pixels.to(self.vae.dtype)).latent_dist.mode()

    # The schedule's last `strength` fraction, cut as diffusers' img2img and inpainting pipelines cut it.
    get_timesteps = StableDiffusionInpaintPipeline.get_timesteps

    def check_strength(self, strength, num_inference_steps: int) -> None:
        check_number(strength, "strength", low=0.0, high=1.0, low_inclusive=False)
        if int(num_inference_steps * strength) < 1:
            raise ValueError(f"strength={strength} of num_inference_steps={num_inference_steps} leaves no denoising "
                             f"step: use strength >= {1 / num_inference_steps:.3g} or more steps.")

    def prepare_latents(self, batch_size, num_channels_latents, height, width, dtype, device, generator, latents=None,
                        image=None, timestep=None):
        """The starting latents: noise for the whole schedule or, with `image` (pixels in [-1, 1],
        strength < 1), the image's latent noised to `timestep` as diffusers' inpainting pipelines
        start. Given `latents` are used as that noise."""
        shape = (batch_size, num_channels_latents, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif not isinstance(latents, torch.Tensor):
            raise TypeError(f"`latents` must be a torch tensor; got {type(latents).__name__}.")
        elif latents.shape != shape:
            raise ValueError(f"`latents` must have shape {shape}; got {tuple(latents.shape)}.")
        else:
            latents = latents.to(device=device, dtype=dtype)  # the pipeline's precision, whatever it came in
        if image is None:
            return latents * self.scheduler.init_noise_sigma
        # The images of a call repeat each row num_images_per_prompt times: encode each once.
        distinct, rows = torch.unique_consecutive(image, dim=0, return_inverse=True)
        with torch.no_grad():
            image_latents = self._vae_encode(distinct.to(device))[rows.to(device)] * self.vae.config.scaling_factor
        return self.scheduler.add_noise(image_latents.to(dtype), latents, timestep.repeat(batch_size))

    # -- one denoising step -------------------------------------------------------------------

    def guided(self, noise_pred: torch.Tensor) -> torch.Tensor:
        """Classifier-free guidance of a `[negative; positive]` prediction. With `guidance_rescale`
        > 0 the guided prediction is pulled back toward the positive half's spread (diffusers'
        `rescale_noise_cfg`, Lin et al. 2023): a large guidance otherwise overshoots, most of all on
        zero-terminal-SNR models. At 0 (the default) it is the reference's plain combination."""
        if not self.do_classifier_free_guidance:
            return noise_pred
        noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
        noise_pred = noise_pred_uncond + self.guidance_scale * (noise_pred_text - noise_pred_uncond)
        if self.guidance_rescale > 0:
            noise_pred = rescale_noise_cfg(noise_pred, noise_pred_text, guidance_rescale=self.guidance_rescale)
        return noise_pred

    def predict_noise(self, latent_model_input, t, prompt_embeds, conditioning, scale, *, guess_mode,
                      unet_kwargs, brushnet_added_cond_kwargs=None, brushnet_prompt_embeds=None, reuse=None):
        """The UNet's noise prediction (before CFG) with BrushNet's residuals for this step.

        Under CFG the branch runs once for both halves when its input is the same for both (an SD1.5
        BrushNet sees no text); an SDXL BrushNet reads the pooled text through its add-embedding,
        and a PowerPaint branch reads `brushnet_prompt_embeds` (its own `[negative; positive]` task
        prompts) through cross-attention, so those run on the full batch. Guess mode runs it on the
        conditional half only and gives the unconditional half no residual. At scale 0 the branch
        is skipped entirely. `conditioning` has one row per image, or already one per CFG row.
        `reuse` (a `BranchReuse`, see `brushnet_every`) may hand back the residuals of an earlier step.
        """
        if scale == 0.0:  # called as unet_forward calls it, so a compiled UNet sees one signature
            return self.unet(latent_model_input, t, prompt_embeds, return_dict=False, **unet_kwargs)[0]
        residuals = reuse.residuals(scale) if reuse is not None else None
        if residuals is not None and residuals[1].shape[0] != latent_model_input.shape[0]:
            residuals = None  # kept under CFG, which a step-end callback has since switched off
        if residuals is None:
            residuals = self._branch_residuals(latent_model_input, t, prompt_embeds, conditioning, scale,
                                               guess_mode, brushnet_added_cond_kwargs, brushnet_prompt_embeds)
            if reuse is not None:
                reuse.keep(residuals, scale, compiled=_is_compiled(self.brushnet))
        down, mid, up = residuals
        return unet_forward(self.unet, latent_model_input, t, prompt_embeds, down_block_add_samples=down,
                            mid_block_add_sample=mid, up_block_add_samples=up, **unet_kwargs)

    def _branch_residuals(self, latent_model_input, t, prompt_embeds, conditioning, scale, guess_mode,
                          brushnet_added_cond_kwargs, brushnet_prompt_embeds):
        cfg = self.do_classifier_free_guidance
        branch = _unwrap(self.brushnet)
        if branch.has_attention and brushnet_prompt_embeds is None:
            raise ValueError(
                "This branch has cross-attention (a PowerPaint BrushNet) and needs its task prompts: use "
                "StableDiffusionPowerPaintPipeline."
            )
        if brushnet_prompt_embeds is None:
            brushnet_prompt_embeds = prompt_embeds
        elif not cfg and brushnet_prompt_embeds.shape[0] == 2 * latent_model_input.shape[0]:
            # [negative; positive] task prompts, and a step-end callback has since switched CFG off
            brushnet_prompt_embeds = brushnet_prompt_embeds.chunk(2)[1]
        text_free = branch.config.addition_embed_type is None and not branch.has_attention
        half_batch = cfg and (guess_mode or text_free)
        if half_batch:
            branch_input = latent_model_input.chunk(2)[1]
            branch_embeds = brushnet_prompt_embeds.chunk(2)[1]
            branch_added = (None if brushnet_added_cond_kwargs is None
                            else {k: v.chunk(2)[1] for k, v in brushnet_added_cond_kwargs.items()})
            branch_cond = conditioning
        else:
            branch_input, branch_embeds = latent_model_input, brushnet_prompt_embeds
            branch_added = brushnet_added_cond_kwargs
            doubled = cfg and conditioning.shape[0] != branch_input.shape[0]
            branch_cond = torch.cat([conditioning] * 2) if doubled else conditioning
        down, mid, up = self.brushnet(
            branch_input, t, encoder_hidden_states=branch_embeds, brushnet_cond=branch_cond,
            conditioning_scale=self._scale_argument(scale, branch_input), guess_mode=guess_mode,
            added_cond_kwargs=branch_added, return_dict=False,
        )
        if half_batch:
            other_half = torch.zeros_like if guess_mode else (lambda r: r)
            down = [torch.cat([other_half(r), r]) for r in down]
            mid = torch.cat([other_half(mid), mid])
            up = [torch.cat([other_half(r), r]) for r in up]
        return down, mid, up

    def _scale_argument(self, scale: float, like: torch.Tensor):
        # A compiled branch specialises on Python floats (a new scale would recompile it); a 0-d
        # tensor is a graph input instead. Eager keeps the float: bit-identical to the reference.
        if _is_compiled(self.brushnet):
            return torch.tensor(scale, device=like.device, dtype=torch.float32)
        return scale

    # -- output -------------------------------------------------------------------------------

    def finish_images(self, decoded, pixels, hole, output_type, blend, blend_kernel, nsfw_flags=None):
        """Decoded [-1, 1] images -> output type, blended over the original image when asked."""
        if not torch.isfinite(decoded).all():
            # diffusers would cast the NaNs to black pixels with a RuntimeWarning; a black image is no result.
            raise NonFiniteOutputError(
                f"The model's output holds NaN or infinite values (computed in {str(self.unet.dtype).removeprefix('torch.')} "
                f"on {self.unet.device.type}): run it in float32 (--dtype fp32; torch_dtype=torch.float32 in Python)."
            )
        images = VaeImageProcessor.denormalize(decoded)
        if blend:
            original = VaeImageProcessor.denormalize(pixels.to(images.dtype))
            images = blend_tensors(original, images, hole, blend_kernel).clamp(0, 1)
        if nsfw_flags is not None:  # black out flagged images as diffusers does
            for i, flagged in enumerate(nsfw_flags):
                if flagged:
                    images[i] = 0
        return self.image_processor.postprocess(images, output_type=output_type,
                                                do_denormalize=[False] * images.shape[0])


def _is_compiled(module) -> bool:
    return isinstance(module, torch._dynamo.eval_frame.OptimizedModule)


class BranchReuse:
    """`brushnet_every=k`: the branch runs on every k-th step and its residuals are reused on the
    steps between, an approximation that saves the branch's share of those steps (measured drift
    and quality in BENCHMARKS.md). Residuals are reused only at the scale they were made with."""

    def __init__(self, every: int):
        self.every, self.step = every, 0
        self._kept, self._scale = None, None

    @classmethod
    def for_call(cls, every: int):
        """None for every=1 (the exact path); else a fresh reuse state for one call."""
        check_number(every, "brushnet_every", low=1, high=100, integer=True)
        return None if every == 1 else cls(int(every))

    def at_step(self, index: int) -> "BranchReuse":
        self.step = index
        return self

    def residuals(self, scale: float):
        if self._kept is None or self.step % self.every == 0 or scale != self._scale:
            return None
        return self._kept

    def keep(self, residuals, scale: float, compiled: bool) -> None:
        # A compiled branch on CUDA graphs overwrites its outputs at the next replay: keep copies.
        down, mid, up = residuals
        copy = (lambda r: r.clone()) if compiled else (lambda r: r)  # noqa: E731
        self._kept, self._scale = ([copy(r) for r in down], copy(mid), [copy(r) for r in up]), scale


def _hub_kwargs(kwargs: dict) -> dict:
    keys = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision", "variant")
    return {k: kwargs[k] for k in keys if k in kwargs}


def check_diffusion_scheduler(scheduler) -> None:
    """A flow-matching scheduler (SD3's, Flux's) has no noise to start from for a diffusion UNet
    (an AttributeError on init_noise_sigma deep in diffusers): refused by name."""
    if not hasattr(scheduler, "init_noise_sigma") or not hasattr(scheduler, "add_noise"):
        raise ValueError(f"{type(scheduler).__name__} is not a diffusion scheduler (it is for flow-matching models "
                         "such as SD3 and Flux): SD1.5 and SDXL need one such as UniPCMultistepScheduler or "
                         "DPMSolverMultistepScheduler.from_config(pipe.scheduler.config).")


def check_custom_sigmas(sigmas, scheduler) -> None:
    """A `sigmas=` list: finite noise levels >= 0, from noisy to clean, for a scheduler that takes them."""
    if "sigmas" not in inspect.signature(scheduler.set_timesteps).parameters:
        raise ValueError(f"{type(scheduler).__name__} takes no custom `sigmas`: use a scheduler that does "
                         "(EulerDiscreteScheduler, DPMSolverMultistepScheduler, ...), or `timesteps`.")
    try:
        values = [float(s) for s in sigmas]
    except (TypeError, ValueError):
        raise ValueError(f"`sigmas` must be a list of numbers; got {sigmas!r:.60}.") from None
    if not values or not all(math.isfinite(v) and v >= 0 for v in values):
        raise ValueError(f"`sigmas` must be finite numbers >= 0, at least one; got {values}.")
    if any(later >= earlier for earlier, later in zip(values, values[1:])):
        raise ValueError(f"`sigmas` must go down, each once (noisy to clean, e.g. [14.6, 4.0, 1.0]); got {values}.")
