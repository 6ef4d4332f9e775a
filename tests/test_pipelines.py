"""Pipeline behaviour beyond the goldens: inputs, masks, CFG sharing, blending, loading, errors."""

import json
import logging

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, UniPCMultistepScheduler
from PIL import Image

from brushnet import (
    BrushNetModel,
    StableDiffusionBrushNetPipeline,
    StableDiffusionXLBrushNetPipeline,
    blend,
    unet_forward,
)
from brushnet.masks import latent_keep_mask
from brushnet.pipelines.blending import blur_mask

PROMPT = "a red cake on the table"


@pytest.fixture(scope="module")
def setup(golden):
    case = golden("sd15_tiny_pipeline")
    pipe = StableDiffusionBrushNetPipeline.from_pretrained(case.dir)
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config, final_sigmas_type="sigma_min")
    pipe.set_progress_bar_config(disable=True)
    images = {name: Image.open(case.dir / f"{name}.png").convert("RGB") for name in ("init_image", "masked_image", "mask")}
    return case, pipe, images


def run(pipe, image, mask, seed=0, **kwargs):
    kwargs = {"prompt": PROMPT, "num_inference_steps": 3, "output_type": "np",
              "generator": torch.Generator().manual_seed(seed), **kwargs}
    return pipe(image=image, mask=mask, **kwargs).images


def test_shared_cfg_branch_equals_running_it_on_both_halves(setup, monkeypatch):
    _, pipe, images = setup
    shared = run(pipe, images["masked_image"], images["mask"], negative_prompt="blurry")

    def reference_step(latent_model_input, t, prompt_embeds, conditioning, scale, *, guess_mode, unet_kwargs,
                       brushnet_added_cond_kwargs=None):
        # The reference: the branch on the full CFG batch, conditioning duplicated.
        down, mid, up = pipe.brushnet(latent_model_input, t, encoder_hidden_states=prompt_embeds,
                                      brushnet_cond=torch.cat([conditioning] * 2), conditioning_scale=scale,
                                      return_dict=False)
        return unet_forward(pipe.unet, latent_model_input, t, prompt_embeds, down_block_add_samples=down,
                            mid_block_add_sample=mid, up_block_add_samples=up, **unet_kwargs)

    monkeypatch.setattr(pipe, "predict_noise", reference_step)
    full = run(pipe, images["masked_image"], images["mask"], negative_prompt="blurry")
    assert np.abs(shared - full).max() < 1e-5


def test_original_or_premasked_image_give_the_same_result(setup):
    _, pipe, images = setup
    assert not np.array_equal(np.asarray(images["init_image"]), np.asarray(images["masked_image"]))
    a = run(pipe, images["init_image"], images["mask"])
    b = run(pipe, images["masked_image"], images["mask"])
    assert np.array_equal(a, b)


def test_mask_formats_agree(setup):
    _, pipe, images = setup
    mask_rgb = images["mask"]
    hole = np.asarray(mask_rgb.convert("L")) > 127
    rgba = Image.new("RGBA", mask_rgb.size, (0, 0, 0, 0))
    rgba.putalpha(Image.fromarray((hole * 255).astype(np.uint8)))
    expected = run(pipe, images["masked_image"], mask_rgb)
    variants = {
        "L": mask_rgb.convert("L"),
        "RGBA alpha": rgba,
        "1-bit": mask_rgb.convert("1"),
        "numpy float HW": hole.astype(np.float32),
        "numpy uint8 HWC": np.asarray(mask_rgb),
        "torch 1HW": torch.from_numpy(hole.astype(np.float32))[None],
    }
    for name, mask in variants.items():
        assert np.array_equal(run(pipe, images["masked_image"], mask), expected), name
    inverted = run(pipe, images["masked_image"], Image.fromarray(((~hole) * 255).astype(np.uint8)))
    assert not np.array_equal(inverted, expected)


def test_mask_image_alias_and_unknown_keywords(setup):
    _, pipe, images = setup
    a = run(pipe, images["masked_image"], None, mask_image=images["mask"])
    b = run(pipe, images["masked_image"], images["mask"])
    assert np.array_equal(a, b)
    with pytest.raises(TypeError, match="same argument"):
        run(pipe, images["masked_image"], images["mask"], mask_image=images["mask"])
    with pytest.raises(TypeError, match="conditioning_sclae"):
        run(pipe, images["masked_image"], images["mask"], conditioning_sclae=0.5)


def test_seed_alone_fixes_the_result(setup):
    _, pipe, images = setup
    torch.manual_seed(1)
    a = run(pipe, images["masked_image"], images["mask"], seed=7)
    torch.manual_seed(2)
    b = run(pipe, images["masked_image"], images["mask"], seed=7)
    assert np.array_equal(a, b)


def test_batches_of_prompts_and_images(setup):
    _, pipe, images = setup
    out = run(pipe, [images["masked_image"], images["init_image"]], images["mask"],
              prompt=[PROMPT, "a blue cup"], num_images_per_prompt=2,
              generator=[torch.Generator().manual_seed(i) for i in range(4)])
    assert out.shape == (4, 32, 32, 3)
    single = pipe(prompt=PROMPT, image=images["masked_image"], mask=images["mask"], num_inference_steps=3,
                  output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert np.abs(out[0] - single[0]).max() < 1e-5


@pytest.mark.parametrize("kwargs, message", [
    ({"height": 31, "width": 32}, "multiple of 2"),  # the tiny VAE's scale factor; 8 for real models
    ({"control_guidance_start": 0.6, "control_guidance_end": 0.4}, "control_guidance_start must be less than"),
    ({"prompt": ["a", "b"], "image_count": 3}, "3 images for 2 prompts"),
    ({"generator": [torch.Generator(), torch.Generator()]}, "2 generators"),
    ({"blend": True, "blend_kernel": 4}, "odd"),
])
def test_bad_inputs_raise_clear_errors(setup, kwargs, message):
    _, pipe, images = setup
    kwargs = dict(kwargs)
    image = [images["masked_image"]] * kwargs.pop("image_count", 1)
    with pytest.raises(ValueError, match=message):
        pipe(**{"prompt": PROMPT, "image": image, "mask": images["mask"], "num_inference_steps": 2, **kwargs})


def test_mask_of_another_size_is_refused(setup):
    _, pipe, images = setup
    with pytest.raises(ValueError, match="same size as the image"):
        run(pipe, images["masked_image"], images["mask"].resize((40, 32)))


def test_mask_without_hole_warns(setup, caplog):
    _, pipe, images = setup
    with caplog.at_level(logging.WARNING, logger="brushnet"):
        run(pipe, images["masked_image"], Image.new("L", (32, 32), 0), num_inference_steps=1)
    assert "no hole" in caplog.text


def test_sdxl_brushnet_with_sd15_unet_is_refused_before_denoising(setup, golden):
    _, pipe, images = setup
    sdxl_brushnet = BrushNetModel.from_pretrained(golden("sdxl_tiny_model").dir / "brushnet")
    wrong = StableDiffusionBrushNetPipeline(**{**pipe.components, "brushnet": sdxl_brushnet})
    called = []
    wrong.unet.register_forward_pre_hook(lambda *a: called.append(1))
    with pytest.raises(ValueError, match="it is an SDXL BrushNet, the base is SD1.5"):
        run(wrong, images["masked_image"], images["mask"])
    assert not called
    for handle in list(wrong.unet._forward_pre_hooks):
        del wrong.unet._forward_pre_hooks[handle]
    with pytest.raises(ValueError, match="it is an SDXL BrushNet"):
        StableDiffusionBrushNetPipeline.from_pretrained(golden("sd15_tiny_pipeline").dir, brushnet=sdxl_brushnet)


def test_blur_matches_opencv():
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(0)
    mask = np.zeros((48, 64))
    mask[10:30, 20:50] = 1
    mask[rng.random(mask.shape) > 0.97] = 1
    ours = blur_mask(torch.from_numpy(mask)[None, None], 21)[0, 0].numpy()
    theirs = cv2.GaussianBlur(mask * 255, (21, 21), 0) / 255
    assert np.abs(ours - theirs).max() < 1e-6


def test_blend_function_keeps_far_pixels_and_fills_the_hole():
    rng = np.random.default_rng(1)
    original = Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8))
    generated = Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8))
    mask = np.zeros((40, 50), dtype=np.uint8)
    mask[15:25, 20:30] = 255
    out = np.asarray(blend(original, generated, Image.fromarray(mask)))
    assert np.array_equal(out[15:25, 20:30], np.asarray(generated)[15:25, 20:30])
    assert np.array_equal(out[:, :5], np.asarray(original)[:, :5])
    seam = out[12, 25].astype(int)
    assert not np.array_equal(seam, np.asarray(original)[12, 25]) or not np.array_equal(seam, np.asarray(generated)[12, 25])


def test_blend_computes_only_the_holes_window_and_equals_the_whole_image_blend():
    # The whole photo in float64 was 175 bytes a pixel (a 144-megapixel photo was killed for memory);
    # the window around the hole gives the same pixels, holes at the borders and tiny images included.
    from brushnet.pipelines.blending import blend_tensors, blend_window

    def whole(original, generated, mask, kernel):  # the formula on the whole image, as it was done
        nchw = lambda a: torch.from_numpy(a.astype(np.float64).transpose(2, 0, 1) / 255)[None]  # noqa: E731
        out = blend_tensors(nchw(original), nchw(generated), torch.from_numpy(mask / 255.0)[None, None], kernel)
        return np.clip(np.round(out[0].permute(1, 2, 0).numpy() * 255), 0, 255).astype(np.uint8)

    rng = np.random.default_rng(3)
    for trial in range(60):
        h, w = (int(v) for v in rng.integers(1, 80, 2))
        kernel = int(rng.choice([1, 3, 7, 21]))
        original, generated = (rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(2))
        mask = np.zeros((h, w), np.uint8)
        y, x = int(rng.integers(0, h)), int(rng.integers(0, w))
        mask[y:y + int(rng.integers(1, 9)), x:x + int(rng.integers(1, 9))] = 255
        if trial % 3 == 0:
            mask[:, :1] = 255  # along a border
        ours = blend(Image.fromarray(original), Image.fromarray(generated), Image.fromarray(mask), kernel)
        np.testing.assert_array_equal(np.asarray(ours), whole(original, generated, mask, kernel))
    hole = np.zeros((4000, 6000), bool)
    hole[2000:2400, 2000:2400] = True
    assert blend_window(hole, 21) == (1980, 2420, 1980, 2420)


def test_pipeline_blend(setup):
    _, pipe, images = setup
    plain = run(pipe, images["init_image"], images["mask"])
    blended = run(pipe, images["init_image"], images["mask"], blend=True)
    hole = np.asarray(images["mask"].convert("L")) > 127
    soft = blur_mask(torch.from_numpy(hole.astype(np.float64))[None, None], 21)[0, 0].numpy()
    far = (soft < 1e-12) & ~hole
    original = np.asarray(images["init_image"]).astype(np.float32) / 255
    assert far.any() and hole.any()
    assert np.abs(blended[0][far] - original[far]).max() < 1e-6
    assert np.abs(blended[0][hole] - plain[0][hole]).max() < 1e-6


def test_save_and_reload_pipeline(setup, tmp_path):
    _, pipe, images = setup
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["brushnet"] == ["diffusers", "BrushNetModel"]  # the reference's layout
    reloaded = StableDiffusionBrushNetPipeline.from_pretrained(tmp_path)
    reloaded.set_progress_bar_config(disable=True)
    assert np.array_equal(run(reloaded, images["masked_image"], images["mask"]),
                          run(pipe, images["masked_image"], images["mask"]))


def test_base_model_folder_plus_brushnet(setup, tmp_path):
    case, pipe, images = setup
    parts = {k: v for k, v in pipe.components.items() if k not in ("brushnet", "image_encoder")}
    StableDiffusionPipeline(**parts, requires_safety_checker=False).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="base model"):
        StableDiffusionBrushNetPipeline.from_pretrained(tmp_path)
    loaded = StableDiffusionBrushNetPipeline.from_pretrained(
        tmp_path, brushnet=BrushNetModel.from_pretrained(case.dir / "brushnet"))
    loaded.scheduler = pipe.scheduler
    loaded.set_progress_bar_config(disable=True)
    assert loaded.safety_checker is None
    assert np.array_equal(run(loaded, images["masked_image"], images["mask"]),
                          run(pipe, images["masked_image"], images["mask"]))


def test_ip_adapter_works_with_brushnet(setup, tmp_path):
    from safetensors.torch import save_file

    _, pipe, images = setup
    torch.manual_seed(0)
    cross_dim, clip_dim = pipe.unet.config.cross_attention_dim, 16
    state = {"image_proj.proj.weight": torch.randn(4 * cross_dim, clip_dim) * 0.2,
             "image_proj.proj.bias": torch.zeros(4 * cross_dim),
             "image_proj.norm.weight": torch.ones(cross_dim), "image_proj.norm.bias": torch.zeros(cross_dim)}
    cross_attentions = [pipe.unet.get_submodule(name.removesuffix(".processor"))
                        for name in pipe.unet.attn_processors if not name.endswith("attn1.processor")]
    for i, attention in enumerate(cross_attentions):  # diffusers numbers them 1, 3, 5, ...
        hidden = attention.to_k.out_features
        state[f"ip_adapter.{1 + 2 * i}.to_k_ip.weight"] = torch.randn(hidden, cross_dim) * 0.2
        state[f"ip_adapter.{1 + 2 * i}.to_v_ip.weight"] = torch.randn(hidden, cross_dim) * 0.2
    save_file(state, tmp_path / "ip.safetensors")
    embeds = [torch.randn(2, 1, clip_dim)]  # [negative; positive] image embeddings
    baseline = run(pipe, images["masked_image"], images["mask"])
    pipe.load_ip_adapter(str(tmp_path), subfolder="", weight_name="ip.safetensors", image_encoder_folder=None)
    try:
        pipe.set_ip_adapter_scale(1.0)
        with_ip = run(pipe, images["masked_image"], images["mask"], ip_adapter_image_embeds=embeds)
        pipe.set_ip_adapter_scale(0.0)
        silent = run(pipe, images["masked_image"], images["mask"], ip_adapter_image_embeds=embeds)
    finally:
        pipe.unload_ip_adapter()
    assert np.abs(with_ip - baseline).max() > 1e-3
    assert np.abs(silent - baseline).max() < 1e-5


def test_sdxl_pipeline_rejects_sd15_brushnet(golden):
    case = golden("sdxl_tiny_pipeline")
    sd15_brushnet = BrushNetModel.from_pretrained(golden("sd15_tiny_model").dir / "brushnet")
    with pytest.raises(ValueError, match="it is an SD1.5 BrushNet"):
        StableDiffusionXLBrushNetPipeline.from_pretrained(case.dir, brushnet=sd15_brushnet)


# -- the branch's mask at latent size ------------------------------------------------------------

def test_latent_keep_mask_nearest_is_the_reference_and_max_marks_every_touched_cell():
    keep = torch.ones(1, 1, 16, 16)
    keep[0, 0, 5, 2:14] = 0  # a 1-pixel stroke, thinner than the 4-pixel cells below
    assert torch.equal(latent_keep_mask(keep, (4, 4), "nearest"), torch.nn.functional.interpolate(keep, size=(4, 4)))
    assert latent_keep_mask(keep, (4, 4), "nearest").min() == 1  # the reference loses the stroke
    expected = torch.ones(4, 4)
    expected[1, :] = 0  # row 5 is in the second row of cells, columns 2-13 touch all four
    assert torch.equal(latent_keep_mask(keep, (4, 4), "max")[0, 0], expected)
    with pytest.raises(ValueError, match="mask_downsampling"):
        latent_keep_mask(keep, (4, 4), "bilinear")


def test_the_branch_config_picks_the_latent_mask(setup, tmp_path):
    _, pipe, images = setup
    assert pipe.brushnet.config.mask_downsampling == "nearest"  # a config without the field: the reference's
    side, factor = images["init_image"].size[0], pipe.vae_scale_factor
    cells = side // factor
    stroke = np.zeros((side, side), dtype=np.uint8)
    stroke[3 * factor + 1, :] = 255  # 1 px high, off the row nearest sampling takes
    mask = Image.fromarray(stroke)
    _, _, nearest = pipe.prepare_brushnet_inputs(images["init_image"], mask, side, side, 1, "cpu")
    assert nearest[0, -1].min() == 1
    pipe.brushnet.save_pretrained(tmp_path / "branch")
    config = json.loads((tmp_path / "branch" / "config.json").read_text())
    config["mask_downsampling"] = "max"
    (tmp_path / "branch" / "config.json").write_text(json.dumps(config))
    branch = BrushNetModel.from_pretrained(tmp_path / "branch")
    assert branch.config.mask_downsampling == "max"
    maxed = StableDiffusionBrushNetPipeline(**{**pipe.components, "brushnet": branch})
    _, _, conditioning = maxed.prepare_brushnet_inputs(images["init_image"], mask, side, side, 1, "cpu")
    assert torch.equal(conditioning[0, -1, 3], torch.zeros(cells)), "the stroke's cells are not marked hole"
    assert conditioning[0, -1].sum() == cells * cells - cells and torch.equal(conditioning[0, :-1], nearest[0, :-1])
    with pytest.raises(ValueError, match="mask_downsampling"):
        BrushNetModel(block_out_channels=(32, 64), down_block_types=("DownBlock2D",) * 2,
                      up_block_types=("UpBlock2D",) * 2, norm_num_groups=8, mask_downsampling="area")
