"""tools/bench_reference.py: the side of it that runs in this environment (the authors' fork, the
other side, is installed by hand and never in CI)."""

import json
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch

TOOL = Path(__file__).resolve().parents[1] / "tools" / "bench_reference.py"


def test_our_side_times_the_saved_models_and_stock_diffusers_is_refused_as_the_reference(tmp_path):
    tool = runpy.run_path(str(TOOL))
    models, out = tmp_path / "models", tmp_path / "out"
    tool["build_models"](models, 32, tiny=True)
    assert not (tmp_path / "models.partial").exists()
    out.mkdir()
    tool["run_side"]("ours", models, out, 2, 1, "fp32")
    row = json.loads((out / "ours.json").read_text())
    assert len(row["seconds"]) == 1 and row["first_call"] > 0 and row["peak_rss_gib"] > 0
    image = np.load(out / "ours.npy")
    assert image.shape == (1, 32, 32, 3) and 0 <= image.min() and image.max() <= 1 and image.std() > 0
    with pytest.raises(SystemExit, match="not the authors' fork"):
        tool["load_side"]("reference", models, torch.float32)


def test_a_reference_python_that_is_not_there_is_one_line_before_any_work(tmp_path, capsys):
    tool = runpy.run_path(str(TOOL))
    with pytest.raises(SystemExit) as exit:
        tool["main"](["--reference-python", str(tmp_path / "nope" / "python"), "--tiny", "--size", "32",
                      "--workdir", str(tmp_path / "work")])
    assert exit.value.code == 2 and "is not a python to run" in capsys.readouterr().err
    assert not (tmp_path / "work").exists()
