"""BrushBench / EditBench metrics and their registry.

Every metric is a small callable scoring one `Sample` (the original, the result, the keep mask and
the caption) and returning a float. The registry (`METRICS`) says what each metric is called in
reports, how the paper scales it, and which weight files ("resources") it needs; `build_scorers`
loads those files once and shares them (CLIP serves both the CLIP similarity and the aesthetic
score).

Implemented: `psnr`, `mse` (no weights), `lpips` (SqueezeNet-1.1 LPIPS), `clip` (CLIP ViT-L/14
similarity), `aesthetic` (LAION's linear head on CLIP ViT-L/14) and `hps` (HPS v2.1, OpenCLIP
ViT-H-14 run as a transformers CLIPModel; it takes its tokenizer, CLIP's BPE vocabulary, from the
`--clip-model` folder) and `image_reward` (ImageReward v1.0: BLIP ViT-L + BERT with cross-attention
run as transformers' Blip models). To add one: write its scorer (a class with `__call__(sample) -> float`), add its
weight files to `RESOURCES` if it needs new ones (with a loader in `Resources`), add a `MetricSpec`
to `METRICS` and remove it from `PLANNED`; `--metrics all`, the reports and the paper table pick it up.

PSNR and MSE are computed on the kept region (mask 0), in one of two modes:

- default: the conventional masked values, per channel: with K kept pixels and values in [0, 1],
  `MSE = sum over kept pixels and the 3 channels of (result - original)^2 / (3 K)` and
  `PSNR = 10 log10(1 / MSE)` (infinite for identical kept regions);
- `paper_compat=True`: the authors' formula (`calculate_psnr` / `calculate_mse` of
  examples/brushnet/evaluate_brushnet.py), reproduced operation for operation in float32:
  both images / 255, multiplied by the keep mask, `mse = sum((pred - gt)^2) / mask.sum()` where
  the sum runs over all pixels and the 3 channels but `mask.sum()` counts pixels, so this MSE is
  3x the per-channel one and the PSNR 10 log10(3) = 4.77 dB lower;
  `PSNR = 20 log10(1 / sqrt(mse))`, and `PSNR = 1000` when `mse < 1e-10`.

With no kept pixel at all both modes give NaN (the authors' formula divides 0 by 0); summaries
average the other images.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import PIL.Image

PAPER_PSNR_CAP = 1000.0
PAPER_MSE_FLOOR = 1.0e-10


@dataclass
class Sample:
    """One benchmark item to score: images of one size, `keep` True where the original is kept (mask 0)."""

    id: str
    caption: str
    original: PIL.Image.Image
    result: PIL.Image.Image
    keep: np.ndarray


def _rgb_array(image, name: str) -> np.ndarray:
    if isinstance(image, PIL.Image.Image):
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise ValueError(f"The {name} image must be a PIL image or an (H, W, 3) uint8 array; "
                         f"got {array.dtype} of shape {array.shape}.")
    return array


def _checked(result, original, keep) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    result, original = _rgb_array(result, "result"), _rgb_array(original, "original")
    keep = np.asarray(keep).astype(bool)
    if result.shape != original.shape:
        raise ValueError(f"The result is {result.shape[1]}x{result.shape[0]} but the original is "
                         f"{original.shape[1]}x{original.shape[0]}: compare images of one size.")
    if keep.shape != result.shape[:2]:
        raise ValueError(f"The keep mask is {keep.shape} but the images are {result.shape[:2]} (H, W).")
    return result, original, keep


def _paper_mse(result, original, keep) -> float:
    # The authors' steps in their dtype (float32) and order: /255, times the (H, W, 1) mask,
    # difference, square, sum over everything, divided by the number of kept pixels.
    pred = result.astype(np.float32) / np.float32(255.0)
    gt = original.astype(np.float32) / np.float32(255.0)
    mask = keep.astype(np.float32)[:, :, None]
    difference = pred * mask - gt * mask
    size = mask.sum()
    if size == 0:
        return math.nan
    return float((difference**2).sum() / size)


def _per_channel_mse(result, original, keep) -> float:
    if not keep.any():
        return math.nan
    difference = (result[keep].astype(np.float64) - original[keep].astype(np.float64)) / 255.0
    return float(np.mean(difference**2))


def masked_mse(result, original, keep, paper_compat: bool = False) -> float:
    """MSE of the kept region (values in [0, 1]); see the module docstring for the two modes."""
    result, original, keep = _checked(result, original, keep)
    return _paper_mse(result, original, keep) if paper_compat else _per_channel_mse(result, original, keep)


def masked_psnr(result, original, keep, paper_compat: bool = False) -> float:
    """PSNR (dB) of the kept region, peak 1; see the module docstring for the two modes."""
    mse = masked_mse(result, original, keep, paper_compat)
    if math.isnan(mse):
        return math.nan
    if paper_compat:
        return PAPER_PSNR_CAP if mse < PAPER_MSE_FLOOR else 20 * math.log10(1 / math.sqrt(mse))
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


class MaskedPSNR:
    """PSNR of the kept region (mask 0) between result and original. Higher is better."""

    def __init__(self, paper_compat: bool = False):
        self.paper_compat = paper_compat

    def __call__(self, sample: Sample) -> float:
        return masked_psnr(sample.result, sample.original, sample.keep, self.paper_compat)


class MaskedMSE:
    """MSE of the kept region (mask 0) between result and original, values in [0, 1]. Lower is better."""

    def __init__(self, paper_compat: bool = False):
        self.paper_compat = paper_compat

    def __call__(self, sample: Sample) -> float:
        return masked_mse(sample.result, sample.original, sample.keep, self.paper_compat)


# -- the registry ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResourceSpec:
    """Weight files some metrics need: the key in `weights`, the CLI option and what to download."""

    key: str
    option: str
    files: str
    count: int  # how many paths the entry holds


RESOURCES: dict[str, ResourceSpec] = {
    "lpips": ResourceSpec(
        "lpips", "--lpips-weights BACKBONE.pth HEADS.pth",
        "torchvision's squeezenet1_1-b8a52dc0.pth and the lpips package's v0.1 squeeze.pth", 2),
    "clip": ResourceSpec(
        "clip", "--clip-model DIR", "a CLIP ViT-L/14 folder in the openai/clip-vit-large-patch14 layout", 1),
    "aesthetic": ResourceSpec(
        "aesthetic", "--aesthetic-weights FILE", "LAION's sa_0_4_vit_l_14_linear.pth", 1),
    "hps": ResourceSpec(
        "hps", "--hps-weights FILE", "HPS v2.1's HPS_v2.1_compressed.pt (Hugging Face Hub: xswu/HPSv2)", 1),
    "image_reward": ResourceSpec(
        "image_reward", "--image-reward-weights ImageReward.pt BERT_TOKENIZER_DIR",
        "ImageReward v1.0's ImageReward.pt (Hugging Face Hub: THUDM/ImageReward) and a bert-base-uncased "
        "tokenizer folder", 2),
}


@dataclass(frozen=True)
class MetricSpec:
    name: str
    title: str  # column title in the reports
    paper_title: str  # column title in the paper's units
    paper_scale: float  # value in the paper = mean * paper_scale
    higher_is_better: bool
    needs: tuple[str, ...]  # keys of RESOURCES
    build: Callable[[Resources, bool], Callable[[Sample], float]]


def _build_lpips(resources: Resources, paper_compat: bool):
    from .lpips import MaskedLPIPS

    return MaskedLPIPS(resources.lpips())


def _build_clip(resources: Resources, paper_compat: bool):
    from .clip import CLIPSimilarity

    return CLIPSimilarity(resources.clip())


def _build_aesthetic(resources: Resources, paper_compat: bool):
    from .clip import AestheticScore

    embedder = resources.clip()
    return AestheticScore(embedder, resources.aesthetic_head(embedder.embedding_dim))


def _build_hps(resources: Resources, paper_compat: bool):
    from .hps import HPSMetric

    return HPSMetric(resources.hps())


def _build_image_reward(resources: Resources, paper_compat: bool):
    from .image_reward import ImageRewardMetric

    return ImageRewardMetric(resources.image_reward())


METRICS: dict[str, MetricSpec] = {
    "psnr": MetricSpec("psnr", "PSNR", "PSNR", 1.0, True, (), lambda r, p: MaskedPSNR(p)),
    "mse": MetricSpec("mse", "MSE", "MSE (×10³)", 1e3, False, (), lambda r, p: MaskedMSE(p)),
    "lpips": MetricSpec("lpips", "LPIPS", "LPIPS (×10³)", 1e3, False, ("lpips",), _build_lpips),
    "clip": MetricSpec("clip", "CLIP Sim", "CLIP Sim", 1.0, True, ("clip",), _build_clip),
    "aesthetic": MetricSpec("aesthetic", "Aesthetic Score", "AS", 1.0, True, ("clip", "aesthetic"), _build_aesthetic),
    # The tokenizer of HPS (CLIP's BPE vocabulary) comes from the --clip-model folder.
    "hps": MetricSpec("hps", "HPS v2.1", "HPS (×10²)", 1e2, True, ("clip", "hps"), _build_hps),
    "image_reward": MetricSpec("image_reward", "ImageReward", "IR (×10)", 10.0, True, ("image_reward",),
                               _build_image_reward),
}
PLANNED: dict[str, str] = {}  # metrics designed but not implemented yet: none at present
# The column order of the paper's tables: IR, HPS, AS, PSNR, MSE, LPIPS, CLIP Sim.
PAPER_ORDER = ("image_reward", "hps", "aesthetic", "psnr", "mse", "lpips", "clip")


def _ordered(names) -> list[str]:
    return sorted(dict.fromkeys(names), key=lambda n: PAPER_ORDER.index(n) if n in PAPER_ORDER else len(PAPER_ORDER))


def _check_resource_value(key: str, value) -> None:
    spec = RESOURCES[key]
    if spec.count == 1:
        if not isinstance(value, (str, bytes)) and not hasattr(value, "__fspath__"):
            raise ValueError(f"weights[{key!r}] must be one path ({spec.files}); got {value!r}.")
    elif isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != spec.count:
        raise ValueError(f"weights[{key!r}] must be {spec.count} paths ({spec.files}); got {value!r}.")


def resolve_metrics(selection: str | Sequence[str] = "auto", weights: Mapping | None = None) -> list[str]:
    """The metric names to compute, in the paper's order, after checking that their weights are given.

    `selection`: "all" (every implemented metric: their weights must be given), "auto" (PSNR, MSE
    and every metric whose weights are given, e.g. `clip` with `weights["clip"]`; a metric with only
    part of its files, such as `aesthetic` without `clip`, is an error), or names as a list or a
    comma-separated string.
    """
    weights = dict(weights or {})
    unknown_keys = [k for k in weights if k not in RESOURCES]
    if unknown_keys:
        raise ValueError(f"Unknown weights entry {unknown_keys[0]!r}; the entries are {', '.join(RESOURCES)}.")
    for key, value in weights.items():
        if value is not None:
            _check_resource_value(key, value)
    given = {k for k, v in weights.items() if v is not None}

    if isinstance(selection, str):
        text = selection.strip().lower()
        if text == "all":
            names = list(METRICS)
        elif text == "auto":
            names = [n for n, spec in METRICS.items() if set(spec.needs) <= given]
            # Weights that serve no metric lack a companion (the aesthetic head without CLIP):
            # select their metrics, so the missing files are reported below.
            used = {key for n in names for key in METRICS[n].needs}
            names += [n for n, spec in METRICS.items() if set(spec.needs) & (given - used)]
        else:
            names = [part.strip() for part in text.split(",") if part.strip()]
    else:
        names = [str(n).strip().lower() for n in selection]
    if not names:
        raise ValueError(f"No metric selected: choose from {', '.join(METRICS)} (or all).")
    for name in names:
        if name in PLANNED:
            raise ValueError(f"The metric {name} ({PLANNED[name]}) is not implemented yet; "
                             f"available: {', '.join(METRICS)}.")
        if name not in METRICS:
            planned = f" (planned: {', '.join(PLANNED)})" if PLANNED else ""
            raise ValueError(f"Unknown metric {name!r}; available: {', '.join(METRICS)}{planned}.")
    names = _ordered(names)

    missing = {}
    for name in names:
        for key in METRICS[name].needs:
            if key not in given:
                missing.setdefault(key, []).append(name)
    if missing:
        parts = [f"{', '.join(missing[key])} need{'s' if len(missing[key]) == 1 else ''} {spec.option} "
                 f"({spec.files})" for key, spec in RESOURCES.items() if key in missing]
        raise ValueError(f"Missing weight files: {'; '.join(parts)}; pass them or choose other metrics "
                         f"with --metrics (e.g. psnr,mse).")
    needed = {key for name in names for key in METRICS[name].needs}
    for key in sorted(given - needed):  # most likely a metric left out of --metrics by mistake
        logging.getLogger(__name__).warning("%s is given, but no metric of --metrics %s uses it: it is ignored.",
                                            RESOURCES[key].option.split()[0], ",".join(names))
    return names


class Resources:
    """Loads each weight resource once, on first use, onto `device`."""

    def __init__(self, weights: Mapping | None, device=None):
        self.weights = dict(weights or {})
        self.device = device
        self._cache: dict = {}

    def _get(self, key, load):
        if key not in self._cache:
            self._cache[key] = load()
        return self._cache[key]

    def lpips(self):
        from .lpips import LPIPSSqueeze

        backbone, heads = self.weights["lpips"]
        return self._get("lpips", lambda: LPIPSSqueeze.from_files(backbone, heads, self.device))

    def clip(self):
        from .clip import CLIPEmbedder

        return self._get("clip", lambda: CLIPEmbedder.from_pretrained(self.weights["clip"], self.device))

    def aesthetic_head(self, dim: int):
        from .clip import AestheticHead

        return self._get("aesthetic", lambda: AestheticHead.from_file(self.weights["aesthetic"], dim))

    def clip_tokenizer(self):
        """The tokenizer of the --clip-model folder, without loading the CLIP model unless it is loaded."""
        from .hps import load_clip_tokenizer

        if "clip" in self._cache:
            return self._cache["clip"].tokenizer
        return self._get("clip_tokenizer", lambda: load_clip_tokenizer(self.weights["clip"]))

    def hps(self):
        from .hps import HPSv2Score

        return self._get("hps", lambda: HPSv2Score.from_file(self.weights["hps"], self.clip_tokenizer(), self.device))

    def image_reward(self):
        from .image_reward import ImageRewardScore

        checkpoint, tokenizer_dir = self.weights["image_reward"]
        return self._get("image_reward", lambda: ImageRewardScore.from_file(checkpoint, tokenizer_dir, self.device))


def build_scorers(names: Sequence[str], weights: Mapping | None = None, device=None,
                  paper_compat: bool = False) -> dict[str, Callable[[Sample], float]]:
    """name -> scorer for already resolved metric names (see `resolve_metrics`); loads the weights."""
    resources = Resources(weights, device)
    return {name: METRICS[name].build(resources, paper_compat) for name in names}
