"""BrushBench / EditBench folders: `mapping_file.json` and the images it names.

    {"<id>": {"image": "<path relative to the folder>", "caption": "...",
              "inpainting_mask": [start, length, ...], "outpainting_mask": [start, length, ...]}, ...}

BrushBench items carry both masks; EditBench items only `inpainting_mask`. A mask is a flat
run-length encoding with 1-indexed starts on a 512x512 grid, flattened row-major, as the authors'
evaluation decodes it (`rle2mask` of examples/brushnet/evaluate_brushnet.py: a C-order reshape;
note BrushData's training masks are column-major instead). 1 = the region to inpaint. Images must
have the grid's size; they are read as stored (no EXIF rotation), since the masks are defined on
the stored pixels. Items keep the file's order.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image

MAPPING_FILE = "mapping_file.json"
MASK_KEYS = ("inpainting_mask", "outpainting_mask")
DEFAULT_GRID = 512


def _refuse_duplicate_ids(pairs):
    """json's object hook: a key given twice (an id pasted twice into the mapping) is an error, where
    json keeps the last one silently and the first item vanishes."""
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"{MAPPING_FILE} gives {key!r} twice in one object (an item pasted twice?): each item "
                             "needs its own id.")
        seen[key] = value
    return seen


@dataclass(frozen=True)
class BenchmarkItem:
    id: str
    image_path: Path  # absolute
    image: str  # as written in the mapping file, relative to the benchmark folder
    caption: str
    rle: tuple[int, ...]
    grid: int

    def hole(self) -> np.ndarray:
        """The region to inpaint: bool (grid, grid), decoded row-major."""
        from ..masks import rle_decode

        return rle_decode(list(self.rle), self.grid, self.grid, order="C")

    def keep(self) -> np.ndarray:
        """The region kept from the original (mask 0), where PSNR, MSE and LPIPS are measured."""
        return ~self.hole()

    def mask_image(self) -> PIL.Image.Image:
        """The hole as an "L" image, 255 = fill: what `brushnet.inpaint.inpaint` takes."""
        return PIL.Image.fromarray(self.hole().astype(np.uint8) * 255, mode="L")

    def load_image(self) -> PIL.Image.Image:
        """The original as RGB, checked to have the grid's size."""
        from ..masks import as_rgb  # here: the command line's parser imports this module, and masks imports torch

        try:
            with PIL.Image.open(self.image_path) as image:
                image = as_rgb(image)
        except (OSError, PIL.UnidentifiedImageError) as error:
            raise ValueError(f"Item {self.id}: the image {self.image_path} could not be read ({error}).") from None
        if image.size != (self.grid, self.grid):
            raise ValueError(f"Item {self.id}: the image {self.image} is {image.width}x{image.height} but the "
                             f"masks are on a {self.grid}x{self.grid} grid.")
        return image


@dataclass
class Benchmark:
    root: Path
    mask_key: str
    grid: int
    items: list[BenchmarkItem]

    @property
    def name(self) -> str:
        return self.root.name

    def __iter__(self):
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


def _check_id(item_id: str) -> None:
    # Ids become file names (out/images/<id>.png): refuse anything that is not one plain name.
    if (not item_id or item_id.startswith(".") or len(item_id) > 200
            or any(c in item_id for c in '/\\:*?"<>|') or not item_id.isprintable()):
        raise ValueError(f"Item id {item_id!r} in {MAPPING_FILE} cannot be used as a file name: "
                         "use plain names such as 0, 1, 2.")


def load_benchmark(bench_dir: str | os.PathLike, mask_key: str = "inpainting_mask", grid: int = DEFAULT_GRID,
                   check_images: bool = True) -> Benchmark:
    """Read and validate `bench_dir/mapping_file.json` for `mask_key`.

    Every item must have a string `image` (a relative path to an existing file, of the grid's size
    when `check_images`), a string `caption` and a valid RLE under `mask_key` whose runs fit in
    `grid` x `grid` pixels. Errors are ValueErrors naming the item id and the field.
    """
    from ..masks import check_rle  # imports torch: only when a benchmark is read

    root = Path(bench_dir).expanduser()
    if root.is_file():
        raise ValueError(f"{root} is a file: give the benchmark's folder (the one holding {MAPPING_FILE}).")
    if not root.is_dir():
        raise ValueError(f"The benchmark folder {root} does not exist (it must hold {MAPPING_FILE}).")
    if grid < 1:
        raise ValueError(f"The mask grid must be a positive size; got {grid}.")
    mapping_path = root / MAPPING_FILE
    if not mapping_path.is_file():
        raise ValueError(f"{root} has no {MAPPING_FILE}: pass a BrushBench or EditBench folder.")
    try:
        mapping = json.loads(mapping_path.read_text(encoding="utf-8-sig"), object_pairs_hook=_refuse_duplicate_ids)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{mapping_path} is not valid JSON ({error}).") from None
    if not isinstance(mapping, dict) or not mapping:
        raise ValueError(f"{mapping_path} must be a non-empty JSON object {{id: {{image, caption, masks}}}}.")

    items = []
    for item_id, entry in mapping.items():
        _check_id(item_id)
        if not isinstance(entry, dict):
            raise ValueError(f"Item {item_id} in {MAPPING_FILE} must be an object with image, caption and masks.")
        image = entry.get("image")
        if not isinstance(image, str) or not image:
            raise ValueError(f"Item {item_id}: field 'image' must be a relative image path; got {image!r}.")
        if Path(image).is_absolute() or ".." in Path(image).parts:
            # A path out of the folder reads (and, with --images, scores) files that are not the benchmark's.
            raise ValueError(f"Item {item_id}: field 'image' must be a path inside {root}; got {image}.")
        caption = entry.get("caption")
        if not isinstance(caption, str):
            raise ValueError(f"Item {item_id}: field 'caption' must be a string; got {caption!r}.")
        if mask_key not in entry:
            present = [k for k in MASK_KEYS if k in entry]
            raise ValueError(f"Item {item_id} has no field {mask_key!r} (it has {', '.join(present) or 'no mask'}; "
                             "EditBench has only inpainting_mask).")
        rle = entry[mask_key]
        if not isinstance(rle, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in rle):
            raise ValueError(f"Item {item_id}: field {mask_key!r} must be a flat list of integers "
                             "[start, length, ...].")
        try:
            check_rle(rle, grid, grid)
        except ValueError as error:
            raise ValueError(f"Item {item_id}: field {mask_key!r} is not a valid RLE on a {grid}x{grid} grid "
                             f"({error})") from None
        path = root / image
        if check_images:
            if path.is_dir():
                raise ValueError(f"Item {item_id}: field 'image' names {image}, which is a folder in {root}: name "
                                 "the image file.")
            if not path.is_file():
                raise ValueError(f"Item {item_id}: field 'image' names {image}, which does not exist in {root}.")
            try:
                with PIL.Image.open(path) as opened:
                    size = opened.size
                    opened.verify()  # a truncated file is found here, not hours into a run
            except (OSError, PIL.UnidentifiedImageError, SyntaxError):
                raise ValueError(f"Item {item_id}: field 'image' names {image}, which is not an image.") from None
            if size != (grid, grid):
                raise ValueError(f"Item {item_id}: field 'image' names {image}, which is {size[0]}x{size[1]}, "
                                 f"but the masks are on a {grid}x{grid} grid.")
        items.append(BenchmarkItem(item_id, path.resolve(), image, caption, tuple(rle), grid))
    return Benchmark(root.resolve(), mask_key, grid, items)
