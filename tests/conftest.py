"""Shared test setup: one CPU thread, the golden reference data, relative-error assertions."""

import json
import os
from pathlib import Path

import pytest
import torch

# Two-thread torch collapses when the other core is busy; the goldens allow for 1 vs 2 threads.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(os.environ.get("BRUSHNET_GOLDEN", REPO.parent / "shared" / "golden"))

# Largest relative error seen per golden case, reported at the end of the run.
GOLDEN_ERRORS: dict[str, float] = {}


class GoldenCase:
    def __init__(self, name: str):
        from safetensors.torch import load_file

        self.name = name
        self.dir = GOLDEN / name
        if not self.dir.is_dir():
            raise FileNotFoundError(f"Golden data missing at {self.dir}; set BRUSHNET_GOLDEN to the folder.")
        self.case = json.loads((self.dir / "case.json").read_text())
        inputs = self.dir / "inputs.safetensors"
        self.inputs = load_file(inputs) if inputs.exists() else {}
        outputs = self.dir / "outputs.safetensors"
        self.outputs = load_file(outputs) if outputs.exists() else {}

    def __getitem__(self, key: str) -> torch.Tensor:
        key = self.case.get("output_aliases", {}).get(key, key)
        return self.outputs[key]

    def __contains__(self, key: str) -> bool:
        return key in self.outputs or key in self.case.get("output_aliases", {})

    def check(self, key: str, actual: torch.Tensor, rel: float, golden: torch.Tensor | None = None) -> float:
        """Assert max|actual - golden| <= rel * max|golden| and record the ratio."""
        expected = self[key] if golden is None else golden
        actual = torch.as_tensor(actual).detach().to(torch.float64).cpu()
        expected = expected.to(torch.float64)
        assert actual.shape == expected.shape, f"{self.name}/{key}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
        scale = expected.abs().max().item() or 1.0
        error = (actual - expected).abs().max().item() / scale
        GOLDEN_ERRORS[self.name] = max(GOLDEN_ERRORS.get(self.name, 0.0), error)
        assert error <= rel, f"{self.name}/{key}: max relative error {error:.3e} > {rel:.0e}"
        return error


    def check_residuals(self, prefix: str, residuals, first, rel: float):
        """Check one model run's (down, mid, up) residuals: every residual of the first run, and for
        later runs the multiplier each carries relative to the first. Returns the first run's."""
        down, mid, up = residuals
        assert (len(down), len(up)) == (self.case["n_down_residuals"], self.case["n_up_residuals"])
        if first is None:
            first = residuals
            for i, r in enumerate(down):
                self.check(f"{prefix}.down_res.{i}", r, rel)
            for i, r in enumerate(up):
                self.check(f"{prefix}.up_res.{i}", r, rel)
        else:
            # Each residual relative to the first run carries exactly the run's multiplier.
            ratios = torch.tensor([
                (r.double() * f.double()).sum() / f.double().square().sum()
                for r, f in zip([*down, mid, *up], [*first[0], first[1], *first[2]])
            ])
            self.check(f"{prefix}.residual_multipliers", ratios, rel)
        self.check(f"{prefix}.mid_res", mid, rel)
        return first


@pytest.fixture(scope="session")
def golden():
    cache = {}

    def load(name: str) -> GoldenCase:
        if name not in cache:
            cache[name] = GoldenCase(name)
        return cache[name]

    return load


@pytest.fixture(scope="session")
def golden_pipeline(golden):
    """`load(name, cls)`: a golden pipeline case loaded with pipeline class `cls` (progress bar off),
    with its init image (RGB) and mask (L): (pipe, image, mask). Each call loads a fresh pipeline."""
    from PIL import Image

    def load(name: str, cls):
        directory = golden(name).dir
        pipe = cls.from_pretrained(directory)
        pipe.set_progress_bar_config(disable=True)
        image = Image.open(directory / "init_image.png").convert("RGB")
        return pipe, image, Image.open(directory / "mask.png").convert("L")

    return load


@pytest.fixture(scope="module")
def tiny_sd15_base(golden):
    """The golden tiny SD1.5 BrushNet pipeline's folder (its BrushNet in brushnet/)."""
    return golden("sd15_tiny_pipeline").dir


@pytest.fixture(scope="module")
def tiny_sd15_pipe(tiny_sd15_base):
    """That pipeline loaded, one per test module (tests may change its settings)."""
    from brushnet import StableDiffusionBrushNetPipeline

    pipe = StableDiffusionBrushNetPipeline.from_pretrained(tiny_sd15_base)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pytest_terminal_summary(terminalreporter):
    if GOLDEN_ERRORS:
        terminalreporter.write_sep("-", "golden cases: max relative error")
        for name, error in sorted(GOLDEN_ERRORS.items()):
            terminalreporter.write_line(f"{name:24s} {error:.2e}")


@pytest.fixture
def unreachable_hub(monkeypatch):
    """The hub as on a machine without a network: HF_HUB_OFFLINE (set above for every test) and
    proxies unset, and the reachability probe answering "unreachable". A request that slips past
    local_files_only then retries for 20-30 s with a warning per try, so tests time the load and
    read stderr. Returns the list of probe calls."""
    from huggingface_hub import constants

    from brushnet import hub

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", *hub.PROXY_VARIABLES):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    calls = []
    monkeypatch.setattr(hub, "endpoint_reachable", lambda *args, **kwargs: calls.append(args) or False)
    return calls

