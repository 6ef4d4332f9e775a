"""Compare brushnet's ImageReward v1.0 and LAION aesthetic-score ports with the ORIGINAL code, on random weights.

Run once, by hand, outside CI (no GPU needed; float32 on the CPU). The originals are the packages the
BrushNet authors call in examples/brushnet/evaluate_brushnet.py:

- ImageReward: `ImageReward.load(...)` of the `image-reward` package (BLIP + MLP head), called as
  `model.score(prompt, [image])` (a list: `inference_rank`) and `model.score(prompt, image)`.
- Aesthetic score: `open_clip.create_model_and_transforms('ViT-L-14', pretrained='openai')` (its
  `preprocess` and `encode_image`), the embedding divided by its norm, then `torch.nn.Linear(768, 1)`
  loaded from `sa_0_4_vit_l_14_linear.pth`.

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

(image-reward 1.5 pins timm==0.6.13, which open_clip 3.x refuses, hence open_clip 2.24.0; its BLIP
code imports `apply_chunking_to_forward` & co. from `transformers.modeling_utils`, hence transformers 4.x.)

Run (from the repo root; --ours-python also runs our side in the repo's own environment, transformers 5):

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 PYTHONPATH=$PWD/src /tmp/verify-venv/bin/python tools/verify_scorers.py \\
        --ours-python .venv/bin/python --out /tmp/verify-out [--workdir /tmp/verify-work] [--scorers image_reward,aesthetic]

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
4. Compared: tokens; preprocessing per image; features on the SAME pixels/tokens (image embeddings, text
   features fed the same image embeddings, unnormalised and normalised CLIP embeddings); scores on the
   same inputs; end to end (PIL + captions in, scores out). Our side runs in this process (the isolated
   env's transformers) and, with --ours-python, in a subprocess of that interpreter on the saved files.

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
OUT_OF_VOCAB = "\u2713"  # left out of the synthetic BERT vocabulary: must become [UNK] on both sides
MODEL_IMAGES = 4  # the models run on the first 4 images (with the first 4 captions); preprocessing on all


# ---------------------------------------------------------------------------------------------- inputs
def make_images(seed: int) -> dict[str, Image.Image]:
    rng = np.random.default_rng(seed)

    def rgb(width, height):
        y, x = np.mgrid[0:height, 0:width]
        base = np.stack([255 * x / width, 255 * y / height, 127 * (np.sin(x / 17.0) + np.cos(y / 23.0) + 2) / 2], -1)
        return np.clip(base + rng.normal(0, 25, (height, width, 3)), 0, 255).astype(np.uint8)

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
    for name in ("transformers", "torchvision", "timm", "PIL", "tokenizers", "safetensors"):
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


# ------------------------------------------------------------------------------------------------- ours
def ours_stage(work: Path, scorers: list[str], log) -> dict:
    """Our port on the files in `work` (checkpoints, tokenizer folders, images, the original's inputs)."""
    images = list(load_images(work / "images").values())
    inputs = torch.load(work / "inputs.pt", weights_only=True)
    n = MODEL_IMAGES
    out: dict = {"versions": versions()}
    if "image_reward" in scorers:
        from brushnet.evaluation.image_reward import ImageRewardScore, image_reward_preprocess

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

        from brushnet.evaluation.clip import AestheticHead, AestheticScore, CLIPEmbedder, _pooled, clip_preprocess

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
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scorers", default="image_reward,aesthetic")
    parser.add_argument("--out", help="folder for verify_scorers.json")
    parser.add_argument("--workdir", help="scratch folder (kept; default: a temporary one, removed)")
    parser.add_argument("--ours-python", help="also run our side with this interpreter (e.g. the repo's .venv)")
    parser.add_argument("--no-in-process", action="store_true", help="skip our side in this process")
    parser.add_argument("--ours-stage", help=argparse.SUPPRESS)  # internal: WORKDIR,OUTFILE
    args = parser.parse_args(argv)
    scorers = [s for s in args.scorers.split(",") if s]
    clock = time.time()

    def log(message):
        print(f"[{time.time() - clock:6.1f}s] {message}", flush=True)

    if args.ours_stage:  # a subprocess: our side only, on the saved files
        work, outfile = args.ours_stage.split(",")
        torch.save(ours_stage(Path(work), scorers, log), outfile)
        return 0

    report: dict = {"reference_env": versions(), "seed": args.seed, "captions_used_with_images": CAPTIONS[:MODEL_IMAGES]}
    for name in ("open_clip", "ImageReward"):
        try:
            from importlib.metadata import version
            report["reference_env"][name] = version({"open_clip": "open_clip_torch", "ImageReward": "image-reward"}[name])
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
    torch.save(inputs, work / "inputs.pt")
    for scorer, r in ref.items():
        report[f"{scorer}_original_load"] = {k: r[k] for k in r if k.startswith("original_") or k in (
            "checkpoint_keys", "preprocess")}
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
        failures += [f"{label}: {name}" for name, passed in checks.items() if not passed]
    ok = not failures
    print("VERIFY_SCORERS", "OK" if ok else "MISMATCH: " + "; ".join(failures), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
