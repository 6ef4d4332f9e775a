"""Loading PowerPaint v2: the released layout, IOPaint's, a single branch file, single-file bases,
and the one-line errors."""

import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import CLIPTokenizer

from brushnet import StableDiffusionPowerPaintPipeline, load_brushnet
from brushnet.loading import ModelLoadError, is_powerpaint, load_pipeline, write_text_encoder_safetensors
from brushnet.models.task_prompts import ALL_TASK_TOKENS, branch_text_encoder

from ldm_checkpoint import write_sd15_single_file

CASE = "powerpaint_v2_tiny_pipeline"
BASE = "realisticVisionV60B1_v51VAE"
PROMPTS = (" P_obj", " P_ctxt", "P_shape", "a P_obj")


def _one_line(error, *needles):
    message = str(error.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message


@pytest.fixture(scope="module")
def case_dir(golden):
    return golden(CASE).dir


@pytest.fixture(scope="module")
def reference_pipe(case_dir):
    return load_pipeline(case_dir / BASE, case_dir / "PowerPaint_Brushnet")


def _same_branch_text(pipe, reference):
    with torch.no_grad():
        for text in PROMPTS:
            a = pipe.encode_task_prompts([text], [text], 1.0, "cpu")
            b = reference.encode_task_prompts([text], [text], 1.0, "cpu")
            assert torch.equal(a, b), text


def _release_copy(case_dir, tmp_path, text_encoder_files=("pytorch_model.bin",)):
    branch = tmp_path / "PowerPaint_Brushnet"
    branch.mkdir()
    for name in ("config.json", "diffusion_pytorch_model.safetensors", *text_encoder_files):
        shutil.copy(case_dir / "PowerPaint_Brushnet" / name, branch / name)
    return branch


def test_load_brushnet_finds_the_branch(case_dir):
    for source in (case_dir, case_dir / "PowerPaint_Brushnet"):
        branch = load_brushnet(source)
        assert branch.has_attention and is_powerpaint(source)
    assert not is_powerpaint(case_dir.parent / "sd15_tiny_model" / "brushnet")


@pytest.mark.parametrize("files", [("pytorch_model.bin",), ("text_encoder_brushnet.safetensors",)])
def test_release_layout_with_either_text_encoder_file(case_dir, tmp_path, reference_pipe, files):
    branch = _release_copy(case_dir, tmp_path, files)
    for source in (branch, tmp_path):  # PowerPaint_Brushnet/ or the release folder above it
        pipe = load_pipeline(case_dir / BASE, source)
        assert type(pipe) is StableDiffusionPowerPaintPipeline
        assert pipe.text_encoder_brushnet.config.vocab_size == len(pipe.tokenizer) == 282 + len(ALL_TASK_TOKENS)
        _same_branch_text(pipe, reference_pipe)


def test_single_branch_file_with_text_encoder_beside(case_dir, tmp_path, reference_pipe):
    # ComfyUI keeps the branch as one .safetensors file with pytorch_model.bin in the same folder.
    branch = _release_copy(case_dir, tmp_path)
    pipe = load_pipeline(case_dir / BASE, branch / "diffusion_pytorch_model.safetensors")
    _same_branch_text(pipe, reference_pipe)


def test_iopaint_layout(case_dir, tmp_path, reference_pipe):
    _release_copy(case_dir, tmp_path, text_encoder_files=())
    reference_pipe.text_encoder_brushnet.save_pretrained(tmp_path / "text_encoder_brushnet", variant="fp16")
    reference_pipe.tokenizer.save_pretrained(tmp_path / "tokenizer")
    assert len(CLIPTokenizer.from_pretrained(tmp_path / "tokenizer")) == len(reference_pipe.tokenizer)
    pipe = load_pipeline(case_dir / BASE, tmp_path)
    _same_branch_text(pipe, reference_pipe)


def test_missing_text_encoder_names_the_file(case_dir, tmp_path):
    branch = _release_copy(case_dir, tmp_path, text_encoder_files=())
    with pytest.raises(ModelLoadError) as error:
        load_pipeline(case_dir / BASE, branch)
    _one_line(error, "pytorch_model.bin", str(branch))


def test_text_encoder_named_explicitly(case_dir, tmp_path, reference_pipe):
    branch = _release_copy(case_dir, tmp_path, text_encoder_files=())
    pipe = load_pipeline(case_dir / BASE, branch,
                         text_encoder_brushnet=case_dir / "PowerPaint_Brushnet" / "pytorch_model.bin")
    _same_branch_text(pipe, reference_pipe)


def test_sdxl_base_is_refused(golden, case_dir):
    with pytest.raises(ModelLoadError) as error:
        load_pipeline(golden("sdxl_tiny_pipeline").dir, case_dir / "PowerPaint_Brushnet")
    _one_line(error, "PowerPaint", "SD1.5", "SDXL")


def test_a_pickle_holding_more_than_tensors_needs_allow_pickle(case_dir, tmp_path, reference_pipe):
    branch = _release_copy(case_dir, tmp_path, text_encoder_files=())
    state = torch.load(case_dir / "PowerPaint_Brushnet" / "pytorch_model.bin", weights_only=True)
    torch.save({**state, "extra": _NotATensor()}, branch / "pytorch_model.bin")
    with pytest.raises(ModelLoadError) as error:
        load_pipeline(case_dir / BASE, branch)
    _one_line(error, "allow_pickle", "arbitrary code")
    _same_branch_text(load_pipeline(case_dir / BASE, branch, allow_pickle=True), reference_pipe)


class _NotATensor:
    pass


def test_a_truncated_text_encoder_is_refused(case_dir, tmp_path):
    branch = _release_copy(case_dir, tmp_path, text_encoder_files=())
    state = torch.load(case_dir / "PowerPaint_Brushnet" / "pytorch_model.bin", weights_only=True)
    state.pop("text_model.final_layer_norm.weight")
    torch.save(state, branch / "pytorch_model.bin")
    with pytest.raises(ModelLoadError) as error:
        load_pipeline(case_dir / BASE, branch)
    _one_line(error, "final_layer_norm")


def test_write_text_encoder_safetensors(case_dir, tmp_path):
    branch = _release_copy(case_dir, tmp_path)
    target = write_text_encoder_safetensors(tmp_path)
    assert target == branch / "text_encoder_brushnet.safetensors"
    written, released = load_file(target), load_file(case_dir / "PowerPaint_Brushnet" / target.name)
    assert set(written) == set(released) and all(torch.equal(written[k], released[k]) for k in released)


def test_single_file_base(case_dir, tmp_path, reference_pipe):
    checkpoint = write_sd15_single_file(case_dir / BASE, tmp_path / "base.safetensors")
    pipe = load_pipeline(checkpoint, case_dir / "PowerPaint_Brushnet", base_config=str(case_dir / BASE))
    assert type(pipe) is StableDiffusionPowerPaintPipeline
    _same_branch_text(pipe, reference_pipe)


def test_branch_text_encoder_dtype(case_dir):
    from transformers import CLIPTextConfig

    state = torch.load(case_dir / "PowerPaint_Brushnet" / "pytorch_model.bin", weights_only=True)
    encoder = branch_text_encoder(CLIPTextConfig.from_pretrained(case_dir / BASE / "text_encoder"), state,
                                  torch_dtype=torch.float16)
    assert encoder.dtype == torch.float16


def test_brushnetx_layout_loads_as_a_brushnet(golden, tmp_path):
    # TencentARC/BrushEdit keeps BrushNetX, a BrushNet in the released format, in brushnetX/.
    shutil.copytree(golden("sd15_tiny_model").dir / "brushnet", tmp_path / "brushnetX")
    for source in (tmp_path, tmp_path / "brushnetX"):
        branch = load_brushnet(source)
        assert not branch.has_attention and not is_powerpaint(source)
