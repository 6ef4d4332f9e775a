"""Pack a training folder (see `brushnet.data.folder`) into BrushData webdataset shards."""

import io
import json
import os
import re
import tarfile
from pathlib import Path

import numpy as np
import PIL.Image

from ..masks import rle_encode
from ._stream import BrokenSample, logger
from .folder import list_folder, read_item

_REUSED_FORMATS = ("JPEG", "PNG")


def _shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:05d}.tar"


def _existing_shards(out_dir: Path, prefix: str) -> list[Path]:
    pattern = re.compile(re.escape(prefix) + r"-\d{5,}\.tar")
    return sorted(p for p in out_dir.iterdir() if pattern.fullmatch(p.name)) if out_dir.is_dir() else []


def pack_folder(
    folder, out_dir, *, shard_size: int = 1000, prefix: str = "brushdata", overwrite: bool = False
) -> list[Path]:
    """Write the images of `folder` as BrushData shards `{prefix}-00000.tar`, ... in `out_dir`.

    Per image, members `{key}.image` (the file's bytes as they are for JPEG and PNG, else the
    decoded image re-encoded as PNG), `.caption`, `.height`, `.width` (of the image as decoded,
    EXIF orientation applied), `.segmentation` (JSON {"mask": [rle, ...]}: the JSON's RLEs as
    given, or one column-major RLE of the mask PNG's KEPT region, 1 - hole, so that reading the
    shards gives exactly what `ImageFolderDataset` gives) and `.json` ({"source": file name}).
    Keys are running numbers. Images that cannot be used are skipped with a warning.

    Each shard is written to a temporary file; all are renamed into place once the set is complete. Existing `{prefix}-*.tar`
    shards make this raise FileExistsError unless `overwrite`, which also deletes those of the old
    set that the new one does not replace. Returns the paths of the shards written.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1; got {shard_size}.")
    if not prefix or "/" in prefix or os.sep in prefix:
        raise ValueError(f"prefix must be a plain file name prefix; got {prefix!r}.")
    out_dir = Path(out_dir)
    if out_dir.exists() and out_dir.resolve() == Path(folder).resolve():
        # Training on the folder then found shards beside its images and refused it.
        raise ValueError(f"{out_dir} is the image folder itself: write the shards to another folder.")
    items = list_folder(folder)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir} is a file: the shards need a folder (an existing one, or a new name).")
    existing = _existing_shards(out_dir, prefix)
    if existing and not overwrite:
        raise FileExistsError(
            f"{out_dir} already holds {len(existing)} shard(s) named {prefix}-*.tar; "
            "pass --overwrite (overwrite=True) to replace them or choose another folder or prefix."
        )
    out_dir.mkdir(parents=True, exist_ok=True)

    # Every shard stays a hidden temporary file until the whole set is written: an interrupted pack
    # leaves no half a set under the names training reads (it would train on part of the data).
    finished: list[_ShardWriter] = []
    writer = None
    count = skipped = 0
    complete = False
    try:
        for item in items:
            try:
                members = _sample_members(item)
            except BrokenSample as error:
                skipped += 1
                logger.warning("Not packing %s: %s.", item.image, error)
                continue
            if writer is None:
                writer = _ShardWriter(out_dir / _shard_name(prefix, len(finished)))
            key = f"{count:09d}"
            for field, data in members:
                writer.add(f"{key}.{field}", data)
            count += 1
            if count % shard_size == 0:
                writer.close()
                finished.append(writer)
                writer = None
        if writer is not None:
            writer.close()
            finished.append(writer)
            writer = None
        complete = True
    finally:
        if writer is not None:
            writer.abort()
        if not complete:
            for done in finished:
                done.temp.unlink(missing_ok=True)
    written = [done.publish() for done in finished]
    if not written:
        raise ValueError(f"No image of {folder} could be packed ({skipped} skipped); see the warnings.")
    for stale in set(existing) - set(written):
        stale.unlink()
    logger.info("Packed %d images into %d shard(s) in %s (%d skipped).", count, len(written), out_dir, skipped)
    return written


def _sample_members(item) -> list[tuple[str, bytes]]:
    record = read_item(item)
    try:
        data = item.image.read_bytes()
        source_format = PIL.Image.open(io.BytesIO(data)).format
    except Exception as error:
        raise BrokenSample(f"unreadable image ({error})") from None
    if source_format not in _REUSED_FORMATS:
        buffer = io.BytesIO()
        record.image.save(buffer, format="PNG")
        data = buffer.getvalue()
    masks = [
        rle_encode(m, order="F") if isinstance(m, np.ndarray) else [int(v) for v in m]
        for m in record.segmentation_masks
    ]
    return [
        ("image", data),
        ("caption", record.caption.encode("utf-8")),
        ("height", str(record.image.height).encode()),
        ("width", str(record.image.width).encode()),
        ("segmentation", json.dumps(_segmentation_json(masks, record), separators=(",", ":")).encode()),
        ("json", json.dumps({"source": item.image.name}).encode()),
    ]


class _ShardWriter:
    """A tar shard written to a temporary file in the same folder, renamed into place by `publish`."""

    def __init__(self, path: Path):
        self.path = path
        self.temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        self.file = open(self.temp, "wb")
        self.tar = tarfile.open(fileobj=self.file, mode="w", format=tarfile.PAX_FORMAT)

    def add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mode = 0o644
        info.mtime = 0  # reproducible shards
        self.tar.addfile(info, io.BytesIO(data))

    def close(self) -> None:
        self.tar.close()
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()

    def publish(self) -> Path:
        os.replace(self.temp, self.path)
        return self.path

    def abort(self) -> None:
        try:
            self.tar.close()
        finally:
            self.file.close()
            self.temp.unlink(missing_ok=True)


def _segmentation_json(masks: list, record) -> dict:
    """The shard's segmentation member: the masks, and the folder's per-object captions and
    background caption where it has them (--mask_mix drawn trains on those; dropped, the shards
    trained otherwise than the folder)."""
    segmentation = {"mask": masks}
    if record.object_captions:
        segmentation["captions"] = list(record.object_captions)
    if record.background_caption:
        segmentation["background_caption"] = record.background_caption
    return segmentation
