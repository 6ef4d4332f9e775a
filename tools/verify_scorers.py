"""Compare brushnet's ImageReward v1.0, LAION aesthetic-score, LPIPS and CLIP-similarity ports with the ORIGINAL
code, on random weights.

Run once, by hand, outside CI (no GPU needed; float32 on the CPU). The originals are the packages the
BrushNet authors call in examples/brushnet/evaluate_brushnet.py:

- ImageReward: `ImageReward.load(...)` of the `image-reward` package (BLIP + MLP head), called as
  `model.score(prompt, [image])` (a list: `inference_rank`) and `model.score(prompt, image)`.
- Aesthetic score: `open_clip.create_model_and_transforms('ViT-L-14', pretrained='openai')` (its
  `preprocess` and `encode_image`), the embedding divided by its norm, then `torch.nn.Linear(768, 1)`
  loaded from `sa_0_4_vit_l_14_linear.pth`.
- LPIPS: torchmetrics' `LearnedPerceptualImagePatchSimilarity(net_type='squeeze')` called as
  `MetricsCalculator.calculate_lpips(src, tgt, mask)` does (both images /255 times the keep mask, then
  `metric(pred * 2 - 1, gt * 2 - 1)`); also the `lpips` package's `LPIPS(net='squeeze', version='0.1')`.
- CLIP similarity: torchmetrics' `CLIPScore(model_name_or_path="openai/clip-vit-large-patch14")` called as
  `calculate_clip_similarity(img, txt)` does (`torch.tensor(np.array(img)).permute(2, 0, 1)`, one caption).

Isolated environment (outside the repo; the repo's .venv is not touched). These commands worked with
Python 3.11 (torch's PyPI wheel is the CUDA build: ~6 GB with its nvidia-* dependencies, runs on CPU;
a torch 2.13.0+cpu wheel does not work here because PyPI's torchvision wheel needs torch's CUDA
libraries: "RuntimeError: operator torchvision::nms does not exist"):

    python3 -m venv /tmp/verify-venv
    /tmp/verify-venv/bin/pip install torch==2.14.1 torchvision==0.29.1
    /tmp/verify-venv/bin/pip install setuptools wheel numpy pillow
    /tmp/verify-venv/bin/pip install --no-build-isolation fairscale==0.4.13   # an sdist that imports torch
    /tmp/verify-venv/bin/pip install transformers==4.36.2 timm==0.6.13 open_clip_torch==2.24.0 image-reward==1.5
    /tmp/verify-venv/bin/pip install openai-clip "setuptools<81"             # ImageReward imports `clip`, which needs pkg_resources
    /tmp/verify-venv/bin/pip install diffusers==0.27.2 "huggingface_hub<0.26" # ImageReward's ReFL imports diffusers
    /tmp/verify-venv/bin/pip install torchmetrics==1.9.0 lpips==0.1.4          # LPIPS and CLIPScore (scipy comes along)

(image-reward 1.5 pins timm==0.6.13, which open_clip 3.x refuses, hence open_clip 2.24.0; its BLIP
code imports `apply_chunking_to_forward` & co. from `transformers.modeling_utils`, hence transformers 4.x.
torchmetrics is unpinned in BrushNet's examples/brushnet/requirements.txt; since 1.2.0 its LPIPS normalises
features by sqrt(1e-8 + sum f^2), before by sqrt(sum f^2) + 1e-10 as the lpips package and the port do: the
check reports what that changes on its features ("normalisation_eps_placement_max_abs_diff").)

Run (from the repo root; --ours-python also runs our side in the repo's own environment, transformers 5):

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 PYTHONPATH=$PWD/src /tmp/verify-venv/bin/python tools/verify_scorers.py \\
        --ours-python .venv/bin/python --out /tmp/verify-out [--workdir /tmp/verify-work] \\
        [--scorers image_reward,aesthetic,lpips,clip]

(all four: about 4 minutes on one thread and 7.5 GB of memory; lpips and clip alone: about 30 s.)

Nothing is downloaded: the originals' hub files are written locally. What it does, with one seed:

1. Inputs: PIL images of odd sizes (RGB, one smaller than 224, RGBA with varying alpha, greyscale, a
   palette image, ...) saved as PNG so both sides read the same images; captions (long, accented,
   Chinese, upper case, a literal [SEP]).
2. ImageReward: a synthetic bert-base-uncased folder (vocab.txt with 30522 entries, [PAD]=0, [UNK]=100,
   [CLS]=101, [SEP]=102, [MASK]=103; BLIP adds [DEC]=30522, [ENC]=30523) and ImageReward's med_config.json
   (BERT-base, vocab 30524, add_cross_attention; BLIP sets encoder_width=1024). `ImageReward(med_config)`
   is built with random weights (seed), every constant-initialised tensor (LayerNorm, biases) perturbed and
   the head re-initialised with std 1/sqrt(fan_in) (the original's std 1/769 per layer gives rewards equal
   to -mean/std to 1e-9), saved as ImageReward.pt (the plain state dict, as published), and loaded back by
   the original `ImageReward.load(path, device="cpu", med_config=...)`; ours by `ImageRewardScore.from_file`.
3. Aesthetic: a random open_clip ViT-L-14 with QuickGELU, rounded to float16 and saved as an OpenAI-format
   state dict (what `load_openai_model` reads; OpenAI's ViT-L-14.pt holds float16 weights), loaded by the
   original through `create_model_and_transforms('ViT-L-14', pretrained='openai')` with only the download
   replaced by that file. Ours reads a transformers folder in the openai/clip-vit-large-patch14 layout
   (config.json as on the hub, model.safetensors converted with brushnet's `openclip_to_transformers`,
   CLIPTokenizer files from open_clip's BPE tables) through `CLIPEmbedder.from_pretrained` (not strict by
   itself: the loaded state dict is compared with the file here), and a random `nn.Linear(768, 1)` head
   (weights N(0, 0.5^2), bias 5.5, so scores spread like real ones) saved as sa_0_4_vit_l_14_linear.pth,
   loaded by `AestheticHead.from_file`.
4. LPIPS: a random torchvision `squeezenet1_1` (biases perturbed) saved as squeezenet1_1-b8a52dc0.pth
   and random non-negative heads (U(0, 0.5), about 10 % zeros; `lin0.model.1.weight` ... (1, C, 1, 1)) saved
   as squeeze.pth. The originals load them with only the loads replaced: torchvision's
   `load_state_dict_from_url` (the ImageNet download) returns the file, torchmetrics' `_NoTrainLpips` gets
   `model_path=squeeze.pth` instead of its packaged heads (the lpips package takes `model_path` itself);
   their state dicts are compared with the files. Ours: `LPIPSSqueeze.from_files(backbone, heads)` and, for
   the benchmark path, `build_scorers(["lpips"], ...)` (`MaskedLPIPS`). Compared on image pairs in [-1, 1]
   (64x64, 97x131, 512x512; a noisy copy and an unrelated picture; a batch of 3): the scaled inputs, the
   7 backbone activations, each layer's head average, per-image distances, the class's forward value; and
   end to end on masked samples (PNG original and result, a uint8 hole mask as rle2mask gives; rectangle,
   blob, an odd 131x97 one, no hole, all hole): the two masked tensors and the scores of the authors'
   `calculate_lpips` steps against our metric on the same PIL images and mask.
5. CLIP similarity: a small random `CLIPModel` (hidden 64, 2 layers, patch 14, image 224, projection 32,
   77 positions, quick_gelu, the hub's legacy eos_token_id=2) with a shared offset after both final
   LayerNorms so most cosines are positive, saved by `save_pretrained` with the hub's
   preprocessor_config.json and CLIPTokenizer files made from open_clip's BPE tables, in a folder whose
   name contains "openai" (torchmetrics only loads such a name or path). torchmetrics' `CLIPScore` loads it
   through `model_name_or_path`; the pixels, ids and features it hands to/gets from the model are recorded.
   Ours: `CLIPEmbedder.from_pretrained` + `CLIPSimilarity` and `build_scorers(["clip"], ...)`. Compared on
   every caption (each with one of the RGB images; caption 8 is 78 tokens, caption 9 empty): tokens
   (torchmetrics tokenises without truncation, then cuts ids and mask to 77; no EOS is left then),
   preprocessing, image/text features on the same pixels/ids and on each side's own, 100 * cos before
   the clamp, and the clamped CLIPScore end to end.
6. Compared: tokens; preprocessing per image; features on the SAME pixels/tokens (image embeddings, text
   features fed the same image embeddings, unnormalised and normalised CLIP embeddings); scores on the
   same inputs; end to end (PIL + captions in, scores out). Our side runs in this process (the isolated
   env's transformers) and, with --ours-python, in a subprocess of that interpreter on the saved files.
   In this process (transformers 4.x) `CLIPTokenizer` is the slow tokenizer, which runs ftfy when it is
   installed (curly quotes become straight ones), while torchmetrics' `CLIPProcessor` uses
   `CLIPTokenizerFast`; in transformers 5 both names are the same fast tokenizer.

Prints the max abs differences and writes DIR/verify_scorers.json with --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

CAPTIONS = [
    "a cat sitting on a wooden bench in a park",
    "A red ball on the green grass, highly detailed photo, 4k",
    "an astronaut riding a horse on the moon",
    "Caf\u00e9 cr\u00e8me br\u00fbl\u00e9e \u2014 \u201cquoted\u201d text, it's 12:30 (numbers 1234) #tag $5 100%",
    "a close-up of a Shiba-Inu dog's face, wearing sunglasses; digital art by greg rutkowski",
    "\u4e00\u53ea\u732b and emoji \U0001F600 mixed, \u00c4\u00d6\u00dc Stra\u00dfe, \u2713 not in the vocab",
    "  multiple   spaces\tand\nnew lines  ",
    "a [SEP] and [cls] written in the caption",
    "a very long caption " + "with many repeated words and details about colours, light and texture " * 6,
    "",
]
SCORERS = ("image_reward", "aesthetic", "lpips", "clip")
OUT_OF_VOCAB = "\u2713"  # left out of the synthetic BERT vocabulary: must become [UNK] on both sides
MODEL_IMAGES = 4  # the models run on the first 4 images (with the first 4 captions); preprocessing on all


# ---------------------------------------------------------------------------------------------- inputs
def gradient_noise(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """An (height, width, 3) uint8 picture: colour ramps, a smooth pattern and Gaussian noise."""
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([255 * x / width, 255 * y / height, 127 * (np.sin(x / 17.0) + np.cos(y / 23.0) + 2) / 2], -1)
    return np.clip(base + rng.normal(0, 25, (height, width, 3)), 0, 255).astype(np.uint8)


def make_images(seed: int) -> dict[str, Image.Image]:
    rng = np.random.default_rng(seed)

    def rgb(width, height):
        return gradient_noise(rng, width, height)

    alpha = (np.linspace(0, 255, 300)[None, :] * np.ones((451, 1))).astype(np.uint8)
    images = {
        "rgb_512x512": Image.fromarray(rgb(512, 512)),
        "rgb_517x389": Image.fromarray(rgb(517, 389)),
        "rgba_300x451_alpha_ramp": Image.fromarray(np.dstack([rgb(300, 451), alpha]), "RGBA"),
        "L_333x250": Image.fromarray(rgb(333, 250)).convert("L"),
        "rgb_150x97_upscaled": Image.fromarray(rgb(150, 97)),
        "rgb_224x300_short_side_224": Image.fromarray(rgb(224, 300)),
        "rgba_260x260_opaque": Image.fromarray(rgb(260, 260)).convert("RGBA"),
        "P_401x283_palette": Image.fromarray(rgb(401, 283)).quantize(64),
        "LA_240x320": Image.fromarray(np.dstack([rgb(240, 320)[..., 0], np.full((320, 240), 200, np.uint8)]), "LA"),
    }
    return images


def save_images(images: dict[str, Image.Image], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, image in images.items():
        image.save(folder / f"{name}.png")


def load_images(folder: Path) -> dict[str, Image.Image]:
    names = json.loads((folder / "order.json").read_text())
    out = {}
    for name in names:
        with Image.open(folder / f"{name}.png") as image:
            image.load()
            out[name] = image.copy()
    return out


# LPIPS: image pairs in [-1, 1] of odd sizes (width x height), and masked benchmark samples (PNG files).
LPIPS_BACKBONE = "squeezenet1_1-b8a52dc0.pth"  # the file name of torchvision's URL for squeezenet1_1
LPIPS_HEADS = "squeeze.pth"
LPIPS_CHANNELS = (64, 128, 256, 384, 384, 512, 512)
MASKED_SAMPLES = (("512x512_rect", 512, 512, "rect"), ("512x512_blob", 512, 512, "blob"),
                  ("131x97_rect", 131, 97, "rect"), ("512x512_no_hole", 512, 512, "none"),
                  ("512x512_all_hole", 512, 512, "all"))


def make_lpips_pairs(seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """name -> (x0, x1), (N, 3, H, W) float32 in [-1, 1]: a slightly perturbed copy, an unrelated picture,
    and a batch of three (per-image distances of a batch)."""
    rng = np.random.default_rng(seed + 10)

    def picture(width, height):
        return torch.from_numpy(gradient_noise(rng, width, height)).permute(2, 0, 1)[None].float() / 127.5 - 1

    pairs = {}
    for width, height in ((64, 64), (97, 131), (512, 512)):
        x0 = picture(width, height)
        noise = torch.from_numpy(rng.standard_normal(x0.shape)).float()
        pairs[f"{width}x{height}_noisy"] = (x0, (x0 + 0.1 * noise).clamp(-1, 1))
        pairs[f"{width}x{height}_unrelated"] = (x0, picture(width, height))
    pairs["64x64_batch3"] = (torch.cat([picture(64, 64) for _ in range(3)]), torch.cat([picture(64, 64) for _ in range(3)]))
    return pairs


def make_masked_samples(seed: int, folder: Path) -> list[str]:
    """BrushBench-like samples: NAME_src.png (the original), NAME_tgt.png (a result: other content in the
    hole, +-3 noise outside) and NAME_mask.npy (uint8, 1 in the hole, as the authors' rle2mask gives)."""
    rng = np.random.default_rng(seed + 11)
    folder.mkdir(parents=True, exist_ok=True)
    for name, width, height, kind in MASKED_SAMPLES:
        src = gradient_noise(rng, width, height)
        hole = np.zeros((height, width), np.uint8)
        if kind == "rect":
            hole[height // 5: height * 3 // 5, width // 3: width * 5 // 6] = 1
        elif kind == "blob":
            y, x = np.mgrid[0:height, 0:width]
            hole[((x - 0.4 * width) / 150) ** 2 + ((y - 0.6 * height) / 90) ** 2 + 0.2 * np.sin(x / 9.0) < 1] = 1
        elif kind == "all":
            hole[:] = 1
        fill = gradient_noise(rng, width, height)[::-1]
        kept = np.clip(src + rng.normal(0, 3, src.shape), 0, 255)
        tgt = np.where(hole[..., None].astype(bool), fill, kept).astype(np.uint8)
        Image.fromarray(src).save(folder / f"{name}_src.png")
        Image.fromarray(tgt).save(folder / f"{name}_tgt.png")
        np.save(folder / f"{name}_mask.npy", hole)
    return [name for name, *_ in MASKED_SAMPLES]


def read_masked_sample(folder: Path, name: str) -> tuple[Image.Image, Image.Image, np.ndarray]:
    with Image.open(folder / f"{name}_src.png") as src, Image.open(folder / f"{name}_tgt.png") as tgt:
        src.load()
        tgt.load()
        return src.copy(), tgt.copy(), np.load(folder / f"{name}_mask.npy")


# CLIP similarity: a small random CLIP in the hub's openai/clip-vit-*-patch14 layout. torchmetrics loads a
# local path only when its name contains "openai" (CLIPModel/CLIPProcessor.from_pretrained of that path).
CLIP_FOLDER = "openai-clip-small-random"
CLIP_SMALL_CONFIG = {
    "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": 32, "logit_scale_init_value": 2.6592,
    "initializer_factor": 1.0, "torch_dtype": "float32",
    "text_config": {"model_type": "clip_text_model", "vocab_size": 49408, "hidden_size": 64, "intermediate_size": 256,
                    "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 77,
                    "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": 32,
                    "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1, "dropout": 0.0, "attention_dropout": 0.0},
    "vision_config": {"model_type": "clip_vision_model", "hidden_size": 64, "intermediate_size": 256,
                      "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 224, "patch_size": 14,
                      "num_channels": 3, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": 32,
                      "dropout": 0.0, "attention_dropout": 0.0},
}
# preprocessor_config.json of the hub's openai/clip-vit-large-patch14 (what CLIPProcessor reads).
CLIP_PREPROCESSOR_CONFIG = {
    "crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 224,
}
CLIP_IMAGES = ("rgb_512x512", "rgb_517x389", "rgb_150x97_upscaled", "rgb_224x300_short_side_224")
# (image, caption index): every caption once (8 is longer than 77 tokens, 9 is empty), every RGB image.
CLIP_PAIRS = tuple((CLIP_IMAGES[i % len(CLIP_IMAGES)], i) for i in range(len(CAPTIONS))) + (("rgb_517x389", 8),)


def write_bert_vocab(folder: Path, size: int = 30522) -> Path:
    """A bert-base-uncased-like vocab.txt: the special tokens at their real ids, characters and ##characters
    of the captions (lower-cased, accents stripped as BERT's basic tokenizer does, and as they are), about
    half of the captions' words as whole words (the others must be split into word pieces), some suffixes,
    then filler words up to `size` entries."""
    import unicodedata

    tokens = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert tokens.index("[CLS]") == 101
    chars: list[str] = []
    text = " ".join(CAPTIONS) + "".join(chr(c) for c in range(33, 127))
    for variant in (text.lower(), unicodedata.normalize("NFD", text.lower())):
        for ch in variant:
            if not ch.isspace() and unicodedata.category(ch) != "Mn" and ch not in chars and ch != OUT_OF_VOCAB:
                chars.append(ch)
    tokens += chars + ["##" + ch for ch in chars]
    words = []
    for word in " ".join(CAPTIONS).lower().replace(",", " ").replace(".", " ").replace(";", " ").split():
        if word.isalpha() and word not in words:
            words.append(word)
    tokens += [w for i, w in enumerate(words) if i % 2 == 0 and w not in tokens]
    tokens += ["##ing", "##s", "##ed", "##er", "##ly", "##ting", "##ai", "##ure", "##ours", "sit", "det", "col",
               "tex", "##ails", "##ght", "li"]
    tokens = list(dict.fromkeys(tokens))
    tokens += [f"filler{i}" for i in range(size - len(tokens))]
    assert len(tokens) == size
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(tokens) + "\n", encoding="utf-8")
    return folder


# ImageReward's med_config.json (BLIP's configs/med_config.json): BERT-base with cross-attention,
# vocabulary 30524; BLIP_Pretrain overrides encoder_width with the ViT-L width (1024).
MED_CONFIG = {
    "architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1, "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": 3072,
    "layer_norm_eps": 1e-12, "max_position_embeddings": 512, "model_type": "bert", "num_attention_heads": 12,
    "num_hidden_layers": 12, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": 30524, "encoder_width": 768,
    "add_cross_attention": True,
}

# config.json of the hub's openai/clip-vit-large-patch14 (the values that matter for the computation).
CLIP_L14_CONFIG = {
    "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": 768, "logit_scale_init_value": 2.6592,
    "initializer_factor": 1.0, "torch_dtype": "float32",
    "text_config": {"model_type": "clip_text_model", "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072,
                    "num_hidden_layers": 12, "num_attention_heads": 12, "max_position_embeddings": 77,
                    "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": 768,
                    "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1, "dropout": 0.0, "attention_dropout": 0.0},
    "vision_config": {"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
                      "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 224, "patch_size": 14,
                      "num_channels": 3, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": 768,
                      "dropout": 0.0, "attention_dropout": 0.0},
}


@torch.no_grad()
def perturb_constants(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Give every constant-initialised parameter (LayerNorm weights/biases, zero biases) distinct random
    values, so that a swapped or dropped LayerNorm or bias cannot go unnoticed."""
    for param in module.parameters():
        if param.numel() > 1 and float(param.std()) > 0:
            continue
        noise = torch.randn(param.shape, generator=generator, dtype=param.dtype)
        if param.numel() > 1 and bool((param == 1).all()):
            param.copy_(1 + 0.1 * noise)
        elif param.numel() > 1:
            param.add_(0.02 * noise)


def max_abs(a, b) -> float:
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    if a.shape != b.shape:
        raise ValueError(f"shape {tuple(a.shape)} != {tuple(b.shape)}")
    return float((a - b).abs().max()) if a.numel() else 0.0


def versions() -> dict:
    out = {"python": sys.version.split()[0], "machine": platform.processor() or platform.machine(),
           "torch": torch.__version__, "threads": torch.get_num_threads()}
    for name in ("transformers", "torchvision", "timm", "PIL", "tokenizers", "safetensors", "ftfy"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - absent or without __version__
            pass
    return out


# ------------------------------------------------------------------------------------------- originals
def reference_image_reward(work: Path, images: list[Image.Image], seed: int, log) -> dict:
    import ImageReward as RM
    from ImageReward.ImageReward import ImageReward

    write_bert_vocab(work / "bert-base-uncased")
    med_config = work / "med_config.json"
    med_config.write_text(json.dumps(MED_CONFIG, indent=1))
    checkpoint = work / "ImageReward.pt"
    cwd = os.getcwd()
    os.chdir(work)  # BLIP's init_tokenizer: BertTokenizer.from_pretrained('bert-base-uncased'), found here
    try:
        torch.manual_seed(seed)
        model = ImageReward(med_config=str(med_config), device="cpu")
        generator = torch.Generator().manual_seed(seed + 1)
        perturb_constants(model, generator)
        with torch.no_grad():
            for layer in model.mlp.layers:
                if isinstance(layer, torch.nn.Linear):
                    layer.weight.normal_(0, layer.in_features ** -0.5, generator=generator)
                    layer.bias.normal_(0, 0.1, generator=generator)
        saved = model.state_dict()
        torch.save(saved, checkpoint)
        log(f"ImageReward: random model built, {sum(p.numel() for p in model.parameters())} parameters, "
            f"{len(saved)} keys saved to {checkpoint.name}")
        del model
        original = RM.load(str(checkpoint), device="cpu", med_config=str(med_config))  # strict=False inside
    finally:
        os.chdir(cwd)
    loaded = original.state_dict()
    out: dict = {"checkpoint_keys": len(saved),
                 "original_load_missing_or_unexpected": sorted(set(saved) ^ set(loaded)),
                 "original_load_max_abs_diff": max(max_abs(saved[k], loaded[k]) for k in saved if k in loaded)}
    del saved
    tokenizer = original.blip.tokenizer
    out["dec_enc_ids"] = [tokenizer.bos_token_id, tokenizer.enc_token_id]
    encoded = tokenizer(CAPTIONS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    out["input_ids"], out["attention_mask"] = encoded.input_ids, encoded.attention_mask
    out["tokens"] = [tokenizer.convert_ids_to_tokens(row) for row in encoded.input_ids.tolist()]
    out["pixels_all"] = [original.preprocess(image).unsqueeze(0) for image in images]
    n = MODEL_IMAGES
    pixels = torch.cat(out["pixels_all"][:n])
    ids, mask = encoded.input_ids[:n], encoded.attention_mask[:n]
    with torch.no_grad():
        embeds = original.blip.visual_encoder(pixels)
        atts = torch.ones(embeds.shape[:-1], dtype=torch.long)
        features = original.blip.text_encoder(ids, attention_mask=mask, encoder_hidden_states=embeds,
                                              encoder_attention_mask=atts, return_dict=True).last_hidden_state[:, 0, :]
        rewards = ((original.mlp(features.float()) - original.mean) / original.std).squeeze(-1)
    out |= {"image_embeds": embeds, "text_features": features, "rewards": rewards}
    log("ImageReward: original tokens, preprocessing, image embeddings, text features, rewards")
    with torch.no_grad():
        out["e2e_score_list"] = torch.tensor([float(original.score(c, [im])) for c, im in zip(CAPTIONS[:n], images[:n])])
        out["e2e_score_single"] = torch.tensor([original.score(c, im) for c, im in zip(CAPTIONS[:n], images[:n])])
    log("ImageReward: original end to end (score(prompt, [image]) as BrushNet calls it, and score(prompt, image))")
    return out


def reference_aesthetic(work: Path, images: list[Image.Image], seed: int, log) -> dict:
    import open_clip
    import open_clip.openai
    from safetensors.torch import save_file

    from brushnet.evaluation.hps import openclip_to_transformers

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from verify_hps import write_clip_tokenizer

    torch.manual_seed(seed)
    model = open_clip.create_model("ViT-L-14", pretrained=None, force_quick_gelu=True)
    perturb_constants(model, torch.Generator().manual_seed(seed + 2))
    state = {k: (v.detach().half() if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    del model
    checkpoint = work / "ViT-L-14-openai-format.pt"
    torch.save(state, checkpoint)
    head = torch.nn.Linear(768, 1)
    generator = torch.Generator().manual_seed(seed + 3)
    with torch.no_grad():
        head.weight.copy_(0.5 * torch.randn(head.weight.shape, generator=generator))
        head.bias.fill_(5.5)
    head_path = work / "sa_0_4_vit_l_14_linear.pth"
    torch.save(head.state_dict(), head_path)

    # Our side's folder: the hub config, converted weights (float32 of the float16 values), tokenizer files.
    folder = work / "clip-vit-large-patch14"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(CLIP_L14_CONFIG, indent=1))
    converted = {k: v.float().contiguous() for k, v in openclip_to_transformers(state).items()}
    save_file(converted, str(folder / "model.safetensors"), metadata={"format": "pt"})
    tokenizer = open_clip.get_tokenizer("ViT-L-14")
    write_clip_tokenizer(tokenizer.encoder, tokenizer.bpe_ranks, folder)
    log(f"aesthetic: random ViT-L-14 (QuickGELU, float16 values) saved, {len(state)} keys; "
        f"transformers folder written ({len(converted)} tensors)")

    # The original, as evaluate_brushnet.py builds it; only the download is replaced by the file.
    open_clip.openai.download_pretrained_from_url = lambda url, cache_dir=None: str(checkpoint)
    clip_model, _, preprocess = open_clip.create_model_and_transforms("ViT-L-14", pretrained="openai")
    clip_model.eval()
    aesthetic_model = torch.nn.Linear(768, 1)
    aesthetic_model.load_state_dict(torch.load(head_path))
    aesthetic_model.eval()
    loaded = clip_model.state_dict()
    out: dict = {"checkpoint_keys": len(state), "preprocess": repr(preprocess),
                 "original_load_missing_or_unexpected": sorted((set(state) ^ set(loaded)) - {"attn_mask"}),
                 "original_load_max_abs_diff": max(max_abs(state[k].float(), loaded[k]) for k in state if k in loaded),
                 "original_uses_quick_gelu": type(clip_model.visual.transformer.resblocks[0].mlp.gelu).__name__}
    out["pixels_all"] = [preprocess(image).unsqueeze(0) for image in images]
    n = MODEL_IMAGES
    pixels = torch.cat(out["pixels_all"][:n])
    with torch.no_grad():
        raw = clip_model.encode_image(pixels)
        normalised = raw / raw.norm(dim=-1, keepdim=True)
        scores = aesthetic_model(normalised).squeeze(-1)
        e2e = []
        for image in images[:n]:  # MetricsCalculator.calculate_aesthetic_score
            features = clip_model.encode_image(preprocess(image).unsqueeze(0))
            features /= features.norm(dim=-1, keepdim=True)
            e2e.append(aesthetic_model(features).cpu().item())
    out |= {"image_features_raw": raw, "image_features": normalised, "scores": scores, "e2e_scores": torch.tensor(e2e)}
    log("aesthetic: original preprocessing, features, scores, end to end")
    return out


def lpips_original_masked_inputs(src: Image.Image, tgt: Image.Image, hole: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """The two tensors that the authors' MetricsCalculator.calculate_lpips(src, tgt, 1 - hole[:, :, None])
    hands to the metric, in its order: (result * 2 - 1, original * 2 - 1), float32 /255, times the mask."""
    mask = np.array(1 - hole[:, :, np.newaxis]).astype(np.float32)
    pred = np.array(tgt).astype(np.float32) / 255 * mask
    gt = np.array(src).astype(np.float32) / 255 * mask
    return (torch.tensor(pred).permute(2, 0, 1).unsqueeze(0) * 2 - 1,
            torch.tensor(gt).permute(2, 0, 1).unsqueeze(0) * 2 - 1)


def reference_lpips(work: Path, seed: int, log) -> dict:
    """torchmetrics' LearnedPerceptualImagePatchSimilarity(net_type='squeeze') on a random backbone and heads,
    and the `lpips` package's LPIPS(net='squeeze') on the same files."""
    import functools

    import torchmetrics.functional.image.lpips as tm_lpips
    import torchmetrics.image.lpip as tm_lpip
    import torchvision
    import torchvision.models._api as tv_api

    torch.manual_seed(seed)
    backbone = torchvision.models.squeezenet1_1(weights=None)
    perturb_constants(backbone, torch.Generator().manual_seed(seed + 4))  # the zero biases
    backbone_state = {k: v.detach().clone() for k, v in backbone.state_dict().items()}
    torch.save(backbone_state, work / LPIPS_BACKBONE)
    generator = torch.Generator().manual_seed(seed + 5)
    heads = {}
    for k, channels in enumerate(LPIPS_CHANNELS):  # non-negative, about 10 % exactly 0 (as the published ones)
        weight = 0.5 * torch.rand((1, channels, 1, 1), generator=generator)
        heads[f"lin{k}.model.1.weight"] = weight * (torch.rand(weight.shape, generator=generator) > 0.1)
    torch.save(heads, work / LPIPS_HEADS)
    log(f"LPIPS: random squeezenet1_1 ({len(backbone_state)} keys) and heads ({len(heads)} keys) saved")

    # Only the loads are replaced: torchvision's download of the ImageNet weights, torchmetrics' packaged heads.
    urls: list[str] = []

    def local_backbone(url, *args, **kwargs):
        urls.append(url)
        if not url.endswith("/" + LPIPS_BACKBONE):
            raise RuntimeError(f"unexpected download {url}")
        return torch.load(work / LPIPS_BACKBONE, map_location="cpu")

    saved_download, saved_net = tv_api.load_state_dict_from_url, tm_lpip._NoTrainLpips
    tv_api.load_state_dict_from_url = local_backbone
    tm_lpip._NoTrainLpips = functools.partial(tm_lpips._NoTrainLpips, model_path=str(work / LPIPS_HEADS))
    try:
        metric = tm_lpip.LearnedPerceptualImagePatchSimilarity(net_type="squeeze")
        package = None
        try:
            import lpips

            package = lpips.LPIPS(net="squeeze", version="0.1", model_path=str(work / LPIPS_HEADS), verbose=False).eval()
        except Exception as error:  # noqa: BLE001 - the lpips package is optional here
            log(f"LPIPS: the lpips package is not usable ({type(error).__name__}: {error}); skipped")
    finally:
        tv_api.load_state_dict_from_url, tm_lpip._NoTrainLpips = saved_download, saved_net
    net = metric.net

    def as_files(state):  # torchmetrics/lpips keys -> torchvision's features.* and the heads' keys
        mapped = {}
        for key, value in state.items():
            parts = key.split(".")
            if key.startswith("net.slices."):  # torchmetrics: net.slices.S.I.rest
                mapped[".".join(["features"] + parts[3:])] = value
            elif key.startswith("net.slice"):  # lpips package: net.sliceS.I.rest
                mapped[".".join(["features"] + parts[2:])] = value
            elif key.startswith("lin") and not key.startswith("lins."):
                mapped[key] = value
        return mapped

    expected = {k: v for k, v in backbone_state.items() if k.startswith("features.")} | heads
    out: dict = {"checkpoint_keys": len(expected), "original_download_urls": urls}
    for label, module in (("original", net), ("original_lpips_package", package)):
        if module is None:
            continue
        loaded = as_files(module.state_dict())
        out[f"{label}_load_missing_or_unexpected"] = sorted(set(expected) ^ set(loaded))
        out[f"{label}_load_max_abs_diff"] = max(max_abs(expected[k], loaded[k]) for k in expected if k in loaded)
    out["original_normalize_tensor"] = "sqrt(eps + sum f^2), eps=1e-8 (torchmetrics >= 1.2)" if (
        "eps + " in __import__("inspect").getsource(tm_lpips._normalize_tensor)) else "sqrt(sum f^2) + eps"

    pairs = make_lpips_pairs(seed)
    with torch.no_grad():
        for name, (x0, x1) in pairs.items():
            s0, s1 = net.scaling_layer(x0), net.scaling_layer(x1)
            f0, f1 = list(net.net(s0)), list(net.net(s1))
            _, per_layer = net(x0, x1, retperlayer=True)
            distances = tm_lpips._lpips_update(x0, x1, net, normalize=False).reshape(-1)  # the class's update
            record = {"scaled": [s0, s1], "features": [f0, f1],
                      "per_layer": [layer.reshape(-1) for layer in per_layer], "distances": distances,
                      "class_value": float(metric(x0, x1)),  # forward, reduction="mean", as the authors call it
                      # what the other normalisation (the lpips package's, torchmetrics < 1.2) would change
                      "normalisation_alternative_max_abs_diff": max(
                          max_abs(tm_lpips._normalize_tensor(f), f / (f.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
                          for f in f0 + f1),
                      "min_feature_norm": min(float(f.pow(2).sum(1).sqrt().min()) for f in f0 + f1)}
            if package is not None:
                record["lpips_package"] = package(x0, x1).reshape(-1)
            out.setdefault("pairs", {})[name] = record
        log("LPIPS: original scaling, features, per-layer and per-image distances on the pairs")
        masked = {}
        for name in make_masked_samples(seed, work / "lpips_masked"):
            src, tgt, hole = read_masked_sample(work / "lpips_masked", name)
            pred, gt = lpips_original_masked_inputs(src, tgt, hole)
            masked[name] = {"inputs": [pred, gt], "score": float(metric(pred, gt))}
            if package is not None:
                masked[name]["lpips_package"] = float(package(pred, gt))
        out["masked"] = masked
    out["pair_inputs"] = pairs
    log("LPIPS: original masked benchmark path (calculate_lpips) end to end")
    return out


def reference_clip(work: Path, images: dict[str, Image.Image], seed: int, log) -> dict:
    """torchmetrics' CLIPScore(model_name_or_path=<local folder>) on a small random CLIP."""
    import open_clip
    from torchmetrics.functional.multimodal.clip_score import (
        _clip_score_update,  # the module: its name is shadowed
    )
    from torchmetrics.multimodal import CLIPScore
    from transformers import CLIPConfig, CLIPModel

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from verify_hps import write_clip_tokenizer

    folder = work / CLIP_FOLDER
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig.from_dict(CLIP_SMALL_CONFIG)).eval()
    generator = torch.Generator().manual_seed(seed + 6)
    perturb_constants(model, generator)
    with torch.no_grad():
        # Random towers give unrelated embeddings (cosines near 0, half clamped away): a shared offset after
        # both final LayerNorms and related projections make most cosines positive, a few near 0.
        shared = 0.8 * torch.randn(64, generator=generator)
        model.vision_model.post_layernorm.bias.add_(shared)
        model.text_model.final_layer_norm.bias.add_(shared)
        model.text_projection.weight.mul_(0.7).add_(model.visual_projection.weight)
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.save_pretrained(str(folder), safe_serialization=True)
    (folder / "preprocessor_config.json").write_text(json.dumps(CLIP_PREPROCESSOR_CONFIG, indent=1))
    tokenizer = open_clip.get_tokenizer("ViT-L-14")
    write_clip_tokenizer(tokenizer.encoder, tokenizer.bpe_ranks, folder)
    del model
    log(f"CLIP: small random CLIPModel saved ({len(saved)} tensors), hub preprocessor config, CLIP BPE tokenizer")

    metric = CLIPScore(model_name_or_path=str(folder))
    tm_model, processor = metric.model, metric.processor
    loaded = tm_model.state_dict()
    out: dict = {"checkpoint_keys": len(saved),
                 "original_load_missing_or_unexpected": sorted(set(saved) ^ set(loaded)),
                 "original_load_max_abs_diff": max(max_abs(saved[k], loaded[k]) for k in saved if k in loaded),
                 "original_processor": f"{type(processor).__name__}: {type(processor.tokenizer).__name__}, "
                                       f"{type(processor.image_processor).__name__}"}
    calls: list = []  # what the original hands to the model, and the features it gets back
    get_text, get_image = tm_model.get_text_features, tm_model.get_image_features

    def record_text(input_ids, attention_mask, *args, **kwargs):
        features = get_text(input_ids, attention_mask, *args, **kwargs)
        calls.append(("text", input_ids.clone(), attention_mask.clone(), features.detach().clone()))
        return features

    def record_image(pixel_values, *args, **kwargs):
        features = get_image(pixel_values, *args, **kwargs)
        calls.append(("image", pixel_values.clone(), features.detach().clone()))
        return features

    tm_model.get_text_features, tm_model.get_image_features = record_text, record_image
    pairs = []
    with torch.no_grad():
        for image_name, index in CLIP_PAIRS:
            # MetricsCalculator.calculate_clip_similarity: np.array(img) -> (3, H, W) uint8 tensor, the metric.
            img_tensor = torch.tensor(np.array(images[image_name])).permute(2, 0, 1)
            calls.clear()
            e2e = metric(img_tensor, CAPTIONS[index]).cpu().item()  # CLIPScore.full_state_update: 2 updates
            (_, pixels, image_features), (_, ids, mask, text_features) = calls[:2]
            calls.clear()
            raw_score, _ = _clip_score_update(img_tensor, CAPTIONS[index], tm_model, processor)
            pairs.append({"image": image_name, "caption": index, "pixels": pixels, "image_features": image_features,
                          "input_ids": ids, "attention_mask": mask, "text_features": text_features,
                          "tokens": processor.tokenizer.convert_ids_to_tokens(ids[0].tolist()),
                          "untruncated_length": len(processor.tokenizer(CAPTIONS[index]).input_ids),
                          "similarity": float(raw_score.reshape(-1)[0]), "e2e": e2e})
    out["pairs"] = pairs
    log("CLIP: original preprocessing, tokens, features, 100*cos and CLIPScore end to end")
    return out


# ------------------------------------------------------------------------------------------------- ours
def ours_stage(work: Path, scorers: list[str], log) -> dict:
    """Our port on the files in `work` (checkpoints, tokenizer folders, images, the original's inputs)."""
    images = list(load_images(work / "images").values())
    inputs = torch.load(work / "inputs.pt", weights_only=True)
    n = MODEL_IMAGES
    out: dict = {"versions": versions()}
    if "image_reward" in scorers:
        from brushnet.evaluation.image_reward import (
            ImageRewardScore,
            image_reward_preprocess,
        )

        scorer = ImageRewardScore.from_file(work / "ImageReward.pt", work / "bert-base-uncased")
        ids, mask = scorer.tokenize(CAPTIONS)
        ref_ids, ref_mask = inputs["ir_input_ids"][:n], inputs["ir_attention_mask"][:n]
        ref_pixels = inputs["ir_pixels"]
        model = scorer.model
        with torch.no_grad():
            embeds = model.image_embeds(ref_pixels)
            features_on_ref_embeds = model.text_features(ref_ids, ref_mask, inputs["ir_image_embeds"])
            features = model.text_features(ref_ids, ref_mask, embeds)
            rewards = model(ref_pixels, ref_ids, ref_mask)
        out["image_reward"] = {
            "input_ids": ids, "attention_mask": mask,
            "tokens": [scorer.tokenizer.convert_ids_to_tokens(row) for row in ids.tolist()],
            "dec_enc_ids": [scorer.tokenizer.bos_token_id, scorer.tokenizer.enc_token_id],
            "pixels_all": [image_reward_preprocess(image) for image in images],
            "image_embeds": embeds, "text_features_on_ref_embeds": features_on_ref_embeds,
            "text_features": features, "rewards": rewards,
            "e2e_scores": scorer(images[:n], CAPTIONS[:n]),
            "e2e_score_single": torch.tensor([scorer.score(im, c) for im, c in zip(images[:n], CAPTIONS[:n])]),
        }
        del scorer, model
        log("ours: ImageReward done")
    if "aesthetic" in scorers:
        from safetensors.torch import load_file

        from brushnet.evaluation.clip import (
            AestheticHead,
            AestheticScore,
            CLIPEmbedder,
            _pooled,
            clip_preprocess,
        )

        folder = work / "clip-vit-large-patch14"
        embedder = CLIPEmbedder.from_pretrained(folder)
        # CLIPModel.from_pretrained is not strict: check every tensor against the file here.
        file_state = load_file(str(folder / "model.safetensors"))
        model_state = {k: v for k, v in embedder.model.state_dict().items() if not k.endswith("position_ids")}
        head = AestheticHead.from_file(work / "sa_0_4_vit_l_14_linear.pth")
        scorer = AestheticScore(embedder, head)
        ref_pixels = inputs["ae_pixels"]
        with torch.no_grad():
            raw = _pooled(embedder.model.get_image_features(pixel_values=ref_pixels)).float()
            normalised = raw / raw.norm(p=2, dim=-1, keepdim=True)
            scores = head(normalised).squeeze(-1)
        out["aesthetic"] = {
            "folder_missing_or_unexpected": sorted(set(file_state) ^ set(model_state)),
            "folder_load_max_abs_diff": max(max_abs(file_state[k], model_state[k])
                                            for k in file_state if k in model_state),
            "pixels_all": [clip_preprocess(image, embedder.image_size, crop="round") for image in images],
            "image_features_raw": raw, "image_features": normalised, "scores": scores,
            "e2e_scores": torch.tensor([scorer.score(image) for image in images[:n]]),
        }
        log("ours: aesthetic done")
    if "lpips" in scorers:
        from brushnet.evaluation.lpips import LPIPSSqueeze, masked_lpips_inputs
        from brushnet.evaluation.metrics import Sample, build_scorers

        backbone, heads = work / LPIPS_BACKBONE, work / LPIPS_HEADS
        model = LPIPSSqueeze.from_files(backbone, heads)
        seen: dict = {}  # what the port's forward feeds its backbone, what it gets back, each head's mean
        model.backbone.register_forward_pre_hook(lambda module, args: seen.setdefault("scaled", []).append(args[0]))
        model.backbone.register_forward_hook(lambda module, args, output: seen.setdefault("features", []).append(output))
        for k in range(len(LPIPS_CHANNELS)):
            model.heads[k].register_forward_hook(
                lambda module, args, output, k=k: seen.setdefault("per_layer", {}).__setitem__(k, output.mean(dim=(2, 3)).reshape(-1)))
        pairs = {}
        for name, (x0, x1) in inputs["lpips_pairs"].items():
            seen.clear()
            distances = model(x0, x1)
            pairs[name] = {"scaled": seen["scaled"], "features": seen["features"],
                           "per_layer": [seen["per_layer"][k] for k in range(len(LPIPS_CHANNELS))],
                           "distances": distances}
        scorer = build_scorers(["lpips"], {"lpips": (str(backbone), str(heads))})["lpips"]  # as the benchmark does
        masked = {}
        for name, *_ in MASKED_SAMPLES:
            src, tgt, hole = read_masked_sample(work / "lpips_masked", name)
            keep = hole == 0
            sample = Sample(name, "", original=src, result=tgt, keep=keep)
            masked[name] = {"inputs": [masked_lpips_inputs(tgt, keep), masked_lpips_inputs(src, keep)],
                            "score": scorer(sample)}
        out["lpips"] = {"pairs": pairs, "masked": masked}
        del model, scorer
        log("ours: LPIPS done")
    if "clip" in scorers:
        from safetensors.torch import load_file

        from brushnet.evaluation.clip import (
            CLIPEmbedder,
            CLIPSimilarity,
            _pooled,
            clip_preprocess,
        )
        from brushnet.evaluation.metrics import Sample, build_scorers

        folder = work / CLIP_FOLDER
        images_by_name = load_images(work / "images")
        embedder = CLIPEmbedder.from_pretrained(folder)
        file_state = load_file(str(folder / "model.safetensors"))
        model_state = {k: v for k, v in embedder.model.state_dict().items() if not k.endswith("position_ids")}
        file_state = {k: v for k, v in file_state.items() if not k.endswith("position_ids")}
        model = embedder.model
        calls: list = []
        get_text, get_image = model.get_text_features, model.get_image_features

        def record_text(*args, **kwargs):
            features = get_text(*args, **kwargs)
            calls.append(("text", kwargs["input_ids"].clone(), kwargs["attention_mask"].clone(), _pooled(features).clone()))
            return features

        def record_image(*args, **kwargs):
            features = get_image(*args, **kwargs)
            calls.append(("image", kwargs["pixel_values"].clone(), _pooled(features).clone()))
            return features

        scorer = build_scorers(["clip"], {"clip": str(folder)})["clip"]  # as the benchmark does (its own load)
        similarity = CLIPSimilarity(embedder)
        pairs = []
        with torch.no_grad():
            for (image_name, index), ref in zip(CLIP_PAIRS, inputs["clip_pairs"]):
                image, caption = images_by_name[image_name], CAPTIONS[index]
                on_ref = {"image_features_on_ref_pixels": _pooled(get_image(pixel_values=ref["pixels"])).float(),
                          "text_features_on_ref_ids": _pooled(get_text(input_ids=ref["input_ids"],
                                                                       attention_mask=ref["attention_mask"])).float()}
                model.get_text_features, model.get_image_features = record_text, record_image
                calls.clear()
                value = similarity.similarity(image, caption)  # the port's own preprocessing and tokens
                model.get_text_features, model.get_image_features = get_text, get_image
                (_, pixels, image_features), (_, ids, mask, text_features) = calls
                keep = np.ones(image.size[::-1], bool)
                pairs.append(on_ref | {
                    "pixels": pixels, "preprocess_direct": clip_preprocess(image, embedder.image_size, crop="floor"),
                    "input_ids": ids, "attention_mask": mask,
                    "tokens": embedder.tokenizer.convert_ids_to_tokens(ids[0].tolist()),
                    "image_features": image_features, "text_features": text_features, "similarity": value,
                    "e2e": scorer(Sample(f"{image_name}-{index}", caption, original=image, result=image, keep=keep))})
        out["clip"] = {"folder_missing_or_unexpected": sorted(set(file_state) ^ set(model_state)),
                       "folder_load_max_abs_diff": max(max_abs(file_state[k], model_state[k])
                                                       for k in file_state if k in model_state),
                       "tokenizer": f"{type(embedder.tokenizer).__name__} (is_fast={embedder.tokenizer.is_fast})",
                       "pairs": pairs}
        del embedder, scorer
        log("ours: CLIP similarity done")
    return out


# ---------------------------------------------------------------------------------------------- compare
def compare(ref: dict, ours: dict, names: list[str]) -> dict:
    report: dict = {}
    if "image_reward" in ref and "image_reward" in ours:
        r, o = ref["image_reward"], ours["image_reward"]
        rows = [i for i in range(len(CAPTIONS))
                if not (torch.equal(r["input_ids"][i], o["input_ids"][i])
                        and torch.equal(r["attention_mask"][i], o["attention_mask"][i]))]
        pre = {name: max_abs(a, b) for name, a, b in zip(names, r["pixels_all"], o["pixels_all"])}
        report["image_reward"] = {
            "token_rows_mismatched": len(rows),
            "token_mismatches": [{"caption": CAPTIONS[i], "original": r["tokens"][i], "ours": o["tokens"][i]}
                                 for i in rows],
            "dec_enc_ids": {"original": r["dec_enc_ids"], "ours": o["dec_enc_ids"]},
            "preprocess_max_abs_diff": max(pre.values()), "preprocess_max_abs_diff_per_image": pre,
            "image_embeds_max_abs_diff": max_abs(r["image_embeds"], o["image_embeds"]),
            "image_embeds_max_abs": float(r["image_embeds"].abs().max()),
            "text_features_max_abs_diff_same_image_embeds": max_abs(r["text_features"], o["text_features_on_ref_embeds"]),
            "text_features_max_abs_diff": max_abs(r["text_features"], o["text_features"]),
            "text_features_max_abs": float(r["text_features"].abs().max()),
            "rewards_max_abs_diff": max_abs(r["rewards"], o["rewards"]),
            "e2e_max_abs_diff_vs_score_list": max_abs(r["e2e_score_list"], o["e2e_scores"]),
            "e2e_max_abs_diff_vs_score_single": max_abs(r["e2e_score_single"], o["e2e_score_single"]),
            "original_rewards": [round(float(x), 6) for x in r["rewards"]],
            "original_e2e": [round(float(x), 6) for x in r["e2e_score_list"]],
            "ours_e2e": [round(float(x), 6) for x in o["e2e_scores"]],
        }
    if "aesthetic" in ref and "aesthetic" in ours:
        r, o = ref["aesthetic"], ours["aesthetic"]
        pre = {name: max_abs(a, b) for name, a, b in zip(names, r["pixels_all"], o["pixels_all"])}
        report["aesthetic"] = {
            "folder_missing_or_unexpected": o["folder_missing_or_unexpected"],
            "folder_load_max_abs_diff": o["folder_load_max_abs_diff"],
            "preprocess_max_abs_diff": max(pre.values()), "preprocess_max_abs_diff_per_image": pre,
            "image_features_unnormalised_max_abs_diff": max_abs(r["image_features_raw"], o["image_features_raw"]),
            "image_features_unnormalised_max_abs": float(r["image_features_raw"].abs().max()),
            "image_features_max_abs_diff": max_abs(r["image_features"], o["image_features"]),
            "scores_max_abs_diff": max_abs(r["scores"], o["scores"]),
            "e2e_max_abs_diff": max_abs(r["e2e_scores"], o["e2e_scores"]),
            "e2e_abs_diff_per_image": {name: abs(float(a) - float(b))
                                       for name, a, b in zip(names, r["e2e_scores"], o["e2e_scores"])},
            "original_e2e": [round(float(x), 6) for x in r["e2e_scores"]],
            "ours_e2e": [round(float(x), 6) for x in o["e2e_scores"]],
        }
    if "lpips" in ref and "lpips" in ours:
        r, o = ref["lpips"], ours["lpips"]
        pairs = {}
        for name, rp in r["pairs"].items():
            op = o["pairs"][name]
            pairs[name] = {
                "shape": list(r["pair_inputs"][name][0].shape),
                "preprocess_max_abs_diff": max(max_abs(a, b) for a, b in zip(rp["scaled"], op["scaled"])),
                "features_max_abs_diff": max(max_abs(a, b) for fr, fo in zip(rp["features"], op["features"])
                                             for a, b in zip(fr, fo)),
                "features_max_abs": max(float(f.abs().max()) for fr in rp["features"] for f in fr),
                "per_layer_max_abs_diff": max(max_abs(a, b) for a, b in zip(rp["per_layer"], op["per_layer"])),
                "distances_max_abs_diff": max_abs(rp["distances"], op["distances"]),
                "class_value_abs_diff": abs(rp["class_value"] - float(op["distances"].mean())),
                "original_distances": [round(float(x), 7) for x in rp["distances"]],
                "ours_distances": [round(float(x), 7) for x in op["distances"]],
                "min_feature_norm": rp["min_feature_norm"],
                "normalisation_eps_placement_max_abs_diff": rp["normalisation_alternative_max_abs_diff"],
            }
            if "lpips_package" in rp:
                pairs[name]["lpips_package_vs_ours_max_abs_diff"] = max_abs(rp["lpips_package"], op["distances"])
                pairs[name]["lpips_package_vs_torchmetrics_max_abs_diff"] = max_abs(rp["lpips_package"], rp["distances"])
        masked = {}
        for name, rm in r["masked"].items():
            om = o["masked"][name]
            masked[name] = {"inputs_max_abs_diff": max(max_abs(a, b) for a, b in zip(rm["inputs"], om["inputs"])),
                            "score_abs_diff": abs(rm["score"] - om["score"]),
                            "original": round(rm["score"], 7), "ours": round(om["score"], 7)}
            if "lpips_package" in rm:
                masked[name]["lpips_package_vs_ours_abs_diff"] = abs(rm["lpips_package"] - om["score"])
        report["lpips"] = {
            "preprocess_max_abs_diff": max(p["preprocess_max_abs_diff"] for p in pairs.values()),
            "features_max_abs_diff": max(p["features_max_abs_diff"] for p in pairs.values()),
            "per_layer_max_abs_diff": max(p["per_layer_max_abs_diff"] for p in pairs.values()),
            "distances_max_abs_diff": max(p["distances_max_abs_diff"] for p in pairs.values()),
            "class_value_max_abs_diff": max(p["class_value_abs_diff"] for p in pairs.values()),
            "masked_inputs_max_abs_diff": max(m["inputs_max_abs_diff"] for m in masked.values()),
            "e2e_masked_max_abs_diff": max(m["score_abs_diff"] for m in masked.values()),
            "pairs": pairs, "masked": masked,
        }
        if all("lpips_package_vs_ours_max_abs_diff" in p for p in pairs.values()):
            report["lpips"]["lpips_package_vs_ours_max_abs_diff"] = max(
                [p["lpips_package_vs_ours_max_abs_diff"] for p in pairs.values()]
                + [m["lpips_package_vs_ours_abs_diff"] for m in masked.values()])
    if "clip" in ref and "clip" in ours:
        r, o = ref["clip"], ours["clip"]
        token_mismatches, pre, rows = [], {}, []
        for rp, op in zip(r["pairs"], o["pairs"]):
            same = torch.equal(rp["input_ids"], op["input_ids"]) and torch.equal(rp["attention_mask"], op["attention_mask"])
            if not same:
                token_mismatches.append({"caption": CAPTIONS[rp["caption"]], "original": rp["tokens"], "ours": op["tokens"]})
            pre[rp["image"]] = max(pre.get(rp["image"], 0.0), max_abs(rp["pixels"], op["pixels"]),
                                   max_abs(rp["pixels"], op["preprocess_direct"]))
            rows.append({"image": rp["image"], "caption": rp["caption"],
                         "tokens_original_untruncated_passed": [rp["untruncated_length"], rp["input_ids"].shape[-1]],
                         "tokens_ours_passed": op["input_ids"].shape[-1],
                         "similarity_original": round(rp["similarity"], 5), "similarity_ours": round(op["similarity"], 5),
                         "e2e_original": round(rp["e2e"], 5), "e2e_ours": round(op["e2e"], 5)})

        def worst(key_ref, key_ours):
            return max(max_abs(rp[key_ref], op[key_ours]) for rp, op in zip(r["pairs"], o["pairs"]))

        report["clip"] = {
            "folder_missing_or_unexpected": o["folder_missing_or_unexpected"],
            "folder_load_max_abs_diff": o["folder_load_max_abs_diff"], "ours_tokenizer": o["tokenizer"],
            "token_rows_mismatched": len(token_mismatches), "token_mismatches": token_mismatches,
            "preprocess_max_abs_diff": max(pre.values()), "preprocess_max_abs_diff_per_image": pre,
            "image_features_same_pixels_max_abs_diff": worst("image_features", "image_features_on_ref_pixels"),
            "text_features_same_ids_max_abs_diff": worst("text_features", "text_features_on_ref_ids"),
            "image_features_max_abs_diff": worst("image_features", "image_features"),
            "text_features_max_abs_diff": worst("text_features", "text_features"),
            "features_max_abs": max(float(rp[k].abs().max()) for rp in r["pairs"] for k in ("image_features", "text_features")),
            "similarity_max_abs_diff": max(abs(rp["similarity"] - op["similarity"]) for rp, op in zip(r["pairs"], o["pairs"])),
            "e2e_max_abs_diff": max(abs(rp["e2e"] - op["e2e"]) for rp, op in zip(r["pairs"], o["pairs"])),
            "pairs": rows,
        }
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scorers", default=",".join(SCORERS), help=f"comma-separated, of {', '.join(SCORERS)}")
    parser.add_argument("--out", help="folder for verify_scorers.json")
    parser.add_argument("--workdir", help="scratch folder (kept; default: a temporary one, removed)")
    parser.add_argument("--ours-python", help="also run our side with this interpreter (e.g. the repo's .venv)")
    parser.add_argument("--no-in-process", action="store_true", help="skip our side in this process")
    parser.add_argument("--ours-stage", help=argparse.SUPPRESS)  # internal: WORKDIR,OUTFILE
    args = parser.parse_args(argv)
    scorers = [s for s in args.scorers.split(",") if s]
    unknown = [s for s in scorers if s not in SCORERS]
    if unknown:
        parser.error(f"unknown scorer {unknown[0]!r}; choose from {', '.join(SCORERS)}")
    clock = time.time()

    def log(message):
        print(f"[{time.time() - clock:6.1f}s] {message}", flush=True)

    if args.ours_stage:  # a subprocess: our side only, on the saved files
        work, outfile = args.ours_stage.split(",")
        torch.save(ours_stage(Path(work), scorers, log), outfile)
        return 0

    report: dict = {"reference_env": versions(), "seed": args.seed, "captions_used_with_images": CAPTIONS[:MODEL_IMAGES]}
    for name, dist in (("open_clip", "open_clip_torch"), ("ImageReward", "image-reward"), ("torchmetrics", "torchmetrics"),
                       ("lpips", "lpips"), ("ftfy", "ftfy")):
        try:
            from importlib.metadata import version
            report["reference_env"][name] = version(dist)
        except Exception:  # noqa: BLE001
            pass
    print(json.dumps(report["reference_env"]), flush=True)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="verify_scorers_"))
    work.mkdir(parents=True, exist_ok=True)
    images_by_name = make_images(args.seed)
    save_images(images_by_name, work / "images")
    (work / "images" / "order.json").write_text(json.dumps(list(images_by_name)))
    names = list(images_by_name)
    images = list(load_images(work / "images").values())
    report["images"] = {name: f"{im.mode} {im.size[0]}x{im.size[1]}" for name, im in zip(names, images)}

    ref: dict = {}
    inputs: dict = {}
    if "image_reward" in scorers:
        ref["image_reward"] = reference_image_reward(work, images, args.seed, log)
        r = ref["image_reward"]
        inputs |= {"ir_input_ids": r["input_ids"], "ir_attention_mask": r["attention_mask"],
                   "ir_pixels": torch.cat(r["pixels_all"][:MODEL_IMAGES]), "ir_image_embeds": r["image_embeds"]}
    if "aesthetic" in scorers:
        ref["aesthetic"] = reference_aesthetic(work, images, args.seed, log)
        inputs["ae_pixels"] = torch.cat(ref["aesthetic"]["pixels_all"][:MODEL_IMAGES])
    if "lpips" in scorers:
        ref["lpips"] = reference_lpips(work, args.seed, log)
        inputs["lpips_pairs"] = ref["lpips"]["pair_inputs"]
    if "clip" in scorers:
        ref["clip"] = reference_clip(work, dict(zip(names, images)), args.seed, log)
        inputs["clip_pairs"] = [{k: p[k] for k in ("pixels", "input_ids", "attention_mask")} for p in ref["clip"]["pairs"]]
    torch.save(inputs, work / "inputs.pt")
    for scorer, r in ref.items():
        report[f"{scorer}_original_load"] = {k: r[k] for k in r if k.startswith("original_") or k in (
            "checkpoint_keys", "preprocess")}
    if "lpips" in ref:
        report["lpips_inputs"] = {"pairs": {name: list(x0.shape) for name, (x0, _) in ref["lpips"]["pair_inputs"].items()},
                                  "masked_samples": [f"{name}: {w}x{h}, hole {kind}" for name, w, h, kind in MASKED_SAMPLES]}
    if "clip" in ref:
        report["clip_pairs"] = [f"{image} + caption {index}" for image, index in CLIP_PAIRS]
    import gc

    gc.collect()
    runs = {}
    if not args.no_in_process:
        log("ours, in this process")
        runs["in_process"] = ours_stage(work, scorers, log)
    if args.ours_python:
        log(f"ours, in {args.ours_python}")
        outfile = work / "ours_subprocess.pt"
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
        subprocess.run([args.ours_python, str(Path(__file__).resolve()), "--scorers", args.scorers,
                        "--ours-stage", f"{work},{outfile}"], check=True, env=env)
        runs["ours_python"] = torch.load(outfile, weights_only=False)
    for label, ours in runs.items():
        report[label] = {"versions": ours["versions"]} | compare(ref, ours, names)
    report["seconds"] = round(time.time() - clock, 1)
    print(json.dumps(report, indent=1, ensure_ascii=False), flush=True)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "verify_scorers.json").write_text(json.dumps(report, indent=1, ensure_ascii=False))
    if not args.workdir:
        for path in sorted(work.rglob("*"), reverse=True):
            path.unlink() if path.is_file() or path.is_symlink() else path.rmdir()
        work.rmdir()
    failures = []
    for label in runs:
        ir, ae = report[label].get("image_reward"), report[label].get("aesthetic")
        lp, cs = report[label].get("lpips"), report[label].get("clip")
        checks = {}
        if ir:
            checks |= {"image_reward tokens": ir["token_rows_mismatched"] == 0,
                       "image_reward preprocessing": ir["preprocess_max_abs_diff"] < 1e-5,
                       "image_reward features/rewards": max(ir["image_embeds_max_abs_diff"], ir["text_features_max_abs_diff"],
                                                            ir["rewards_max_abs_diff"]) < 1e-4,
                       "image_reward end to end": max(ir["e2e_max_abs_diff_vs_score_list"],
                                                      ir["e2e_max_abs_diff_vs_score_single"]) < 1e-4}
        if ae:
            checks |= {"aesthetic preprocessing": ae["preprocess_max_abs_diff"] < 1e-5,
                       "aesthetic features/scores": max(ae["image_features_max_abs_diff"], ae["scores_max_abs_diff"]) < 1e-4,
                       "aesthetic end to end": ae["e2e_max_abs_diff"] < 1e-4}
        if lp:  # distances of order 0.1-1; float32 sums over 7 layers
            checks |= {"lpips preprocessing": max(lp["preprocess_max_abs_diff"], lp["masked_inputs_max_abs_diff"]) < 1e-6,
                       "lpips features": lp["features_max_abs_diff"] < 1e-4,
                       "lpips distances": max(lp["per_layer_max_abs_diff"], lp["distances_max_abs_diff"],
                                              lp["class_value_max_abs_diff"]) < 1e-5,
                       "lpips end to end": lp["e2e_masked_max_abs_diff"] < 1e-5}
        if cs:  # scores are 100 * cos
            checks |= {"clip tokens": cs["token_rows_mismatched"] == 0,
                       "clip preprocessing": cs["preprocess_max_abs_diff"] < 1e-5,
                       "clip features": max(cs["image_features_same_pixels_max_abs_diff"],
                                            cs["text_features_same_ids_max_abs_diff"]) < 1e-4,
                       "clip end to end": max(cs["similarity_max_abs_diff"], cs["e2e_max_abs_diff"]) < 1e-3}
        failures += [f"{label}: {name}" for name, passed in checks.items() if not passed]
    ok = not failures
    print("VERIFY_SCORERS", "OK" if ok else "MISMATCH: " + "; ".join(failures), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
