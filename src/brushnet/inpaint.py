"""Inpaint real photos of any size with a loaded pipeline: what the CLI and the UI both call.

The pipeline works at the model's native area (512x512 for SD1.5, 1024x1024 for SDXL). A photo is
resized to that area and the result restored to the photo's size; with `crop_to_mask`, only a
window around the hole is processed. With blending (the default), the result is pasted over the
original through the blurred mask at full resolution, so every pixel away from the hole is the
original's, bit for bit.

The VAE works in tiles (`vae_tiling`) by default only on images far larger than that area, so at
the sizes `inpaint` works at it runs as diffusers runs it by default.
"""

import contextlib
import logging
import math
from dataclasses import asdict, dataclass, field, replace

import PIL.Image
import torch

from .arguments import (
    VAE_TILING_MODES,
    check_blend_kernel,
    check_choice,
    check_conditioning_scale,
    check_control_window,
    check_guidance,
    check_guidance_rescale,
    check_num_images,
    check_number,
    check_seed,
    check_steps,
    check_text,
)
from .masks import load_mask, to_pil
from .pipelines.blending import blend
from .regions import crop_window, hole_box, working_size

logger = logging.getLogger(__name__)
# Images of one input share a pipeline call up to this many; more are split into several calls,
# since memory grows with the batch (250 images of the 64-px demo model took 1.8 GB in one call).
IMAGES_PER_CALL = 4
# "auto" decodes an image whole up to this many native areas (twice the native side: 1024x1024 for
# SD1.5, 2048x2048 for SDXL) and in tiles above. Decoding memory grows with the pixels decoded at once;
# measured on SD1.5's VAE in fp32 on CPU (BENCHMARKS.md, "VAE memory"): 1.0 GB for one 512x512 image,
# 3.0 GB for four, 3.8 GB for one 1024x1024 whole and 1.1 GB in tiles, which took 1.8x the time. Up to
# here an image needs about what the IMAGES_PER_CALL native-size images of one `inpaint` call need;
# above, whole decoding grows with the area while tiles stay near one tile's memory. The bound is on
# the area, not a side: a long thin image of the native area needs no more memory than a square one.
AUTO_TILING_NATIVE_AREAS = 4


@dataclass
class InpaintSettings:
    prompt: str
    negative_prompt: str = ""
    steps: int = 50
    guidance: float = 7.5
    guidance_rescale: float = 0.0  # > 0: the guided prediction pulled back toward the prompt's own spread
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
    vae_tiling: str = "auto"  # "auto", "on" or "off": when the VAE works in tiles, see `vae_tiling`
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


# Pipeline keywords `inpaint` sets itself, and the InpaintSettings field behind each (None: the
# image and mask `inpaint` is given). In `extra` they would reach the pipeline twice.
SET_BY_SETTINGS = {
    "prompt": "prompt", "negative_prompt": "negative_prompt", "num_inference_steps": "steps",
    "guidance_scale": "guidance", "guidance_rescale": "guidance_rescale",
    "brushnet_conditioning_scale": "scale", "control_guidance_start": "start", "control_guidance_end": "end",
    "num_images_per_prompt": "num_images", "generator": "seed", "strength": "strength",
    "brushnet_every": "brushnet_every", "image": None, "mask": None, "mask_image": None, "height": None,
    "width": None, "output_type": None, "blend": "blend", "blend_kernel": "blend_kernel",
}


def check_settings(settings: InpaintSettings, names: dict[str, str] | None = None) -> None:
    """Every number of `settings` in range (ValueError naming it, by `names[field]` if given)."""
    name = lambda field: (names or {}).get(field, field)  # noqa: E731
    check_steps(settings.steps, name("steps"))
    check_guidance(settings.guidance, name("guidance"))
    check_guidance_rescale(settings.guidance_rescale, name("guidance_rescale"))
    if settings.guidance_rescale > 0 and settings.guidance <= 1:
        raise ValueError(f"{name('guidance_rescale')} rescales classifier-free guidance, which {name('guidance')} "
                         f"{settings.guidance:g} switches off (it runs above 1): leave it at 0, or raise the guidance.")
    check_conditioning_scale(settings.scale, name("scale"))
    check_control_window(settings.start, settings.end, (name("start"), name("end")))
    check_num_images(settings.num_images, name("num_images"))
    check_seed(settings.seed, name("seed"), settings.num_images)
    if settings.blend_kernel is not None:
        check_blend_kernel(settings.blend_kernel, name("blend_kernel"))
    check_number(settings.context, name("context"), low=0.0, high=10.0)
    check_number(settings.strength, name("strength"), low=0.0, high=1.0, low_inclusive=False)
    # The pipelines refuse this too, but only once the model is loaded, and in their keywords' names.
    if int(settings.steps * settings.strength) < 1:
        # The smallest strength that leaves one step, rounded up so that the number shown works.
        enough = math.ceil(1000 / settings.steps) / 1000
        raise ValueError(f"{name('strength')} {settings.strength:g} of {name('steps')} {settings.steps} leaves no "
                         f"denoising step: use {name('strength')} >= {enough:g} or more steps.")
    check_number(settings.brushnet_every, name("brushnet_every"), low=1, high=100, integer=True)
    check_choice(settings.vae_tiling, VAE_TILING_MODES, name("vae_tiling"))
    check_text(settings.prompt, name("prompt"))
    check_text(settings.negative_prompt, name("negative_prompt"))
    for keyword in settings.extra:
        if keyword in SET_BY_SETTINGS:
            field_name = SET_BY_SETTINGS[keyword]
            raise ValueError(f"extra[{keyword!r}] is the pipeline keyword that {name(field_name)} sets: "
                             f"set {name(field_name)} instead." if field_name else
                             f"extra[{keyword!r}] is set by inpaint itself (from the image and mask it is "
                             "given): leave it out of extra.")


def inpaint(pipe, image: PIL.Image.Image, mask: PIL.Image.Image, settings: InpaintSettings,
            callback=None) -> list[PIL.Image.Image]:
    """Inpaint `image` where the binary `mask` is white; returns `settings.num_images` images of
    the image's size. Image and mask are PIL images or numpy arrays (uint8, bool or float 0-1). `callback(step, total)` is called after every denoising step."""
    return list(iter_inpaint(pipe, image, mask, settings, callback))


def iter_inpaint(pipe, image: PIL.Image.Image, mask: PIL.Image.Image, settings: InpaintSettings,
                 callback=None):
    """`inpaint`, yielding each image as soon as its chunk of IMAGES_PER_CALL is done, so a caller
    can save them as they come; memory stays that of one chunk however many images are asked."""
    check_settings(settings)
    # Whole-number floats (steps 2.0, from a JSON or YAML file) pass the checks; torch and numpy
    # want ints.
    settings = replace(settings, **{
        name: int(getattr(settings, name)) for name in ("steps", "seed", "num_images", "brushnet_every", "blend_kernel")
        if getattr(settings, name) is not None})
    image = to_pil(image, "image").convert("RGB")
    # Read as the CLI reads a mask file: a painted layer by its alpha, a grey one at half brightness.
    mask = load_mask(to_pil(mask, "mask"))
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
            step_end = _step_end(settings.extra.get("callback_on_step_end"), callback,
                                 index * settings.steps, settings.steps * len(chunks))

            with vae_tiling(pipe, size[1], size[0], len(chunk), settings.vae_tiling):
                results = pipe(
                    prompt=settings.prompt, negative_prompt=settings.negative_prompt or None, image=work_image,
                    mask=work_mask, height=size[1], width=size[0], num_inference_steps=settings.steps,
                    guidance_scale=settings.guidance, brushnet_conditioning_scale=settings.scale,
                    control_guidance_start=settings.start, control_guidance_end=settings.end,
                    num_images_per_prompt=len(chunk), generator=[torch.Generator().manual_seed(s) for s in chunk],
                    callback_on_step_end=step_end, output_type="pil", **_optional_keywords(settings),
                    **_extra_keywords(settings.extra),
                ).images
            for result in results:
                result = result.resize(region.size, PIL.Image.LANCZOS)
                if settings.blend:
                    result = blend(region, result, region_mask, blend_kernel)
                full = image.copy()
                full.paste(result, box[:2])
                yield full


@contextlib.contextmanager
def vae_tiling(pipe, height: int, width: int, num_images: int, mode: str = "auto"):
    """Inside the block, the pipeline's VAE encodes and decodes `num_images` images of `height` x
    `width` pixels in tiles, and the batch one image at a time, as `mode` says; the VAE's own settings
    come back after. Yields whether it tiles.

    - "off": never; the whole batch at once, as diffusers does by default.
    - "on": always: diffusers' tiling (tiles of the VAE config's `sample_size`, blended over a quarter
      of a tile; an image no larger than one tile is still done whole) and slicing (one image at a time).
    - "auto": as "on" for an image over AUTO_TILING_NATIVE_AREAS times the model's native area, else as
      "off", so every output at the sizes `inpaint` works at is what "off" makes, bit for bit.

    Each tile is decoded alone (its own normalisation statistics too), so a tiled image differs from a
    whole one, more so with small tiles (the demo model's 64 px: 22 dB PSNR apart at 256x256).
    Slicing alone is not exact either (a batch's convolutions round otherwise than one image's: up to
    2.4e-5 apart in decoded pixels on an SD1.5-shaped VAE), so "auto" slices only the batches it tiles.
    """
    check_choice(mode, VAE_TILING_MODES, "vae_tiling")
    native = native_resolution(pipe)
    tiles = mode == "on" or (mode == "auto" and height * width > AUTO_TILING_NATIVE_AREAS * native * native)
    vae = pipe.vae
    before = vae.use_tiling, vae.use_slicing
    _set_vae_memory(vae, tiles, tiles and num_images > 1)
    try:
        yield tiles
    finally:
        _set_vae_memory(vae, *before)


def _set_vae_memory(vae, tiling: bool, slicing: bool) -> None:
    # diffusers' own switches, which refuse a VAE that cannot tile instead of ignoring the request.
    if tiling:
        vae.enable_tiling()
    else:
        vae.disable_tiling()
    if slicing:
        vae.enable_slicing()
    else:
        vae.disable_slicing()


def _step_end(user_callback, progress, done: int, total: int):
    """The pipeline's `callback_on_step_end`: the caller's own (from `settings.extra`) and the
    progress report, either or both. A diffusers `PipelineCallback` is passed as it is when alone,
    so the pipeline still reads the tensors it names (`_extra_keywords` passes them on when wrapped)."""
    if progress is None:
        return user_callback

    def step_end(pipe, i, t, kwargs):
        outputs = user_callback(pipe, i, t, kwargs) if user_callback is not None else {}
        progress(done + i + 1, total)
        return outputs
    return step_end


def _extra_keywords(extra: dict) -> dict:
    """`settings.extra` as pipeline keywords, its step-end callback left to `_step_end`; a diffusers
    `PipelineCallback` wrapped there still hands the pipeline the tensors it names."""
    keywords = {k: v for k, v in extra.items() if k != "callback_on_step_end"}
    named = getattr(extra.get("callback_on_step_end"), "tensor_inputs", None)
    if named is not None:
        keywords.setdefault("callback_on_step_end_tensor_inputs", list(named))
    return keywords


def _optional_keywords(settings: InpaintSettings) -> dict:
    # Sent only when they differ from their defaults, so any pipeline without them still works.
    keywords = {"strength": settings.strength, "brushnet_every": settings.brushnet_every,
                "guidance_rescale": settings.guidance_rescale}
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
        words = " ".join(prompt.split()[:6])[:60]  # a 100 kB "word" is not repeated whole
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
