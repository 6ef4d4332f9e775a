"""Text-guided inpainting with Stable Diffusion 1.5 and a BrushNet."""

from typing import Any, Callable

import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.loaders import (
    FromSingleFileMixin,
    IPAdapterMixin,
    StableDiffusionLoraLoaderMixin,
    TextualInversionLoaderMixin,
)
from diffusers.pipelines.pipeline_utils import StableDiffusionMixin
from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline, retrieve_timesteps
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import USE_PEFT_BACKEND, scale_lora_layers, unscale_lora_layers
from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

from ..masks import mask_batch_layout
from ..models import BrushNetModel
from .base import BranchReuse, BrushNetPipelineMixin, _unwrap, brushnet_scale_schedule


class StableDiffusionBrushNetPipeline(
    BrushNetPipelineMixin,
    DiffusionPipeline,
    StableDiffusionMixin,
    TextualInversionLoaderMixin,
    StableDiffusionLoraLoaderMixin,
    IPAdapterMixin,
    FromSingleFileMixin,
):
    """Inpainting with a frozen SD1.5 UNet and a BrushNet branch (Ju et al., ECCV 2024).

    Masks: white = region to fill. The image may be the original or already have the hole blacked
    out; the result is the same.
    """

    model_cpu_offload_seq = "text_encoder->image_encoder->brushnet->unet->vae"
    _exclude_from_cpu_offload = ["safety_checker"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    # Prompt, IP-Adapter and scheduler helpers are stock diffusers', used as they are (encode_prompt
    # through a shim for clip_skip, below).
    encode_image = StableDiffusionPipeline.encode_image
    prepare_ip_adapter_image_embeds = StableDiffusionPipeline.prepare_ip_adapter_image_embeds
    run_safety_checker = StableDiffusionPipeline.run_safety_checker
    prepare_extra_step_kwargs = StableDiffusionPipeline.prepare_extra_step_kwargs
    get_guidance_scale_embedding = StableDiffusionPipeline.get_guidance_scale_embedding
    guidance_scale = StableDiffusionPipeline.guidance_scale
    guidance_rescale = StableDiffusionPipeline.guidance_rescale
    clip_skip = StableDiffusionPipeline.clip_skip
    do_classifier_free_guidance = StableDiffusionPipeline.do_classifier_free_guidance
    cross_attention_kwargs = StableDiffusionPipeline.cross_attention_kwargs
    num_timesteps = StableDiffusionPipeline.num_timesteps
    interrupt = StableDiffusionPipeline.interrupt

    def encode_prompt(self, prompt, device, num_images_per_prompt, do_classifier_free_guidance,
                      negative_prompt=None, prompt_embeds=None, negative_prompt_embeds=None,
                      lora_scale: float | None = None, clip_skip: int | None = None):
        """diffusers' `StableDiffusionPipeline.encode_prompt`. With `clip_skip` it reaches for
        `text_encoder.text_model.final_layer_norm`, which transformers 5's `CLIPTextModel` no
        longer has (its layers sit on the model itself): an AttributeError. There the prompt's
        skipped-layer embeddings are made here, as diffusers makes them, and handed to it."""
        if clip_skip is not None and self.text_encoder is not None:
            layers = self.text_encoder.config.num_hidden_layers
            if isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or not 0 <= clip_skip < layers:
                raise ValueError(f"clip_skip {clip_skip!r}: the text encoder has {layers} layers, so clip_skip "
                                 f"is a whole number from 0 to {layers - 1} (1: the layer before the last).")
        if clip_skip is not None and prompt_embeds is None and self.text_encoder is not None \
                and not hasattr(self.text_encoder, "text_model"):
            prompt_embeds = self._skipped_layer_embeds(prompt, device, lora_scale, clip_skip)
            clip_skip = None
        return StableDiffusionPipeline.encode_prompt(
            self, prompt, device, num_images_per_prompt, do_classifier_free_guidance, negative_prompt,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds, lora_scale=lora_scale,
            clip_skip=clip_skip)

    def _skipped_layer_embeds(self, prompt, device, lora_scale, clip_skip: int) -> torch.Tensor:
        """The text encoder's hidden states `clip_skip` layers before its last, through its final
        layer norm (diffusers' rule; the negative prompt keeps the last layer, as in diffusers)."""
        if isinstance(self, TextualInversionLoaderMixin):
            prompt = self.maybe_convert_prompt(prompt, self.tokenizer)
        tokens = self.tokenizer(prompt, padding="max_length", max_length=self.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt")
        use_mask = getattr(self.text_encoder.config, "use_attention_mask", False)
        attention_mask = tokens.attention_mask.to(device) if use_mask else None
        lora = lora_scale is not None and USE_PEFT_BACKEND and isinstance(self, StableDiffusionLoraLoaderMixin)
        if lora:
            scale_lora_layers(self.text_encoder, lora_scale)
        try:
            hidden = self.text_encoder(tokens.input_ids.to(device), attention_mask=attention_mask,
                                       output_hidden_states=True).hidden_states[-(clip_skip + 1)]
            return self.text_encoder.final_layer_norm(hidden)
        finally:
            if lora:
                unscale_lora_layers(self.text_encoder, lora_scale)

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        brushnet: BrushNetModel,
        scheduler: KarrasDiffusionSchedulers,
        safety_checker=None,
        feature_extractor: CLIPImageProcessor = None,
        image_encoder: CLIPVisionModelWithProjection = None,
        requires_safety_checker: bool = False,
    ):
        super().__init__()
        if safety_checker is not None and feature_extractor is None:
            raise ValueError("A safety checker needs a feature_extractor; pass one or safety_checker=None.")
        self.register_modules(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, brushnet=brushnet,
            scheduler=scheduler, safety_checker=safety_checker, feature_extractor=feature_extractor,
            image_encoder=image_encoder,
        )
        self._init_processors()
        self.register_to_config(requires_safety_checker=requires_safety_checker)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image=None,
        mask=None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image=None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        brushnet_conditioning_scale: float = 1.0,
        guess_mode: bool = False,
        control_guidance_start: float = 0.0,
        control_guidance_end: float = 1.0,
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
        """Inpaint `image` where `mask` is white, guided by `prompt`.

        Arguments are those of the reference `StableDiffusionBrushNetPipeline` (and of diffusers'
        ControlNet pipelines), plus `mask_image` (alias of `mask`), `blend` (paste the result over
        the original through a blurred mask, kernel `blend_kernel`) and `strength` (in (0, 1]: start
        from the image's own latent noised to that fraction of the schedule and run only that
        fraction of the steps, as diffusers' inpainting pipeline does; 1.0, the default, starts
        from pure noise) and `brushnet_every` (run the branch on every k-th step only and reuse its
        residuals between: an approximation, off at the default 1) and `guidance_rescale` (diffusers'
        keyword, 0 to 1: the guided prediction pulled back toward the positive prompt's spread; 0,
        the default, is plain guidance). Unknown keywords raise `TypeError`. Returns
        `StableDiffusionPipelineOutput(images, nsfw_content_detected)`.
        """
        # 1. Check inputs
        mask = _resolve_mask(mask, mask_image)
        if prompt is None and prompt_embeds is None:
            raise ValueError("Give `prompt` or `prompt_embeds`.")
        _check_text_or_embeds(prompt, prompt_embeds, negative_prompt, negative_prompt_embeds,
                              self.unet.config.cross_attention_dim)
        _check_ip_adapter(self, ip_adapter_image, ip_adapter_image_embeds)
        batch_size = 1 if isinstance(prompt, str) else len(prompt) if prompt is not None else prompt_embeds.shape[0]
        if isinstance(negative_prompt, str) and batch_size > 1:
            # One negative prompt for every prompt, as the SDXL pipeline takes it: diffusers refuses
            # a string beside a list of prompts ("should be the same type") and, beside a batch of
            # prompt_embeds, reshapes its single row into rows of the wrong length.
            negative_prompt = [negative_prompt] * batch_size
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
        self._interrupt = False
        device = self._execution_device
        total = batch_size * num_images_per_prompt

        # 2. Encode the prompt
        lora_scale = cross_attention_kwargs.get("scale") if cross_attention_kwargs is not None else None
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt, device, num_images_per_prompt, self.do_classifier_free_guidance, negative_prompt,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
            lora_scale=lora_scale, clip_skip=self.clip_skip,
        )
        if self.do_classifier_free_guidance:
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])
        return self.inpaint_from_embeds(
            image, mask, height, width, total, device, prompt_embeds, negative_prompt_embeds,
            num_inference_steps=num_inference_steps, timesteps=timesteps, sigmas=sigmas, strength=strength,
            generator=generator,
            latents=latents, eta=eta, scale=scale, start=start, end=end, guess_mode=guess_mode,
            ip_adapter_image=ip_adapter_image, ip_adapter_image_embeds=ip_adapter_image_embeds,
            callback_on_step_end=callback_on_step_end, callback_tensor_inputs=callback_on_step_end_tensor_inputs,
            output_type=output_type, blend=blend, blend_kernel=blend_kernel, return_dict=return_dict,
            brushnet_every=brushnet_every,
        )

    def inpaint_from_embeds(self, image, mask, height, width, total, device, prompt_embeds, negative_prompt_embeds,
                            *, num_inference_steps, timesteps, strength, generator, latents, eta, scale, start, end,
                            guess_mode, ip_adapter_image, ip_adapter_image_embeds, callback_on_step_end,
                            callback_tensor_inputs, output_type, blend, blend_kernel, return_dict, branch_kwargs=None,
                            brushnet_every=1, sigmas=None):
        """Steps 3-6 of a call, once the prompts are encoded (`prompt_embeds` CFG-doubled as
        `[negative; positive]`): image and mask, timesteps, denoising, decoding. `branch_kwargs` go
        to every branch call (the PowerPaint pipeline passes its task prompts)."""
        reuse = BranchReuse.for_call(brushnet_every)
        branch_kwargs = {**(branch_kwargs or {}), **({"reuse": reuse} if reuse is not None else {})}
        # The UNet's precision, whatever the text encoder's (a text encoder in bf16 beside an fp32
        # UNet gave "mat1 and mat2 must have the same dtype").
        prompt_embeds = prompt_embeds.to(_unwrap(self.unet).dtype)
        unet_kwargs = {"cross_attention_kwargs": self.cross_attention_kwargs}
        if ip_adapter_image is not None or ip_adapter_image_embeds is not None:
            image_embeds = self.prepare_ip_adapter_image_embeds(
                ip_adapter_image, ip_adapter_image_embeds, device, total, self.do_classifier_free_guidance
            )
            unet_kwargs["added_cond_kwargs"] = {"image_embeds": image_embeds}

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
            total, self.unet.config.in_channels, height, width, prompt_embeds.dtype, device, generator, latents,
            image=pixels if strength < 1.0 else None, timestep=timesteps[:1],
        )
        if self.unet.config.time_cond_proj_dim is not None:
            guidance = torch.tensor(self.guidance_scale - 1).repeat(total)
            unet_kwargs["timestep_cond"] = self.get_guidance_scale_embedding(
                guidance, embedding_dim=self.unet.config.time_cond_proj_dim
            ).to(device=device, dtype=latents.dtype)
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)
        scales = brushnet_scale_schedule(scale, start, end, len(timesteps))

        # 5. Denoise
        num_warmup_steps = len(timesteps) - num_inference_steps * self.scheduler.order
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                latent_model_input = torch.cat([latents] * 2) if self.do_classifier_free_guidance else latents
                latent_model_input = self.scheduler.scale_model_input(latent_model_input, t)
                if reuse is not None:
                    reuse.at_step(i)
                noise_pred = self.predict_noise(
                    latent_model_input, t, prompt_embeds, conditioning, scales[i],
                    guess_mode=guess_mode, unet_kwargs=unet_kwargs, **branch_kwargs,
                )
                noise_pred = self.guided(noise_pred)
                latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]

                if callback_on_step_end is not None:
                    available = {"latents": latents, "prompt_embeds": prompt_embeds,
                                 "negative_prompt_embeds": negative_prompt_embeds}
                    outputs = _step_end_outputs(
                        callback_on_step_end(self, i, t, {k: available[k] for k in callback_tensor_inputs}), latents)
                    latents = outputs.pop("latents", latents)
                    prompt_embeds = outputs.pop("prompt_embeds", prompt_embeds)
                if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % self.scheduler.order == 0):
                    progress_bar.update()

        # 6. Decode, check safety, blend, post-process
        if output_type == "latent":
            images, nsfw = latents, None
        else:
            # In the VAE's precision: an fp16 UNet beside a VAE kept in fp32 (against fp16 overflow)
            # is a common set-up.
            decoded = self.vae.decode(
                (latents / self.vae.config.scaling_factor).to(self.vae.dtype), return_dict=False, generator=generator
            )[0]
            decoded, nsfw = self.run_safety_checker(decoded, device, prompt_embeds.dtype)
            images = self.finish_images(decoded, pixels, hole, output_type, blend, blend_kernel, nsfw)
        self.maybe_free_model_hooks()
        if not return_dict:
            return images, nsfw
        return StableDiffusionPipelineOutput(images=images, nsfw_content_detected=nsfw)


def _resolve_mask(mask, mask_image):
    if mask is not None and mask_image is not None:
        raise TypeError("Pass the mask once: `mask` and `mask_image` are the same argument.")
    return mask_batch_layout(mask if mask is not None else mask_image)


def _check_text_or_embeds(prompt, prompt_embeds, negative_prompt, negative_prompt_embeds, width=None) -> None:
    """One of text and embeddings for each prompt, as diffusers requires: given both, one would be
    ignored. Given embeddings are (batch, tokens, width), both of one shape (they are concatenated
    for guidance), `width` the UNet's cross-attention width: else a tensor error deep in the UNet."""
    if prompt is not None and prompt_embeds is not None:
        raise ValueError("Give `prompt` or `prompt_embeds`, not both: the text would be ignored.")
    for name, texts in (("prompt", prompt), ("negative_prompt", negative_prompt)):
        # Else an IndexError in the tokenizer (an empty list) or a TypeError on len() (a number).
        if texts is None or isinstance(texts, str):
            continue
        if not isinstance(texts, (list, tuple)) or not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"`{name}` must be a string or a non-empty list of strings; got {texts!r:.60}.")
    if negative_prompt is not None and negative_prompt_embeds is not None:
        raise ValueError("Give `negative_prompt` or `negative_prompt_embeds`, not both: the text would be ignored.")
    for name, embeds in (("prompt_embeds", prompt_embeds), ("negative_prompt_embeds", negative_prompt_embeds)):
        if embeds is None:
            continue
        if not isinstance(embeds, torch.Tensor) or embeds.ndim != 3 or (
                isinstance(width, int) and embeds.shape[-1] != width):
            shape = tuple(embeds.shape) if isinstance(embeds, torch.Tensor) else type(embeds).__name__
            raise ValueError(f"`{name}` must be a (batch, tokens, {width or 'width'}) tensor from encode_prompt; "
                             f"got {shape}.")
    if prompt_embeds is not None and negative_prompt_embeds is not None and \
            prompt_embeds.shape != negative_prompt_embeds.shape:
        raise ValueError(f"`prompt_embeds` {tuple(prompt_embeds.shape)} and `negative_prompt_embeds` "
                         f"{tuple(negative_prompt_embeds.shape)} must have one shape (encode_prompt gives both).")


def _check_ip_adapter(pipe, ip_adapter_image, ip_adapter_image_embeds) -> None:
    """IP-Adapter inputs need an adapter loaded (pipe.load_ip_adapter): else an AttributeError deep
    in diffusers, or embeddings silently ignored."""
    if (ip_adapter_image is not None or ip_adapter_image_embeds is not None) and \
            getattr(pipe.unet, "encoder_hid_proj", None) is None:
        raise ValueError("ip_adapter_image / ip_adapter_image_embeds need an IP-Adapter: load one first with "
                         "pipe.load_ip_adapter(...).")


def _step_end_outputs(outputs, latents: torch.Tensor) -> dict:
    """What a step-end callback returned: a dict of the tensors it changes (diffusers' contract),
    `latents` of the shape it was given. Else an AttributeError on None, or a convolution error
    one step later, neither naming the callback."""
    if not isinstance(outputs, dict):
        raise TypeError(f"callback_on_step_end must return a dict of the tensors it changes ({{}} for none); "
                        f"it returned {type(outputs).__name__}.")
    new = outputs.get("latents")
    if new is not None and (not isinstance(new, torch.Tensor) or new.shape != latents.shape):
        shape = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
        raise ValueError(f"callback_on_step_end returned latents of shape {shape}; they must keep the shape "
                         f"{tuple(latents.shape)}.")
    return outputs


def _check_callback_inputs(pipe, names, callback=None) -> list[str]:
    """The tensors to hand the step-end callback: a diffusers `PipelineCallback` (or several) names
    its own, as in diffusers' pipelines; each must be one this pipeline has."""
    if isinstance(callback, (PipelineCallback, MultiPipelineCallbacks)):
        names = callback.tensor_inputs
    unknown = [k for k in names if k not in pipe._callback_tensor_inputs]
    if unknown:
        raise ValueError(f"callback_on_step_end_tensor_inputs {unknown} are not in {pipe._callback_tensor_inputs}.")
    return list(names)
