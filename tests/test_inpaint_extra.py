"""InpaintSettings.extra: further pipeline keywords, a step-end callback among them."""

import numpy as np
import pytest
from diffusers.callbacks import SDCFGCutoffCallback

from brushnet import StableDiffusionBrushNetPipeline
from brushnet.inpaint import InpaintSettings, check_settings, inpaint

STEPS = 4


@pytest.fixture(scope="module")
def case(golden_pipeline):
    return golden_pipeline("sd15_tiny_pipeline", StableDiffusionBrushNetPipeline)


def run(case, progress=None, **extra):
    pipe, image, mask = case
    settings = InpaintSettings(prompt="a red cake", steps=STEPS, seed=3, blend=False, extra=extra)
    return np.asarray(inpaint(pipe, image, mask, settings, callback=progress)[0], dtype=np.float32)


def test_a_step_end_callback_in_extra_runs_beside_the_progress_report(case):
    seen, reported = [], []

    def halve(pipe, i, t, kwargs):
        seen.append(i)
        return {"latents": kwargs["latents"] * 0.5}

    plain = run(case)
    halved = run(case, progress=lambda step, total: reported.append((step, total)), callback_on_step_end=halve)
    assert seen == list(range(STEPS))
    assert reported == [(k + 1, STEPS) for k in range(STEPS)]
    assert np.abs(halved - plain).max() > 10  # its latents were used


def test_a_diffusers_callback_in_extra_keeps_the_tensors_it_names(case):
    # SDCFGCutoffCallback needs prompt_embeds handed to it: wrapped beside the progress report, it
    # must still get them (the pipeline hands only latents unless told).
    cutoff = SDCFGCutoffCallback(cutoff_step_ratio=0.5)
    alone = run(case, callback_on_step_end=cutoff)
    with_progress = run(case, progress=lambda step, total: None, callback_on_step_end=cutoff)
    np.testing.assert_array_equal(alone, with_progress)
    assert np.abs(alone - run(case)).max() > 1  # guidance did stop half-way


@pytest.mark.parametrize("keyword, field", [("guidance_scale", "guidance"), ("num_inference_steps", "steps"),
                                            ("generator", "seed"), ("height", None)])
def test_keywords_inpaint_sets_itself_are_refused_in_extra(keyword, field):
    with pytest.raises(ValueError) as error:
        check_settings(InpaintSettings(prompt="x", extra={keyword: 1}))
    message = str(error.value)
    assert keyword in message and "\n" not in message
    assert (f"set {field} instead" in message) if field else "leave it out" in message
