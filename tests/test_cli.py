"""`brushnet inpaint/outpaint/info` end to end on tiny models, and the geometry and mask helpers."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from brushnet.cli import main
from brushnet.masks import load_mask
from brushnet.metadata import read_png_params
from brushnet.regions import crop_window, outpaint_canvas, working_size


@pytest.fixture(scope="module")
def models(golden):
    base = golden("sd15_tiny_pipeline").dir
    return ["--base", str(base), "--brushnet", str(base / "brushnet"), "--steps", "2"]


def _photo(path, size, seed=0):
    rng = np.random.default_rng(seed)
    w, h = size
    # Smooth colours plus noise: a JPEG-like photo of an odd size.
    y, x = np.mgrid[0:h, 0:w]
    pixels = np.stack([x * 255 // w, y * 255 // h, (x + y) * 255 // (w + h)], -1) + rng.integers(0, 30, (h, w, 3))
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
    return np.asarray(Image.open(path).convert("RGB"))


def _mask(path, size, box):
    mask = np.zeros((size[1], size[0]), dtype=np.uint8)
    left, top, right, bottom = box
    mask[top:bottom, left:right] = 255
    Image.fromarray(mask).save(path)
    return mask > 0


def _far_from(hole, margin):
    """Pixels farther than `margin` from the hole (square neighbourhood)."""
    import torch
    grown = torch.nn.functional.max_pool2d(torch.from_numpy(hole)[None, None].float(), 2 * margin + 1, 1, margin)
    return grown[0, 0].numpy() == 0


def test_inpaint_odd_size_jpeg_keeps_pixels_and_records_parameters(tmp_path, models, capsys):
    original = _photo(tmp_path / "photo.jpg", (333, 250))
    hole = _mask(tmp_path / "mask.png", (333, 250), (100, 80, 160, 140))
    out = tmp_path / "result.png"
    code = main(["inpaint", str(tmp_path / "photo.jpg"), str(tmp_path / "mask.png"), "--prompt", "a red ball",
                 "--seed", "5", "--out", str(out), *models])
    assert code == 0
    result = np.asarray(Image.open(out).convert("RGB"))
    assert result.shape == original.shape
    far = _far_from(hole, 12)  # beyond the blend's reach (kernel 21)
    assert np.array_equal(result[far], original[far])
    assert not np.array_equal(result[hole], original[hole])

    params = read_png_params(out)
    assert params["prompt"] == "a red ball" and params["seed"] == 5 and params["steps"] == 2
    assert params["scheduler"] == "unipc" and len(params["brushnet_hash"]) == 12
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    assert json.loads(capsys.readouterr().out) == params


def test_output_format_follows_the_name_and_keeps_the_parameters(tmp_path, models, capsys):
    _photo(tmp_path / "p.png", (48, 40))
    _mask(tmp_path / "m.png", (48, 40), (10, 10, 30, 30))
    args = ["inpaint", str(tmp_path / "p.png"), str(tmp_path / "m.png"), "-p", "un cœur rouge", "--seed", "3", *models]
    assert main([*args, "--out", str(tmp_path / "a.png")]) == 0
    png = np.asarray(Image.open(tmp_path / "a.png").convert("RGB")).astype(int)
    # A name with no suffix is written as PNG ("b" -> b.png); one with another suffix is refused
    # (test_bad_inputs), since writing "b.result" as b.png put it where nobody looked.
    for name, written, image_format in (("a.jpg", "a.jpg", "JPEG"), ("a.JPEG", "a.JPEG", "JPEG"),
                                        ("a.webp", "a.webp", "WEBP"), ("b", "b.png", "PNG")):
        assert main([*args, "--out", str(tmp_path / name)]) == 0, name
        with Image.open(tmp_path / written) as image:
            assert image.format == image_format, name
            difference = np.abs(np.asarray(image.convert("RGB")).astype(int) - png)
        if image_format == "JPEG":  # quality 95, no chroma subsampling: 3.1 on this noisy photo (4:2:0: 5.7)
            assert difference.mean() < 4.5, name
        else:
            assert difference.max() == 0, name
        params = read_png_params(tmp_path / written)
        assert params["prompt"] == "un cœur rouge" and params["seed"] == 3, name
        capsys.readouterr()
        assert main(["info", str(tmp_path / written)]) == 0 and json.loads(capsys.readouterr().out) == params


def test_an_image_with_an_erased_hole_is_its_own_mask(tmp_path, models, capsys):
    original = _photo(tmp_path / "p.png", (48, 40))
    hole = _mask(tmp_path / "m.png", (48, 40), (10, 10, 30, 30))
    rgba = np.dstack([original, np.where(hole, 0, 255).astype(np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "erased.png")
    args = ["-p", "x", "--seed", "3", *models]
    assert main(["inpaint", str(tmp_path / "erased.png"), *args, "--out", str(tmp_path / "a.png")]) == 0
    assert "the transparent pixels of" in capsys.readouterr().out
    assert main(["inpaint", str(tmp_path / "p.png"), str(tmp_path / "m.png"), *args, "--out",
                 str(tmp_path / "b.png")]) == 0
    # The same hole as the mask file's, and the same pixels under it.
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "b.png")))
    params = read_png_params(tmp_path / "a.png")
    assert params["mask_from"] == "transparency" and params["source_mask"] is None
    # Opaque, or transparent everywhere once inverted: one line each, nothing written.
    capsys.readouterr()
    assert main(["inpaint", str(tmp_path / "p.png"), *args, "--out", str(tmp_path / "c.png")]) == 2
    assert "erase the hole to transparent in IMAGE" in capsys.readouterr().err
    Image.new("RGBA", (48, 40)).save(tmp_path / "clear.png")
    assert main(["inpaint", str(tmp_path / "clear.png"), "--invert-mask", *args, "--out", str(tmp_path / "c.png")]) == 2
    assert "transparent everywhere" in capsys.readouterr().err
    assert not (tmp_path / "c.png").exists()


def test_same_seed_reproduces_and_existing_output_is_kept(tmp_path, models, capsys):
    _photo(tmp_path / "p.png", (48, 40))
    _mask(tmp_path / "m.png", (48, 40), (10, 10, 30, 30))
    args = ["inpaint", str(tmp_path / "p.png"), str(tmp_path / "m.png"), "-p", "x", "--seed", "3", *models]
    assert main([*args, "--out", str(tmp_path / "a.png")]) == 0
    assert main([*args, "--out", str(tmp_path / "b.png")]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "b.png")))
    before = (tmp_path / "a.png").read_bytes()
    assert main([*args, "--out", str(tmp_path / "a.png"), "--seed", "4"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "a.png").read_bytes() == before


def test_crop_to_mask_leaves_everything_outside_the_window_bit_exact(tmp_path, models):
    original = _photo(tmp_path / "big.png", (400, 300), seed=2)
    hole = _mask(tmp_path / "m.png", (400, 300), (300, 200, 320, 215))
    out = tmp_path / "r.png"
    assert main(["inpaint", str(tmp_path / "big.png"), str(tmp_path / "m.png"), "-p", "sky", "--crop-to-mask",
                 "--seed", "1", "--out", str(out), *models]) == 0
    result = np.asarray(Image.open(out).convert("RGB"))
    far = _far_from(hole, 12)
    assert np.array_equal(result[far], original[far])
    assert not np.array_equal(result[hole], original[hole])
    changed = np.argwhere((result != original).any(-1))
    # Only pixels in the window around the hole may change.
    assert changed[:, 0].min() >= 200 - 12 and changed[:, 1].min() >= 300 - 12


def test_no_blend_returns_the_models_output(tmp_path, models):
    original = _photo(tmp_path / "p.png", (64, 48))
    _mask(tmp_path / "m.png", (64, 48), (20, 10, 40, 30))
    assert main(["inpaint", str(tmp_path / "p.png"), str(tmp_path / "m.png"), "-p", "x", "--no-blend",
                 "--out", str(tmp_path / "r.png"), *models]) == 0
    result = np.asarray(Image.open(tmp_path / "r.png").convert("RGB"))
    assert result.shape == original.shape and not np.array_equal(result[:5], original[:5])


def test_batch_mode_pairs_by_stem_skips_done_and_overwrites_on_request(tmp_path, models, capsys):
    images, masks, out = tmp_path / "images", tmp_path / "masks", tmp_path / "out"
    images.mkdir(), masks.mkdir()
    for i, size in enumerate([(40, 32), (33, 25), (50, 50)]):
        _photo(images / f"img{i}.jpg", size, seed=i)
        _mask(masks / f"img{i}.png", size, (5, 5, 20, 20))
    (images / "prompts.txt").write_text("img0: a cat\r\nimg1: a dog\r\n", encoding="utf-8-sig", newline="")  # Notepad's
    args = ["inpaint", str(images), str(masks), "--prompt", "a bird", "--out", str(out), "--seed", "0", *models]
    assert main(args) == 0
    written = sorted(p.name for p in out.iterdir())
    assert written == ["img0.png", "img1.png", "img2.png"]
    assert [read_png_params(out / n)["prompt"] for n in written] == ["a cat", "a dog", "a bird"]
    assert Image.open(out / "img1.png").size == (33, 25)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    capsys.readouterr()
    assert main(args) == 0
    assert "skipping 3" in capsys.readouterr().out
    assert stamps == {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert main([*args, "--overwrite"]) == 0
    assert stamps != {p.name: p.stat().st_mtime_ns for p in out.iterdir()}


def test_batch_mode_with_a_missing_mask_fails_before_loading(tmp_path, capsys):
    (tmp_path / "i").mkdir(), (tmp_path / "m").mkdir()
    _photo(tmp_path / "i" / "a.png", (16, 16))
    _photo(tmp_path / "i" / "b.png", (16, 16))
    _mask(tmp_path / "m" / "a.png", (16, 16), (2, 2, 8, 8))
    assert main(["inpaint", str(tmp_path / "i"), str(tmp_path / "m"), "-p", "x"]) == 2
    err = capsys.readouterr().err
    assert "no mask" in err and "b.png" in err


def test_one_mask_file_serves_a_folder_of_images(tmp_path, models, capsys):
    images, out = tmp_path / "images", tmp_path / "out"
    images.mkdir()
    for i in range(2):
        _photo(images / f"img{i}.png", (40, 32), seed=i)
    _photo(images / "wide.png", (48, 32), seed=5)
    _mask(tmp_path / "m.png", (40, 32), (5, 5, 20, 20))
    args = ["--prompt", "a bird", "--seed", "0", *models]
    # the image of another size fails by name and the others are made
    assert main(["inpaint", str(images), str(tmp_path / "m.png"), "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert "wide.png" in err and "img0" not in err
    assert sorted(p.name for p in out.iterdir()) == ["img0.png", "img1.png"]
    for name in ("img0", "img1"):
        assert main(["inpaint", str(images / f"{name}.png"), str(tmp_path / "m.png"), "--out",
                     str(tmp_path / f"{name}-alone.png"), *args]) == 0
        assert np.array_equal(np.asarray(Image.open(out / f"{name}.png")),
                              np.asarray(Image.open(tmp_path / f"{name}-alone.png")))
        assert read_png_params(out / f"{name}.png")["source_mask"] == "m.png"
    capsys.readouterr()
    assert main(["inpaint", str(images / "img0.png"), str(tmp_path), "-p", "x", "--out", str(tmp_path / "x.png")]) == 2
    assert "is a folder but IMAGE" in capsys.readouterr().err


def test_several_images_get_their_own_seeds(tmp_path, models):
    _photo(tmp_path / "p.png", (32, 32))
    _mask(tmp_path / "m.png", (32, 32), (8, 8, 24, 24))
    assert main(["inpaint", str(tmp_path / "p.png"), str(tmp_path / "m.png"), "-p", "x", "--num-images", "2",
                 "--seed", "10", "--out", str(tmp_path / "r.png"), *models]) == 0
    assert [read_png_params(tmp_path / f"r-{k}.png")["seed"] for k in (0, 1)] == [10, 11]
    assert main(["inpaint", str(tmp_path / "p.png"), str(tmp_path / "m.png"), "-p", "x", "--seed", "11",
                 "--out", str(tmp_path / "single.png"), *models]) == 0
    a = np.asarray(Image.open(tmp_path / "r-1.png"), dtype=int)
    b = np.asarray(Image.open(tmp_path / "single.png"), dtype=int)
    assert np.abs(a - b).max() <= 1  # the same seed alone reproduces it (batching may move a rounding)


def test_user_mistakes_are_one_line_errors(tmp_path, models, capsys):
    _photo(tmp_path / "p.png", (32, 32))
    _mask(tmp_path / "m.png", (40, 32), (1, 1, 5, 5))
    cases = [
        (["inpaint", str(tmp_path / "p.png"), str(tmp_path / "m.png"), "-p", "x", *models], "masks must have the size"),
        (["inpaint", str(tmp_path / "nope.png"), str(tmp_path / "m.png"), "-p", "x"], "does not exist"),
        (["inpaint", str(tmp_path / "p.png"), str(tmp_path / "m.png")], "--prompt is required"),
        (["inpaint", str(tmp_path / "p.png"), str(tmp_path / "p.png"), "-p", "x", "--base", str(tmp_path)],
         "--base and --brushnet go together"),
        (["inpaint", str(tmp_path / "p.png"), str(tmp_path / "p.png"), "-p", "x", "--scheduler", "foo", *models],
         "unknown --scheduler"),
        (["info", str(tmp_path / "p.png")], "no brushnet generation parameters"),
    ]
    for argv, message in cases:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "p-inpainted.png").exists()


def test_outpaint_extends_the_canvas(tmp_path, models):
    original = _photo(tmp_path / "p.png", (40, 30))
    out = tmp_path / "wide.png"
    assert main(["outpaint", str(tmp_path / "p.png"), "--left", "8", "--right", "16", "--top", "4", "-p", "sea",
                 "--out", str(out), *models]) == 0
    result = np.asarray(Image.open(out).convert("RGB"))
    assert result.shape == (34, 64, 3)
    params = read_png_params(out)
    assert params["outpaint"] == {"left": 8, "right": 16, "top": 4, "bottom": 0}
    inner = result[4 + 11:4 + 30 - 11, 8 + 11:8 + 40 - 11]  # original pixels beyond the blend's reach
    assert np.array_equal(inner, original[11:-11, 11:-11])


def test_outpaint_canvas_geometry():
    image = Image.new("RGB", (10, 6), (200, 10, 10))
    canvas, mask = outpaint_canvas(image, left=3, right=2, top=1, bottom=4)
    assert canvas.size == mask.size == (15, 11)
    m = np.asarray(mask)
    assert (m[1:7, 3:13] == 0).all() and m.sum() == 255 * (15 * 11 - 60)
    assert canvas.getpixel((3, 1)) == (200, 10, 10) and canvas.getpixel((12, 6)) == (200, 10, 10)
    with pytest.raises(ValueError, match="at least one"):
        outpaint_canvas(image)
    with pytest.raises(ValueError, match=r"^--top must be >= 0 \(pixels to add on that side\); got -5\.$"):
        outpaint_canvas(image, left=8, top=-5)


def test_working_size_and_crop_window():
    assert working_size(512, 512, 512) == (512, 512)
    w, h = working_size(4000, 3000, 512)
    assert (w % 8, h % 8) == (0, 0) and abs(w / h - 4 / 3) < 0.03 and abs(w * h - 512 * 512) / 512**2 < 0.05
    assert working_size(333, 250, 1024) == (1184, 888)
    window = crop_window((3000, 2000, 3100, 2050), (4000, 3000), context=0.3, min_side=512)
    left, top, right, bottom = window
    assert left <= 2970 and right >= 3130 and right - left >= 512 and bottom - top >= 512
    assert crop_window((3990, 2990, 4000, 3000), (4000, 3000), 0.3, 512) == (3488, 2488, 4000, 3000)
    assert crop_window((0, 0, 10, 10), (100, 50), 0.3, 512) == (0, 0, 100, 50)


def test_load_mask_formats(tmp_path):
    hole = np.zeros((12, 16), dtype=bool)
    hole[3:9, 4:12] = True
    grey = (hole * 255).astype(np.uint8)
    Image.fromarray(grey).save(tmp_path / "l.png")
    Image.fromarray(np.stack([grey] * 3, -1)).save(tmp_path / "rgb.png")
    Image.fromarray(grey).convert("1").save(tmp_path / "bit.png")
    rgba = np.zeros((12, 16, 4), dtype=np.uint8)
    rgba[..., 3] = grey  # painted strokes on a transparent layer
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    for name in ("l.png", "rgb.png", "bit.png", "rgba.png"):
        assert np.array_equal(np.asarray(load_mask(tmp_path / name)) > 0, hole), name
    assert np.array_equal(np.asarray(load_mask(tmp_path / "l.png", invert=True)) > 0, ~hole)
    assert (np.asarray(load_mask(tmp_path / "l.png", dilate=1)) > 0).sum() == 8 * 10
    Image.fromarray((hole * 100).astype(np.uint8)).save(tmp_path / "dim.png")
    assert not np.asarray(load_mask(tmp_path / "dim.png")).any()
    assert np.array_equal(np.asarray(load_mask(tmp_path / "dim.png", threshold=100)) > 0, hole)


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "brushnet", "inpaint", "--help"], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert out.returncode == 0
    for option in ("--prompt", "--base", "--brushnet", "--crop-to-mask", "--no-blend", "--scheduler", "--offload"):
        assert option in out.stdout


def _error(argv, capsys) -> str:
    capsys.readouterr()
    assert main(argv) == 2, argv
    err = capsys.readouterr().err
    assert err.startswith("brushnet: error:") and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    return err


def test_bad_input_files(tmp_path, models, capsys):
    _photo(tmp_path / "p.png", (32, 32))
    _mask(tmp_path / "m.png", (32, 32), (4, 4, 20, 20))
    (tmp_path / "text.png").write_text("not a picture")
    whole = (tmp_path / "p.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(whole[: len(whole) // 2])
    Image.new("L", (32, 32), 0).save(tmp_path / "empty.png")
    zero_one = np.zeros((32, 32), np.uint8)
    zero_one[4:20, 4:20] = 1  # numpy's bool mask saved as it is: the hole is 1, not 255
    Image.fromarray(zero_one).save(tmp_path / "zero-one.png")
    cases = {
        "text.png": ("text.png", "m.png", "not an image"),
        "cut.png": ("cut.png", "m.png", "damaged"),
        "empty mask": ("p.png", "empty.png", "nothing to inpaint"),
        "0/1 mask": ("p.png", "zero-one.png", "its brightest is 1 (a 0/1 array saved as an image?); save the hole "
                     "as 255 (white) or pass --mask-threshold 1"),
        "missing": ("nope.jpg", "m.png", "does not exist"),
    }
    for name, (image, mask, message) in cases.items():
        err = _error(["inpaint", str(tmp_path / image), str(tmp_path / mask), "-p", "x", *models], capsys)
        assert message in err, (name, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.png", "empty.png", "m.png", "p.png", "text.png",
                                                          "zero-one.png"]
    from brushnet.masks import load_mask

    assert load_mask(tmp_path / "zero-one.png", threshold=1).getbbox() == (4, 4, 20, 20)  # the fix it names


def test_bad_models_are_refused_before_loading(golden, tmp_path, capsys):
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    _photo(tmp_path / "p.png", (32, 32))
    _mask(tmp_path / "m.png", (32, 32), (4, 4, 20, 20))
    sd15 = golden("sd15_tiny_pipeline").dir
    run = ["inpaint", str(tmp_path / "p.png"), str(tmp_path / "m.png"), "-p", "x", "--out", str(tmp_path / "o.png")]

    err = _error([*run, "--base", str(sd15), "--brushnet", str(golden("sdxl_tiny_model").dir / "brushnet")], capsys)
    assert "SDXL" in err and "SD1.5" in err

    state = load_file(sd15 / "brushnet" / "diffusion_pytorch_model.safetensors")
    powerpaint = {**state, "down_blocks.0.attentions.0.proj_in.weight": torch.zeros(8, 8)}
    save_file(powerpaint, tmp_path / "powerpaint.safetensors")
    assert "PowerPaint" in _error([*run, "--base", str(sd15), "--brushnet", str(tmp_path / "powerpaint.safetensors")],
                                  capsys)

    torch.save(state, tmp_path / "brushnet.bin")
    assert "--allow-pickle" in _error([*run, "--base", str(sd15), "--brushnet", str(tmp_path / "brushnet.bin")],
                                      capsys)

    inpainting = tmp_path / "inpainting-base"
    (inpainting / "unet").mkdir(parents=True)
    shutil.copy(sd15 / "model_index.json", inpainting)
    unet_config = json.loads((sd15 / "unet" / "config.json").read_text())
    (inpainting / "unet" / "config.json").write_text(json.dumps({**unet_config, "in_channels": 9}))
    assert "inpainting" in _error([*run, "--base", str(inpainting), "--brushnet", str(sd15 / "brushnet")], capsys)

    assert "could not be reached" in _error([*run, "--base", "some-org/some-model", "--brushnet",
                                             str(sd15 / "brushnet")], capsys)
    if not torch.cuda.is_available():
        assert "no CUDA GPU" in _error([*run, "--base", str(sd15), "--brushnet", str(sd15 / "brushnet"),
                                        "--device", "cuda"], capsys)
    assert not (tmp_path / "o.png").exists()


def test_output_folders(tmp_path, models, capsys):
    _photo(tmp_path / "p.png", (32, 32))
    _mask(tmp_path / "m.png", (32, 32), (4, 4, 20, 20))
    out = tmp_path / "new" / "deeper" / "r.png"
    assert main(["inpaint", str(tmp_path / "p.png"), str(tmp_path / "m.png"), "-p", "x", "--out", str(out),
                 *models]) == 0
    assert out.is_file()
    (tmp_path / "afile").write_text("x")
    err = _error(["inpaint", str(tmp_path / "p.png"), str(tmp_path / "m.png"), "-p", "x",
                  "--out", str(tmp_path / "afile" / "r.png"), *models], capsys)
    assert "cannot create the output folder" in err


def test_interrupting_a_batch_leaves_only_complete_files(tmp_path, models, monkeypatch, capsys):
    import brushnet.inpaint

    images, masks, out = tmp_path / "i", tmp_path / "m", tmp_path / "out"
    images.mkdir(), masks.mkdir()
    for i in range(3):
        _photo(images / f"{i}.png", (24, 24), seed=i)
        _mask(masks / f"{i}.png", (24, 24), (2, 2, 12, 12))
    real, calls = brushnet.inpaint.iter_inpaint, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(brushnet.inpaint, "iter_inpaint", interrupted)
    assert main(["inpaint", str(images), str(masks), "-p", "x", "--out", str(out), *models]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["0.png"]
    read_png_params(out / "0.png")


def test_signed_numbers_after_a_space_are_values_and_nothing_else_is_joined():
    from brushnet.options import join_signed_numbers

    assert join_signed_numbers(["inpaint", "a.png", "--guidance", "-inf", "--scale", "-1.5e-2", "--seed", "-7"]) == \
        ["inpaint", "a.png", "--guidance=-inf", "--scale=-1.5e-2", "--seed=-7"]
    # A point or box off the image's top or left edge reaches the check that it lies on the image.
    assert join_signed_numbers(["mask", "a.png", "--point", "-3,5", "--box", "-1,-2.5,40,30"]) == \
        ["mask", "a.png", "--point=-3,5", "--box=-1,-2.5,40,30"]
    # Not a number, a short flag, an option already given its value, or after "--": left as typed.
    for argv in (["--prompt", "-a red circle"], ["-p", "-inf"], ["--guidance=1", "-5"], ["--", "-5"],
                 ["--steps", "-e5"], ["--", "--x", "-5"], ["--point", "-3,x"], ["--point", "-3,,5"]):
        assert join_signed_numbers(argv) == argv


def test_a_mask_drawn_the_other_way_round_gets_a_note(tmp_path, models, capsys):
    _photo(tmp_path / "p.png", (32, 32))
    hole = _mask(tmp_path / "m.png", (32, 32), (8, 8, 20, 20))
    Image.fromarray(np.where(hole, 0, 255).astype(np.uint8)).save(tmp_path / "inverted.png")  # object black
    run = ["inpaint", str(tmp_path / "p.png"), "-p", "x", *models]
    assert main([*run[:2], str(tmp_path / "inverted.png"), *run[2:], "--out", str(tmp_path / "a.png")]) == 0
    assert "note: the hole is 86% of" in capsys.readouterr().out and (tmp_path / "a.png").is_file()
    for mask, extra in (("inverted.png", ["--invert-mask", "--mask-threshold", "100", "--dilate", "2"]), ("m.png", [])):
        assert main([*run[:2], str(tmp_path / mask), *run[2:], *extra, "--out", str(tmp_path / f"b{mask}")]) == 0
        assert "note: the hole" not in capsys.readouterr().out
    # how the hole was read is recorded with the rest
    recorded = read_png_params(tmp_path / "binverted.png")
    assert (recorded["invert_mask"], recorded["mask_threshold"], recorded["dilate"]) == (True, 100, 2)
    recorded = read_png_params(tmp_path / "bm.png")
    assert (recorded["invert_mask"], recorded["mask_threshold"], recorded["dilate"]) == (False, 128, 0)


def test_outputs_never_replace_the_inputs(tmp_path, models, capsys):
    # --out the image or mask folder: their files passed for finished results, and --overwrite
    # replaced the photos; --out MASK.png --overwrite replaced the mask.
    images, masks = tmp_path / "p", tmp_path / "m"
    images.mkdir(), masks.mkdir()
    _photo(images / "a.png", (16, 16))
    _mask(masks / "a.png", (16, 16), (2, 2, 8, 8))
    before = {p: p.read_bytes() for p in (images / "a.png", masks / "a.png")}
    for out, name in ((images, "IMAGE folder"), (masks, "MASK folder")):
        for extra in ([], ["--overwrite"]):
            capsys.readouterr()
            assert main(["inpaint", str(images), str(masks), "-p", "x", "--out", str(out), *extra, *models]) == 2
            assert f"is the {name}" in capsys.readouterr().err
    for out, name in ((masks / "a.png", "MASK file"), (images / "a.png", "IMAGE file")):
        assert main(["inpaint", str(images / "a.png"), str(masks / "a.png"), "-p", "x", "--out", str(out),
                     "--overwrite", *models]) == 2
        assert f"is the {name} itself" in capsys.readouterr().err
    assert before == {p: p.read_bytes() for p in before}


def test_two_inputs_of_one_name_are_refused_before_any_work(tmp_path, capsys):
    images, masks = tmp_path / "p", tmp_path / "m"
    images.mkdir(), masks.mkdir()
    _photo(images / "dup.png", (16, 16))
    _photo(images / "dup.jpg", (16, 16))
    _mask(masks / "dup.png", (16, 16), (2, 2, 8, 8))
    assert main(["inpaint", str(images), str(masks), "-p", "x", "--out", str(tmp_path / "r")]) == 2
    assert "dup.jpg and dup.png" in capsys.readouterr().err and not (tmp_path / "r").exists()
    (images / "dup.jpg").unlink()
    _mask(masks / "dup.jpg", (16, 16), (2, 2, 8, 8))
    assert main(["inpaint", str(images), str(masks), "-p", "x", "--out", str(tmp_path / "r")]) == 2
    assert "only one of them would be the mask of dup" in capsys.readouterr().err


def test_a_folder_run_stopped_inside_an_inputs_images_goes_on(tmp_path, models, capsys):
    # Ctrl-C after 2 of an input's 3 images: the rerun stopped at "already exists"; it makes the
    # third, from its own seed, and leaves the two as they were.
    images, masks, out = tmp_path / "p", tmp_path / "m", tmp_path / "r"
    images.mkdir(), masks.mkdir()
    _photo(images / "a.png", (16, 16))
    _mask(masks / "a.png", (16, 16), (2, 2, 8, 8))
    args = ["inpaint", str(images), str(masks), "-p", "x", "--out", str(out), "--num-images", "3", "--seed", "4",
            "--steps", "2", *models]
    assert main(args) == 0
    whole = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(whole) == ["a-0.png", "a-1.png", "a-2.png"]
    (out / "a-2.png").unlink()
    kept = {n: (out / n).stat().st_mtime_ns for n in ("a-0.png", "a-1.png")}
    assert main(args) == 0
    assert kept == {n: (out / n).stat().st_mtime_ns for n in kept}
    assert read_png_params(out / "a-2.png")["seed"] == 6
    assert np.array_equal(np.asarray(Image.open(out / "a-2.png")),
                          np.asarray(Image.open(__import__("io").BytesIO(whole["a-2.png"]))))


def test_out_names_read_as_people_mean_them(tmp_path, models, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    _photo(tmp_path / "a.png", (16, 16))
    _mask(tmp_path / "m.png", (16, 16), (2, 2, 8, 8))
    base = ["inpaint", "a.png", "m.png", "-p", "x", "--steps", "2", *models]
    assert main([*base, "--out", "newdir/"]) == 0  # a folder to make, not newdir.png
    assert (tmp_path / "newdir" / "a-inpainted.png").is_file() and not (tmp_path / "newdir.png").exists()
    assert main([*base, "--out", "~/x.png"]) == 0  # not a folder named "~"
    assert (tmp_path / "home" / "x.png").is_file() and not (tmp_path / "~").exists()
    capsys.readouterr()
    assert main([*base, "--out", "-"]) == 2 and "standard output" in capsys.readouterr().err
    (tmp_path / "p").mkdir()
    _photo(tmp_path / "p" / "a.png", (16, 16))
    capsys.readouterr()
    assert main(["inpaint", "p", "m.png", "-p", "x", "--out", "res.jpg", *models]) == 2
    assert "names an image file, but IMAGE is a folder" in capsys.readouterr().err


def test_prompts_file_serves_a_single_image(tmp_path, models, capsys):
    _photo(tmp_path / "scene.png", (16, 16))
    _mask(tmp_path / "m.png", (16, 16), (2, 2, 8, 8))
    (tmp_path / "pr.txt").write_text("scene: a red circle\n")
    out = tmp_path / "o.png"
    base = ["inpaint", str(tmp_path / "scene.png"), str(tmp_path / "m.png"), "--steps", "2", *models]
    assert main([*base, "--prompts", str(tmp_path / "pr.txt"), "--out", str(out)]) == 0
    assert read_png_params(out)["prompt"] == "a red circle"
    (tmp_path / "other.txt").write_text("elsewhere: a cat\n")
    assert main([*base, "--prompts", str(tmp_path / "other.txt"), "--out", str(tmp_path / "o2.png")]) == 2
    assert "has no prompt for scene" in capsys.readouterr().err
    assert main([*base, "--prompts", str(tmp_path / "nope.txt"), "-p", "x", "--out", str(tmp_path / "o3.png")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_info_into_a_closed_pipe_exits_quietly(tmp_path, models):
    # `brushnet info OUT.png | head -3` printed "brushnet: error: Broken pipe" and exited 2.
    _photo(tmp_path / "a.png", (16, 16))
    _mask(tmp_path / "m.png", (16, 16), (2, 2, 8, 8))
    out = tmp_path / "o.png"
    assert main(["inpaint", str(tmp_path / "a.png"), str(tmp_path / "m.png"), "-p", "x", "--steps", "2",
                 "--out", str(out), *models]) == 0
    child = subprocess.Popen([sys.executable, "-m", "brushnet", "info", str(out)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    child.stdout.close()  # the reader is gone before the first line is written
    err = child.stderr.read().decode()
    assert child.wait(timeout=120) == 0 and "Broken pipe" not in err and "Traceback" not in err, err


def test_an_inverted_mask_with_nothing_left_says_so(tmp_path, capsys):
    # "has no pixel at or above --mask-threshold 0" was impossible as stated: inverting emptied it.
    _photo(tmp_path / "a.png", (16, 16))
    _mask(tmp_path / "m.png", (16, 16), (2, 2, 8, 8))
    assert main(["inpaint", str(tmp_path / "a.png"), str(tmp_path / "m.png"), "-p", "x", "--invert-mask",
                 "--mask-threshold", "0", "--out", str(tmp_path / "o.png")]) == 2
    assert "inverted leaves nothing to fill" in capsys.readouterr().err


def test_a_line_naming_a_non_ascii_file_reaches_an_ascii_terminal():
    # PYTHONIOENCODING=ascii or LANG=C: the file was written, then the "wrote" line failed (rc 2).
    import io

    from brushnet.options import say

    raw = io.BytesIO()
    stream = io.TextIOWrapper(raw, encoding="ascii")
    say("wrote résultat.png", stream)
    assert raw.getvalue() == b"wrote r\\xe9sultat.png\n"
