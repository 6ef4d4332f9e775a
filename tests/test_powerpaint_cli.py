"""`brushnet inpaint --task ...` and `brushnet outpaint` with a PowerPaint model, on the tiny golden files."""

import pytest
from PIL import Image

from brushnet.cli import main
from brushnet.metadata import read_png_params

CASE = "powerpaint_v2_tiny_pipeline"


@pytest.fixture(scope="module")
def powerpaint(golden):
    folder = golden(CASE).dir
    return folder, ["--base", str(folder / "realisticVisionV60B1_v51VAE"), "--brushnet",
                    str(folder / "PowerPaint_Brushnet"), "--steps", "2", "--seed", "3", "--device", "cpu"]


def _error(argv, capsys) -> str:
    capsys.readouterr()
    assert main(argv) == 2, argv
    err = capsys.readouterr().err
    assert err.startswith("brushnet: error:") and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def test_object_removal_needs_no_prompt(powerpaint, tmp_path, monkeypatch):
    from brushnet import StableDiffusionPowerPaintPipeline

    calls = []
    original = StableDiffusionPowerPaintPipeline.__call__

    def spy(self, *args, **kwargs):
        calls.append(kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionPowerPaintPipeline, "__call__", spy)
    folder, models = powerpaint
    out = tmp_path / "removed.png"
    assert main(["inpaint", str(folder / "init_image.png"), str(folder / "mask.png"), "--task", "remove",
                 "--out", str(out), *models]) == 0
    assert [(c["task"], c["prompt"], c["fitting_degree"]) for c in calls] == [("object-removal", "", 1.0)]
    params = read_png_params(out)
    assert params["task"] == "object-removal" and params["fitting_degree"] == 1.0
    assert Image.open(out).size == Image.open(folder / "init_image.png").size


def test_shape_guided_with_fitting_degree(powerpaint, tmp_path):
    folder, models = powerpaint
    out = tmp_path / "shape.png"
    assert main(["inpaint", str(folder / "init_image.png"), str(folder / "mask.png"), "--task", "shape-guided",
                 "--fitting-degree", "0.5", "-p", "a cat", "--out", str(out), *models]) == 0
    assert read_png_params(out)["fitting_degree"] == 0.5


def test_outpaint_uses_the_outpainting_task(powerpaint, tmp_path):
    folder, models = powerpaint
    out = tmp_path / "wide.png"
    assert main(["outpaint", str(folder / "outpaint_source.png"), "--left", "8", "--right", "8",
                 "--out", str(out), *models]) == 0
    assert read_png_params(out)["task"] == "outpainting"


def test_errors(powerpaint, golden, tmp_path, capsys):
    folder, models = powerpaint
    run = ["inpaint", str(folder / "init_image.png"), str(folder / "mask.png"), "--out", str(tmp_path / "o.png")]
    base = golden("sd15_tiny_pipeline").dir
    err = _error([*run, "--task", "remove", "--base", str(base), "--brushnet", str(base / "brushnet"),
                  "--steps", "1"], capsys)
    assert "PowerPaint" in err
    assert "--fitting-degree must be a number in [0, 1]; got 2.0" in _error(
        [*run, "--task", "shape-guided", "-p", "x", "--fitting-degree", "2", *models], capsys)
    assert "--fitting-degree must be a number in [0, 1]; got nan" in _error(
        [*run, "--task", "shape-guided", "-p", "x", "--fitting-degree", "nan", *models], capsys)
    assert "--prompt" in _error([*run, "--task", "shape-guided", *models], capsys)
    for task in ([], ["--task", "remove"], ["--task", "text-guided"]):  # it mixes only shape-guided's prompts
        assert "--fitting-degree is only used with --task shape-guided" in _error(
            [*run, *task, "-p", "x", "--fitting-degree", "0.3", *models], capsys)
    assert not (tmp_path / "o.png").exists()


def test_a_folder_of_photos_for_object_removal_needs_no_prompts(powerpaint, tmp_path):
    folder, models = powerpaint
    images, masks, out = tmp_path / "images", tmp_path / "masks", tmp_path / "out"
    images.mkdir(), masks.mkdir()
    for stem in ("a", "b"):
        Image.open(folder / "init_image.png").save(images / f"{stem}.png")
        Image.open(folder / "mask.png").save(masks / f"{stem}.png")
    assert main(["inpaint", str(images), str(masks), "--task", "remove", "--out", str(out), *models]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png"]
    assert read_png_params(out / "a.png")["task"] == "object-removal"


def test_convert_writes_a_safetensors_copy_of_the_text_encoder(powerpaint, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file
    import torch

    folder, _ = powerpaint
    release = tmp_path / "PowerPaint_Brushnet"
    release.mkdir()
    for name in ("config.json", "pytorch_model.bin"):
        shutil.copy(folder / "PowerPaint_Brushnet" / name, release)
    assert main(["convert", str(tmp_path)]) == 0
    copy = load_file(release / "text_encoder_brushnet.safetensors")
    original = torch.load(release / "pytorch_model.bin", weights_only=True)
    assert copy.keys() == original.keys() and all(torch.equal(copy[k], original[k]) for k in copy)
    # A second run keeps the file there unless told to replace it.
    (release / "text_encoder_brushnet.safetensors").write_bytes(b"a user's own file")
    assert "text_encoder_brushnet.safetensors already exists; pass --overwrite" in _error(
        ["convert", str(tmp_path)], capsys)
    assert (release / "text_encoder_brushnet.safetensors").read_bytes() == b"a user's own file"
    assert main(["convert", str(tmp_path), "--overwrite"]) == 0
    assert load_file(release / "text_encoder_brushnet.safetensors").keys() == original.keys()
    # A file of another kind is told what convert reads.
    assert "this reads the pickled text encoder of a PowerPaint v2 release, pytorch_model.bin" in _error(
        ["convert", str(release / "config.json")], capsys)


def test_convert_on_a_file_that_is_no_checkpoint_is_one_line(tmp_path, capsys):
    import torch

    (tmp_path / "notes.bin").write_text("hello\n")  # torch's unpickler: KeyError, a traceback
    (tmp_path / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0")  # was "holds more than tensors"
    torch.save({"w": torch.zeros(2)}, tmp_path / "cut.bin")
    (tmp_path / "cut.bin").write_bytes((tmp_path / "cut.bin").read_bytes()[:200])  # a damaged archive
    (tmp_path / "photo.bin").write_bytes(b"\x89PNG\r\n\x1a\n\0\0")  # an image named .bin
    for name, message in [("notes.bin", "notes.bin is not a PyTorch checkpoint"),
                          ("photo.bin", "photo.bin is not a PyTorch checkpoint"),
                          ("photo.png", "photo.png is a .png file: this reads the pickled text encoder"),
                          ("cut.bin", "Could not read")]:
        for extra in ([], ["--allow-pickle"]):
            assert message in _error(["convert", str(tmp_path / name), *extra], capsys)
    assert not (tmp_path / "text_encoder_brushnet.safetensors").exists()


def test_strength_works_with_powerpaint(powerpaint, tmp_path):
    folder, models = powerpaint
    out = tmp_path / "soft.png"
    assert main(["inpaint", str(folder / "init_image.png"), str(folder / "mask.png"), "--task", "remove",
                 "--strength", "0.5", "--out", str(out), *models]) == 0
    assert read_png_params(out)["strength"] == 0.5
