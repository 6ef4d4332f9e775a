"""Inpainting masks as users give them, turned into the binary hole the model needs.

Convention for users: white (1, 255) = the region to fill. Inside BrushNet the mask channel is the
opposite (1 = keep, 0 = hole); only the pipeline converts between the two.
"""

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
import torch.nn.functional as F


def _as_list(x) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _pil_mask_rgb(mask: PIL.Image.Image) -> PIL.Image.Image:
    # An RGBA mask is a painted layer: its alpha is where the user painted.
    if mask.mode in ("RGBA", "LA"):
        mask = mask.getchannel("A")
    return mask.convert("RGB")


def _array_mask(mask) -> torch.Tensor:
    """A numpy/torch mask as a float (B, C, H, W) tensor in [0, 1]."""
    if isinstance(mask, np.ndarray):
        array = mask
        tensor = torch.from_numpy(array.astype(np.float32) / 255.0 if array.dtype == np.uint8 else array.astype(np.float32))
        if tensor.ndim == 2:  # (H, W)
            tensor = tensor[None, None]
        elif tensor.ndim == 3:  # (H, W, C)
            tensor = tensor.permute(2, 0, 1)[None]
        elif tensor.ndim == 4:  # (B, H, W, C)
            tensor = tensor.permute(0, 3, 1, 2)
        else:
            raise ValueError(f"A numpy mask must be (H, W), (H, W, C) or (B, H, W, C); got shape {array.shape}.")
        return tensor
    if isinstance(mask, torch.Tensor):
        tensor = mask.detach().float()
        if mask.dtype == torch.uint8:
            tensor = tensor / 255.0
        if tensor.ndim == 2:  # (H, W)
            tensor = tensor[None, None]
        elif tensor.ndim == 3:  # (C, H, W)
            tensor = tensor[None]
        elif tensor.ndim != 4:
            raise ValueError(f"A torch mask must be (H, W), (C, H, W) or (B, C, H, W); got shape {tuple(mask.shape)}.")
        return tensor.cpu()
    raise TypeError(f"A mask must be a PIL image, a numpy array or a torch tensor, not {type(mask).__name__}.")


def image_size(image) -> tuple[int, int]:
    """(height, width) of a PIL image, an (H, W, C)/(B, H, W, C) array or a (C, H, W)/(B, C, H, W) tensor."""
    if isinstance(image, PIL.Image.Image):
        return image.height, image.width
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            return image.shape[0], image.shape[1]
        return (image.shape[0], image.shape[1]) if image.ndim == 3 else (image.shape[1], image.shape[2])
    if isinstance(image, torch.Tensor):
        return tuple(image.shape[-2:])
    raise TypeError(f"Expected a PIL image, numpy array or torch tensor, not {type(image).__name__}.")


def batch_size_of(images) -> int:
    """How many images a pipeline input holds (a list, a batched array/tensor, or one image)."""
    if isinstance(images, (list, tuple)):
        return sum(batch_size_of(x) for x in images)
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return images.shape[0]
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        return images.shape[0]
    return 1


def check_same_size(image, mask) -> None:
    image_sizes = {image_size(x) for x in _as_list(image)}
    mask_sizes = {image_size(x) for x in _as_list(mask)}
    if len(image_sizes) > 1:
        raise ValueError(f"All images of a batch must have the same size; got {sorted(image_sizes)}.")
    if image_sizes != mask_sizes:
        raise ValueError(
            f"The image is {_hw(next(iter(image_sizes)))} but the mask is {', '.join(map(_hw, sorted(mask_sizes)))}: "
            "give a mask of the same size as the image (white = region to fill)."
        )


def _hw(size: tuple[int, int]) -> str:
    return f"{size[1]}x{size[0]} (WxH)"


def preprocess_mask(mask, image_processor, height: int, width: int) -> torch.Tensor:
    """The binary hole (B, 1, height, width) float, 1 = fill, from the user's mask(s).

    PIL masks go through the same resize and normalisation as the images, then a pixel is a hole
    where its mean over RGB is >= 127.5: exactly the reference's `sum(2x - 1) < 0` test for "keep".
    Arrays and tensors are floats in [0, 1] (or uint8), resized bilinearly if needed, same test.
    """
    items = _as_list(mask)
    if all(isinstance(m, PIL.Image.Image) for m in items):
        normalised = image_processor.preprocess([_pil_mask_rgb(m) for m in items], height=height, width=width)
    else:
        tensors = [_array_mask(m) for m in items]
        channels = {t.shape[1] for t in tensors}
        if len(channels) > 1:
            raise ValueError(f"All masks of a batch must have the same number of channels; got {sorted(channels)}.")
        values = torch.cat(tensors)
        if values.shape[-2:] != (height, width):
            values = F.interpolate(values, size=(height, width), mode="bilinear", align_corners=False)
        normalised = 2.0 * values - 1.0
    keep = normalised.float().sum(dim=1, keepdim=True) < 0
    return (~keep).float()


def load_mask(source, threshold: int = 128, invert: bool = False, dilate: int = 0) -> PIL.Image.Image:
    """A user's mask file or image as a binary "L" image: 255 = fill, 0 = keep.

    Accepts L, LA, RGB, RGBA, P and 1-bit images. Where the image has transparency (an alpha channel
    with any value below 255), the alpha is the painted region; otherwise the mean of its colour
    channels is used. A pixel is a hole where that value is >= `threshold` (0-255). `invert` swaps
    fill and keep; `dilate` grows the hole by that many pixels (a square neighbourhood).
    """
    if not 0 <= threshold <= 255:
        raise ValueError(f"The mask threshold must be between 0 and 255; got {threshold}.")
    if dilate < 0:
        raise ValueError(f"--dilate must be >= 0 pixels; got {dilate}.")
    image = source if isinstance(source, PIL.Image.Image) else _open_image(source, "mask")
    values = _mask_values(image)
    hole = values >= threshold
    if invert:
        hole = ~hole
    if dilate:
        grown = F.max_pool2d(torch.from_numpy(hole)[None, None].float(), 2 * dilate + 1, stride=1, padding=dilate)
        hole = grown[0, 0].numpy() > 0
    return PIL.Image.fromarray((hole * 255).astype(np.uint8), mode="L")


def _mask_values(image: PIL.Image.Image) -> np.ndarray:
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        alpha = np.asarray(image.convert("RGBA").getchannel("A"))
        if alpha.min() < 255:
            return alpha.astype(np.float32)
    if image.mode == "1":
        return np.asarray(image.convert("L"), dtype=np.float32)
    if image.mode in ("L", "I", "F", "I;16"):
        values = np.asarray(image, dtype=np.float32)
        return values / 257.0 if image.mode in ("I", "I;16") and values.max() > 255 else values
    return np.asarray(image.convert("RGB"), dtype=np.float32).mean(axis=-1)


def _open_image(path, what: str) -> PIL.Image.Image:
    try:
        image = PIL.Image.open(path)
        image.load()
    except FileNotFoundError:
        raise FileNotFoundError(f"The {what} file {path} does not exist.") from None
    except PIL.UnidentifiedImageError:
        raise ValueError(f"The {what} file {path} is not an image PIL can read.") from None
    return image


def open_image(path) -> PIL.Image.Image:
    """An RGB image from a file, with a clear error for missing or unreadable files."""
    image = _open_image(path, "image")
    # Respect the camera's orientation tag, as every photo viewer does.
    return PIL.ImageOps.exif_transpose(image).convert("RGB")
