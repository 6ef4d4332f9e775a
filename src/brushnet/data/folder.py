"""Custom training data: a folder of images with same-stem captions and optional masks.

Layout (file names are matched by stem, case-sensitively; only the top level is scanned):

    folder/
        cat.jpg             an image: .png, .jpg, .jpeg or .webp (any case)
        cat.txt             its caption, UTF-8 (optional: missing = "", warned once)
        masks/cat.png       optional mask, same size as the image, white = hole (the region to
                            inpaint), read like the `--mask` of `brushnet inpaint` (alpha if
                            transparent, else mean colour >= 128); .png preferred, other image
                            extensions accepted
        cat.json            optional segmentation {"mask": [rle, ...]} in BrushData's format:
                            flat 1-indexed [start, length, ...] runs, column-major over the
                            image's height x width, 1 = object (the initially KEPT region);
                            optionally "captions": [one per mask] and "background_caption",
                            which `--mask_mix drawn` uses to caption a hole by what it holds

A mask PNG wins over a JSON. The PNG's hole becomes keep = 1 - hole; the JSON's masks are used
as BrushData's are (one at random). Without either, the reference's fallback applies: everything
kept (or, after the random inversion, everything a hole), so use `random_mask=True` for
image-only folders. In all cases the training recipe flips kept region and hole half the time.
"""

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..masks import check_rle, faint_hole, load_mask
from ._stream import (
    BrokenSample,
    Record,
    RecordDataset,
    decode_image,
    epoch_order,
    logger,
    worker_slot,
)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
MASK_FOLDER = "masks"


@dataclass(frozen=True)
class FolderItem:
    """The files of one image of a training folder."""

    image: Path
    caption: Path | None
    mask: Path | None
    segmentation: Path | None

    @property
    def stem(self) -> str:
        return self.image.stem


def check_unique_stems(paths, folder, consequence: str) -> None:
    """ValueError for the first two files of `paths` with one stem (a.png, a.jpg), naming both and
    `consequence` (formatted with `stem`): files matched or named by stem cannot tell them apart."""
    seen = {}
    for path in paths:
        if path.stem in seen:
            raise ValueError(f"{seen[path.stem].name} and {path.name} in {folder} share the name {path.stem!r}: "
                             + consequence.format(stem=path.stem))
        seen[path.stem] = path


def list_folder(folder) -> list[FolderItem]:
    """The images of a training folder (sorted by file name) with their caption and mask files."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"The training folder {folder} does not exist or is not a folder.")
    images = image_files(folder)
    if not images:
        raise ValueError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) in the folder {folder}.")
    # One caption and one mask would serve both.
    check_unique_stems(images, folder, "their caption and mask are matched by name, so rename one of them.")
    mask_folder = folder / MASK_FOLDER
    preference = {ext: k for k, ext in enumerate(IMAGE_EXTENSIONS)}  # .png first, any case
    masks = {}
    for mask in sorted(image_files(mask_folder) if mask_folder.is_dir() else [],
                       key=lambda p: -preference[p.suffix.lower()]):
        masks[mask.stem] = mask  # the preferred extension comes last and stays
    items = []
    for image in images:
        caption = image.with_suffix(".txt")
        segmentation = image.with_suffix(".json")
        mask = masks.get(image.stem)
        items.append(
            FolderItem(
                image=image,
                caption=caption if caption.is_file() else None,
                mask=mask,
                segmentation=segmentation if segmentation.is_file() else None,
            )
        )
    return items


def image_files(folder: Path) -> list[Path]:
    """The image files of a folder, sorted by name, each suffix in any case; hidden files (a
    macOS ._name, an editor's .name) are not images of the set."""
    return sorted(p for p in folder.iterdir()
                  if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file())


def read_item(item: FolderItem, *, with_masks: bool = True) -> Record:
    """A Record (image, caption, masks as keep arrays or RLEs) of one folder item; BrokenSample if unusable."""
    try:
        data = item.image.read_bytes()
    except OSError as error:
        raise BrokenSample(f"unreadable image file ({error})") from None
    image = decode_image(data)
    caption = ""
    if item.caption is not None:
        try:
            caption = item.caption.read_text(encoding="utf-8-sig").strip()  # -sig: a BOM is no word
        except (OSError, UnicodeDecodeError) as error:
            raise BrokenSample(f"unreadable caption file {item.caption.name} ({error})") from None
    masks, object_captions, background_caption = [], [], None
    if with_masks and item.mask is not None:
        try:
            hole = np.asarray(load_mask(item.mask)) > 0
            brightest = faint_hole(item.mask) if not hole.any() else None
        except (OSError, ValueError) as error:
            raise BrokenSample(f"unreadable mask ({error})") from None
        if brightest is not None:  # its hole would be read as no hole at all
            raise BrokenSample(f"the mask {item.mask.name} has no pixel at 128 or above (its brightest is "
                               f"{brightest:g}: a 0/1 array saved as an image?); save the hole as 255")
        if hole.shape != (image.height, image.width):
            raise BrokenSample(
                f"the mask {item.mask.name} is {hole.shape[1]}x{hole.shape[0]} but the image is "
                f"{image.width}x{image.height} (WxH)"
            )
        masks = [~hole]
    elif with_masks and item.segmentation is not None:
        masks = read_segmentation(item.segmentation, image.height, image.width)
        object_captions, background_caption = read_hole_captions(item.segmentation, len(masks))
    return Record(key=item.stem, image=image, caption=caption, segmentation_masks=masks,
                  object_captions=object_captions, background_caption=background_caption)


def read_hole_captions(path: Path, count: int) -> tuple[list[str], str | None]:
    """The optional "captions" (one per mask) and "background_caption" of a segmentation JSON;
    ([], None) where absent or malformed, so they never make a sample unusable."""
    try:
        segmentation = json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except (OSError, ValueError):
        return [], None
    return hole_captions(segmentation, count)


def hole_captions(segmentation, count: int) -> tuple[list[str], str | None]:
    """`read_hole_captions` of a parsed segmentation JSON (a folder's file, or a shard's member)."""
    if not isinstance(segmentation, dict):
        return [], None
    captions = segmentation.get("captions")
    if not (isinstance(captions, list) and len(captions) == count and all(isinstance(c, str) for c in captions)):
        captions = []
    background = segmentation.get("background_caption")
    return captions, background if isinstance(background, str) and background else None


def read_segmentation(path: Path, height: int, width: int) -> list:
    """The RLE list of a {"mask": [rle, ...]} JSON file, each checked against height x width."""
    try:
        segmentation = json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except (OSError, ValueError) as error:
        raise BrokenSample(f"bad segmentation JSON {Path(path).name} ({error})") from None
    if not isinstance(segmentation, dict) or not isinstance(segmentation.get("mask"), list):
        raise BrokenSample(f'segmentation JSON {Path(path).name} has no "mask" list')
    for rle in segmentation["mask"]:
        try:
            check_rle(rle, height, width)
        except (ValueError, TypeError) as error:
            raise BrokenSample(f"bad RLE in {Path(path).name} ({error})") from None
    return segmentation["mask"]


class ImageFolderDataset(RecordDataset):
    """A folder of images, captions and masks (see the module doc) as BrushNet training samples.

    Same items as `BrushDataShards` (`training_sample`'s dict) and the same options. The image
    list is shuffled per epoch (the same order everywhere for a seed) and split between processes
    (`rank` of `world_size`) and DataLoader workers image by image; `repeat` streams forever.
    Unusable images (undecodable, mask of the wrong size, bad JSON) are skipped and counted in
    `skipped`, with a warning.
    """

    def __init__(
        self,
        folder,
        *,
        resolution: int = 512,
        random_mask: bool = False,
        mask_mix: str = "reference",
        drawn_weights: str | None = None,
        proportion_empty_prompts: float = 0.0,
        seed: int = 0,
        shuffle: bool = True,
        repeat: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ):
        super().__init__(resolution=resolution, random_mask=random_mask, proportion_empty_prompts=proportion_empty_prompts,
                         seed=seed, repeat=repeat, rank=rank, world_size=world_size,
                         mask_mix=mask_mix, drawn_weights=drawn_weights)
        self.folder = Path(folder)
        self.items = list_folder(folder)
        self.shuffle = shuffle
        uncaptioned = sum(item.caption is None for item in self.items)
        if uncaptioned:
            logger.warning(
                "%d of the %d images in %s have no .txt caption; they train with an empty caption.",
                uncaptioned,
                len(self.items),
                self.folder,
            )
        if not random_mask and not any(item.mask or item.segmentation for item in self.items):
            logger.warning(
                "No masks (%s/<stem>.png or <stem>.json) in %s: every sample is all kept or all hole. "
                "Use random_mask=True (--random_mask) for a folder of images only.",
                MASK_FOLDER,
                self.folder,
            )

    def records(self) -> Iterator[Record]:
        """This worker's images decoded but not augmented, in order."""
        slot, total = worker_slot(self.rank, self.world_size)
        epoch = 0
        while True:
            order = epoch_order(len(self.items), self.seed, self.epoch, epoch, self.shuffle)
            mine = order[slot::total]
            good = 0
            for index in mine:
                item = self.items[index]
                try:
                    record = read_item(item, with_masks=not self.random_mask)
                except BrokenSample as error:
                    self._skips.skip(str(item.image), str(error))
                    continue
                good += 1
                yield record
            if not self.repeat:
                return
            if not mine:
                logger.warning(
                    "No images for DataLoader worker %d of %d (more workers than images); it stops.", slot, total
                )
                return
            if good == 0:
                raise ValueError(f"None of the {len(mine)} images of this worker could be used; see the warnings.")
            epoch += 1
