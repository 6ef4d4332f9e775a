"""LoRAs of the base model through diffusers' own loading (`--lora`), with the branch: they change
the result at weight 1 and not at weight 0, and few-step schedulers (LCM, TCD) run."""

import numpy as np
import pytest
import torch
from PIL import Image

from brushnet.cli import main
from brushnet.metadata import read_png_params


@pytest.fixture(scope="module")
def lora_file(golden, tmp_path_factory):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    case = golden("sd15_tiny_pipeline")
    unet = UNet2DConditionModel.from_pretrained(case.dir / "unet")
    torch.manual_seed(0)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():  # large enough to show in a 2-step image
        for name, parameter in unet.named_parameters():
            if "lora_B" in name:
                parameter.mul_(20)
    folder = tmp_path_factory.mktemp("lora")
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(unet))
    return folder / "pytorch_lora_weights.safetensors"


def _inpaint(golden, tmp_path, name, *extra):
    case = golden("sd15_tiny_pipeline")
    out = tmp_path / f"{name}.png"
    assert main(["inpaint", str(case.dir / "init_image.png"), str(case.dir / "mask.png"), "-p", "a red cake",
                 "--base", str(case.dir), "--brushnet", str(case.dir / "brushnet"), "--steps", "2", "--seed", "0",
                 "--dtype", "fp32", "--out", str(out), *extra]) == 0
    return np.asarray(Image.open(out), dtype=int), out


def test_a_lora_changes_the_result_by_its_weight(golden, tmp_path, lora_file):
    plain, _ = _inpaint(golden, tmp_path, "plain")
    with_lora, out = _inpaint(golden, tmp_path, "lora", "--lora", str(lora_file))
    off, _ = _inpaint(golden, tmp_path, "off", "--lora", f"{lora_file}:0")
    assert np.abs(with_lora - plain).max() > 2
    assert np.abs(off - plain).max() <= 1
    assert read_png_params(out)["loras"][0]["file"] == lora_file.name


@pytest.mark.parametrize("scheduler", ["lcm", "tcd"])
def test_few_step_schedulers_with_a_lora(golden, tmp_path, lora_file, scheduler):
    result, out = _inpaint(golden, tmp_path, scheduler, "--lora", str(lora_file), "--scheduler", scheduler,
                           "--steps", "4", "--guidance", "1")
    assert result.std() > 0 and read_png_params(out)["scheduler"] == scheduler


def test_lora_mistakes_are_one_line(golden, tmp_path, lora_file, capsys):
    case = golden("sd15_tiny_pipeline")
    run = ["inpaint", str(case.dir / "init_image.png"), str(case.dir / "mask.png"), "-p", "x", "--base", str(case.dir),
           "--brushnet", str(case.dir / "brushnet"), "--steps", "1", "--out", str(tmp_path / "x.png")]
    (tmp_path / "notes.safetensors").write_text("not a lora")
    torch.save({}, tmp_path / "old.bin")
    for extra, message in ((["--lora", str(tmp_path / "nope.safetensors")], "does not exist"),
                           (["--lora", str(tmp_path / "old.bin")], "not a .safetensors file"),
                           (["--lora", str(tmp_path / "notes.safetensors")], "could not be loaded into this base"),
                           (["--lora", f"{lora_file}:50"], "weight must be a number in [-10, 10]"),
                           (["--lora", f"{lora_file}:strong"], "'strong' is not a weight; give FILE[:WEIGHT]")):
        capsys.readouterr()
        assert main([*run, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
