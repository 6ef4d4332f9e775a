"""`strength`: below 1 the sampler starts from the image's own latent noised to that fraction of the
schedule (diffusers' inpainting pipelines' start); 1.0 is the plain pipeline, bit for bit."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, UniPCMultistepScheduler
from PIL import Image

from brushnet import StableDiffusionBrushNetPipeline, StableDiffusionXLBrushNetPipeline
from brushnet.inpaint import InpaintSettings, inpaint

PROMPT = "a red cake on the table"
STEPS = 10


@pytest.fixture(scope="module")
def setup(golden):
    case = golden("sd15_tiny_pipeline")
    pipe = StableDiffusionBrushNetPipeline.from_pretrained(case.dir)
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config, final_sigmas_type="sigma_min")
    pipe.set_progress_bar_config(disable=True)
    image = Image.open(case.dir / "init_image.png").convert("RGB")
    mask = Image.open(case.dir / "mask.png").convert("RGB")
    return pipe, image, mask


def run(pipe, image, mask, seed=0, **kwargs):
    kwargs = {"prompt": PROMPT, "num_inference_steps": STEPS, "output_type": "np",
              "generator": torch.Generator().manual_seed(seed), **kwargs}
    return pipe(image=image, mask=mask, **kwargs).images


def hole_distance(pipe, image, mask, **kwargs) -> float:
    """Mean |final latent - the original's latent| over the hole. In latents, since the tiny golden
    VAE is random: its own round trip is as far from the image in pixels as any inpainting."""
    with torch.no_grad():
        pixels = pipe.image_processor.preprocess(image)
        original = pipe.vae.encode(pixels).latent_dist.mode() * pipe.vae.config.scaling_factor
    hole = torch.from_numpy(np.asarray(mask.convert("L")) > 127).float()[None, None]
    hole = torch.nn.functional.interpolate(hole, size=original.shape[-2:])[0, 0] > 0
    latents = torch.as_tensor(run(pipe, image, mask, output_type="latent", **kwargs))
    return float((latents - original).abs()[..., hole].mean())


@pytest.mark.parametrize("scheduler", ["unipc", "ddim"])
def test_strength_one_is_the_plain_pipeline_bit_for_bit(setup, scheduler):
    pipe, image, mask = setup
    if scheduler == "ddim":
        pipe = StableDiffusionBrushNetPipeline(**{**pipe.components,
                                                  "scheduler": DDIMScheduler.from_config(pipe.scheduler.config)})
        pipe.set_progress_bar_config(disable=True)
    assert np.array_equal(run(pipe, image, mask), run(pipe, image, mask, strength=1.0))


def test_lower_strength_stays_closer_to_the_original_in_the_hole(setup):
    pipe, image, mask = setup
    distances = {s: hole_distance(pipe, image, mask, strength=s) for s in (1.0, 0.6, 0.3)}
    # Measured: 12.4, 1.96, 0.74.
    assert distances[0.3] < 0.5 * distances[0.6] and distances[0.6] < 0.25 * distances[1.0], distances


def test_strength_runs_its_fraction_of_the_steps(setup):
    pipe, image, mask = setup
    steps = []
    run(pipe, image, mask, strength=0.3, callback_on_step_end=lambda p, i, t, kw: steps.append(int(t)) or {})
    assert len(steps) == 3
    pipe.scheduler.set_timesteps(STEPS)
    assert steps == [int(t) for t in pipe.scheduler.timesteps[-3:]]


def test_given_latents_are_the_noise(setup):
    pipe, image, mask = setup
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    seeded = run(pipe, image, mask, strength=0.5, seed=3)
    assert np.array_equal(run(pipe, image, mask, strength=0.5, latents=noise, seed=9), seeded)


@pytest.mark.parametrize("strength, message", [
    (0.0, r"strength must be a number in \(0, 1\]; got 0.0"),
    (1.5, r"strength must be a number in \(0, 1\]"),
    (float("nan"), "strength must be a number"),
    (0.05, r"strength=0.05 of num_inference_steps=10 leaves no denoising step: use strength >= 0.1"),
])
def test_bad_strength_is_refused(setup, strength, message):
    pipe, image, mask = setup
    with pytest.raises(ValueError, match=message):
        run(pipe, image, mask, strength=strength)


def test_inpaint_settings_pass_strength():
    """The built-in demo model (a trained VAE, so pixels tell) asked to paint another shape: at a
    low strength the hole keeps much of the original's colours."""
    from brushnet.demo.model import load_demo_pipeline
    from brushnet.demo.scenes import HELDOUT_SEEDS, make_scene, removal_example

    pipe = load_demo_pipeline()
    pipe.set_progress_bar_config(disable=True)
    scene = make_scene(HELDOUT_SEEDS[1])
    mask = removal_example(scene, len(scene.shapes) - 1).mask
    hole = np.asarray(mask) > 127
    original = np.asarray(scene.image, dtype=np.float32)
    distance = {}
    for strength in (1.0, 0.3):
        settings = InpaintSettings(prompt="a green square", steps=STEPS, blend=False, seed=1, strength=strength)
        result = np.asarray(inpaint(pipe, scene.image, mask, settings)[0], dtype=np.float32)
        distance[strength] = np.abs(result - original)[hole].mean()
    assert distance[0.3] < 0.5 * distance[1.0], distance  # measured 39 and 125 (of 255)
    with pytest.raises(ValueError, match="strength must be a number in"):
        inpaint(pipe, scene.image, mask, InpaintSettings(prompt=PROMPT, strength=0))


def test_sdxl_strength(golden):
    case = golden("sdxl_tiny_pipeline")
    pipe = StableDiffusionXLBrushNetPipeline.from_pretrained(case.dir)
    pipe.set_progress_bar_config(disable=True)
    image = Image.open(case.dir / "init_image.png").convert("RGB")
    mask = Image.open(case.dir / "mask.png").convert("RGB")
    assert np.array_equal(run(pipe, image, mask), run(pipe, image, mask, strength=1.0))
    assert hole_distance(pipe, image, mask, strength=0.3) < 0.5 * hole_distance(pipe, image, mask)


def test_strength_on_the_command_line_is_checked_before_loading(tmp_path, capsys):
    from brushnet.cli import main

    Image.new("RGB", (16, 16)).save(tmp_path / "p.png")
    Image.new("L", (16, 16), 255).save(tmp_path / "m.png")
    assert main(["inpaint", str(tmp_path / "p.png"), str(tmp_path / "m.png"), "-p", "x", "--strength", "0",
                 "--out", str(tmp_path / "r.png")]) == 2
    assert "--strength must be a number in (0, 1]; got 0.0" in capsys.readouterr().err
