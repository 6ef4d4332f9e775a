"""ImageReward v1.0 on transformers' `BlipVisionModel` + `BlipTextModel` (no image-reward, no timm, no torchvision).

ImageReward (Xu et al., "ImageReward: Learning and Evaluating Human Preferences for Text-to-Image
Generation", 2023) is BLIP with a small regression head, fine-tuned on human preferences. Its published
checkpoint, `ImageReward.pt` (the `THUDM/ImageReward` repository on the Hugging Face Hub, loaded by
`ImageReward.load("ImageReward-v1.0")`), is the state dict of the package's `ImageReward` module:
`blip.visual_encoder.*` (BLIP's `VisionTransformer`), `blip.text_encoder.*` (BLIP's `med.BertModel`,
built with `add_pooling_layer=False`), `blip.vision_proj.*` / `blip.text_proj.*` (the ITC projections of
BLIP's `BLIP_Pretrain`, unused by the score) and `mlp.layers.*` (the head). `imagereward_to_transformers`
renames it for `image_reward_configs()` and `ImageRewardScore` computes the score.

What is reproduced: `ImageReward.score(prompt, image)` (ImageReward/ImageReward.py, and
`inference_rank`, which computes the same per image):

- Model (`BLIP_Pretrain(image_size=224, vit='large', med_config=...)`):
  * image encoder: BLIP's `VisionTransformer` from `create_vit('large', 224)`: patch 16, width 1024,
    24 pre-norm blocks, 16 heads, packed q/k/v with bias, MLP 4096 with exact GELU (`nn.GELU`),
    LayerNorm eps 1e-6 everywhere (`partial(nn.LayerNorm, eps=1e-6)`), no LayerNorm before the
    blocks, the final `norm` over every token; `image_embeds` = all 197 normalised tokens (class
    token first). transformers' `BlipVisionModel` is the same computation (its `last_hidden_state`
    is `post_layernorm` over every token) once its `layer_norm_eps` is 1e-6 (the default is 1e-5).
  * text encoder: BLIP's `med.BertModel` with the `med_config.json` BERT-base settings: vocabulary
    30524 (bert-base-uncased + `[DEC]` + `[ENC]`), width 768, 12 post-norm layers, 12 heads, MLP 3072,
    exact GELU, LayerNorm eps 1e-12, 512 absolute positions, no token-type embedding, and in every
    layer a cross-attention whose key/value read the 1024-wide image tokens
    (`encoder_width = vision_width`). transformers' `BlipTextModel` (a port of med.py) with
    `is_decoder=True` in its config (this builds the cross-attention) run with `is_decoder=False`
    (bidirectional self-attention, as med.py's default `mode='multimodal'` encoder) and without the
    pooler is the same computation.
  * head (`MLP(768)`): Linear(768, 1024), Dropout(0.2), Linear(1024, 128), Dropout(0.2),
    Linear(128, 64), Dropout(0.1), Linear(64, 16), Linear(16, 1) - no activations (they are
    commented out in the original), so in evaluation it is one affine map.
- Score: `text_input = tokenizer(prompt, padding='max_length', truncation=True, max_length=35)`;
  `image_embeds = visual_encoder(image)`; `txt_features = text_encoder(input_ids, attention_mask,
  encoder_hidden_states=image_embeds, encoder_attention_mask=ones).last_hidden_state[:, 0]` (the
  first token's state); `reward = (mlp(txt_features) - 0.16717362830052426) / 1.0333394966054072`.
  `ImageReward.score` feeds the tokenizer's ids as they are: the first token is `[CLS]` (101), NOT
  `[ENC]` (BLIP's ITM code replaces it by `enc_token_id`; ImageReward's `score`, `inference_rank` and
  training code do not), so this port keeps `[CLS]` (`enc_token=False`; `True` puts `[ENC]` there, as
  BLIP's ITM head would, for experiments only).
- Tokeniser: BLIP's `init_tokenizer()`: `BertTokenizer.from_pretrained('bert-base-uncased')`, then
  `add_special_tokens({'bos_token': '[DEC]'})` and `add_special_tokens({'additional_special_tokens':
  ['[ENC]']})` (ids 30522 and 30523). `load_bert_tokenizer(folder)` does the same from a local
  bert-base-uncased folder (vocab.txt).
- Preprocessing (`_transform(224)`): torchvision `Resize(224, BICUBIC)` on the PIL image (shorter side
  to 224, longer side `int(224 * long / short)`, PIL's bicubic resize; nothing is done when the size
  is already right), `CenterCrop(224)` (offsets `int(round((side - 224) / 2))`), THEN conversion to RGB,
  `ToTensor` (/255), `Normalize` with OpenAI CLIP's mean and std. `image_reward_preprocess` makes the
  same PIL calls in the same order (so palette/RGBA images are resized in their own mode, as there).

Key mapping (ImageReward -> this port), `blip.visual_encoder.` -> `vision.`:
`patch_embed.proj` -> `embeddings.patch_embedding`, `cls_token` (1, 1, 1024) ->
`embeddings.class_embedding`, `pos_embed` (1, 197, 1024) -> `embeddings.position_embedding`,
`blocks.N.norm1`/`norm2` -> `encoder.layers.N.layer_norm1`/`layer_norm2`, `blocks.N.attn.qkv` ->
`encoder.layers.N.self_attn.qkv` (packed q, k, v in the same order and head layout: no split),
`blocks.N.attn.proj` -> `encoder.layers.N.self_attn.projection`, `blocks.N.mlp.fc1`/`fc2` ->
`encoder.layers.N.mlp.fc1`/`fc2`, `norm` -> `post_layernorm`. `blip.text_encoder.` -> `text.` with the
rest of the name unchanged (transformers' BlipText keeps med.py's names: `embeddings.word_embeddings`,
`embeddings.position_embeddings`, `embeddings.LayerNorm`, `encoder.layer.N.attention.self.query|key|
value`, `attention.output.dense|LayerNorm`, `crossattention.*` likewise, `intermediate.dense`,
`output.dense|LayerNorm`). `mlp.layers.{0,2,4,6,7}` -> `head.{0,2,4,6,7}` (same `nn.Sequential`
layout). Ignored if present: `blip.vision_proj.*`, `blip.text_proj.*` (unused by the score) and the
`position_ids` buffer that older transformers saved with med.py's embeddings. A `module.` prefix is
dropped. Every other key must map and every model tensor must be given, with its shape.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from torch import nn

from .clip import CLIP_MEAN, CLIP_STD
from .weights import assign_state_dict, pretrained_source, read_state_dict

CHECKPOINT_NAME = "ImageReward.pt"
REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
MAX_LENGTH = 35
IMAGE_SIZE = 224
IGNORED_PREFIXES = ("blip.vision_proj.", "blip.text_proj.")
IGNORED_KEYS = ("blip.text_encoder.embeddings.position_ids",)

_VISION_DIRECT = {
    "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
    "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
    "cls_token": "embeddings.class_embedding",
    "pos_embed": "embeddings.position_embedding",
    "norm.weight": "post_layernorm.weight",
    "norm.bias": "post_layernorm.bias",
}
_VISION_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_VISION_BLOCK_RENAMES = {
    "norm1.": "layer_norm1.",
    "norm2.": "layer_norm2.",
    "attn.qkv.": "self_attn.qkv.",
    "attn.proj.": "self_attn.projection.",
    "mlp.fc1.": "mlp.fc1.",
    "mlp.fc2.": "mlp.fc2.",
}
_HEAD = re.compile(r"^mlp\.layers\.(\d+)\.(weight|bias)$")


def image_reward_configs(vision: Mapping | None = None, text: Mapping | None = None):
    """(BlipVisionConfig, BlipTextConfig) of ImageReward v1.0 (BLIP ViT-L/16 at 224, BERT-base "med");
    `vision` / `text` override entries (the tests use tiny widths)."""
    from transformers import BlipTextConfig, BlipVisionConfig

    vision_kwargs = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                     "num_attention_heads": 16, "image_size": IMAGE_SIZE, "patch_size": 16, "hidden_act": "gelu",
                     "layer_norm_eps": 1e-6, "attention_dropout": 0.0} | dict(vision or {})
    text_kwargs = {"vocab_size": 30524, "hidden_size": 768, "encoder_hidden_size": vision_kwargs["hidden_size"],
                   "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                   "max_position_embeddings": 512, "hidden_act": "gelu", "layer_norm_eps": 1e-12,
                   "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "pad_token_id": 0,
                   "is_decoder": True, "use_cache": False} | dict(text or {})
    return BlipVisionConfig(**vision_kwargs), BlipTextConfig(**text_kwargs)


def _vision_key(rest: str) -> str | None:
    if rest in _VISION_DIRECT:
        return "vision." + _VISION_DIRECT[rest]
    if match := _VISION_BLOCK.match(rest):
        index, tail = match.groups()
        for old, new in _VISION_BLOCK_RENAMES.items():
            if tail.startswith(old) and tail[len(old):] in ("weight", "bias"):
                return f"vision.encoder.layers.{index}.{new}{tail[len(old):]}"
    return None


def imagereward_to_transformers(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ImageReward's state dict renamed for `ImageRewardModel` (see the module docstring). Keys that do not
    map are kept under their own name, so that strict loading names them. Works on meta tensors."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        if key in IGNORED_KEYS or key.startswith(IGNORED_PREFIXES):
            continue
        new_key = None
        if key.startswith("blip.visual_encoder."):
            new_key = _vision_key(key[len("blip.visual_encoder."):])
        elif key.startswith("blip.text_encoder."):
            rest = key[len("blip.text_encoder."):]
            new_key = None if rest.startswith("pooler.") else "text." + rest
        elif match := _HEAD.match(key):
            new_key = f"head.{match.group(1)}.{match.group(2)}"
        new_key = key if new_key is None else new_key  # unknown: left for the strict check to report
        if new_key in out:
            raise ValueError(f"Two tensors of the checkpoint map to {new_key}.")
        out[new_key] = value
    return out


def _head(width: int) -> nn.Sequential:
    """ImageReward's `MLP(width).layers` (no activations; Dropout is a no-op in evaluation)."""
    return nn.Sequential(nn.Linear(width, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                         nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))


class ImageRewardModel(nn.Module):
    """BLIP's image encoder and image-grounded text encoder with ImageReward's head; `forward` gives the
    normalised reward, shape (N,)."""

    def __init__(self, vision_config, text_config):
        super().__init__()
        from transformers import BlipTextModel, BlipVisionModel

        if text_config.encoder_hidden_size != vision_config.hidden_size:
            raise ValueError("The text encoder's cross-attention must read the image width "
                             f"({text_config.encoder_hidden_size} != {vision_config.hidden_size}).")
        if not text_config.is_decoder:
            raise ValueError("BlipTextConfig.is_decoder must be True: it builds the cross-attention layers.")
        self.vision = BlipVisionModel(vision_config)
        self.text = BlipTextModel(text_config, add_pooling_layer=False)
        self.head = _head(text_config.hidden_size)

    def image_embeds(self, pixels: torch.Tensor) -> torch.Tensor:
        """BLIP `visual_encoder(image)`: (N, 1 + patches, width), every token after the final LayerNorm."""
        return self.vision(pixel_values=pixels).last_hidden_state

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      image_embeds: torch.Tensor) -> torch.Tensor:
        """`text_encoder(ids, mask, encoder_hidden_states=image_embeds, encoder_attention_mask=ones)`, first token."""
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        output = self.text(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds,
                           encoder_attention_mask=image_atts, is_decoder=False, use_cache=False)
        return output.last_hidden_state[:, 0, :].float()

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        features = self.text_features(input_ids, attention_mask, self.image_embeds(pixels))
        reward = self.head(features.to(self.head[0].weight.dtype)).float().squeeze(-1)
        return (reward - REWARD_MEAN) / REWARD_STD  # float32, as the original


def build_image_reward_model(converted: Mapping[str, torch.Tensor], configs=None,
                             what: str = "the ImageReward checkpoint", dtype: torch.dtype = torch.float32):
    """An `ImageRewardModel` (default: `image_reward_configs()`) holding `converted`, checked strictly.

    Built on the meta device (no random initialisation); the non-persistent `position_ids` buffer of the
    text embeddings is rebuilt."""
    vision_config, text_config = image_reward_configs() if configs is None else configs
    with torch.device("meta"):
        model = ImageRewardModel(vision_config, text_config)
    return assign_state_dict(model, converted, what, dtype)


def load_bert_tokenizer(source):
    """BLIP's `init_tokenizer()` from a local bert-base-uncased folder (vocab.txt) or a hub id on a machine with
    the network: BertTokenizer plus `[DEC]` as bos_token and `[ENC]` as an additional special token.
    A tokenizer object is returned as is."""
    if not isinstance(source, (str, os.PathLike)):
        return source
    from transformers import BertTokenizer

    text = str(source)
    path = Path(text).expanduser()
    if not path.exists() and (text.startswith((".", "/", "~")) or text.count("/") > 1):
        raise ValueError(f"The BERT tokenizer folder {text} does not exist: pass a bert-base-uncased folder "
                         "(with vocab.txt).")
    try:
        where, hub_kwargs = pretrained_source(path, text)
        tokenizer = BertTokenizer.from_pretrained(where, **hub_kwargs)
    except Exception as error:  # noqa: BLE001 - not a tokenizer folder, offline without a cache
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"Could not load a BERT tokenizer from {text} ({first}).") from None
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    tokenizer.enc_token_id = tokenizer.convert_tokens_to_ids("[ENC]")
    return tokenizer


def image_reward_preprocess(image: PIL.Image.Image, size: int = IMAGE_SIZE) -> torch.Tensor:
    """(1, 3, size, size) float32 input of ImageReward's `_transform(size)` (see the module docstring)."""
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    new_size = (new_short, new_long) if width <= height else (new_long, new_short)
    if new_size != image.size:
        image = image.resize(new_size, PIL.Image.BICUBIC)
    width, height = image.size
    top, left = round((height - size) / 2.0), round((width - size) / 2.0)
    image = image.crop((left, top, left + size, top + size)).convert("RGB")
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255.0)
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return ((pixels - mean) / std)[None]


class ImageRewardScore:
    """ImageReward v1.0 (`ImageReward.score`): `scorer(images, captions)` gives a float32 tensor of one
    normalised reward per (image, caption) pair (about N(0, 1) over the authors' data). Higher is better."""

    def __init__(self, model: ImageRewardModel, tokenizer, device=None, enc_token: bool = False):
        self.model = model.eval().requires_grad_(False)
        if device is not None:
            self.model.to(device)
        self.tokenizer = tokenizer
        self.enc_token = enc_token
        vocab_size = int(model.text.config.vocab_size)
        if len(tokenizer) > vocab_size:
            raise ValueError(f"The tokenizer has {len(tokenizer)} tokens but the text model only {vocab_size} "
                             "embeddings: use bert-base-uncased's vocabulary (with [DEC] and [ENC] added).")
        if enc_token and getattr(tokenizer, "enc_token_id", None) is None:
            raise ValueError("enc_token=True needs a tokenizer with [ENC] (load_bert_tokenizer adds it).")

    @classmethod
    def from_file(cls, path: str | os.PathLike, tokenizer_dir, device=None, *, configs=None,
                  enc_token: bool = False) -> ImageRewardScore:
        """Load `ImageReward.pt` (a path or `hf://THUDM/ImageReward/ImageReward.pt`) strictly, with BLIP's tokenizer
        built from `tokenizer_dir` (a bert-base-uncased folder, or a tokenizer)."""
        what = f"the ImageReward checkpoint ({CHECKPOINT_NAME})"
        state_dict = read_state_dict(path, what)
        model = build_image_reward_model(imagereward_to_transformers(state_dict), configs, f"{what} {path}")
        return cls(model, load_bert_tokenizer(tokenizer_dir), device, enc_token)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def image_size(self) -> int:
        return int(self.model.vision.config.image_size)

    def preprocess(self, image: PIL.Image.Image) -> torch.Tensor:
        return image_reward_preprocess(image, self.image_size)

    def tokenize(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask), each (N, 35): `tokenizer(caption, padding='max_length', truncation=True,
        max_length=35)`, as ImageReward.score (first token [CLS] unless `enc_token`)."""
        encoded = self.tokenizer(list(captions), padding="max_length", truncation=True, max_length=MAX_LENGTH,
                                 return_tensors="pt")
        input_ids = encoded["input_ids"].clone()
        if self.enc_token:
            input_ids[:, 0] = self.tokenizer.enc_token_id
        return input_ids, encoded["attention_mask"]

    @torch.no_grad()
    def __call__(self, images: Sequence[PIL.Image.Image], captions: Sequence[str]) -> torch.Tensor:
        if isinstance(images, PIL.Image.Image) or isinstance(captions, str):
            raise TypeError("Pass a list of images and a list of captions (use .score for one pair).")
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} captions: give one caption per image.")
        if not images:
            return torch.zeros(0)
        pixels = torch.cat([self.preprocess(image) for image in images]).to(self.device)
        input_ids, attention_mask = self.tokenize(captions)
        dtype = next(self.model.parameters()).dtype
        rewards = self.model(pixels.to(dtype), input_ids.to(self.device), attention_mask.to(self.device))
        return rewards.float().cpu()

    def score(self, image: PIL.Image.Image, caption: str) -> float:
        return float(self([image], [caption])[0])


class ImageRewardMetric:
    """ImageReward v1.0 of the result image with its caption (a BrushBench metric). Higher is better."""

    def __init__(self, scorer: ImageRewardScore):
        self.scorer = scorer

    def __call__(self, sample) -> float:
        return self.scorer.score(sample.result, sample.caption)
