"""BrushNetModel, from_unet and unet_forward against the reference's outputs on tiny models."""

import json

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file

from brushnet import BrushNetModel, unet_forward

MODEL_REL = 1e-5


@pytest.fixture(scope="module", params=["sd15_tiny_model", "sdxl_tiny_model"])
def model_case(request, golden):
    case = golden(request.param)
    unet = UNet2DConditionModel.from_pretrained(case.dir / "unet")
    brushnet = BrushNetModel.from_pretrained(case.dir / "brushnet")
    inputs = case.inputs
    timestep = inputs["timestep"] if "timestep" in inputs else case.case["timestep"]
    added = {"text_embeds": inputs["text_embeds"], "time_ids": inputs["time_ids"]} if "text_embeds" in inputs else None
    return case, unet, brushnet, timestep, added


def _residuals(case, brushnet, timestep, added, run):
    with torch.no_grad():
        return brushnet(
            case.inputs["sample"], timestep, case.inputs["encoder_hidden_states"], case.inputs["brushnet_cond"],
            conditioning_scale=run["conditioning_scale"], guess_mode=run["guess_mode"],
            added_cond_kwargs=added, return_dict=False,
        )


def test_every_residual_and_noise_prediction(model_case):
    case, unet, brushnet, timestep, added = model_case
    first = None
    for run in case.case["runs"]:
        prefix = run["prefix"]
        down, mid, up = _residuals(case, brushnet, timestep, added, run)
        first = case.check_residuals(prefix, (down, mid, up), first, MODEL_REL)
        with torch.no_grad():
            noise = unet_forward(unet, case.inputs["sample"], timestep, case.inputs["encoder_hidden_states"],
                                 down_block_add_samples=down, mid_block_add_sample=mid, up_block_add_samples=up,
                                 added_cond_kwargs=added)
        # unet_forward itself is held to 1e-6 relative (the reference's own 1- vs 2-thread spread).
        case.check(f"{prefix}.noise_pred", noise, 1e-6)


def test_plain_unet_matches(model_case):
    case, unet, _, timestep, added = model_case
    with torch.no_grad():
        noise = unet(case.inputs["sample"], timestep, case.inputs["encoder_hidden_states"],
                     added_cond_kwargs=added).sample
    case.check("unet_plain.noise_pred", noise, 1e-6)


def test_guess_mode_multipliers_are_log_spaced(model_case):
    case, *_ = model_case
    n = case.case["n_down_residuals"] + 1 + case.case["n_up_residuals"]
    for run in case.case["runs"]:
        if run["guess_mode"]:
            expected = torch.logspace(-1, 0, n, dtype=torch.float64) * run["conditioning_scale"]
            assert torch.allclose(case[f"{run['prefix']}.residual_multipliers"], expected, rtol=1e-5)


# The one field our configs add to the reference's: how the branch's mask reaches latent size
# ("nearest", the reference's, unless a BrushNet was trained otherwise); the reference's code
# ignores it with a warning.
OUR_FIELDS = {"mask_downsampling": "nearest"}


def _public_config(config) -> dict:
    """The reference's fields of `config` (ours checked to hold the reference's behaviour)."""
    public = {k: v for k, v in json.loads(json.dumps(dict(config))).items() if not k.startswith("_")}
    for key, value in OUR_FIELDS.items():
        assert public.pop(key, value) == value, key
    return public


def test_from_unet_sd15_reproduces_reference_state(golden):
    case = golden("from_unet")
    unet = UNet2DConditionModel.from_pretrained(golden("sd15_tiny_model").dir / "unet")
    brushnet = BrushNetModel.from_unet(unet)
    expected = load_file(case.dir / "brushnet" / "diffusion_pytorch_model.safetensors")
    state = brushnet.state_dict()
    assert set(state) == set(expected)
    for key, value in expected.items():
        assert torch.equal(state[key], value), key
    assert _public_config(brushnet.config) == case.case["info"]["sd15"]["brushnet_config"]


def test_from_unet_does_not_tie_conv_in_bias(golden):
    unet = UNet2DConditionModel.from_pretrained(golden("sd15_tiny_model").dir / "unet")
    brushnet = BrushNetModel.from_unet(unet)
    assert brushnet.conv_in_condition.bias is not unet.conv_in.bias
    assert torch.equal(brushnet.conv_in_condition.bias, unet.conv_in.bias)
    unet.requires_grad_(False)
    assert brushnet.conv_in_condition.bias.requires_grad
    with torch.no_grad():
        unet.conv_in.bias.add_(1.0)
    assert not torch.equal(brushnet.conv_in_condition.bias, unet.conv_in.bias)


def test_from_unet_sdxl_follows_reference_mapping(golden):
    case = golden("from_unet")
    unet = UNet2DConditionModel.from_pretrained(golden("sdxl_tiny_model").dir / "unet")
    brushnet = BrushNetModel.from_unet(unet)
    expected_config = json.loads((case.dir / "brushnet_sdxl_config.json").read_text())
    expected_config = {k: v for k, v in expected_config.items() if not k.startswith("_")}
    assert _public_config(brushnet.config) == expected_config
    mapping = json.loads((case.dir / "mapping_sdxl.json").read_text())
    state, unet_state = brushnet.state_dict(), unet.state_dict()
    assert set(state) == set(mapping)
    for key, rule in mapping.items():
        if rule["rule"] == "copy":
            assert torch.equal(state[key], unet_state[rule["source"]]), key
        elif rule["rule"] == "zeros":
            assert not state[key].any(), key
        elif rule["rule"] == "concat_in_channels":
            w = unet_state["conv_in.weight"]
            assert torch.equal(state[key], torch.cat([w, w, torch.zeros_like(w[:, :1])], dim=1))
        else:
            assert rule["rule"] == "fresh_init" and key.startswith("add_embedding.")


def test_save_and_load_keep_the_released_format(golden, tmp_path):
    source = golden("sd15_tiny_model").dir / "brushnet"
    brushnet = BrushNetModel.from_pretrained(source)
    brushnet.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "diffusion_pytorch_model.safetensors")
    original = load_file(source / "diffusion_pytorch_model.safetensors")
    assert set(saved) == set(original)
    assert all(torch.equal(saved[k], original[k]) for k in original)
    config = json.loads((tmp_path / "config.json").read_text())
    original_config = json.loads((source / "config.json").read_text())
    assert config["_class_name"] == "BrushNetModel"
    assert _public_config(config) == {k: v for k, v in original_config.items() if not k.startswith("_")}


def test_unknown_block_types_are_refused_clearly():
    # Attention blocks are PowerPaint's (tests/test_powerpaint.py); other types exist in no release.
    with pytest.raises(ValueError, match="Unknown BrushNet block types"):
        BrushNetModel(down_block_types=("SimpleCrossAttnDownBlock2D",) * 4, block_out_channels=(8, 16, 16, 16),
                      norm_num_groups=4)
