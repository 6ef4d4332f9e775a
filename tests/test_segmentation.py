"""Masks from points, boxes and words: tiny random SAM and Grounding DINO built here (no network),
compared with transformers' own post-processed outputs on a non-square image; `brushnet mask` and
`brushnet inpaint --point` end to end."""

import numpy as np
import pytest
import torch
from PIL import Image

from brushnet.cli import main
from brushnet.masks import load_mask
from brushnet.metadata import read_png_params
from brushnet.segmentation import Detector, NothingFound, Segmenter, select_mask

from hub_cache import put_in_hub_cache
from segmentation_models import save_tiny_grounding_dino, save_tiny_sam

WIDTH, HEIGHT = 90, 40  # not square, so a swapped or unscaled coordinate shows


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("segmentation-models")
    save_tiny_sam(root / "sam")
    save_tiny_grounding_dino(root / "dino")
    return root / "sam", root / "dino"


@pytest.fixture(scope="module")
def segmenter(models):
    return Segmenter.from_pretrained(str(models[0]))


@pytest.fixture(scope="module")
def detector(models):
    return Detector.from_pretrained(str(models[1]))


@pytest.fixture(scope="module")
def image():
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    pixels = np.stack([x * 255 // WIDTH, y * 255 // HEIGHT, np.full_like(x, 90)], -1)
    pixels[8:30, 55:80] = (230, 30, 30)  # a red "object" on a gradient
    return Image.fromarray(pixels.astype(np.uint8))


def _transformers_mask(segmenter, image, **prompts) -> np.ndarray:
    """What transformers' own pipeline of calls gives: processor, model, post_process_masks, best IoU."""
    inputs = segmenter.processor(images=image, return_tensors="pt", **prompts)
    with torch.no_grad():
        outputs = segmenter.model(**inputs, multimask_output=True)
    masks = segmenter.processor.post_process_masks(outputs.pred_masks, inputs["original_sizes"],
                                                   inputs["reshaped_input_sizes"])[0]
    assert masks.shape[-2:] == (HEIGHT, WIDTH)
    return masks[0, outputs.iou_scores[0, 0].argmax()].numpy()


def _as_bool(mask: Image.Image) -> np.ndarray:
    assert mask.mode == "L" and mask.size == (WIDTH, HEIGHT)
    values = np.asarray(mask)
    assert set(np.unique(values)) <= {0, 255}
    return values == 255


def test_points_give_transformers_own_mask(segmenter, image):
    mask = _as_bool(select_mask(image, segmenter, points=[(66, 18)], negative_points=[(10, 35)]))
    expected = _transformers_mask(segmenter, image, input_points=[[[[66, 18], [10, 35]]]], input_labels=[[[1, 0]]])
    assert np.array_equal(mask, expected)
    assert 0 < mask.mean() < 1
    # Another point, another mask: the coordinates reach the model.
    other = _as_bool(select_mask(image, segmenter, points=[(5, 5)]))
    assert np.array_equal(other, _transformers_mask(segmenter, image, input_points=[[[[5, 5]]]],
                                                    input_labels=[[[1]]]))
    assert not np.array_equal(mask, other)


def test_box_with_points_and_several_boxes(segmenter, image):
    box, second = (50, 5, 85, 35), (0, 0, 30, 20)
    mask = _as_bool(select_mask(image, segmenter, boxes=[box], points=[(66, 18)]))
    expected = _transformers_mask(segmenter, image, input_boxes=[[list(box)]], input_points=[[[[66, 18]]]],
                                  input_labels=[[[1]]])
    assert np.array_equal(mask, expected)
    # Boxes alone: one object each, the union kept; each the best of its own three candidates.
    union = _as_bool(select_mask(image, segmenter, boxes=[box, second]))
    each = [_transformers_mask(segmenter, image, input_boxes=[[list(b)]]) for b in (box, second)]
    assert np.array_equal(union, each[0] | each[1])


def test_words_select_what_the_detector_finds(segmenter, detector, image):
    threshold = 0.5
    boxes = detector.detect(image, ["a cat", "a dog"], threshold)
    # The detector's boxes are transformers' post-processed ones, in the image's pixels.
    inputs = detector.processor(images=image, text=[["a cat", "a dog"]], return_tensors="pt")
    with torch.no_grad():
        outputs = detector.model(**inputs)
    raw = detector.processor.post_process_grounded_object_detection(
        outputs, inputs["input_ids"], threshold=threshold, target_sizes=[(HEIGHT, WIDTH)])[0]
    assert 0 < len(boxes) == len(raw["boxes"])
    clamped = torch.minimum(raw["boxes"].clamp(min=0), torch.tensor([WIDTH, HEIGHT] * 2))
    order = raw["scores"].argsort(descending=True)
    assert torch.allclose(torch.tensor(boxes), clamped[order])

    mask = _as_bool(select_mask(image, segmenter, text=["a cat. a dog"], detector=detector, threshold=threshold))
    expected = np.zeros((HEIGHT, WIDTH), dtype=bool)
    for box in boxes:
        expected |= _transformers_mask(segmenter, image, input_boxes=[[list(box)]])
    assert np.array_equal(mask, expected)


def test_dilate_grows_the_mask(segmenter, image):
    plain = select_mask(image, segmenter, points=[(66, 18)])
    grown = select_mask(image, segmenter, points=[(66, 18)], dilate=3)
    assert np.array_equal(np.asarray(grown), np.asarray(load_mask(plain, dilate=3)))
    assert _as_bool(grown).sum() > _as_bool(plain).sum()


@pytest.mark.parametrize("prompts, message", [
    ({"points": [(90, 10)]}, "point 90,10 (on the 90x40 image): x must be a number in [0, 89]"),
    ({"points": [(10, -1)]}, "point 10,-1 (on the 90x40 image): y must be"),
    ({"boxes": [(0, 0, 91, 20)]}, "box 0,0,91,20 (on the 90x40 image): x1 must be a number in [0, 90]"),
    ({"boxes": [(30, 0, 10, 20)]}, "x0 < x1 and y0 < y1"),
    ({"negative_points": [(10, 10)]}, "negative points only take parts away"),
    ({"points": [(1, 1)], "boxes": [(0, 0, 5, 5), (5, 5, 9, 9)]}, "Points refine one object, but 2 boxes"),
    ({}, "Nothing to select"),
    ({"text": ["a cat"]}, "needs an open-vocabulary detector"),
    ({"points": [(1, 1)], "dilate": -2}, "dilate must be a whole number in [0, 90]"),
])
def test_clear_errors(segmenter, image, prompts, message):
    with pytest.raises(ValueError) as error:
        select_mask(image, segmenter, **prompts)
    assert message in str(error.value)


def test_nothing_found_names_the_words_and_threshold(segmenter, detector, image):
    with pytest.raises(NothingFound, match=r"nothing matching 'a red ball' above its threshold 1"):
        select_mask(image, segmenter, text=["a red ball"], detector=detector, threshold=1.0)


def test_not_a_sam_checkpoint_is_refused(models):
    with pytest.raises(ValueError, match="is a 'grounding-dino' model, not SAM"):
        Segmenter.from_pretrained(str(models[1]))
    with pytest.raises(ValueError, match="--segmenter /nonexistent/sam does not exist"):  # was the hub's naming rules
        Segmenter.from_pretrained("/nonexistent/sam")


def test_a_checkpoint_file_or_a_folder_missing_its_weights_is_one_sentence(models, tmp_path):
    import shutil

    # Its config.json named as a file: transformers read it as the config, then unpickled it as the
    # weights (a traceback from torch.load).
    with pytest.raises(ValueError, match=r"config.json is a file: give the folder that holds it"):
        Segmenter.from_pretrained(str(models[0] / "config.json"))
    with pytest.raises(ValueError, match=r"dino.config.json is a file: give the folder that holds it"):
        Detector.from_pretrained(str(models[1] / "config.json"))
    for source, cls, flag in ((models[0], Segmenter, "--segmenter"), (models[1], Detector, "--detector")):
        folder = tmp_path / source.name
        folder.mkdir()
        shutil.copy(source / "config.json", folder)  # no weights: named by the flag, one line
        with pytest.raises(ValueError) as error:
            cls.from_pretrained(str(folder))
        assert str(error.value).startswith(f"{flag} {folder}: cannot load it (") and "\n" not in str(error.value)


def test_an_uncached_hub_id_is_one_line_at_once_when_the_hub_cannot_be_reached(unreachable_hub, capfd):
    # Without the probe, transformers retried for half a minute, a warning line per try.
    capfd.readouterr()
    for cls, flag in ((Segmenter, "--segmenter"), (Detector, "--detector")):
        with pytest.raises(ValueError) as error:
            cls.from_pretrained("some-org/uncached-model")
        message = str(error.value)
        assert message.startswith(f"{flag} some-org/uncached-model is not a local folder") and "\n" not in message
        assert "could not be reached" in message
    assert unreachable_hub
    assert capfd.readouterr().err == ""


def test_cached_hub_models_load_at_once_when_the_hub_cannot_be_reached(models, unreachable_hub, tmp_path,
                                                                        monkeypatch, capfd):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    put_in_hub_cache(tmp_path, "test-org/tiny-sam", models[0])
    put_in_hub_cache(tmp_path, "test-org/tiny-dino", models[1])
    capfd.readouterr()
    segmenter = Segmenter.from_pretrained("test-org/tiny-sam")
    detector = Detector.from_pretrained("test-org/tiny-dino")
    assert unreachable_hub
    assert "thrown while requesting" not in capfd.readouterr().err
    assert segmenter.model.config.model_type == "sam" and detector.model.config.model_type == "grounding-dino"


# -- command line ---------------------------------------------------------------------------------

def test_mask_command_writes_the_selection(tmp_path, models, segmenter, image, capsys):
    image.save(tmp_path / "photo.png")
    out = tmp_path / "m.png"
    args = ["mask", str(tmp_path / "photo.png"), "--segmenter", str(models[0]), "--point", "66,18",
            "--negative-point", "10,35", "--out", str(out)]
    assert main(args) == 0
    written = Image.open(out)
    expected = select_mask(image, segmenter, points=[(66, 18)], negative_points=[(10, 35)])
    assert np.array_equal(np.asarray(written), np.asarray(expected))
    assert read_png_params(out)["points"] == [[66.0, 18.0]]

    before = out.read_bytes()
    assert main(args) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == before
    assert main([*args, "--dilate", "2", "--overwrite"]) == 0
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(load_mask(expected, dilate=2)))

    words = tmp_path / "words.png"
    assert main(["mask", str(tmp_path / "photo.png"), "--segmenter", str(models[0]), "--text", "a cat",
                 "--detector", str(models[1]), "--threshold", "0.5", "--out", str(words)]) == 0
    assert read_png_params(words)["text"] == ["a cat"]

    # --out a folder (existing, or new and written with a trailing slash) holds IMAGE-mask.png, as
    # inpaint's --out FOLDER holds its results.
    for folder, argument in ((tmp_path, str(tmp_path)), (tmp_path / "new", f"{tmp_path / 'new'}/")):
        assert main(["mask", str(tmp_path / "photo.png"), "--segmenter", str(models[0]), "--point", "66,18",
                     "--out", argument]) == 0
        assert np.array_equal(np.asarray(Image.open(folder / "photo-mask.png")), np.asarray(
            select_mask(image, segmenter, points=[(66, 18)])))


@pytest.mark.parametrize("extra, message", [
    (["--point", "5,5"], "need --segmenter"),
    (["--segmenter", "SAM"], "nothing selects the objects to mask: give --point X,Y or --box"),
    (["--segmenter", "SAM", "--text", "a dog"], "--text needs --detector"),
    (["--segmenter", "SAM", "--point", "5,5", "--threshold", "0.5"], "--threshold is only used with --text"),
    (["--segmenter", "SAM", "--text", "a dog", "--detector", "D", "--threshold", "0"],
     "--threshold must be a number in (0, 1]"),
    (["--segmenter", "SAM", "--point", "5,5", "--dilate", "-1"], "--dilate must be a whole number >= 0"),
    # These three used to get past the checks: argparse's "expected one argument", and the model
    # loaded before "dilate must be ..." or "[Errno 17] File exists".
    (["--segmenter", "SAM", "--point", "-3,5"], "point -3,5 (on the 90x40 image): x must be a number in [0, 89]"),
    (["--segmenter", "SAM", "--point", "5,5", "--dilate", "500"], "--dilate must be a whole number in [0, 90]"),
    (["--segmenter", "SAM", "--point", "5,5", "--out", "{tmp}/photo.png/m.png"],
     "cannot create the output folder"),
    # --overwrite replaced the photo with its mask.
    (["--segmenter", "SAM", "--point", "5,5", "--out", "{tmp}/photo.png", "--overwrite"],
     "is the IMAGE file itself"),
])
def test_mask_command_errors_before_loading(tmp_path, image, capsys, extra, message):
    image.save(tmp_path / "photo.png")
    extra = [value.format(tmp=tmp_path) for value in extra]
    assert main(["mask", str(tmp_path / "photo.png"), "--out", str(tmp_path / "m.png"), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "m.png").exists() and (tmp_path / "photo.png").is_file()


def test_mask_command_point_outside_the_image(tmp_path, models, image, capsys):
    image.save(tmp_path / "photo.png")
    assert main(["mask", str(tmp_path / "photo.png"), "--segmenter", str(models[0]), "--point", "95,10",
                 "--out", str(tmp_path / "m.png")]) == 2
    assert "point 95,10 (on the 90x40 image): x must be a number in [0, 89]" in capsys.readouterr().err


def test_bad_point_syntax_is_an_argparse_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["mask", str(tmp_path / "photo.png"), "--segmenter", "S", "--point", "5;5"])
    assert "expected X,Y" in capsys.readouterr().err


def test_inpaint_with_a_point_instead_of_a_mask(tmp_path, models, segmenter, image, capsys):
    """The built-in demo model inpaints what the click selects; the rest of the image is kept."""
    image.save(tmp_path / "photo.png")
    out = tmp_path / "result.png"
    assert main(["inpaint", str(tmp_path / "photo.png"), "--point", "66,18", "--segmenter", str(models[0]),
                 "-p", "a blue circle", "--steps", "2", "--seed", "1", "--no-blend", "--strength", "0.5",
                 "--out", str(out)]) == 0
    result = np.asarray(Image.open(out).convert("RGB"))
    hole = _as_bool(select_mask(image, segmenter, points=[(66, 18)]))
    assert result.shape == (HEIGHT, WIDTH, 3)
    assert not np.array_equal(result[hole], np.asarray(image)[hole])
    params = read_png_params(out)
    assert params["selection"]["points"] == [[66.0, 18.0]] and params["source_mask"] is None
    assert params["strength"] == 0.5

    assert main(["inpaint", str(tmp_path / "photo.png"), "-p", "x", "--out", str(tmp_path / "b.png")]) == 2
    assert "nothing selects the region to fill: give MASK, or --point/--box/--text" in capsys.readouterr().err
    (tmp_path / "mask.png").write_bytes(out.read_bytes())
    assert main(["inpaint", str(tmp_path / "photo.png"), str(tmp_path / "mask.png"), "--point", "1,1",
                 "--segmenter", "S", "-p", "x", "--out", str(tmp_path / "c.png")]) == 2
    assert "give either MASK or --point/--box/--text, not both" in capsys.readouterr().err


def test_one_pixel_as_point_and_negative_point_is_refused():
    from brushnet.segmentation.sam import Prompt

    with pytest.raises(ValueError, match="The pixel 10,10 is given as a point on the object and as a negative point"):
        Prompt(points=[(10, 10)], negative_points=[(10.0, 10.0)]).check((48, 32))
    Prompt(points=[(10, 10)], negative_points=[(11, 10)]).check((48, 32))
