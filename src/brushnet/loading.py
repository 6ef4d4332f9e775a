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

A PowerPaint v2 branch (a BrushNet with cross-attention) loads as a `BrushNetModel` too, and with a
base model as a `StableDiffusionPowerPaintPipeline`, together with its branch text encoder: the
released `PowerPaint_Brushnet/pytorch_model.bin` (read with `torch.load(weights_only=True)`, which
cannot run code) or a `text_encoder_brushnet.safetensors` beside it, or IOPaint's
`text_encoder_brushnet/` and `tokenizer/` folders.
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

from . import hub
from .models import BrushNetModel
from .models import task_prompts
from .pipelines import (
    StableDiffusionBrushNetPipeline,
    StableDiffusionPowerPaintPipeline,
    StableDiffusionXLBrushNetPipeline,
)
from .models.compatibility import mismatch_message
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
_HUB_ID = hub.HUB_ID
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


def _check_torch_file(path: Path) -> None:
    """ModelLoadError unless `path` starts as a `torch.save` file does: a zip archive (torch >= 1.6)
    or a pickle (the legacy format, opening with pickle's PROTO opcode). torch's unpicklers fail on
    other bytes (text, an image) with any exception, a KeyError or a UnicodeDecodeError, or with an
    UnpicklingError that would read as "holds more than tensors"."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise ModelLoadError(f"Could not read {path} ({_first_line(e)}): check the file.") from e
    if head[:4] != b"PK\x03\x04" and head[:1] != b"\x80":
        raise ModelLoadError(f"{path} is not a PyTorch checkpoint (neither a torch.save zip archive nor a pickle): "
                             "pass a .safetensors, .ckpt, .bin or .pt weights file.")


def _load_pickle_state_dict(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    if not allow_pickle:
        _refuse_pickle(path)
    _check_torch_file(path)
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # The caller accepted pickles, but a plain tensor file is still preferred: only fall back
        # when the file holds more than tensors.
        logger.warning("%s holds more than tensors; loading it with weights_only=False (allow_pickle=True).", path)
        loaded = torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError) as e:  # a truncated or damaged archive
        raise ModelLoadError(f"Could not read {path} ({_first_line(e)}): check the file.") from e
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


def _local_only_if_unreachable(hub_kwargs: dict, *sources) -> dict:
    """`hub_kwargs`, with local_files_only=True when one of `sources` is fetched from the hub and the
    hub cannot be reached (see hub.py): without it every config and weights request would retry for
    half a minute before the cache answered or our one-line error came. Local sources never probe."""
    if any(_from_hub(source) for source in sources):
        return hub.local_only_if_unreachable(hub_kwargs)
    return hub_kwargs


def _from_hub(source) -> bool:
    # hub.looks_like_hub_id, less the weight-file names (org/model.safetensors) that load_brushnet
    # reports as a missing path rather than fetch.
    return hub.looks_like_hub_id(source) and _is_hub_id(str(source))


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

# File names of the branch text encoder: the release's pickle, our safetensors copy, IOPaint's folder.
POWERPAINT_TEXT_ENCODER_BIN = "pytorch_model.bin"
POWERPAINT_TEXT_ENCODER_SAFETENSORS = "text_encoder_brushnet.safetensors"
POWERPAINT_BRANCH_FOLDER = "PowerPaint_Brushnet"
IOPAINT_TEXT_ENCODER_FOLDER = "text_encoder_brushnet"


def _check_brushnet_keys(keys, source) -> None:
    """Refuse weights that are not a BrushNet (or PowerPaint branch)."""
    if "conv_in_condition.weight" not in keys:
        hint = " (it looks like a UNet)" if "conv_in.weight" in keys else ""
        raise ModelLoadError(
            f"{source} is not a BrushNet{hint}: it has no conv_in_condition.weight; pass a BrushNet checkpoint."
        )


def _is_powerpaint_config(config: Mapping) -> bool:
    block_types = [*(config.get("down_block_types") or ()), config.get("mid_block_type") or "",
                   *(config.get("up_block_types") or ())]
    return any("CrossAttn" in str(block_type) for block_type in block_types)


def _is_powerpaint_shapes(shapes: Mapping) -> bool:
    return any(_ATTENTION_KEY.match(key) for key in shapes)


def is_powerpaint(brushnet) -> bool:
    """True when a BrushNet source (model, folder or `.safetensors` file) is a PowerPaint branch, read
    from its config or safetensors header; anything else (a pickle, a hub id) counts as not PowerPaint."""
    if isinstance(brushnet, BrushNetModel):
        return brushnet.has_attention
    path = Path(brushnet)
    if path.is_dir():
        config_file = _brushnet_folder(path) / "config.json"
        return config_file.is_file() and _is_powerpaint_config(_read_json(config_file))
    if path.is_file() and path.suffix == SAFETENSORS_SUFFIX:
        return _is_powerpaint_shapes(_read_safetensors_shapes(path))
    return False


@dataclass
class _TextEncoderSource:
    weights: Path | None = None  # the released state dict (.bin) or its .safetensors copy
    folder: Path | None = None  # IOPaint: a CLIPTextModel folder with the task tokens in its table
    tokenizer: Path | None = None  # IOPaint: the tokenizer that goes with it


def _find_branch_text_encoder(brushnet, text_encoder_brushnet=None) -> _TextEncoderSource:
    """Where the branch text encoder of a PowerPaint source is, before anything loads.

    Looked for beside the branch weights (`text_encoder_brushnet.safetensors`, then the released
    `pytorch_model.bin`) and, for IOPaint's layout, in `text_encoder_brushnet/` (+ `tokenizer/`)
    next to `PowerPaint_Brushnet/`. `text_encoder_brushnet` names it explicitly (file or folder).
    """
    if text_encoder_brushnet is not None:
        path = Path(text_encoder_brushnet)
        if path.is_dir():
            return _TextEncoderSource(folder=path)
        if path.is_file():
            return _TextEncoderSource(weights=path)
        raise _missing_path_error(path, "Branch text encoder")
    if isinstance(brushnet, BrushNetModel):
        raise ModelLoadError(
            "A loaded PowerPaint BrushNetModel comes without its branch text encoder: pass "
            f"text_encoder_brushnet=<its {POWERPAINT_TEXT_ENCODER_BIN} or {POWERPAINT_TEXT_ENCODER_SAFETENSORS}>, or "
            "the PowerPaint folder instead of the model."
        )
    path = Path(brushnet)
    branch_dir = _brushnet_folder(path) if path.is_dir() else path.parent
    root = branch_dir.parent if branch_dir.name == POWERPAINT_BRANCH_FOLDER else branch_dir
    for name in (POWERPAINT_TEXT_ENCODER_SAFETENSORS, POWERPAINT_TEXT_ENCODER_BIN):
        if (branch_dir / name).is_file():
            return _TextEncoderSource(weights=branch_dir / name)
    # IOPaint's layout, and a saved StableDiffusionPowerPaintPipeline's (its branch in brushnet/).
    for top in (root, *([branch_dir.parent] if branch_dir.name == "brushnet" else [])):
        folder = top / IOPAINT_TEXT_ENCODER_FOLDER
        if (folder / "config.json").is_file():
            tokenizer = top / "tokenizer"
            return _TextEncoderSource(folder=folder, tokenizer=tokenizer if tokenizer.is_dir() else None)
    raise ModelLoadError(
        f"PowerPaint branch {brushnet} has no branch text encoder: put its {POWERPAINT_TEXT_ENCODER_BIN} (from the "
        f"same release) or {POWERPAINT_TEXT_ENCODER_SAFETENSORS} in {branch_dir}, or pass text_encoder_brushnet=..."
    )


def _read_text_encoder_state(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    if path.suffix == SAFETENSORS_SUFFIX:
        _read_safetensors_shapes(path)  # a readable header, or one clear error
        return load_file(str(path))
    _check_torch_file(path)
    try:
        # weights_only cannot run code: a plain state dict (what PowerPaint released) needs no consent.
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        if not allow_pickle:
            raise ModelLoadError(
                f"{path} holds more than tensors, and loading it can run arbitrary code: convert it to .safetensors, "
                "or pass allow_pickle=True (--allow-pickle) if you trust where it came from."
            ) from None
        return _load_pickle_state_dict(path, allow_pickle)
    except (OSError, RuntimeError, EOFError) as e:
        raise ModelLoadError(f"Could not read {path} ({_first_line(e)}): check the file.") from e
    if not isinstance(loaded, Mapping) or not any(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ModelLoadError(f"{path} does not hold a state dict: pass the branch text encoder's weights file.")
    return {key: value for key, value in loaded.items() if isinstance(value, torch.Tensor)}


def write_text_encoder_safetensors(source, *, allow_pickle: bool = False, overwrite: bool = False) -> Path:
    """Write `text_encoder_brushnet.safetensors` beside a PowerPaint release's `pytorch_model.bin`
    (same tensors, same names), which loads without unpickling from then on. Returns its path.
    An existing safetensors file is replaced only with `overwrite`."""
    path = Path(source)
    if path.is_dir():
        path = _brushnet_folder(path) / POWERPAINT_TEXT_ENCODER_BIN
    if not path.is_file():
        raise _missing_path_error(path, "PowerPaint text encoder")
    if path.suffix.lower() not in (".bin", ".pt", ".pth", ".ckpt"):
        raise ModelLoadError(f"{path} is a {path.suffix or 'suffix-less'} file: this reads the pickled text encoder "
                             f"of a PowerPaint v2 release, {POWERPAINT_TEXT_ENCODER_BIN}, or the folder holding it.")
    target = path.with_name(POWERPAINT_TEXT_ENCODER_SAFETENSORS)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; pass --overwrite to replace it")
    from safetensors.torch import save

    from .files import atomic_write

    state = _read_text_encoder_state(path, allow_pickle)
    try:
        task_prompts.unwrap_state_dict(state)  # refuses files that are not a branch text encoder
    except ValueError as e:
        raise ModelLoadError(f"{path}: {_first_line(e)}") from e
    # Loading prefers this file to the .bin from then on: an interrupted write must leave none.
    with atomic_write(target) as f:
        f.write(save({key: value.contiguous() for key, value in state.items()}))
    return target


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
    # PowerPaint keeps attention where the UNet has it; its head count follows the family's config.
    attends = lambda prefix: any(key.startswith(prefix + ".attentions.") for key in shapes)  # noqa: E731
    config.update(
        in_channels=config["in_channels"],
        # The input is [noisy latent (in_channels), masked latent + mask]: the split is by convention.
        conditioning_channels=conv_in[1] - config["in_channels"],
        down_block_types=["CrossAttnDownBlock2D" if attends(f"down_blocks.{i}") else "DownBlock2D"
                          for i in range(n_blocks)],
        up_block_types=["CrossAttnUpBlock2D" if attends(f"up_blocks.{i}") else "UpBlock2D" for i in range(n_blocks)],
        block_out_channels=block_out_channels,
        layers_per_block=len(_indices(shapes, "down_blocks.0.resnets.")),
        # from_unet's "MidBlock2D" has two resnets; "UNetMidBlock2D" (the reference default) one.
        mid_block_type="MidBlock2D" if "mid_block.resnets.1.conv1.weight" in shapes else "UNetMidBlock2D",
    )
    if attends("mid_block"):
        config["mid_block_type"] = "UNetMidBlock2DCrossAttn"
    to_k = next((shape for key, shape in shapes.items() if key.endswith("attn2.to_k.weight")), None)
    if to_k is not None:
        config["cross_attention_dim"] = to_k[1]
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
        what = "PowerPaint branch" if _is_powerpaint_shapes(shapes) else "BrushNet"
        raise ModelLoadError(
            f"{what} block widths {block_out_channels} are not multiples of {DEFAULT_NORM_NUM_GROUPS}, so its "
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
        what = "PowerPaint checkpoint" if _is_powerpaint_shapes(shapes) else "BrushNet checkpoint"
        raise ModelLoadError(
            f"The weights in {source} do not fit {config_origin} ({'; '.join(problems)}): use the config that "
            f"came with the weights, or a complete {what}."
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

    A PowerPaint v2 branch loads the same way (its folder, `PowerPaint_Brushnet/` or the folder
    above it); `brushnet.has_attention` tells it apart. The weights keep their values; they are
    cast to `torch_dtype` (default float32, as diffusers). Pickles without consent, missing paths
    and an unreachable hub raise `ModelLoadError`; when the hub cannot be reached at all, a hub id
    loads from the local cache only (at once, instead of after half a minute of retries).
    """
    if isinstance(source, BrushNetModel):
        return source.to(torch_dtype) if torch_dtype is not None else source
    path = Path(source)
    if path.is_dir():
        return _load_brushnet_folder(path, torch_dtype, allow_pickle, hub_kwargs)
    if path.is_file():
        overrides = {key: hub_kwargs[key] for key in _BRUSHNET_CONFIG_KWARGS if key in hub_kwargs}
        return _load_brushnet_file(path, torch_dtype, allow_pickle, overrides)
    if _is_hub_id(str(source)):
        return _load_brushnet_hub(str(source), torch_dtype, _local_only_if_unreachable(hub_kwargs, source))
    raise _missing_path_error(source, "BrushNet")


def _brushnet_folder(folder: Path) -> Path:
    # A full pipeline folder (ours or the reference's) holds the BrushNet in brushnet/; PowerPaint's
    # release and IOPaint's copy hold it in PowerPaint_Brushnet/, BrushEdit's repo in brushnetX/.
    if not (folder / "config.json").is_file():
        for name in ("brushnet", POWERPAINT_BRANCH_FOLDER, "brushnetX"):
            if (folder / name / "config.json").is_file():
                return folder / name
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

    variant = hub_kwargs.get("variant")
    stem = "diffusion_pytorch_model" + (f".{variant}" if variant else "")
    safetensors_files = [folder / f"{stem}.safetensors", folder / f"{stem}.safetensors.index.json"]
    pickle_files = [folder / f"{stem}.bin", folder / f"{stem}.bin.index.json"]
    if safetensors_files[0].is_file():
        shapes = _read_safetensors_shapes(safetensors_files[0])
        _check_brushnet_keys(shapes, folder)
        # diffusers would fill missing weights with random values, with only a warning.
        _check_weights_fit(_empty_brushnet(config, folder), shapes, folder, "its config.json")
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
        variants = sorted(p.name for p in folder.glob("diffusion_pytorch_model.*.safetensors"))
        if variants and not variant:
            found = variants[0].split(".")[1]
            raise ModelLoadError(f"{folder} holds {variants[0]} but no diffusion_pytorch_model.safetensors: pass "
                                 f"variant={found!r} to load that variant.")
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


def _load_brushnet_file(path: Path, torch_dtype, allow_pickle: bool, overrides: dict | None = None) -> BrushNetModel:
    if path.suffix == SAFETENSORS_SUFFIX:
        shapes = _read_safetensors_shapes(path)
        state_dict = None  # read after all checks pass
    elif path.suffix in PICKLE_SUFFIXES:
        state_dict = _load_pickle_state_dict(path, allow_pickle)
        shapes = _shapes(state_dict)
    else:
        raise ModelLoadError(
            f"{path} is not a .safetensors file or a BrushNet folder: pass one of those (or a .ckpt/.bin with "
            "allow_pickle=True, --allow-pickle)."
        )
    _check_brushnet_keys(shapes, path)

    config, config_origin = _config_beside(path), f"the config.json beside {path.name}"
    if config is None:
        config = brushnet_config_from_state_dict(shapes, **(overrides or {}))
        config_origin = "the config derived from its shapes"
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
    # Refusals (not a BrushNet) come first: they explain more than a family mismatch.
    path = Path(source)
    if path.is_dir():
        config_file = _brushnet_folder(path) / "config.json"
        if not config_file.is_file():
            return None
        config = _read_json(config_file)
        _check_is_brushnet_config(config, path)
        return _family_from_config(config)
    if path.is_file() and path.suffix == SAFETENSORS_SUFFIX:
        shapes = _read_safetensors_shapes(path)
        _check_brushnet_keys(shapes, path)
        return _family_from_shapes(shapes)
    return None


def _peek_brushnet_config(source) -> dict | None:
    """A BrushNet's config without reading its weights (its config.json, or derived from a
    safetensors header), or None when that cannot be had cheaply."""
    if isinstance(source, BrushNetModel):
        return dict(source.config)
    path = Path(source)
    if path.is_dir():
        config_file = _brushnet_folder(path) / "config.json"
        return _read_json(config_file) if config_file.is_file() else None
    if path.is_file() and path.suffix == SAFETENSORS_SUFFIX:
        config = _config_beside(path)
        if config is None:
            try:
                config = brushnet_config_from_state_dict(_read_safetensors_shapes(path))
            except ModelLoadError:
                return None  # loading says what is missing
        return config
    return None


# -- base models -------------------------------------------------------------------------------


@dataclass
class _BaseInfo:
    family: str
    unet_in_channels: int | None
    single_file: bool
    # The UNet's config where the base has one (a diffusers folder or hub id); for a single file,
    # only what its keys show.
    unet_config: dict | None = None


def detect_base_family(source, *, allow_pickle: bool = False, **hub_kwargs) -> str:
    """"sd15" or "sdxl" for a base model, read from configs or checkpoint keys without loading weights.

    A diffusers folder or hub id is SDXL when its UNet config has `addition_embed_type` "text_time"
    or it has a `text_encoder_2`. A single-file (LDM/SGM layout) checkpoint is SDXL when it holds
    `conditioner.embedders.1.*` (SDXL's second text encoder).
    """
    return _inspect_base(source, allow_pickle, _local_only_if_unreachable(hub_kwargs, source)).family


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
    return _BaseInfo(SDXL if sdxl else SD15, unet_config.get("in_channels"), single_file=False,
                     unet_config=dict(unet_config) or None)


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
    unet_config = {"in_channels": shapes[LDM_CONV_IN_KEY][1], "addition_embed_type": "text_time" if sdxl else None}
    return _BaseInfo(SDXL if sdxl else SD15, shapes[LDM_CONV_IN_KEY][1], single_file=True, unet_config=unet_config)


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
    # Only the base's configs are fetched here: a hub BrushNet is not looked into before loading.
    base_info = _inspect_base(base, allow_pickle, _local_only_if_unreachable(hub_kwargs, base))
    _check_not_inpainting(base_info, base)
    if base_info.family != SD15 and is_powerpaint(brushnet):
        raise ModelLoadError(
            f"{brushnet} is a PowerPaint v2 branch, which exists for SD1.5 only, but base model {base} is "
            f"{FAMILY_NAMES[base_info.family]}: pass an SD1.5 base (folder or single file)."
        )
    family = _peek_brushnet_family(brushnet)
    if family is not None:
        _check_families(family, base_info.family, brushnet, base)
        config = _peek_brushnet_config(brushnet)
        message = config and base_info.unet_config and mismatch_message(
            config, base_info.unet_config, f"BrushNet {_describe(brushnet)}", f"base model {base}")
        if message:
            raise ModelLoadError(message)
    elif not allow_pickle and not isinstance(brushnet, BrushNetModel) and Path(brushnet).suffix in PICKLE_SUFFIXES:
        _refuse_pickle(Path(brushnet))
    return base_info


def _brushnet_kwargs(brushnet, hub_kwargs: dict) -> dict:
    """What of load_pipeline's keywords the BrushNet gets: the repo-independent hub ones, a `variant`
    its local folder has (a base's fp16 variant says nothing of a BrushNet saved without one), and
    the config fields a single weights file may need (norm_num_groups, addition_time_embed_dim)."""
    kwargs = {key: hub_kwargs[key] for key in _SHARED_HUB_KWARGS if key in hub_kwargs}
    for key in _BRUSHNET_CONFIG_KWARGS:  # the BrushNet's alone: taken out of what the base gets
        if key in hub_kwargs:
            kwargs[key] = hub_kwargs.pop(key)
    variant = hub_kwargs.get("variant")
    if variant and isinstance(brushnet, (str, os.PathLike)) and Path(brushnet).is_dir():
        folder = _brushnet_folder(Path(brushnet))
        if (folder / f"diffusion_pytorch_model.{variant}.safetensors").is_file():
            kwargs["variant"] = variant
    return kwargs


_BRUSHNET_CONFIG_KWARGS = ("norm_num_groups", "addition_time_embed_dim")


def load_pipeline(
    base: str | os.PathLike,
    brushnet: str | os.PathLike | BrushNetModel,
    *,
    torch_dtype=None,
    allow_pickle=False,
    base_config: str | None = None,
    text_encoder_brushnet: str | os.PathLike | None = None,
    **hub_kwargs,
):
    """A `StableDiffusionBrushNetPipeline` or `StableDiffusionXLBrushNetPipeline` for a base model and a BrushNet,
    or a `StableDiffusionPowerPaintPipeline` for an SD1.5 base and a PowerPaint v2 branch.

    `base` is a diffusers pipeline folder or hub id, or a single-file checkpoint (original LDM/SGM
    layout, loaded with diffusers' `from_single_file`; offline it needs `base_config`, a local
    diffusers folder of the same family that holds the component configs and tokenizers).
    `brushnet` is anything `load_brushnet` accepts, or a loaded `BrushNetModel`. The pipeline class
    follows the BrushNet's family.

    Checks run on configs and checkpoint headers before the base weights are read: a family
    mismatch (SD1.5 BrushNet with an SDXL base or the reverse) and an inpainting (9-channel) base
    raise `ModelLoadError` at once. `hub_kwargs` go to the base model; the BrushNet gets only the
    repo-independent ones (cache_dir, token, local_files_only, force_download, proxies).

    A PowerPaint source is the release's `PowerPaint_Brushnet/` folder (or the folder above it, or
    IOPaint's copy, or the branch's `.safetensors` file), found as `load_brushnet` finds it; its
    branch text encoder is looked up beside it (`text_encoder_brushnet.safetensors`, the released
    `pytorch_model.bin`, or IOPaint's `text_encoder_brushnet/` + `tokenizer/`) unless
    `text_encoder_brushnet` names the file or folder. Its architecture is the base text encoder's.

    When the hub cannot be reached (no network, no proxy), hub ids load from the local cache only.
    """
    hub_kwargs = _local_only_if_unreachable(hub_kwargs, base, brushnet, base_config)
    base_info = check_model_pair(base, brushnet, allow_pickle=allow_pickle, **hub_kwargs)
    if is_powerpaint(brushnet):
        return _load_powerpaint_pipeline(base, brushnet, base_info, torch_dtype, allow_pickle, base_config,
                                         text_encoder_brushnet, hub_kwargs)

    brushnet_hub_kwargs = _brushnet_kwargs(brushnet, hub_kwargs)
    model = load_brushnet(brushnet, torch_dtype=torch_dtype, allow_pickle=allow_pickle, **brushnet_hub_kwargs)
    family = detect_brushnet_family(model.config)
    _check_families(family, base_info.family, brushnet, base)

    if model.has_attention:  # a pickle or hub PowerPaint, only recognisable once loaded
        return _load_powerpaint_pipeline(base, model, base_info, torch_dtype, allow_pickle, base_config,
                                         text_encoder_brushnet, hub_kwargs)
    pipeline_class = StableDiffusionXLBrushNetPipeline if family == SDXL else StableDiffusionBrushNetPipeline
    kwargs = dict(hub_kwargs, brushnet=model, **_dtype_kwargs(torch_dtype))
    return _load_base(pipeline_class, base, base_info, base_config, kwargs)


def _load_base(pipeline_class, base, base_info: _BaseInfo, base_config, kwargs: dict):
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


def _load_powerpaint_pipeline(base, brushnet, base_info: _BaseInfo, torch_dtype, allow_pickle, base_config,
                              text_encoder_brushnet, hub_kwargs: dict):
    # Every file is found and read before the base model, so a missing text encoder fails fast.
    source = _find_branch_text_encoder(brushnet, text_encoder_brushnet)
    state = _read_text_encoder_state(source.weights, allow_pickle) if source.weights is not None else None
    brushnet_hub_kwargs = _brushnet_kwargs(brushnet, hub_kwargs)
    model = load_brushnet(brushnet, torch_dtype=torch_dtype, allow_pickle=allow_pickle, **brushnet_hub_kwargs)

    kwargs = dict(hub_kwargs, brushnet=model, text_encoder_brushnet=None, **_dtype_kwargs(torch_dtype))
    if source.folder is not None:
        from transformers import CLIPTextModel, CLIPTokenizer

        try:
            kwargs["text_encoder_brushnet"] = _load_transformers_folder(CLIPTextModel, source.folder, torch_dtype)
            if source.tokenizer is not None:
                kwargs["tokenizer"] = CLIPTokenizer.from_pretrained(source.tokenizer)
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"Could not load the branch text encoder in {source.folder} ({_first_line(e)}).") \
                from e
    try:
        pipe = _load_base(StableDiffusionPowerPaintPipeline, base, base_info, base_config, kwargs)
        if state is not None:
            encoder = task_prompts.branch_text_encoder(pipe.text_encoder.config, state, torch_dtype)
            pipe.register_modules(text_encoder_brushnet=encoder.to(pipe.text_encoder.device))
    except ValueError as e:  # ModelLoadError included; the pipeline's own checks raise ValueError
        raise e if isinstance(e, ModelLoadError) else ModelLoadError(f"{source.weights or source.folder}: "
                                                                     f"{_first_line(e)}") from e
    if pipe.text_encoder_brushnet.config.vocab_size != len(pipe.tokenizer):
        raise ModelLoadError(
            f"The branch text encoder in {source.weights or source.folder} has "
            f"{pipe.text_encoder_brushnet.config.vocab_size} token embeddings, but the base tokenizer with "
            f"PowerPaint's task tokens has {len(pipe.tokenizer)}: use the text encoder of the same release."
        )
    return pipe


def _load_transformers_folder(model_class, folder: Path, torch_dtype):
    # IOPaint publishes fp16 weights only, as the "fp16" variant.
    variant = None if (folder / "model.safetensors").is_file() else "fp16"
    dtype = {} if torch_dtype is None else {"dtype": torch_dtype}
    return model_class.from_pretrained(folder, variant=variant, **dtype)


def _load_single_file_pipeline(pipeline_class, path: Path, base_info: _BaseInfo, base_config, kwargs: dict):
    if base_config is None and hub.hub_offline():
        raise ModelLoadError(
            f"Loading the single-file base {path} needs the diffusers configs of its model family, and the hub is "
            f"offline: pass base_config=<a local {FAMILY_NAMES[base_info.family]} diffusers folder>."
        )
    if base_config is None:
        # diffusers fetches the family's configs from the hub: from its cache alone when unreachable.
        kwargs = hub.local_only_if_unreachable(kwargs)
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
