"""BrushBench / EditBench evaluation: `brushnet bench`.

- `benchmark`: `load_benchmark(folder, mask_key, grid=512)` reads and checks `mapping_file.json`.
- `metrics`: masked PSNR/MSE (conventional or the authors' formula), the metric registry.
- `lpips`: SqueezeNet-1.1 LPIPS in plain torch; `clip`: CLIP similarity and LAION's aesthetic score.
- `runner`: `run_benchmark(...)` generates, scores and writes the reports.
- `cli`: `add_bench_command(commands)` / `cmd_bench(args)`.

Names are imported on first use, so building the command line does not import torch.
"""

import importlib

_EXPORTS = {
    "Benchmark": ".benchmark",
    "BenchmarkItem": ".benchmark",
    "load_benchmark": ".benchmark",
    "METRICS": ".metrics",
    "Sample": ".metrics",
    "build_scorers": ".metrics",
    "masked_mse": ".metrics",
    "masked_psnr": ".metrics",
    "resolve_metrics": ".metrics",
    "LPIPSSqueeze": ".lpips",
    "CLIPEmbedder": ".clip",
    "CLIPSimilarity": ".clip",
    "AestheticHead": ".clip",
    "AestheticScore": ".clip",
    "HPSv2Score": ".hps",
    "ImageRewardScore": ".image_reward",
    "paper_settings": ".runner",
    "run_benchmark": ".runner",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'brushnet.evaluation' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
