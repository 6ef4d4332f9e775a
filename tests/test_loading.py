"""brushnet.loading: BrushNets and pipelines from folders, single files and the hub, and the refusals."""

import json
import shutil
import socket
import threading
import time

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel

from brushnet import BrushNetModel, StableDiffusionBrushNetPipeline, StableDiffusionXLBrushNetPipeline
from brushnet import hub, loading
from brushnet.loading import (
    ModelLoadError,
    brushnet_config_from_state_dict,
    detect_base_family,
    detect_brushnet_family,
    load_brushnet,
    load_pipeline,
)

from hub_cache import put_in_hub_cache
from ldm_checkpoint import write_sd15_single_file

FAMILIES = {"sd15": "sd15_tiny_model", "sdxl": "sdxl_tiny_model"}
PIPELINES = {"sd15": "sd15_tiny_pipeline", "sdxl": "sdxl_tiny_pipeline"}

# The released checkpoints' configs, written out here independently of loading.py. Fields not
# named keep BrushNetModel's defaults, which are those of the released SD1.5 model.
RELEASED_CONFIGS = {
    "sd15": dict(
        block_out_channels=(320, 640, 1280, 1280), down_block_types=("DownBlock2D",) * 4,
        up_block_types=("UpBlock2D",) * 4, mid_block_type="MidBlock2D", layers_per_block=2,
        cross_attention_dim=768, attention_head_dim=8,
    ),
    "sdxl": dict(
        block_out_channels=(320, 640, 1280), down_block_types=("DownBlock2D",) * 3,
        up_block_types=("UpBlock2D",) * 3, mid_block_type="MidBlock2D", layers_per_block=2,
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
        transformer_layers_per_block=[1, 2, 10], attention_head_dim=[5, 10, 20], use_linear_projection=True,
        cross_attention_dim=2048,
    ),
}
# Fields that shape the branch (the others describe the base UNet's attention and change nothing).
STRUCTURAL_FIELDS = (
    "in_channels", "conditioning_channels", "down_block_types", "mid_block_type", "up_block_types",
    "block_out_channels", "layers_per_block", "norm_num_groups", "addition_embed_type",
    "projection_class_embeddings_input_dim", "addition_time_embed_dim",
)


def _brushnet_dir(golden, family):
    return golden(FAMILIES[family]).dir / "brushnet"


def _golden_state_dict(golden, family):
    return load_file(str(_brushnet_dir(golden, family) / "diffusion_pytorch_model.safetensors"))


def _meta_brushnet(**config):
    with torch.device("meta"):
        return BrushNetModel(**config)


def _as_json(config) -> dict:
    # Configs hold tuples or lists depending on where they came from; JSON makes them comparable.
    # Private entries (`_use_default_values`, `_class_name`) record history, not architecture.
    return json.loads(json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")}))


def _assert_state_dicts_equal(actual: dict, expected: dict):
    assert set(actual) == set(expected)
    for key, value in expected.items():
        assert torch.equal(actual[key], value), key


def _assert_one_line(error: pytest.ExceptionInfo, *needles: str):
    message = str(error.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message


@pytest.fixture
def no_weight_loading(monkeypatch):
    """Fail the test if anything starts reading model weights."""

    def fail(*args, **kwargs):
        raise AssertionError("model weights were loaded before the refusal")

    for cls in (UNet2DConditionModel, AutoencoderKL, StableDiffusionBrushNetPipeline,
                StableDiffusionXLBrushNetPipeline):
        monkeypatch.setattr(cls, "from_pretrained", fail)
        monkeypatch.setattr(cls, "from_single_file", fail)
    monkeypatch.setattr(CLIPTextModel, "from_pretrained", fail)
    monkeypatch.setattr(BrushNetModel, "from_pretrained", fail)
    monkeypatch.setattr(loading, "load_file", fail)


# -- BrushNet single files ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_single_safetensors_file_with_config_beside(golden, tmp_path, family, dtype):
    expected = _golden_state_dict(golden, family)
    path = tmp_path / f"brushnet_{family}.safetensors"
    save_file({k: v.to(dtype) for k, v in expected.items()}, str(path))
    # Tiny models use 4 norm groups, which weights cannot show: the config beside the file says so.
    shutil.copy(_brushnet_dir(golden, family) / "config.json", tmp_path / "config.json")

    model = load_brushnet(path)

    assert isinstance(model, BrushNetModel)
    assert model.dtype == torch.float32
    assert model.config.norm_num_groups == 4
    assert detect_brushnet_family(model.config) == family
    assert detect_brushnet_family(model.state_dict()) == family
    expected = {k: v.to(dtype).to(torch.float32) for k, v in expected.items()}
    _assert_state_dicts_equal(model.state_dict(), expected)
    assert not any(p.is_meta for p in model.parameters())

    assert load_brushnet(path, torch_dtype=torch.float16).dtype == torch.float16


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_single_file_config_derived_from_shapes(tmp_path, family):
    # Widths that are multiples of 32 (norm groups 32, as released) but small; SDXL keeps the
    # released 2816-wide add-embedding, from which addition_time_embed_dim 256 follows.
    config = dict(RELEASED_CONFIGS[family], block_out_channels=(32, 64, 64, 64)[: 4 if family == "sd15" else 3])
    torch.manual_seed(0)
    reference = BrushNetModel(**config)
    for parameter in reference.parameters():  # the 1x1 output convs start at zero
        torch.nn.init.normal_(parameter, std=0.02)
    path = tmp_path / "brushnet_segmentation_mask_fp16.safetensors"
    save_file({k: v.half().contiguous() for k, v in reference.state_dict().items()}, str(path))

    model = load_brushnet(path)

    for field in STRUCTURAL_FIELDS:
        assert _as_json(model.config)[field] == _as_json(reference.config)[field], field
    _assert_state_dicts_equal(model.state_dict(), {k: v.half().float() for k, v in reference.state_dict().items()})


def test_single_file_tiny_without_config_asks_for_it(golden, tmp_path):
    path = tmp_path / "tiny.safetensors"
    save_file(_golden_state_dict(golden, "sd15"), str(path))
    with pytest.raises(ModelLoadError) as error:
        load_brushnet(path)
    _assert_one_line(error, "config.json", "norm_num_groups")


def test_config_beside_must_fit_the_weights(golden, tmp_path):
    path = tmp_path / "brushnet.safetensors"
    save_file(_golden_state_dict(golden, "sd15"), str(path))
    shutil.copy(_brushnet_dir(golden, "sdxl") / "config.json", tmp_path / "config.json")
    with pytest.raises(ModelLoadError) as error:
        load_brushnet(path)
    _assert_one_line(error, "do not fit", "config.json")


# -- configs and families from shapes ------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_config_from_full_size_state_dict_equals_released(family):
    released = _meta_brushnet(**RELEASED_CONFIGS[family])
    state_dict = released.state_dict()  # meta tensors: shapes only, no memory

    derived = brushnet_config_from_state_dict(state_dict)

    assert detect_brushnet_family(state_dict) == family
    assert detect_brushnet_family({k: v.shape for k, v in state_dict.items()}) == family
    assert _as_json(_meta_brushnet(**derived).config) == _as_json(released.config)
    for field, value in _as_json(RELEASED_CONFIGS[family]).items():
        assert _as_json(derived)[field] == value, field


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_config_from_tiny_state_dict_with_overrides(golden, family):
    golden_config = json.loads((_brushnet_dir(golden, family) / "config.json").read_text())
    overrides = {"norm_num_groups": 4}
    if family == "sdxl":
        overrides["addition_time_embed_dim"] = golden_config["addition_time_embed_dim"]

    derived = brushnet_config_from_state_dict(_golden_state_dict(golden, family), **overrides)

    for field in STRUCTURAL_FIELDS:
        assert _as_json(derived)[field] == golden_config[field], field


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_detect_brushnet_family_of_tiny_models(golden, family):
    folder = _brushnet_dir(golden, family)
    assert detect_brushnet_family(_golden_state_dict(golden, family)) == family
    assert detect_brushnet_family(json.loads((folder / "config.json").read_text())) == family
    assert detect_brushnet_family(BrushNetModel.from_pretrained(folder)) == family


def test_state_dict_of_a_unet_is_not_a_brushnet(golden):
    unet = load_file(str(golden("sd15_tiny_model").dir / "unet" / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(ModelLoadError) as error:
        brushnet_config_from_state_dict(unet)
    _assert_one_line(error, "not a BrushNet")


# -- pickles, PowerPaint, missing paths, hub ----------------------------------------------------------


@pytest.mark.parametrize("suffix", [".ckpt", ".bin"])
def test_pickle_file_needs_allow_pickle(golden, tmp_path, suffix):
    expected = _golden_state_dict(golden, "sd15")
    path = tmp_path / f"brushnet{suffix}"
    torch.save({"state_dict": expected}, path)
    shutil.copy(_brushnet_dir(golden, "sd15") / "config.json", tmp_path / "config.json")

    with pytest.raises(ModelLoadError) as error:
        load_brushnet(path)
    _assert_one_line(error, "allow_pickle", "arbitrary code")

    _assert_state_dicts_equal(load_brushnet(path, allow_pickle=True).state_dict(), expected)


def test_folder_with_only_bin_weights_needs_allow_pickle(golden, tmp_path):
    BrushNetModel.from_pretrained(_brushnet_dir(golden, "sd15")).save_pretrained(tmp_path, safe_serialization=False)
    assert not list(tmp_path.glob("*.safetensors"))
    with pytest.raises(ModelLoadError) as error:
        load_brushnet(tmp_path)
    _assert_one_line(error, "allow_pickle")
    loaded = load_brushnet(tmp_path, allow_pickle=True)
    _assert_state_dicts_equal(loaded.state_dict(), _golden_state_dict(golden, "sd15"))


def test_incomplete_powerpaint_weights_are_refused(golden, tmp_path):
    # BrushNet weights plus a few attention keys: a PowerPaint layout whose weights do not fit it.
    state_dict = _golden_state_dict(golden, "sd15")
    state_dict["down_blocks.0.attentions.0.proj_in.weight"] = torch.zeros(8, 8, 1, 1)
    state_dict["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"] = torch.zeros(8, 32)
    path = tmp_path / "powerpaint_brushnet.safetensors"
    save_file(state_dict, str(path))
    config = brushnet_config_from_state_dict(state_dict, norm_num_groups=4)
    assert config["down_block_types"][0] == "CrossAttnDownBlock2D" and config["cross_attention_dim"] == 32
    with pytest.raises(ModelLoadError) as error:
        load_brushnet(path)
    _assert_one_line(error, "PowerPaint")
    # With an SDXL base the family is the problem, said before anything loads.
    with pytest.raises(ModelLoadError) as error:
        load_pipeline(golden(PIPELINES["sdxl"]).dir, path)
    _assert_one_line(error, "PowerPaint", "SD1.5")


def test_powerpaint_config_with_brushnet_weights_is_refused(golden, tmp_path):
    config = json.loads((_brushnet_dir(golden, "sd15") / "config.json").read_text())
    config["down_block_types"] = ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    shutil.copy(_brushnet_dir(golden, "sd15") / "diffusion_pytorch_model.safetensors", tmp_path)
    with pytest.raises(ModelLoadError) as error:
        load_brushnet(tmp_path)
    _assert_one_line(error, str(tmp_path))


@pytest.mark.parametrize("name", ["missing_folder", "missing.safetensors"])
def test_missing_path(tmp_path, name):
    path = tmp_path / name
    with pytest.raises(ModelLoadError) as error:
        load_brushnet(path)
    _assert_one_line(error, str(path), "does not exist")


def test_hub_id_offline_is_one_clear_line():
    # conftest sets HF_HUB_OFFLINE=1: nothing can be fetched.
    with pytest.raises(ModelLoadError) as error:
        load_brushnet("some-org/some-brushnet-that-is-not-cached")
    _assert_one_line(error, "some-org/some-brushnet-that-is-not-cached", "Hub could not be reached", "local folder")


# -- a hub that cannot be reached --------------------------------------------------------------
# A hub request that goes out without a network retries for 20-30 s, a warning line per try: the
# tests below check that none goes out (local_files_only on every request, no retry lines).

def _retry_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if "thrown while requesting" in line or "Retrying in" in line]


def test_unreachable_hub_fails_at_once_with_local_files_only(golden, unreachable_hub, monkeypatch, capfd):
    import huggingface_hub

    requests = []
    download = huggingface_hub.hf_hub_download
    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        lambda *args, **kwargs: requests.append(kwargs) or download(*args, **kwargs))
    base, brushnet = golden(PIPELINES["sd15"]).dir, _brushnet_dir(golden, "sd15")
    calls = [
        (lambda: load_brushnet("some-org/uncached-brushnet"), "BrushNet 'some-org/uncached-brushnet'"),
        (lambda: detect_base_family("some-org/uncached-base"), "base model 'some-org/uncached-base'"),
        (lambda: loading.check_model_pair("some-org/uncached-base", brushnet), "base model 'some-org/uncached-base'"),
        (lambda: load_pipeline("some-org/uncached-base", brushnet), "base model 'some-org/uncached-base'"),
        (lambda: load_pipeline(base, "some-org/uncached-brushnet"), "BrushNet 'some-org/uncached-brushnet'"),
    ]
    capfd.readouterr()
    for call, what in calls:
        with pytest.raises(ModelLoadError) as error:
            call()
        _assert_one_line(error, what, "Hub could not be reached")
    assert unreachable_hub, "the probe was not asked"
    assert len(requests) == len(calls) and all(kwargs.get("local_files_only") for kwargs in requests), requests
    assert capfd.readouterr().err == ""  # no huggingface_hub warning besides our error


def test_unreachable_hub_loads_cached_models_at_once(golden, unreachable_hub, tmp_path, capfd):
    put_in_hub_cache(tmp_path, "test-org/tiny-base", golden(PIPELINES["sd15"]).dir)
    put_in_hub_cache(tmp_path, "test-org/tiny-brushnet", _brushnet_dir(golden, "sd15"))
    capfd.readouterr()
    assert detect_base_family("test-org/tiny-base", cache_dir=str(tmp_path)) == "sd15"
    pipe = load_pipeline("test-org/tiny-base", "test-org/tiny-brushnet", cache_dir=str(tmp_path))
    assert unreachable_hub
    assert not _retry_lines(capfd.readouterr().err)
    assert type(pipe) is StableDiffusionBrushNetPipeline
    _assert_state_dicts_equal(pipe.brushnet.state_dict(), _golden_state_dict(golden, "sd15"))


def test_local_sources_never_probe_the_hub(golden, unreachable_hub):
    base, brushnet = golden(PIPELINES["sd15"]).dir, _brushnet_dir(golden, "sd15")
    assert detect_base_family(base) == "sd15"
    load_pipeline(base, brushnet)
    assert unreachable_hub == []


@pytest.mark.parametrize("variable", ["HTTPS_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"])
def test_a_proxy_is_trusted_not_probed(unreachable_hub, monkeypatch, variable):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    requests = []

    def no_network(*args, **kwargs):
        requests.append(kwargs)
        raise LocalEntryNotFoundError("no network in this test")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    monkeypatch.setenv(variable, "http://proxy.invalid:3128")
    with pytest.raises(ModelLoadError, match="could not be reached"):
        load_brushnet("some-org/some-brushnet")
    assert unreachable_hub == [] and requests == [{}]  # fetched through the proxy: no local_files_only
    monkeypatch.delenv(variable)
    with pytest.raises(ModelLoadError, match="could not be reached"):
        load_brushnet("some-org/some-brushnet")
    assert len(unreachable_hub) == 1 and requests[1] == {"local_files_only": True}


def test_proxies_or_offline_mode_skip_the_probe(unreachable_hub, monkeypatch):
    from huggingface_hub import constants

    proxies = {"https": "http://proxy.invalid:3128"}
    assert loading._local_only_if_unreachable({"proxies": proxies}, "some-org/model") == {"proxies": proxies}
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # huggingface_hub makes no request at all
    assert loading._local_only_if_unreachable({}, "some-org/model") == {}
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert loading._local_only_if_unreachable({}, "some-org/model") == {}
    assert unreachable_hub == []
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert loading._local_only_if_unreachable({}, "some-org/model") == {"local_files_only": True}
    assert len(unreachable_hub) == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_probe_finds_a_closed_port_at_once_and_keeps_its_answer(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(hub, "_probed", {})
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{listener.getsockname()[1]}")
        assert hub.endpoint_reachable() is True
    assert hub.endpoint_reachable() is True  # closed by now, but the answer is kept for a while
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{_free_port()}")
    start = time.monotonic()
    assert hub.endpoint_reachable() is False
    assert time.monotonic() - start < hub.PROBE_TIMEOUT_S  # refused at once, not timed out


def test_the_probe_gives_up_on_a_name_lookup_that_hangs(monkeypatch):
    from huggingface_hub import constants

    release = threading.Event()

    def hang(*args, **kwargs):  # a resolver that does not answer
        release.wait(10)
        raise OSError("lookup timed out")

    monkeypatch.setattr(hub, "_probed", {})
    monkeypatch.setattr(hub.socket, "create_connection", hang)
    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.example")
    start = time.monotonic()
    try:
        assert hub.endpoint_reachable(timeout=0.3) is False
        assert time.monotonic() - start < 5.0  # given up after its timeout, not the lookup's 10 s
    finally:
        release.set()


def test_brushnet_folder_and_pipeline_folder(golden):
    expected = _golden_state_dict(golden, "sd15")
    _assert_state_dicts_equal(load_brushnet(_brushnet_dir(golden, "sd15")).state_dict(), expected)
    # A whole pipeline folder holds its BrushNet in brushnet/ (the same weights, see the golden README).
    _assert_state_dicts_equal(load_brushnet(golden(PIPELINES["sd15"]).dir).state_dict(), expected)


# -- pipelines ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("family, pipeline_class", [
    ("sd15", StableDiffusionBrushNetPipeline), ("sdxl", StableDiffusionXLBrushNetPipeline),
])
def test_load_pipeline_from_folders(golden, family, pipeline_class):
    base = golden(PIPELINES[family]).dir
    assert detect_base_family(base) == family

    pipe = load_pipeline(base, _brushnet_dir(golden, family))

    assert type(pipe) is pipeline_class
    _assert_state_dicts_equal(pipe.brushnet.state_dict(), _golden_state_dict(golden, family))
    unet = load_file(str(base / "unet" / "diffusion_pytorch_model.safetensors"))
    _assert_state_dicts_equal(pipe.unet.state_dict(), unet)


def test_load_pipeline_dtype(golden, recwarn):
    pipe = load_pipeline(golden(PIPELINES["sd15"]).dir, _brushnet_dir(golden, "sd15"), torch_dtype=torch.float16)
    assert pipe.unet.dtype == pipe.brushnet.dtype == pipe.vae.dtype == torch.float16
    # diffusers 0.42 deprecates `torch_dtype`; the loader passes its successor where it exists.
    assert not [w for w in recwarn if "torch_dtype" in str(w.message)]


@pytest.mark.parametrize("base_family, brushnet_family", [("sd15", "sdxl"), ("sdxl", "sd15")])
def test_family_mismatch_is_refused_before_loading(golden, no_weight_loading, base_family, brushnet_family):
    base = golden(PIPELINES[base_family]).dir
    with pytest.raises(ModelLoadError) as error:
        load_pipeline(base, _brushnet_dir(golden, brushnet_family))
    _assert_one_line(error, "SDXL", "SD1.5", "use a BrushNet trained for")


def test_family_mismatch_with_a_loaded_brushnet(golden, no_weight_loading):
    brushnet = _meta_brushnet(**RELEASED_CONFIGS["sdxl"])
    with pytest.raises(ModelLoadError, match="is for SDXL but base model"):
        load_pipeline(golden(PIPELINES["sd15"]).dir, brushnet)


def test_inpainting_base_is_refused(golden, tmp_path, no_weight_loading):
    source = golden(PIPELINES["sd15"]).dir
    base = tmp_path / "sd15_inpainting"
    (base / "unet").mkdir(parents=True)
    shutil.copy(source / "model_index.json", base)
    unet_config = json.loads((source / "unet" / "config.json").read_text())
    unet_config["in_channels"] = 9
    (base / "unet" / "config.json").write_text(json.dumps(unet_config))

    with pytest.raises(ModelLoadError) as error:
        load_pipeline(base, _brushnet_dir(golden, "sd15"))
    _assert_one_line(error, "inpainting", "text-to-image")


def test_single_file_base_round_trip(golden, tmp_path):
    folder = golden(PIPELINES["sd15"]).dir
    checkpoint = write_sd15_single_file(folder, tmp_path / "sd15_base.safetensors")
    assert detect_base_family(checkpoint) == "sd15"

    pipe = load_pipeline(checkpoint, _brushnet_dir(golden, "sd15"), base_config=str(folder))

    assert type(pipe) is StableDiffusionBrushNetPipeline
    _assert_state_dicts_equal(pipe.unet.state_dict(),
                              UNet2DConditionModel.from_pretrained(folder / "unet").state_dict())
    _assert_state_dicts_equal(pipe.vae.state_dict(), AutoencoderKL.from_pretrained(folder / "vae").state_dict())
    _assert_state_dicts_equal(pipe.text_encoder.state_dict(),
                              CLIPTextModel.from_pretrained(folder / "text_encoder").state_dict())


def test_single_file_base_offline_without_config(golden, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    checkpoint = tmp_path / "sd15_base.safetensors"
    save_file({loading.LDM_CONV_IN_KEY: torch.zeros(8, 4, 3, 3)}, str(checkpoint))
    with pytest.raises(ModelLoadError) as error:
        load_pipeline(checkpoint, _brushnet_dir(golden, "sd15"))
    _assert_one_line(error, "base_config")


def test_single_file_headers_decide_family_and_inpainting(golden, tmp_path, no_weight_loading):
    sdxl = tmp_path / "sdxl_base.safetensors"
    save_file({loading.LDM_CONV_IN_KEY: torch.zeros(8, 4, 3, 3),
               "conditioner.embedders.1.model.ln_final.weight": torch.zeros(8)}, str(sdxl))
    assert detect_base_family(sdxl) == "sdxl"
    with pytest.raises(ModelLoadError, match="is for SD1.5 but base model"):
        load_pipeline(sdxl, _brushnet_dir(golden, "sd15"), base_config=str(golden(PIPELINES["sd15"]).dir))

    inpainting = tmp_path / "sd15_inpainting.safetensors"
    save_file({loading.LDM_CONV_IN_KEY: torch.zeros(8, 9, 3, 3)}, str(inpainting))
    with pytest.raises(ModelLoadError) as error:
        load_pipeline(inpainting, _brushnet_dir(golden, "sd15"), base_config=str(golden(PIPELINES["sd15"]).dir))
    _assert_one_line(error, "inpainting")


def test_base_that_is_not_a_model(golden, tmp_path):
    with pytest.raises(ModelLoadError, match="not a diffusers base model folder"):
        detect_base_family(tmp_path)
    brushnet_file = tmp_path / "brushnet.safetensors"
    shutil.copy(_brushnet_dir(golden, "sd15") / "diffusion_pytorch_model.safetensors", brushnet_file)
    with pytest.raises(ModelLoadError, match="is a BrushNet"):
        detect_base_family(brushnet_file)
    with pytest.raises(ModelLoadError, match="Hub could not be reached"):
        detect_base_family("some-org/some-base-that-is-not-cached")


def test_family_follows_the_conditioning_not_the_depth():
    # A text-free BrushNet of 3 blocks (like the demo model's) is SD1.5-type, not SDXL.
    assert detect_brushnet_family({"block_out_channels": [32, 64, 128], "addition_embed_type": None}) == "sd15"
    assert detect_brushnet_family({"block_out_channels": [320, 640, 1280], "addition_embed_type": "text_time"}) == "sdxl"
    shapes = {"conv_in_condition.weight": (32, 9, 3, 3), "down_blocks.0.resnets.0.conv1.weight": (32, 32, 3, 3),
              "down_blocks.1.resnets.0.conv1.weight": (64, 32, 3, 3), "down_blocks.2.resnets.0.conv1.weight": (128, 64, 3, 3)}
    assert detect_brushnet_family(shapes) == "sd15"
    assert detect_brushnet_family({**shapes, "add_embedding.linear_1.weight": (128, 80)}) == "sdxl"


def test_load_pipeline_passes_variant_and_config_fields_to_the_brushnet(golden, tmp_path):
    # An fp16-variant BrushNet folder was "missing its weights"; a single file's norm_num_groups=,
    # which the error itself asks for, was dropped on the way.
    from safetensors.torch import save_file

    case = golden("sd15_tiny_pipeline").dir
    branch = BrushNetModel.from_pretrained(case / "brushnet")
    branch.save_pretrained(tmp_path / "variant", variant="fp16")
    with pytest.raises(ModelLoadError, match="holds diffusion_pytorch_model.fp16.safetensors .* pass variant='fp16'"):
        load_pipeline(case, tmp_path / "variant")
    StableDiffusionBrushNetPipeline.from_pretrained(case).save_pretrained(tmp_path / "base", variant="fp16")
    pipe = load_pipeline(tmp_path / "base", tmp_path / "variant", variant="fp16")
    assert torch.equal(pipe.brushnet.state_dict()["conv_in_condition.weight"], branch.state_dict()["conv_in_condition.weight"])
    save_file(branch.state_dict(), tmp_path / "alone.safetensors")
    with pytest.raises(ModelLoadError, match="pass norm_num_groups="):
        load_pipeline(case, tmp_path / "alone.safetensors")
    pipe = load_pipeline(case, tmp_path / "alone.safetensors", norm_num_groups=branch.config.norm_num_groups)
    assert torch.equal(pipe.brushnet.state_dict()["conv_in_condition.weight"], branch.state_dict()["conv_in_condition.weight"])


def test_a_pipeline_class_of_the_other_family_is_refused_at_load(golden):
    with pytest.raises(ValueError, match="holds an SDXL model: load it with StableDiffusionXLBrushNetPipeline"):
        StableDiffusionBrushNetPipeline.from_pretrained(golden("sdxl_tiny_pipeline").dir)
    with pytest.raises(ValueError, match="holds an SD1.5 BrushNet model: load it with StableDiffusionBrushNetPipeline"):
        StableDiffusionXLBrushNetPipeline.from_pretrained(golden("sd15_tiny_pipeline").dir)


def test_brushnet_from_pretrained_refuses_another_models_folder(golden):
    # diffusers built a BrushNet of the UNet's shape with every branch weight random (a warning
    # only), which its cross-attention blocks then passed off as a PowerPaint branch.
    from brushnet import BrushNetModel

    directory = golden("sd15_tiny_pipeline").dir
    assert isinstance(BrushNetModel.from_pretrained(directory, subfolder="brushnet"), BrushNetModel)
    for kwargs in ({"pretrained_model_name_or_path": directory / "unet"},
                   {"pretrained_model_name_or_path": directory, "subfolder": "unet"}):
        with pytest.raises(ValueError, match=r"unet holds a UNet2DConditionModel, not a BrushNetModel"):
            BrushNetModel.from_pretrained(**kwargs)
