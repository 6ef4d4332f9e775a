"""What the SD1.5 and SDXL BrushNet pipelines share: inputs, the BrushNet step, decoding, loading."""

import inspect
import json
import logging
import os

import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor

from ..masks import batch_size_of, check_same_size, preprocess_mask
from ..models import BrushNetModel, count_residuals, unet_forward
from .blending import blend_tensors

logger = logging.getLogger(__name__)


def _unwrap(module):
    return getattr(module, "_orig_mod", module)  # torch.compile wrapper


def check_brushnet_matches_unet(brushnet, unet) -> None:
    """Raise before any denoising if the BrushNet was made for another base model family."""
    brushnet, unet = _unwrap(brushnet), _unwrap(unet)
    family = lambda cfg: "SDXL" if cfg.get("addition_embed_type") == "text_time" else "SD1.5"  # noqa: E731
    n_residuals = (len(brushnet.brushnet_down_blocks), len(brushnet.brushnet_up_blocks))
    if (family(brushnet.config) != family(unet.config)
            or list(brushnet.config.block_out_channels) != list(unet.config.block_out_channels)
            or n_residuals != count_residuals(unet)):
        raise ValueError(
            f"This BrushNet is for {family(brushnet.config)} (block channels {list(brushnet.config.block_out_channels)}) "
            f"but the base UNet is {family(unet.config)} (block channels {list(unet.config.block_out_channels)}): "
            "use a BrushNet trained for the base model's family."
        )


def brushnet_scale_schedule(scale: float, start: float, end: float, num_steps: int) -> list[float]:
    """The BrushNet conditioning scale at each step: `scale` while i/N >= start and (i+1)/N <= end, else 0."""
    return [scale * (1.0 - float(i / num_steps < start or (i + 1) / num_steps > end)) for i in range(num_steps)]


def _single(value, name: str) -> float:
    # The reference accepts one-element lists (a MultiBrushNet leftover).
    if isinstance(value, (list, tuple)):
        if len(value) != 1:
            raise ValueError(f"`{name}` must be a number; got a list of {len(value)}.")
        value = value[0]
    return float(value)


class BrushNetPipelineMixin:
    """Shared steps of the BrushNet pipelines. Expects `vae`, `unet`, `brushnet`, `scheduler`."""

    _optional_components = ["safety_checker", "feature_extractor", "image_encoder"]

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
            if not os.path.isdir(folder):
                folder = cls.download(folder, **_hub_kwargs(kwargs))
            if not os.path.isfile(os.path.join(folder, "brushnet", "config.json")):
                raise ValueError(
                    f"{pretrained_model_name_or_path} has no brushnet/ folder: it is a base model. Pass "
                    "brushnet=BrushNetModel.from_pretrained(...) to load a BrushNet with it."
                )
            dtype_kwargs = {k: kwargs[k] for k in ("dtype", "torch_dtype") if kwargs.get(k) is not None}
            kwargs["brushnet"] = BrushNetModel.from_pretrained(folder, subfolder="brushnet", **dtype_kwargs)
            pretrained_model_name_or_path = folder
        pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        check_brushnet_matches_unet(pipe.brushnet, pipe.unet)
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
        for name, value in (("height", height), ("width", width)):
            if value is not None and value % self.vae_scale_factor != 0:
                raise ValueError(
                    f"`{name}` must be divisible by {self.vae_scale_factor} (the VAE's scale factor); got {value}."
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
        scale = _single(brushnet_conditioning_scale, "brushnet_conditioning_scale")
        start = _single(control_guidance_start, "control_guidance_start")
        end = _single(control_guidance_end, "control_guidance_end")
        if not 0.0 <= start < end <= 1.0:
            raise ValueError(
                f"Need 0 <= control_guidance_start < control_guidance_end <= 1; got start={start}, end={end}."
            )
        if blend_kernel < 1 or blend_kernel % 2 == 0:
            raise ValueError(f"`blend_kernel` must be a positive odd number; got {blend_kernel}.")
        check_brushnet_matches_unet(self.brushnet, self.unet)
        return scale, start, end

    def prepare_brushnet_inputs(self, image, mask, height, width, batch_size, device):
        """Preprocess image and mask once per call.

        Returns (image in [-1, 1] with the hole blacked out, hole mask with 1 = fill, conditioning
        latents for the branch: masked-image latent + keep mask), each with `batch_size` rows.
        """
        height, width = self.image_processor.get_default_height_width(
            image[0] if isinstance(image, (list, tuple)) else image, height, width
        )
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
        keep_latent = torch.nn.functional.interpolate(keep, size=latents.shape[-2:])  # nearest
        conditioning = torch.cat([latents.to(keep_latent.dtype), keep_latent.to(device)], dim=1)
        repeat = lambda x: x.repeat_interleave(batch_size // x.shape[0], dim=0)  # noqa: E731
        dtype = _unwrap(self.brushnet).dtype
        return repeat(pixels).to(device), repeat(hole).to(device), repeat(conditioning).to(device=device, dtype=dtype)

    def _vae_encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(pixels.to(self.vae.dtype)).latent_dist.mode()

    def prepare_latents(self, batch_size, num_channels_latents, height, width, dtype, device, generator, latents=None):
        shape = (batch_size, num_channels_latents, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif latents.shape != shape:
            raise ValueError(f"`latents` must have shape {shape}; got {tuple(latents.shape)}.")
        else:
            latents = latents.to(device)
        return latents * self.scheduler.init_noise_sigma

    # -- one denoising step -------------------------------------------------------------------

    def predict_noise(self, latent_model_input, t, prompt_embeds, conditioning, scale, *, guess_mode,
                      unet_kwargs, brushnet_added_cond_kwargs=None):
        """The UNet's noise prediction (before CFG) with BrushNet's residuals for this step.

        Under CFG the branch runs once for both halves when its input is the same for both (an SD1.5
        BrushNet sees no text); an SDXL BrushNet reads the pooled text through its add-embedding,
        so there it runs on the full batch. Guess mode runs it on the conditional half only and
        gives the unconditional half no residual. At scale 0 the branch is skipped entirely.
        """
        if scale == 0.0:
            return self.unet(latent_model_input, t, encoder_hidden_states=prompt_embeds, return_dict=False,
                             **unet_kwargs)[0]
        cfg = self.do_classifier_free_guidance
        text_free = _unwrap(self.brushnet).config.addition_embed_type is None
        half_batch = cfg and (guess_mode or text_free)
        if half_batch:
            branch_input = latent_model_input.chunk(2)[1]
            branch_embeds = prompt_embeds.chunk(2)[1]
            branch_added = (None if brushnet_added_cond_kwargs is None
                            else {k: v.chunk(2)[1] for k, v in brushnet_added_cond_kwargs.items()})
            branch_cond = conditioning
        else:
            branch_input, branch_embeds, branch_added = latent_model_input, prompt_embeds, brushnet_added_cond_kwargs
            branch_cond = torch.cat([conditioning] * 2) if cfg else conditioning
        down, mid, up = self.brushnet(
            branch_input, t, encoder_hidden_states=branch_embeds, brushnet_cond=branch_cond,
            conditioning_scale=scale, guess_mode=guess_mode, added_cond_kwargs=branch_added, return_dict=False,
        )
        if half_batch:
            other_half = torch.zeros_like if guess_mode else (lambda r: r)
            down = [torch.cat([other_half(r), r]) for r in down]
            mid = torch.cat([other_half(mid), mid])
            up = [torch.cat([other_half(r), r]) for r in up]
        return unet_forward(self.unet, latent_model_input, t, prompt_embeds, down_block_add_samples=down,
                            mid_block_add_sample=mid, up_block_add_samples=up, **unet_kwargs)

    # -- output -------------------------------------------------------------------------------

    def finish_images(self, decoded, pixels, hole, output_type, blend, blend_kernel, nsfw_flags=None):
        """Decoded [-1, 1] images -> output type, blended over the original image when asked."""
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


def _hub_kwargs(kwargs: dict) -> dict:
    keys = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision", "variant")
    return {k: kwargs[k] for k in keys if k in kwargs}
