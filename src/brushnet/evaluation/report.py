"""Reports of a benchmark run: per_image.csv, summary.csv/.json/.md and a static gallery.html."""

from __future__ import annotations

import csv
import html
import io
import json
import math
from pathlib import Path
from urllib.parse import quote

import numpy as np
import PIL.Image

from ..files import atomic_write
from ..metadata import save_png
from .metrics import METRICS, PAPER_ORDER, PLANNED

GALLERY_DIR = "gallery"
# Every report file a run writes into its output folder (the gallery's thumbnails aside).
REPORT_FILES = ("per_image.csv", "summary.csv", "summary.json", "summary.md", "gallery.html")


def remove_reports(out_dir: Path) -> None:
    """Delete a previous run's reports before new ones are written: an interrupt in between leaves
    some missing, never one run's gallery beside another's summary."""
    for name in REPORT_FILES:
        (out_dir / name).unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    """Write a text file atomically (a temporary file renamed over the target)."""
    with atomic_write(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)


def json_value(value):
    """A float as JSON allows it: NaN -> null, infinities -> "inf" / "-inf"."""
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
    return value


def mean_of(values) -> tuple[float, int]:
    """Mean over the values that are not NaN (an infinite value makes it infinite), and their count."""
    kept = [v for v in values if v is not None and not math.isnan(v)]
    return (sum(kept) / len(kept) if kept else math.nan), len(kept)


def summarise(records: list[dict], names: list[str]) -> dict:
    metrics = {}
    for name in names:
        spec = METRICS[name]
        mean, count = mean_of([r[name] for r in records])
        metrics[name] = {"title": spec.title, "mean": mean, "count": count, "paper_title": spec.paper_title,
                         "paper_scale": spec.paper_scale, "paper_value": mean * spec.paper_scale,
                         "higher_is_better": spec.higher_is_better}
    return metrics


def _fmt(value: float, digits: int = 2) -> str:
    if value is None or math.isnan(value):
        return "–"
    if math.isinf(value):
        return "inf"
    return f"{value:.{digits}f}"


def write_per_image_csv(path: Path, records: list[dict], names: list[str]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["id", "image", "result", "caption", *names])
    for r in records:
        writer.writerow([r["id"], r["image"], r["result"], r["caption"], *(repr(float(r[n])) for n in names)])
    write_text(path, buffer.getvalue())


def write_summaries(out_dir: Path, summary: dict) -> None:
    names = list(summary["metrics"])
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["metric", "title", "mean", "count", "paper_title", "paper_value"])
    for name in names:
        m = summary["metrics"][name]
        writer.writerow([name, m["title"], repr(float(m["mean"])), m["count"], m["paper_title"],
                         repr(float(m["paper_value"]))])
    write_text(out_dir / "summary.csv", buffer.getvalue())

    def clean(obj):
        if isinstance(obj, dict):
            return {k: clean(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [clean(v) for v in obj]
        return json_value(obj)

    write_text(out_dir / "summary.json", json.dumps(clean(summary), indent=2, sort_keys=False) + "\n")
    write_text(out_dir / "summary.md", summary_markdown(summary))


def summary_markdown(summary: dict) -> str:
    names = list(summary["metrics"])
    titles = ["Images", *(summary["metrics"][n]["paper_title"] for n in names)]
    values = [str(summary["count"]), *(_fmt(summary["metrics"][n]["paper_value"]) for n in names)]
    lines = [f"# {summary['benchmark']} — {summary['mask_key']}", "",
             "| " + " | ".join(titles) + " |", "|" + "---:|" * len(titles), "| " + " | ".join(values) + " |", ""]
    lines.append("Columns in the paper's units and order (IR x10, HPS x100, AS, PSNR, MSE x10^3, LPIPS x10^3, "
                 "CLIP Sim); PSNR, MSE and LPIPS on the kept region (mask 0).")
    if "psnr" in names or "mse" in names:
        if summary["paper_compat"]:
            lines.append("PSNR/MSE: the authors' formula (squared error summed over RGB / kept pixels; PSNR 1000 "
                         "when MSE < 1e-10).")
        else:
            lines.append("PSNR/MSE: conventional per-channel values (the authors' MSE is 3x this one, their PSNR "
                         "4.77 dB lower; --paper-compat reproduces them).")
    if summary.get("jpeg_quality"):
        lines.append(f"Results scored after a JPEG round trip at quality {summary['jpeg_quality']}, as the authors' "
                     "script saves them.")
    if summary.get("images_dir"):
        lines.append(f"Results evaluated from {summary['images_dir']}.")
    else:
        s = summary["settings"]
        lines.append(f"Generation: {summary['scheduler']}, {s['steps']} steps, CFG {s['guidance']}, seed {s['seed']} "
                     f"for every image, BrushNet scale {s['scale']}, blending {'on' if s['blend'] else 'off'}.")
    skipped = [n for n in PAPER_ORDER if n not in names]
    if skipped:
        lines.append("Not computed: " + ", ".join(
            f"{n} (not implemented)" if n in PLANNED else n for n in skipped) + ".")
    return "\n".join(lines) + "\n"


# -- gallery ------------------------------------------------------------------------------------


def _thumbnail(image: PIL.Image.Image, size: int) -> PIL.Image.Image:
    thumb = image.convert("RGB").copy()
    thumb.thumbnail((size, size), PIL.Image.LANCZOS)
    return thumb


def _url(relative: str) -> str:
    return html.escape(quote(relative))


def masked_original(original: PIL.Image.Image, hole: np.ndarray) -> PIL.Image.Image:
    """The original with the hole blacked out: what the model is given (the authors' `_masked` image)."""
    array = np.asarray(original.convert("RGB")).copy()
    array[hole] = 0
    return PIL.Image.fromarray(array)


def write_gallery(out_dir: Path, rows: list[dict], names: list[str], summary: dict, size: int = 256) -> Path:
    """gallery.html: one row per item (original | masked | result) with relative links to PNG thumbnails
    written to out_dir/gallery/; the result links to the full-size PNG when it lies in out_dir.

    Each row: {"id", "caption", "original": PIL, "masked": PIL, "result": PIL, "result_link": str | None,
    and the metric values}."""
    folder = out_dir / GALLERY_DIR
    cells = []
    for row in rows:
        links = {}
        for kind in ("original", "masked", "result"):
            name = f"{row['id']}-{kind}.png"
            save_png(_thumbnail(row[kind], size), folder / name, {"gallery": kind, "id": row["id"]}, overwrite=True)
            links[kind] = f"{GALLERY_DIR}/{name}"
        scores = "<br>".join(f"{html.escape(METRICS[n].title)}: {_fmt(row[n], 4)}" for n in names)
        targets = {**links, "result": row.get("result_link") or links["result"]}
        images = "".join(f'<td><a href="{_url(targets[k])}"><img src="{_url(links[k])}" '
                         f'loading="lazy" alt="{k}"></a></td>' for k in ("original", "masked", "result"))
        cells.append(f"<tr><td class=id>{html.escape(row['id'])}</td>{images}"
                     f"<td>{html.escape(row['caption'])}<p class=scores>{scores}</p></td></tr>")
    header = "".join(f"<th>{html.escape(summary['metrics'][n]['paper_title'])}</th>" for n in names)
    means = "".join(f"<td>{_fmt(summary['metrics'][n]['paper_value'])}</td>" for n in names)
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(summary['benchmark'])} — {html.escape(summary['mask_key'])}</title>
<style>
body {{ font-family: sans-serif; margin: 1em; }}
table {{ border-collapse: collapse; }}
td, th {{ border: 1px solid #ccc; padding: 4px; vertical-align: top; }}
img {{ max-width: {size}px; max-height: {size}px; display: block; }}
.scores {{ font-size: small; color: #444; }}
.id {{ font-family: monospace; }}
</style></head><body>
<h1>{html.escape(summary['benchmark'])} — {html.escape(summary['mask_key'])} ({summary['count']} images)</h1>
<table><tr>{header}</tr><tr>{means}</tr></table>
<p>Means in the paper's units; see summary.md.</p>
<table>
<tr><th>id</th><th>original</th><th>masked</th><th>result</th><th>caption and scores</th></tr>
{chr(10).join(cells)}
</table>
</body></html>
"""
    path = out_dir / "gallery.html"
    write_text(path, page)
    return path
