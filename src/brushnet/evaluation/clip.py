"""CLIP similarity and LAION's aesthetic score, on a transformers `CLIPModel` (no torchvision, no open_clip).

Both use CLIP ViT-L/14: the `openai/clip-vit-large-patch14` layout of transformers (a folder with
`config.json`, the weights and the tokenizer files, or that hub id on a machine with the network).

- **CLIP similarity** reproduces torchmetrics' `CLIPScore(model_name_or_path=
  "openai/clip-vit-large-patch14")` as the authors call it on one image and its caption:
  `max(100 * cos(E_image, E_caption), 0)`. The caption is tokenised without truncation and then
  cut to the text model's 77 positions, as torchmetrics does.
- **Aesthetic score** reproduces LAION's aesthetic predictor as the authors use it: the
  `sa_0_4_vit_l_14_linear.pth` head (a single `nn.Linear(768, 1)`: keys `weight` (1, 768) and
  `bias` (1,), from https://github.com/LAION-AI/aesthetic-predictor) applied to the L2-normalised
  CLIP ViT-L/14 image embedding. The authors compute that embedding with open_clip's
  `ViT-L-14/openai`, whose weights are the ones of `openai/clip-vit-large-patch14`.

Preprocessing is CLIP's, written with PIL and torch: the shorter side resized to the model's
image size (224) with PIL's bicubic filter, a centre crop, values / 255, then CLIP's mean and std.
transformers' processor (CLIPScore) places the crop at `margin // 2`, torchvision's `CenterCrop`
(open_clip, aesthetic score) at `round(margin / 2)` (Python's rounding, half to even); both are
reproduced (`crop="floor"|"round"`). For square images such as BrushBench's 512x512 they coincide.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from torch import nn

from .weights import check_tokenizer_folder, load_strict, pretrained_source, read_state_dict

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_preprocess(image: PIL.Image.Image, size: int, crop: str = "floor") -> torch.Tensor:
    """(1, 3, size, size) float32 CLIP input of an image: shorter side to `size` (bicubic), centre crop,
    [0, 1], normalised with CLIP's mean and std. `crop="floor"` places the crop as transformers'
    CLIPImageProcessor does, `"round"` as torchvision's CenterCrop."""
    if crop not in ("floor", "round"):
        raise ValueError(f"crop must be 'floor' or 'round'; got {crop!r}.")
    # transformers' CLIPImageProcessor ("floor") converts to RGB first; open_clip's torchvision
    # transform ("round") converts after the crop, so PIL resizes RGBA/LA with premultiplied alpha
    # and palette images by nearest neighbour there (verified in tools/verify_scorers.py).
    if crop == "floor":
        image = image.convert("RGB")
    width, height = image.size
    short, long = min(width, height), max(width, height)
    new_long = int(size * long / short)
    new_size = (size, new_long) if width <= height else (new_long, size)
    if new_size != image.size:
        image = image.resize(new_size, PIL.Image.BICUBIC)
    width, height = image.size
    if crop == "floor":
        top, left = (height - size) // 2, (width - size) // 2
    else:
        top, left = round((height - size) / 2.0), round((width - size) / 2.0)
    image = image.crop((left, top, left + size, top + size)).convert("RGB")
    array = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return ((array - mean) / std)[None]


def _pooled(output) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output is the projected embedding; older
    # versions return the tensor itself.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class CLIPEmbedder:
    """A CLIP model and its tokenizer, giving L2-normalised image and text embeddings."""

    def __init__(self, model, tokenizer, device=None):
        self.model = model.eval().requires_grad_(False)
        if device is not None:
            self.model.to(device)
        self.tokenizer = tokenizer

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike, device=None) -> CLIPEmbedder:
        """Load a `CLIPModel` and its tokenizer from a local folder, or a hub id (network needed)."""
        # The fast tokenizer, as torchmetrics' CLIPProcessor: transformers 4's slow CLIPTokenizer
        # runs ftfy when installed and then tokenises curly quotes differently (verify_scorers.py).
        from transformers import CLIPModel, CLIPTokenizerFast

        text = str(source)
        path = Path(text).expanduser()
        if not path.exists() and (text.startswith((".", "/", "~")) or text.count("/") != 1):
            raise ValueError(f"The CLIP model {text} does not exist: pass a folder in the "
                             "openai/clip-vit-large-patch14 layout (config.json, weights, tokenizer files).")
        where, hub_kwargs = pretrained_source(path, text)
        check_tokenizer_folder(path, text)
        try:
            model = CLIPModel.from_pretrained(where, **hub_kwargs).float()
            tokenizer = CLIPTokenizerFast.from_pretrained(where, **hub_kwargs)
        except Exception as error:  # not a CLIP folder, offline without a cache, a broken file
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ValueError(f"Could not load a CLIP model from {text} ({first}): pass a folder in the "
                             "openai/clip-vit-large-patch14 layout.") from None
        return cls(model, tokenizer, device)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def image_size(self) -> int:
        return int(self.model.config.vision_config.image_size)

    @property
    def embedding_dim(self) -> int:
        return int(self.model.config.projection_dim)

    @torch.no_grad()
    def image_embedding(self, image: PIL.Image.Image, crop: str = "floor") -> torch.Tensor:
        pixels = clip_preprocess(image, self.image_size, crop).to(self.device)
        features = _pooled(self.model.get_image_features(pixel_values=pixels)).float()
        return features / features.norm(p=2, dim=-1, keepdim=True)

    @torch.no_grad()
    def text_embedding(self, text: str) -> torch.Tensor:
        tokens = self.tokenizer([text], padding=True, return_tensors="pt")
        limit = int(self.model.config.text_config.max_position_embeddings)
        input_ids = tokens["input_ids"][..., :limit].to(self.device)
        attention_mask = tokens["attention_mask"][..., :limit].to(self.device)
        features = _pooled(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)).float()
        return features / features.norm(p=2, dim=-1, keepdim=True)


class CLIPSimilarity:
    """torchmetrics' CLIPScore of one image and caption: max(100 * cos(image, caption), 0). Higher is better."""

    def __init__(self, embedder: CLIPEmbedder):
        self.embedder = embedder

    def similarity(self, image: PIL.Image.Image, caption: str) -> float:
        """100 * cos(image, caption), before the clamp at 0."""
        cosine = (self.embedder.image_embedding(image, crop="floor") * self.embedder.text_embedding(caption)).sum()
        return 100.0 * float(cosine)

    def score(self, image: PIL.Image.Image, caption: str) -> float:
        return max(self.similarity(image, caption), 0.0)

    def __call__(self, sample) -> float:
        return self.score(sample.result, sample.caption)


class AestheticHead(nn.Linear):
    """LAION's linear aesthetic predictor: `nn.Linear(dim, 1)` (768 for ViT-L/14), keys `weight`, `bias`."""

    def __init__(self, dim: int = 768):
        super().__init__(dim, 1)

    @classmethod
    def from_file(cls, path: str | os.PathLike, dim: int = 768) -> AestheticHead:
        head = cls(dim)
        load_strict(head, read_state_dict(path, "the aesthetic head file (sa_0_4_vit_l_14_linear.pth)"),
                    f"the aesthetic head state dict (nn.Linear({dim}, 1): weight, bias)")
        return head.eval().requires_grad_(False)


class AestheticScore:
    """LAION aesthetic score of an image: the linear head on its normalised CLIP embedding. Higher is better."""

    def __init__(self, embedder: CLIPEmbedder, head: AestheticHead):
        if head.in_features != embedder.embedding_dim:
            raise ValueError(f"The aesthetic head takes {head.in_features}-d embeddings but the CLIP model "
                             f"gives {embedder.embedding_dim}-d ones: use CLIP ViT-L/14 with sa_0_4_vit_l_14_linear.pth.")
        self.embedder = embedder
        self.head = head.to(embedder.device)

    @torch.no_grad()
    def score(self, image: PIL.Image.Image) -> float:
        return float(self.head(self.embedder.image_embedding(image, crop="round"))[0, 0])

    def __call__(self, sample) -> float:
        return self.score(sample.result)

