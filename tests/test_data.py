"""Training data: the per-sample recipe, BrushData shards, image folders and packing."""

import io
import json
import logging
import tarfile
from collections import Counter
from itertools import islice

import numpy as np
import pytest
import torch
from PIL import Image

from brushnet.data import BrushDataShards, ImageFolderDataset, collate, pack_folder, training_sample
from brushnet.data import transforms as T
from brushnet.data._stream import SkipLog
from brushnet.masks import rle_decode

H, W = 24, 32  # test images are 24 rows x 32 columns


def _pixels(index: int, height: int = H, width: int = W) -> np.ndarray:
    """A distinct smooth image per index, values well inside 0-255."""
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 6 + index * 7, y * 8 + index * 3, (x + y) * 3 + index * 11], -1)
    return (20 + base % 200).astype(np.uint8)


def _encode(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buffer.getvalue()


# Column-major RLEs over 24 x 32: the first 8 columns, and 4 columns starting at column 16.
SEGMENTATION = {"mask": [[1, H * 8], [H * 16 + 1, H * 4]], "other": 1}


def _sample(index: int, fmt: str = "PNG", **changes) -> dict[str, bytes]:
    fields = {
        "image": _encode(_pixels(index), fmt),
        "caption": f"caption {index}".encode(),
        "height": str(H).encode(),
        "width": str(W).encode(),
        "segmentation": json.dumps(SEGMENTATION).encode(),
        "aesthetic": b"5.5",
    }
    for name, value in changes.items():
        if value is None:
            fields.pop(name)
        else:
            fields[name] = value
    return fields


def _write_shard(path, samples: dict[str, dict[str, bytes]]):
    with tarfile.open(path, "w") as tar:
        for key, fields in samples.items():
            for field, data in fields.items():
                info = tarfile.TarInfo(f"{key}.{field}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def shards(tmp_path):
    """3 shards x 4 good samples; captions 'caption 0' .. 'caption 11'."""
    folder = tmp_path / "shards"
    folder.mkdir()
    for s in range(3):
        samples = {f"s{s}k{i:03d}": _sample(4 * s + i, "JPEG" if i % 2 else "PNG") for i in range(4)}
        _write_shard(folder / f"brushdata-{s:05d}.tar", samples)
    return folder


ALL_CAPTIONS = {f"caption {i}" for i in range(12)}


def _captions(dataset, limit=None):
    return [sample["caption"] for sample in islice(iter(dataset), limit)]


# --------------------------------------------------------------------------------- the recipe


def _image(index=0, height=H, width=W):
    return Image.fromarray(_pixels(index, height, width))


def test_training_sample_shapes_and_ranges():
    rng = np.random.default_rng(0)
    for seed in range(20):
        sample = training_sample(
            _image(seed), None, "a cat", resolution=16, rng=rng, segmentation_masks=SEGMENTATION["mask"]
        )
        assert set(sample) == {"pixel_values", "conditioning_pixel_values", "masks", "caption", "original_size",
                               "crop_top_left"}
        assert sample["original_size"] == (H, W)
        top, left = sample["crop_top_left"]
        assert 0 <= top <= T.resized_shape(H, W, 16)[0] - 16 and 0 <= left <= T.resized_shape(H, W, 16)[1] - 16
        assert sample["pixel_values"].shape == (3, 16, 16) and sample["pixel_values"].dtype == torch.float32
        assert sample["conditioning_pixel_values"].shape == (3, 16, 16)
        assert sample["masks"].shape == (1, 16, 16) and sample["masks"].dtype == torch.float32
        for key in ("pixel_values", "conditioning_pixel_values"):
            assert sample[key].min() >= -1 and sample[key].max() <= 1
        # A segmentation mask is uint8 in the reference: still exactly 0/1 after the bicubic resize.
        assert set(sample["masks"].unique().tolist()) <= {0.0, 1.0}
        assert sample["caption"] == "a cat"


def test_resized_shape_short_side_and_ceil():
    assert T.resized_shape(24, 32, 16) == (16, 22)  # 32 * 16 / 24 = 21.3 -> 22
    assert T.resized_shape(32, 24, 16) == (22, 16)
    assert T.resized_shape(768, 1024, 512) == (512, 683)
    assert T.resized_shape(512, 512, 512) == (512, 512)
    assert T.resized_shape(333, 1000, 512) == (512, 1538)  # 1537.5 -> 1538
    for short in range(100, 700, 7):
        assert min(T.resized_shape(short, 1001, 512)) == 512


@pytest.mark.parametrize("random_mask", [False, True])
def test_masked_image_is_black_exactly_in_the_hole(random_mask):
    # resolution = the shorter side: no resampling, only the crop, so the relation must be exact.
    rng = np.random.default_rng(1)
    height, width = 40, 56
    for seed in range(30):
        image = _image(seed, height, width)
        keep = np.random.default_rng(seed).random((height, width)) < 0.6
        sample = training_sample(image, keep, "", resolution=40, rng=rng, random_mask=random_mask)
        mask = sample["masks"][0]
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
        hole = mask == 0
        cond, pixels = sample["conditioning_pixel_values"], sample["pixel_values"]
        assert torch.all(cond[:, hole] == -1)
        assert torch.equal(cond[:, ~hole], pixels[:, ~hole])
        assert torch.all(pixels > -1)  # the image itself is never black here
        # The crop is a window of the original image.
        original = torch.from_numpy(_pixels(seed, height, width)).permute(2, 0, 1).float() / 127.5 - 1
        offsets = [o for o in range(width - 40 + 1) if torch.equal(original[:, :, o : o + 40], pixels)]
        assert len(offsets) == 1


def _half_plane_outcomes(n, rng, **kwargs):
    """(inverted, opened) per sample for keep = left half of a 32x32 image, no resize, no crop.

    The opening moves the edge of a half plane by one column (OpenCV's even-kernel anchor), so the
    kept width tells whether it ran: 16 or 17 columns kept (not inverted), 16 or 15 (inverted).
    """
    keep = np.zeros((32, 32), bool)
    keep[:, :16] = True
    outcomes = []
    for _ in range(n):
        mask = training_sample(_image(0, 32, 32), keep, "", resolution=32, rng=rng, **kwargs)["masks"][0]
        inverted = mask[0, 0].item() == 0
        kept_columns = int(mask[0].sum().item())
        assert kept_columns in ((15, 16) if inverted else (16, 17))
        opened = kept_columns == (15 if inverted else 17)
        outcomes.append((inverted, opened))
    return np.array(outcomes)


def test_inversion_and_opening_probabilities():
    assert T.OPENING_PROBABILITY == 0.3 and T.INVERSION_PROBABILITY == 0.5
    outcomes = _half_plane_outcomes(1000, np.random.default_rng(5))
    inverted, opened = outcomes.mean(axis=0)
    # Binomial standard errors for n = 1000: 0.016 and 0.0145.
    assert 0.44 < inverted < 0.56
    assert 0.24 < opened < 0.36
    # Independent of each other.
    both = (outcomes[:, 0] & outcomes[:, 1]).mean()
    assert abs(both - inverted * opened) < 0.05


def test_opening_matches_opencv():
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(0)
    kernel = np.ones((8, 8), np.uint8)
    for trial in range(20):
        shape = (int(rng.integers(5, 60)), int(rng.integers(5, 60)))
        # Blobs of various sizes, touching the borders.
        small = rng.random((shape[0] // 4 + 1, shape[1] // 4 + 1)) < rng.uniform(0.2, 0.8)
        mask = np.kron(small, np.ones((4, 4), bool))[: shape[0], : shape[1]] ^ (rng.random(shape) < 0.02)
        expected = cv2.dilate(cv2.erode(mask.astype(np.uint8), kernel, iterations=1), kernel, iterations=1) > 0
        np.testing.assert_array_equal(T.open_mask(mask), expected)
    assert T.open_mask(np.ones((3, 3), bool)).all()  # the border never erodes


def test_resize_matches_opencv_inter_cubic():
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(0)
    for height, width, resolution in [(24, 32, 40), (48, 64, 20), (37, 29, 16)]:
        image = rng.integers(0, 256, (height, width, 3)).astype(np.uint8)
        keep = rng.random((height, width)) < 0.5
        masked = T.apply_keep(image, keep)
        out_h, out_w = T.resized_shape(height, width, resolution)
        resized = T.resize_short_side(image, masked, keep, resolution)
        image_r, masked_r, keep_r = T.quantize_like_reference(*resized, soft=False)
        assert image_r.shape == masked_r.shape == (3, out_h, out_w) and keep_r.shape == (out_h, out_w)
        cv_image = cv2.resize(image, (out_w, out_h), interpolation=cv2.INTER_CUBIC).transpose(2, 0, 1)
        cv_masked = cv2.resize(masked, (out_w, out_h), interpolation=cv2.INTER_CUBIC).transpose(2, 0, 1)
        cv_keep = cv2.resize(keep.astype(np.uint8), (out_w, out_h), interpolation=cv2.INTER_CUBIC)
        assert np.abs(image_r - cv_image).max() <= 1  # cv2 uses fixed-point weights for uint8
        assert np.abs(masked_r - cv_masked).max() <= 1
        assert np.mean(keep_r != cv_keep) < 0.01
        # The reference's random-brush mask is float32: soft values with overshoot, like cv2's.
        _, _, soft_keep = T.quantize_like_reference(*resized, soft=True)
        cv_soft = cv2.resize(keep.astype(np.float32), (out_w, out_h), interpolation=cv2.INTER_CUBIC)
        assert np.abs(soft_keep - cv_soft).max() < 1e-4
        assert soft_keep.min() < 0 and soft_keep.max() > 1


def test_random_mask_samples_are_soft_after_resize_unless_opened():
    rng = np.random.default_rng(3)
    soft = 0
    for _ in range(40):
        mask = training_sample(_image(0, 200, 200), None, "", resolution=120, rng=rng, random_mask=True)["masks"]
        soft += not set(mask.unique().tolist()) <= {0.0, 1.0}
    assert 10 < soft < 40  # neither all opened nor never soft


def test_captions_and_empty_prompts():
    rng = np.random.default_rng(0)
    image = _image(0, 16, 16)
    kwargs = dict(resolution=16, rng=rng)
    assert all(training_sample(image, None, "x", **kwargs)["caption"] == "x" for _ in range(50))
    assert all(
        training_sample(image, None, "x", proportion_empty_prompts=1.0, **kwargs)["caption"] == "" for _ in range(50)
    )
    empty = np.mean(
        [training_sample(image, None, "x", proportion_empty_prompts=0.3, **kwargs)["caption"] == "" for _ in range(600)]
    )
    assert 0.24 < empty < 0.36
    picked = Counter(training_sample(image, None, ["a", "b", "c"], **kwargs)["caption"] for _ in range(300))
    assert set(picked) == {"a", "b", "c"} and min(picked.values()) > 60
    with pytest.raises(ValueError):
        training_sample(image, None, 3, **kwargs)
    with pytest.raises(ValueError):
        training_sample(image, None, "x", proportion_empty_prompts=1.5, **kwargs)


def test_training_sample_is_reproducible_and_needs_an_explicit_rng():
    def run(seed):
        rng = np.random.default_rng(seed)
        return [
            training_sample(_image(i, 40, 60), None, "c", resolution=24, rng=rng, random_mask=True) for i in range(5)
        ]

    a, b, c = run(1), run(1), run(2)
    for x, y in zip(a, b):
        for key in ("pixel_values", "conditioning_pixel_values", "masks"):
            assert torch.equal(x[key], y[key])
    assert any(not torch.equal(x["masks"], y["masks"]) for x, y in zip(a, c))
    with pytest.raises(ValueError, match="explicit"):
        training_sample(_image(), None, "c", resolution=16, rng=None)
    with pytest.raises(ValueError, match="keep"):
        training_sample(_image(), np.ones((5, 5)), "c", resolution=16, rng=0)


def test_mask_choice():
    rng = np.random.default_rng(0)
    masks = SEGMENTATION["mask"]
    chosen = Counter()
    for _ in range(200):
        keep, soft = T.choose_keep(H, W, rng, segmentation_masks=masks)
        assert not soft
        chosen[int(keep.sum())] += 1
    assert set(chosen) == {H * 8, H * 4} and min(chosen.values()) > 60  # the object is kept
    np.testing.assert_array_equal(T.choose_keep(H, W, rng, segmentation_masks=[])[0], np.ones((H, W), bool))
    np.testing.assert_array_equal(T.choose_keep(H, W, rng)[0], np.ones((H, W), bool))
    keep, soft = T.choose_keep(H, W, rng, random_mask=True, segmentation_masks=masks)
    assert soft and keep.shape == (H, W)
    array = np.zeros((H, W), bool)
    array[3:5] = True
    np.testing.assert_array_equal(T.choose_keep(H, W, rng, segmentation_masks=[array])[0], array)


def test_collate():
    rng = np.random.default_rng(0)
    examples = [training_sample(_image(i), None, f"c{i}", resolution=16, rng=rng) for i in range(3)]
    batch = collate(examples)
    assert batch["pixel_values"].shape == (3, 3, 16, 16)
    assert batch["masks"].shape == (3, 1, 16, 16)
    assert batch["caption"] == ["c0", "c1", "c2"]
    assert batch["pixel_values"].is_contiguous()


# --------------------------------------------------------------------------------- BrushData shards


def test_shards_one_pass_each_sample_once(shards):
    dataset = BrushDataShards(shards, resolution=16, repeat=False, shuffle_buffer=5)
    samples = list(dataset)
    assert sorted(s["caption"] for s in samples) == sorted(ALL_CAPTIONS)
    assert dataset.skipped == 0
    for s in samples:
        assert s["pixel_values"].shape == (3, 16, 16)
        assert s["masks"].shape == (1, 16, 16)


def test_shards_specs(shards, tmp_path):
    files = sorted(str(p) for p in shards.glob("*.tar"))
    assert BrushDataShards(shards).shards == files
    assert BrushDataShards(str(shards / "*.tar")).shards == files
    assert BrushDataShards(files[:2]).shards == files[:2]
    assert BrushDataShards(str(shards / "brushdata-{00000..00002}.tar")).shards == files
    assert BrushDataShards(files[0]).shards == files[:1]
    (tmp_path / "empty").mkdir()
    for bad in (tmp_path / "empty", str(tmp_path / "*.tar"), [str(tmp_path / "nope.tar")], tmp_path / "nope.tar"):
        with pytest.raises(ValueError):
            BrushDataShards(bad)
    with pytest.raises(ValueError):
        BrushDataShards(shards, rank=2, world_size=2)


def test_shards_shuffle_depends_on_seed(shards):
    def order(seed):
        return _captions(BrushDataShards(shards, resolution=16, repeat=False, seed=seed, shuffle_buffer=6))

    assert order(0) == order(0)
    dataset = BrushDataShards(shards, resolution=16, repeat=False, seed=0, shuffle_buffer=6)
    dataset.set_epoch(1)
    assert _captions(dataset) != order(0)
    orders = {tuple(order(seed)) for seed in range(4)}
    assert len(orders) == 4
    assert all(set(o) == ALL_CAPTIONS for o in orders)
    unshuffled = _captions(BrushDataShards(shards, resolution=16, repeat=False, seed=0, shuffle_buffer=0))
    # Without the buffer, samples come shard by shard (in a shuffled shard order), in tar order within a shard.
    indices = [int(c.split()[1]) for c in unshuffled]
    blocks = [indices[i : i + 4] for i in range(0, 12, 4)]
    assert all(block == list(range(block[0], block[0] + 4)) and block[0] % 4 == 0 for block in blocks)
    assert set(unshuffled) == ALL_CAPTIONS


@pytest.mark.parametrize("world_size", [2, 3, 5])
def test_shards_split_across_ranks(shards, world_size):
    per_rank = [
        _captions(BrushDataShards(shards, resolution=16, repeat=False, rank=r, world_size=world_size, seed=3))
        for r in range(world_size)
    ]
    merged = [c for captions in per_rank for c in captions]
    assert len(merged) == len(set(merged)) == 12
    assert set(merged) == ALL_CAPTIONS
    assert all(per_rank)  # with 5 ranks (> 3 shards) every rank still gets samples


@pytest.mark.parametrize("world_size", [1, 2])
def test_shards_dataloader_workers(shards, world_size):
    seen = []
    for rank in range(world_size):
        dataset = BrushDataShards(shards, resolution=16, repeat=False, rank=rank, world_size=world_size)
        loader = torch.utils.data.DataLoader(dataset, batch_size=3, num_workers=2, collate_fn=collate)
        for batch in loader:
            assert batch["pixel_values"].shape[1:] == (3, 16, 16)
            seen += batch["caption"]
    assert len(seen) == len(set(seen)) == 12 and set(seen) == ALL_CAPTIONS


def test_shards_repeat_forever(shards):
    captions = _captions(BrushDataShards(shards, resolution=16, shuffle_buffer=4), 40)
    counts = Counter(captions)
    assert set(counts) == ALL_CAPTIONS and min(counts.values()) >= 2
    stream = _captions(BrushDataShards(shards, resolution=16, shuffle_buffer=0), 60)
    passes = [tuple(stream[i : i + 12]) for i in range(0, 60, 12)]
    assert all(set(p) == ALL_CAPTIONS for p in passes)
    assert len(set(passes)) > 1  # a new shard order each pass


def test_shards_skip_and_count_broken_samples(tmp_path, caplog):
    samples = {
        "good0": _sample(0),
        "badjpeg": _sample(1, image=b"\xff\xd8\xff\xe0 not a jpeg"),
        "noimage": _sample(2, image=None),
        "badjson": _sample(3, segmentation=b"{not json"),
        "nomaskkey": _sample(4, segmentation=b'{"masks": []}'),
        "wrongheight": _sample(5, height=b"25"),
        "badwidth": _sample(6, width=b"wide"),
        "rleout": _sample(7, segmentation=json.dumps({"mask": [[H * W, 2]]}).encode()),
        "nosegmentation": _sample(8, segmentation=None),
        "nocaption": _sample(9, caption=None),
        "nosize": _sample(10, height=None, width=None),
        "emptymasks": _sample(11, segmentation=b'{"mask": []}'),
        "onlyjson": {"json": b"{}"},
    }
    path = _write_shard(tmp_path / "mixed.tar", samples)
    dataset = BrushDataShards(path, resolution=16, repeat=False, shuffle_buffer=0)
    with caplog.at_level(logging.WARNING, logger="brushnet.data"):
        records = list(dataset.records())
    assert [r.key for r in records] == ["good0", "nocaption", "nosize", "emptymasks"]
    assert records[1].caption == ""
    assert records[3].segmentation_masks == []
    assert dataset.skipped == 9
    assert dataset.skip_reasons == Counter(
        {
            "undecodable image": 1,
            "missing image": 2,
            "bad segmentation JSON": 1,
            'segmentation JSON has no "mask" list': 1,
            "height/width do not match the image": 1,
            "width is not an integer": 1,
            "bad RLE": 1,
            "missing segmentation": 1,
        }
    )
    skipped_logs = [r.getMessage() for r in caplog.records if "Skipped sample" in r.getMessage()]
    assert len(skipped_logs) == 9 and "9 skipped so far" in skipped_logs[-1]
    assert "'badjpeg'" in skipped_logs[0] and "undecodable image" in skipped_logs[0]
    assert any("no caption" in r.getMessage() for r in caplog.records)
    # With random masks the segmentation is not needed (nor read).
    dataset = BrushDataShards(path, resolution=16, repeat=False, shuffle_buffer=0, random_mask=True)
    keys = [r.key for r in dataset.records()]
    assert keys == ["good0", "badjson", "nomaskkey", "rleout", "nosegmentation", "nocaption", "nosize", "emptymasks"]
    assert dataset.skipped == 5
    # Samples go through the recipe too.
    assert len(list(BrushDataShards(path, resolution=16, repeat=False))) == 4


def test_shards_missing_and_truncated_files(shards, tmp_path, caplog):
    files = sorted(shards.glob("*.tar"))
    data = files[0].read_bytes()
    with tarfile.open(files[0]) as tar:
        third = [m for m in tar.getmembers() if m.name.startswith("s0k002.")]
    # Cut inside the third sample's image data, inside its caption's header, and right after its last member.
    cuts = {"data": third[0].offset_data + 10, "header": third[1].offset + 100}
    cuts["boundary"] = third[-1].offset_data + -(-third[-1].size // 512) * 512
    for name, cut in cuts.items():
        truncated = tmp_path / f"truncated-{name}.tar"
        truncated.write_bytes(data[:cut])
        listed = [truncated, tmp_path / "missing.tar", files[1]]
        dataset = BrushDataShards(listed, resolution=16, repeat=False, shuffle_buffer=0)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="brushnet.data"):
            captions = _captions(dataset)
        assert dataset.unreadable_shards == 2, name
        # The good shard, and the samples complete before the cut (the cut one is dropped).
        assert sorted(captions) == sorted({f"caption {i}" for i in (0, 1, 4, 5, 6, 7)}), name
        assert dataset.skipped == 0
        messages = " ".join(r.getMessage() for r in caplog.records)
        assert "missing.tar" in messages and f"truncated-{name}.tar" in messages


def test_shards_all_broken_with_repeat_raises_instead_of_spinning(tmp_path):
    path = _write_shard(tmp_path / "bad.tar", {f"k{i}": _sample(i, image=b"junk") for i in range(3)})
    dataset = BrushDataShards(path, resolution=16, shuffle_buffer=2)
    logging.getLogger("brushnet.data").setLevel(logging.ERROR)
    try:
        with pytest.raises(ValueError, match="all broken"):
            next(iter(dataset))
    finally:
        logging.getLogger("brushnet.data").setLevel(logging.NOTSET)
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"\x01" * 3000)
    with pytest.raises(ValueError, match="could be read"):
        next(iter(BrushDataShards([garbage, tmp_path / "gone.tar"], resolution=16)))


def test_skip_log_rate_limit(caplog):
    log = SkipLog()
    with caplog.at_level(logging.WARNING, logger="brushnet.data"):
        for i in range(250):
            log.skip(f"k{i}", "missing image")
    assert log.count == 250
    assert len(caplog.records) == 12  # the first 10, then the 100th and the 200th


def test_shards_keep_masks_decode_column_major(shards):
    dataset = BrushDataShards(shards, resolution=16, repeat=False, shuffle_buffer=0)
    record = next(dataset.records())
    assert record.image.size == (W, H)
    assert record.segmentation_masks == SEGMENTATION["mask"]
    first = rle_decode(record.segmentation_masks[0], H, W)
    assert first[:, :8].all() and not first[:, 8:].any()


# --------------------------------------------------------------------------------- image folders


@pytest.fixture
def folder(tmp_path):
    """Five images: mask PNG (2), segmentation JSON (1), nothing (2, one without a caption)."""
    root = tmp_path / "custom"
    (root / "masks").mkdir(parents=True)
    for i, (name, fmt) in enumerate([("a", "PNG"), ("b", "JPEG"), ("c", "PNG"), ("d", "WEBP"), ("e", "JPEG")]):
        ext = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp"}[fmt]
        (root / f"{name}{ext}").write_bytes(_encode(_pixels(i), fmt))
        if name != "e":  # b's caption as Windows' Notepad saves it: a BOM and CRLF
            (root / f"{name}.txt").write_text(f"caption {name}\r\n" if name == "b" else f"caption {name}\n",
                                              encoding="utf-8-sig" if name == "b" else "utf-8", newline="")
    hole = np.zeros((H, W), np.uint8)
    hole[5:15, 10:20] = 255  # white = hole
    Image.fromarray(hole).save(root / "masks" / "a.png")
    Image.fromarray(255 - hole).convert("RGB").save(root / "masks" / "b.png")
    (root / "c.json").write_text(json.dumps(SEGMENTATION), encoding="utf-8-sig")
    (root / "notes.md").write_text("not an image")
    return root


def test_folder_records(folder, caplog):
    with caplog.at_level(logging.WARNING, logger="brushnet.data"):
        dataset = ImageFolderDataset(folder, resolution=16, repeat=False, shuffle=False)
    assert "1 of the 5 images" in caplog.text
    records = {r.key: r for r in dataset.records()}
    assert sorted(records) == ["a", "b", "c", "d", "e"]
    assert records["a"].caption == "caption a" and records["e"].caption == ""
    hole = np.zeros((H, W), bool)
    hole[5:15, 10:20] = True
    np.testing.assert_array_equal(records["a"].segmentation_masks[0], ~hole)  # keep = 1 - white
    np.testing.assert_array_equal(records["b"].segmentation_masks[0], hole)
    assert records["c"].segmentation_masks == SEGMENTATION["mask"]
    assert records["d"].segmentation_masks == [] and records["e"].segmentation_masks == []
    np.testing.assert_array_equal(np.asarray(records["a"].image), _pixels(0))
    samples = list(ImageFolderDataset(folder, resolution=16, repeat=False))
    assert sorted(s["caption"] for s in samples) == ["", "caption a", "caption b", "caption c", "caption d"]
    assert all(s["pixel_values"].shape == (3, 16, 16) for s in samples)


def test_folder_split_workers_repeat_and_errors(folder, tmp_path):
    per_rank = [
        [s["caption"] for s in ImageFolderDataset(folder, resolution=16, repeat=False, rank=r, world_size=2)]
        for r in range(2)
    ]
    assert sorted(per_rank[0] + per_rank[1]) == ["", "caption a", "caption b", "caption c", "caption d"]
    assert {len(p) for p in per_rank} == {2, 3}
    loader = torch.utils.data.DataLoader(
        ImageFolderDataset(folder, resolution=16, repeat=False), batch_size=2, num_workers=2, collate_fn=collate
    )
    seen = [c for batch in loader for c in batch["caption"]]
    assert sorted(seen) == ["", "caption a", "caption b", "caption c", "caption d"]
    repeated = _captions(ImageFolderDataset(folder, resolution=16, random_mask=True), 12)
    assert Counter(repeated).most_common()[-1][1] >= 2
    with pytest.raises(ValueError):
        ImageFolderDataset(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError):
        ImageFolderDataset(tmp_path / "empty")


def test_folder_skips_bad_files(folder):
    Image.new("L", (10, 10)).save(folder / "masks" / "c.png")  # wrong size, wins over c.json
    (folder / "d.webp").write_bytes(b"garbage")
    dataset = ImageFolderDataset(folder, resolution=16, repeat=False)
    captions = sorted(s["caption"] for s in dataset)
    assert captions == ["", "caption a", "caption b"]
    assert dataset.skipped == 2


# --------------------------------------------------------------------------------- packing


def _records_by_caption(dataset):
    return {r.caption: r for r in dataset.records()}


def test_pack_folder_round_trip(folder, tmp_path):
    (folder / "c.json").write_text(json.dumps({**SEGMENTATION, "captions": ["a red cube", "a blue ball"],
                                               "background_caption": "grass"}), encoding="utf-8-sig")
    out = tmp_path / "packed"
    paths = pack_folder(folder, out, shard_size=2)
    assert [p.name for p in paths] == ["brushdata-00000.tar", "brushdata-00001.tar", "brushdata-00002.tar"]
    assert sorted(out.iterdir()) == paths  # no temporary files left
    with tarfile.open(paths[0]) as tar:
        names = tar.getnames()
        assert names[:6] == [f"000000000.{f}" for f in ("image", "caption", "height", "width", "segmentation", "json")]
        assert tar.extractfile("000000000.image").read() == (folder / "a.png").read_bytes()  # bytes re-used
    packed = _records_by_caption(BrushDataShards(out, resolution=16, repeat=False, shuffle_buffer=0))
    source = _records_by_caption(ImageFolderDataset(folder, resolution=16, repeat=False))
    assert sorted(packed) == sorted(source)
    for caption, original in source.items():
        copy = packed[caption]
        # per-object captions (what --mask_mix drawn trains on) were dropped by the pack
        assert (copy.object_captions, copy.background_caption) == (original.object_captions,
                                                                   original.background_caption)
        np.testing.assert_array_equal(np.asarray(copy.image), np.asarray(original.image))  # webp -> lossless PNG
        keeps = [m if isinstance(m, np.ndarray) else rle_decode(m, H, W) for m in original.segmentation_masks]
        assert len(copy.segmentation_masks) == len(keeps)
        for rle, keep in zip(copy.segmentation_masks, keeps):
            np.testing.assert_array_equal(rle_decode(rle, H, W), keep)
        # Same record, same generator: the same training sample.
        a = training_sample(
            copy.image, None, copy.caption, resolution=16, rng=7, segmentation_masks=copy.segmentation_masks
        )
        b = training_sample(
            original.image, None, original.caption, resolution=16, rng=7, segmentation_masks=original.segmentation_masks
        )
        for key in ("pixel_values", "conditioning_pixel_values", "masks"):
            assert torch.equal(a[key], b[key])
    assert any(r.object_captions == ["a red cube", "a blue ball"] and r.background_caption == "grass"
               for r in packed.values())


def test_pack_folder_refuses_to_overwrite(folder, tmp_path):
    out = tmp_path / "packed"
    assert len(pack_folder(folder, out, shard_size=1)) == 5
    with pytest.raises(FileExistsError):
        pack_folder(folder, out)
    assert len(pack_folder(folder, out, prefix="other")) == 1  # another prefix is fine
    paths = pack_folder(folder, out, shard_size=5, overwrite=True)
    assert [p.name for p in paths] == ["brushdata-00000.tar"]
    assert sorted(p.name for p in out.glob("brushdata-*.tar")) == ["brushdata-00000.tar"]  # stale shards removed
    assert len(list(BrushDataShards(out / "brushdata-00000.tar", resolution=16, repeat=False))) == 5
    with pytest.raises(ValueError):
        pack_folder(folder, out / "x", shard_size=0)


def test_pack_command_mistakes_are_one_line(folder, tmp_path, capsys):
    from brushnet.cli import main

    (tmp_path / "notes.txt").write_text("mine")
    out = tmp_path / "packed"
    for argv, message in [
        # An OUT_DIR that is a file used to end in "[Errno 17] File exists: ...".
        ([str(tmp_path / "notes.txt")], "notes.txt is a file: the shards need a folder"),
        ([str(out), "--shard-size", "0"], "--shard-size must be a whole number >= 1; got 0"),
    ]:
        assert main(["data", "pack", str(folder), *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert (tmp_path / "notes.txt").read_text() == "mine" and not out.exists()
    assert main(["data", "pack", str(folder), str(out)]) == 0
    assert main(["data", "pack", str(folder), str(out)]) == 2
    assert "pass --overwrite (overwrite=True) to replace them" in capsys.readouterr().err
    # Into the image folder itself: training on it then refused shards beside images.
    assert main(["data", "pack", str(folder), str(folder)]) == 2
    assert "is the image folder itself" in capsys.readouterr().err
    assert not list(folder.glob("*.tar"))


def test_pack_folder_exif_orientation(tmp_path):
    # A JPEG stored 32 wide x 24 high with orientation 6 (rotate 90 degrees clockwise): 24 wide x 32 high upright.
    root = tmp_path / "exif"
    root.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(_pixels(0)).save(root / "r.jpg", quality=95, exif=exif)
    (root / "r.txt").write_text("rotated")
    record = next(ImageFolderDataset(root, random_mask=True, repeat=False).records())
    assert record.image.size == (H, W)  # (width, height) upright
    out = pack_folder(root, tmp_path / "packed")
    with tarfile.open(out[0]) as tar:
        assert tar.extractfile("000000000.height").read() == str(W).encode()
        assert tar.extractfile("000000000.image").read() == (root / "r.jpg").read_bytes()
    dataset = BrushDataShards(out, resolution=16, repeat=False)
    copy = next(dataset.records())
    assert dataset.skipped == 0
    np.testing.assert_array_equal(np.asarray(copy.image), np.asarray(record.image))


def test_folder_as_people_leave_it(tmp_path, caplog):
    # An upper-case mask suffix, macOS' ._ files, two images of one name, a 0/1 mask.
    from brushnet.data.folder import list_folder, read_item
    from brushnet.data._stream import BrokenSample

    root = tmp_path / "f"
    (root / "masks").mkdir(parents=True)
    hole = np.zeros((H, W), np.uint8)
    hole[4:12, 4:12] = 255
    for name in ("UP.PNG", "zero.png"):
        (root / name).write_bytes(_encode(_pixels(0)))
    Image.fromarray(hole).save(root / "masks" / "UP.PNG")
    Image.fromarray(hole // 255).save(root / "masks" / "zero.png")  # the hole is value 1
    (root / "._UP.PNG").write_bytes(b"\0\5\26\7 AppleDouble")
    (root / "masks" / "._UP.PNG").write_bytes(b"\0\5\26\7 AppleDouble")
    items = {item.image.name: item for item in list_folder(root)}
    assert sorted(items) == ["UP.PNG", "zero.png"]
    assert items["UP.PNG"].mask == root / "masks" / "UP.PNG"
    np.testing.assert_array_equal(read_item(items["UP.PNG"]).segmentation_masks[0], hole == 0)
    with pytest.raises(BrokenSample, match="zero.png has no pixel at 128 or above .its brightest is 1"):
        read_item(items["zero.png"])
    (root / "UP.jpg").write_bytes(_encode(_pixels(1), "JPEG"))
    with pytest.raises(ValueError, match="UP.PNG and UP.jpg in .* share the name 'UP'"):
        list_folder(root)


def test_a_mask_carries_its_own_orientation(tmp_path):
    # A photo and its mask both stored sideways with the camera's tag: both are read upright.
    from brushnet.masks import load_mask, open_image

    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(_pixels(0)).save(tmp_path / "p.jpg", exif=exif)
    stored = np.zeros((H, W), np.uint8)
    stored[:, : W // 4] = 255  # the stored left quarter: the top once upright (rotated 90 degrees clockwise)
    Image.fromarray(stored).save(tmp_path / "m.jpg", exif=exif, quality=100)
    upright = np.asarray(load_mask(tmp_path / "m.jpg")) > 0
    assert open_image(tmp_path / "p.jpg").size == (H, W) and upright.shape == (W, H)
    assert upright[: W // 4 - 1].all() and not upright[W // 4 + 1:].any()


def test_a_lone_truncated_shard_trains_on_what_it_holds_and_warns_once(shards, tmp_path, caplog):
    # "None of the 1 shard(s) could be read" after reading every sample, and one warning per pass.
    files = sorted(shards.glob("*.tar"))
    data = files[0].read_bytes()
    truncated = tmp_path / "cut.tar"
    with tarfile.open(files[0]) as tar:
        third = next(m for m in tar.getmembers() if m.name.startswith("s0k002."))
    truncated.write_bytes(data[: third.offset_data + 10])  # two whole samples, then a cut
    dataset = BrushDataShards([truncated], resolution=16, repeat=True, shuffle_buffer=0)
    with caplog.at_level(logging.WARNING, logger="brushnet.data"):
        captions = [r.caption for r in islice(dataset.records(), 40)]
    assert len(captions) == 40 and len(set(captions)) >= 2
    assert sum("Could not read the shard" in r.getMessage() for r in caplog.records) == 1


def test_a_folder_of_images_and_a_stray_tar_is_one_line(golden, tmp_path):
    from brushnet.training import TrainConfig
    from brushnet.training.loop import make_dataset

    (tmp_path / "a.png").write_bytes(_encode(_pixels(0)))
    (tmp_path / "backup.tar").write_bytes(b"")
    config = TrainConfig(pretrained_model_name_or_path=str(golden("sd15_tiny_pipeline").dir),
                         train_data_dir=str(tmp_path), output_dir=str(tmp_path / "o"), resolution=16)
    with pytest.raises(ValueError, match=r"holds both .tar shards \(backup.tar, ...\) and images \(a.png, ...\)"):
        make_dataset(config, seed=0, rank=0, world_size=1)


def test_an_interrupted_pack_leaves_no_shards(folder, tmp_path, monkeypatch):
    # Ctrl-C after three of five shards: the three were there under their final names, and training
    # read them as the whole set.
    import brushnet.data.pack as pack

    real, calls = pack._sample_members, []

    def interrupted(item):
        calls.append(item)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(item)

    monkeypatch.setattr(pack, "_sample_members", interrupted)
    out = tmp_path / "packed"
    with pytest.raises(KeyboardInterrupt):
        pack_folder(folder, out, shard_size=1)
    assert list(out.iterdir()) == []
    monkeypatch.setattr(pack, "_sample_members", real)
    assert len(pack_folder(folder, out, shard_size=1)) == 5  # and a rerun needs no --overwrite
