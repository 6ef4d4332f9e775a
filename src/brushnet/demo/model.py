"""The built-in demo model: where it lives in the package and how to load it.

The model is a whole BrushNet pipeline folder (base SD1.5-shaped UNet, VAE, CLIP text encoder,
tokenizer, scheduler and `brushnet/`) built by `tools/build_demo_model.py` and shipped as package
data under `brushnet/demo/model/`. Its weights are stored in float16 to keep the wheel small; they
load as float32 unless another dtype is asked for.
"""

from pathlib import Path

DEMO_MODEL_DIR = Path(__file__).resolve().parent / "model"
DEMO_MODEL_NAME = "built-in demo model"
DEMO_NOTICE = (
    "using the built-in demo model (64x64 procedural scenes of coloured shapes; pass --base and "
    "--brushnet for real photos)"
)


def demo_model_dir() -> Path:
    """The demo model's pipeline folder; a clear error if this installation lacks it."""
    if not (DEMO_MODEL_DIR / "model_index.json").is_file():
        raise FileNotFoundError(
            f"The built-in demo model is missing from this installation ({DEMO_MODEL_DIR}): reinstall "
            "brushnet, or pass --base and --brushnet."
        )
    return DEMO_MODEL_DIR


def load_demo_pipeline(device: str = "cpu", torch_dtype=None):
    """The demo model as a `StableDiffusionBrushNetPipeline` on `device` (float32 unless told)."""
    import torch

    from ..loading import load_pipeline

    folder = demo_model_dir()
    pipe = load_pipeline(folder, folder / "brushnet", torch_dtype=torch_dtype or torch.float32)
    return pipe.to(device)
