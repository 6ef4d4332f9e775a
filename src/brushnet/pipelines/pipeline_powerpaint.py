"""PowerPaint v2 (Zhuang et al., ECCV 2024): one SD1.5 BrushNet-style branch for several inpainting tasks.

The branch keeps cross-attention and reads learned task prompts through its own text encoder
(`text_encoder_brushnet`); the frozen UNet reads the user's prompt through the base text encoder.
Both share one tokenizer, which carries the 30 task tokens (`brushnet.models.task_prompts`).
"""

from typing import Any, Callable

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.schedulers import KarrasDiffusionSchedulers
from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

from ..arguments import check_number
from ..models import BrushNetModel
from ..models.task_prompts import ALL_TASK_TOKENS, add_task_tokens, expand_task_words
from .base import _unwrap
from .pipeline_sd import (
    StableDiffusionBrushNetPipeline,
    _check_callback_inputs,
    _check_ip_adapter,
    _check_text_or_embeds,
    _resolve_mask,
)


# Task -> (promptA, promptB, negative_promptA, negative_promptB, UNet prompt template), as the authors'
# app.py (ppt-v2) builds them; "context-aware" is their v2 demo script's. The branch mixes
# A * fitting_degree + B * (1 - fitting_degree), which matters only where A and B differ.
TASKS = {
    "text-guided": (" P_obj", " P_obj", "P_obj", "P_obj", "{}"),
    "object-removal": (" P_ctxt", " P_ctxt", " P_obj", " P_obj", "{} empty scene blur"),
    "outpainting": (" P_ctxt", " P_ctxt", " P_obj", " P_obj", "{} empty scene"),
    "shape-guided": (" P_shape", " P_ctxt", "P_shape", "P_ctxt", "{}"),
    "context-aware": ("P_ctxt", "P_ctxt", "", "", "{} empty scene"),
}
TASK_ALIASES = {"image-outpainting": "outpainting"}  # the name in the authors' app


def resolve_task(task: str) -> str:
    if not isinstance(task, str):  # a list would fail as an unhashable dictionary key
        raise ValueError(f"The PowerPaint task is one name, one of {', '.join(TASKS)}; got {task!r:.60}.")
    name = TASK_ALIASES.get(task, task)
    if name not in TASKS:
        raise ValueError(f"Unknown PowerPaint task {task!r}: use one of {', '.join(TASKS)}.")
    return name


class StableDiffusionPowerPaintPipeline(StableDiffusionBrushNetPipeline):
    """Inpainting with a frozen SD1.5 UNet and a PowerPaint v2 branch.

    `task` picks the branch's task prompts: "text-guided" (insert what the prompt says),
    "object-removal" (fill from the surroundings; no prompt needed), "outpainting",
    "shape-guided" (the object follows the mask's shape as closely as `fitting_degree`, 0-1, says)
    and "context-aware". Masks: white = region to fill. Everything after the prompts (image and
    mask, strength, denoising, blending) is the BrushNet pipeline's own.
    """

    model_cpu_offload_seq = "text_encoder->text_encoder_brushnet->image_encoder->brushnet->unet->vae"

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        brushnet: BrushNetModel,
        text_encoder_brushnet: CLIPTextModel,
        scheduler: KarrasDiffusionSchedulers,
        safety_checker=None,
        feature_extractor: CLIPImageProcessor = None,
        image_encoder: CLIPVisionModelWithProjection = None,
        requires_safety_checker: bool = False,
    ):
        DiffusionPipeline.__init__(self)  # the components differ from the BrushNet pipeline's: registered here
        if safety_checker is not None and feature_extractor is None:
            raise ValueError("A safety checker needs a feature_extractor; pass one or safety_checker=None.")
        if tokenizer is not None:
            add_task_tokens(tokenizer)
        if text_encoder_brushnet is not None and tokenizer is not None:
            rows = text_encoder_brushnet.config.vocab_size
            if rows != len(tokenizer):
                raise ValueError(
                    f"text_encoder_brushnet has {rows} token embeddings but the tokenizer with PowerPaint's task "
                    f"tokens has {len(tokenizer)}: load the branch text encoder with brushnet.load_pipeline, which "
                    "adds the learned task vectors."
                )
        self.register_modules(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, brushnet=brushnet,
            text_encoder_brushnet=text_encoder_brushnet, scheduler=scheduler, safety_checker=safety_checker,
            feature_extractor=feature_extractor, image_encoder=image_encoder,
        )
        self._init_processors()
        self.register_to_config(requires_safety_checker=requires_safety_checker)

    # -- prompts ------------------------------------------------------------------------------

    def encode_task_prompts(self, prompts_a, prompts_b, fitting_degree, device):
        """The branch's prompt embeddings, one row per prompt: `A * fitting_degree + (1 - fitting_degree) * B`.

        Each distinct string is encoded alone (as the authors do, without an attention mask), with
        every task word expanded to its 10 tokens.
        """
        cache = {}

        def embed(text):
            if text not in cache:
                ids = self.tokenizer(expand_task_words(text), padding="max_length",
                                     max_length=self.tokenizer.model_max_length, truncation=True,
                                     return_tensors="pt").input_ids
                cache[text] = self.text_encoder_brushnet(ids.to(device))[0]
            return cache[text]

        rows = [embed(a) * fitting_degree + (1 - fitting_degree) * embed(b) for a, b in zip(prompts_a, prompts_b)]
        return torch.cat(rows)

    def _check_unet_prompts(self, *prompts) -> None:
        # The tokenizer is shared, so typed task tokens would index past the base encoder's table.
        limit = self.text_encoder.config.vocab_size
        for prompt in prompts:
            for text in prompt:
                ids = self.tokenizer(text).input_ids
                if any(i >= limit for i in ids):
                    raise ValueError(
                        f"The prompt {text!r} contains PowerPaint task tokens ({ALL_TASK_TOKENS[0]} ... "
                        f"{ALL_TASK_TOKENS[-1]}), which only the branch reads: choose the task with `task=` "
                        "and remove them from the prompt."
                    )

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image=None,
        mask=None,
        task: str = "text-guided",
        fitting_degree: float = 1.0,
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
        promptA: str | list[str] | None = None,  # noqa: N803 -- the authors' keyword names
        promptB: str | list[str] | None = None,  # noqa: N803
        promptU: str | list[str] | None = None,  # noqa: N803
        negative_promptA: str | list[str] | None = None,  # noqa: N803
        negative_promptB: str | list[str] | None = None,  # noqa: N803
        negative_promptU: str | list[str] | None = None,  # noqa: N803
        tradoff: float | None = None,
        tradoff_nag: float | None = None,
    ):
        """Inpaint `image` where `mask` is white, for `task`, guided by `prompt` (optional for
        object removal, outpainting and context-aware fill).

        The arguments are those of `StableDiffusionBrushNetPipeline` (but for `prompt_embeds` and
        `negative_prompt_embeds`: the task's template goes around the prompt's text) plus `task` and
        `fitting_degree`. The authors' own keywords work too and override what the task implies:
        `promptA`/`promptB`/`negative_promptA`/`negative_promptB` (the branch's task prompts, task
        words such as "P_obj" allowed), `promptU`/`negative_promptU` (the UNet's prompts, instead of
        `prompt`/`negative_prompt`), `tradoff`/`tradoff_nag` (the mix of A and B, default
        `fitting_degree`). `guidance_scale <= 1` runs without classifier-free guidance (the
        authors' pipeline fails there). Unknown keywords raise `TypeError`.
        """
        # 1. Check inputs; the task table gives the four branch prompts and the UNet prompt
        mask = _resolve_mask(mask, mask_image)
        task = resolve_task(task)
        if prompt is not None and promptU is not None:
            raise TypeError("Pass the UNet prompt once: `prompt` or the authors' `promptU`.")
        if negative_prompt is not None and negative_promptU is not None:
            raise TypeError("Pass the negative prompt once: `negative_prompt` or the authors' `negative_promptU`.")
        check_number(fitting_degree, "fitting_degree", low=0.0, high=1.0)
        _check_text_or_embeds(prompt, None, negative_prompt, None)
        _check_text_or_embeds(promptU, None, negative_promptU, None)
        default_a, default_b, default_neg_a, default_neg_b, template = TASKS[task]
        if promptU is None:
            user = [prompt or ""] if prompt is None or isinstance(prompt, str) else list(prompt)
            promptU = [template.format(text) for text in user]
        batch_size = 1 if isinstance(promptU, str) else len(promptU)
        as_list = lambda value: [value] * batch_size if isinstance(value, str) else list(value)  # noqa: E731
        promptU = as_list(promptU)
        negative_promptU = as_list(negative_promptU if negative_promptU is not None else negative_prompt or "")
        branch_prompts = [as_list(value if value is not None else default) for value, default in (
            (promptA, default_a), (promptB, default_b), (negative_promptA, default_neg_a),
            (negative_promptB, default_neg_b))]
        if any(len(p) != batch_size for p in (negative_promptU, *branch_prompts)):
            raise ValueError(f"Give one prompt of each kind, or {batch_size} (one per prompt).")
        tradoff = check_number(fitting_degree if tradoff is None else tradoff, "tradoff", low=0.0, high=1.0)
        tradoff_nag = check_number(fitting_degree if tradoff_nag is None else tradoff_nag, "tradoff_nag",
                                   low=0.0, high=1.0)

        num_inference_steps, num_images_per_prompt, scale, start, end, blend_kernel = self.check_call_inputs(
            image=image, mask=mask, height=height, width=width, batch_size=batch_size,
            num_inference_steps=num_inference_steps, timesteps=timesteps, sigmas=sigmas, guidance_scale=guidance_scale,
            num_images_per_prompt=num_images_per_prompt, eta=eta, guidance_rescale=guidance_rescale,
            output_type=output_type, strength=strength, generator=generator,
            brushnet_conditioning_scale=brushnet_conditioning_scale, control_guidance_start=control_guidance_start,
            control_guidance_end=control_guidance_end, blend_kernel=blend_kernel)
        self._check_unet_prompts(promptU, negative_promptU)
        _check_ip_adapter(self, ip_adapter_image, ip_adapter_image_embeds)
        callback_on_step_end_tensor_inputs = _check_callback_inputs(
            self, callback_on_step_end_tensor_inputs, callback_on_step_end)
        self._guidance_scale = guidance_scale
        self._guidance_rescale = guidance_rescale
        self._clip_skip = clip_skip
        self._cross_attention_kwargs = cross_attention_kwargs
        self._interrupt = False
        device = self._execution_device
        total = batch_size * num_images_per_prompt
        cfg = self.do_classifier_free_guidance

        # 2. Encode the prompts: the user's for the UNet, the task prompts for the branch
        lora_scale = cross_attention_kwargs.get("scale") if cross_attention_kwargs is not None else None
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            promptU, device, num_images_per_prompt, cfg, negative_promptU, lora_scale=lora_scale,
            clip_skip=self.clip_skip,
        )
        branch_dtype = _unwrap(self.brushnet).dtype
        repeat = lambda x: x.repeat_interleave(num_images_per_prompt, dim=0).to(branch_dtype)  # noqa: E731
        branch_embeds = repeat(self.encode_task_prompts(branch_prompts[0], branch_prompts[1], tradoff, device))
        if cfg:
            negative_branch_embeds = repeat(
                self.encode_task_prompts(branch_prompts[2], branch_prompts[3], tradoff_nag, device))
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])
            branch_embeds = torch.cat([negative_branch_embeds, branch_embeds])
        return self.inpaint_from_embeds(
            image, mask, height, width, total, device, prompt_embeds, negative_prompt_embeds,
            num_inference_steps=num_inference_steps, timesteps=timesteps, sigmas=sigmas, strength=strength,
            generator=generator,
            latents=latents, eta=eta, scale=scale, start=start, end=end, guess_mode=guess_mode,
            ip_adapter_image=ip_adapter_image, ip_adapter_image_embeds=ip_adapter_image_embeds,
            callback_on_step_end=callback_on_step_end, callback_tensor_inputs=callback_on_step_end_tensor_inputs,
            output_type=output_type, blend=blend, blend_kernel=blend_kernel, return_dict=return_dict,
            branch_kwargs={"brushnet_prompt_embeds": branch_embeds}, brushnet_every=brushnet_every,
        )
