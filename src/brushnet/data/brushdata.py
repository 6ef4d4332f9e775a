"""BrushData: the BrushNet training set as webdataset tar shards, streamed.

A sample is the group of consecutive tar members sharing a key (the member path up to the first
dot of its file name, webdataset's rule):

    {key}.image         encoded JPEG/PNG bytes (".jpg", ".jpeg", ".png", ".webp" are accepted too)
    {key}.caption       UTF-8 text (".txt" accepted too)
    {key}.height        decimal text, the image's height
    {key}.width         decimal text, the image's width
    {key}.segmentation  JSON {"mask": [rle, rle, ...], ...}: flat [start, length, ...] runs,
                        1-indexed, over height x width in column-major order; the object = 1

Other members (".aesthetic", ".json", ...) are ignored without being read.

Rules for incomplete samples: the image is required and must decode; height and width, when
present, must be integers equal to the decoded image's size (when absent, the image's size is
used); the segmentation is required unless `random_mask` (then it is not read), must be valid
JSON with a "mask" list, and every RLE must fit the image; an empty list means "keep everything",
as in the reference; a missing caption is "" (warned once per worker). Samples breaking a rule
are skipped, counted in `skipped` (per process and DataLoader worker) and logged.
"""

import glob
import json
import os
import re
import tarfile
from collections.abc import Iterator


from ..masks import check_rle
from .folder import hole_captions
from ._stream import (
    BUFFER_SALT,
    BrokenSample,
    Record,
    RecordDataset,
    buffer_shuffle,
    decode_image,
    epoch_order,
    logger,
    worker_generator,
    worker_slot,
)

IMAGE_FIELDS = ("image", "jpg", "jpeg", "png", "webp")
CAPTION_FIELDS = ("caption", "txt")
_READ_FIELDS = frozenset(IMAGE_FIELDS + CAPTION_FIELDS + ("height", "width", "segmentation"))


def resolve_shards(shards) -> list[str]:
    """Shard paths from a folder (its *.tar), a glob, a brace range "data-{000..009}.tar", or a list.

    Raises ValueError when nothing matches (a list, or a brace range, must name at least one
    existing file; the missing ones are skipped with a warning when read).
    """
    if isinstance(shards, (str, os.PathLike)):
        spec = os.fspath(shards)
        if os.path.isdir(spec):
            paths = sorted(glob.glob(os.path.join(glob.escape(spec), "*.tar")))
            if not paths:
                raise ValueError(f"No *.tar shards in the folder {spec}.")
            return paths
        expanded = _expand_braces(spec)
        if len(expanded) > 1:
            return _existing_list(expanded, spec)
        if any(c in spec for c in "*?["):
            paths = sorted(p for p in glob.glob(spec) if os.path.isfile(p))
            if not paths:
                raise ValueError(f"No shard files match {spec!r}.")
            return paths
        if not os.path.isfile(spec):
            raise ValueError(f"The shard file or folder {spec} does not exist.")
        return [spec]
    paths = [os.fspath(p) for p in shards]
    return _existing_list(paths, "the list of shards")


def _existing_list(paths: list[str], what: str) -> list[str]:
    if not any(os.path.isfile(p) for p in paths):
        raise ValueError(f"None of the {len(paths)} shard files of {what} exists.")
    return paths


def _expand_braces(spec: str) -> list[str]:
    """Expand the first "{a..b}" numeric range (zero padding kept), recursively."""
    match = re.search(r"\{(\d+)\.\.(\d+)\}", spec)
    if not match:
        return [spec]
    low, high = match.group(1), match.group(2)
    width = len(low) if low.startswith("0") else 0
    out = []
    for n in range(int(low), int(high) + 1):
        out.extend(_expand_braces(spec[: match.start()] + str(n).zfill(width) + spec[match.end() :]))
    return out


def split_member_name(name: str) -> tuple[str, str | None]:
    """(key, field) of a tar member name, webdataset's way: the field follows the first dot of the base name."""
    folder, _, base = name.rpartition("/")
    stem, dot, field = base.partition(".")
    if not dot or not stem:
        return name, None
    return (f"{folder}/{stem}" if folder else stem), field.lower()


class _StrictTarInfo(tarfile.TarInfo):
    """tarfile ends a stream quietly at a cut-off header; a shard must end with its end-of-archive blocks."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except (tarfile.TruncatedHeaderError, tarfile.EmptyHeaderError):
            raise tarfile.ReadError("truncated: the archive ends without its end-of-archive blocks") from None


class BrushDataShards(RecordDataset):
    """BrushData webdataset shards as a stream of BrushNet training samples.

    Each item is `training_sample`'s dict: pixel_values and conditioning_pixel_values (3, R, R)
    in [-1, 1], masks (1, R, R) with 1 = keep, and caption (a str; tokenize in the trainer).
    Batch with `brushnet.data.collate`.

    Streaming: shards are read member by member (never whole), in an order shuffled per epoch
    (the same order in every process and worker); a buffer of `shuffle_buffer` samples shuffles
    within and across shards. Shards are split between processes (`rank` of `world_size`) and then
    DataLoader workers; when there are fewer shards than workers in all, every worker reads all
    shards and keeps every n-th sample instead (slower; write more shards). With `repeat` the
    stream never ends (a new shard order each pass); without it, one pass. Note that without
    `repeat` processes may get different numbers of samples.

    Randomness: shard orders from (seed, epoch); the buffer and the augmentations from one
    generator per worker seeded with (seed, set_epoch's epoch, rank, worker): a run is reproducible
    for a given seed, world size and number of workers.
    """

    def __init__(
        self,
        shards,
        *,
        resolution: int = 512,
        random_mask: bool = False,
        mask_mix: str = "reference",
        drawn_weights: str | None = None,
        proportion_empty_prompts: float = 0.0,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        repeat: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ):
        super().__init__(resolution=resolution, random_mask=random_mask, proportion_empty_prompts=proportion_empty_prompts,
                         seed=seed, repeat=repeat, rank=rank, world_size=world_size,
                         mask_mix=mask_mix, drawn_weights=drawn_weights)
        self.shards = resolve_shards(shards)
        self.shuffle_buffer = shuffle_buffer
        self.unreadable_shards = 0
        self._warned_shards = set()

    def records(self) -> Iterator[Record]:
        """This worker's samples decoded but not augmented, in the shuffled stream order."""
        slot, total = worker_slot(self.rank, self.world_size)
        rng = worker_generator(self.seed, self.epoch, slot, BUFFER_SALT)
        consecutive = 0
        for key, fields, path in buffer_shuffle(self._raw_samples(slot, total), self.shuffle_buffer, rng):
            try:
                record = self.decode(key, fields)
            except BrokenSample as error:
                self._skips.skip(f"{key!r} of {path}", str(error))
                consecutive += 1
                self._check_not_all_broken(consecutive)
                continue
            consecutive = 0
            yield record

    def _check_not_all_broken(self, consecutive: int) -> None:
        # Only a stream of broken samples could go on this long without one good sample.
        limit = 10 * max(self.shuffle_buffer, 1) + 2 * getattr(self, "_epoch_samples", 10**9) + 100
        if self.repeat and consecutive > limit:
            raise ValueError(
                f"The last {consecutive} samples were all broken; check the shards "
                f"(reasons so far: {dict(self._skips.reasons)})."
            )

    def _raw_samples(self, slot: int, total: int):
        """(key, fields, shard) of this worker's samples, pass after pass when `repeat`."""
        epoch = 0
        while True:
            order = [self.shards[i] for i in epoch_order(len(self.shards), self.seed, self.epoch, epoch)]
            if len(order) >= total:
                mine, stride = order[slot::total], 1
            else:
                mine, stride = order, total
                if epoch == 0:
                    self._skips.once(
                        "few shards",
                        "Only %d shard(s) for %d workers in all: every worker reads every shard and keeps "
                        "every %d-th sample. Write more shards than workers to avoid the extra reading.",
                        len(order),
                        total,
                        total,
                    )
            count = index = readable = 0
            for path in mine:
                shard = self._read_shard(path)
                read_from_it = 0
                while True:
                    try:
                        key, fields = next(shard)
                    except StopIteration as done:
                        # a truncated shard whose first samples were read counts: they train
                        readable += bool(done.value) or read_from_it > 0
                        break
                    read_from_it += 1
                    index += 1
                    if stride > 1 and (index - 1) % stride != slot:
                        continue
                    count += 1
                    yield key, fields, path
            self._epoch_samples = count
            if not self.repeat:
                return
            if readable == 0:
                raise ValueError(f"None of the {len(mine)} shard(s) of this worker could be read; see the warnings.")
            if count == 0:
                logger.warning(
                    "No samples for DataLoader worker %d of %d (too few samples for the workers); it stops.",
                    slot,
                    total,
                )
                return
            epoch += 1

    def _read_shard(self, path: str):
        """Yield (key, fields) per sample of one shard; return whether the whole shard could be read."""
        key, fields = None, {}
        try:
            with open(path, "rb") as stream, tarfile.open(fileobj=stream, mode="r|*", tarinfo=_StrictTarInfo) as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    member_key, field = split_member_name(member.name)
                    if field is None:
                        continue
                    if member_key != key:
                        if key is not None:
                            yield key, fields
                        key, fields = member_key, {}
                    if field in _READ_FIELDS:
                        fields[field] = tar.extractfile(member).read()
                if key is not None:
                    yield key, fields
            return True
        except Exception as error:  # a missing, truncated or corrupt shard must not end the run
            if path in self._warned_shards:  # told once, not again on every pass over the data
                return False
            self._warned_shards.add(path)
            self.unreadable_shards += 1
            logger.warning(
                "Could not read the shard %s (%s: %s); %s. %d unreadable shard(s) so far in this process/worker.",
                path,
                type(error).__name__,
                error,
                "skipping it" if key is None else f"skipping the rest of it after {key!r}",
                self.unreadable_shards,
            )
            return False

    def decode(self, key: str, fields: dict[str, bytes]) -> Record:
        """A Record from a sample's raw fields; raises BrokenSample when a rule is broken."""
        data = next((fields[f] for f in IMAGE_FIELDS if f in fields), None)
        if data is None:
            raise BrokenSample("missing image")
        image = decode_image(data)
        height, width = image.height, image.width
        declared = (_int_field(fields, "height"), _int_field(fields, "width"))
        if declared[0] is not None and declared[0] != height or declared[1] is not None and declared[1] != width:
            raise BrokenSample(
                f"height/width do not match the image (declared {declared[0]}x{declared[1]}, decoded {height}x{width})"
            )
        raw_caption = next((fields[f] for f in CAPTION_FIELDS if f in fields), None)
        if raw_caption is None:
            self._skips.once("no caption", "Sample %r has no caption; training it (and others like it) with \"\".", key)
            caption = ""
        else:
            try:
                caption = raw_caption.decode("utf-8")
            except UnicodeDecodeError:
                raise BrokenSample("caption is not UTF-8") from None
        segmentation = None if self.random_mask else _segmentation(fields, height, width)
        masks = [] if segmentation is None else segmentation["mask"]
        object_captions, background_caption = hole_captions(segmentation, len(masks))
        return Record(key=key, image=image, caption=caption, segmentation_masks=masks,
                      object_captions=object_captions, background_caption=background_caption)


def _int_field(fields: dict[str, bytes], name: str) -> int | None:
    if name not in fields:
        return None
    try:
        return int(fields[name].decode("utf-8").strip())
    except (UnicodeDecodeError, ValueError):
        raise BrokenSample(f"{name} is not an integer ({fields[name][:20]!r})") from None


def _segmentation(fields: dict[str, bytes], height: int, width: int) -> dict:
    if "segmentation" not in fields:
        raise BrokenSample("missing segmentation")
    try:
        segmentation = json.loads(fields["segmentation"])
    except (ValueError, UnicodeDecodeError) as error:
        raise BrokenSample(f"bad segmentation JSON ({error})") from None
    if not isinstance(segmentation, dict) or not isinstance(segmentation.get("mask"), list):
        raise BrokenSample('segmentation JSON has no "mask" list')
    for rle in segmentation["mask"]:
        try:
            check_rle(rle, height, width)
        except (ValueError, TypeError) as error:
            raise BrokenSample(f"bad RLE ({error})") from None
    return segmentation
