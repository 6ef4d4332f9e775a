"""The numbers a user gives the pipelines, `inpaint()` and the command line, checked in one place.

Each check raises `ValueError` with one sentence naming the argument (in the caller's words: a
keyword such as `num_inference_steps`, or a flag such as `--steps`), the accepted range and the
value given. Impossible numbers (NaN, infinities, zero steps) never reach the sampler, where they
would come back as noise or a black image instead of an error.
"""

import math
import numbers

# Guidance and conditioning scales far beyond what anyone uses only saturate the image; the
# bounds catch typos (75 for 7.5 is allowed, 7500 is not) without second-guessing taste.
MAX_GUIDANCE = 100.0
MAX_CONDITIONING_SCALE = 10.0
# torch.Generator.manual_seed takes signed 64-bit seeds; image k of a call uses seed + k.
MAX_SEED = 2**63 - 1
# More images per input than this is a typo; they are generated in chunks, so memory is not the limit.
MAX_IMAGES = 1000
MAX_BLEND_KERNEL = 1001
# How the VAE spends memory on large images (`inpaint.vae_tiling`); the CLI's --vae-tiling choices.
VAE_TILING_MODES = ("auto", "on", "off")


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_number(value, name: str, *, low: float | None = None, high: float | None = None,
                 integer: bool = False, low_inclusive: bool = True) -> float | int:
    """`value` if it is a finite number (a whole one when `integer`) in [low, high]; else ValueError."""
    kind = "a whole number" if integer else "a number"
    if low is not None and high is not None:
        opening = "[" if low_inclusive else "("
        expected = f"{kind} in {opening}{_fmt(low)}, {_fmt(high)}]"
    elif low is not None:
        expected = f"{kind} {'>=' if low_inclusive else '>'} {_fmt(low)}"
    else:
        expected = kind
    if not _is_real(value) or (integer and not float(value).is_integer()) or not math.isfinite(value):
        raise ValueError(f"{name} must be {expected}; got {value!r}.")
    if (low is not None and (value < low if low_inclusive else value <= low)) or (high is not None and value > high):
        raise ValueError(f"{name} must be {expected}; got {value!r}.")
    return int(value) if integer else value


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def check_steps(steps, name: str = "num_inference_steps", num_train_timesteps: int = 1000) -> int:
    """Denoising steps: at least 1, at most the scheduler's training timesteps."""
    return check_number(steps, name, low=1, high=num_train_timesteps, integer=True)


def check_schedule(timesteps, sigmas, order: int = 1) -> None:
    """The noise levels of a call's schedule, after `set_timesteps`: distinct and finite.

    With more steps than the training schedule can space out (e.g. 1000 of 1000 timesteps for
    UniPC or DPM-Solver), two steps land on the same noise level and the multistep solvers divide
    by their zero distance: the image comes back NaN (black). That is refused here instead.
    Only the noise levels (sigmas) count: rounded timesteps may repeat harmlessly (DPM-Solver with
    Karras sigmas at 50 steps), and PNDM repeats one on purpose; schedulers without sigmas (DDIM,
    PNDM) take any step count up to the training timesteps.
    """
    if sigmas is None:
        return
    levels = [float(s) for s in sigmas[: len(timesteps)]]
    if not all(math.isfinite(level) for level in levels):
        raise ValueError(f"{len(timesteps)} denoising steps give this scheduler non-finite noise levels: use fewer.")
    # Second-order samplers (Heun, KDPM2: `order` 2) visit each noise level twice by design.
    if order == 1 and len(set(levels)) != len(levels):
        raise ValueError(
            f"{len(timesteps)} denoising steps are more than this scheduler can space over its training timesteps "
            f"(two would fall on one noise level): use fewer, at most {len(set(levels))}.")


def check_custom_timesteps(timesteps, num_train_timesteps: int) -> None:
    """A `timesteps=` list: whole numbers in [0, num_train_timesteps), each once, from noisy to clean.
    A repeat divides by zero in the multistep solvers; out-of-range or ascending ones run, wrongly."""
    values = [float(t) for t in timesteps]
    if not all(math.isfinite(t) and t == int(t) and 0 <= t < num_train_timesteps for t in values):
        raise ValueError(f"`timesteps` must be whole numbers in [0, {num_train_timesteps}); got {list(timesteps)}.")
    if any(later >= earlier for earlier, later in zip(values, values[1:])):
        raise ValueError(f"`timesteps` must go down, each once (noisy to clean, e.g. [999, 500, 100]); "
                         f"got {list(timesteps)}.")


def check_guidance(value, name: str = "guidance_scale") -> float:
    return check_number(value, name, low=0.0, high=MAX_GUIDANCE)


def check_guidance_rescale(value, name: str = "guidance_rescale") -> float:
    """0 (plain guidance) to 1 (the guided prediction fully rescaled to the positive one's spread)."""
    return check_number(value, name, low=0.0, high=1.0)


def check_conditioning_scale(value, name: str = "brushnet_conditioning_scale") -> float:
    return check_number(value, name, low=0.0, high=MAX_CONDITIONING_SCALE)


def check_num_images(value, name: str = "num_images_per_prompt") -> int:
    return check_number(value, name, low=1, high=MAX_IMAGES, integer=True)


def check_seed(value, name: str = "seed", count: int = 1) -> int:
    """A seed whose `count` consecutive seeds (one per image) all fit torch's generator."""
    return check_number(value, name, low=0, high=MAX_SEED - (count - 1), integer=True)


def check_blend_kernel(value, name: str = "blend_kernel") -> int:
    kernel = check_number(value, name, low=1, high=MAX_BLEND_KERNEL, integer=True)
    if kernel % 2 == 0:
        raise ValueError(f"{name} must be odd (a blur kernel has a centre pixel); got {kernel}.")
    return kernel


def check_choice(value, choices, name: str):
    """A value that must be one of a few names (a mode, a mix, a schedule)."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}.")
    return value


def check_control_window(start, end, names: tuple[str, str] = ("control_guidance_start", "control_guidance_end")
                         ) -> tuple[float, float]:
    """The fraction of the steps where BrushNet acts: 0 <= start < end <= 1."""
    start = check_number(start, names[0], low=0.0, high=1.0)
    end = check_number(end, names[1], low=0.0, high=1.0)
    if not start < end:
        raise ValueError(f"{names[0]} must be less than {names[1]} (BrushNet would never act); "
                         f"got {names[0]}={start}, {names[1]}={end}.")
    return start, end


def check_text(text: str | None, name: str = "prompt") -> None:
    """Text that is not valid Unicode (undecodable bytes in argv or a file reach Python as lone
    surrogates) would fail deep inside the tokenizer with a TypeError."""
    if text is None:
        return
    if not isinstance(text, str):
        raise ValueError(f"{name} must be text; got {type(text).__name__}.")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{name} is not valid UTF-8 text: set your terminal or file to UTF-8 and type it again.") \
            from None
