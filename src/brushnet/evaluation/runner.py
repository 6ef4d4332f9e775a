"""Run a BrushBench / EditBench evaluation: generate (resumably), score, report.

The paper's protocol (`paper_settings()`): UniPC, 50 steps, classifier-free guidance 7.5, BrushNet
scale 1.0, seed 1234 for every image, no blending unless asked (the paper's `*` rows blend).
Results are written to `out_dir/images/<id>.png` with their generation parameters
(`brushnet.metadata.save_png`); an image already there is kept (the run resumes), after checking
that it was made with the same settings.

Several processes (e.g. one per GPU) split the items, item i going to the process with
`i % world_size == rank`:

    accelerate launch --num_processes 4 -m brushnet bench data/BrushBench --base ... --brushnet ... --out runs/bb

Each process generates and scores its share and writes it to `out_dir/.bench-parts/`; process 0
waits for every share (polling the folder, so no collective times out during long generations),
then writes the reports: `per_image.csv`, `summary.csv`, `summary.json`, `summary.md` (the paper's
units) and `gallery.html`. Without `accelerate launch` (or without accelerate) it is one process.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import PIL.Image

from ..inpaint import InpaintSettings
from ..metadata import read_png_params, save_png
from ..processes import ProcessInfo, process_info, shard
from .benchmark import DEFAULT_GRID, BenchmarkItem, load_benchmark
from .metrics import Sample, build_scorers, resolve_metrics
from .report import (
    masked_original,
    remove_reports,
    summarise,
    write_gallery,
    write_per_image_csv,
    write_summaries,
    write_text,
)

logger = logging.getLogger(__name__)

PAPER_SEED = 1234
DEFAULT_SCHEDULER = "unipc"
IMAGES_DIR = "images"
PARTS_DIR = ".bench-parts"
RESULT_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
# Recorded parameters that must agree for an existing image to be reused.
RESUME_KEYS = ("prompt", "negative_prompt", "steps", "guidance", "scale", "start", "end", "seed", "blend",
               "blend_kernel", "crop_to_mask", "context", "scheduler", "mask_key", "base_hash", "brushnet_hash",
               "dtype", "loras", "vae_tiling", "source_image", "item_hash")


def paper_settings(**overrides) -> InpaintSettings:
    """The paper's generation settings (the prompt is each item's caption)."""
    values = {"prompt": "", "steps": 50, "guidance": 7.5, "scale": 1.0, "seed": PAPER_SEED, "blend": False}
    values.update(overrides)
    return InpaintSettings(**values)


def find_result(images_dir: Path, item: BenchmarkItem) -> Path | None:
    """A result made elsewhere: `<id>.png|.jpg|.jpeg|.webp`, or the item's image path relative to
    `images_dir` (how the authors' script lays its results out)."""
    for suffix in RESULT_SUFFIXES:
        path = images_dir / f"{item.id}{suffix}"
        if path.is_file():
            return path
    path = images_dir / item.image
    return path if path.is_file() else None


def jpeg_roundtrip(image: PIL.Image.Image, quality: int) -> PIL.Image.Image:
    """The image after saving it as JPEG (PIL, 4:2:0) at `quality` and reading it back."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with PIL.Image.open(buffer) as decoded:
        return decoded.convert("RGB")


def _open_result(path: Path, item: BenchmarkItem) -> PIL.Image.Image:
    from ..masks import as_rgb

    try:
        with PIL.Image.open(path) as image:
            image = as_rgb(image)  # a 16-bit result scaled, as the originals are, not clipped to white
    except (OSError, PIL.UnidentifiedImageError) as error:
        raise ValueError(f"Item {item.id}: the result {path} could not be read ({error}).") from None
    if image.size != (item.grid, item.grid):
        # The authors' evaluation resizes every result to 512x512 (PIL's default, bicubic).
        image = image.resize((item.grid, item.grid), PIL.Image.BICUBIC)
    return image


def _item_hash(item: BenchmarkItem) -> str:
    """What a result was made from, the original's bytes and the hole: a rerun must not reuse an image
    made before either changed (results of earlier versions, which lack it, are reused as before)."""
    digest = hashlib.sha256(item.image_path.read_bytes())
    digest.update(json.dumps(list(item.rle)).encode())
    return digest.hexdigest()[:16]


def _check_existing(path: Path, params: dict) -> None:
    try:
        old = read_png_params(path)
    except ValueError:
        raise ValueError(f"{path} was not made by brushnet bench (no parameters in it): delete it, or evaluate "
                         "such images with --images.") from None
    for key in RESUME_KEYS:
        if key in old and key in params and old[key] != params[key]:
            raise ValueError(f"{path} was generated with {key}={old[key]!r}, not {params[key]!r}: use another "
                             f"output folder (or delete {path.parent}) to run with these settings.")


def _settings_dict(settings: InpaintSettings) -> dict:
    values = settings.as_dict()
    values.pop("extra", None)
    return values


def run_benchmark(
    bench_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    mask_key: str = "inpainting_mask",
    pipe=None,
    pipe_loader: Callable[[], object] | None = None,
    settings: InpaintSettings | None = None,
    scheduler: str | None = DEFAULT_SCHEDULER,
    images_dir: str | os.PathLike | None = None,
    metrics: str | Sequence[str] = "auto",
    weights: dict | None = None,
    paper_compat: bool = False,
    jpeg_quality: int | None = None,
    grid: int = DEFAULT_GRID,
    device: str | None = None,
    model_params: dict | None = None,
    gallery: bool = True,
    gallery_size: int = 256,
    progress: bool = True,
    process: ProcessInfo | None = None,
    poll_interval: float = 2.0,
) -> dict | None:
    """Generate (unless `images_dir`), score and report one benchmark; returns the summary on process 0
    (None on the others).

    - `pipe`: a loaded BrushNet pipeline, or `pipe_loader`: a function returning one, called only if
      some image is still to be generated (a resumed run that has them all loads nothing).
      `scheduler` (default "unipc", the paper's; None keeps the pipeline's) is set on the pipeline.
    - `settings`: an `InpaintSettings` template (default `paper_settings()`); each item's caption
      replaces its prompt. One image per item.
    - `images_dir`: score results made elsewhere instead, found by id (`<id>.png`, `.jpg`, ...) or
      by the item's relative image path.
    - `metrics`: "auto" (PSNR, MSE and every metric whose weights are given), "all", or names;
      `weights`: {"lpips": (backbone, heads), "clip": folder or hub id, "aesthetic": file, "hps": file} (see
      `brushnet.evaluation.metrics`). `paper_compat` selects the authors' PSNR/MSE formula.
    - `jpeg_quality`: score each result after a JPEG round trip at that quality (75 = what the
      authors' script does by saving results under the benchmark's .jpg names); the PNGs stay lossless.
    - `grid`: the side of the square mask grid (512 for BrushBench and EditBench).
    - `model_params`: recorded in every PNG (e.g. model paths and hashes) and checked on resume.
    """
    names = resolve_metrics(metrics, weights)
    bench = load_benchmark(bench_dir, mask_key, grid)
    empty = [item.id for item in bench.items if not any(item.rle[1::2])]
    if empty:
        # Nothing to inpaint: the model's output is the image, and every score of those items is
        # the image's own, which lifts the means.
        shown = ", ".join(empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
        logger.warning("%d item(s) have an empty %s (no pixel to fill), so they score the image as given: %s.",
                       len(empty), mask_key, shown)
    settings = settings if settings is not None else paper_settings()
    if settings.num_images != 1:
        raise ValueError(f"A benchmark run makes one image per item; got num_images={settings.num_images}.")
    if jpeg_quality is not None and not 1 <= jpeg_quality <= 100:
        raise ValueError(f"The JPEG quality must be between 1 and 100; got {jpeg_quality}.")
    out_dir = Path(out_dir).expanduser()
    if images_dir is not None:
        if pipe is not None or pipe_loader is not None:
            raise ValueError("images_dir scores existing results: give no pipeline with it.")
        images_dir = Path(images_dir).expanduser()
        if images_dir.is_file():
            raise ValueError(f"--images {images_dir} is a file: give the folder of results.")
        if not images_dir.is_dir():
            raise ValueError(f"The results folder {images_dir} does not exist.")
    elif pipe is None and pipe_loader is None:
        raise ValueError("Nothing to evaluate: give a pipeline (pipe or pipe_loader) to generate the images, "
                         "or images_dir with results made elsewhere.")
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"The output {out_dir} is a file: give a folder.")

    process = process or process_info()
    rank, world = process.rank, process.world_size
    device = device or process.device or "cpu"
    results_folder = (out_dir / IMAGES_DIR).resolve()
    if images_dir is None and any(item.image_path.parent == results_folder for item in bench.items):
        # Its results would be written over the benchmark's own images (and its originals read as results).
        raise ValueError(f"--out {out_dir} would put the results in {results_folder}, where the benchmark's own "
                         "images are: give an output folder outside the benchmark folder.")
    mine = shard(bench.items, rank, world)
    model_params = dict(model_params or {})

    # Weights load before any generation, so a bad file stops the run at once.
    scorers = build_scorers(names, weights, device=device, paper_compat=paper_compat)

    results: dict[str, Path] = {}
    todo = []
    generated = skipped = 0
    if images_dir is not None:
        missing = []
        for item in mine:
            found = find_result(images_dir, item)
            if found is None:
                missing.append(item.id)
            else:
                results[item.id] = found
        if missing:
            raise ValueError(f"No result in {images_dir} for {len(missing)} item(s), e.g. {', '.join(missing[:3])}: "
                             "name them <id>.png (or .jpg), or lay them out as the benchmark's images.")
    else:
        scheduler_name = scheduler or "pipeline default"
        for item in mine:
            path = out_dir / IMAGES_DIR / f"{item.id}.png"
            params = {**_settings_dict(replace(settings, prompt=item.caption)), **model_params,
                      "scheduler": scheduler_name, "benchmark": bench.name, "benchmark_id": item.id,
                      "mask_key": mask_key, "source_image": item.image, "item_hash": _item_hash(item),
                      "width": grid, "height": grid}
            results[item.id] = path
            if path.exists():
                _check_existing(path, params)
                skipped += 1
            else:
                todo.append((item, path, params))

    # Everything checked: from here on the run writes into out_dir.
    token = _start_parts(out_dir, process)
    if images_dir is None and todo:
        generated = _generate(todo, pipe if pipe is not None else pipe_loader(), settings, scheduler, progress,
                              rank, world)

    records = []
    for item in _progress(mine, progress, f"scoring{_rank_tag(rank, world)}"):
        original = item.load_image()
        result = _open_result(results[item.id], item)
        if jpeg_quality is not None:
            result = jpeg_roundtrip(result, jpeg_quality)
        sample = Sample(item.id, item.caption, original, result, item.keep())
        record = {"id": item.id, "image": item.image, "caption": item.caption,
                  "result": results[item.id].relative_to(out_dir).as_posix() if images_dir is None
                  else str(results[item.id])}
        record.update({name: float(scorer(sample)) for name, scorer in scorers.items()})
        records.append(record)
    _write_part(out_dir, token, rank, world, {"records": records, "generated": generated, "skipped": skipped})

    if rank != 0:
        return None
    parts = _collect_parts(out_dir, token, world, poll_interval)
    order = {item.id: index for index, item in enumerate(bench.items)}
    records = sorted((r for part in parts for r in part["records"]), key=lambda r: order[r["id"]])
    summary = {
        "benchmark": bench.name, "benchmark_dir": str(bench.root), "mask_key": mask_key, "grid": grid,
        "count": len(records), "metrics": summarise(records, names), "paper_compat": paper_compat,
        "jpeg_quality": jpeg_quality, "images_dir": str(images_dir) if images_dir is not None else None,
        "generated": sum(p["generated"] for p in parts), "skipped": sum(p["skipped"] for p in parts),
        "settings": _settings_dict(settings) | {"prompt": "<caption>"}, "scheduler": scheduler or "pipeline default",
        "model": model_params, "processes": world,
    }
    for name, metric in summary["metrics"].items():
        if metric["count"] < len(records):  # its mean is over fewer images, or NaN over none
            logger.warning("%s: %d of %d image(s) gave no value (NaN: %s), so its mean is over %d.", name,
                           len(records) - metric["count"], len(records),
                           "no kept pixel to compare" if name in ("psnr", "mse", "lpips")
                           else "the metric returned NaN; check its weights", metric["count"])
    remove_reports(out_dir)
    write_per_image_csv(out_dir / "per_image.csv", records, names)
    write_summaries(out_dir, summary)
    if gallery:
        _write_gallery(out_dir, bench, records, names, summary, images_dir is None, gallery_size)
    _finish_parts(out_dir)
    return summary


# -- generation ---------------------------------------------------------------------------------


def _generate(todo, pipe, settings: InpaintSettings, scheduler: str | None, progress: bool, rank: int,
              world: int) -> int:
    from ..inpaint import inpaint
    from ..schedulers import make_scheduler

    if scheduler is not None:
        pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    count = 0
    for item, path, params in _progress(todo, progress, f"generating{_rank_tag(rank, world)}"):
        image = item.load_image()
        result = inpaint(pipe, image, item.mask_image(), replace(settings, prompt=item.caption))[0]
        save_png(result, path, params)
        count += 1
    return count


def _progress(items, enabled: bool, desc: str):
    if not enabled or not items:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, leave=False)


def _rank_tag(rank: int, world: int) -> str:
    return f" [{rank}/{world}]" if world > 1 else ""


# -- the shares of several processes --------------------------------------------------------------


def _start_parts(out_dir: Path, process: ProcessInfo) -> str:
    """Process 0 clears what an earlier run left and writes this run's token; all then read it."""
    parts = out_dir / PARTS_DIR
    if process.rank == 0:
        parts.mkdir(parents=True, exist_ok=True)
        for old in parts.glob("rank-*.json"):
            old.unlink()
        write_text(parts / "token", uuid.uuid4().hex)
    process.wait_for_everyone()
    return (parts / "token").read_text().strip()


def _part_path(out_dir: Path, rank: int, world: int) -> Path:
    return out_dir / PARTS_DIR / f"rank-{rank}-of-{world}.json"


def _write_part(out_dir: Path, token: str, rank: int, world: int, data: dict) -> None:
    # json writes NaN/Infinity, which json reads back: per-image values keep their exact floats.
    write_text(_part_path(out_dir, rank, world), json.dumps({"token": token, **data}))


def _collect_parts(out_dir: Path, token: str, world: int, poll_interval: float) -> list[dict]:
    parts: dict[int, dict] = {}
    next_note = time.monotonic() + 60
    while True:
        for rank in range(world):
            path = _part_path(out_dir, rank, world)
            if rank not in parts and path.is_file():
                data = json.loads(path.read_text())
                if data.get("token") == token:
                    parts[rank] = data
        if len(parts) == world:
            break
        if time.monotonic() > next_note:
            logger.warning("waiting for %d other process(es) to finish their share", world - len(parts))
            next_note = time.monotonic() + 600
        time.sleep(poll_interval)
    return [parts[rank] for rank in range(world)]


def _finish_parts(out_dir: Path) -> None:
    parts = out_dir / PARTS_DIR
    for path in parts.glob("*"):
        path.unlink()
    parts.rmdir()


# -- gallery ------------------------------------------------------------------------------------


def _write_gallery(out_dir, bench, records, names, summary, linked: bool, size: int) -> None:
    items = {item.id: item for item in bench.items}
    rows = []
    for record in records:
        item = items[record["id"]]
        original = item.load_image()
        result_path = out_dir / record["result"] if linked else Path(record["result"])
        rows.append({**record, "original": original, "masked": masked_original(original, item.hole()),
                     "result": _open_result(result_path, item), "result_link": record["result"] if linked else None})
    write_gallery(out_dir, rows, names, summary, size)
