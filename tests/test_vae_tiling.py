"""VAE tiling and slicing (`inpaint.vae_tiling`, --vae-tiling) on the tiny SD1.5 pipeline, whose
native side is 16 px and whose VAE tiles are 32 px: "auto" tiles above 4 native areas (32x32)."""

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

from brushnet.cli import build_parser, main
from brushnet.inpaint import AUTO_TILING_NATIVE_AREAS, InpaintSettings, inpaint, native_resolution, vae_tiling
from brushnet.metadata import read_png_params
from brushnet.regions import working_size


@pytest.fixture(scope="module")
def base(tiny_sd15_base):
    return tiny_sd15_base


@pytest.fixture(scope="module")
def pipe(tiny_sd15_pipe):
    return tiny_sd15_pipe


@pytest.fixture
def decodes(monkeypatch):
    """(use_tiling, use_slicing, tiled) of every VAE decode, for any VAE the test makes or loads."""
    calls = []
    decode, tiled_decode = AutoencoderKL.decode, AutoencoderKL.tiled_decode

    def recording_decode(vae, z, *args, **kwargs):
        calls.append([vae.use_tiling, vae.use_slicing, False])
        return decode(vae, z, *args, **kwargs)

    def recording_tiled_decode(vae, z, *args, **kwargs):
        calls[-1][2] = True
        return tiled_decode(vae, z, *args, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "decode", recording_decode)
    monkeypatch.setattr(AutoencoderKL, "tiled_decode", recording_tiled_decode)
    return calls


def _photo(width, height):
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // width, y * 255 // height, (x + y) * 255 // (width + height)], -1)
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[height // 4:3 * height // 4, width // 4:3 * width // 4] = 255
    return Image.fromarray(pixels.astype(np.uint8)), Image.fromarray(mask)


def _generate(pipe, width, height, mode, num_images=1):
    """The pipeline's float output at width x height, the VAE set by `vae_tiling(mode)`."""
    image, mask = _photo(width, height)
    with vae_tiling(pipe, height, width, num_images, mode):
        return pipe("a red cake", image=image, mask=mask, height=height, width=width, num_inference_steps=2,
                    num_images_per_prompt=num_images, generator=torch.Generator().manual_seed(0),
                    output_type="np").images


def test_auto_threshold_is_four_native_areas_and_ignores_the_aspect(pipe):
    native = native_resolution(pipe)
    assert (native, pipe.vae.tile_sample_min_size, AUTO_TILING_NATIVE_AREAS) == (16, 32, 4)
    for height, width, tiles in [(16, 16, False), (32, 32, False), (32, 34, True), (48, 48, True),
                                 # one native area, a side 4x the tile: memory follows the area
                                 (2, 128, False)]:
        with vae_tiling(pipe, height, width, 2, "auto") as tiled:
            assert tiled == tiles and (pipe.vae.use_tiling, pipe.vae.use_slicing) == (tiles, tiles), (height, width)
        assert not pipe.vae.use_tiling and not pipe.vae.use_slicing  # as the VAE was before


def test_on_and_off_and_the_vaes_own_setting_comes_back(pipe):
    with vae_tiling(pipe, 16, 16, 1, "on") as tiled:
        assert tiled and pipe.vae.use_tiling and not pipe.vae.use_slicing  # one image: nothing to slice
    with vae_tiling(pipe, 16, 16, 3, "on"):
        assert pipe.vae.use_tiling and pipe.vae.use_slicing
    pipe.vae.enable_tiling()
    try:
        with vae_tiling(pipe, 256, 256, 4, "off") as tiled:
            assert not tiled and not pipe.vae.use_tiling and not pipe.vae.use_slicing
        assert pipe.vae.use_tiling
    finally:
        pipe.vae.disable_tiling()


def test_auto_at_native_sizes_is_off_bit_for_bit(pipe, decodes):
    """inpaint() works at the native area, up to IMAGES_PER_CALL images a call: auto changes nothing
    there, whatever the aspect (36x8 is wider than a tile) and with a batch (slicing alone is not exact)."""
    assert working_size(160, 32, native_resolution(pipe), pipe.vae_scale_factor) == (36, 8)
    image, mask = _photo(160, 32)
    settings = InpaintSettings(prompt="a red cake", steps=2, num_images=2, blend=False)
    auto = inpaint(pipe, image, mask, settings)
    off = inpaint(pipe, image, mask, InpaintSettings(**{**settings.as_dict(), "vae_tiling": "off"}))
    assert decodes == [[False, False, False]] * 2
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(auto, off))
    assert np.array_equal(_generate(pipe, 32, 32, "auto", num_images=2), _generate(pipe, 32, 32, "off", num_images=2))


def test_auto_tiles_above_the_threshold_and_on_tiles_wherever_a_side_exceeds_a_tile(pipe, decodes):
    _generate(pipe, 48, 48, "auto", num_images=2)
    _generate(pipe, 48, 48, "off")
    _generate(pipe, 40, 8, "on")  # one native area, but 40 px is wider than a tile
    _generate(pipe, 40, 8, "auto")
    _generate(pipe, 32, 32, "on")  # one tile: diffusers decodes it whole even with tiling on
    assert decodes == [[True, True, True], [False, False, False], [True, False, True], [False, False, False],
                       [True, False, False]]


def test_tiled_output_is_close_to_the_whole_one(pipe):
    whole, tiled = _generate(pipe, 64, 64, "off"), _generate(pipe, 64, 64, "on")  # 3x3 tiles
    difference = np.abs(tiled - whole)
    # Measured on this random-weight model: mean 0.0135, max 0.119 (outputs in [0, 1]).
    assert 0 < difference.mean() < 0.03 and difference.max() < 0.3, (difference.mean(), difference.max())


def test_sliced_decoding_is_close_but_auto_does_not_count_on_it_being_exact(pipe):
    z = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        batched = pipe.vae.decode(z).sample
        pipe.vae.enable_slicing()
        try:
            sliced = pipe.vae.decode(z).sample
        finally:
            pipe.vae.disable_slicing()
    # Measured up to 2.5e-6 apart here (2.4e-5 on SD1.5's VAE shape): rounding, not a different image.
    assert (sliced - batched).abs().max() < 1e-4 * batched.abs().max()


def _photo_files(tmp_path, width, height):
    image, mask = _photo(width, height)
    image.save(tmp_path / "p.png")
    mask.save(tmp_path / "m.png")
    return str(tmp_path / "p.png"), str(tmp_path / "m.png")


def test_the_cli_flag_reaches_the_vae_for_inpaint_and_outpaint(tmp_path, base, decodes):
    models = ["--base", str(base), "--brushnet", str(base / "brushnet"), "--steps", "2"]
    image, mask = _photo_files(tmp_path, 256, 16)  # working size 64x4: two tiles wide
    assert main(["inpaint", image, mask, "-p", "x", "--out", str(tmp_path / "auto.png"), *models]) == 0
    assert main(["inpaint", image, mask, "-p", "x", "--vae-tiling", "on", "--out", str(tmp_path / "on.png"),
                 *models]) == 0
    assert main(["outpaint", image, "--right", "64", "-p", "x", "--vae-tiling", "on",
                 "--out", str(tmp_path / "wide.png"), *models]) == 0
    assert [tiled for _, _, tiled in decodes] == [False, True, True]
    assert [read_png_params(tmp_path / f"{name}.png")["vae_tiling"] for name in ("auto", "on", "wide")] == \
        ["auto", "on", "on"]


def test_every_command_takes_the_flag_and_a_bad_value_is_one_line(tmp_path, capsys):
    parser = build_parser()
    image, mask = _photo_files(tmp_path, 16, 16)
    for argv in (["inpaint", image, mask], ["outpaint", image], ["serve"], ["bench", "somewhere", "--out", "out"]):
        assert parser.parse_args([*argv, "--vae-tiling", "on"]).vae_tiling == "on"
        assert parser.parse_args(argv).vae_tiling == "auto"
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["inpaint", image, mask, "-p", "x", "--vae-tiling", "sometimes"])
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert exit_.value.code == 2 and len(errors) == 1 and "--vae-tiling: invalid choice: 'sometimes'" in errors[0]
    with pytest.raises(ValueError, match="vae_tiling must be one of auto, on, off; got 'yes'"):
        inpaint(None, *_photo(16, 16), InpaintSettings(prompt="x", vae_tiling="yes"))


def test_the_servers_flag_reaches_every_generation(base, decodes):
    from brushnet.serve.command import build_service
    from brushnet.serve.inputs import generation_settings

    args = build_parser().parse_args(["serve", "--models", str(base), "--device", "cpu", "--vae-tiling", "on"])
    service = build_service(args)
    assert service.registry.options.vae_tiling == "on"
    settings = generation_settings("a cat", "", 2, 7.5, 1.0, 0, 1, 3, 1, True, 0, False)
    (result,) = service.run(service.registry.default, *_photo(256, 16), settings)
    assert result.params["vae_tiling"] == "on" and [tiled for _, _, tiled in decodes] == [True]
