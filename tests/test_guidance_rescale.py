"""guidance_rescale: diffusers' rescaled classifier-free guidance in every pipeline, the CLI and InpaintSettings."""

import numpy as np
import pytest
import torch
from PIL import Image

from brushnet import StableDiffusionBrushNetPipeline, StableDiffusionXLBrushNetPipeline
from brushnet.inpaint import InpaintSettings, check_settings

PROMPT = "a red cake on the table"
PIPELINES = [("sd15_tiny_pipeline", StableDiffusionBrushNetPipeline),
             ("sdxl_tiny_pipeline", StableDiffusionXLBrushNetPipeline)]


@pytest.fixture(scope="module", params=PIPELINES, ids=["sd15", "sdxl"])
def case(request, golden_pipeline):
    return golden_pipeline(*request.param)


def run(case, num_inference_steps=3, **kwargs):
    pipe, image, mask = case
    return pipe(prompt=PROMPT, image=image, mask=mask, num_inference_steps=num_inference_steps, output_type="np",
                generator=torch.Generator().manual_seed(0), **kwargs).images


def rescaled(prediction, guidance, factor):
    # Lin et al. 2023, eq. 15-16, written out here: the guided prediction scaled to the positive
    # half's standard deviation (per sample, over channels and pixels), then mixed with the plain one.
    negative, positive = prediction.chunk(2)
    plain = negative + guidance * (positive - negative)
    dims = list(range(1, plain.ndim))
    matched = plain * positive.std(dim=dims, keepdim=True) / plain.std(dim=dims, keepdim=True)
    return factor * matched + (1 - factor) * plain


def test_zero_is_plain_guidance_and_a_factor_changes_the_result(case):
    default = run(case)
    assert np.array_equal(default, run(case, guidance_rescale=0.0))
    assert np.abs(run(case, guidance_rescale=0.7) - default).max() > 1e-3


def test_the_scheduler_gets_the_rescaled_prediction(case, monkeypatch):
    pipe = case[0]
    raw, stepped = [], []
    predict, step = pipe.predict_noise, pipe.scheduler.step

    def recording_predict(*args, **kwargs):
        raw.append(predict(*args, **kwargs))
        return raw[-1]

    def recording_step(noise_pred, *args, **kwargs):
        stepped.append(noise_pred)
        return step(noise_pred, *args, **kwargs)

    monkeypatch.setattr(pipe, "predict_noise", recording_predict)
    monkeypatch.setattr(pipe.scheduler, "step", recording_step)
    run(case, guidance_scale=6.0, guidance_rescale=0.7)
    assert len(raw) == len(stepped) == 3
    for prediction, given in zip(raw, stepped):
        expected = rescaled(prediction, 6.0, 0.7)
        assert torch.allclose(given, expected, atol=1e-5)
        assert not torch.allclose(given, rescaled(prediction, 6.0, 0.0), atol=1e-3)


@pytest.mark.parametrize("value", [1.5, -0.1, float("nan")])
def test_impossible_factors_are_refused(case, value):
    with pytest.raises(ValueError, match="guidance_rescale must be a number in"):
        run(case, guidance_rescale=value)


def test_powerpaint_takes_it(golden):
    from test_powerpaint import BASE, PIPELINE_CASE, _images

    from brushnet import load_pipeline

    powerpaint = golden(PIPELINE_CASE)
    pipe = load_pipeline(powerpaint.dir / BASE, powerpaint.dir / "PowerPaint_Brushnet")
    pipe.set_progress_bar_config(disable=True)
    image, mask = _images(powerpaint, powerpaint.case["runs"][0])
    results = [pipe(prompt="a red cake", image=image, mask=mask, num_inference_steps=2, height=32, width=48,
                    output_type="np", generator=torch.Generator().manual_seed(0), guidance_rescale=factor).images
               for factor in (0.0, 0.7)]
    assert np.isfinite(results[1]).all() and np.abs(results[1] - results[0]).max() > 1e-3


def test_settings_and_the_command_line_check_it(tmp_path, capsys):
    with pytest.raises(ValueError, match="guidance_rescale must be a number in"):
        check_settings(InpaintSettings(prompt="x", guidance_rescale=2.0))
    from brushnet.cli import main

    Image.new("RGB", (16, 16)).save(tmp_path / "p.png")
    Image.new("L", (16, 16), 255).save(tmp_path / "m.png")
    assert main(["inpaint", str(tmp_path / "p.png"), str(tmp_path / "m.png"), "-p", "x", "--guidance-rescale", "2",
                 "--out", str(tmp_path / "r.png")]) == 2
    assert "--guidance-rescale must be a number in [0, 1]" in capsys.readouterr().err
    assert main(["inpaint", str(tmp_path / "p.png"), str(tmp_path / "m.png"), "-p", "x", "--guidance-rescale", "0.7",
                 "--guidance", "1", "--out", str(tmp_path / "r.png")]) == 2
    assert "--guidance-rescale rescales classifier-free guidance, which --guidance 1 switches off" in \
        capsys.readouterr().err
    assert not (tmp_path / "r.png").exists()


def _cutoff_callback(pipe, ratio):
    from diffusers.callbacks import SDCFGCutoffCallback, SDXLCFGCutoffCallback

    cls = SDXLCFGCutoffCallback if isinstance(pipe, StableDiffusionXLBrushNetPipeline) else SDCFGCutoffCallback
    return cls(cutoff_step_ratio=ratio)


@pytest.mark.parametrize("every", [1, 2], ids=["branch-every-step", "branch-every-2"])
def test_diffusers_cfg_cutoff_callback_drops_guidance_after_its_step(case, every):
    # diffusers' callback switches guidance off mid-call (guidance 0, the embeddings cut to their
    # positive half): the loop must then run the UNet on one row, the branch with it, kept residuals
    # included, and give a finite image; a cutoff at the last step changes nothing.
    pipe = case[0]
    batches = []
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    try:
        callback = _cutoff_callback(pipe, 0.5)
        cut = run(case, num_inference_steps=4, brushnet_every=every, callback_on_step_end=callback,
                  callback_on_step_end_tensor_inputs=callback.tensor_inputs)
    finally:
        hook.remove()
    assert batches == [2, 2, 2, 1]
    assert np.isfinite(cut).all()
    default = run(case, num_inference_steps=4, brushnet_every=every)
    assert np.abs(cut - default).max() > 1e-4
    callback = _cutoff_callback(pipe, 1.0)
    never = run(case, num_inference_steps=4, brushnet_every=every, callback_on_step_end=callback,
                callback_on_step_end_tensor_inputs=callback.tensor_inputs)
    assert np.array_equal(never, default)


def test_powerpaint_takes_the_cfg_cutoff_callback(golden):
    # PowerPaint's branch reads its own [negative; positive] task prompts: after the cutoff it
    # must read the positive ones alone, as the UNet does.
    from diffusers.callbacks import SDCFGCutoffCallback
    from test_powerpaint import BASE, PIPELINE_CASE, _images

    from brushnet import load_pipeline

    powerpaint = golden(PIPELINE_CASE)
    pipe = load_pipeline(powerpaint.dir / BASE, powerpaint.dir / "PowerPaint_Brushnet")
    pipe.set_progress_bar_config(disable=True)
    image, mask = _images(powerpaint, powerpaint.case["runs"][0])
    results = []
    for ratio in (0.5, 1.0, None):
        callback = None if ratio is None else SDCFGCutoffCallback(cutoff_step_ratio=ratio)
        results.append(pipe(prompt="a red cake", image=image, mask=mask, num_inference_steps=4, height=32, width=48,
                            output_type="np", generator=torch.Generator().manual_seed(0),
                            callback_on_step_end=callback,
                            callback_on_step_end_tensor_inputs=["prompt_embeds"] if callback else ["latents"]).images)
    cut, never, default = results
    assert np.isfinite(cut).all() and np.abs(cut - default).max() > 1e-4
    assert np.array_equal(never, default)
