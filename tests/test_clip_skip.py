"""clip_skip: the prompt read from an earlier layer of the text encoder (diffusers' keyword)."""

import numpy as np
import pytest
import torch
from PIL import Image

from brushnet import StableDiffusionBrushNetPipeline, StableDiffusionXLBrushNetPipeline

PROMPT = "a red cake on the table"


def run(case, **kwargs):
    pipe, image, mask = case
    return pipe(image=image, mask=mask, num_inference_steps=2, output_type="np",
                generator=torch.Generator().manual_seed(0), **kwargs).images


@pytest.fixture(scope="module")
def sd15(golden_pipeline):
    return golden_pipeline("sd15_tiny_pipeline", StableDiffusionBrushNetPipeline)


def test_sd15_clip_skip_reads_the_layer_before_the_last(sd15):
    # diffusers' rule written out: hidden states clip_skip layers before the last, through the
    # final layer norm; the negative prompt keeps the last layer.
    pipe = sd15[0]
    tokens = pipe.tokenizer(PROMPT, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                            truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = pipe.text_encoder(tokens.input_ids, output_hidden_states=True).hidden_states[-2]
        by_hand = pipe.text_encoder.final_layer_norm(hidden)
        negative = pipe.text_encoder(pipe.tokenizer("", padding="max_length", max_length=tokens.input_ids.shape[1],
                                                    truncation=True, return_tensors="pt").input_ids)[0]
    skipped = run(sd15, prompt=PROMPT, clip_skip=1)
    np.testing.assert_allclose(skipped, run(sd15, prompt_embeds=by_hand, negative_prompt_embeds=negative), atol=1e-6)
    assert np.abs(skipped - run(sd15, prompt=PROMPT)).max() > 1e-3


@pytest.mark.parametrize("clip_skip", [-1, 99, 1.5])
def test_sd15_clip_skip_out_of_range_is_one_line(sd15, clip_skip):
    with pytest.raises(ValueError, match="clip_skip .* whole number from 0 to"):
        run(sd15, prompt=PROMPT, clip_skip=clip_skip)


def test_sdxl_clip_skip_runs(golden_pipeline):
    case = golden_pipeline("sdxl_tiny_pipeline", StableDiffusionXLBrushNetPipeline)
    assert np.abs(run(case, prompt=PROMPT, clip_skip=1) - run(case, prompt=PROMPT)).max() > 1e-4


def test_powerpaint_clip_skip_runs(golden):
    from brushnet.loading import load_pipeline

    directory = golden("powerpaint_v2_tiny_pipeline").dir
    pipe = load_pipeline(directory / "realisticVisionV60B1_v51VAE", directory / "PowerPaint_Brushnet")
    pipe.set_progress_bar_config(disable=True)
    image = Image.open(directory / "init_image.png").convert("RGB")
    mask = Image.open(directory / "mask.png").convert("L")
    case = (pipe, image, mask)
    skipped = run(case, prompt=PROMPT, task="text-guided", clip_skip=1)
    assert np.abs(skipped - run(case, prompt=PROMPT, task="text-guided")).max() > 1e-4
