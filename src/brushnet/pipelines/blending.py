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
    if isinstance(mask, PIL.Image.Image):
        mask = mask.getchannel("A") if mask.mode == "RGBA" else mask.convert("L")
        return (np.asarray(mask, dtype=np.float64) / 255.0 >= 0.5).astype(np.float64)
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    mask = np.asarray(mask)
    mask = mask.astype(np.float64) / 255.0 if mask.dtype == np.uint8 else mask.astype(np.float64)
    if mask.ndim == 3:
        mask = mask.mean(axis=-1)
    if mask.ndim != 2:
        raise ValueError(f"blend: `mask` must be (H, W) or (H, W, C), got shape {mask.shape}.")
    return (mask >= 0.5).astype(np.float64)


def blend(original, generated, mask, kernel: int = 21):
    """Blurred blending of one image. White (1) in `mask` = the generated region.

    `original`, `generated`: PIL images or (H, W, C) arrays/tensors (uint8, or floats in [0, 1]).
    Returns the same kind as `generated`: a PIL image (rounded to uint8) or a float64 array.
    """
    was_pil = isinstance(generated, PIL.Image.Image)
    gen, orig = _to_array(generated, "generated"), _to_array(original, "original")
    hole = _mask_array(mask)
    if not (gen.shape[:2] == orig.shape[:2] == hole.shape):
        raise ValueError(
            f"blend: original {orig.shape[:2]}, generated {gen.shape[:2]} and mask {hole.shape} must have the same size."
        )
    to_nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))[None]  # noqa: E731
    out = blend_tensors(to_nchw(orig), to_nchw(gen), torch.from_numpy(hole)[None, None], kernel)
    out = out[0].permute(1, 2, 0).numpy()
    if was_pil:
        return PIL.Image.fromarray(np.clip(np.round(out * 255), 0, 255).astype(np.uint8))
    return out
