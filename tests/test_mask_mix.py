"""The trainer's mask mixes: the reference's strokes scaled to the resolution (the same strokes at
512), and the drawn mix's holes (objects, grown objects, boxes, blobs, strokes, background strokes)."""

import numpy as np
import PIL.Image
import pytest

from brushnet.data import ImageFolderDataset, training_sample
from brushnet.data.mask_mix import (
    DRAWN_KINDS,
    DRAWN_WEIGHTS,
    drawn_hole,
    grow,
    random_blob,
    scaled_brush_mask,
    scaled_opening_kernel,
)
from brushnet.demo import scenes
from brushnet.masks import random_brush_mask, rle_encode
from brushnet.training.config import TrainConfig, check_options, parse_train_args


@pytest.mark.parametrize("size", [(512, 512), (600, 800), (700, 512)])
def test_scaled_strokes_at_512_are_the_reference_strokes(size):
    for seed in range(20):
        ours = scaled_brush_mask(*size, np.random.default_rng(seed), resolution=512)
        reference = random_brush_mask(*size, np.random.default_rng(seed))
        assert np.array_equal(ours, reference), seed


def test_strokes_mix_at_512_is_the_reference_random_mask_sample():
    rng = np.random.default_rng(0)
    image = PIL.Image.fromarray(rng.integers(0, 256, (600, 520, 3), dtype=np.uint8))
    for seed in range(6):
        ours = training_sample(image, None, "a cat", resolution=512, rng=seed, mask_mix="strokes")
        reference = training_sample(image, None, "a cat", resolution=512, rng=seed, random_mask=True)
        for key in ("pixel_values", "conditioning_pixel_values", "masks"):
            assert ours[key].equal(reference[key]), (seed, key)
        assert ours["crop_top_left"] == reference["crop_top_left"]


def test_default_mix_is_the_reference_everywhere(tmp_path):
    assert TrainConfig().mask_mix == "reference"
    scenes.write_folder(tmp_path / "data", range(2))
    assert ImageFolderDataset(tmp_path / "data", resolution=64).mask_mix == "reference"
    scene = scenes.make_scene(5)
    masks = [rle_encode(s.mask) for s in scene.shapes]
    default = training_sample(scene.image, None, "", resolution=64, rng=3, segmentation_masks=masks)
    explicit = training_sample(scene.image, None, "", resolution=64, rng=3, segmentation_masks=masks,
                               mask_mix="reference")
    assert default["masks"].equal(explicit["masks"])


def test_scaled_strokes_cover_the_same_fraction_at_64_as_the_reference_at_512():
    def coverage(size, resolution):
        return np.mean([scaled_brush_mask(size, size, np.random.default_rng(s), resolution).mean() for s in range(300)])

    # Measured: 0.17 of the image for both; the unscaled 128 px strokes cover 0.77 of a 64 px scene.
    small, reference = coverage(64, 64), coverage(512, 512)
    assert abs(small - reference) < 0.2 * reference, (small, reference)
    assert np.mean([random_brush_mask(64, 64, np.random.default_rng(s)).mean() for s in range(100)]) > 2 * reference
    assert scaled_opening_kernel(8, 512) == 8 and scaled_opening_kernel(8, 64) == 1


def test_grow_is_the_scenes_dilation():
    mask = np.zeros((20, 24), dtype=bool)
    mask[5, 7] = mask[0, 23] = mask[12:15, 3:9] = True
    for pixels in range(4):
        assert np.array_equal(grow(mask, pixels), scenes.dilate(mask, pixels))


def _objects(seed):
    scene = scenes.make_scene(seed)
    return scene, [s.mask for s in scene.shapes]


@pytest.mark.parametrize("seed", range(8))
def test_each_drawn_kind_is_what_it_says(seed):
    scene, objects = _objects(seed)
    union = np.logical_or.reduce(objects)
    for kind in DRAWN_KINDS:
        hole, drawn, _ = drawn_hole(objects, 64, 64, np.random.default_rng(seed), 64, kind=kind)
        assert drawn == kind and hole.shape == (64, 64) and hole.dtype == bool
        assert hole.any(), kind
        around = [o for o in objects if (hole & o).sum() == o.sum()]  # objects wholly in the hole
        if kind == "shape":
            assert any(np.array_equal(hole, o) for o in objects)
        elif kind == "grown":
            assert any(hole.sum() > o.sum() and np.array_equal(hole & grow(o, 7), hole) for o in around)
        elif kind == "box":
            rows, columns = np.flatnonzero(hole.any(1)), np.flatnonzero(hole.any(0))
            assert hole.sum() == len(rows) * len(columns) and np.ptp(rows) + 1 == len(rows)
            assert around
        elif kind == "shape+strokes":
            assert around
        elif kind == "background-strokes":
            assert not (hole & grow(union, 2)).any()


def test_drawn_mix_without_objects_draws_strokes_and_weights_are_a_distribution():
    assert len(DRAWN_WEIGHTS) == len(DRAWN_KINDS) and abs(sum(DRAWN_WEIGHTS) - 1) < 1e-9
    for kind in DRAWN_KINDS:
        hole, drawn, _ = drawn_hole([], 64, 64, np.random.default_rng(1), 64, kind=kind)
        assert drawn in ("strokes", "blob") and hole.any()
    with pytest.raises(ValueError, match="kind"):
        drawn_hole([], 64, 64, np.random.default_rng(1), 64, kind="lasso")
    blob = random_blob(64, 64, np.random.default_rng(2))
    assert 0.01 < blob.mean() < 0.5


def test_drawn_mix_samples_every_kind_and_mostly_keeps_the_painted_hole_a_hole():
    scene, objects = _objects(11)
    masks = [rle_encode(o) for o in objects]
    kinds, hole_fractions = set(), []
    rng = np.random.default_rng(4)
    for _ in range(300):
        kinds.add(drawn_hole(objects, 64, 64, rng, 64)[1])
    assert kinds == set(DRAWN_KINDS)
    for seed in range(100):
        sample = training_sample(scene.image, None, scene.caption, resolution=64, rng=seed, mask_mix="drawn",
                                 segmentation_masks=masks)
        keep = sample["masks"].numpy()
        assert set(np.unique(keep)) <= {0.0, 1.0}
        hole_fractions.append(1 - keep.mean())
        # The masked image is black (-1) exactly in the hole.
        assert (sample["conditioning_pixel_values"][:, keep[0] == 0] == -1).all()
    # Inverted samples (most of the scene a hole) are the rare DRAWN_INVERSION_PROBABILITY.
    assert np.mean(np.array(hole_fractions) > 0.6) < 0.25


def test_mask_mix_option():
    assert parse_train_args(["--mask_mix", "drawn"]).mask_mix == "drawn"
    assert parse_train_args(["--mask-mix", "strokes"]).mask_mix == "strokes"
    with pytest.raises(ValueError, match="--mask_mix"):
        check_options(TrainConfig(mask_mix="people"))
    assert parse_train_args(["--mask_downsampling", "max"]).mask_downsampling == "max"
    with pytest.raises(ValueError, match="--mask_downsampling"):
        check_options(TrainConfig(mask_downsampling="area"))
    with pytest.raises(ValueError, match="mask_mix"):
        training_sample(scenes.make_scene(0).image, None, "", resolution=64, rng=0, mask_mix="people")


def test_drawn_holes_are_captioned_by_what_they_hold(tmp_path):
    folder = scenes.write_folder(tmp_path / "data", [1_000_003], layout="varied")
    scene = scenes.make_scene(1_000_003, "varied")
    background = scenes.background_caption(scene.background)
    own = [scenes.shape_caption(s.kind, s.colour) for s in scene.shapes]  # what a person types
    from brushnet.data.folder import list_folder, read_item

    record = read_item(list_folder(folder)[0])
    assert record.object_captions == own and record.background_caption == background
    counts = {"own": 0, "background": 0, "image": 0}
    for seed in range(300):
        sample = training_sample(record.image, None, record.caption, resolution=64, rng=seed, mask_mix="drawn",
                                 segmentation_masks=record.segmentation_masks, object_captions=own,
                                 background_caption=background)
        caption = sample["caption"]
        counts["own" if caption in own else "background" if caption == background else "image"] += 1
        if caption in own:  # the named shape is in the hole, and little else of the scene is
            shape = scene.shapes[own.index(caption)]
            hole = sample["masks"][0].numpy() == 0
            assert hole[shape.mask].all() or (hole & shape.mask).sum() > 0.5 * shape.mask.sum()
    # Object kinds are 46 % and background strokes 24 % of the mix, 70 % of those recaptioned.
    assert 0.2 < counts["own"] / 300 < 0.45 and 0.08 < counts["background"] / 300 < 0.3, counts
    # The reference recipe never recaptions.
    reference = training_sample(record.image, None, record.caption, resolution=64, rng=0,
                                segmentation_masks=record.segmentation_masks, object_captions=own,
                                background_caption=background)
    assert reference["caption"] == record.caption


def test_drawn_weights_pick_the_kinds(tmp_path):
    from brushnet.data.mask_mix import DRAWN_KINDS, DRAWN_WEIGHTS, parse_drawn_weights

    assert parse_drawn_weights(None) == DRAWN_WEIGHTS
    weights = parse_drawn_weights("shape=1, background-strokes=3")
    assert weights == (0.25, 0, 0, 0, 0, 0, 0.75) and len(weights) == len(DRAWN_KINDS)
    for bad, message in [("circle=1", "unknown kind"), ("shape", "kind=weight"), ("shape=-1", ">= 0"),
                         ("shape=nan", ">= 0"), ("shape=0", "above 0")]:
        with pytest.raises(ValueError, match=message):
            parse_drawn_weights(bad)
    with pytest.raises(ValueError, match="--drawn_weights"):
        check_options(TrainConfig(mask_mix="drawn", drawn_weights="box=x"))
    assert parse_train_args(["--drawn_weights", "box=1"]).drawn_weights == "box=1"
    # Only boxes: every hole of the dataset is a box around one of the scene's shapes.
    folder = scenes.write_folder(tmp_path / "data", [1_000_003])
    from brushnet.data import ImageFolderDataset

    dataset = ImageFolderDataset(str(folder), resolution=64, mask_mix="drawn", drawn_weights="box=1", seed=0)
    samples = iter(dataset)
    for _ in range(10):
        hole = next(samples)["masks"][0].numpy() < 0.5
        if hole.mean() > 0.5:  # the rare swap of hole and kept region
            hole = ~hole
        rows, cols = np.flatnonzero(hole.any(1)), np.flatnonzero(hole.any(0))
        assert hole[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all(), "not a box"
