"""sigmas=: a schedule given as noise levels (diffusers' keyword), and schedulers that cannot run."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

from brushnet import StableDiffusionBrushNetPipeline, StableDiffusionXLBrushNetPipeline


@pytest.fixture(scope="module", params=[("sd15_tiny_pipeline", StableDiffusionBrushNetPipeline),
                                        ("sdxl_tiny_pipeline", StableDiffusionXLBrushNetPipeline)],
                ids=["sd15", "sdxl"])
def case(request, golden_pipeline):
    pipe, image, mask = golden_pipeline(*request.param)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    return pipe, image, mask


def run(case, **kwargs):
    pipe, image, mask = case
    return pipe(prompt="a red cake", image=image, mask=mask, output_type="np",
                generator=torch.Generator().manual_seed(0), **kwargs).images


def test_sigmas_give_the_schedule_they_name(case):
    pipe = case[0]
    pipe.scheduler.set_timesteps(3)
    levels = [float(s) for s in pipe.scheduler.sigmas]  # the last, 0, is where the schedule ends
    np.testing.assert_allclose(run(case, sigmas=levels), run(case, num_inference_steps=3), atol=1e-5)
    assert np.abs(run(case, sigmas=levels[1:]) - run(case, sigmas=levels)).max() > 1e-3


@pytest.mark.parametrize("sigmas, message", [([], "at least one"), ([1.0, 5.0], "must go down"),
                                             ([float("nan")], "finite"), ("x", "a list of numbers")])
def test_bad_sigmas_are_one_line(case, sigmas, message):
    with pytest.raises(ValueError, match=message):
        run(case, sigmas=sigmas)


def test_schedulers_that_cannot_run_are_named(case):
    pipe = case[0]
    original = pipe.scheduler
    try:
        with pytest.raises(ValueError, match="Give `timesteps` or `sigmas`, not both"):
            run(case, sigmas=[5.0, 1.0], timesteps=[999, 500])
        pipe.scheduler = DDIMScheduler.from_config(original.config)
        with pytest.raises(ValueError, match="DDIMScheduler takes no custom `sigmas`"):
            run(case, sigmas=[5.0, 1.0])
        pipe.scheduler = FlowMatchEulerDiscreteScheduler()  # an AttributeError on init_noise_sigma before
        with pytest.raises(ValueError, match="FlowMatchEulerDiscreteScheduler is not a diffusion scheduler"):
            run(case, num_inference_steps=2)
    finally:
        pipe.scheduler = original
