"""The models a `brushnet serve` offers: named on its command line, checked at start, loaded on use.

Each `--models` entry is either

- `DIR`: a BrushNet pipeline folder, whose model_index.json has a `brushnet` entry (what
  `pipe.save_pretrained` writes, or the built-in demo model's layout), or
- `BASE::BRUSHNET`: a base model (diffusers folder or single checkpoint file) and a BrushNet (folder
  or single .safetensors file), given separately; a PowerPaint v2 branch is a BrushNet here, or
- `DIR`: a PowerPaint v2 release folder, its `PowerPaint_Brushnet/` beside one base pipeline folder
  (the release ships `realisticVisionV60B1_v51VAE/`).

Only local paths are accepted: the server checks every entry at start, offline, and fetches
nothing. The page's model picker shows each entry's name; the browser sends that name back and the
server looks it up here, so no request can name a path of its own.
"""

from __future__ import annotations

import gc
import json
import threading
from argparse import Namespace
from dataclasses import dataclass, replace
from pathlib import Path

PAIR_SEPARATOR = "::"
POWERPAINT_FOLDER = "PowerPaint_Brushnet"  # the branch's folder in the PowerPaint v2 release


class UnknownModelError(ValueError):
    """A request named a model that is not in the server's list."""


@dataclass(frozen=True)
class ModelEntry:
    name: str  # what the picker shows and the browser sends back
    base: str
    brushnet: str
    demo: bool = False
    powerpaint: bool = False  # a PowerPaint v2 branch: the page offers its tasks


def parse_model_entry(text: str) -> ModelEntry:
    """A `--models` entry as a base/BrushNet pair; only the paths' existence is checked here."""
    if PAIR_SEPARATOR in text:
        base, _, brushnet = text.partition(PAIR_SEPARATOR)
        if not base or not brushnet:
            raise ValueError(f"--models {text}: write a pair as BASE{PAIR_SEPARATOR}BRUSHNET, both paths.")
        _require_local(base, text)
        _require_local(brushnet, text)
        return ModelEntry(f"{_short_name(base)} + {_short_name(brushnet)}", base, brushnet,
                          powerpaint=_is_powerpaint(brushnet))
    _require_local(text, text)
    folder = Path(text)
    if (folder / POWERPAINT_FOLDER).is_dir():
        return _powerpaint_release(folder, text)
    if "brushnet" not in _model_index(folder, text):
        raise ValueError(
            f"--models {text}: not a BrushNet pipeline folder (no model_index.json with a brushnet entry): "
            f"pass BASE{PAIR_SEPARATOR}BRUSHNET to give a base model and a BrushNet separately."
        )
    brushnet = str(folder / "brushnet")
    return ModelEntry(_short_name(text), text, brushnet, powerpaint=_is_powerpaint(brushnet))


def _powerpaint_release(folder: Path, entry: str) -> ModelEntry:
    bases = sorted(child for child in folder.iterdir() if (child / "model_index.json").is_file())
    if len(bases) != 1:
        found = f"{len(bases)} ({', '.join(b.name for b in bases)})" if bases else "none"
        raise ValueError(
            f"--models {entry}: a PowerPaint release folder holds {POWERPAINT_FOLDER}/ and one base model folder; "
            f"found {found}: pass BASE{PAIR_SEPARATOR}{folder / POWERPAINT_FOLDER} to choose the base."
        )
    return ModelEntry(_short_name(entry), str(bases[0]), str(folder / POWERPAINT_FOLDER), powerpaint=True)


def _is_powerpaint(brushnet: str) -> bool:
    from ..loading import is_powerpaint

    return is_powerpaint(brushnet)


def _model_index(folder: Path, entry: str) -> dict:
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        return {}
    try:
        return json.loads(index_file.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"--models {entry}: cannot read {index_file} ({error}): fix or replace it.") from None


def _require_local(path: str, entry: str) -> None:
    if not Path(path).exists():
        raise ValueError(
            f"--models {entry}: {path} does not exist (the server takes local folders and files only; download "
            "hub models first, e.g. with `hf download`)."
        )


def _short_name(path: str) -> str:
    path = Path(path)
    return path.stem if path.is_file() else path.resolve().name


def check_model_entry(entry: ModelEntry, allow_pickle: bool = False) -> None:
    """Refuse an entry that cannot work, from its configs and checkpoint headers (no weights read):
    a BrushNet for another family than its base, an inpainting base, a PowerPaint branch with an SDXL
    base, a pickle without --allow-pickle. Raises `ModelLoadError` prefixed with the entry."""
    from ..loading import ModelLoadError, check_model_pair

    try:
        check_model_pair(entry.base, entry.brushnet, allow_pickle=allow_pickle)
    except ModelLoadError as error:
        raise ModelLoadError(f"--models {entry.name}: {error}") from None


def demo_entry() -> ModelEntry | None:
    """The built-in demo model as an entry, or None if this installation lacks it."""
    from ..demo.model import DEMO_MODEL_NAME, demo_model_dir

    try:
        folder = demo_model_dir()
    except FileNotFoundError:
        return None
    return ModelEntry(DEMO_MODEL_NAME, str(folder), str(folder / "brushnet"), demo=True)


def unique_names(entries: list[ModelEntry]) -> list[ModelEntry]:
    """The same entries, a " (2)", " (3)"... added to names already taken, so every name picks one."""
    seen: dict[str, int] = {}
    renamed = []
    for entry in entries:
        count = seen.get(entry.name, 0) + 1
        seen[entry.name] = count
        renamed.append(entry if count == 1 else replace(entry, name=f"{entry.name} ({count})"))
    return renamed


@dataclass(frozen=True)
class LoadOptions:
    """How every model is loaded and run: the CLI's --device/--dtype/--scheduler/--offload/--allow-pickle/--compile
    and --vae-tiling (for every generation: the page has no control of its own for it)."""

    device: str = "cpu"
    dtype: object = None  # a torch dtype; None: float32
    scheduler: str = "unipc"
    offload: str = "none"
    allow_pickle: bool = False
    compile: bool = False
    vae_tiling: str = "auto"


class ModelRegistry:
    """The configured models by name. One pipeline is held at a time: the one last used, loaded on
    first use, so switching models costs a load but the server never holds two in memory."""

    def __init__(self, entries: list[ModelEntry], options: LoadOptions, default: str | None = None):
        if not entries:
            raise ValueError("No model to serve: pass --models (the built-in demo model is missing here).")
        self.entries = {entry.name: entry for entry in unique_names(entries)}
        self.default = default if default in self.entries else next(iter(self.entries))
        self.options = options
        self._lock = threading.Lock()
        self._current: tuple[str, object, dict] | None = None  # name, pipeline, parameters to record

    @property
    def names(self) -> list[str]:
        return list(self.entries)

    def entry(self, name) -> ModelEntry:
        """The entry called `name`; anything else (a path, an unknown name) is refused."""
        if not isinstance(name, str) or name not in self.entries:
            raise UnknownModelError(f"Unknown model {name!r}: choose one of {', '.join(map(repr, self.entries))}.")
        return self.entries[name]

    def pipeline(self, name: str, on_load=None) -> tuple[object, dict]:
        """The pipeline of model `name` and the parameters its outputs record; `on_load()` is called
        first when it has to be loaded (to tell the user why this takes longer)."""
        entry = self.entry(name)
        with self._lock:
            if self._current is not None and self._current[0] == name:
                return self._current[1], self._current[2]
            if on_load is not None:
                on_load()
            self._release_current()
            pipe, params = load_entry(entry, self.options)
            self._current = (name, pipe, params)
            return pipe, params

    def _release_current(self) -> None:
        if self._current is None:
            return
        self._current = None
        gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def load_entry(entry: ModelEntry, options: LoadOptions) -> tuple[object, dict]:
    """Load an entry as the CLI loads --base/--brushnet; returns the pipeline and what outputs record."""
    import torch

    from ..options import load_pipeline_from_args, model_params

    args = Namespace(base=entry.base, brushnet=entry.brushnet, base_config=None, allow_pickle=options.allow_pickle,
                     scheduler=options.scheduler, offload="none" if entry.demo else options.offload,
                     demo_model=entry.demo, compile=options.compile)
    dtype = options.dtype or torch.float32
    pipe = load_pipeline_from_args(args, options.device, dtype)
    pipe.set_progress_bar_config(disable=True)  # the page shows the progress
    params = model_params(args, dtype)
    if not entry.demo:
        # Outputs go to the browser: record the models' names and hashes, not the server's paths.
        params.update(base=_short_name(entry.base), brushnet=_short_name(entry.brushnet))
    return pipe, {"model": entry.name, **params}
