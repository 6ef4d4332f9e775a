"""Blurred blending: paste the generated image over the original through a softened mask.

The paper's `*` rows. The hole mask is blurred with a Gaussian (OpenCV's `GaussianBlur` with
sigma 0 for that kernel size, reflect-101 borders) and widened outward only, so every hole pixel
stays fully generated and the seam fades into the original:

    m' = 1 - (1 - m) * (1 - blur(m));   out = original * (1 - m') + generated * m'
"""

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F


def gaussian_kernel_1d(kernel: int, dtype=torch.float64) -> torch.Tensor:
    """OpenCV's Gaussian kernel for sigma <= 0: sigma = 0.3 * ((kernel - 1) / 2 - 1) + 0.8."""
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"blend_kernel must be a positive odd number, got {kernel}.")
    sigma = 0.3 * ((kernel - 1) * 0.5 - 1) + 0.8
    x = torch.arange(kernel, dtype=dtype) - (kernel - 1) / 2
    weights = torch.exp(-(x**2) / (2 * sigma**2))
    return weights / weights.sum()


def blur_mask(mask: torch.Tensor, kernel: int = 21) -> torch.Tensor:
    """Separable Gaussian blur of (B, 1, H, W) masks with reflect-101 borders (OpenCV's default)."""
    weights = gaussian_kernel_1d(kernel, dtype=mask.dtype).to(mask.device)
    pad = kernel // 2
    # torch's "reflect" mirrors without repeating the edge pixel, as OpenCV's BORDER_REFLECT_101;
    # it needs pad < size, so fall back to replicate for masks smaller than the kernel.
    mode = "reflect" if min(mask.shape[-2:]) > pad else "replicate"
    out = F.conv2d(F.pad(mask, (pad, pad, 0, 0), mode=mode), weights.view(1, 1, 1, -1))
    return F.conv2d(F.pad(out, (0, 0, pad, pad), mode=mode), weights.view(1, 1, -1, 1))


def blend_tensors(original: torch.Tensor, generated: torch.Tensor, hole: torch.Tensor,
                  kernel: int = 21) -> torch.Tensor:
    """Blend (B, C, H, W) images in any value range; `hole` is (B or 1, 1, H, W) with 1 = generated."""
    hole = hole.to(torch.float64)
    soft = 1 - (1 - hole) * (1 - blur_mask(hole, kernel))
    soft = soft.to(generated.dtype)
    return original.to(generated.dtype) * (1 - soft) + generated * soft


def _to_array(x, name: str) -> np.ndarray:
    if isinstance(x, PIL.Image.Image):
        return np.asarray(x.convert("RGB"), dtype=np.float64) / 255.0
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    x = x.astype(np.float64) / 255.0 if x.dtype == np.uint8 else x.astype(np.float64)
    if x.ndim != 3:
        raise ValueError(f"blend: `{name}` must be a PIL image or an (H, W, C) array, got shape {x.shape}.")
    return x


def _mask_array(mask) -> np.ndarray:
    """The hole as an (H, W) bool array (1 byte a pixel: a 144-megapixel photo's mask in float64
    alone took 1.2 GB)."""
    if isinstance(mask, PIL.Image.Image):
        from ..masks import _pil_mask_rgb  # the pipelines' rule: a painted layer by its alpha

        return np.asarray(_pil_mask_rgb(mask).convert("L")) >= 128
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    mask = np.asarray(mask)
    mask = mask.astype(np.float64) / 255.0 if mask.dtype == np.uint8 else mask.astype(np.float64)
    if mask.ndim == 3:
        mask = mask.mean(axis=-1)
    if mask.ndim != 2:
        raise ValueError(f"blend: `mask` must be (H, W) or (H, W, C), got shape {mask.shape}.")
    return mask >= 0.5


def _size(x) -> tuple[int, int]:
    if isinstance(x, PIL.Image.Image):
        return x.height, x.width
    return tuple(x.shape[:2])


def blend_window(hole: np.ndarray, kernel: int) -> tuple[int, int, int, int] | None:
    """(top, bottom, left, right) of the part of the image blending can change, or None for all of
    it. The blurred mask is 0 farther than kernel // 2 from the hole; the window reaches twice that
    far, so the blur's mirrored borders at its edges read only zeros there and the window's values
    are exactly the whole image's (where the image is too small for that, the whole is used)."""
    pad = kernel // 2
    rows, cols = np.flatnonzero(hole.any(axis=1)), np.flatnonzero(hole.any(axis=0))
    if rows.size == 0:
        return (0, 0, 0, 0)
    height, width = hole.shape
    top, bottom = max(rows[0] - 2 * pad, 0), min(rows[-1] + 1 + 2 * pad, height)
    left, right = max(cols[0] - 2 * pad, 0), min(cols[-1] + 1 + 2 * pad, width)
    # blur_mask switches to replicate borders below pad + 1 pixels: the window must not, unless the
    # whole image does.
    if min(height, width) <= pad or min(bottom - top, right - left) <= pad:
        return None
    return top, bottom, left, right


def blend(original, generated, mask, kernel: int = 21):
    """Blurred blending of one image. White (1) in `mask` = the generated region.

    `original`, `generated`: PIL images or (H, W, C) arrays/tensors (uint8, or floats in [0, 1]).
    Returns the same kind as `generated`: a PIL image (rounded to uint8) or a float64 array. Only
    the window around the hole that blending changes is computed (`blend_window`): a large photo
    with a small hole costs the hole's neighbourhood, not 175 bytes a pixel of the whole photo.
    """
    was_pil = isinstance(generated, PIL.Image.Image)
    hole = _mask_array(mask)
    if not (_size(generated) == _size(original) == hole.shape):
        raise ValueError(f"blend: original {_size(original)}, generated {_size(generated)} and mask {hole.shape} "
                         "must have the same size.")
    window = blend_window(hole, kernel)
    top, bottom, left, right = window if window is not None else (0, hole.shape[0], 0, hole.shape[1])

    def crop(x):
        if isinstance(x, PIL.Image.Image):
            return x.crop((left, top, right, bottom))
        return x[top:bottom, left:right]

    if was_pil:
        out = original.convert("RGB") if isinstance(original, PIL.Image.Image) else PIL.Image.fromarray(
            np.clip(np.round(_to_array(original, "original") * 255), 0, 255).astype(np.uint8))
    else:
        out = _to_array(original, "original").copy()
    if bottom <= top or right <= left:  # no hole: nothing changes
        return out
    gen, orig = _to_array(crop(generated), "generated"), _to_array(crop(original), "original")
    to_nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))[None]  # noqa: E731
    hole_window = torch.from_numpy(hole[top:bottom, left:right].astype(np.float64))[None, None]
    blended = blend_tensors(to_nchw(orig), to_nchw(gen), hole_window, kernel)[0].permute(1, 2, 0).numpy()
    if was_pil:
        out.paste(PIL.Image.fromarray(np.clip(np.round(blended * 255), 0, 255).astype(np.uint8)), (left, top))
        return out
    out[top:bottom, left:right] = blended
    return out
