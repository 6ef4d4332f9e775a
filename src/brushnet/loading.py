"""Load BrushNets and BrushNet pipelines from folders, single files or the Hugging Face Hub.

The CLI, the UI and the trainer all load models through this module, so every way a user may hold
a model gives the same checks and the same one-line `ModelLoadError`s:

- a BrushNet as a diffusers folder, a single `.safetensors` file in the released key layout (fp16
  or fp32, with or without a `config.json` beside it), a hub id, or (only with `allow_pickle=True`)
  a pickle file;
- a base model as a diffusers pipeline folder, a hub id or a single LDM-layout checkpoint.

Everything that can be decided from configs and tensor shapes (family, PowerPaint, inpainting
base) is decided before any weights are read, so a wrong combination fails in well under a second
instead of after loading gigabytes.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from .models import BrushNetModel
from .pipelines import StableDiffusionBrushNetPipeline, StableDiffusionXLBrushNetPipeline
from .pipelines.base import check_brushnet_matches_unet

logger = logging.getLogger(__name__)

__all__ = [
    "ModelLoadError",
    "brushnet_config_from_state_dict",
    "detect_base_family",
    "detect_brushnet_family",
    "load_brushnet",
    "load_pipeline",
]

SD15, SDXL = "sd15", "sdxl"
FAMILY_NAMES = {SD15: "SD1.5", SDXL: "SDXL"}
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")
SAFETENSORS_SUFFIX = ".safetensors"

# Config of the released SD1.5 BrushNets (segmentation_mask_brushnet_ckpt, random_mask_brushnet_ckpt).
# Fields that only described the UNet's attention (cross_attention_dim, attention_head_dim, ...) do
# not shape the branch and cannot be read from its weights; they are kept for faithful configs.
SD15_BRUSHNET_CONFIG = {
    "in_channels": 4,
    "conditioning_channels": 5,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ["DownBlock2D"] * 4,
    "mid_block_type": "MidBlock2D",
    "up_block_types": ["UpBlock2D"] * 4,
    "only_cross_attention": False,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-05,
    "cross_attention_dim": 768,
    "transformer_layers_per_block": 1,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "attention_head_dim": 8,
    "num_attention_heads": None,
    "use_linear_projection": False,
    "class_embed_type": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "num_class_embeds": None,
    "upcast_attention": False,
    "resnet_time_scale_shift": "default",
    "projection_class_embeddings_input_dim": None,
    "brushnet_conditioning_channel_order": "rgb",
    "conditioning_embedding_out_channels": [16, 32, 96, 256],
    "global_pool_conditions": False,
    "addition_embed_type_num_heads": 64,
}

# Config of the released SDXL BrushNets (segmentation_mask_brushnet_ckpt_sdxl_v1, random_mask_..._v0).
SDXL_BRUSHNET_CONFIG = {
    **SD15_BRUSHNET_CONFIG,
    "down_block_types": ["DownBlock2D"] * 3,
    "up_block_types": ["UpBlock2D"] * 3,
    "block_out_channels": [320, 640, 1280],
    "cross_attention_dim": 2048,
    "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20],
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}

FAMILY_CONFIGS = {SD15: SD15_BRUSHNET_CONFIG, SDXL: SDXL_BRUSHNET_CONFIG}

# SDXL's add-embedding input is the pooled text embedding (1280) + 6 size/crop ids x 256.
SDXL_ADD_EMBEDDING_INPUT_DIM = 2816
DEFAULT_NORM_NUM_GROUPS = 32

# Keys of the original (LDM / SGM) single-file layout.
LDM_CONV_IN_KEY = "model.diffusion_model.input_blocks.0.0.weight"
SDXL_SECOND_TEXT_ENCODER_PREFIX = "conditioner.embedders.1."
INPAINTING_IN_CHANNELS = 9

# Attention layers inside the branch's blocks: the mark of PowerPaint's BrushNet.
_ATTENTION_KEY = re.compile(r"^(down_blocks\.\d+|up_blocks\.\d+|mid_block)\.attentions\.")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# hub_kwargs that make sense for any repo; revision, subfolder and variant belong to one source.
_SHARED_HUB_KWARGS = ("cache_dir", "token", "local_files_only", "force_download", "proxies")


class ModelLoadError(ValueError):
    """A model could not be loaded. The message names the problem and the fix, in one sentence."""


# -- reading weights and configs -----------------------------------------------------------------


def _shapes(state_dict: Mapping) -> dict[str, tuple[int, ...]]:
    """Key -> shape for a state dict of tensors (any device, `meta` included) or of shapes."""
    return {key: tuple(value.shape if hasattr(value, "shape") else value) for key, value in state_dict.items()}


def _read_safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    # The header alone: no tensor data is read.
    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise ModelLoadError(f"{path} is not a readable .safetensors file ({_first_line(e)}): check the file.") from e


def _refuse_pickle(path: Path) -> None:
    raise ModelLoadError(
        f"{path} is a pickle file ({path.suffix}), and loading a pickle can run arbitrary code: convert it to "
        ".safetensors, or pass allow_pickle=True (--allow-pickle) if you trust where it came from."
    )


def _load_pickle_state_dict(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    if not allow_pickle:
        _refuse_pickle(path)
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # The caller accepted pickles, but a plain tensor file is still preferred: only fall back
        # when the file holds more than tensors.
        logger.warning("%s holds more than tensors; loading it with weights_only=False (allow_pickle=True).", path)
        loaded = torch.load(path, map_location="cpu", weights_only=False)
    # Training checkpoints often wrap the weights: {"state_dict": {...}}.
    while isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping):
        raise ModelLoadError(f"{path} does not hold a state dict (got {type(loaded).__name__}): pass a weights file.")
    tensors = {key: value for key, value in loaded.items() if isinstance(value, torch.Tensor)}
    if not tensors:
        raise ModelLoadError(f"{path} holds no tensors: pass a weights file.")
    return tensors


def _read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"Could not read {path} ({_first_line(e)}): fix or replace the file.") from e


def _dtype_kwargs(torch_dtype) -> dict:
    """The dtype argument for diffusers' loaders: `dtype` where it exists (`torch_dtype` is deprecated there)."""
    if torch_dtype is None:
        return {}
    from diffusers.utils import deprecation_utils

    # diffusers added `dtype` together with `_resolve_dtype`; older versions only know `torch_dtype`.
    return {"dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype": torch_dtype}


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _is_hub_id(source: str) -> bool:
    return bool(_HUB_ID.match(source)) and not source.endswith((SAFETENSORS_SUFFIX, *PICKLE_SUFFIXES))


def _hub_offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    return bool(getattr(constants, "HF_HUB_OFFLINE", False)) or env


def _missing_path_error(source, what: str) -> ModelLoadError:
    hint = "" if str(source).endswith((SAFETENSORS_SUFFIX, *PICKLE_SUFFIXES)) else ", or pass a hub id like 'org/name'"
    return ModelLoadError(f"{what} path {source} does not exist: check the path{hint}.")


def _hub_file(repo_id: str, filename: str, what: str, hub_kwargs: dict) -> str:
    """Download one small file (a config) of a hub repo, turning hub errors into ModelLoadError."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    keys = ("subfolder", "revision", "cache_dir", "token", "local_files_only", "force_download")
    kwargs = {key: hub_kwargs[key] for key in keys if hub_kwargs.get(key) is not None}
    try:
        return hf_hub_download(repo_id, filename, **kwargs)
    except LocalEntryNotFoundError as e:  # offline, no network, or not cached with local_files_only
        raise ModelLoadError(
            f"{what} '{repo_id}' is not a local path and the Hugging Face Hub could not be reached (offline or no "
            "network) to fetch it: pass a local folder or file instead."
        ) from e
    except RepositoryNotFoundError as e:  # also gated / private repos
        raise ModelLoadError(
            f"{what} '{repo_id}' is neither a local path nor an accessible hub repo: check the path or id (log in "
            "with `hf auth login` for a private or gated repo)."
        ) from e
    except RevisionNotFoundError as e:
        raise ModelLoadError(f"Hub repo '{repo_id}' has no revision {hub_kwargs.get('revision')!r}: fix it.") from e
    except EntryNotFoundError as e:
        raise ModelLoadError(
            f"Hub repo '{repo_id}' has no {filename}: it is not a diffusers {what} (pass subfolder=... if it is "
            "inside one)."
        ) from e
    except HFValidationError as e:
        raise _missing_path_error(repo_id, what) from e
    except Exception as e:  # connection errors of the HTTP client
        raise ModelLoadError(
            f"Could not fetch {what} '{repo_id}' from the Hugging Face Hub ({_first_line(e)}): pass a local folder "
            "or file instead."
        ) from e


# -- families ---------------------------------------------------------------------------------


def detect_brushnet_family(state_dict_or_config) -> str:
    """"sd15" or "sdxl" for a BrushNet state dict (tensors, meta tensors or shapes), config dict or model.

    SDXL means the branch reads SDXL's pooled text and size ids: a state dict with `add_embedding.*`,
    a config with `addition_embed_type` "text_time". Anything else is SD1.5-type, whatever its depth
    (a config without `addition_embed_type` falls back to the released layouts' block counts).
    """
    source = state_dict_or_config
    if not isinstance(source, Mapping) and hasattr(source, "config"):  # a BrushNetModel
        source = source.config
    if not isinstance(source, Mapping) or not source:
        raise ModelLoadError(
            f"Cannot tell a BrushNet family from {type(source).__name__}: pass a state dict or config."
        )
    if _is_config(source):
        return _family_from_config(source)
    return _family_from_shapes(_shapes(source))


def _is_config(mapping: Mapping) -> bool:
    return any(key in mapping for key in ("block_out_channels", "down_block_types", "_class_name"))


def _family_from_config(config: Mapping) -> str:
    # The family is what the branch conditions on: SDXL's pooled text + size ids ("text_time"), or
    # nothing (SD1.5 and other text-free UNets, whatever their depth). Only a config that does not
    # say falls back to the released layouts' block counts.
    if "addition_embed_type" in config:
        return SDXL if config["addition_embed_type"] == "text_time" else SD15
    n_blocks = len(config.get("block_out_channels") or config.get("down_block_types") or ())
    return SDXL if n_blocks == 3 else SD15


def _family_from_shapes(shapes: Mapping[str, tuple]) -> str:
    # SDXL BrushNets always carry the add-embedding of the pooled text and size ids.
    return SDXL if any(key.startswith("add_embedding.") for key in shapes) else SD15


def _indices(shapes: Mapping[str, tuple], prefix: str) -> set[int]:
    """The distinct integers right after `prefix` in the keys, e.g. block numbers of `down_blocks.`."""
    found = set()
    for key in shapes:
        if key.startswith(prefix):
            head = key[len(prefix):].split(".", 1)[0]
            if head.isdigit():
                found.add(int(head))
    return found


def _check_families(brushnet_family: str, base_family: str, brushnet_source, base_source) -> None:
    if brushnet_family != base_family:
        raise ModelLoadError(
            f"BrushNet {_describe(brushnet_source)} is for {FAMILY_NAMES[brushnet_family]} but base model "
            f"{base_source} is {FAMILY_NAMES[base_family]}: use a BrushNet trained for "
            f"{FAMILY_NAMES[base_family]}, or an {FAMILY_NAMES[brushnet_family]} base model."
        )


def _describe(source) -> str:
    if isinstance(source, BrushNetModel):
        return source.config.get("_name_or_path") or "(model object)"
    return str(source)


# -- PowerPaint -------------------------------------------------------------------------------


def _powerpaint_error(source) -> ModelLoadError:
    return ModelLoadError(
        f"{source} is a PowerPaint checkpoint (a BrushNet with cross-attention layers), which this package does not "
        "support: use a BrushNet checkpoint such as segmentation_mask_brushnet_ckpt or random_mask_brushnet_ckpt."
    )


def _check_brushnet_keys(keys, source) -> None:
    """Refuse weights that are not a BrushNet, then a PowerPaint BrushNet (which has attention layers)."""
    if "conv_in_condition.weight" not in keys:
        hint = " (it looks like a UNet)" if "conv_in.weight" in keys else ""
        raise ModelLoadError(
            f"{source} is not a BrushNet{hint}: it has no conv_in_condition.weight; pass a BrushNet checkpoint."
        )
    if any(_ATTENTION_KEY.match(key) for key in keys):
        raise _powerpaint_error(source)


def _check_not_powerpaint_config(config: Mapping, source) -> None:
    block_types = [*(config.get("down_block_types") or ()), config.get("mid_block_type") or "",
                   *(config.get("up_block_types") or ())]
    if any("CrossAttn" in str(block_type) for block_type in block_types):
        raise _powerpaint_error(source)


# -- config from weights --------------------------------------------------------------------------


def brushnet_config_from_state_dict(state_dict, **overrides) -> dict:
    """The `BrushNetModel` config for a state dict in the released key layout.

    `state_dict` may hold tensors (on any device, `meta` included) or just shapes. What the weights
    determine is read from them: the family, `block_out_channels` (each down block's first resnet),
    the number of blocks, `layers_per_block`, the mid-block type (one or two resnets), the
    conditioning channels and, for SDXL, the add-embedding input width. The rest comes from the
    released config of the family (`SD15_BRUSHNET_CONFIG`, `SDXL_BRUSHNET_CONFIG`).

    GroupNorm's group count leaves no trace in the weights: it is 32, as in every released model,
    when all widths allow it; other models (tiny test models) must give `norm_num_groups=...`.
    Likewise SDXL's `addition_time_embed_dim` is 256 for the released 2816-wide add-embedding and
    must be given otherwise. Any `overrides` replace the derived values.
    """
    shapes = _shapes(state_dict)
    _check_brushnet_keys(shapes, "This state dict")
    unknown = set(overrides) - set(SD15_BRUSHNET_CONFIG)
    if unknown:
        raise ModelLoadError(f"Unknown BrushNet config fields {sorted(unknown)}: use BrushNetModel's argument names.")

    family = _family_from_shapes(shapes)
    config = dict(FAMILY_CONFIGS[family])
    n_blocks = len(_indices(shapes, "down_blocks."))
    block_out_channels = [_shape(shapes, f"down_blocks.{i}.resnets.0.conv1.weight")[0] for i in range(n_blocks)]
    conv_in = _shape(shapes, "conv_in_condition.weight")
    config.update(
        in_channels=config["in_channels"],
        # The input is [noisy latent (in_channels), masked latent + mask]: the split is by convention.
        conditioning_channels=conv_in[1] - config["in_channels"],
        down_block_types=["DownBlock2D"] * n_blocks,
        up_block_types=["UpBlock2D"] * n_blocks,
        block_out_channels=block_out_channels,
        layers_per_block=len(_indices(shapes, "down_blocks.0.resnets.")),
        # from_unet's "MidBlock2D" has two resnets; "UNetMidBlock2D" (the reference default) one.
        mid_block_type="MidBlock2D" if "mid_block.resnets.1.conv1.weight" in shapes else "UNetMidBlock2D",
    )
    if family == SDXL:
        add_input_dim = _shape(shapes, "add_embedding.linear_1.weight")[1]
        config["projection_class_embeddings_input_dim"] = add_input_dim
        if add_input_dim != SDXL_ADD_EMBEDDING_INPUT_DIM and "addition_time_embed_dim" not in overrides:
            raise ModelLoadError(
                f"This SDXL BrushNet's add-embedding takes {add_input_dim} features, not the released "
                f"{SDXL_ADD_EMBEDDING_INPUT_DIM}, so its addition_time_embed_dim cannot be inferred: put its "
                "config.json beside the file, or pass addition_time_embed_dim=..."
            )
    if any(width % DEFAULT_NORM_NUM_GROUPS for width in block_out_channels) and "norm_num_groups" not in overrides:
        raise ModelLoadError(
            f"BrushNet block widths {block_out_channels} are not multiples of {DEFAULT_NORM_NUM_GROUPS}, so its "
            "GroupNorm group count cannot be inferred: put its config.json beside the file, or pass norm_num_groups=..."
        )
    config.update(overrides)
    return config


def _shape(shapes: Mapping[str, tuple], key: str) -> tuple:
    if key not in shapes:
        raise ModelLoadError(f"These BrushNet weights have no {key}: the file is incomplete or not a BrushNet.")
    return shapes[key]


def _empty_brushnet(config: Mapping, source) -> BrushNetModel:
    """A BrushNet with the config's architecture on the meta device: no memory, no random init."""
    _check_not_powerpaint_config(config, source)
    try:
        with torch.device("meta"):
            return BrushNetModel.from_config(dict(config))
    except (TypeError, ValueError) as e:
        raise ModelLoadError(
            f"The BrushNet config for {source} is invalid ({_first_line(e)}): fix its config.json."
        ) from e


def _check_weights_fit(model: BrushNetModel, shapes: Mapping[str, tuple], source, config_origin: str) -> None:
    expected = _shapes(model.state_dict())
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = sorted(key for key in set(expected) & set(shapes) if expected[key] != shapes[key])
    if missing or unexpected or wrong:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing keys such as {missing[0]}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected keys such as {unexpected[0]}")
        if wrong:
            key = wrong[0]
            problems.append(f"{len(wrong)} shape mismatches such as {key} {shapes[key]} vs {expected[key]}")
        raise ModelLoadError(
            f"The weights in {source} do not fit {config_origin} ({'; '.join(problems)}): use the config that "
            "came with the weights, or a complete BrushNet checkpoint."
        )


# -- BrushNet ----------------------------------------------------------------------------------


def load_brushnet(source: str | os.PathLike, *, torch_dtype=None, allow_pickle=False, **hub_kwargs) -> BrushNetModel:
    """Load a BrushNet from a diffusers folder, a single weights file or a hub id.

    - Folder: `config.json` + `diffusion_pytorch_model.safetensors` (a `.bin` only with
      `allow_pickle`); a whole pipeline folder with a `brushnet/` subfolder works too.
    - `.safetensors` file in the released key layout, fp16 or fp32: a `config.json` beside it is
      used when it is a BrushNet config, else the config is derived from the weights
      (`brushnet_config_from_state_dict`).
    - `.ckpt` / `.bin` / `.pt` / `.pth`: refused, since unpickling can run code, unless
      `allow_pickle=True`; then loaded like a `.safetensors` file.
    - Anything else that looks like `org/name` is fetched from the hub (`hub_kwargs`: revision,
      subfolder, variant, cache_dir, token, local_files_only, ...).

    The weights keep their values; they are cast to `torch_dtype` (default float32, as diffusers).
    PowerPaint checkpoints, pickles without consent, missing paths and an unreachable hub raise
    `ModelLoadError`.
    """
    if isinstance(source, BrushNetModel):
        return source.to(torch_dtype) if torch_dtype is not None else source
    path = Path(source)
    if path.is_dir():
        return _load_brushnet_folder(path, torch_dtype, allow_pickle, hub_kwargs)
    if path.is_file():
        return _load_brushnet_file(path, torch_dtype, allow_pickle)
    if _is_hub_id(str(source)):
        return _load_brushnet_hub(str(source), torch_dtype, hub_kwargs)
    raise _missing_path_error(source, "BrushNet")


def _brushnet_folder(folder: Path) -> Path:
    # A full pipeline folder (ours or the reference's) holds the BrushNet in brushnet/.
    if not (folder / "config.json").is_file() and (folder / "brushnet" / "config.json").is_file():
        return folder / "brushnet"
    return folder


def _load_brushnet_folder(folder: Path, torch_dtype, allow_pickle: bool, hub_kwargs: dict) -> BrushNetModel:
    folder = _brushnet_folder(folder)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(
            f"{folder} has no config.json: pass a BrushNet folder (config.json + diffusion_pytorch_model.safetensors) "
            "or a single .safetensors file."
        )
    config = _read_json(config_file)
    _check_is_brushnet_config(config, folder)
    _check_not_powerpaint_config(config, folder)

    variant = hub_kwargs.get("variant")
    stem = "diffusion_pytorch_model" + (f".{variant}" if variant else "")
    safetensors_files = [folder / f"{stem}.safetensors", folder / f"{stem}.safetensors.index.json"]
    pickle_files = [folder / f"{stem}.bin", folder / f"{stem}.bin.index.json"]
    if safetensors_files[0].is_file():
        _check_brushnet_keys(_read_safetensors_shapes(safetensors_files[0]), folder)
    if any(f.is_file() for f in safetensors_files):
        use_safetensors = True
    elif any(f.is_file() for f in pickle_files):
        if not allow_pickle:
            raise ModelLoadError(
                f"{folder} has only pickle weights ({stem}.bin), and loading a pickle can run arbitrary code: convert "
                "them to .safetensors, or pass allow_pickle=True (--allow-pickle) if you trust where they came from."
            )
        use_safetensors = False
    else:
        raise ModelLoadError(f"{folder} has a config.json but no {stem}.safetensors: the weights are missing.")

    kwargs = {"use_safetensors": use_safetensors, **_dtype_kwargs(torch_dtype)}
    if variant:
        kwargs["variant"] = variant
    try:
        return BrushNetModel.from_pretrained(folder, **kwargs)
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelLoadError(f"Could not load the BrushNet in {folder} ({_first_line(e)}): check its files.") from e


def _check_is_brushnet_config(config: Mapping, source) -> None:
    class_name = config.get("_class_name")
    if class_name is not None and class_name != "BrushNetModel":
        raise ModelLoadError(
            f"{source} holds a {class_name}, not a BrushNetModel: pass a BrushNet folder or file."
        )


def _load_brushnet_file(path: Path, torch_dtype, allow_pickle: bool) -> BrushNetModel:
    if path.suffix == SAFETENSORS_SUFFIX:
        shapes = _read_safetensors_shapes(path)
        state_dict = None  # read after all checks pass
    elif path.suffix in PICKLE_SUFFIXES:
        state_dict = _load_pickle_state_dict(path, allow_pickle)
        shapes = _shapes(state_dict)
    else:
        raise ModelLoadError(
            f"{path} is not a .safetensors file or a BrushNet folder: pass one of those (or a .ckpt/.bin with "
            "allow_pickle=True)."
        )
    _check_brushnet_keys(shapes, path)

    config, config_origin = _config_beside(path), f"the config.json beside {path.name}"
    if config is None:
        config, config_origin = brushnet_config_from_state_dict(shapes), "the config derived from its shapes"
    model = _empty_brushnet(config, path)
    _check_weights_fit(model, shapes, path, config_origin)

    if state_dict is None:
        state_dict = load_file(str(path))
    # Cast before loading (ModelMixin.to warns about dtype casts); float32 by default, as diffusers.
    dtype = torch_dtype or torch.float32
    state_dict = {key: value.to(dtype) if value.is_floating_point() else value for key, value in state_dict.items()}
    # assign=True adopts the loaded tensors as the parameters of the meta-device model.
    model.load_state_dict(state_dict, strict=True, assign=True)
    model.register_to_config(_name_or_path=str(path))
    return model.eval()


def _config_beside(path: Path) -> dict | None:
    """The BrushNet config.json in the same folder as a weights file, if there is one."""
    config_file = path.parent / "config.json"
    if not config_file.is_file():
        return None
    config = _read_json(config_file)
    # Only a BrushNet config counts: a stray config of another model must not be applied.
    if config.get("_class_name", "BrushNetModel") != "BrushNetModel" or "block_out_channels" not in config:
        return None
    return config


def _load_brushnet_hub(repo_id: str, torch_dtype, hub_kwargs: dict) -> BrushNetModel:
    # The config first: it is small, proves the hub is reachable and shows a PowerPaint model.
    config = _read_json(Path(_hub_file(repo_id, "config.json", "BrushNet", hub_kwargs)))
    _check_is_brushnet_config(config, repo_id)
    _check_not_powerpaint_config(config, repo_id)
    try:
        return BrushNetModel.from_pretrained(repo_id, **hub_kwargs, **_dtype_kwargs(torch_dtype))
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelLoadError(
            f"Could not load BrushNet '{repo_id}' from the hub ({_first_line(e)}): check the id."
        ) from e


def _peek_brushnet_family(source) -> str | None:
    """The family of a BrushNet source from its config or safetensors header, or None if that needs loading."""
    if isinstance(source, BrushNetModel):
        return detect_brushnet_family(source.config)
    # Refusals (not a BrushNet, PowerPaint) come first: they explain more than a family mismatch.
    path = Path(source)
    if path.is_dir():
        config_file = _brushnet_folder(path) / "config.json"
        if not config_file.is_file():
            return None
        config = _read_json(config_file)
        _check_is_brushnet_config(config, path)
        _check_not_powerpaint_config(config, path)
        return _family_from_config(config)
    if path.is_file() and path.suffix == SAFETENSORS_SUFFIX:
        shapes = _read_safetensors_shapes(path)
        _check_brushnet_keys(shapes, path)
        return _family_from_shapes(shapes)
    return None


# -- base models -------------------------------------------------------------------------------


@dataclass
class _BaseInfo:
    family: str
    unet_in_channels: int | None
    single_file: bool


def detect_base_family(source, *, allow_pickle: bool = False, **hub_kwargs) -> str:
    """"sd15" or "sdxl" for a base model, read from configs or checkpoint keys without loading weights.

    A diffusers folder or hub id is SDXL when its UNet config has `addition_embed_type` "text_time"
    or it has a `text_encoder_2`. A single-file (LDM/SGM layout) checkpoint is SDXL when it holds
    `conditioner.embedders.1.*` (SDXL's second text encoder).
    """
    return _inspect_base(source, allow_pickle, hub_kwargs).family


def _inspect_base(source, allow_pickle: bool, hub_kwargs: dict) -> _BaseInfo:
    path = Path(source)
    if path.is_dir():
        index_file, unet_file = path / "model_index.json", path / "unet" / "config.json"
        if not index_file.is_file() and not unet_file.is_file():
            raise ModelLoadError(
                f"{path} is not a diffusers base model folder (no model_index.json or unet/config.json): pass an "
                "SD1.5 or SDXL pipeline folder, hub id or single .safetensors checkpoint."
            )
        index = _read_json(index_file) if index_file.is_file() else {}
        unet_config = _read_json(unet_file) if unet_file.is_file() else {}
        return _base_info_from_configs(index, unet_config)
    if path.is_file():
        return _base_info_from_checkpoint(path, allow_pickle)
    if _is_hub_id(str(source)):
        repo_kwargs = {key: value for key, value in hub_kwargs.items() if key != "subfolder"}
        index = _read_json(Path(_hub_file(str(source), "model_index.json", "base model", repo_kwargs)))
        unet_config = _read_json(Path(_hub_file(str(source), "config.json", "base model",
                                                {**repo_kwargs, "subfolder": "unet"})))
        return _base_info_from_configs(index, unet_config)
    raise _missing_path_error(source, "Base model")


def _base_info_from_configs(index: Mapping, unet_config: Mapping) -> _BaseInfo:
    text_encoder_2 = index.get("text_encoder_2")
    has_text_encoder_2 = bool(text_encoder_2) and text_encoder_2[0] is not None
    sdxl = unet_config.get("addition_embed_type") == "text_time" or has_text_encoder_2
    return _BaseInfo(SDXL if sdxl else SD15, unet_config.get("in_channels"), single_file=False)


def _base_info_from_checkpoint(path: Path, allow_pickle: bool) -> _BaseInfo:
    if path.suffix == SAFETENSORS_SUFFIX:
        shapes = _read_safetensors_shapes(path)
    elif path.suffix in PICKLE_SUFFIXES:
        shapes = _shapes(_load_pickle_state_dict(path, allow_pickle))
    else:
        raise ModelLoadError(f"{path} is not a .safetensors checkpoint or a model folder: pass one of those.")
    if LDM_CONV_IN_KEY not in shapes:
        what = "a BrushNet" if "conv_in_condition.weight" in shapes else "not a Stable Diffusion checkpoint"
        raise ModelLoadError(
            f"{path} is {what} (no {LDM_CONV_IN_KEY}): pass an SD1.5 or SDXL base checkpoint in the original "
            "single-file layout, or a diffusers folder."
        )
    sdxl = any(key.startswith(SDXL_SECOND_TEXT_ENCODER_PREFIX) for key in shapes)
    return _BaseInfo(SDXL if sdxl else SD15, shapes[LDM_CONV_IN_KEY][1], single_file=True)


def _check_not_inpainting(info: _BaseInfo, source) -> None:
    if info.unet_in_channels == INPAINTING_IN_CHANNELS:
        raise ModelLoadError(
            f"Base model {source} is an inpainting model (its UNet takes {INPAINTING_IN_CHANNELS} input channels), but "
            "BrushNet needs a plain text-to-image base: pass the non-inpainting version of the model."
        )


# -- pipelines -------------------------------------------------------------------------------


def check_model_pair(base, brushnet, *, allow_pickle=False, **hub_kwargs) -> _BaseInfo:
    """Refuse a base model and BrushNet that cannot work together, from configs and checkpoint
    headers only (no weights read): an inpainting (9-channel) base, or a BrushNet of the other family
    (when its family can be read without loading it), a pickle BrushNet without `allow_pickle`.
    Raises `ModelLoadError`."""
    base_info = _inspect_base(base, allow_pickle, hub_kwargs)
    _check_not_inpainting(base_info, base)
    family = _peek_brushnet_family(brushnet)
    if family is not None:
        _check_families(family, base_info.family, brushnet, base)
    elif not allow_pickle and not isinstance(brushnet, BrushNetModel) and Path(brushnet).suffix in PICKLE_SUFFIXES:
        _refuse_pickle(Path(brushnet))
    return base_info


def load_pipeline(
    base: str | os.PathLike,
    brushnet: str | os.PathLike | BrushNetModel,
    *,
    torch_dtype=None,
    allow_pickle=False,
    base_config: str | None = None,
    **hub_kwargs,
):
    """A `StableDiffusionBrushNetPipeline` or `StableDiffusionXLBrushNetPipeline` for a base model and a BrushNet.

    `base` is a diffusers pipeline folder or hub id, or a single-file checkpoint (original LDM/SGM
    layout, loaded with diffusers' `from_single_file`; offline it needs `base_config`, a local
    diffusers folder of the same family that holds the component configs and tokenizers).
    `brushnet` is anything `load_brushnet` accepts, or a loaded `BrushNetModel`. The pipeline class
    follows the BrushNet's family.

    Checks run on configs and checkpoint headers before the base weights are read: a family
    mismatch (SD1.5 BrushNet with an SDXL base or the reverse) and an inpainting (9-channel) base
    raise `ModelLoadError` at once. `hub_kwargs` go to the base model; the BrushNet gets only the
    repo-independent ones (cache_dir, token, local_files_only, force_download, proxies).
    """
    base_info = check_model_pair(base, brushnet, allow_pickle=allow_pickle, **hub_kwargs)

    brushnet_hub_kwargs = {key: hub_kwargs[key] for key in _SHARED_HUB_KWARGS if key in hub_kwargs}
    model = load_brushnet(brushnet, torch_dtype=torch_dtype, allow_pickle=allow_pickle, **brushnet_hub_kwargs)
    family = detect_brushnet_family(model.config)
    _check_families(family, base_info.family, brushnet, base)

    pipeline_class = StableDiffusionXLBrushNetPipeline if family == SDXL else StableDiffusionBrushNetPipeline
    kwargs = dict(hub_kwargs, brushnet=model, **_dtype_kwargs(torch_dtype))
    if base_info.single_file:
        pipe = _load_single_file_pipeline(pipeline_class, Path(base), base_info, base_config, kwargs)
    else:
        try:
            pipe = pipeline_class.from_pretrained(base, **kwargs)
        except ModelLoadError:
            raise
        except (OSError, ValueError, RuntimeError) as e:
            raise ModelLoadError(f"Could not load base model {base} ({_first_line(e)}): check its files.") from e
    try:
        check_brushnet_matches_unet(pipe.brushnet, pipe.unet)
    except ValueError as e:
        raise ModelLoadError(_first_line(e)) from e
    return pipe


def _load_single_file_pipeline(pipeline_class, path: Path, base_info: _BaseInfo, base_config, kwargs: dict):
    if base_config is None and _hub_offline():
        raise ModelLoadError(
            f"Loading the single-file base {path} needs the diffusers configs of its model family, and the hub is "
            f"offline: pass base_config=<a local {FAMILY_NAMES[base_info.family]} diffusers folder>."
        )
    if base_config is not None and Path(base_config).is_dir():
        # The configs decide the architecture the weights are converted into: they must be the same family.
        config_family = _inspect_base(base_config, False, {}).family
        if config_family != base_info.family:
            raise ModelLoadError(
                f"base_config {base_config} is {FAMILY_NAMES[config_family]} but {path} is "
                f"{FAMILY_NAMES[base_info.family]}: pass a {FAMILY_NAMES[base_info.family]} diffusers folder."
            )
    try:
        return pipeline_class.from_single_file(str(path), config=base_config and str(base_config), **kwargs)
    except ModelLoadError:
        raise
    except Exception as e:  # diffusers' single-file path raises many types (SingleFileComponentError, OSError, ...)
        hint = "" if base_config else " (pass base_config=<a local diffusers folder> when offline)"
        raise ModelLoadError(f"Could not load the single-file base {path}{hint}: {_first_line(e)}.") from e
