"""brushnet.evaluation: benchmark files, metrics (hand-computed values, published weight layouts) and
`brushnet bench` end to end on a synthetic 3-image benchmark with the tiny pipeline."""

import argparse
import csv
import json
import logging
import math
import shutil
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from brushnet.evaluation import metrics as M
from brushnet.evaluation.benchmark import load_benchmark
from brushnet.evaluation.cli import add_bench_command
from brushnet.evaluation.clip import (
    CLIP_MEAN,
    CLIP_STD,
    AestheticHead,
    AestheticScore,
    CLIPEmbedder,
    CLIPSimilarity,
    clip_preprocess,
)
from brushnet.evaluation.lpips import LPIPSSqueeze, MaskedLPIPS
from brushnet.evaluation.runner import paper_settings, run_benchmark
from brushnet.masks import rle_encode
from brushnet.metadata import read_png_params
from brushnet.processes import ProcessInfo, shard

from hub_cache import put_in_hub_cache


def _auto_cpu_dtype() -> str:
    from brushnet.options import resolve_dtype

    return str(resolve_dtype("auto", "cpu")).removeprefix("torch.")  # bfloat16 on CPUs that have it natively


GRID = 32  # small, and above SqueezeNet's (LPIPS) minimum of 17x17


# -- published weight layouts, written out here independently of the implementation --------------

# torchvision squeezenet1_1: features.<i> Fire modules (in, squeeze, expand1x1, expand3x3).
FIRES = {3: (64, 16, 64, 64), 4: (128, 16, 64, 64), 6: (128, 32, 128, 128), 7: (256, 32, 128, 128),
         9: (256, 48, 192, 192), 10: (384, 48, 192, 192), 11: (384, 64, 256, 256), 12: (512, 64, 256, 256)}


def squeezenet_shapes(classifier=True):
    shapes = {"features.0.weight": (64, 3, 3, 3), "features.0.bias": (64,)}
    for i, (inp, sq, e1, e3) in FIRES.items():
        shapes |= {f"features.{i}.squeeze.weight": (sq, inp, 1, 1), f"features.{i}.squeeze.bias": (sq,),
                   f"features.{i}.expand1x1.weight": (e1, sq, 1, 1), f"features.{i}.expand1x1.bias": (e1,),
                   f"features.{i}.expand3x3.weight": (e3, sq, 3, 3), f"features.{i}.expand3x3.bias": (e3,)}
    if classifier:
        shapes |= {"classifier.1.weight": (1000, 512, 1, 1), "classifier.1.bias": (1000,)}
    return shapes


LPIPS_HEAD_SHAPES = {f"lin{k}.model.1.weight": (1, c, 1, 1) for k, c in enumerate((64, 128, 256, 384, 384, 512, 512))}


def random_state_dict(shapes, seed, positive=False):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in shapes.items():
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        value = torch.randn(shape, generator=g) * (2 / fan_in) ** 0.5 if len(shape) > 1 else 0.01 * torch.randn(shape, generator=g)
        out[key] = value.abs() if positive else value
    return out


@pytest.fixture(scope="module")
def lpips_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lpips")
    torch.save(random_state_dict(squeezenet_shapes(), 0), folder / "squeezenet1_1.pth")
    torch.save(random_state_dict(LPIPS_HEAD_SHAPES, 1, positive=True), folder / "squeeze.pth")
    return folder / "squeezenet1_1.pth", folder / "squeeze.pth"


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory, golden):
    """A tiny random CLIPModel in the openai/clip-vit-large-patch14 folder layout, with the golden tokenizer."""
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig

    torch.manual_seed(0)
    pipeline = golden("sd15_tiny_pipeline").dir
    text = CLIPTextConfig.from_pretrained(pipeline / "text_encoder").to_dict()
    config = CLIPConfig(text_config=text, projection_dim=16,
                        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                       "num_attention_heads": 4, "image_size": 28, "patch_size": 14})
    folder = tmp_path_factory.mktemp("clip")
    CLIPModel(config).save_pretrained(folder)
    for file in (pipeline / "tokenizer").iterdir():
        shutil.copy(file, folder / file.name)
    return folder


@pytest.fixture(scope="module")
def aesthetic_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("aesthetic") / "head16.pth"
    g = torch.Generator().manual_seed(3)
    torch.save({"weight": torch.randn(1, 16, generator=g), "bias": torch.randn(1, generator=g)}, path)
    return path


# -- PSNR / MSE -----------------------------------------------------------------------------------


def _pair():
    original = np.zeros((2, 2, 3), np.uint8)
    result = original.copy()
    result[0, 0] = (255, 0, 0)  # squared error 1.0 over the channels
    result[0, 1] = (51, 51, 51)  # 0.2 per channel: 3 * 0.04 = 0.12
    result[1, 0] = (255, 255, 255)  # in the hole: ignored
    keep = np.array([[True, True], [False, True]])
    return result, original, keep


def test_psnr_mse_hand_computed_both_modes():
    result, original, keep = _pair()
    # 3 kept pixels, squared error 1.12 in all.
    assert M.masked_mse(result, original, keep) == pytest.approx(1.12 / 9, rel=1e-12)
    assert M.masked_psnr(result, original, keep) == pytest.approx(10 * math.log10(9 / 1.12), rel=1e-12)
    # The authors' formula divides by kept pixels, not values: 3x the MSE, PSNR 10 log10(3) dB lower.
    assert M.masked_mse(result, original, keep, paper_compat=True) == pytest.approx(1.12 / 3, rel=1e-6)
    paper_psnr = M.masked_psnr(result, original, keep, paper_compat=True)
    assert paper_psnr == pytest.approx(20 * math.log10(1 / math.sqrt(1.12 / 3)), rel=1e-6)
    assert M.masked_psnr(result, original, keep) - paper_psnr == pytest.approx(10 * math.log10(3), rel=1e-5)
    # PIL images give the same values.
    assert M.masked_mse(Image.fromarray(result), Image.fromarray(original), keep) == pytest.approx(1.12 / 9)


def test_psnr_special_cases():
    result, original, keep = _pair()
    assert M.masked_mse(original, original, keep) == 0 and M.masked_psnr(original, original, keep) == math.inf
    assert M.masked_psnr(original, original, keep, paper_compat=True) == 1000
    # One value off by 1/255 among 400x400 kept pixels: the authors' MSE 1.5e-5 / 160000 < 1e-10 gives 1000.
    big = np.zeros((400, 400, 3), np.uint8)
    off = big.copy()
    off[0, 0, 0] = 1
    everywhere = np.ones((400, 400), bool)
    assert M.masked_psnr(off, big, everywhere, paper_compat=True) == 1000
    assert 100 < M.masked_psnr(off, big, everywhere) < 1000
    # No kept pixel: undefined in both modes.
    nothing = np.zeros((2, 2), bool)
    assert math.isnan(M.masked_psnr(result, original, nothing)) and math.isnan(M.masked_mse(result, original, nothing, True))
    with pytest.raises(ValueError, match="one size"):
        M.masked_psnr(result, original[:1], keep)


# -- benchmark files ------------------------------------------------------------------------------


def _write_bench(root, items, grid=GRID):
    (root / "images").mkdir(parents=True, exist_ok=True)
    mapping = {}
    for item_id, (pixels, caption, hole) in items.items():
        Image.fromarray(pixels).save(root / "images" / f"img{item_id}.png")
        mapping[item_id] = {"image": f"images/img{item_id}.png", "caption": caption,
                            "inpainting_mask": rle_encode(hole, order="C"),
                            "outpainting_mask": rle_encode(~hole, order="C")}
    (root / "mapping_file.json").write_text(json.dumps(mapping))
    return mapping


def _photo(seed, grid=GRID):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:grid, 0:grid]
    base = np.stack([x * 255 // grid, y * 255 // grid, (x + y) * 127 // grid], -1)
    return np.clip(base + rng.integers(0, 40, (grid, grid, 3)), 0, 255).astype(np.uint8)


def _hole(box, grid=GRID):
    hole = np.zeros((grid, grid), bool)
    top, left, bottom, right = box
    hole[top:bottom, left:right] = True
    return hole


@pytest.fixture
def bench(tmp_path):
    root = tmp_path / "bench"
    _write_bench(root, {
        "0": (_photo(0), "a red ball", _hole((8, 8, 20, 24))),
        "1": (_photo(1), "a wooden bench in a park", _hole((0, 10, 14, 32))),
        "2": (_photo(2), "a cat", _hole((16, 2, 30, 18))),
    })
    return root


def test_rle_is_decoded_row_major_and_starts_at_one(tmp_path):
    root = tmp_path / "b"
    (root / "images").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(root / "images" / "a.png")
    # Runs (1-based starts) on the flattened 4x4 grid read row by row: positions 2-4 and 8-9.
    mapping = {"7": {"image": "images/a.png", "caption": "c", "inpainting_mask": [2, 3, 8, 2]}}
    (root / "mapping_file.json").write_text(json.dumps(mapping), encoding="utf-8-sig")  # a BOM, as Notepad saves
    bench = load_benchmark(root, grid=4)
    expected = np.array([[0, 1, 1, 1],
                         [0, 0, 0, 1],
                         [1, 0, 0, 0],
                         [0, 0, 0, 0]], bool)
    (item,) = bench.items
    assert item.id == "7" and item.caption == "c"
    assert np.array_equal(item.hole(), expected) and np.array_equal(item.keep(), ~expected)
    assert np.array_equal(np.asarray(item.mask_image()) == 255, expected)
    with pytest.raises(ValueError, match="Item 7 has no field 'outpainting_mask'"):
        load_benchmark(root, mask_key="outpainting_mask", grid=4)


@pytest.mark.parametrize("change, message", [
    (lambda m: m["1"].pop("caption"), "Item 1: field 'caption'"),
    (lambda m: m["1"].update(image="images/nope.png"), "Item 1: field 'image' names images/nope.png"),
    (lambda m: m["2"].update(inpainting_mask=[1, GRID * GRID + 1]), "Item 2: field 'inpainting_mask' is not a valid RLE"),
    (lambda m: m["2"].update(inpainting_mask=[1, 2, 3]), "Item 2: field 'inpainting_mask'"),
    (lambda m: m["0"].update(inpainting_mask="1 2"), "Item 0: field 'inpainting_mask' must be a flat list"),
    # a path out of the folder (only absolute ones were refused)
    (lambda m: m["1"].update(image="images/../../bench/images/img0.png"), "Item 1: field 'image' must be a path inside"),
])
def test_benchmark_errors_name_the_item_and_field(bench, change, message):
    mapping = json.loads((bench / "mapping_file.json").read_text())
    change(mapping)
    (bench / "mapping_file.json").write_text(json.dumps(mapping))
    with pytest.raises(ValueError, match=message):
        load_benchmark(bench, grid=GRID)


def test_benchmark_refuses_an_id_given_twice_and_a_truncated_image(bench):
    text = (bench / "mapping_file.json").read_text()
    (bench / "mapping_file.json").write_text(text[:-1] + ', "1": {"image": "images/img0.png", "caption": "DUP", '
                                             '"inpainting_mask": [1, 4]}}')
    with pytest.raises(ValueError, match="gives '1' twice in one object"):
        load_benchmark(bench, grid=GRID)
    (bench / "mapping_file.json").write_text(text)
    whole = (bench / "images" / "img1.png").read_bytes()
    (bench / "images" / "img1.png").write_bytes(whole[: len(whole) // 2])  # found before a run, not in it
    with pytest.raises(ValueError, match="Item 1: field 'image' names images/img1.png, which is not an image"):
        load_benchmark(bench, grid=GRID)


def test_benchmark_checks_grid_size_and_folder(bench, tmp_path):
    with pytest.raises(ValueError, match="is 32x32, but the masks are on a 64x64 grid"):
        _grid64(bench)
    with pytest.raises(ValueError, match="has no mapping_file.json"):
        load_benchmark(tmp_path)
    assert [i.id for i in load_benchmark(bench, grid=GRID)] == ["0", "1", "2"]


def _grid64(bench):
    # Masks valid on a 64x64 grid, images 32x32.
    mapping = json.loads((bench / "mapping_file.json").read_text())
    for entry in mapping.values():
        entry["inpainting_mask"] = [1, 10]
    (bench / "mapping_file.json").write_text(json.dumps(mapping))
    return load_benchmark(bench, grid=64)


# -- LPIPS ----------------------------------------------------------------------------------------


def test_lpips_loads_the_published_layouts_strictly(tmp_path, lpips_files):
    backbone, heads = lpips_files
    model = LPIPSSqueeze.from_files(backbone, heads)
    loaded = random_state_dict(squeezenet_shapes(), 0)
    assert torch.equal(model.backbone.features[12].expand3x3.weight, loaded["features.12.expand3x3.weight"])
    # safetensors and a file without the ImageNet classifier load too.
    from safetensors.torch import save_file

    save_file(random_state_dict(squeezenet_shapes(classifier=False), 0), tmp_path / "b.safetensors")
    LPIPSSqueeze.from_files(tmp_path / "b.safetensors", heads)

    def fails(state_dict, message, kind="backbone"):
        path = tmp_path / f"{kind}.pth"
        torch.save(state_dict, path)
        with pytest.raises(ValueError, match=message):
            LPIPSSqueeze.from_files(path, heads) if kind == "backbone" else LPIPSSqueeze.from_files(backbone, path)

    partial = random_state_dict(squeezenet_shapes(), 0)
    del partial["features.9.squeeze.bias"]
    fails(partial, "missing 1 key.*features.9.squeeze.bias")
    fails(random_state_dict(squeezenet_shapes(), 0) | {"features.13.weight": torch.zeros(1)}, "unexpected 1 key")
    fails(random_state_dict(squeezenet_shapes() | {"features.0.weight": (64, 3, 5, 5)}, 0), "wrong shape")
    fails({k: v for k, v in random_state_dict(LPIPS_HEAD_SHAPES, 1).items() if "lin6" not in k}, "lin6", "heads")
    fails({k.replace("model.1", "model.0"): v for k, v in random_state_dict(LPIPS_HEAD_SHAPES, 1).items()},
          "missing 7 key", "heads")
    with pytest.raises(ValueError, match="does not exist"):
        LPIPSSqueeze.from_files(tmp_path / "nope.pth", heads)


def _reference_lpips(x0, x1, backbone, heads):
    """LPIPS v0.1 + SqueezeNet 1.1 written functionally from the state dicts (torchvision's layer order)."""
    def fire(x, i):
        p = f"features.{i}."
        x = F.relu(F.conv2d(x, backbone[p + "squeeze.weight"], backbone[p + "squeeze.bias"]))
        return torch.cat([F.relu(F.conv2d(x, backbone[p + "expand1x1.weight"], backbone[p + "expand1x1.bias"])),
                          F.relu(F.conv2d(x, backbone[p + "expand3x3.weight"], backbone[p + "expand3x3.bias"], padding=1))], 1)

    def taps(x):
        x = (x - torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)) / torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
        pool = lambda t: F.max_pool2d(t, 3, 2, ceil_mode=True)
        out = [F.relu(F.conv2d(x, backbone["features.0.weight"], backbone["features.0.bias"], stride=2))]
        out.append(fire(fire(pool(out[-1]), 3), 4))
        out.append(fire(fire(pool(out[-1]), 6), 7))
        out.append(fire(pool(out[-1]), 9))
        for i in (10, 11, 12):
            out.append(fire(out[-1], i))
        return out

    total = 0
    for k, (a, b) in enumerate(zip(taps(x0), taps(x1))):
        a = a / (a.pow(2).sum(1, keepdim=True) + 1e-8).sqrt()
        b = b / (b.pow(2).sum(1, keepdim=True) + 1e-8).sqrt()
        total = total + F.conv2d((a - b) ** 2, heads[f"lin{k}.model.1.weight"]).mean((2, 3))
    return total.view(-1)


def test_lpips_values_and_properties(lpips_files):
    model = LPIPSSqueeze.from_files(*lpips_files)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 40, 36, generator=g) * 2 - 1
    small = (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    large = (x + 0.5 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    assert torch.equal(model(x, x), torch.zeros(2))
    d_small, d_large = model(x, small), model(x, large)
    assert (d_small > 0).all() and (d_large > d_small).all()
    reference = _reference_lpips(x, large, torch.load(lpips_files[0]), torch.load(lpips_files[1]))
    torch.testing.assert_close(d_large, reference, rtol=1e-5, atol=1e-7)
    assert model(x[..., :17, :17], large[..., :17, :17]).shape == (2,)  # torchvision's minimum size
    with pytest.raises(ValueError, match="at least 17x17"):
        model(x[..., :16, :16], x[..., :16, :16])

    # Masked LPIPS: changes inside the hole do not count (the hole is zeroed in both images).
    original, keep = _photo(5), ~_hole((4, 4, 20, 20))
    changed = original.copy()
    changed[4:20, 4:20] = 255 - changed[4:20, 4:20]
    metric = MaskedLPIPS(model)
    sample = M.Sample("x", "", Image.fromarray(original), Image.fromarray(changed), keep)
    assert metric(sample) == 0
    changed[25:, 25:] = 0
    assert metric(M.Sample("x", "", Image.fromarray(original), Image.fromarray(changed), keep)) > 0


# -- CLIP and aesthetic -----------------------------------------------------------------------------


def test_clip_preprocessing():
    gray = Image.new("RGB", (40, 30), (128, 64, 255))
    pixels = clip_preprocess(gray, 28)
    assert pixels.shape == (1, 3, 28, 28)
    expected = (torch.tensor([128, 64, 255]) / 255 - torch.tensor([0.48145466, 0.4578275, 0.40821073])) / \
        torch.tensor([0.26862954, 0.26130258, 0.27577711])
    torch.testing.assert_close(pixels[0, :, 5, 5], expected)
    # A 3-pixel margin: transformers' crop starts at 3 // 2 = 1, torchvision's at round(1.5) = 2.
    ramp = Image.fromarray(np.tile(np.arange(31, dtype=np.uint8)[None, :, None] * 8, (28, 1, 3)))
    floor, rounded = clip_preprocess(ramp, 28, "floor"), clip_preprocess(ramp, 28, "round")
    assert torch.equal(floor[..., 1:], rounded[..., :-1]) and not torch.equal(floor, rounded)
    assert torch.equal(clip_preprocess(ramp.crop((1, 0, 29, 28)), 28), floor)
    # 40x30: the shorter side goes to 28 and the longer to int(28 * 40 / 30) = 37 before the crop.
    assert clip_preprocess(Image.new("RGB", (40, 30)), 28).shape == (1, 3, 28, 28)


def test_clip_preprocessing_converts_to_rgb_where_each_original_does():
    # An alpha ramp: PIL resizes RGBA with premultiplied alpha, so converting before or after the
    # resize gives different pixels. open_clip (the aesthetic score, "round") converts after the
    # crop, transformers ("floor") before the resize.
    rng = np.random.default_rng(0)
    rgba = np.concatenate([rng.integers(0, 256, (30, 40, 3)), np.tile(np.linspace(0, 255, 40), (30, 1))[..., None]], -1)
    image = Image.fromarray(rgba.astype(np.uint8), "RGBA")
    after = image.resize((37, 28), Image.BICUBIC).crop((4, 0, 32, 28)).convert("RGB")
    expected = (torch.from_numpy(np.asarray(after, dtype=np.float32)).permute(2, 0, 1) / 255 -
                torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)
    torch.testing.assert_close(clip_preprocess(image, 28, "round")[0], expected, rtol=0, atol=1e-6)
    assert torch.equal(clip_preprocess(image, 28, "floor"), clip_preprocess(image.convert("RGB"), 28, "floor"))
    assert not torch.equal(clip_preprocess(image, 28, "round"), clip_preprocess(image.convert("RGB"), 28, "round"))


def test_clip_preprocessing_matches_transformers_pil_processor():
    # torchmetrics' CLIPScore preprocesses with CLIPProcessor (PIL path); the default configuration is
    # openai/clip-vit-large-patch14's (shortest edge 224, bicubic, centre crop 224, CLIP mean/std).
    import transformers

    processor_class = getattr(transformers, "CLIPImageProcessorPil", None)
    if processor_class is None:
        pytest.skip("this transformers has no PIL CLIP image processor")
    processor = processor_class()
    rng = np.random.default_rng(0)
    for width, height in [(300, 201), (201, 333), (250, 231)]:
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        expected = torch.from_numpy(np.asarray(processor(images=image, return_tensors="np")["pixel_values"]))
        torch.testing.assert_close(clip_preprocess(image, 224, "floor"), expected, rtol=0, atol=1e-6)


def test_clip_similarity_and_aesthetic_score(clip_dir, aesthetic_file, tmp_path):
    embedder = CLIPEmbedder.from_pretrained(clip_dir)
    clip = CLIPSimilarity(embedder)
    image = Image.fromarray(_photo(3))
    captions = ("a red ball", "a wooden bench", "a cat " * 60)  # the last is cut to 77 tokens
    raw = {c: clip.similarity(image, c) for c in captions}
    assert len(set(raw.values())) == 3 and all(-100 <= s <= 100 for s in raw.values())
    scores = {c: clip.score(image, c) for c in captions}
    assert scores == {c: max(s, 0.0) for c, s in raw.items()}
    # The definition: max(100 cos(image, text), 0) with CLIP's own projections.
    model, tokenizer = embedder.model, embedder.tokenizer
    with torch.no_grad():
        i = model.get_image_features(pixel_values=clip_preprocess(image, 28)).pooler_output
        t = model.get_text_features(**tokenizer(["a red ball"], return_tensors="pt")).pooler_output
    assert raw["a red ball"] == pytest.approx(100 * F.cosine_similarity(i, t).item(), abs=1e-4)

    head = AestheticHead.from_file(aesthetic_file, dim=16)
    aesthetic = AestheticScore(embedder, head)
    state = torch.load(aesthetic_file)
    expected = (F.normalize(i, dim=-1) @ state["weight"].T + state["bias"]).item()
    assert aesthetic.score(image) == pytest.approx(expected, abs=1e-5)
    with pytest.raises(ValueError, match="16-d"):
        AestheticScore(embedder, AestheticHead(768))
    with pytest.raises(ValueError, match="openai/clip-vit-large-patch14 layout"):
        CLIPEmbedder.from_pretrained(tmp_path / "missing")


def test_aesthetic_head_full_size_layout(tmp_path):
    path = tmp_path / "sa_0_4_vit_l_14_linear.pth"
    torch.save({"weight": torch.randn(1, 768), "bias": torch.randn(1)}, path)
    head = AestheticHead.from_file(path)
    assert head.weight.shape == (1, 768) and set(head.state_dict()) == {"weight", "bias"}
    for bad, message in [({"weight": torch.randn(1, 768)}, "missing 1 key"),
                         ({"weight": torch.randn(1, 768), "bias": torch.randn(1), "x": torch.zeros(1)}, "unexpected"),
                         ({"weight": torch.randn(1, 1024), "bias": torch.randn(1)}, "wrong shape")]:
        torch.save(bad, path)
        with pytest.raises(ValueError, match=message):
            AestheticHead.from_file(path)


def test_hub_weights_load_from_the_cache_at_once_when_the_hub_cannot_be_reached(
        unreachable_hub, clip_dir, aesthetic_file, tmp_path, monkeypatch, capfd):
    # Without the probe, an hf:// file or a CLIP hub id retried for half a minute, a warning line per
    # try, before its cached copy was used or the one-line error came.
    from huggingface_hub import constants

    from brushnet.evaluation.weights import resolve_file

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    heads = tmp_path / "heads"
    heads.mkdir()
    shutil.copy(aesthetic_file, heads / "head16.pth")
    put_in_hub_cache(tmp_path, "test-org/heads", heads)
    put_in_hub_cache(tmp_path, "test-org/tiny-clip", clip_dir)
    capfd.readouterr()

    resolved = resolve_file("hf://test-org/heads/head16.pth", "the aesthetic head")
    assert resolved.read_bytes() == aesthetic_file.read_bytes()
    embedder = CLIPEmbedder.from_pretrained("test-org/tiny-clip")
    assert embedder.model.config.projection_dim == 16
    for load, what in [(lambda: resolve_file("hf://test-org/heads/missing.pth", "the aesthetic head"),
                        "Could not get the aesthetic head hf://test-org/heads/missing.pth"),
                       (lambda: CLIPEmbedder.from_pretrained("test-org/uncached-clip"),
                        "Could not load a CLIP model from test-org/uncached-clip")]:
        with pytest.raises(ValueError) as error:
            load()
        assert str(error.value).startswith(what) and "\n" not in str(error.value)
    assert unreachable_hub  # probed, and every request was local_files_only:
    assert "thrown while requesting" not in capfd.readouterr().err


# -- the registry -----------------------------------------------------------------------------------


def test_weights_for_no_selected_metric_are_told(caplog):
    with caplog.at_level(logging.WARNING, logger="brushnet.evaluation"):
        assert M.resolve_metrics("psnr", {"lpips": ("a.pth", "b.pth")}) == ["psnr"]
    assert "--lpips-weights is given, but no metric of --metrics psnr uses it" in caplog.text


def test_metric_selection():
    assert M.resolve_metrics("auto", {}) == ["psnr", "mse"]
    assert M.resolve_metrics("clip, psnr", {"clip": "x"}) == ["psnr", "clip"]
    assert M.resolve_metrics("auto", {"clip": "x"}) == ["psnr", "mse", "clip"]
    with pytest.raises(ValueError, match="aesthetic needs --clip-model"):
        M.resolve_metrics("auto", {"lpips": ("a", "b"), "aesthetic": "y"})
    assert M.resolve_metrics("auto", {"clip": "x", "aesthetic": "y"}) == ["aesthetic", "psnr", "mse", "clip"]
    assert M.resolve_metrics("all", {"lpips": ("a", "b"), "clip": "x", "aesthetic": "y", "hps": "z",
                                     "image_reward": ("ir.pt", "bert")}) == \
        ["image_reward", "hps", "aesthetic", "psnr", "mse", "lpips", "clip"]
    with pytest.raises(ValueError, match="--lpips-weights.*--clip-model.*--aesthetic-weights"):
        M.resolve_metrics("all", {})
    with pytest.raises(ValueError, match="aesthetic needs --aesthetic-weights"):
        M.resolve_metrics("aesthetic", {"clip": "x"})
    with pytest.raises(ValueError, match="aesthetic needs --clip-model"):
        M.resolve_metrics("auto", {"aesthetic": "y"})
    with pytest.raises(ValueError, match="image_reward needs --image-reward-weights"):
        M.resolve_metrics("psnr,image_reward")
    with pytest.raises(ValueError, match="Unknown metric 'ssim'") as refused:
        M.resolve_metrics(["ssim"])
    assert "planned" not in str(refused.value)  # nothing is planned: no empty "(planned: )"
    with pytest.raises(ValueError, match="must be 2 paths"):
        M.resolve_metrics("lpips", {"lpips": "one.pth"})


# -- the runner end to end --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_pipe(golden):
    from brushnet.loading import load_pipeline

    folder = golden("sd15_tiny_pipeline").dir
    pipe = load_pipeline(folder, folder / "brushnet")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_run_benchmark_generates_scores_resumes_and_reports(bench, tmp_path, tiny_pipe, lpips_files, clip_dir,
                                                            aesthetic_file):
    out = tmp_path / "out"
    weights = {"lpips": lpips_files, "clip": str(clip_dir), "aesthetic": str(aesthetic_file)}
    settings = paper_settings(steps=2)
    common = {"settings": settings, "metrics": "aesthetic,psnr,mse,lpips,clip", "weights": weights, "grid": GRID,
              "progress": False, "model_params": {"brushnet_hash": "abc"}}
    summary = run_benchmark(bench, out, pipe=tiny_pipe, **common)

    assert summary["count"] == 3 and summary["generated"] == 3 and summary["skipped"] == 0
    assert list(summary["metrics"]) == ["aesthetic", "psnr", "mse", "lpips", "clip"]
    params = read_png_params(out / "images" / "1.png")
    assert params["prompt"] == "a wooden bench in a park" and params["seed"] == 1234 and params["steps"] == 2
    assert params["scheduler"] == "unipc" and params["blend"] is False and params["mask_key"] == "inpainting_mask"
    assert Image.open(out / "images" / "1.png").size == (GRID, GRID)

    rows = _read_csv(out / "per_image.csv")
    assert [r["id"] for r in rows] == ["0", "1", "2"] and rows[2]["caption"] == "a cat"
    psnr = [float(r["psnr"]) for r in rows]
    assert summary["metrics"]["psnr"]["mean"] == pytest.approx(np.mean(psnr))
    assert summary["metrics"]["mse"]["paper_value"] == pytest.approx(1e3 * np.mean([float(r["mse"]) for r in rows]))
    # Without blending the model's output replaces the whole picture, so the kept region differs.
    assert all(0 < p < 100 for p in psnr)
    saved = json.loads((out / "summary.json").read_text())
    assert saved["count"] == 3 and saved["settings"]["seed"] == 1234 and saved["paper_compat"] is False
    assert [r["metric"] for r in _read_csv(out / "summary.csv")] == ["aesthetic", "psnr", "mse", "lpips", "clip"]
    md = (out / "summary.md").read_text()
    assert "| Images | AS | PSNR | MSE (×10³) | LPIPS (×10³) | CLIP Sim |" in md and "Not computed: image_reward, hps" in md
    page = (out / "gallery.html").read_text()
    for link in ("gallery/0-original.png", "gallery/0-masked.png", "gallery/2-result.png", "images/2.png"):
        assert f'"{link}"' in page and (out / link).is_file()
    assert not (out / ".bench-parts").exists()

    # Resume: everything is there, so nothing is generated and the pipeline is never loaded.
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir()}

    def no_loading():
        raise AssertionError("the pipeline should not be loaded")

    again = run_benchmark(bench, out, pipe_loader=no_loading, paper_compat=True, **common)
    assert again["generated"] == 0 and again["skipped"] == 3
    assert stamps == {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir()}
    paper = [float(r["psnr"]) for r in _read_csv(out / "per_image.csv")]
    assert np.allclose(np.subtract(psnr, paper), 10 * math.log10(3), atol=1e-4)
    assert "the authors' formula" in (out / "summary.md").read_text()

    # Other settings on the same folder are refused instead of mixing results.
    with pytest.raises(ValueError, match="generated with seed=1234, not 7"):
        run_benchmark(bench, out, pipe_loader=no_loading, **(common | {"settings": paper_settings(steps=2, seed=7)}))
    # So is a benchmark whose image or hole changed since (the old result was reused and scored).
    original = (bench / "images" / "img1.png").read_bytes()
    Image.fromarray(_photo(5)).save(bench / "images" / "img1.png")
    with pytest.raises(ValueError, match="1.png was generated with item_hash="):
        run_benchmark(bench, out, pipe_loader=no_loading, **common)
    (bench / "images" / "img1.png").write_bytes(original)
    # And an output folder whose results would land on the benchmark's own images.
    with pytest.raises(ValueError, match="where the benchmark's own images are"):
        run_benchmark(bench, bench, pipe_loader=no_loading, **common)

    # The same images scored from elsewhere through the command line give the same values.
    parser = argparse.ArgumentParser()
    add_bench_command(parser.add_subparsers())
    args = parser.parse_args(["bench", str(bench), "--images", str(out / "images"), "--out", str(tmp_path / "ext"),
                              "--metrics", "psnr,mse,lpips", "--lpips-weights", *map(str, lpips_files),
                              "--grid", str(GRID), "--device", "cpu"])
    assert args.func(args) == 0
    external = _read_csv(tmp_path / "ext" / "per_image.csv")
    assert [float(r["psnr"]) for r in external] == psnr
    assert [float(r["lpips"]) for r in external] == [float(r["lpips"]) for r in rows]
    assert (tmp_path / "ext" / "gallery.html").is_file() and not (tmp_path / "ext" / "images").exists()


def test_images_mode_finds_results_by_relative_path_and_reports_missing(bench, tmp_path):
    results = tmp_path / "authors"
    (results / "images").mkdir(parents=True)
    for i in range(3):  # the authors' layout: results under the benchmark's own relative paths
        shutil.copy(bench / "images" / f"img{i}.png", results / "images" / f"img{i}.png")
    summary = run_benchmark(bench, tmp_path / "o", images_dir=results, grid=GRID, progress=False, gallery=False)
    assert summary["metrics"]["psnr"]["mean"] == math.inf and summary["metrics"]["mse"]["mean"] == 0
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["metrics"]["psnr"]["mean"] == "inf"
    (results / "images" / "img1.png").unlink()
    with pytest.raises(ValueError, match=r"No result in .* for 1 item\(s\), e.g. 1"):
        run_benchmark(bench, tmp_path / "o", images_dir=results, grid=GRID, progress=False)
    with pytest.raises(ValueError, match="give a pipeline"):
        run_benchmark(bench, tmp_path / "o", grid=GRID)


def test_several_processes_split_items_and_rank_zero_writes_the_summary(bench, tmp_path):
    assert shard(list("abcdefg"), 1, 3) == ["b", "e"]
    results = tmp_path / "results"
    results.mkdir()
    for i in range(3):
        pixels = _photo(i)
        pixels[0, 0] = 0  # one changed pixel each, so every PSNR is finite and distinct
        pixels[1, i] = 255
        Image.fromarray(pixels).save(results / f"{i}.png")

    class FakeState:  # stands in for accelerate's PartialState: a barrier between two threads
        barrier = threading.Barrier(2)

        def wait_for_everyone(self):
            self.barrier.wait(timeout=60)

    outputs, errors = {}, []

    def run(rank):
        try:
            outputs[rank] = run_benchmark(bench, tmp_path / "out", images_dir=results, grid=GRID, progress=False,
                                          gallery=False, process=ProcessInfo(rank, 2, "cpu", FakeState()),
                                          poll_interval=0.05)
        except Exception as error:  # noqa: BLE001
            errors.append(error)

    threads = [threading.Thread(target=run, args=(rank,)) for rank in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert outputs[1] is None and outputs[0]["count"] == 3 and outputs[0]["processes"] == 2
    rows = _read_csv(tmp_path / "out" / "per_image.csv")
    assert [r["id"] for r in rows] == ["0", "1", "2"]
    single = run_benchmark(bench, tmp_path / "one", images_dir=results, grid=GRID, progress=False, gallery=False)
    assert [r["psnr"] for r in _read_csv(tmp_path / "one" / "per_image.csv")] == [r["psnr"] for r in rows]
    assert single["metrics"]["psnr"]["mean"] == outputs[0]["metrics"]["psnr"]["mean"]


def test_bench_command_errors(bench, tmp_path):
    parser = argparse.ArgumentParser()
    add_bench_command(parser.add_subparsers())
    for argv, message in [
        (["bench", str(bench), "--out", str(tmp_path / "o")], "needs --base and --brushnet"),
        # passed the checks, and the pipeline refused it once the models had loaded
        (["bench", str(bench), "--out", str(tmp_path / "o"), "--base", "b", "--brushnet", "n", "--seed", "-1"],
         "--seed must be a whole number >= 0 for a benchmark"),
        (["bench", str(bench), "--out", str(tmp_path / "o"), "--images", str(bench), "--base", "x"], "drop --base"),
        (["bench", str(bench), "--out", str(tmp_path / "o"), "--images", str(bench), "--metrics", "all"],
         "Missing weight files"),
        (["bench", str(bench), "--out", str(tmp_path / "o"), "--images", str(bench), "--metrics", "psnr"],
         "is 32x32, but the masks are on a 512x512 grid"),
        (["bench", str(bench), "--out", str(tmp_path / "o"), "--images", str(bench), "--grid", str(GRID),
          "--aesthetic-weights", str(tmp_path / "nope.pth")], "aesthetic needs --clip-model"),
        (["bench", str(bench), "--out", str(tmp_path / "o"), "--images", str(bench), "--grid", str(GRID),
          "--lpips-weights", str(tmp_path / "nope.pth"), "x.pth"], "LPIPS backbone file .*nope.pth does not exist"),
        # these named the wrong problem: "does not exist", and torch's "(101)"
        (["bench", str(bench / "mapping_file.json"), "--out", str(tmp_path / "o"), "--images", str(bench)],
         "mapping_file.json is a file: give the benchmark's folder"),
        (["bench", str(bench), "--out", str(tmp_path / "o"), "--images", str(bench / "mapping_file.json"),
          "--grid", str(GRID)], "--images .*mapping_file.json is a file: give the folder of results"),
        (["bench", str(bench), "--out", str(tmp_path / "o"), "--images", str(bench), "--grid", str(GRID),
          "--lpips-weights", str(bench / "mapping_file.json"), str(bench / "mapping_file.json")],
         "neither a torch.save zip archive nor a pickle"),
    ]:
        args = parser.parse_args(argv)
        with pytest.raises(ValueError, match=message):
            args.func(args)


def test_bench_command_generates_with_the_paper_defaults(bench, tmp_path, golden, capsys):
    folder = golden("sd15_tiny_pipeline").dir
    parser = argparse.ArgumentParser()
    add_bench_command(parser.add_subparsers())
    out = tmp_path / "cli"
    argv = ["bench", str(bench), "--base", str(folder), "--brushnet", str(folder / "brushnet"), "--out", str(out),
            "--steps", "2", "--grid", str(GRID), "--device", "cpu", "--mask-key", "outpainting_mask", "--no-gallery"]
    args = parser.parse_args(argv)
    assert (args.seed, args.scheduler, args.blend, args.guidance) == (1234, "unipc", False, 7.5)
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "| Images | PSNR | MSE (×10³) |" in printed and "generated 3, reused 0" in printed
    params = read_png_params(out / "images" / "2.png")
    assert params["mask_key"] == "outpainting_mask" and params["dtype"] == _auto_cpu_dtype() and len(params["brushnet_hash"]) == 12
    assert not (out / "gallery.html").exists()
    args = parser.parse_args([*argv, "--paper-compat"])
    assert args.func(args) == 0 and "generated 0, reused 3" in capsys.readouterr().out


def test_a_clip_folder_without_its_tokenizer_or_a_file_is_one_line(clip_dir, tmp_path):
    # Without vocab.json and merges.txt transformers built a two-token tokenizer and CLIP scored
    # every caption as unknown words; a file was taken for a hub id and the network tried.
    from brushnet.evaluation.hps import load_clip_tokenizer

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(clip_dir / name, bare / name)
    with pytest.raises(ValueError, match="has no CLIP tokenizer files .vocab.json and merges.txt"):
        CLIPEmbedder.from_pretrained(bare)
    with pytest.raises(ValueError, match="has no CLIP tokenizer files"):
        load_clip_tokenizer(bare)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="notes.txt is a file: pass the model's folder"):
        CLIPEmbedder.from_pretrained(tmp_path / "notes.txt")


def test_a_16_bit_result_is_scored_as_it_looks(bench, tmp_path):
    # A result saved as a 16-bit grey PNG was clipped to white before scoring.
    results = tmp_path / "results"
    results.mkdir()
    for item in ("0", "1", "2"):
        grey = np.asarray(Image.open(bench / "images" / f"img{item}.png").convert("L"))
        Image.fromarray(grey.astype(np.uint16) * 257).save(results / f"{item}.png")
        Image.fromarray(grey).convert("RGB").save(tmp_path / f"{item}-8bit.png")
    sixteen = run_benchmark(bench, tmp_path / "o16", images_dir=results, grid=GRID, progress=False, gallery=False)
    for item in ("0", "1", "2"):
        (tmp_path / f"{item}-8bit.png").rename(results / f"{item}.png")
    eight = run_benchmark(bench, tmp_path / "o8", images_dir=results, grid=GRID, progress=False, gallery=False)
    assert sixteen["metrics"]["psnr"]["mean"] == pytest.approx(eight["metrics"]["psnr"]["mean"], abs=1e-6)


def test_a_metric_without_values_is_told(bench, tmp_path, caplog):
    # Every hole the whole image: PSNR has no kept pixel anywhere, and summary.csv held NaN silently.
    mapping = json.loads((bench / "mapping_file.json").read_text())
    for entry in mapping.values():
        entry["inpainting_mask"] = [1, GRID * GRID]
    (bench / "mapping_file.json").write_text(json.dumps(mapping))
    with caplog.at_level(logging.WARNING, logger="brushnet.evaluation"):
        summary = run_benchmark(bench, tmp_path / "o", images_dir=bench, grid=GRID, metrics="psnr",
                                progress=False, gallery=False)
    assert summary["metrics"]["psnr"]["count"] == 0
    assert "psnr: 3 of 3 image(s) gave no value (NaN: no kept pixel to compare)" in caplog.text


def test_items_with_an_empty_mask_are_told(bench, tmp_path, caplog):
    # An empty RLE (or runs of length 0) leaves nothing to fill: those items score the image as given.
    mapping = json.loads((bench / "mapping_file.json").read_text())
    mapping["1"]["inpainting_mask"] = []
    mapping["2"]["inpainting_mask"] = [5, 0]
    (bench / "mapping_file.json").write_text(json.dumps(mapping))
    with caplog.at_level(logging.WARNING, logger="brushnet.evaluation"):
        run_benchmark(bench, tmp_path / "o", images_dir=bench, grid=GRID, metrics="psnr", progress=False,
                      gallery=False)
    assert "2 item(s) have an empty inpainting_mask (no pixel to fill), so they score the image as given: 1, 2." \
        in caplog.text


def test_a_rerun_leaves_no_report_of_the_previous_run(bench, tmp_path, monkeypatch):
    # Interrupted while its reports were written, a rerun left the first run's gallery.html beside
    # its own summary.
    import brushnet.evaluation.runner as runner

    out = tmp_path / "o"
    run_benchmark(bench, out, images_dir=bench, grid=GRID, metrics="psnr", progress=False)
    assert (out / "gallery.html").is_file()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "_write_gallery", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_benchmark(bench, out, images_dir=bench, grid=GRID, metrics="psnr", progress=False)
    assert (out / "summary.csv").is_file() and not (out / "gallery.html").exists()
