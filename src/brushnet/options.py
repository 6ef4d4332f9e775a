"""Command-line plumbing shared by `brushnet inpaint/outpaint`, `brushnet serve` and `brushnet bench`:
the user-error type, the model options and their loading, device and precision, and the checks of
every number and text a user types, made before any model loads.

It imports nothing heavy at module level, and neither `cli.py`, `serve/` nor `evaluation/`: each of
them imports this module, never one another.
"""

import argparse
import dataclasses
import logging
import os
import re
import sys
from pathlib import Path

from . import __version__
from .arguments import VAE_TILING_MODES, check_number

ONE_MODEL = ("--base and --brushnet go together: pass both (a base model and a BrushNet of the same family), "
             "or neither to use the built-in demo model")
# The InpaintSettings fields that are command-line flags of the same name (--negative-prompt, ...).
SETTINGS_FLAGS = ("negative_prompt", "steps", "guidance", "guidance_rescale", "scale", "start", "end", "seed",
                  "num_images", "blend_kernel", "context", "strength", "brushnet_every", "vae_tiling")


class UserError(ValueError):
    """A mistake in the command line, reported as one line without a traceback."""


def say(line: str, stream=None) -> None:
    """Print one line in a single write. Under PYTHONUNBUFFERED, print() writes the text and its
    newline separately, so processes of one launch sharing a terminal or pipe splice their lines."""
    stream = sys.stdout if stream is None else stream
    try:
        stream.write(line + "\n")
    except UnicodeEncodeError:
        # A terminal or pipe in ASCII (LANG=C, PYTHONIOENCODING=ascii) and a file name that is not:
        # the file was written; the line says so with the name escaped, not with an encoding error.
        encoding = getattr(stream, "encoding", None) or "ascii"
        stream.write((line + "\n").encode(encoding, "backslashreplace").decode(encoding))
    stream.flush()


class CommandLineParser(argparse.ArgumentParser):
    """argparse with its own mistakes (a word where a number goes, a missing argument, an unknown
    flag) reported as the one line every other mistake gets, pointing at --help, instead of the
    whole usage block above it. Subcommands' parsers are made of the same class."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_known_args(self, args=None, namespace=None):
        # A subcommand's parser is run through parse_known_args and hands what it did not know up to
        # the top-level parser, which would name `brushnet` and its --help; rejecting the leftovers
        # here names the subcommand whose options they were meant for ("brushnet inpaint: ...").
        # Nothing in the package asks any of these parsers for leftovers.
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras


# A number with a leading minus that argparse takes for an option name: it only knows "-5" and
# "-.5", so "--guidance -inf" or "--strength -1e-3" would fail as "expected one argument" instead of
# reaching the check that names the accepted range. So would a point or box starting with one
# ("--point -3,5"), which then never reaches the check that it lies on the image.
_NUMBER = r"(inf(inity)?|nan|(\d+\.?\d*|\.\d+)(e[-+]?\d+)?)"
_SIGNED_NUMBER = re.compile(rf"-{_NUMBER}(,[-+]?{_NUMBER})*", re.IGNORECASE)


def join_signed_numbers(argv: list[str]) -> list[str]:
    """`argv` with every "--flag -number" written "--flag=-number", which argparse reads as a value
    (up to a "--", after which every word is a positional argument as typed)."""
    joined = []
    for number, token in enumerate(argv):
        if token == "--":
            return joined + list(argv[number:])
        previous = joined[-1] if joined else ""
        if _SIGNED_NUMBER.fullmatch(token) and previous.startswith("--") and "=" not in previous:
            joined[-1] = f"{previous}={token}"
        else:
            joined.append(token)
    return joined


def add_model_options(parser, demo_default: bool = True) -> None:
    """--base/--brushnet and how to load them. `demo_default`: without either, the demo model is used."""
    group = parser.add_argument_group("model")
    default = " (default, with no --brushnet either: the built-in demo model)" if demo_default else ""
    group.add_argument("--base", help=f"base model: diffusers folder, hub id or single .safetensors file{default}")
    group.add_argument("--brushnet", help="BrushNet: folder, hub id or single .safetensors file")
    group.add_argument("--base-config", metavar="DIR",
                       help="diffusers folder with the configs for a single-file --base (needed offline)")
    group.add_argument("--allow-pickle", action="store_true",
                       help="allow .ckpt/.bin/.pt checkpoints (pickles can run code: only for files you trust)")
    add_loading_options(group)
    group.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]",
                       help="a LoRA of the base model (diffusers or kohya .safetensors), at WEIGHT (default 1); "
                            "repeatable. Few-step LoRAs (LCM, TCD) go with --scheduler lcm or tcd")
    group.add_argument("--compile", action="store_true",
                       help="compile the UNet and BrushNet (torch.compile; CUDA graphs on a GPU): the first image of "
                            "each size waits for the compilation, the rest run faster on a GPU (on CPUs measured "
                            "slower than eager, BENCHMARKS.md)")


def add_loading_options(group) -> None:
    """How models load and use memory, for every command that loads them (inpaint, outpaint, bench, serve)."""
    group.add_argument("--scheduler", default="unipc", help="unipc (default), ddim, dpmpp, dpmpp_karras, euler, "
                                                           "euler_a, pndm, lcm or tcd")
    group.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                       help="weights precision (auto: fp16 on GPU; on CPU bf16 where the CPU computes it natively, "
                            "AVX512-BF16 or AMX, else fp32)")
    group.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    group.add_argument("--offload", default="none", choices=["none", "model", "sequential"],
                       help="keep weights in CPU memory and move them to the GPU when used (saves GPU memory)")
    group.add_argument("--vae-tiling", default="auto", choices=VAE_TILING_MODES,
                       help="VAE in tiles, a batch one image at a time: less memory, slightly different pixels. "
                            "on: every image larger than one tile; off: never; auto (default): only images far "
                            "above the model's native area, which these commands never make (they work at it)")


# -- checks of what the user typed ---------------------------------------------------------------

def user_checked(check, *args, **kwargs):
    """Run an `arguments` check, its ValueError becoming a UserError (one line, no traceback)."""
    try:
        return check(*args, **kwargs)
    except ValueError as error:
        raise UserError(str(error).rstrip(".")) from None


def check_generation_args(args) -> None:
    """Every generation number of inpaint/outpaint/bench, named by its flag, before anything loads:
    `inpaint.check_settings` on the settings these flags make (bench has only some of them)."""
    from .inpaint import InpaintSettings, check_settings

    defaults = {f.name: f.default for f in dataclasses.fields(InpaintSettings) if f.name in SETTINGS_FLAGS}
    values = {name: getattr(args, name, default) for name, default in defaults.items()}
    if args.seed is None or args.seed == -1:  # -1: a random seed, as in the web UI; drawn later
        values["seed"] = 0
    flags = {name: "--" + name.replace("_", "-") for name in ("prompt", *SETTINGS_FLAGS)}
    user_checked(check_settings, InpaintSettings(prompt=getattr(args, "prompt", None) or "", **values), flags)
    if getattr(args, "fitting_degree", None) is not None:
        user_checked(check_number, args.fitting_degree, "--fitting-degree", low=0.0, high=1.0)
        if getattr(args, "task", None) != "shape-guided":
            # Elsewhere it mixes two equal task prompts: no effect but a rounding, yet it was recorded.
            raise UserError("--fitting-degree is only used with --task shape-guided (how closely the object follows "
                            "the mask's shape): leave it out, or pass --task shape-guided with a PowerPaint model")
    if getattr(args, "scheduler", None) is not None:
        check_scheduler(args.scheduler)
        limit = few_step_limit(args.scheduler)
        steps = getattr(args, "steps", None)
        if limit is not None and steps is not None and steps > limit:
            # diffusers' refusal comes after the model loads and asks for a strength above 1.
            raise UserError(f"--scheduler {args.scheduler} spaces at most {limit} steps (its original_inference_steps); "
                            f"use --steps {limit} or fewer (it is made for 4-8)")


def few_step_limit(scheduler: str) -> int | None:
    """The most steps a few-step scheduler (LCM, TCD) can space: its default original_inference_steps."""
    import inspect

    from .schedulers import SCHEDULERS

    cls = SCHEDULERS[scheduler][0]
    parameter = inspect.signature(cls.__init__).parameters.get("original_inference_steps")
    return parameter.default if parameter is not None else None


def check_steps_fit_scheduler(steps: int, scheduler: str, model_dir) -> None:
    """--steps against the --scheduler made from the model in `model_dir`'s scheduler config:
    the sampler's own refusal (two steps on one noise level), made before anything is written."""
    from .arguments import check_schedule
    from .schedulers import SCHEDULERS, make_scheduler

    config = SCHEDULERS[scheduler][0].load_config(Path(model_dir) / "scheduler")  # any kind's config file
    sampler = make_scheduler(scheduler, config)
    sampler.set_timesteps(steps)
    user_checked(check_schedule, sampler.timesteps, getattr(sampler, "sigmas", None))


def prepare_output_folders(paths) -> None:
    """Create the outputs' folders now, so an unusable --out fails before the model loads."""
    for folder in {Path(p).parent for p in paths}:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UserError(f"cannot create the output folder {folder} ({error.strerror}): choose another --out")
        if not os.access(folder, os.W_OK):
            raise UserError(f"the output folder {folder} is not writable: choose another --out")


# -- device, precision and models -----------------------------------------------------------------

def resolve_device(name: str, process_device: str | None = None) -> str:
    """The torch device for --device; under a multi-process launch, this process's own GPU."""
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is available")
    mps = getattr(torch.backends, "mps", None)
    if name == "mps" and not (mps is not None and mps.is_available()):
        raise UserError("--device mps: no Apple GPU (MPS) is available here; use --device cpu or auto")
    if process_device and process_device.startswith("cuda") and name in ("auto", "cuda"):
        return process_device
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AVX512-BF16 or AMX). Elsewhere torch emulates
    it: measured about 40x slower than float32 on an AVX2-only CPU, where native bf16 ran one
    SD1.5 UNet step 3.9x faster than float32 (BENCHMARKS.md)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no cheap way to know, so never pick it unasked
        return False
    return re.search(r"\b(avx512_bf16|amx_bf16)\b", flags) is not None


_warned_emulated_bf16 = False
_warned_cpu_fp16 = False


def resolve_dtype(name: str, device: str):
    """--dtype as a torch dtype. auto: fp16 on GPUs; on CPUs bf16 where it is native, else fp32."""
    import torch

    global _warned_emulated_bf16, _warned_cpu_fp16
    if name == "auto":
        if device != "cpu":
            return torch.float16
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    if name == "bf16" and device == "cpu" and not cpu_has_native_bf16() and not _warned_emulated_bf16:
        _warned_emulated_bf16 = True
        print("brushnet: warning: this CPU has no native bf16 (AVX512-BF16 or AMX): torch emulates it, about 40x "
              "slower than fp32; --dtype auto picks the fast one", file=sys.stderr)
    if name == "fp16" and device == "cpu" and not _warned_cpu_fp16:
        _warned_cpu_fp16 = True
        # Measured: a 3x3 convolution of SD1.5's first block took 1.8x fp32's time in fp16 (and a fifth
        # of it in bf16) on an AMX CPU, one thread, torch 2.13.
        print("brushnet: warning: --dtype fp16 is for GPUs; on a CPU torch runs it slower than fp32: --dtype auto "
              "picks bf16 where the CPU has it, else fp32", file=sys.stderr)
        # diffusers says much the same, once for every pipeline move: one line is enough.
        logging.getLogger("diffusers.pipelines.pipeline_utils").addFilter(_drop_cpu_fp16_notice)
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def _drop_cpu_fp16_notice(record) -> bool:
    return "cannot run with `cpu` device" not in record.getMessage()


def check_scheduler(name: str) -> None:
    from .schedulers import SCHEDULERS

    if name not in SCHEDULERS:
        raise UserError(f"unknown --scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")


def load_pipeline_from_args(args, device: str, dtype):
    """The pipeline of --base/--brushnet with --scheduler, on --device or offloaded as --offload says."""
    from .loading import load_pipeline
    from .schedulers import make_scheduler

    if bool(args.base) != bool(args.brushnet):
        raise UserError(ONE_MODEL)
    if not args.base:
        from .demo.model import DEMO_NOTICE, demo_model_dir

        folder = demo_model_dir()
        args.base, args.brushnet = str(folder), str(folder / "brushnet")
        args.demo_model = True
        print(DEMO_NOTICE, file=sys.stderr)
    check_scheduler(args.scheduler)
    if args.offload != "none" and device == "cpu":
        raise UserError("--offload needs a GPU (--device cuda or mps)")
    if getattr(args, "compile", False) and args.offload != "none":
        raise UserError("--compile and --offload do not go together (offloading moves the weights the compiled "
                        "graphs hold): choose one")
    pipe = load_pipeline(args.base, args.brushnet, torch_dtype=dtype, allow_pickle=args.allow_pickle,
                         base_config=args.base_config)
    pipe.scheduler = make_scheduler(args.scheduler, pipe.scheduler.config)
    load_loras(pipe, getattr(args, "lora", []), allow_pickle=args.allow_pickle)
    if args.offload == "none":
        pipe.to(device)
    elif args.offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.enable_sequential_cpu_offload(device=device)
    if getattr(args, "compile", False):
        pipe.enable_fast_path()
    return pipe


def parse_lora(text: str) -> tuple[Path, float]:
    """FILE[:WEIGHT] of --lora (a colon that is not followed by a number belongs to the path)."""
    path, sep, weight = text.rpartition(":")
    if sep:
        try:
            return Path(path), user_checked(check_number, float(weight), f"--lora {text} weight", low=-10, high=10)
        except ValueError as error:
            if isinstance(error, UserError):
                raise
    return Path(text), 1.0


def load_loras(pipe, specs: list[str], allow_pickle: bool = False) -> None:
    """Load each --lora into the pipeline (diffusers' own LoRA loading, as `load_lora_weights`)
    and set their weights; a file that is missing, a pickle, or not a LoRA of this base is one line."""
    if not specs:
        return
    names, weights = [], []
    for k, spec in enumerate(specs):
        path, weight = parse_lora(spec)
        if not path.is_file():
            file, sep, tail = spec.rpartition(":")
            if sep and Path(file).is_file():
                raise UserError(f"--lora {spec}: {tail!r} is not a weight; give FILE[:WEIGHT], e.g. {file}:0.8")
            raise UserError(f"--lora {path} does not exist (give a .safetensors file)")
        if path.suffix != ".safetensors" and not allow_pickle:
            raise UserError(f"--lora {path} is not a .safetensors file; loading a pickle can run code: convert it, or "
                            "pass --allow-pickle if you trust it")
        name = f"lora{k}"
        try:
            pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=name)
        except Exception as error:  # noqa: BLE001 - diffusers and peft raise many types for a file that does not fit
            first = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise UserError(f"--lora {path} could not be loaded into this base model ({first[:200]}): is it a LoRA "
                            "of this model family (SD1.5 or SDXL)?") from None
        names.append(name)
        weights.append(weight)
    pipe.set_adapters(names, adapter_weights=weights)


def model_params(args, dtype) -> dict:
    """What outputs record about the models: names, weight fingerprints, scheduler, precision."""
    from .demo.model import DEMO_MODEL_NAME
    from .metadata import model_fingerprint

    names = ((DEMO_MODEL_NAME, DEMO_MODEL_NAME + " (brushnet)") if getattr(args, "demo_model", False)
             else (str(args.base), str(args.brushnet)))
    params = {"base": names[0], "brushnet": names[1], "base_hash": model_fingerprint(args.base),
              "brushnet_hash": model_fingerprint(args.brushnet), "scheduler": args.scheduler,
              "dtype": str(dtype).removeprefix("torch."), "brushnet_version": __version__}
    params["loras"] = [{"file": path.name, "weight": weight, "hash": model_fingerprint(path)}
                       for path, weight in map(parse_lora, getattr(args, "lora", None) or [])]
    return params
