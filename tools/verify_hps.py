"""Compare brushnet's HPS v2.1 port with the original open_clip on random ViT-H-14 weights.

Meant for the GPU machine, which has torch, torchvision and transformers but not open_clip: carry
the wheels of open_clip_torch, ftfy and wcwidth in .whl/ and install them into a scratch folder:

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 -d .whl open_clip_torch ftfy wcwidth      # here, once
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \\
        .whl/open_clip_torch-*.whl .whl/ftfy-*.whl .whl/wcwidth-*.whl
    PYTHONPATH=/tmp/site:$PWD/src python3 tools/verify_hps.py [--out DIR]

What it does, with one seed:
1. `open_clip.create_model("ViT-H-14", pretrained=None)`: random weights, rounded to float16 and
   saved as `{"state_dict": ...}` in float16, like HPS_v2.1_compressed.pt (so both sides hold the
   same values); our `HPSv2Score.from_file` loads that file through `openclip_to_transformers`.
2. Tokens: a transformers CLIPTokenizer folder written from open_clip's own BPE tables
   (`SimpleTokenizer.encoder` / `bpe_ranks`, i.e. bpe_simple_vocab_16e6.txt.gz) versus
   `open_clip.get_tokenizer("ViT-H-14")` on a set of captions: the ids must be identical.
3. Preprocessing: hpsv2's evaluation transform (image_transform(..., resize_longest_max=True):
   ToTensor, ResizeMaxSize(224, fill=0) on the tensor with torchvision's bicubic resize, Normalize),
   written with torchvision's functions, versus our `hps_preprocess`.
4. Features and scores: open_clip's `encode_image/encode_text(normalize=True)` and
   `diag(image_features @ text_features.T)` versus ours, on the same pixels and tokens, in float32
   (TF32 off); then end to end (PIL images and captions in, scores out); and open_clip under
   `torch.autocast("cuda", torch.float16)` as hpsv2 runs it, for scale.
Prints the max abs differences and writes them to DIR/verify_hps.json with --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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
    "  multiple   spaces\tand\nnew lines  ",
    "Caf\u00e9 &amp; cr\u00e8me br\u00fbl\u00e9e \u2014 \u201cquoted\u201d text, it's 12:30 (numbers 1234) #tag $5 100%",
    "a close-up of a Shiba-Inu dog's face, wearing sunglasses; digital art by greg rutkowski",
    "\u4e00\u53ea\u732b and emoji \U0001F600 mixed",
    ("\ufb01ne ligature, Stra\u00dfe \u00c4\u00d6\u00dc, mojibake caf\u00c3\u00a9, "
     "\uff26\uff35\uff2c\uff2c\uff37\uff29\uff24\uff34\uff28 width"),
    "a <|endoftext|> written in the caption",
    "a very long caption " + "with many repeated words and details about colours, light and texture " * 8,
]


def write_clip_tokenizer(encoder: dict, bpe_ranks: dict, folder: Path) -> Path:
    """A transformers CLIPTokenizer folder (vocab.json, merges.txt, tokenizer_config.json) from open_clip's
    SimpleTokenizer tables; open_clip names the special tokens <start_of_text>/<end_of_text>."""
    renames = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {renames.get(token, token): index for token, index in encoder.items()}
    merges = [" ".join(pair) for pair, _ in sorted(bpe_ranks.items(), key=lambda item: item[1])]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = {"tokenizer_class": "CLIPTokenizer", "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
              "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "model_max_length": 77}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def hpsv2_preprocess(image: Image.Image, size: int = 224) -> torch.Tensor:
    """hpsv2's evaluation transform (its vendored open_clip's image_transform with resize_longest_max=True),
    written with torchvision's functions; torchvision's own default for the tensor resize's antialias."""
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    tensor = TF.to_tensor(image.convert("RGB"))
    height, width = tensor.shape[1:]
    scale = size / float(max(height, width))
    if scale != 1.0:
        new_size = [round(height * scale), round(width * scale)]
        tensor = TF.resize(tensor, new_size, InterpolationMode.BICUBIC)
        pad_h, pad_w = size - new_size[0], size - new_size[1]
        tensor = TF.pad(tensor, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)
    return TF.normalize(tensor, mean, std)[None]


def test_images(seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    images = []
    for width, height in [(512, 512), (512, 512), (640, 480), (300, 500)]:
        y, x = np.mgrid[0:height, 0:width]
        base = np.stack([255 * x / width, 255 * y / height, 127 * (np.sin(x / 17.0) + np.cos(y / 23.0) + 2) / 2], -1)
        noise = rng.normal(0, 25, (height, width, 3))
        images.append(Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)))
    return images


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double().cpu() - b.detach().double().cpu()).abs().max())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="folder for verify_hps.json")
    parser.add_argument("--workdir", help="scratch folder (default: a temporary one)")
    parser.add_argument("--no-torchvision", action="store_true", help="skip the preprocessing comparison")
    args = parser.parse_args(argv)

    import open_clip

    from brushnet.evaluation.hps import HPSv2Score, hps_preprocess

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device(args.device)
    report: dict = {"device": str(torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()),
                    "torch": torch.__version__, "open_clip": open_clip.__version__, "python": sys.version.split()[0]}
    try:
        import torchvision
        import transformers

        report |= {"torchvision": torchvision.__version__, "transformers": transformers.__version__}
    except ImportError:
        pass
    print(json.dumps(report), flush=True)
    clock = time.time()

    def step(message):
        print(f"[{time.time() - clock:6.1f}s] {message}", flush=True)

    scratch = Path(args.workdir or tempfile.mkdtemp(prefix="verify_hps_"))
    scratch.mkdir(parents=True, exist_ok=True)

    # 1. Random ViT-H-14, rounded to float16 and saved as HPS_v2.1_compressed.pt is.
    torch.manual_seed(args.seed)
    reference = open_clip.create_model("ViT-H-14", pretrained=None)
    with torch.no_grad():
        for tensor in reference.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(tensor.half().float())
    reference = reference.to(device).eval()
    state = {k: v.detach().half().cpu() for k, v in reference.state_dict().items()}
    report["openclip_keys"] = len(state)
    report["openclip_params"] = sum(p.numel() for p in reference.parameters())
    checkpoint = scratch / "HPS_random_vit_h14.pt"
    torch.save({"state_dict": state}, checkpoint)
    del state
    step(f"open_clip ViT-H-14 built ({report['openclip_params']} parameters), saved to {checkpoint}")

    # 2. Tokens.
    oc_tokenizer = open_clip.get_tokenizer("ViT-H-14")
    tokenizer_dir = write_clip_tokenizer(oc_tokenizer.encoder, oc_tokenizer.bpe_ranks, scratch / "tokenizer")
    ours = HPSv2Score.from_file(checkpoint, tokenizer_dir, device)
    step("our HPSv2Score loaded from the file")
    oc_ids = oc_tokenizer(CAPTIONS)
    our_ids = ours.tokenize(CAPTIONS)
    mismatched = [i for i in range(len(CAPTIONS)) if not torch.equal(oc_ids[i], our_ids[i])]
    report["token_rows_mismatched"] = len(mismatched)
    for i in mismatched:
        print(f"  token mismatch for {CAPTIONS[i]!r}:\n    open_clip {oc_ids[i].tolist()}\n    ours      "
              f"{our_ids[i].tolist()}", flush=True)
    step(f"tokens: {len(CAPTIONS) - len(mismatched)}/{len(CAPTIONS)} captions identical")

    # 3. Preprocessing.
    images = test_images(args.seed)
    if not args.no_torchvision:
        diffs = [max_abs(hpsv2_preprocess(im), hps_preprocess(im)) for im in images]
        no_aa = [max_abs(hpsv2_preprocess(im), hps_preprocess(im, antialias=False)) for im in images]
        report["preprocess_max_abs_diff"] = max(diffs)
        report["preprocess_max_abs_diff_antialias_false"] = max(no_aa)
        step(f"preprocessing vs torchvision: max abs diff {max(diffs):.3e} (antialias=True), "
             f"{max(no_aa):.3e} (antialias=False)")
        pixels = torch.cat([hpsv2_preprocess(im) for im in images])
    else:
        pixels = torch.cat([hps_preprocess(im) for im in images])
    pixels = pixels.to(device)

    # 4. Features and scores, same inputs (one caption per image: the first four captions, then the rest).
    n = len(images)
    ids = oc_ids.to(device)
    with torch.no_grad():  # open_clip's normalize=True is F.normalize(features, dim=-1)
        oc_image_raw = reference.encode_image(pixels)
        oc_text_raw = reference.encode_text(ids)
        oc_image = torch.nn.functional.normalize(oc_image_raw, dim=-1)
        oc_text = torch.nn.functional.normalize(oc_text_raw, dim=-1)
    our_image = ours.image_features(pixels)
    our_text = ours.text_features(ids)
    with torch.no_grad():
        our_image_raw = ours.model.get_image_features(pixel_values=pixels).pooler_output
        our_text_raw = ours.model.get_text_features(input_ids=ids).pooler_output
    oc_scores = torch.diagonal(oc_image @ oc_text[:n].T)
    our_scores = (our_image * our_text[:n]).sum(-1)
    oc_all = oc_image @ oc_text.T  # every image against every caption
    our_all = our_image @ our_text.T
    report |= {
        "image_features_max_abs_diff": max_abs(oc_image, our_image),
        "text_features_max_abs_diff": max_abs(oc_text, our_text),
        "image_features_unnormalised_max_abs_diff": max_abs(oc_image_raw, our_image_raw),
        "image_features_unnormalised_max_abs": float(oc_image_raw.abs().max()),
        "text_features_unnormalised_max_abs_diff": max_abs(oc_text_raw, our_text_raw),
        "text_features_unnormalised_max_abs": float(oc_text_raw.abs().max()),
        "scores_max_abs_diff": max_abs(oc_scores, our_scores),
        "score_matrix_max_abs_diff": max_abs(oc_all, our_all),
        "openclip_scores": [round(float(s), 6) for s in oc_scores],
        "score_matrix_range": [float(oc_all.min()), float(oc_all.max())],
    }
    step("features and scores compared (same pixels and tokens)")

    # End to end: PIL images and captions in; open_clip fed by torchvision's transform and its tokenizer.
    captions = CAPTIONS[:n]
    end_to_end = ours(images, captions)
    if not args.no_torchvision:
        with torch.no_grad():
            reference_pixels = torch.cat([hpsv2_preprocess(im) for im in images]).to(device)
            e2e_image = reference.encode_image(reference_pixels, normalize=True)
            e2e_text = reference.encode_text(oc_tokenizer(captions).to(device), normalize=True)
            e2e_reference = torch.diagonal(e2e_image @ e2e_text.T)
            report["end_to_end_scores_max_abs_diff"] = max_abs(e2e_reference, end_to_end)
            if device.type == "cuda":  # hpsv2 runs the model under CUDA autocast (float16)
                with torch.autocast("cuda", dtype=torch.float16):
                    amp_image = reference.encode_image(reference_pixels, normalize=True)
                    amp_text = reference.encode_text(oc_tokenizer(captions).to(device), normalize=True)
                    amp_scores = torch.diagonal(amp_image @ amp_text.T)
                report["autocast_fp16_vs_our_fp32_scores_max_abs_diff"] = max_abs(amp_scores.float(), end_to_end)
        step("end to end compared")
    report["seconds"] = round(time.time() - clock, 1)

    print(json.dumps(report, indent=1), flush=True)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "verify_hps.json").write_text(json.dumps(report, indent=1))
    if not args.workdir:
        for path in sorted(scratch.rglob("*"), reverse=True):
            path.unlink() if path.is_file() else path.rmdir()
        scratch.rmdir()
    ok = (report["token_rows_mismatched"] == 0 and report["scores_max_abs_diff"] < 1e-4
          and report["image_features_max_abs_diff"] < 1e-4 and report["text_features_max_abs_diff"] < 1e-4)
    print("VERIFY_HPS", "OK" if ok else "MISMATCH", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
