"""Text-guided inpainting with Stable Diffusion XL and a BrushNet."""

from contextlib import contextmanager
from typing import Any, Callable

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.loaders import (
    FromSingleFileMixin,
    IPAdapterMixin,
    StableDiffusionXLLoraLoaderMixin,
    TextualInversionLoaderMixin,
)
from diffusers.pipelines.pipeline_utils import StableDiffusionMixin
from diffusers.pipelines.stable_diffusion_xl import StableDiffusionXLPipelineOutput
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import (
    StableDiffusionXLPipeline,
    retrieve_timesteps,
)
from diffusers.schedulers import KarrasDiffusionSchedulers
from transformers import (
    CLIPImageProcessor,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionModelWithProjection,
)

from ..arguments import check_number
from ..models import BrushNetModel
from .base import BranchReuse, BrushNetPipelineMixin, _unwrap, brushnet_scale_schedule
from .pipeline_sd import (
    _check_callback_inputs,
    _check_ip_adapter,
    _check_text_or_embeds,
    _resolve_mask,
    _step_end_outputs,
)


class StableDiffusionXLBrushNetPipeline(
    BrushNetPipelineMixin,
    DiffusionPipeline,
    StableDiffusionMixin,
    TextualInversionLoaderMixin,
    StableDiffusionXLLoraLoaderMixin,
    IPAdapterMixin,
    FromSingleFileMixin,
):
    """Inpainting with a frozen SDXL UNet and an SDXL BrushNet branch (Ju et al., ECCV 2024).

    Masks: white = region to fill. No invisible watermark is applied.
    """

    model_cpu_offload_seq = "text_encoder->text_encoder_2->image_encoder->brushnet->unet->vae"
    _optional_components = ["tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "feature_extractor",
                            "image_encoder"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds", "add_text_embeds",
                               "add_time_ids"]

    # Prompt, size-conditioning, IP-Adapter and scheduler helpers are stock diffusers', used as they are.
    encode_prompt = StableDiffusionXLPipeline.encode_prompt
    encode_image = StableDiffusionXLPipeline.encode_image
    prepare_ip_adapter_image_embeds = StableDiffusionXLPipeline.prepare_ip_adapter_image_embeds
    prepare_extra_step_kwargs = StableDiffusionXLPipeline.prepare_extra_step_kwargs
    get_guidance_scale_embedding = StableDiffusionXLPipeline.get_guidance_scale_embedding
    _get_add_time_ids = StableDiffusionXLPipeline._get_add_time_ids
    guidance_scale = StableDiffusionXLPipeline.guidance_scale
    guidance_rescale = StableDiffusionXLPipeline.guidance_rescale
    clip_skip = StableDiffusionXLPipeline.clip_skip
    do_classifier_free_guidance = StableDiffusionXLPipeline.do_classifier_free_guidance
    cross_attention_kwargs = StableDiffusionXLPipeline.cross_attention_kwargs
    num_timesteps = StableDiffusionXLPipeline.num_timesteps
    interrupt = StableDiffusionXLPipeline.interrupt

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        tokenizer_2: CLIPTokenizer,
        unet: UNet2DConditionModel,
        brushnet: BrushNetModel,
        scheduler: KarrasDiffusionSchedulers,
        feature_extractor: CLIPImageProcessor = None,
        image_encoder: CLIPVisionModelWithProjection = None,
        force_zeros_for_empty_prompt: bool = True,
    ):
        super().__init__()
        self.register_modules(
            vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
            tokenizer_2=tokenizer_2, unet=unet, brushnet=brushnet, scheduler=scheduler,
            feature_extractor=feature_extractor, image_encoder=image_encoder,
        )
        self._init_processors()
        self.register_to_config(force_zeros_for_empty_prompt=force_zeros_for_empty_prompt)

    @contextmanager
    def _vae_upcast(self):
        """SDXL's VAE overflows in fp16 (`force_upcast`): run it in fp32 for the duration."""
        dtype = self.vae.dtype
        upcast = dtype == torch.float16 and self.vae.config.force_upcast
        if upcast:
            self.vae.to(dtype=torch.float32)
        try:
            yield
        finally:
            if upcast:
                self.vae.to(dtype=dtype)

    def _vae_encode(self, pixels: torch.Tensor) -> torch.Tensor:
        with self._vae_upcast():
            return self.vae.encode(pixels.to(self.vae.dtype)).latent_dist.mode()

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        image=None,
        mask=None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        denoising_end: float | None = None,
        guidance_scale: float = 5.0,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image=None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        brushnet_conditioning_scale: float = 1.0,
        guess_mode: bool = False,
        control_guidance_start: float = 0.0,
        control_guidance_end: float = 1.0,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] = (0, 0),
        negative_target_size: tuple[int, int] | None = None,
        clip_skip: int | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        *,
        mask_image=None,
        blend: bool = False,
        blend_kernel: int = 21,
        strength: float = 1.0,
        brushnet_every: int = 1,
        guidance_rescale: float = 0.0,
    ):
        """Inpaint `image` where `mask` is white, guided by `prompt` (and `prompt_2`).

        Arguments are those of the reference `StableDiffusionXLBrushNetPipeline`, plus `timesteps`,
        `mask_image` (alias of `mask`), `blend`/`blend_kernel` (blurred blending over the
        original) and `strength` (in (0, 1]: start from the image's latent noised to that fraction
        of the schedule, as in StableDiffusionBrushNetPipeline), `brushnet_every` and
        `guidance_rescale` (as there). `original_size` defaults to the
        processed image size. Unknown keywords raise `TypeError`. Returns
        `StableDiffusionXLPipelineOutput(images)`.
        """
        # 1. Check inputs
        mask = _resolve_mask(mask, mask_image)
        if prompt is None and prompt_embeds is None:
            raise ValueError("Give `prompt` or `prompt_embeds`.")
        _check_text_or_embeds(prompt, prompt_embeds, negative_prompt, negative_prompt_embeds,
                              self.unet.config.cross_attention_dim)
        _check_ip_adapter(self, ip_adapter_image, ip_adapter_image_embeds)
        if negative_prompt_embeds is not None and negative_pooled_prompt_embeds is None:
            raise ValueError("`negative_prompt_embeds` needs `negative_pooled_prompt_embeds` (both come from "
                             "encode_prompt).")
        for name, size in (("original_size", original_size), ("target_size", target_size),
                           ("crops_coords_top_left", crops_coords_top_left),
                           ("negative_original_size", negative_original_size),
                           ("negative_target_size", negative_target_size),
                           ("negative_crops_coords_top_left", negative_crops_coords_top_left)):
            if size is not None and not (isinstance(size, (tuple, list)) and len(size) == 2):
                form = "(top, left), e.g. (0, 0)" if "crops" in name else "(height, width), e.g. (1024, 1024)"
                raise ValueError(f"`{name}` must be {form}; got {size!r}.")
        if prompt_embeds is not None and pooled_prompt_embeds is None:
            raise ValueError("`prompt_embeds` needs `pooled_prompt_embeds` (both come from encode_prompt).")
        _check_pooled_embeds(self.unet.config, (("pooled_prompt_embeds", pooled_prompt_embeds, prompt_embeds),
                                                ("negative_pooled_prompt_embeds", negative_pooled_prompt_embeds,
                                                 negative_prompt_embeds)))
        batch_size = 1 if isinstance(prompt, str) else len(prompt) if prompt is not None else prompt_embeds.shape[0]
        # One second prompt for every prompt: diffusers' encode_prompt would concatenate one row of
        # it with a row per prompt (a tensor-size error).
        prompt_2 = [prompt_2] * batch_size if isinstance(prompt_2, str) and batch_size > 1 else prompt_2
        if isinstance(negative_prompt_2, str) and batch_size > 1:
            negative_prompt_2 = [negative_prompt_2] * batch_size
        for name, texts in (("prompt_2", prompt_2), ("negative_prompt_2", negative_prompt_2)):
            if isinstance(texts, (list, tuple)) and len(texts) != batch_size:
                # diffusers' encode_prompt fails later with a tensor-size error
                raise ValueError(f"`{name}` has {len(texts)} entries for {batch_size} prompts: give one string, "
                                 "or one per prompt.")
        if denoising_end is not None:
            check_number(denoising_end, "denoising_end", low=0.0, high=1.0, low_inclusive=False)
        num_inference_steps, num_images_per_prompt, scale, start, end, blend_kernel = self.check_call_inputs(
            image=image, mask=mask, height=height, width=width, batch_size=batch_size,
            num_inference_steps=num_inference_steps, timesteps=timesteps, sigmas=sigmas, guidance_scale=guidance_scale,
            num_images_per_prompt=num_images_per_prompt, eta=eta, guidance_rescale=guidance_rescale,
            output_type=output_type, strength=strength, generator=generator,
            brushnet_conditioning_scale=brushnet_conditioning_scale, control_guidance_start=control_guidance_start,
            control_guidance_end=control_guidance_end, blend_kernel=blend_kernel)
        callback_on_step_end_tensor_inputs = _check_callback_inputs(
            self, callback_on_step_end_tensor_inputs, callback_on_step_end)
        self._guidance_scale = guidance_scale
        self._guidance_rescale = guidance_rescale
        self._clip_skip = clip_skip
        self._cross_attention_kwargs = cross_attention_kwargs
        self._denoising_end = denoising_end
        self._interrupt = False
        device = self._execution_device
        total = batch_size * num_images_per_prompt

        # 2. Encode the prompt with both text encoders
        lora_scale = cross_attention_kwargs.get("scale") if cross_attention_kwargs is not None else None
        prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds = (
            self.encode_prompt(
                prompt, prompt_2, device, num_images_per_prompt, self.do_classifier_free_guidance,
                negative_prompt, negative_prompt_2, prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
                negative_pooled_prompt_embeds=negative_pooled_prompt_embeds, lora_scale=lora_scale,
                clip_skip=self.clip_skip,
            )
        )

        # 3. Prepare image, mask and the branch's conditioning latents
        pixels, hole, conditioning = self.prepare_brushnet_inputs(image, mask, height, width, total, device)
        height, width = pixels.shape[-2:]

        # 4. Timesteps and initial latents
        timesteps, num_inference_steps = retrieve_timesteps(self.scheduler, num_inference_steps, device, timesteps,
                                                            sigmas)
        self.check_schedule(timesteps)
        timesteps, num_inference_steps = self.get_timesteps(num_inference_steps, strength, device)
        self._num_timesteps = len(timesteps)
        latents = self.prepare_latents(
            total, self.unet.config.in_channels, height, width, _unwrap(self.unet).dtype, device, generator, latents,
            image=pixels if strength < 1.0 else None, timestep=timesteps[:1],
        )
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)
        scales = brushnet_scale_schedule(scale, start, end, len(timesteps))

        # 5. Size and crop conditioning (SDXL's "time ids")
        original_size = original_size or (height, width)
        target_size = target_size or (height, width)
        projection_dim = (int(pooled_prompt_embeds.shape[-1]) if self.text_encoder_2 is None
                          else self.text_encoder_2.config.projection_dim)
        add_time_ids = self._get_add_time_ids(
            tuple(original_size), tuple(crops_coords_top_left), tuple(target_size), dtype=_unwrap(self.unet).dtype,
            text_encoder_projection_dim=projection_dim,
        )
        if negative_original_size is not None and negative_target_size is not None:
            negative_add_time_ids = self._get_add_time_ids(
                tuple(negative_original_size), tuple(negative_crops_coords_top_left), tuple(negative_target_size),
                dtype=_unwrap(self.unet).dtype, text_encoder_projection_dim=projection_dim,
            )
        else:
            negative_add_time_ids = add_time_ids
        add_text_embeds = pooled_prompt_embeds
        if self.do_classifier_free_guidance:
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])
            add_text_embeds = torch.cat([negative_pooled_prompt_embeds, add_text_embeds])
            add_time_ids = torch.cat([negative_add_time_ids, add_time_ids])
        # The UNet's precision, whatever the text encoders' (see the SD1.5 pipeline).
        unet_dtype = _unwrap(self.unet).dtype
        prompt_embeds = prompt_embeds.to(device=device, dtype=unet_dtype)
        add_text_embeds = add_text_embeds.to(device=device, dtype=unet_dtype)
        # As the reference and stock SDXL: [neg, pos] rows tiled per image.
        add_time_ids = add_time_ids.to(device).repeat(total, 1)

        unet_kwargs = {"cross_attention_kwargs": self.cross_attention_kwargs}
        if self.unet.config.time_cond_proj_dim is not None:
            guidance = torch.tensor(self.guidance_scale - 1).repeat(total)
            unet_kwargs["timestep_cond"] = self.get_guidance_scale_embedding(
                guidance, embedding_dim=self.unet.config.time_cond_proj_dim
            ).to(device=device, dtype=latents.dtype)
        image_embeds = None
        if ip_adapter_image is not None or ip_adapter_image_embeds is not None:
            image_embeds = self.prepare_ip_adapter_image_embeds(
                ip_adapter_image, ip_adapter_image_embeds, device, total, self.do_classifier_free_guidance
            )

        if denoising_end is not None and 0 < denoising_end < 1:
            cutoff = int(round(self.scheduler.config.num_train_timesteps * (1 - denoising_end)))
            num_inference_steps = len([t for t in timesteps if t >= cutoff])
            timesteps = timesteps[:num_inference_steps]

        # 6. Denoise
        reuse = BranchReuse.for_call(brushnet_every)
        num_warmup_steps = max(len(timesteps) - num_inference_steps * self.scheduler.order, 0)
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                latent_model_input = torch.cat([latents] * 2) if self.do_classifier_free_guidance else latents
                latent_model_input = self.scheduler.scale_model_input(latent_model_input, t)
                added_cond_kwargs = {"text_embeds": add_text_embeds, "time_ids": add_time_ids}
                step_unet_kwargs = {**unet_kwargs, "added_cond_kwargs": (
                    added_cond_kwargs if image_embeds is None else {**added_cond_kwargs, "image_embeds": image_embeds}
                )}
                noise_pred = self.predict_noise(
                    latent_model_input, t, prompt_embeds, conditioning, scales[i], guess_mode=guess_mode,
                    unet_kwargs=step_unet_kwargs, brushnet_added_cond_kwargs=added_cond_kwargs,
                    **({"reuse": reuse.at_step(i)} if reuse is not None else {}),
                )
                noise_pred = self.guided(noise_pred)
                latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]

                if callback_on_step_end is not None:
                    available = {"latents": latents, "prompt_embeds": prompt_embeds,
                                 "negative_prompt_embeds": negative_prompt_embeds,
                                 "add_text_embeds": add_text_embeds, "add_time_ids": add_time_ids}
                    outputs = _step_end_outputs(callback_on_step_end(
                        self, i, t, {k: available[k] for k in callback_on_step_end_tensor_inputs}), latents)
                    latents = outputs.pop("latents", latents)
                    prompt_embeds = outputs.pop("prompt_embeds", prompt_embeds)
                    add_text_embeds = outputs.pop("add_text_embeds", add_text_embeds)
                    add_time_ids = outputs.pop("add_time_ids", add_time_ids)
                if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % self.scheduler.order == 0):
                    progress_bar.update()

        # 7. Decode, blend, post-process
        if output_type == "latent":
            images = latents
        else:
            with self._vae_upcast():
                latents = latents.to(self.vae.dtype)
                config = self.vae.config
                if getattr(config, "latents_mean", None) is not None and getattr(config, "latents_std", None) is not None:
                    mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1).to(latents.device, latents.dtype)
                    std = torch.tensor(config.latents_std).view(1, -1, 1, 1).to(latents.device, latents.dtype)
                    latents = latents * std / config.scaling_factor + mean
                else:
                    latents = latents / config.scaling_factor
                decoded = self.vae.decode(latents, return_dict=False)[0]
            images = self.finish_images(decoded, pixels, hole, output_type, blend, blend_kernel)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return StableDiffusionXLPipelineOutput(images=images)


def _check_pooled_embeds(unet_config, cases) -> None:
    """Each given pooled embedding is (batch, width), one row per row of its prompt embeddings, the
    width the UNet's added-condition projection takes after its six size and crop ids: otherwise
    a shape error deep in the UNet's add_embedding."""
    total = getattr(unet_config, "projection_class_embeddings_input_dim", None)
    per_id = getattr(unet_config, "addition_time_embed_dim", None)
    width = total - 6 * per_id if total and per_id else None
    for name, pooled, embeds in cases:
        if pooled is None:
            continue
        rows = embeds.shape[0] if torch.is_tensor(embeds) else None
        shape = tuple(pooled.shape) if torch.is_tensor(pooled) else type(pooled).__name__
        if not torch.is_tensor(pooled) or pooled.ndim != 2 or (width and pooled.shape[1] != width) \
                or (rows is not None and pooled.shape[0] != rows):
            wanted = f"({rows if rows is not None else 'batch'}, {width or 'width'})"
            raise ValueError(f"`{name}` must be a {wanted} tensor from encode_prompt (one row per row of the "
                             f"prompt embeddings); got {shape}.")
