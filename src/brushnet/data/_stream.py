"""What both training datasets share: splitting work across processes and DataLoader workers,
per-epoch orders, the shuffle buffer, and counting (and reporting) skipped samples."""

import io
import logging
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch

from ..arguments import check_choice
from ..masks import as_rgb
from .mask_mix import MASK_MIXES, parse_drawn_weights
from .transforms import training_sample

logger = logging.getLogger("brushnet.data")

# Salts keep the shared order stream and the per-worker streams apart.
_ORDER_SALT = 0x5A11
SAMPLE_SALT = 0xB7A5
BUFFER_SALT = 0xB0FF


class BrokenSample(ValueError):
    """A sample that cannot be used; it is skipped and counted, never fatal."""


@dataclass
class Record:
    """A decoded sample before augmentation: `training_sample`'s inputs."""

    key: str
    image: PIL.Image.Image
    caption: str
    # Flat column-major RLEs over the image (BrushData), or bool (H, W) keep arrays; [] = keep all.
    segmentation_masks: list = field(default_factory=list)
    # Optional: one caption per segmentation mask, and one of the background (see mask_mix).
    object_captions: list = field(default_factory=list)
    background_caption: str | None = None


def decode_image(data: bytes) -> PIL.Image.Image:
    """An RGB image from encoded bytes, upright per its EXIF orientation (as cv2.imdecode does)."""
    try:
        image = PIL.Image.open(io.BytesIO(data))
        image.load()
        return as_rgb(PIL.ImageOps.exif_transpose(image))
    except Exception as error:  # PIL raises many kinds of errors on bad data
        raise BrokenSample(f"undecodable image ({type(error).__name__}: {error})") from None


def worker_slot(rank: int, world_size: int) -> tuple[int, int]:
    """(index, count) of this DataLoader worker among all workers of all processes."""
    info = torch.utils.data.get_worker_info()
    worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return rank * workers + worker, world_size * workers


def check_split(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"Need 0 <= rank < world_size; got rank={rank}, world_size={world_size}.")


def epoch_order(count: int, seed: int, base_epoch: int, epoch: int, shuffle: bool = True) -> list[int]:
    """A permutation of range(count), the same in every process and worker for a given epoch."""
    if not shuffle:
        return list(range(count))
    return np.random.default_rng([seed, base_epoch, epoch, _ORDER_SALT]).permutation(count).tolist()


def worker_generator(seed: int, base_epoch: int, slot: int, salt: int) -> np.random.Generator:
    """A per-worker generator (augmentations: SAMPLE_SALT, shuffle buffer: BUFFER_SALT)."""
    return np.random.default_rng([seed, base_epoch, slot, salt])


def buffer_shuffle(items, size: int, rng: np.random.Generator):
    """Yield `items` in a random order using a buffer of `size` items (no shuffle when size <= 1)."""
    if size <= 1:
        yield from items
        return
    buffer = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        index = int(rng.integers(size))
        buffer[index], item = item, buffer[index]
        yield item
    while buffer:
        index = int(rng.integers(len(buffer)))
        buffer[index], buffer[-1] = buffer[-1], buffer[index]
        yield buffer.pop()


class SkipLog:
    """Counts skipped samples by reason and logs a warning for the first 10, then every 100th."""

    FIRST = 10
    EVERY = 100

    def __init__(self):
        self.count = 0
        self.reasons = Counter()
        self._once = set()

    def skip(self, where: str, reason: str) -> None:
        self.count += 1
        self.reasons[reason.split(" (")[0]] += 1
        if self.count <= self.FIRST or self.count % self.EVERY == 0:
            logger.warning(
                "Skipped sample %s: %s (%d skipped so far in this process/worker).", where, reason, self.count
            )

    def once(self, tag: str, message: str, *args) -> None:
        if tag not in self._once:
            self._once.add(tag)
            logger.warning(message, *args)


class RecordDataset(torch.utils.data.IterableDataset):
    """Both training datasets: common options, epochs, skip accounting, and the per-sample recipe
    applied to the decoded records that a subclass's `records()` yields."""

    def __init__(self, *, resolution: int, random_mask: bool, proportion_empty_prompts: float, seed: int,
                 repeat: bool, rank: int, world_size: int, mask_mix: str = "reference",
                 drawn_weights: str | None = None):
        super().__init__()
        check_split(rank, world_size)
        if resolution <= 0:
            raise ValueError(f"resolution must be positive; got {resolution}.")
        if not 0.0 <= proportion_empty_prompts <= 1.0:
            raise ValueError(f"proportion_empty_prompts must be in [0, 1]; got {proportion_empty_prompts}.")
        self.resolution = resolution
        self.random_mask = random_mask
        self.mask_mix = check_choice(mask_mix, MASK_MIXES, "mask_mix")
        self.drawn_weights = parse_drawn_weights(drawn_weights)
        self.proportion_empty_prompts = proportion_empty_prompts
        self.seed = seed
        self.repeat = repeat
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self._skips = SkipLog()

    @property
    def skipped(self) -> int:
        """Samples skipped so far by this process/worker's copy of the dataset."""
        return self._skips.count

    @property
    def skip_reasons(self):
        """A Counter of skipped samples by reason."""
        return self._skips.reasons

    def set_epoch(self, epoch: int) -> None:
        """Vary orders and augmentations between DataLoader passes (like DistributedSampler)."""
        self.epoch = epoch

    def records(self):
        raise NotImplementedError

    def __iter__(self):
        slot, _ = worker_slot(self.rank, self.world_size)
        rng = worker_generator(self.seed, self.epoch, slot, SAMPLE_SALT)
        for record in self.records():
            yield training_sample(
                record.image,
                None,
                record.caption,
                resolution=self.resolution,
                rng=rng,
                random_mask=self.random_mask,
                proportion_empty_prompts=self.proportion_empty_prompts,
                segmentation_masks=record.segmentation_masks,
                mask_mix=self.mask_mix,
                object_captions=record.object_captions,
                background_caption=record.background_caption,
                drawn_weights=self.drawn_weights,
            )
