"""Components in different precisions, as people set them: an fp16/bf16 UNet beside a VAE kept in
fp32 (against fp16 overflow), or a text encoder in another precision than the UNet."""

import numpy as np
import pytest
import torch

from brushnet import StableDiffusionBrushNetPipeline, StableDiffusionXLBrushNetPipeline

SETUPS = {
    "unet bf16, vae fp32": lambda pipe: (pipe.to(torch.bfloat16), pipe.vae.to(torch.float32)),
    "vae bf16": lambda pipe: pipe.vae.to(torch.bfloat16),
    "text encoders bf16": lambda pipe: [m.to(torch.bfloat16) for m in (pipe.text_encoder,
                                                                      getattr(pipe, "text_encoder_2", None)) if m],
}


@pytest.mark.parametrize("setup", list(SETUPS))
@pytest.mark.parametrize("name, cls", [("sd15_tiny_pipeline", StableDiffusionBrushNetPipeline),
                                       ("sdxl_tiny_pipeline", StableDiffusionXLBrushNetPipeline)], ids=["sd15", "sdxl"])
def test_mixed_precision_components_run(golden_pipeline, name, cls, setup):
    # Each was a "should be the same" dtype error in a convolution or a matrix product (SD1.5: all
    # three; SDXL: the text encoders).
    pipe, image, mask = golden_pipeline(name, cls)

    def run():
        return pipe(prompt="a red cake", image=image, mask=mask, num_inference_steps=2, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    fp32 = run()
    SETUPS[setup](pipe)
    mixed = run()
    assert mixed.shape == fp32.shape and np.isfinite(mixed).all()
    assert np.abs(mixed - fp32).mean() < 0.05  # bf16 rounding, not another image


def test_from_pretrained_names_a_file_or_a_folder_that_is_no_pipeline(tmp_path):
    (tmp_path / "photo.png").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="photo.png is a file: StableDiffusionBrushNetPipeline.from_pretrained"):
        StableDiffusionBrushNetPipeline.from_pretrained(tmp_path / "photo.png")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty has no model_index.json: it is not a pipeline folder"):
        StableDiffusionBrushNetPipeline.from_pretrained(tmp_path / "empty")
