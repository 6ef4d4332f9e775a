"""HPS v2.1 (Human Preference Score v2.1) on a transformers `CLIPModel` (no open_clip, no torchvision).

HPS v2.1 is OpenCLIP's ViT-H-14 fine-tuned on human preferences (Wu et al., "Human Preference Score
v2", 2023). Its published checkpoint, `HPS_v2.1_compressed.pt` (the `xswu/HPSv2` repository on the
Hugging Face Hub), holds `{"state_dict": ...}` with the OpenCLIP `CLIP` state dict of ViT-H-14
(`visual.*`, `token_embedding.weight`, `positional_embedding`, `transformer.resblocks.N.*`,
`ln_final.*`, `text_projection`, `logit_scale`). `openclip_to_transformers` renames those tensors
for transformers' `CLIPModel` with `hps_v21_config()`, and `HPSv2Score` computes the score.

What is reproduced: `hpsv2.score(image, prompt, hps_version="v2.1")` (hpsv2's `img_score.score`),
which the BrushNet authors call once per result image (`calculate_hpsv21_score` in
examples/brushnet/evaluate_brushnet.py) and average; the paper's table shows that mean x 100.

- Model: hpsv2's `initialize_model` builds `create_model_and_transforms('ViT-H-14', ...,
  force_quick_gelu=False, light_augmentation=True, output_dict=True)` with its vendored open_clip
  (2.16) and loads the checkpoint's `state_dict` strictly. ViT-H-14: vision width 1280, 32 layers,
  head width 80 (16 heads), patch 14, image 224; text width 1024, 24 layers, 16 heads, context 77,
  vocabulary 49408; embedding 1024; exact GELU (`nn.GELU`), LayerNorm eps 1e-5, pre-norm blocks,
  class token pooled after `ln_post`, text pooled at the `<end_of_text>` token (open_clip takes
  `text.argmax(-1)`: the end token has the largest id, 49407) after `ln_final`.
- Score: `outputs = model(image, text)` gives L2-normalised `image_features` and `text_features`;
  `hps = diagonal(image_features @ text_features.T)`, i.e. the cosine of the two embeddings,
  in [-1, 1] (logit_scale is not used). hpsv2 runs this under `torch.cuda.amp.autocast()` (float16
  matrix products on a GPU); this port computes in float32.
- Preprocessing: `preprocess_val` of hpsv2's own `image_transform(224, is_train=False,
  resize_longest_max=True)` (chosen by `light_augmentation=True`), which differs from stock
  open_clip's: convert to RGB (`_convert_to_rgb_or_rgba`), `ToTensor()` (float in [0, 1]), then
  `ResizeMaxSize(224, fill=0)` ON THE TENSOR: scale = 224 / max(H, W); when scale != 1, resize to
  (round(H scale), round(W scale)) with torchvision's bicubic tensor resize and pad the short side
  with zeros (black), left/top getting pad // 2; then `Normalize` with OpenAI CLIP's mean and std.
  The tensor resize is `interpolate(mode="bicubic", align_corners=False, antialias=...)` without
  clamping; its `antialias` default is True from torchvision 0.17 on and False before (see
  `antialias` below). A square image such as BrushBench's 512x512 is simply resized to 224x224.
  Where hpsv2 would fail (an RGBA image keeps 4 channels; an image whose longest side is already
  224 is not padded to a square) this port converts to RGB and pads.
- Tokenisation: open_clip's `SimpleTokenizer` (`get_tokenizer('ViT-H-14')`): text cleaned with
  `ftfy.fix_text` (when ftfy is installed: without it, ASCII captions tokenise the same, but curly
  quotes, ligatures, full-width characters and mojibake do not), HTML-unescaped twice, whitespace collapsed, stripped and
  lower-cased, byte-level BPE with the CLIP vocabulary, `[<start_of_text>] + tokens +
  [<end_of_text>]`, cut to 77 with the last kept token replaced by `<end_of_text>`, padded with 0.
  The BPE is transformers' `CLIPTokenizer` built from a folder holding CLIP's `vocab.json` and
  `merges.txt` (any `openai/clip-vit-*` folder: the same vocabulary as open_clip's
  `bpe_simple_vocab_16e6.txt.gz`), so HPS shares the `--clip-model` folder's tokenizer.
  The text model sees only the causal mask, as in open_clip; the padding after the end token
  cannot reach it.

Key mapping (OpenCLIP -> transformers), per transformer block `resblocks.N` -> `encoder.layers.N`:
`attn.in_proj_weight`/`in_proj_bias` (3 width rows, q, k, v in that order) -> `self_attn.q_proj`,
`k_proj`, `v_proj`; `attn.out_proj` -> `self_attn.out_proj`; `ln_1`/`ln_2` -> `layer_norm1`/
`layer_norm2`; `mlp.c_fc`/`mlp.c_proj` -> `mlp.fc1`/`mlp.fc2`. Vision: `visual.conv1.weight` ->
`vision_model.embeddings.patch_embedding.weight`, `visual.class_embedding` ->
`vision_model.embeddings.class_embedding`, `visual.positional_embedding` ->
`vision_model.embeddings.position_embedding.weight`, `visual.ln_pre` -> `vision_model.pre_layrnorm`
(transformers' spelling), `visual.ln_post` -> `vision_model.post_layernorm`, `visual.proj`
(width x dim, used as `x @ proj`) -> `visual_projection.weight` = proj.T. Text: `token_embedding` ->
`text_model.embeddings.token_embedding`, `positional_embedding` ->
`text_model.embeddings.position_embedding.weight`, `ln_final` -> `text_model.final_layer_norm`,
`text_projection` (width x dim) -> `text_projection.weight` = text_projection.T; `logit_scale` ->
`logit_scale`. A `module.` prefix (a DistributedDataParallel save) is dropped, and open_clip's
causal-mask buffer `attn_mask` is ignored if present (it is rebuilt, not learnt). transformers'
`position_ids` buffers are not in its state dict and are rebuilt. Every other key must map, and
every model tensor must be given, with its shape.
"""

from __future__ import annotations

import html
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from .clip import CLIP_MEAN, CLIP_STD, _pooled
from .weights import assign_state_dict, check_tokenizer_folder, pretrained_source, read_state_dict

CONTEXT_LENGTH = 77
IGNORED_KEYS = ("attn_mask",)
CHECKPOINT_NAME = "HPS_v2.1_compressed.pt"

_BLOCK_RENAMES = {
    "ln_1.": "layer_norm1.",
    "ln_2.": "layer_norm2.",
    "mlp.c_fc.": "mlp.fc1.",
    "mlp.c_proj.": "mlp.fc2.",
    "attn.out_proj.": "self_attn.out_proj.",
}
_BLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")


def hps_v21_config():
    """transformers `CLIPConfig` of OpenCLIP's ViT-H-14, the architecture of HPS v2.1."""
    from transformers import CLIPConfig

    text = {"vocab_size": 49408, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
            "num_attention_heads": 16, "max_position_embeddings": CONTEXT_LENGTH, "hidden_act": "gelu",
            "layer_norm_eps": 1e-5, "projection_dim": 1024, "bos_token_id": 49406, "eos_token_id": 49407,
            "pad_token_id": 0}
    vision = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 16,
              "image_size": 224, "patch_size": 14, "num_channels": 3, "hidden_act": "gelu", "layer_norm_eps": 1e-5,
              "projection_dim": 1024}
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=1024)


def _block_key(tower: str, index: str, rest: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    prefix = f"{tower}.encoder.layers.{index}."
    if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
        kind = rest.rsplit("_", 1)[1]
        if value.shape[0] % 3:
            raise ValueError(f"{rest} of block {index} has {value.shape[0]} rows, not 3 x width.")
        q, k, v = value.chunk(3, dim=0)
        return {f"{prefix}self_attn.{name}_proj.{kind}": part.contiguous() for name, part in zip("qkv", (q, k, v))}
    for old, new in _BLOCK_RENAMES.items():
        if rest.startswith(old):
            return {prefix + new + rest[len(old):]: value}
    return {}


_DIRECT = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}
_TRANSPOSED = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}


def openclip_to_transformers(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An OpenCLIP ViT `CLIP` state dict renamed (and q/k/v split, projections transposed) for transformers'
    `CLIPModel`; see the module docstring for the mapping. Keys that do not map are kept under their own
    name, so that strict loading names them; `attn_mask` buffers are dropped. Works on meta tensors."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        if key.rsplit(".", 1)[-1] in IGNORED_KEYS:
            continue
        converted: dict[str, torch.Tensor] = {}
        if key in _DIRECT:
            converted = {_DIRECT[key]: value}
        elif key in _TRANSPOSED:
            if value.ndim != 2:
                raise ValueError(f"{key} must be a (width, embedding) matrix; got shape {tuple(value.shape)}.")
            converted = {_TRANSPOSED[key]: value.t().contiguous()}
        elif match := _BLOCK.match(key):
            tower = "vision_model" if match.group(1) else "text_model"
            converted = _block_key(tower, match.group(2), match.group(3), value)
        if not converted:
            converted = {key: value}  # unknown: left for the strict check to report
        for new_key, tensor in converted.items():
            if new_key in out:
                raise ValueError(f"Two tensors of the checkpoint map to {new_key}.")
            out[new_key] = tensor
    return out


def build_clip_model(converted: Mapping[str, torch.Tensor], config=None, what: str = "the HPS v2.1 checkpoint",
                     dtype: torch.dtype = torch.float32):
    """A `CLIPModel` (default: `hps_v21_config()`) holding `converted` (transformers keys), checked strictly.

    The model is built on the meta device and takes the given tensors (cast to `dtype`), so no time is
    spent on a random initialisation; the non-persistent `position_ids` buffers are rebuilt."""
    from transformers import CLIPModel

    config = hps_v21_config() if config is None else config
    with torch.device("meta"):
        model = CLIPModel(config)
    return assign_state_dict(model, converted, what, dtype)


def load_clip_tokenizer(source):
    """transformers' `CLIPTokenizer` from a folder with CLIP's `vocab.json` and `merges.txt` (e.g. the
    `--clip-model` folder), or a hub id on a machine with the network; a tokenizer object is returned as is."""
    if not isinstance(source, (str, os.PathLike)):
        return source
    from transformers import CLIPTokenizer

    text = str(source)
    path = Path(text).expanduser()
    if not path.exists() and (text.startswith((".", "/", "~")) or text.count("/") != 1):
        raise ValueError(f"The CLIP tokenizer folder {text} does not exist: pass a folder with CLIP's vocab.json "
                         "and merges.txt (such as an openai/clip-vit-large-patch14 folder).")
    where, hub_kwargs = pretrained_source(path, text)
    check_tokenizer_folder(path, text)
    try:
        return CLIPTokenizer.from_pretrained(where, **hub_kwargs)
    except Exception as error:  # not a tokenizer folder, offline without a cache
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"Could not load a CLIP tokenizer from {text} ({first}).") from None


_WHITESPACE = re.compile(r"\s+")


_warned_ftfy = False


def clean_caption(text: str) -> str:
    """open_clip's text cleaning: ftfy.fix_text (if installed), HTML unescaped twice, whitespace collapsed,
    stripped, lower-cased."""
    global _warned_ftfy
    try:
        import ftfy
    except ImportError:
        # ASCII text is cleaned the same without ftfy; it also uncurls quotes, splits ligatures, narrows
        # full-width characters and repairs mojibake, which then tokenise differently.
        ftfy = None
        if not text.isascii() and not _warned_ftfy:
            _warned_ftfy = True
            warnings.warn("ftfy is not installed: non-ASCII captions may be tokenised differently from open_clip "
                          "(pip install ftfy for HPS exactly as hpsv2 computes it).", stacklevel=3)
    if ftfy is not None:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE.sub(" ", text).strip().lower()


def hps_preprocess(image: PIL.Image.Image, size: int = 224, antialias: bool = True) -> torch.Tensor:
    """(1, 3, size, size) float32 input of hpsv2's evaluation transform (see the module docstring):
    [0, 1] tensor, longest side to `size` by a bicubic tensor resize, zero padding to a square, CLIP's
    mean and std. `antialias` as torchvision's tensor resize (True from torchvision 0.17 on)."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    pixels = torch.from_numpy(array).permute(2, 0, 1).float().div(255.0)
    height, width = pixels.shape[1:]
    scale = size / float(max(height, width))
    if scale != 1.0:
        new_size = (round(height * scale), round(width * scale))
        pixels = F.interpolate(pixels[None], size=new_size, mode="bicubic", align_corners=False,
                               antialias=antialias)[0]
    pad_h, pad_w = size - pixels.shape[1], size - pixels.shape[2]
    if pad_h or pad_w:
        pixels = F.pad(pixels, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return ((pixels - mean) / std)[None]


class HPSv2Score:
    """HPS v2.1: the cosine of ViT-H-14's image and caption embeddings (hpsv2's `img_score.score`).

    `scorer(images, captions)` gives a float32 tensor of one score per (image, caption) pair, in
    [-1, 1]; the paper reports the mean x 100. Higher is better."""

    def __init__(self, model, tokenizer, device=None, antialias: bool = True):
        self.model = model.eval().requires_grad_(False)
        if device is not None:
            self.model.to(device)
        self.tokenizer = tokenizer
        self.antialias = antialias
        vocab = tokenizer.get_vocab()
        self.sot, self.eot = tokenizer.bos_token_id, tokenizer.eos_token_id
        if self.sot is None or self.eot is None or self.eot != max(vocab.values()):
            raise ValueError("The tokenizer is not CLIP's: its end-of-text token must have the largest id "
                             "(open_clip pools the text at the argmax of the token ids).")
        text_config = model.config.text_config
        if max(vocab.values()) >= text_config.vocab_size:
            raise ValueError(f"The tokenizer has ids up to {max(vocab.values())} but the text model only "
                             f"{text_config.vocab_size} embeddings: use the CLIP BPE vocabulary.")
        # transformers pools at the first position of eos_token_id (or at the argmax of the ids when it is
        # the legacy 2): both are open_clip's argmax when the end token has the largest id.
        pooled_at = model.text_model.eos_token_id
        if pooled_at not in (2, self.eot):
            raise ValueError(f"The text model pools at token {pooled_at}, the tokenizer ends with {self.eot}.")
        self.context_length = int(text_config.max_position_embeddings)

    @classmethod
    def from_file(cls, path: str | os.PathLike, tokenizer_dir, device=None, *, config=None,
                  antialias: bool = True) -> HPSv2Score:
        """Load `HPS_v2.1_compressed.pt` (a path or `hf://xswu/HPSv2/HPS_v2.1_compressed.pt`) strictly, with
        the CLIP tokenizer of `tokenizer_dir` (a folder with vocab.json and merges.txt, or a tokenizer)."""
        what = f"the HPS v2.1 checkpoint ({CHECKPOINT_NAME})"
        state_dict = read_state_dict(path, what)
        model = build_clip_model(openclip_to_transformers(state_dict), config, f"{what} {path}")
        return cls(model, load_clip_tokenizer(tokenizer_dir), device, antialias)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def image_size(self) -> int:
        return int(self.model.config.vision_config.image_size)

    def preprocess(self, image: PIL.Image.Image) -> torch.Tensor:
        return hps_preprocess(image, self.image_size, self.antialias)

    def tokenize(self, captions: Sequence[str]) -> torch.Tensor:
        """(N, context length) token ids as open_clip's tokenizer gives them (see the module docstring)."""
        rows = []
        for caption in captions:
            # split_special_tokens: "<|endoftext|>" written in a caption is text to open_clip, not the end token.
            ids = self.tokenizer(clean_caption(caption), add_special_tokens=False, split_special_tokens=True,
                                 verbose=False)["input_ids"]
            tokens = [self.sot, *ids, self.eot]
            if len(tokens) > self.context_length:
                tokens = tokens[:self.context_length]
                tokens[-1] = self.eot
            rows.append(tokens + [0] * (self.context_length - len(tokens)))
        return torch.tensor(rows, dtype=torch.long)

    @torch.no_grad()
    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings of preprocessed (N, 3, S, S) pixels."""
        features = _pooled(self.model.get_image_features(pixel_values=pixels.to(self.device))).float()
        return F.normalize(features, dim=-1)

    @torch.no_grad()
    def text_features(self, input_ids: torch.Tensor) -> torch.Tensor:
        """L2-normalised text embeddings of (N, L) token ids (causal mask only, as open_clip)."""
        features = _pooled(self.model.get_text_features(input_ids=input_ids.to(self.device))).float()
        return F.normalize(features, dim=-1)

    @torch.no_grad()
    def __call__(self, images: Sequence[PIL.Image.Image], captions: Sequence[str]) -> torch.Tensor:
        if isinstance(images, PIL.Image.Image) or isinstance(captions, str):
            raise TypeError("Pass a list of images and a list of captions (use .score for one pair).")
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} captions: give one caption per image.")
        if not images:
            return torch.zeros(0)
        pixels = torch.cat([self.preprocess(image) for image in images])
        image_features = self.image_features(pixels)
        text_features = self.text_features(self.tokenize(captions))
        return (image_features * text_features).sum(-1).cpu()

    def score(self, image: PIL.Image.Image, caption: str) -> float:
        return float(self([image], [caption])[0])


class HPSMetric:
    """HPS v2.1 of the result image with its caption (a BrushBench metric). Higher is better."""

    def __init__(self, scorer: HPSv2Score):
        self.scorer = scorer

    def __call__(self, sample) -> float:
        return self.scorer.score(sample.result, sample.caption)
