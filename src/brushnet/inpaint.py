"""Inpaint real photos of any size with a loaded pipeline: what the CLI and the UI both call.

The pipeline works at the model's native area (512x512 for SD1.5, 1024x1024 for SDXL). A photo is
resized to that area and the result restored to the photo's size; with `crop_to_mask`, only a
window around the hole is processed. With blending (the default), the result is pasted over the
original through the blurred mask at full resolution, so every pixel away from the hole is the
original's, bit for bit.
"""

import contextlib
import logging
from dataclasses import asdict, dataclass, field

import PIL.Image
import torch

from .arguments import (
    check_blend_kernel,
    check_conditioning_scale,
    check_control_window,
    check_guidance,
    check_num_images,
    check_number,
    check_seed,
    check_steps,
    check_text,
)
from .pipelines.blending import blend
from .regions import crop_window, hole_box, working_size

logger = logging.getLogger(__name__)
# Images of one input share a pipeline call up to this many; more are split into several calls,
# since memory grows with the batch (250 images of the 64-px demo model took 1.8 GB in one call).
IMAGES_PER_CALL = 4


@dataclass
class InpaintSettings:
    prompt: str
    negative_prompt: str = ""
    steps: int = 50
    guidance: float = 7.5
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    seed: int = 0
    num_images: int = 1
    blend: bool = True
    blend_kernel: int | None = None  # None: default_blend_kernel(pipe)
    crop_to_mask: bool = False
    context: float = 0.3
    strength: float = 1.0  # < 1: start from the photo noised to this fraction of the schedule
    brushnet_every: int = 1  # > 1: the branch runs every k-th step, its residuals reused between
    extra: dict = field(default_factory=dict)  # further pipeline keywords

    def as_dict(self) -> dict:
        return asdict(self)


def native_resolution(pipe) -> int:
    """The side of the square area the base model was trained at (512 SD1.5, 1024 SDXL)."""
    return int(pipe.unet.config.sample_size) * pipe.vae_scale_factor


def default_blend_kernel(pipe) -> int:
    """The reference's 21-pixel blur at 512x512 and above; for smaller models (the demo model's
    64x64) the same width relative to the image, at least 3, so blending stays near the hole."""
    native = native_resolution(pipe)
    if native >= 512:
        return 21
    return max(3, round(21 * native / 512) | 1)


def image_seeds(settings: InpaintSettings) -> list[int]:
    """One seed per output image, so any single result can be reproduced alone."""
    return [settings.seed + k for k in range(settings.num_images)]


def check_settings(settings: InpaintSettings, names: dict[str, str] | None = None) -> None:
    """Every number of `settings` in range (ValueError naming it, by `names[field]` if given)."""
    name = lambda field: (names or {}).get(field, field)  # noqa: E731
    check_steps(settings.steps, name("steps"))
    check_guidance(settings.guidance, name("guidance"))
    check_conditioning_scale(settings.scale, name("scale"))
    check_control_window(settings.start, settings.end, (name("start"), name("end")))
    check_num_images(settings.num_images, name("num_images"))
    check_seed(settings.seed, name("seed"), settings.num_images)
    if settings.blend_kernel is not None:
        check_blend_kernel(settings.blend_kernel, name("blend_kernel"))
    check_number(settings.context, name("context"), low=0.0, high=10.0)
    check_number(settings.strength, name("strength"), low=0.0, high=1.0, low_inclusive=False)
    check_number(settings.brushnet_every, name("brushnet_every"), low=1, high=100, integer=True)
    check_text(settings.prompt, name("prompt"))
    check_text(settings.negative_prompt, name("negative_prompt"))


def inpaint(pipe, image: PIL.Image.Image, mask: PIL.Image.Image, settings: InpaintSettings,
            callback=None) -> list[PIL.Image.Image]:
    """Inpaint `image` where the binary `mask` is white; returns `settings.num_images` images of
    the image's size. `callback(step, total)` is called after every denoising step."""
    return list(iter_inpaint(pipe, image, mask, settings, callback))


def iter_inpaint(pipe, image: PIL.Image.Image, mask: PIL.Image.Image, settings: InpaintSettings,
                 callback=None):
    """`inpaint`, yielding each image as soon as its chunk of IMAGES_PER_CALL is done, so a caller
    can save them as they come; memory stays that of one chunk however many images are asked."""
    check_settings(settings)
    image = image.convert("RGB")
    mask = mask.convert("L")
    blend_kernel = settings.blend_kernel or default_blend_kernel(pipe)
    if image.size != mask.size:
        raise ValueError(
            f"The image is {image.width}x{image.height} but the mask is {mask.width}x{mask.height}: "
            "give a mask of the same size (white = region to fill)."
        )
    native = native_resolution(pipe)
    box = (0, 0, image.width, image.height)
    if settings.crop_to_mask:
        hole = hole_box(mask)
        if hole is not None:
            box = crop_window(hole, image.size, settings.context, min_side=native)
    region, region_mask = image.crop(box), mask.crop(box)

    size = working_size(region.width, region.height, native, multiple=pipe.vae_scale_factor)
    work_image = region.resize(size, PIL.Image.LANCZOS)
    # Any hole pixel under a working pixel makes it a hole, so thin strokes survive downscaling.
    work_mask = region_mask.resize(size, PIL.Image.BOX).point(lambda v: 255 if v > 0 else 0)

    seeds = image_seeds(settings)
    chunks = [seeds[k:k + IMAGES_PER_CALL] for k in range(0, len(seeds), IMAGES_PER_CALL)]
    with _one_truncation_notice(pipe, [settings.prompt, settings.negative_prompt]):
        for index, chunk in enumerate(chunks):
            step_end = None
            if callback is not None:
                def step_end(pipe_, i, t, kwargs, done=index * settings.steps):
                    callback(done + i + 1, settings.steps * len(chunks))
                    return {}

            results = pipe(
                prompt=settings.prompt, negative_prompt=settings.negative_prompt or None, image=work_image,
                mask=work_mask, height=size[1], width=size[0], num_inference_steps=settings.steps,
                guidance_scale=settings.guidance, brushnet_conditioning_scale=settings.scale,
                control_guidance_start=settings.start, control_guidance_end=settings.end,
                num_images_per_prompt=len(chunk), generator=[torch.Generator().manual_seed(s) for s in chunk],
                callback_on_step_end=step_end, output_type="pil", **_optional_keywords(settings), **settings.extra,
            ).images
            for result in results:
                result = result.resize(region.size, PIL.Image.LANCZOS)
                if settings.blend:
                    result = blend(region, result, region_mask, blend_kernel)
                full = image.copy()
                full.paste(result, box[:2])
                yield full


def _optional_keywords(settings: InpaintSettings) -> dict:
    # Sent only when they differ from their defaults, so any pipeline without them still works.
    keywords = {"strength": settings.strength, "brushnet_every": settings.brushnet_every}
    return {k: v for k, v in keywords.items() if v != InpaintSettings.__dataclass_fields__[k].default}


@contextlib.contextmanager
def _one_truncation_notice(pipe, prompts):
    """For a prompt longer than the text encoder reads, one short warning instead of diffusers' and
    transformers' (which repeat the whole dropped text, 27 KB for a 5000-word prompt)."""
    tokenizer = getattr(pipe, "tokenizer", None)
    limit = getattr(tokenizer, "model_max_length", None)
    too_long = []
    if tokenizer is not None and limit and limit < 100_000:
        with _quiet("transformers", "diffusers"):
            too_long = [(p, len(tokenizer(p).input_ids)) for p in prompts if p]
        too_long = [(p, n) for p, n in too_long if n > limit]
    if not too_long:
        yield
        return
    for prompt, n in too_long:
        words = " ".join(prompt.split()[:6])
        logger.warning(f"The prompt \"{words} ...\" is {n} tokens long; the text encoder reads only the first "
                       f"{limit} (start and end marks included) and ignores the rest.")
    with _quiet("transformers", "diffusers"):
        yield


@contextlib.contextmanager
def _quiet(*names):
    loggers = [logging.getLogger(name) for name in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
