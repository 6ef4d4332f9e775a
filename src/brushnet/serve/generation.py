"""Running one request of the web UI: one generation at a time on the device, cancellable at every
step, results written as PNGs that carry their parameters.

gradio's queue already starts one generation at a time (concurrency limit 1); the lock here makes
that hold even when gradio drops a cancelled request whose thread is still finishing its step.
"""

import logging
import shutil
import tempfile
import threading
import time
import uuid
import weakref
from dataclasses import dataclass, replace
from pathlib import Path

from ..inpaint import InpaintSettings, default_blend_kernel, image_seeds, inpaint
from ..metadata import save_png
from .inputs import UploadLimits
from .models import ModelRegistry
from .selection import Selection, Selector

logger = logging.getLogger(__name__)

KEEP_RESULTS_SECONDS = 3600  # gradio serves its own copies; ours are only needed until it makes them


class Cancelled(Exception):
    """The user pressed Cancel; the generation stopped after its current step."""


@dataclass(frozen=True)
class Result:
    path: Path  # a PNG carrying `params` (brushnet info reads them)
    params: dict
    caption: str


@dataclass
class Run:
    """One use of the device: when, how far it got and how it ended (done, cancelled, failed)."""

    start: float
    end: float = 0.0
    steps: int = 0
    outcome: str = "failed"


class GenerationService:
    """The models, the limits and the device: what every request of one server shares."""

    def __init__(self, registry: ModelRegistry, limits: UploadLimits, output_dir: str | Path | None = None,
                 selector: Selector | None = None):
        self.registry = registry
        self.limits = limits
        self.selector = selector or Selector(None)  # without --segmenter, a selection says how to get one
        self.output_dir = Path(output_dir) if output_dir else Path(tempfile.mkdtemp(prefix="brushnet-serve-"))
        if output_dir is None:
            weakref.finalize(self, shutil.rmtree, self.output_dir, ignore_errors=True)
        self._device_lock = threading.Lock()
        self._cancel_requests: dict[str, float] = {}  # session -> time of its last Cancel
        self.runs: list[Run] = []  # every generation that got the device, in order

    def request_cancel(self, session: str) -> None:
        """Stop the generations of `session` that started before now, at their next step."""
        self._cancel_requests[session] = time.monotonic()

    def run(self, model: str, image, mask, settings: InpaintSettings, session: str = "", progress=None,
            extra_params: dict | None = None) -> list[Result]:
        """Inpaint `image` where `mask` is white with model `model` (a name from the registry); the
        VAE tiles as the server's --vae-tiling says."""
        requested = time.monotonic()
        self.registry.entry(model)  # an unknown name is refused before it waits for the device
        settings = replace(settings, vae_tiling=self.registry.options.vae_tiling)
        with self._device_lock:
            run = Run(start=time.monotonic())
            try:
                self._stop_if_cancelled(session, requested)
                pipe, model_params = self.registry.pipeline(
                    model, on_load=lambda: _report(progress, 0, f"loading {model}"))

                def on_step(step: int, total: int) -> None:
                    run.steps = step
                    self._stop_if_cancelled(session, requested)
                    _report(progress, (step, total), "denoising")

                images = inpaint(pipe, image, mask, settings, callback=on_step)
                run.outcome = "done"
            except Cancelled:
                run.outcome = "cancelled"
                raise
            except Exception as error:
                if type(error).__name__ == "OutOfMemoryError":
                    _empty_device_cache()  # so the next, smaller request fits
                raise
            finally:
                run.end = time.monotonic()
                self.runs.append(run)
                logger.info("generation %s after %d step(s), %.1f s", run.outcome, run.steps, run.end - run.start)
        kernel = settings.blend_kernel or default_blend_kernel(pipe)
        return self._save(images, settings, {**model_params, "blend_kernel": kernel, **(extra_params or {})})

    def select(self, image, selection: Selection, progress=None):
        """The (H, W) bool mask of `selection` on `image`; it waits for the device like a generation."""
        with self._device_lock:
            return self.selector.mask(image, selection, on_load=lambda what: _report(progress, 0, f"loading {what}"))

    def _stop_if_cancelled(self, session: str, requested: float) -> None:
        if self._cancel_requests.get(session, -1.0) >= requested:
            raise Cancelled("Cancelled.")

    def _save(self, images, settings: InpaintSettings, extra_params: dict) -> list[Result]:
        self._remove_old_results()
        results = []
        for image, seed in zip(images, image_seeds(settings)):
            params = {**settings.as_dict(), **extra_params, "seed": seed, "num_images": 1,
                      "width": image.width, "height": image.height}
            params.pop("extra")
            path = save_png(image, self.output_dir / f"brushnet-seed{seed}-{uuid.uuid4().hex[:8]}.png", params)
            results.append(Result(path, params, caption(params)))
        return results

    def _remove_old_results(self) -> None:
        cutoff = time.time() - KEEP_RESULTS_SECONDS
        for path in self.output_dir.glob("*.png"):
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
            except FileNotFoundError:  # another request removed it first
                pass


def caption(params: dict) -> str:
    """The parameters that tell results apart, in one line under each image."""
    text = (f"seed {params['seed']} · {params['steps']} steps · guidance {params['guidance']:g} · "
            f"scale {params['scale']:g}")
    if params.get("strength", 1.0) != 1.0:
        text += f" · strength {params['strength']:g}"
    if params.get("task"):
        text += f" · {params['task']}"
    return text


def user_message(error: BaseException) -> str:
    """What the page says about a failed request: the error itself for mistakes the user can fix
    (they are worded for users), a short summary otherwise (the traceback goes to the server log)."""
    if isinstance(error, (ValueError, FileNotFoundError, FileExistsError, Cancelled)):
        return str(error)
    if type(error).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError, without importing torch here
        return ("The device ran out of memory: use fewer images at once, a smaller image, or tick "
                "'Crop to the mask' for large photos.")
    logger.error("generation failed", exc_info=error)
    first_line = (str(error).strip().splitlines() or [""])[0]
    return f"Generation failed ({type(error).__name__}: {first_line}); the server's log has the details."


def _empty_device_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _report(progress, value, desc: str) -> None:
    if progress is not None:
        progress(value, desc=desc, unit="steps")
