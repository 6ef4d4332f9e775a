"""GPU checks that CPU CI cannot make: CUDA fp32 parity with the goldens, fp16 and offloading paths
of the CLI, SDXL's fp16 VAE upcast, and fp16 mixed-precision training, all on the tiny golden models.

Run on a CUDA machine from the repository root, with the golden folder at GOLDEN (default
../shared/golden; copy it into the tree to carry it to a lent machine):

    GOLDEN=.devtmp/golden python3 tools/gpu_smoke.py
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

GOLDEN = Path(os.environ.get("GOLDEN", Path(__file__).resolve().parents[2] / "shared" / "golden"))


def check(name, ok, detail=""):
    print(f"{'PASS' if ok else 'FAIL'} {name} {detail}", flush=True)
    return ok


def golden_parity(kind: str, pipeline_class) -> bool:
    import diffusers

    case_dir = GOLDEN / kind
    case = json.loads((case_dir / "case.json").read_text())
    outputs = load_file(case_dir / "outputs.safetensors")
    pipe = pipeline_class.from_pretrained(case_dir).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    image = Image.open(case_dir / "masked_image.png").convert("RGB")
    mask = Image.open(case_dir / "mask.png").convert("RGB")
    ok = True
    for run in case["runs"]:
        config = {**run["scheduler_config"], **(run.get("stock_diffusers_scheduler_overrides") or {})}
        pipe.scheduler = getattr(diffusers, run["scheduler_class"]).from_config(config)
        images = pipe(image=image, mask=mask, generator=torch.Generator().manual_seed(run["seed"]),
                      output_type="np", **run["call_kwargs"]).images
        golden = outputs[case.get("output_aliases", {}).get(f"{run['prefix']}.images", f"{run['prefix']}.images")]
        error = np.abs(images - golden.numpy()).max() / golden.abs().max().item()
        # TF32 and other GPU kernels: looser than the CPU suite's 1e-4, still far below a visible change.
        ok &= check(f"{kind} {run['prefix']} cuda fp32 vs golden", error < 2e-3, f"max rel {error:.2e}")
    return ok


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "brushnet", *args], capture_output=True, text=True)


def main() -> int:
    from brushnet import StableDiffusionBrushNetPipeline, StableDiffusionXLBrushNetPipeline

    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    ok = golden_parity("sd15_tiny_pipeline", StableDiffusionBrushNetPipeline)
    ok &= golden_parity("sdxl_tiny_pipeline", StableDiffusionXLBrushNetPipeline)

    work = Path(tempfile.mkdtemp())
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (250, 333, 3), dtype=np.uint8)).save(work / "p.jpg")
    hole = np.zeros((250, 333), np.uint8)
    hole[80:140, 100:160] = 255
    Image.fromarray(hole).save(work / "m.png")
    runs = {"sd15_tiny_pipeline": (["--dtype", "fp16", "--crop-to-mask"], ["--dtype", "fp16", "--offload", "model"],
                                   ["--dtype", "bf16", "--offload", "sequential"]),
            "sdxl_tiny_pipeline": (["--dtype", "fp16"], ["--dtype", "fp16", "--offload", "model"])}
    for kind, variants in runs.items():
        base = GOLDEN / kind
        for extra in variants:
            out = work / f"{kind}-{'-'.join(extra)}.png"
            result = cli("inpaint", str(work / "p.jpg"), str(work / "m.png"), "-p", "a cat", "--base", str(base),
                         "--brushnet", str(base / "brushnet"), "--steps", "3", "--device", "cuda", "--out", str(out),
                         *extra)
            fine = result.returncode == 0 and out.is_file()
            if fine:
                pixels = np.asarray(Image.open(out), dtype=np.float32)
                fine = bool(np.isfinite(pixels).all()) and pixels.std() > 1
            ok &= check(f"cli {kind} {' '.join(extra)}", fine, result.stderr.strip().splitlines()[-1:] if not fine
                        else "")

    data = work / "data"
    (data / "masks").mkdir(parents=True)
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(data / f"{i}.png")
        Image.fromarray(hole[:32, 100:132]).save(data / "masks" / f"{i}.png")
        (data / f"{i}.txt").write_text("a photo")
    for kind in ("sd15_tiny_pipeline", "sdxl_tiny_pipeline"):
        out = work / f"train-{kind}"
        result = cli("train", "--pretrained_model_name_or_path", str(GOLDEN / kind), "--train_data_dir", str(data),
                     "--output_dir", str(out), "--resolution", "16", "--train_batch_size", "4",
                     "--max_train_steps", "4", "--mixed_precision", "fp16", "--gradient_checkpointing",
                     "--report_to", "none", "--seed", "0")
        ok &= check(f"train {kind} fp16 on cuda", result.returncode == 0 and (out / "config.json").is_file(),
                    result.stderr.strip().splitlines()[-1:] if result.returncode else "")
    print("ALL PASS" if ok else "SOME FAILED", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
