"""HPS v2.1: the OpenCLIP -> transformers converter checked against a plain-torch OpenCLIP forward written
here on the original layout, the full ViT-H-14 key list and shapes (meta tensors), open_clip's
tokenisation and hpsv2's preprocessing, strict loading, and the metric in the registry and `brushnet bench`."""

import argparse
import csv
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from brushnet.evaluation import hps as H
from brushnet.evaluation import metrics as M
from brushnet.evaluation.cli import add_bench_command
from brushnet.masks import rle_encode

MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)

# A tiny OpenCLIP ViT: the real key names, the real shape relations (mlp 4x width, packed q/k/v).
TINY = {"image": 16, "patch": 4, "v_width": 32, "v_layers": 2, "v_heads": 4,
        "context": 77, "vocab": 282, "t_width": 24, "t_layers": 2, "t_heads": 3, "embed": 16}
# OpenCLIP's ViT-H-14 (model_configs/ViT-H-14.json): head width 80 -> 16 vision heads.
VIT_H = {"image": 224, "patch": 14, "v_width": 1280, "v_layers": 32, "v_heads": 16,
         "context": 77, "vocab": 49408, "t_width": 1024, "t_layers": 24, "t_heads": 16, "embed": 1024}


def openclip_shapes(d):
    """key -> shape of OpenCLIP's `CLIP` (ViT tower, default text tower) state dict."""
    def blocks(prefix, width, layers):
        out = {}
        for i in range(layers):
            p = f"{prefix}transformer.resblocks.{i}."
            out |= {p + "ln_1.weight": (width,), p + "ln_1.bias": (width,),
                    p + "attn.in_proj_weight": (3 * width, width), p + "attn.in_proj_bias": (3 * width,),
                    p + "attn.out_proj.weight": (width, width), p + "attn.out_proj.bias": (width,),
                    p + "ln_2.weight": (width,), p + "ln_2.bias": (width,),
                    p + "mlp.c_fc.weight": (4 * width, width), p + "mlp.c_fc.bias": (4 * width,),
                    p + "mlp.c_proj.weight": (width, 4 * width), p + "mlp.c_proj.bias": (width,)}
        return out

    vw, tw, grid = d["v_width"], d["t_width"], d["image"] // d["patch"]
    shapes = {"logit_scale": (),
              "visual.class_embedding": (vw,), "visual.positional_embedding": (grid * grid + 1, vw),
              "visual.proj": (vw, d["embed"]), "visual.conv1.weight": (vw, 3, d["patch"], d["patch"]),
              "visual.ln_pre.weight": (vw,), "visual.ln_pre.bias": (vw,),
              "visual.ln_post.weight": (vw,), "visual.ln_post.bias": (vw,),
              "positional_embedding": (d["context"], tw), "text_projection": (tw, d["embed"]),
              "token_embedding.weight": (d["vocab"], tw), "ln_final.weight": (tw,), "ln_final.bias": (tw,)}
    return shapes | blocks("visual.", vw, d["v_layers"]) | blocks("", tw, d["t_layers"])


def random_openclip(d, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in openclip_shapes(d).items():
        value = torch.randn(shape, generator=g)
        if key.endswith(("ln_1.weight", "ln_2.weight", "ln_pre.weight", "ln_post.weight", "ln_final.weight")):
            value = 1 + 0.1 * value
        elif key in ("visual.proj", "text_projection"):  # used as x @ proj: fan-in first
            value = value / math.sqrt(shape[0])
        elif len(shape) == 2 and "embedding" not in key:  # nn.Linear weights (out, in)
            value = value / math.sqrt(shape[1])
        elif len(shape) == 4:
            value = value / math.sqrt(shape[1] * shape[2] * shape[3])
        elif "embedding" in key:
            value = 0.5 * value
        else:
            value = 0.1 * value
        out[key] = value
    out["logit_scale"] = torch.tensor(math.log(100.0))
    return out


def tiny_config(d=TINY):
    from transformers import CLIPConfig

    text = {"vocab_size": d["vocab"], "hidden_size": d["t_width"], "intermediate_size": 4 * d["t_width"],
            "num_hidden_layers": d["t_layers"], "num_attention_heads": d["t_heads"],
            "max_position_embeddings": d["context"], "hidden_act": "gelu", "layer_norm_eps": 1e-5,
            "bos_token_id": 280, "eos_token_id": 281, "pad_token_id": 0, "projection_dim": d["embed"]}
    vision = {"hidden_size": d["v_width"], "intermediate_size": 4 * d["v_width"], "num_hidden_layers": d["v_layers"],
              "num_attention_heads": d["v_heads"], "image_size": d["image"], "patch_size": d["patch"],
              "hidden_act": "gelu", "layer_norm_eps": 1e-5, "projection_dim": d["embed"]}
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=d["embed"])


# -- the OpenCLIP forward, written out on the original layout ---------------------------------------


def _block(x, sd, p, heads, causal):
    n, length, width = x.shape
    h = F.layer_norm(x, (width,), sd[p + "ln_1.weight"], sd[p + "ln_1.bias"], 1e-5)
    q, k, v = F.linear(h, sd[p + "attn.in_proj_weight"], sd[p + "attn.in_proj_bias"]).split(width, dim=-1)
    q, k, v = (t.reshape(n, length, heads, width // heads).transpose(1, 2) for t in (q, k, v))
    weights = q @ k.transpose(-1, -2) / math.sqrt(width // heads)
    if causal:
        future = torch.ones(length, length, dtype=torch.bool).triu(1)
        weights = weights.masked_fill(future, -math.inf)
    attended = (weights.softmax(-1) @ v).transpose(1, 2).reshape(n, length, width)
    x = x + F.linear(attended, sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"])
    h = F.layer_norm(x, (width,), sd[p + "ln_2.weight"], sd[p + "ln_2.bias"], 1e-5)
    h = F.linear(F.gelu(F.linear(h, sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"])),
                 sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"])
    return x + h


def ref_encode_image(sd, pixels, d):
    x = F.conv2d(pixels, sd["visual.conv1.weight"], stride=d["patch"]).flatten(2).transpose(1, 2)
    cls = sd["visual.class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + sd["visual.positional_embedding"]
    x = F.layer_norm(x, (d["v_width"],), sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"], 1e-5)
    for i in range(d["v_layers"]):
        x = _block(x, sd, f"visual.transformer.resblocks.{i}.", d["v_heads"], causal=False)
    x = F.layer_norm(x[:, 0], (d["v_width"],), sd["visual.ln_post.weight"], sd["visual.ln_post.bias"], 1e-5)
    return x @ sd["visual.proj"]


def ref_encode_text(sd, ids, d):
    x = sd["token_embedding.weight"][ids] + sd["positional_embedding"]
    for i in range(d["t_layers"]):
        x = _block(x, sd, f"transformer.resblocks.{i}.", d["t_heads"], causal=True)
    x = F.layer_norm(x, (d["t_width"],), sd["ln_final.weight"], sd["ln_final.bias"], 1e-5)
    return x[torch.arange(x.shape[0]), ids.argmax(-1)] @ sd["text_projection"]


def _double(sd):
    return {k: v.double() for k, v in sd.items()}


def _random_ids(g, n, lengths, d=TINY):
    ids = torch.zeros(n, d["context"], dtype=torch.long)
    for row, length in enumerate(lengths):
        ids[row, 0] = 280
        ids[row, 1:length + 1] = torch.randint(0, 280, (length,), generator=g)
        ids[row, length + 1] = 281
    return ids


# -- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_dir(golden):
    return golden("sd15_tiny_pipeline").dir / "tokenizer"


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("hps") / "HPS_tiny.pt"
    torch.save({"state_dict": random_openclip(TINY)}, path)
    return path


@pytest.fixture(scope="module")
def scorer(tiny_file, tokenizer_dir):
    return H.HPSv2Score.from_file(tiny_file, tokenizer_dir, config=tiny_config())


# -- the converter ----------------------------------------------------------------------------------


def test_converted_model_matches_the_openclip_forward(scorer):
    sd = random_openclip(TINY)
    ref = _double(sd)
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(3, 3, 16, 16, generator=g)
    ids = _random_ids(g, 3, [0, 5, 75])
    model = scorer.model
    with torch.no_grad():
        image = H._pooled(model.get_image_features(pixel_values=pixels))
        text = H._pooled(model.get_text_features(input_ids=ids))
    expected_image = ref_encode_image(ref, pixels.double(), TINY)
    expected_text = ref_encode_text(ref, ids, TINY)
    assert expected_image.abs().max() > 0.1 and expected_text.abs().max() > 0.1
    torch.testing.assert_close(image.double(), expected_image, rtol=0, atol=1e-5)
    torch.testing.assert_close(text.double(), expected_text, rtol=0, atol=1e-5)
    # The scorer's features are these, normalised; the score is their cosine.
    torch.testing.assert_close(scorer.image_features(pixels).double(), F.normalize(expected_image, dim=-1),
                               rtol=0, atol=1e-5)
    cosine = (F.normalize(expected_image, dim=-1) * F.normalize(expected_text, dim=-1)).sum(-1)
    ours = (scorer.image_features(pixels) * scorer.text_features(ids)).sum(-1)
    torch.testing.assert_close(ours.double(), cosine, rtol=0, atol=1e-5)
    # Padding after the end token cannot change the pooled text (causal attention, as open_clip).
    other_padding = ids.clone()
    other_padding[0, 3:] = 7
    torch.testing.assert_close(scorer.text_features(other_padding)[0], scorer.text_features(ids)[0])
    assert torch.equal(model.logit_scale, sd["logit_scale"])


def test_converter_mapping_details():
    sd = random_openclip(TINY)
    out = H.openclip_to_transformers(sd)
    w = TINY["t_width"]
    packed = sd["transformer.resblocks.1.attn.in_proj_weight"]
    for i, name in enumerate("qkv"):
        assert torch.equal(out[f"text_model.encoder.layers.1.self_attn.{name}_proj.weight"], packed[i * w:(i + 1) * w])
    assert torch.equal(out["visual_projection.weight"], sd["visual.proj"].T)
    assert torch.equal(out["text_projection.weight"], sd["text_projection"].T)
    assert torch.equal(out["vision_model.pre_layrnorm.bias"], sd["visual.ln_pre.bias"])
    assert torch.equal(out["vision_model.encoder.layers.0.mlp.fc2.weight"],
                       sd["visual.transformer.resblocks.0.mlp.c_proj.weight"])
    # A DistributedDataParallel prefix and open_clip's causal-mask buffer are tolerated.
    wrapped = {"module." + k: v for k, v in sd.items()} | {"module.attn_mask": torch.zeros(77, 77)}
    assert H.openclip_to_transformers(wrapped).keys() == out.keys()


def test_full_size_vit_h14_keys_and_shapes():
    from transformers import CLIPModel

    config = H.hps_v21_config()
    assert (config.vision_config.hidden_act, config.text_config.hidden_act) == ("gelu", "gelu")
    assert config.vision_config.layer_norm_eps == config.text_config.layer_norm_eps == 1e-5
    assert config.text_config.eos_token_id == 49407 and config.projection_dim == 1024
    with torch.device("meta"):
        model = CLIPModel(config)
        openclip = {k: torch.empty(s) for k, s in openclip_shapes(VIT_H).items()}
    converted = H.openclip_to_transformers(openclip)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == expected
    # OpenCLIP's ViT-H-14 has 986.11M parameters; the conversion neither adds nor drops one.
    assert sum(math.prod(s) for s in openclip_shapes(VIT_H).values()) == 986_109_441
    assert sum(v.numel() for v in converted.values()) == 986_109_441
    assert model.vision_model.encoder.layers[0].self_attn.head_dim == 80


def test_strict_loading(tmp_path, tokenizer_dir, tiny_file):
    config = tiny_config()

    def load(state_dict):
        path = tmp_path / "x.pt"
        torch.save(state_dict, path)
        return H.HPSv2Score.from_file(path, tokenizer_dir, config=config)

    sd = random_openclip(TINY)
    partial = dict(sd)
    del partial["visual.ln_post.bias"]
    with pytest.raises(ValueError, match="missing 1 key.*vision_model.post_layernorm.bias"):
        load(partial)
    with pytest.raises(ValueError, match="unexpected 1 key.*visual.transformer.resblocks.0.ls_1.gamma"):
        load(sd | {"visual.transformer.resblocks.0.ls_1.gamma": torch.ones(32)})
    with pytest.raises(ValueError, match="wrong shape.*text_model.embeddings.position_embedding.weight"):
        load(sd | {"positional_embedding": torch.zeros(76, 24)})
    with pytest.raises(ValueError, match="HPS v2.1 checkpoint.*does not exist"):
        H.HPSv2Score.from_file(tmp_path / "nope.pt", tokenizer_dir, config=config)
    # A float16 file without the {"state_dict": ...} wrapper, with prefixes: loads, as float32.
    half = load({"module." + k: v.half() for k, v in sd.items()})
    assert all(p.dtype == torch.float32 for p in half.model.parameters())
    assert not any(t.is_meta for t in [*half.model.parameters(), *half.model.buffers()])
    assert torch.equal(half.model.text_model.embeddings.position_ids, torch.arange(77)[None])
    with pytest.raises(ValueError, match="CLIP tokenizer folder .* does not exist"):
        H.HPSv2Score.from_file(tiny_file, tmp_path / "none", config=config)


# -- tokenisation and preprocessing -----------------------------------------------------------------


def test_tokenization_as_open_clip(scorer):
    tok = scorer.tokenizer
    words = tok("a cat", add_special_tokens=False)["input_ids"]
    ids = scorer.tokenize(["a cat"])
    assert ids.shape == (1, 77) and ids.dtype == torch.long
    assert ids[0, :len(words) + 2].tolist() == [280, *words, 281] and not ids[0, len(words) + 2:].any()
    # open_clip's cleaning: HTML entities, whitespace, case.
    assert torch.equal(scorer.tokenize(["  A   &amp;amp;\n CAT "]), scorer.tokenize(["a & cat"]))
    # Special-token text in a caption is text, as for open_clip.
    assert 281 not in scorer.tokenize(["a <|endoftext|> cat"])[0, 1:4].tolist()
    # Too long: cut to 77, the last token replaced by the end token.
    long = scorer.tokenize(["a cat " * 60])[0]
    full = tok("a cat " * 60, add_special_tokens=False)["input_ids"]
    assert long.tolist() == [280, *full[:75], 281]
    # transformers pools at the first end token, open_clip at the argmax of the ids: the same position.
    assert scorer.model.text_model.eos_token_id == 281 == max(tok.get_vocab().values())


def test_missing_ftfy_is_reported_for_non_ascii_captions(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ftfy", None)  # as if it were not installed: import raises ImportError
    monkeypatch.setattr(H, "_warned_ftfy", False)
    assert H.clean_caption("  A   &amp;amp;  Cat ") == "a & cat"
    with pytest.warns(UserWarning, match="ftfy is not installed"):
        H.clean_caption("caf\u00e9")


def test_preprocessing_as_hpsv2():
    rng = np.random.default_rng(0)
    square = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    tensor = torch.from_numpy(np.asarray(square).copy()).permute(2, 0, 1).float() / 255
    resized = F.interpolate(tensor[None], size=(16, 16), mode="bicubic", align_corners=False, antialias=True)
    torch.testing.assert_close(H.hps_preprocess(square, 16), (resized - MEAN) / STD, rtol=0, atol=1e-6)
    no_aa = F.interpolate(tensor[None], size=(16, 16), mode="bicubic", align_corners=False, antialias=False)
    torch.testing.assert_close(H.hps_preprocess(square, 16, antialias=False), (no_aa - MEAN) / STD, rtol=0, atol=1e-6)
    assert not torch.allclose(H.hps_preprocess(square, 16), H.hps_preprocess(square, 16, antialias=False))
    # Not square: the longest side to 16 (40x25 -> 16x10), black padding split 3 above / 3 below.
    wide = Image.fromarray(rng.integers(0, 256, (25, 40, 3), dtype=np.uint8))
    pixels = H.hps_preprocess(wide, 16)
    black = (torch.zeros(3, 1, 1) - MEAN) / STD
    assert pixels.shape == (1, 3, 16, 16)
    assert torch.allclose(pixels[0, :, :3], black.expand(3, 3, 16))
    assert torch.allclose(pixels[0, :, 13:], black.expand(3, 3, 16))
    inner = F.interpolate(torch.from_numpy(np.asarray(wide).copy()).permute(2, 0, 1).float()[None] / 255,
                          size=(10, 16), mode="bicubic", align_corners=False, antialias=True)
    torch.testing.assert_close(pixels[:, :, 3:13], (inner - MEAN) / STD, rtol=0, atol=1e-6)
    # Already 16 on its longest side: no resize; RGBA and grey images are made RGB.
    exact = Image.fromarray(rng.integers(0, 256, (16, 16, 4), dtype=np.uint8), "RGBA")
    rgb = torch.from_numpy(np.asarray(exact.convert("RGB")).copy()).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(H.hps_preprocess(exact, 16)[0], (rgb - MEAN) / STD)


# -- the score --------------------------------------------------------------------------------------


def test_score_properties(scorer):
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8))
    other = Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8))
    captions = ["a cat", "a red ball on the grass", "a cat"]
    scores = scorer([image, image, image], captions)
    assert scores.shape == (3,) and scores.dtype == torch.float32
    assert scores[0] != scores[1] and scores[0] == scores[2]
    assert torch.equal(scorer([image, image, image], captions), scores)  # deterministic
    # Alone or in a batch: the same up to float32 rounding (the matrix products are blocked differently).
    assert scorer.score(image, "a cat") == pytest.approx(float(scores[0]), abs=1e-6)
    assert scorer.score(other, "a cat") != float(scores[0])
    assert ((scores >= -1) & (scores <= 1)).all()
    # The definition: cosine of the OpenCLIP embeddings of hpsv2's preprocessed image and open_clip's tokens.
    ref = _double(random_openclip(TINY))
    i = F.normalize(ref_encode_image(ref, H.hps_preprocess(image, 16).double(), TINY), dim=-1)
    t = F.normalize(ref_encode_text(ref, scorer.tokenize(["a red ball on the grass"]), TINY), dim=-1)
    assert float(scores[1]) == pytest.approx(float((i * t).sum()), abs=1e-5)
    with pytest.raises(ValueError, match="2 images but 1 captions"):
        scorer([image, image], ["a cat"])
    with pytest.raises(TypeError):
        scorer(image, "a cat")


# -- the registry and brushnet bench ---------------------------------------------------------------


def test_registry_selects_and_builds_hps(monkeypatch, tiny_file, tokenizer_dir):
    assert M.resolve_metrics("auto", {"clip": "x", "hps": "y"}) == ["hps", "psnr", "mse", "clip"]
    assert M.resolve_metrics("hps,psnr", {"clip": "x", "hps": "y"}) == ["hps", "psnr"]
    with pytest.raises(ValueError, match="hps needs --clip-model.*hps needs --hps-weights"):
        M.resolve_metrics("hps")
    with pytest.raises(ValueError, match="hps needs --clip-model"):
        M.resolve_metrics("auto", {"hps": "y"})
    assert M.METRICS["hps"].paper_scale == 100 and M.METRICS["hps"].higher_is_better and "hps" not in M.PLANNED

    monkeypatch.setattr(H, "hps_v21_config", tiny_config)
    scorers = M.build_scorers(["hps"], {"clip": str(tokenizer_dir), "hps": str(tiny_file)})
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    sample = M.Sample("0", "a cat", image, image, np.ones((32, 32), bool))
    reference = H.HPSv2Score.from_file(tiny_file, tokenizer_dir, config=tiny_config())
    assert scorers["hps"](sample) == reference.score(image, "a cat")


def test_bench_command_scores_hps(monkeypatch, tmp_path, tiny_file, tokenizer_dir):
    monkeypatch.setattr(H, "hps_v21_config", tiny_config)
    grid = 32
    root = tmp_path / "bench"
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(3)
    mapping = {}
    for i, caption in enumerate(["a cat", "a red ball"]):
        Image.fromarray(rng.integers(0, 256, (grid, grid, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
        hole = np.zeros((grid, grid), bool)
        hole[4:12, 4:20] = True
        mapping[str(i)] = {"image": f"images/{i}.png", "caption": caption,
                           "inpainting_mask": rle_encode(hole, order="C")}
    (root / "mapping_file.json").write_text(json.dumps(mapping))
    parser = argparse.ArgumentParser()
    add_bench_command(parser.add_subparsers())
    out = tmp_path / "out"
    args = parser.parse_args(["bench", str(root), "--images", str(root / "images"), "--out", str(out),
                              "--hps-weights", str(tiny_file), "--clip-model", str(tokenizer_dir), "--metrics",
                              "psnr,hps", "--grid", str(grid), "--device", "cpu", "--no-gallery"])
    assert args.func(args) == 0
    with open(out / "per_image.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    reference = H.HPSv2Score.from_file(tiny_file, tokenizer_dir, config=tiny_config())
    for row in rows:
        image = Image.open(root / "images" / f"{row['id']}.png")
        assert float(row["hps"]) == pytest.approx(reference.score(image, row["caption"]), abs=1e-6)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metrics"]["hps"]["paper_value"] == pytest.approx(100 * summary["metrics"]["hps"]["mean"])
    assert "HPS (×10²)" in (out / "summary.md").read_text()
