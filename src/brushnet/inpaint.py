"""Inpaint real photos of any size with a loaded pipeline: what the CLI and the UI both call.

The pipeline works at the model's native area (512x512 for SD1.5, 1024x1024 for SDXL). A photo is
resized to that area and the result restored to the photo's size; with `crop_to_mask`, only a
window around the hole is processed. With blending (the default), the result is pasted over the
original through the blurred mask at full resolution, so every pixel away from the hole is the
original's, bit for bit.
"""

from dataclasses import asdict, dataclass, field

import PIL.Image
import torch

from .pipelines.blending import blend
from .regions import crop_window, hole_box, working_size


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


def inpaint(pipe, image: PIL.Image.Image, mask: PIL.Image.Image, settings: InpaintSettings,
            callback=None) -> list[PIL.Image.Image]:
    """Inpaint `image` where the binary `mask` is white; returns `settings.num_images` images of
    the image's size. `callback(step, total)` is called after every denoising step."""
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

    step_end = None
    if callback is not None:
        def step_end(pipe_, i, t, kwargs):
            callback(i + 1, settings.steps)
            return {}

    results = pipe(
        prompt=settings.prompt, negative_prompt=settings.negative_prompt or None, image=work_image,
        mask=work_mask, height=size[1], width=size[0], num_inference_steps=settings.steps,
        guidance_scale=settings.guidance, brushnet_conditioning_scale=settings.scale,
        control_guidance_start=settings.start, control_guidance_end=settings.end,
        num_images_per_prompt=settings.num_images,
        generator=[torch.Generator().manual_seed(s) for s in image_seeds(settings)],
        callback_on_step_end=step_end, output_type="pil", **settings.extra,
    ).images

    outputs = []
    for result in results:
        result = result.resize(region.size, PIL.Image.LANCZOS)
        if settings.blend:
            result = blend(region, result, region_mask, blend_kernel)
        full = image.copy()
        full.paste(result, box[:2])
        outputs.append(full)
    return outputs

