"""Generation parameters stored in output images, and fingerprints of the models that made them.

An output is PNG unless its name asks for JPEG or WebP (`OUTPUT_FORMATS`): PNG keeps every pixel
and the parameters in a text chunk; JPEG (quality 95, no chroma subsampling) and lossless WebP keep
them as the EXIF image description (JSON, ASCII-escaped as that tag requires). `read_png_params`
reads either."""

import hashlib
import json
import os
from pathlib import Path

import PIL.Image
import PIL.PngImagePlugin

from .files import atomic_write

PNG_KEY = "brushnet"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")
_HASH_CACHE = Path(os.environ.get("BRUSHNET_CACHE", Path.home() / ".cache" / "brushnet")) / "hashes.json"


# The output formats by file suffix (the command line adds .png to a name without one, refuses other suffixes).
OUTPUT_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
_EXIF_IMAGE_DESCRIPTION = 0x010E


def save_png(image: PIL.Image.Image, path: str | os.PathLike, params: dict, overwrite: bool = False) -> Path:
    """Write `image` with `params` atomically (no half-written file; an existing file is replaced
    only with `overwrite`), as PNG or, when `path` ends in .jpg/.jpeg/.webp, as that format."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass --overwrite to replace it.")
    text = json.dumps(params, sort_keys=True)
    image_format = OUTPUT_FORMATS.get(path.suffix.lower(), "PNG")
    if image_format == "PNG":
        info = PIL.PngImagePlugin.PngInfo()
        info.add_text(PNG_KEY, text)
        options = {"pnginfo": info}
    else:
        exif = PIL.Image.Exif()
        exif[_EXIF_IMAGE_DESCRIPTION] = f"{PNG_KEY}:{text}"
        encoding = {"quality": 95, "subsampling": 0} if image_format == "JPEG" else {"lossless": True}
        options = {"exif": exif, **encoding}
        image = image.convert("RGB") if image_format == "JPEG" else image
    with atomic_write(path) as f:
        image.save(f, format=image_format, **options)
    return path


def _stored_params(image: PIL.Image.Image) -> str | None:
    """The parameters' JSON in an image `save_png` wrote (PNG text or EXIF description), else None."""
    text = image.text.get(PNG_KEY) if hasattr(image, "text") else None
    if text is None:
        description = image.getexif().get(_EXIF_IMAGE_DESCRIPTION)
        if isinstance(description, str) and description.startswith(f"{PNG_KEY}:"):
            text = description[len(PNG_KEY) + 1:]
    return text


def read_png_params(path: str | os.PathLike) -> dict:
    """The parameters `save_png` stored in a PNG, with a clear error if it has none."""
    try:
        with PIL.Image.open(path) as image:
            text = _stored_params(image)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist.") from None
    except PIL.UnidentifiedImageError:
        raise ValueError(f"{path} is not an image.") from None
    except IsADirectoryError:
        raise ValueError(f"{path} is a folder: give one of the PNGs in it.") from None
    except Exception as error:  # damaged or unreadable: PIL and the OS raise many types
        raise ValueError(f"{path} cannot be read ({str(error).strip() or type(error).__name__}).") from None
    if text is None:
        raise ValueError(f"{path} carries no brushnet generation parameters.")
    try:
        params = json.loads(text)
    except json.JSONDecodeError:
        params = None
    if not isinstance(params, dict):  # save_png writes an object; anything else was edited in
        raise ValueError(f"{path} has brushnet parameters that are not a JSON object: it was edited or damaged.")
    return params


def model_fingerprint(source) -> str:
    """A short sha256 of a model's weight files (a file, or every weight file in a folder), or the
    hub id itself when `source` is not on disk. Cached by path, size and modification time."""
    path = Path(str(source)).expanduser()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    else:
        return f"hub:{source}"
    digest = hashlib.sha256()
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        digest.update(_file_sha256(file).encode())
    return digest.hexdigest()[:12]


def _file_sha256(file: Path) -> str:
    stat = file.stat()
    key = f"{file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    cache = _load_cache()
    if key in cache:
        return cache[key]
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    cache[key] = digest.hexdigest()
    _store_cache(cache)
    return cache[key]


def _load_cache() -> dict:
    try:
        return json.loads(_HASH_CACHE.read_text())
    except (OSError, ValueError):
        return {}


def _store_cache(cache: dict) -> None:
    try:
        _HASH_CACHE.parent.mkdir(parents=True, exist_ok=True)
        tmp = _HASH_CACHE.with_suffix(".tmp")
        tmp.write_text(json.dumps(cache))
        os.replace(tmp, _HASH_CACHE)
    except OSError:
        pass  # a read-only home only costs re-hashing next time
