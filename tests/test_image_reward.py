"""ImageReward v1.0: the ImageReward -> transformers (BlipVisionModel + BlipTextModel) converter checked against a
plain-torch forward of BLIP's VisionTransformer, BLIP's med.BertModel (cross-attention) and ImageReward's MLP
written here on the original layout; the full ViT-L/16 + BERT-base key list and shapes (meta tensors); BLIP's
tokenizer on a tiny WordPiece vocabulary; ImageReward's preprocessing; strict loading."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from brushnet.evaluation import image_reward as R
from brushnet.evaluation.weights import check_keys

WORDS = ["a", "cat", "dog", "on", "the", "red", "blue", "sofa", "in", "garden", "photo", "of", "##s", "sitting",
         "green", "house", "car", ",", "."]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
TINY_VOCAB = len(SPECIALS) + len(WORDS) + 2  # + [DEC], [ENC]

# Tiny widths with the real key names and shape relations (packed qkv, 4x MLP, cross-attention from the image).
TINY = {"image": 32, "patch": 8, "v_width": 32, "v_layers": 2, "v_heads": 4,
        "vocab": TINY_VOCAB, "positions": 40, "t_width": 24, "t_layers": 2, "t_heads": 3, "embed": 16}
# ImageReward v1.0: BLIP ViT-L/16 at 224 (create_vit('large')) and med_config.json's BERT-base.
FULL = {"image": 224, "patch": 16, "v_width": 1024, "v_layers": 24, "v_heads": 16,
        "vocab": 30524, "positions": 512, "t_width": 768, "t_layers": 12, "t_heads": 12, "embed": 256}
HEAD = [(1024, None), (128, 1024), (64, 128), (16, 64), (1, 16)]  # (out, in); the first in is the text width
HEAD_INDICES = [0, 2, 4, 6, 7]


def original_shapes(d):
    """key -> shape of the ImageReward module's state dict (ImageReward.pt layout)."""
    vw, tw, grid = d["v_width"], d["t_width"], d["image"] // d["patch"]
    out = {"blip.visual_encoder.cls_token": (1, 1, vw), "blip.visual_encoder.pos_embed": (1, grid * grid + 1, vw),
           "blip.visual_encoder.patch_embed.proj.weight": (vw, 3, d["patch"], d["patch"]),
           "blip.visual_encoder.patch_embed.proj.bias": (vw,),
           "blip.visual_encoder.norm.weight": (vw,), "blip.visual_encoder.norm.bias": (vw,)}
    for i in range(d["v_layers"]):
        p = f"blip.visual_encoder.blocks.{i}."
        out |= {p + "norm1.weight": (vw,), p + "norm1.bias": (vw,),
                p + "attn.qkv.weight": (3 * vw, vw), p + "attn.qkv.bias": (3 * vw,),
                p + "attn.proj.weight": (vw, vw), p + "attn.proj.bias": (vw,),
                p + "norm2.weight": (vw,), p + "norm2.bias": (vw,),
                p + "mlp.fc1.weight": (4 * vw, vw), p + "mlp.fc1.bias": (4 * vw,),
                p + "mlp.fc2.weight": (vw, 4 * vw), p + "mlp.fc2.bias": (vw,)}
    t = "blip.text_encoder."
    out |= {t + "embeddings.word_embeddings.weight": (d["vocab"], tw),
            t + "embeddings.position_embeddings.weight": (d["positions"], tw),
            t + "embeddings.LayerNorm.weight": (tw,), t + "embeddings.LayerNorm.bias": (tw,)}
    for i in range(d["t_layers"]):
        p = f"{t}encoder.layer.{i}."
        for part, kv_width in (("attention", tw), ("crossattention", vw)):
            out |= {f"{p}{part}.self.query.weight": (tw, tw), f"{p}{part}.self.query.bias": (tw,),
                    f"{p}{part}.self.key.weight": (tw, kv_width), f"{p}{part}.self.key.bias": (tw,),
                    f"{p}{part}.self.value.weight": (tw, kv_width), f"{p}{part}.self.value.bias": (tw,),
                    f"{p}{part}.output.dense.weight": (tw, tw), f"{p}{part}.output.dense.bias": (tw,),
                    f"{p}{part}.output.LayerNorm.weight": (tw,), f"{p}{part}.output.LayerNorm.bias": (tw,)}
        out |= {p + "intermediate.dense.weight": (4 * tw, tw), p + "intermediate.dense.bias": (4 * tw,),
                p + "output.dense.weight": (tw, 4 * tw), p + "output.dense.bias": (tw,),
                p + "output.LayerNorm.weight": (tw,), p + "output.LayerNorm.bias": (tw,)}
    out |= {"blip.vision_proj.weight": (d["embed"], vw), "blip.vision_proj.bias": (d["embed"],),
            "blip.text_proj.weight": (d["embed"], tw), "blip.text_proj.bias": (d["embed"],)}
    for index, (n_out, n_in) in zip(HEAD_INDICES, HEAD):
        out |= {f"mlp.layers.{index}.weight": (n_out, n_in or tw), f"mlp.layers.{index}.bias": (n_out,)}
    return out


def random_original(d=TINY, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in original_shapes(d).items():
        value = torch.randn(shape, generator=g)
        if "norm" in key.lower() and key.endswith(".weight"):
            value = 1 + 0.1 * value
        elif len(shape) == 2 and "embeddings" not in key:  # nn.Linear (out, in)
            value = value / math.sqrt(shape[1])
        elif len(shape) == 4:
            value = value / math.sqrt(shape[1] * shape[2] * shape[3])
        elif key.endswith(("cls_token", "pos_embed")) or "embeddings" in key:
            value = 0.5 * value
        else:
            value = 0.1 * value
        out[key] = value
    # older transformers saved med.py's position_ids buffer with the embeddings
    out["blip.text_encoder.embeddings.position_ids"] = torch.arange(d["positions"])[None]
    return out


def tiny_configs(d=TINY):
    return R.image_reward_configs(
        vision={"hidden_size": d["v_width"], "intermediate_size": 4 * d["v_width"], "num_hidden_layers": d["v_layers"],
                "num_attention_heads": d["v_heads"], "image_size": d["image"], "patch_size": d["patch"]},
        text={"vocab_size": d["vocab"], "hidden_size": d["t_width"], "intermediate_size": 4 * d["t_width"],
              "num_hidden_layers": d["t_layers"], "num_attention_heads": d["t_heads"],
              "max_position_embeddings": d["positions"], "bos_token_id": d["vocab"] - 2, "sep_token_id": 3})


# -- the original forward, written out on the original layout ---------------------------------------


def _attention(q_in, kv_in, sd, p, heads, mask=None):
    """Multi-head attention with separate query/key/value Linear layers (med.py's BertSelfAttention)."""
    n, lq, width = q_in.shape
    head = width // heads
    q = F.linear(q_in, sd[p + "query.weight"], sd[p + "query.bias"]).view(n, lq, heads, head).transpose(1, 2)
    k = F.linear(kv_in, sd[p + "key.weight"], sd[p + "key.bias"]).view(n, -1, heads, head).transpose(1, 2)
    v = F.linear(kv_in, sd[p + "value.weight"], sd[p + "value.bias"]).view(n, -1, heads, head).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(head)
    if mask is not None:  # med.py's extended mask: (1 - mask) * -10000
        scores = scores + (1.0 - mask[:, None, None, :].to(scores.dtype)) * -10000.0
    return (scores.softmax(-1) @ v).transpose(1, 2).reshape(n, lq, width)


def ref_visual_encoder(sd, pixels, d):
    """BLIP's VisionTransformer.forward: patches + cls + pos_embed, pre-norm blocks (eps 1e-6), final norm."""
    p0, width, heads = "blip.visual_encoder.", d["v_width"], d["v_heads"]
    x = F.conv2d(pixels, sd[p0 + "patch_embed.proj.weight"], sd[p0 + "patch_embed.proj.bias"], stride=d["patch"])
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd[p0 + "cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + sd[p0 + "pos_embed"]
    n, length, _ = x.shape
    for i in range(d["v_layers"]):
        p = f"{p0}blocks.{i}."
        h = F.layer_norm(x, (width,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], 1e-6)
        qkv = F.linear(h, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"])
        qkv = qkv.reshape(n, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1) * (width // heads) ** -0.5).softmax(-1)
        h = (attn @ v).transpose(1, 2).reshape(n, length, width)
        x = x + F.linear(h, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        h = F.layer_norm(x, (width,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], 1e-6)
        h = F.linear(F.gelu(F.linear(h, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])),
                     sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
        x = x + h
    return F.layer_norm(x, (width,), sd[p0 + "norm.weight"], sd[p0 + "norm.bias"], 1e-6)


def ref_text_encoder(sd, ids, mask, image_embeds, d):
    """med.py's BertModel (mode='multimodal'): embeddings + LayerNorm, post-norm layers with self-attention,
    cross-attention to all image tokens, GELU MLP; LayerNorm eps 1e-12."""
    t, width = "blip.text_encoder.", d["t_width"]

    def add_norm(h, residual, p):
        return F.layer_norm(h + residual, (width,), sd[p + "LayerNorm.weight"], sd[p + "LayerNorm.bias"], 1e-12)

    x = sd[t + "embeddings.word_embeddings.weight"][ids] + sd[t + "embeddings.position_embeddings.weight"][:ids.shape[1]]
    x = F.layer_norm(x, (width,), sd[t + "embeddings.LayerNorm.weight"], sd[t + "embeddings.LayerNorm.bias"], 1e-12)
    for i in range(d["t_layers"]):
        p = f"{t}encoder.layer.{i}."
        h = _attention(x, x, sd, p + "attention.self.", d["t_heads"], mask)
        x = add_norm(F.linear(h, sd[p + "attention.output.dense.weight"], sd[p + "attention.output.dense.bias"]), x,
                     p + "attention.output.")
        h = _attention(x, image_embeds, sd, p + "crossattention.self.", d["t_heads"],
                       torch.ones(image_embeds.shape[:2], dtype=torch.long))
        x = add_norm(F.linear(h, sd[p + "crossattention.output.dense.weight"],
                              sd[p + "crossattention.output.dense.bias"]), x, p + "crossattention.output.")
        h = F.gelu(F.linear(x, sd[p + "intermediate.dense.weight"], sd[p + "intermediate.dense.bias"]))
        x = add_norm(F.linear(h, sd[p + "output.dense.weight"], sd[p + "output.dense.bias"]), x, p + "output.")
    return x


def ref_image_reward(sd, pixels, ids, mask, d=TINY):
    """ImageReward.score: first token of the image-grounded text encoder -> MLP (no activations) -> normalise."""
    txt = ref_text_encoder(sd, ids, mask, ref_visual_encoder(sd, pixels, d), d)[:, 0, :]
    for index in HEAD_INDICES:
        txt = F.linear(txt, sd[f"mlp.layers.{index}.weight"], sd[f"mlp.layers.{index}.bias"])
    return (txt[:, 0] - 0.16717362830052426) / 1.0333394966054072


def _double(sd):
    return {k: v.double() if v.is_floating_point() else v for k, v in sd.items()}


# -- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bert_tokenizer")
    (folder / "vocab.txt").write_text("\n".join(SPECIALS + WORDS) + "\n")
    return folder


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("image_reward") / "ImageReward_tiny.pt"
    torch.save(random_original(TINY), path)
    return path


@pytest.fixture(scope="module")
def scorer(tiny_file, tokenizer_dir):
    return R.ImageRewardScore.from_file(tiny_file, tokenizer_dir, configs=tiny_configs())


CAPTIONS = ["a cat sitting on the red sofa", "a photo of dogs in the garden, blue car.", "house"]


def _images():
    rng = np.random.default_rng(0)
    sizes = [(48, 40), (40, 56), (32, 32)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


# -- tests ------------------------------------------------------------------------------------------


def test_converted_model_matches_the_original_forward(scorer):
    ref = _double(random_original(TINY))
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(3, 3, TINY["image"], TINY["image"], generator=g)
    ids, mask = scorer.tokenize(CAPTIONS)
    assert (mask == 0).any() and (mask == 1).any()  # padding is masked
    with torch.no_grad():
        ours = scorer.model(pixels, ids, mask)
        embeds = scorer.model.image_embeds(pixels)
    expected_embeds = ref_visual_encoder(ref, pixels.double(), TINY)
    torch.testing.assert_close(embeds.double(), expected_embeds, rtol=0, atol=1e-5)
    expected = ref_image_reward(ref, pixels.double(), ids, mask)
    assert expected.abs().max() > 0.1 and expected.std() > 0.01
    torch.testing.assert_close(ours.double(), expected, rtol=0, atol=1e-5)
    # The end-to-end scorer (preprocessing + tokenisation + model) is the reference on the same inputs.
    images = _images()
    pixels = torch.cat([R.image_reward_preprocess(im, TINY["image"]) for im in images])
    torch.testing.assert_close(scorer(images, CAPTIONS).double(), ref_image_reward(ref, pixels.double(), ids, mask),
                               rtol=0, atol=1e-5)


def test_score_changes_with_caption_and_image(scorer):
    images = _images()
    one = scorer([images[0]] * 3, CAPTIONS)
    assert one.dtype == torch.float32 and one.shape == (3,)
    assert (one[0] - one[1]).abs() > 1e-4 and (one[1] - one[2]).abs() > 1e-4
    other = scorer(images, [CAPTIONS[0]] * 3)
    assert (other[0] - other[1]).abs() > 1e-4
    # batching does not change a score; the padding after [SEP] is masked
    assert scorer.score(images[0], CAPTIONS[1]) == pytest.approx(float(one[1]), abs=1e-5)
    assert scorer([], []).shape == (0,)
    with pytest.raises(ValueError, match="2 images but 1 captions"):
        scorer(images[:2], CAPTIONS[:1])
    with pytest.raises(TypeError):
        scorer(images[0], CAPTIONS[0])


def test_tokenizer_as_blip(scorer):
    tok = scorer.tokenizer
    n = len(SPECIALS) + len(WORDS)
    assert tok.convert_tokens_to_ids("[DEC]") == n and tok.enc_token_id == n + 1 == TINY_VOCAB - 1
    assert tok.bos_token == "[DEC]" and len(tok) == TINY_VOCAB
    ids, mask = scorer.tokenize(["A Cat on the sofa", " ".join(["cat"] * 50)])
    assert ids.shape == mask.shape == (2, 35)
    cls, sep = tok.convert_tokens_to_ids("[CLS]"), tok.convert_tokens_to_ids("[SEP]")
    words = [tok.convert_tokens_to_ids(w) for w in ["a", "cat", "on", "the", "sofa"]]
    assert ids[0, :7].tolist() == [cls, *words, sep] and ids[0, 7:].eq(0).all()  # lower-cased, padded with [PAD]
    assert mask[0].tolist() == [1] * 7 + [0] * 28
    assert ids[1, 0] == cls and ids[1, -1] == sep and mask[1].all()  # truncated to 35 with [SEP] last
    # ImageReward.score keeps [CLS] first; enc_token=True is BLIP's ITM convention ([ENC] first).
    enc = R.ImageRewardScore(scorer.model, tok, enc_token=True)
    assert enc.tokenize(["a cat"])[0][0, 0] == tok.enc_token_id
    assert enc([_images()[0]], ["a cat"]) != scorer([_images()[0]], ["a cat"])


def test_preprocessing_as_image_reward_transform():
    rng = np.random.default_rng(3)
    array = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)  # H 50, W 70
    image = Image.fromarray(array)
    out = R.image_reward_preprocess(image, 32)
    assert out.shape == (1, 3, 32, 32) and out.dtype == torch.float32
    # torchvision Resize(32): short side 32, long int(32 * 70 / 50) = 44; CenterCrop: left round(6.0) = 6.
    resized = np.asarray(image.resize((44, 32), Image.BICUBIC), dtype=np.float32)[:, 6:38] / 255.0
    mean = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
    std = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
    expected = torch.from_numpy((resized - mean) / std).permute(2, 0, 1)
    torch.testing.assert_close(out[0], expected, rtol=0, atol=1e-6)
    # Odd margin: W 45 -> crop left round(6.5) = 6 (Python rounds half to even, as torchvision's CenterCrop).
    image = Image.fromarray(rng.integers(0, 256, (32, 45, 3), dtype=np.uint8))
    expected = np.asarray(image, dtype=np.float32)[:, 6:38] / 255.0  # already 32 high: not resized
    torch.testing.assert_close(R.image_reward_preprocess(image, 32)[0],
                               torch.from_numpy((expected - mean) / std).permute(2, 0, 1), rtol=0, atol=1e-6)
    # Conversion to RGB comes after the crop; a greyscale image gives three equal channels.
    grey = R.image_reward_preprocess(Image.fromarray(array[..., 0]), 32)[0] * torch.tensor(std)[:, None, None]
    torch.testing.assert_close(grey[0] + float(mean[0]), grey[1] + float(mean[1]), rtol=0, atol=1e-6)


def test_converter_mapping_details():
    sd = random_original(TINY)
    out = R.imagereward_to_transformers(sd)
    assert torch.equal(out["vision.encoder.layers.1.self_attn.qkv.weight"], sd["blip.visual_encoder.blocks.1.attn.qkv.weight"])
    assert torch.equal(out["vision.encoder.layers.0.self_attn.projection.bias"],
                       sd["blip.visual_encoder.blocks.0.attn.proj.bias"])
    assert torch.equal(out["vision.embeddings.position_embedding"], sd["blip.visual_encoder.pos_embed"])
    assert torch.equal(out["vision.post_layernorm.weight"], sd["blip.visual_encoder.norm.weight"])
    assert torch.equal(out["text.encoder.layer.1.crossattention.self.key.weight"],
                       sd["blip.text_encoder.encoder.layer.1.crossattention.self.key.weight"])
    assert torch.equal(out["head.7.weight"], sd["mlp.layers.7.weight"])
    assert not any(k.startswith(("blip.vision_proj", "blip.text_proj")) or k.endswith("position_ids") for k in out)
    wrapped = {"module." + k: v for k, v in sd.items()}
    assert R.imagereward_to_transformers(wrapped).keys() == out.keys()
    without_optional = {k: v for k, v in sd.items() if "_proj." not in k and not k.endswith("position_ids")}
    assert R.imagereward_to_transformers(without_optional).keys() == out.keys()


def test_full_size_keys_and_shapes():
    vision, text = R.image_reward_configs()
    assert (vision.hidden_act, text.hidden_act) == ("gelu", "gelu")
    assert vision.layer_norm_eps == 1e-6 and text.layer_norm_eps == 1e-12
    assert (vision.image_size, vision.patch_size, text.encoder_hidden_size, text.vocab_size) == (224, 16, 1024, 30524)
    with torch.device("meta"):
        model = R.ImageRewardModel(vision, text)
        original = {k: torch.empty(s) for k, s in original_shapes(FULL).items()}
    converted = R.imagereward_to_transformers(original)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == expected
    check_keys(expected, converted, "full size")
    assert model.vision.encoder.layers[0].self_attn.head_dim == 64
    assert model.text.encoder.layer[0].crossattention.self.key.in_features == 1024
    assert model.text.pooler is None
    # everything but BLIP's ITC projections (1024x256 + 768x256 + biases) is used
    used = sum(math.prod(s) for k, s in original_shapes(FULL).items() if "_proj." not in k)
    assert sum(v.numel() for v in converted.values()) == used == sum(p.numel() for p in model.parameters())


def test_strict_loading(tmp_path, tokenizer_dir, tiny_file):
    configs = tiny_configs()

    def load(state_dict):
        path = tmp_path / "x.pt"
        torch.save(state_dict, path)
        return R.ImageRewardScore.from_file(path, tokenizer_dir, configs=configs)

    sd = random_original(TINY)
    partial = dict(sd)
    del partial["blip.visual_encoder.norm.bias"]
    with pytest.raises(ValueError, match="missing 1 key.*vision.post_layernorm.bias"):
        load(partial)
    with pytest.raises(ValueError, match="unexpected 1 key.*blip.text_decoder.cls.weight"):
        load(sd | {"blip.text_decoder.cls.weight": torch.ones(3)})
    with pytest.raises(ValueError, match="wrong shape.*text.embeddings.position_embeddings.weight"):
        load(sd | {"blip.text_encoder.embeddings.position_embeddings.weight": torch.zeros(39, TINY["t_width"])})
    with pytest.raises(ValueError, match="ImageReward checkpoint.*does not exist"):
        R.ImageRewardScore.from_file(tmp_path / "nope.pt", tokenizer_dir, configs=configs)
    with pytest.raises(ValueError, match="BERT tokenizer folder .* does not exist"):
        R.ImageRewardScore.from_file(tiny_file, tmp_path / "none", configs=configs)
    half = load({"module." + k: v.half() if v.is_floating_point() else v for k, v in sd.items()})
    assert all(p.dtype == torch.float32 for p in half.model.parameters())
    assert not any(t.is_meta for t in [*half.model.parameters(), *half.model.buffers()])
    assert torch.equal(half.model.text.embeddings.position_ids, torch.arange(TINY["positions"])[None])
    # the tokenizer must fit the embeddings
    with pytest.raises(ValueError, match="embeddings"):
        R.ImageRewardScore(R.ImageRewardModel(*tiny_configs(TINY | {"vocab": 10})), half.tokenizer)
