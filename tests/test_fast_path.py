"""The compiled fast path (`enable_fast_path`, `--compile`): the same images as eager, and no
recompilation between calls of the same shapes, on the tiny golden models."""

import numpy as np
import pytest
import torch
from PIL import Image

from brushnet import StableDiffusionBrushNetPipeline, StableDiffusionXLBrushNetPipeline
from brushnet.pipelines import base

BACKEND = "aot_eager"  # dynamo's capture and guards as with inductor, without the C++ compile time


@pytest.fixture(autouse=True)
def fresh_dynamo(monkeypatch):
    monkeypatch.setattr(base, "COMPILE_BACKEND", BACKEND)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _inputs(case):
    return Image.open(case.dir / "init_image.png").convert("RGB"), Image.open(case.dir / "mask.png")


def _run(pipe, image, mask, **kwargs):
    kwargs = {"prompt": "a red cake on the table", "num_inference_steps": 3, "output_type": "np",
              "generator": torch.Generator().manual_seed(0), **kwargs}
    return pipe(image=image, mask=mask, **kwargs).images


@pytest.mark.parametrize("case_name, pipeline_class", [
    ("sd15_tiny_pipeline", StableDiffusionBrushNetPipeline),
    ("sdxl_tiny_pipeline", StableDiffusionXLBrushNetPipeline),
])
def test_compiled_equals_eager_and_never_recompiles(golden, case_name, pipeline_class):
    case = golden(case_name)
    image, mask = _inputs(case)
    eager, fast = (pipeline_class.from_pretrained(case.dir) for _ in range(2))
    for pipe in (eager, fast):
        pipe.set_progress_bar_config(disable=True)
    fast.enable_fast_path()
    assert isinstance(fast.unet, torch._dynamo.eval_frame.OptimizedModule)
    assert isinstance(fast.brushnet, torch._dynamo.eval_frame.OptimizedModule)
    # Warm-up: the UNet with residuals, and without them (steps that start/end switch off).
    for warm_up in ({}, {"control_guidance_end": 0.5}):
        assert np.abs(_run(fast, image, mask, **warm_up) - _run(eager, image, mask, **warm_up)).max() < 1e-5
    # Everything a user changes between calls of one size, with recompilation an error.
    with torch._dynamo.config.patch(error_on_recompile=True):
        for change in ({"prompt": "a blue bowl"}, {"generator": torch.Generator().manual_seed(5)},
                       {"guidance_scale": 3.0}, {"brushnet_conditioning_scale": 0.6},
                       {"control_guidance_start": 0.3, "control_guidance_end": 0.7},
                       {"num_inference_steps": 5}, {"blend": True}):
            seed = change.pop("generator", None)
            run = lambda pipe: _run(pipe, image, mask, **change,  # noqa: E731
                                    **({"generator": torch.Generator().manual_seed(5)} if seed else {}))
            assert np.abs(run(fast) - run(eager)).max() < 1e-5, change


def test_installed_hooks_give_the_per_call_hooks_results(golden):
    # The slots that the fast path reads are the same injection: checked eagerly, without compiling.
    from brushnet.models.injection import install_residual_slots

    case = golden("sd15_tiny_pipeline")
    image, mask = _inputs(case)
    pipe = StableDiffusionBrushNetPipeline.from_pretrained(case.dir)
    pipe.set_progress_bar_config(disable=True)
    before = _run(pipe, image, mask, control_guidance_end=0.7)
    slots = install_residual_slots(pipe.unet)
    assert install_residual_slots(pipe.unet) is slots  # once per UNet
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in pipe.unet.modules())
    after = _run(pipe, image, mask, control_guidance_end=0.7)
    assert np.array_equal(before, after)
    assert not slots.active and slots.down == []  # nothing held between calls
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in pipe.unet.modules()) == hooks


def test_cli_compile_flag(golden, tmp_path):
    from brushnet.cli import main

    case = golden("sd15_tiny_pipeline")
    args = ["inpaint", str(case.dir / "init_image.png"), str(case.dir / "mask.png"), "-p", "x", "--steps", "2",
            "--base", str(case.dir), "--brushnet", str(case.dir / "brushnet"), "--seed", "1", "--dtype", "fp32"]
    assert main([*args, "--out", str(tmp_path / "eager.png")]) == 0
    assert main([*args, "--compile", "--out", str(tmp_path / "compiled.png")]) == 0
    eager = np.asarray(Image.open(tmp_path / "eager.png"), dtype=int)
    compiled = np.asarray(Image.open(tmp_path / "compiled.png"), dtype=int)
    assert np.abs(eager - compiled).max() <= 1


def test_powerpaint_compiled_equals_eager(golden):
    from brushnet.loading import load_pipeline

    case = golden("powerpaint_v2_tiny_pipeline")
    image, mask = _inputs(case)
    eager, fast = (load_pipeline(case.dir / "realisticVisionV60B1_v51VAE", case.dir / "PowerPaint_Brushnet")
                   for _ in range(2))
    for pipe in (eager, fast):
        pipe.set_progress_bar_config(disable=True)
    fast.enable_fast_path()
    for kwargs in ({"task": "object-removal", "prompt": ""}, {"task": "shape-guided", "fitting_degree": 0.5}):
        assert np.abs(_run(fast, image, mask, **kwargs) - _run(eager, image, mask, **kwargs)).max() < 1e-5


@pytest.mark.parametrize("case_name, pipeline_class", [
    ("sd15_tiny_pipeline", StableDiffusionBrushNetPipeline),
    ("sdxl_tiny_pipeline", StableDiffusionXLBrushNetPipeline),
])
def test_reusing_the_branch_runs_it_less_and_stays_close(golden, case_name, pipeline_class, capsys):
    """brushnet_every=k: the branch runs on every k-th step; the drift from running it on every step
    is measured here (and bounded a little above what was measured)."""
    case = golden(case_name)
    image, mask = _inputs(case)
    pipe = pipeline_class.from_pretrained(case.dir)
    pipe.set_progress_bar_config(disable=True)
    calls = []
    handle = pipe.brushnet.register_forward_pre_hook(lambda *a: calls.append(1))
    exact = _run(pipe, image, mask, num_inference_steps=10)
    assert len(calls) == 10
    for every, bound in ((2, 3e-3), (3, 5e-3)):  # measured 6.9e-4 / 1.0e-3 (SD1.5), 9.1e-4 / 1.4e-3 (SDXL)
        calls.clear()
        approximate = _run(pipe, image, mask, num_inference_steps=10, brushnet_every=every)
        assert len(calls) == len(range(0, 10, every))
        drift = np.abs(approximate - exact).mean()
        with capsys.disabled():
            print(f"\n{case_name} brushnet_every={every}: mean |drift| {drift:.2e}")
        assert 0 < drift < bound
    handle.remove()
    assert np.array_equal(_run(pipe, image, mask, num_inference_steps=10, brushnet_every=1), exact)
    with pytest.raises(ValueError, match="brushnet_every must be a whole number in \\[1, 100\\]"):
        _run(pipe, image, mask, brushnet_every=0)
