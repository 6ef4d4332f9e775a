"""Both pipelines against the reference's images and intermediate tensors on tiny models."""

import numpy as np
import pytest
import torch
from PIL import Image

import diffusers
import brushnet

PIPE_REL = 1e-4
PIPELINES = {
    "sd15_tiny_pipeline": brushnet.StableDiffusionBrushNetPipeline,
    "sdxl_tiny_pipeline": brushnet.StableDiffusionXLBrushNetPipeline,
}


class Recorder:
    """Captures what the golden data keeps, through hooks and wrappers on one pipeline instance."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.data = {"noise": [], "latents": [], "scales": [], "residuals": []}
        self._handles = [
            pipe.unet.register_forward_pre_hook(self._unet_inputs, with_kwargs=True),
            pipe.unet.register_forward_hook(self._unet_output),
            pipe.brushnet.register_forward_hook(self._brushnet_output),
        ]
        original_prepare_latents, original_inputs, original_predict = (
            pipe.prepare_latents, pipe.prepare_brushnet_inputs, pipe.predict_noise)

        def prepare_latents(*args, **kwargs):
            self.data["latents_init"] = out = original_prepare_latents(*args, **kwargs)
            return out

        def prepare_brushnet_inputs(*args, **kwargs):
            out = original_inputs(*args, **kwargs)
            self.data["conditioning"] = out[2]
            return out

        def predict_noise(latent_model_input, t, prompt_embeds, conditioning, scale, **kwargs):
            self.data["scales"].append(scale)
            return original_predict(latent_model_input, t, prompt_embeds, conditioning, scale, **kwargs)

        pipe.prepare_latents, pipe.prepare_brushnet_inputs, pipe.predict_noise = (
            prepare_latents, prepare_brushnet_inputs, predict_noise)

    def _unet_inputs(self, module, args, kwargs):
        self.data.setdefault("encoder_hidden_states", kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None))
        self.data.setdefault("added_cond_kwargs", kwargs.get("added_cond_kwargs"))

    def _unet_output(self, module, args, output):
        self.data["noise"].append((output[0] if isinstance(output, tuple) else output.sample).clone())

    def _brushnet_output(self, module, args, output):
        self.data["residuals"].append(output)

    def step_end(self, pipe, i, t, kwargs):
        self.data["latents"].append(kwargs["latents"].clone())
        return {}

    def close(self):
        for handle in self._handles:
            handle.remove()
        for name in ("prepare_latents", "prepare_brushnet_inputs", "predict_noise"):
            del self.pipe.__dict__[name]


@pytest.fixture(scope="module", params=list(PIPELINES))
def pipeline_case(request, golden):
    case = golden(request.param)
    pipe = PIPELINES[request.param].from_pretrained(case.dir)
    pipe.set_progress_bar_config(disable=True)
    image = Image.open(case.dir / "masked_image.png").convert("RGB")
    mask = Image.open(case.dir / "mask.png").convert("RGB")
    return case, pipe, image, mask


def _scheduler(run):
    config = {**run["scheduler_config"], **(run.get("stock_diffusers_scheduler_overrides") or {})}
    return getattr(diffusers, run["scheduler_class"]).from_config(config)


def test_inputs_are_the_golden_pngs(pipeline_case):
    case, _, image, mask = pipeline_case
    assert np.array_equal(np.asarray(image), case.inputs["masked_image.0"].numpy())
    assert np.array_equal(np.asarray(mask), case.inputs["mask.0"].numpy())


def test_tokenizer_ids(pipeline_case):
    case, pipe, _, _ = pipeline_case
    for name in ("tokenizer", "tokenizer_2"):
        tokenizer = getattr(pipe, name, None)
        if tokenizer is None:
            continue
        for i, text in enumerate(case.case["all_prompt_strings"]):
            ids = tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids[0]
            assert torch.equal(ids, case[f"{name}.input_ids.{i}"])


def test_every_run_matches_reference(pipeline_case):
    case, pipe, image, mask = pipeline_case
    for index, run in enumerate(case.case["runs"]):
        prefix = run["prefix"]
        pipe.scheduler = _scheduler(run)
        recorder = Recorder(pipe)
        try:
            images = pipe(image=image, mask=mask, generator=torch.Generator().manual_seed(run["seed"]),
                          output_type="np", callback_on_step_end=recorder.step_end, **run["call_kwargs"]).images
        finally:
            recorder.close()
        data = recorder.data
        case.check(f"{prefix}.images", torch.from_numpy(images), PIPE_REL)
        case.check(f"{prefix}.latents_per_step", torch.stack(data["latents"]), PIPE_REL)
        case.check(f"{prefix}.latents_init", data["latents_init"], PIPE_REL)
        case.check(f"{prefix}.timesteps", pipe.scheduler.timesteps, 0.0)
        case.check(f"{prefix}.brushnet_scale_per_step", torch.tensor(data["scales"]), 0.0)
        # We keep one copy of the conditioning; the reference duplicated it for CFG.
        case.check(f"{prefix}.conditioning_latents", torch.cat([data["conditioning"]] * 2), PIPE_REL)
        case.check(f"{prefix}.unet_encoder_hidden_states", data["encoder_hidden_states"], PIPE_REL)
        if f"{prefix}.add_text_embeds" in case:
            case.check(f"{prefix}.add_text_embeds", data["added_cond_kwargs"]["text_embeds"], PIPE_REL)
            case.check(f"{prefix}.add_time_ids", data["added_cond_kwargs"]["time_ids"], 0.0)
        if index == 0:
            case.check(f"{prefix}.unet_noise_pred_per_step", torch.stack(data["noise"]), PIPE_REL)
            down, mid, up = data["residuals"][0]
            # An SD1.5 branch runs once for both CFG halves; the reference computed it twice.
            expand = (lambda r: torch.cat([r] * 2)) if down[0].shape[0] == 1 else (lambda r: r)
            for i, r in enumerate(down):
                case.check(f"{prefix}.step0.down_res.{i}", expand(r), PIPE_REL)
            case.check(f"{prefix}.step0.mid_res", expand(mid), PIPE_REL)
            for i, r in enumerate(up):
                case.check(f"{prefix}.step0.up_res.{i}", expand(r), PIPE_REL)
        # Steps where start/end switch BrushNet off do not run the branch at all.
        assert len(data["residuals"]) == sum(s != 0 for s in data["scales"])
