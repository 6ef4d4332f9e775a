"""Test helper: write a diffusers SD1.5 pipeline (UNet, VAE, CLIP text encoder) as one original-layout checkpoint.

The original Stable Diffusion code (LDM) stores the whole model in one file:

- `model.diffusion_model.*`: the UNet as `input_blocks` / `middle_block` / `output_blocks`. Input
  block 0 is `conv_in`; block `1 + i*(L+1) + j` is resnet j (+ attention j) of down block i, and
  block `(i+1)*(L+1)` is down block i's downsampler (`.0.op`). Output block `i*(L+1) + j` is resnet
  j (+ attention j) of up block i; the upsampler sits in the last one of the block, at `.1.conv`
  without attention and `.2.conv` with it. Resnets name their layers `in_layers.0/2`,
  `emb_layers.1`, `out_layers.0/3`, `skip_connection`.
- `first_stage_model.*`: the VAE. Encoder levels are `encoder.down.i.block.j` /
  `encoder.down.i.downsample.conv`; decoder levels are numbered from the lowest resolution up, so
  diffusers' `decoder.up_blocks.i` is `decoder.up.{n-1-i}`. The mid block is `mid.block_1`,
  `mid.attn_1`, `mid.block_2`; its attention uses 1x1 convs `q`, `k`, `v`, `proj_out` and `norm`.
- `cond_stage_model.transformer.text_model.*`: the Hugging Face CLIP text model as it is.

The mapping is written from this description, so loading the file back through diffusers'
single-file converter checks both directions.
"""

import re
from pathlib import Path

import torch
from safetensors.torch import save_file

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."

_UNET_TOP_LEVEL = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_TOP_LEVEL = {"encoder.conv_norm_out": "encoder.norm_out", "decoder.conv_norm_out": "decoder.norm_out"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _split(key: str) -> tuple[str, str]:
    module, _, param = key.rpartition(".")
    return module, param


def _unet_resnet(rest: str) -> str:
    layer, _, tail = rest.partition(".")
    return f"{_UNET_RESNET[layer]}.{tail}"


def unet_to_ldm(state_dict: dict, layers_per_block: int) -> dict:
    """A diffusers `UNet2DConditionModel` state dict in the LDM key layout (without the prefix)."""
    step = layers_per_block + 1
    # The upsampler follows the attention in blocks that have one: slot 2 instead of 1.
    up_blocks_with_attention = {
        int(m.group(1)) for key in state_dict if (m := re.match(r"up_blocks\.(\d+)\.attentions", key))
    }
    out = {}
    for key, value in state_dict.items():
        module, param = _split(key)
        if module in _UNET_TOP_LEVEL:
            out[f"{_UNET_TOP_LEVEL[module]}.{param}"] = value
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            i, kind, j, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
            index = 1 + i * step + j
            out[f"input_blocks.{index}.0.{_unet_resnet(rest)}" if kind == "resnets"
                else f"input_blocks.{index}.1.{rest}"] = value
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)", key):
            out[f"input_blocks.{(int(m.group(1)) + 1) * step}.0.op.{m.group(2)}"] = value
        elif m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
            out[f"middle_block.{2 * int(m.group(1))}.{_unet_resnet(m.group(2))}"] = value
        elif m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
            out[f"middle_block.1.{m.group(1)}"] = value
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            i, kind, j, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
            index = i * step + j
            out[f"output_blocks.{index}.0.{_unet_resnet(rest)}" if kind == "resnets"
                else f"output_blocks.{index}.1.{rest}"] = value
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)", key):
            i = int(m.group(1))
            slot = 2 if i in up_blocks_with_attention else 1
            out[f"output_blocks.{i * step + layers_per_block}.{slot}.conv.{m.group(2)}"] = value
        else:
            raise KeyError(f"No LDM name for UNet key {key}")
    return out


def vae_to_ldm(state_dict: dict, num_blocks: int) -> dict:
    """A diffusers `AutoencoderKL` state dict in the LDM key layout (without the prefix)."""
    out = {}
    for key, value in state_dict.items():
        module, param = _split(key)
        if module in _VAE_TOP_LEVEL:
            out[f"{_VAE_TOP_LEVEL[module]}.{param}"] = value
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            rest = m.group(3).replace("conv_shortcut", "nin_shortcut")
            out[f"encoder.down.{m.group(1)}.block.{m.group(2)}.{rest}"] = value
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)", key):
            out[f"encoder.down.{m.group(1)}.downsample.conv.{m.group(2)}"] = value
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
            rest = m.group(3).replace("conv_shortcut", "nin_shortcut")
            out[f"{m.group(1)}.mid.block_{int(m.group(2)) + 1}.{rest}"] = value
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key):
            name = _VAE_ATTENTION[m.group(2)]
            if name != "norm" and value.ndim == 2:  # linear -> 1x1 conv
                value = value[:, :, None, None]
            out[f"{m.group(1)}.mid.attn_1.{name}.{m.group(3)}"] = value
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            level = num_blocks - 1 - int(m.group(1))
            rest = m.group(3).replace("conv_shortcut", "nin_shortcut")
            out[f"decoder.up.{level}.block.{m.group(2)}.{rest}"] = value
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)", key):
            level = num_blocks - 1 - int(m.group(1))
            out[f"decoder.up.{level}.upsample.conv.{m.group(2)}"] = value
        elif re.fullmatch(r"(encoder|decoder)\.conv_(in|out)\.\w+|(post_)?quant_conv\.\w+", key):
            out[key] = value
        else:
            raise KeyError(f"No LDM name for VAE key {key}")
    return out


def clip_to_ldm(state_dict: dict) -> dict:
    """A CLIP text model state dict under `text_model.` (transformers >= 5.6 drops that level)."""
    return {key.removeprefix("text_model."): value for key, value in state_dict.items()}


def sd15_ldm_state_dict(unet, vae, text_encoder) -> dict:
    """The whole single-file checkpoint of an SD1.5-shaped pipeline's models."""
    checkpoint = {}
    for key, value in unet_to_ldm(unet.state_dict(), unet.config.layers_per_block).items():
        checkpoint[UNET_PREFIX + key] = value
    for key, value in vae_to_ldm(vae.state_dict(), len(vae.config.block_out_channels)).items():
        checkpoint[VAE_PREFIX + key] = value
    for key, value in clip_to_ldm(text_encoder.state_dict()).items():
        checkpoint[CLIP_PREFIX + key] = value
    return checkpoint


def write_sd15_single_file(folder, path, dtype: torch.dtype | None = None) -> Path:
    """Convert the diffusers SD1.5 pipeline in `folder` into one LDM-layout `.safetensors` file at `path`."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    folder = Path(folder)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    vae = AutoencoderKL.from_pretrained(folder / "vae")
    text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder")
    checkpoint = sd15_ldm_state_dict(unet, vae, text_encoder)
    if dtype is not None:
        checkpoint = {key: value.to(dtype) for key, value in checkpoint.items()}
    # safetensors refuses shared or non-contiguous storage.
    checkpoint = {key: value.detach().contiguous().clone() for key, value in checkpoint.items()}
    save_file(checkpoint, str(path))
    return Path(path)
