"""The `brushnet` command line: a thin layer over the library."""

import argparse
import json
import os
import random
import sys
from pathlib import Path

from . import __version__

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
ONE_MODEL = ("--base and --brushnet go together: pass both (a base model and a BrushNet of the same family), "
             "or neither to use the built-in demo model")


class UserError(ValueError):
    """A mistake in the command line, reported as one line without a traceback."""


# -- argument parsing ---------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="brushnet", description="BrushNet text-guided inpainting (Ju et al., ECCV 2024) on stock diffusers.")
    parser.add_argument("--version", action="version", version=f"brushnet {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    inpaint = commands.add_parser(
        "inpaint", help="fill the white region of a mask, guided by a prompt",
        description="Fill the white region of MASK in IMAGE, guided by --prompt. IMAGE and MASK may be "
                    "folders: images and masks are then paired by file name (stem).")
    inpaint.add_argument("image", metavar="IMAGE", help="image file, or a folder of images")
    inpaint.add_argument("mask", metavar="MASK", help="mask file (white = fill), or a folder of masks")
    _add_prompt_options(inpaint, batch=True)
    masks = inpaint.add_argument_group("mask")
    masks.add_argument("--invert-mask", action="store_true", help="fill the black region instead of the white")
    masks.add_argument("--mask-threshold", type=int, default=128, metavar="0-255",
                       help="mask pixels at or above this value are filled (default 128)")
    masks.add_argument("--dilate", type=int, default=0, metavar="PX", help="grow the hole by PX pixels")
    _add_model_options(inpaint)
    _add_generation_options(inpaint)
    _add_output_options(inpaint, batch=True)
    inpaint.set_defaults(func=cmd_inpaint)

    outpaint = commands.add_parser(
        "outpaint", help="extend an image beyond its borders",
        description="Extend IMAGE by the given number of pixels on each side and fill the new area.")
    outpaint.add_argument("image", metavar="IMAGE", help="image file")
    for side in ("left", "right", "top", "bottom"):
        outpaint.add_argument(f"--{side}", type=int, default=0, metavar="PX", help=f"pixels to add on the {side}")
    _add_prompt_options(outpaint, batch=False)
    _add_model_options(outpaint)
    _add_generation_options(outpaint)
    _add_output_options(outpaint, batch=False)
    outpaint.set_defaults(func=cmd_outpaint)

    from .training.config import build_train_parser

    train = commands.add_parser(
        "train", help="train a BrushNet (also under `accelerate launch`)",
        description="Train a BrushNet on BrushData shards or a folder of images with captions. Options keep "
                    "the names of the authors' train_brushnet.py; dashes work too.")
    build_train_parser(train)
    train.set_defaults(func=cmd_train)

    data = commands.add_parser("data", help="training data tools")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    pack = data_commands.add_parser(
        "pack", help="write a folder of images (+ .txt captions, masks) as BrushData .tar shards")
    pack.add_argument("folder", metavar="FOLDER")
    pack.add_argument("out", metavar="OUT_DIR")
    pack.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    pack.add_argument("--overwrite", action="store_true", help="replace existing shards")
    pack.set_defaults(func=cmd_data_pack)

    from .evaluation.cli import add_bench_command

    add_bench_command(commands)

    from .serve import add_serve_command

    add_serve_command(commands)

    demo = commands.add_parser(
        "demo", help="inpaint an example scene with the built-in demo model (offline, seconds)",
        description="Write an example scene (coloured shapes), a mask over one shape and the result of "
                    "inpainting it with the built-in demo model, then print the equivalent `brushnet inpaint` "
                    "command to try other prompts.")
    demo.add_argument("--out", "-o", default="brushnet-demo", help="output folder (default brushnet-demo)")
    demo.add_argument("--prompt", "-p", help="what to paint in the hole (default: the removed shape's own words)")
    demo.add_argument("--scene", type=int, default=1, metavar="N",
                      help="which held-out example scene, 0-199 (default 1, one the demo model gets right; "
                           "its success rate is in BENCHMARKS.md)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.add_argument("--steps", type=int, default=25, help="denoising steps (default 25)")
    demo.add_argument("--overwrite", action="store_true", help="replace existing outputs (default: keep them)")
    demo.set_defaults(func=cmd_demo)

    info = commands.add_parser("info", help="print the generation parameters stored in an output PNG")
    info.add_argument("png", metavar="OUTPUT.png")
    info.set_defaults(func=cmd_info)
    return parser


def _add_prompt_options(parser, batch: bool) -> None:
    group = parser.add_argument_group("prompt")
    group.add_argument("--prompt", "-p", help="what to paint in the hole")
    group.add_argument("--negative-prompt", "-n", default="", help="what to avoid")
    if batch:
        group.add_argument("--prompts", metavar="FILE",
                           help="per-image prompts for folders: .txt with 'stem: prompt' lines or .json "
                                "{stem: prompt}; default IMAGE/prompts.txt or .json if present")


def _add_model_options(parser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--base", help="base model: diffusers folder, hub id or single .safetensors file "
                                      "(default, with no --brushnet either: the built-in demo model)")
    group.add_argument("--brushnet", help="BrushNet: folder, hub id or single .safetensors file")
    group.add_argument("--base-config", metavar="DIR",
                       help="diffusers folder with the configs for a single-file --base (needed offline)")
    group.add_argument("--allow-pickle", action="store_true",
                       help="allow .ckpt/.bin/.pt checkpoints (pickles can run code: only for files you trust)")
    group.add_argument("--scheduler", default="unipc", help="unipc (default), ddim, dpmpp, dpmpp_karras, euler, "
                                                           "euler_a or pndm")
    group.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                       help="weights precision (auto: fp16 on GPU, fp32 on CPU)")
    group.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    group.add_argument("--offload", default="none", choices=["none", "model", "sequential"],
                       help="keep weights in CPU memory and move them to the GPU when used (saves GPU memory)")


def _add_generation_options(parser) -> None:
    group = parser.add_argument_group("generation")
    group.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    group.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    group.add_argument("--scale", type=float, default=1.0, help="BrushNet conditioning scale (default 1.0)")
    group.add_argument("--start", type=float, default=0.0, help="fraction of the steps where BrushNet starts")
    group.add_argument("--end", type=float, default=1.0, help="fraction of the steps where BrushNet stops")
    group.add_argument("--seed", type=int, help="random seed (default: random, recorded in the output)")
    group.add_argument("--num-images", type=int, default=1, help="images per input (seeds seed, seed+1, ...)")
    group.add_argument("--blend", action=argparse.BooleanOptionalAction, default=True,
                       help="paste the result over the original through a blurred mask (default on)")
    group.add_argument("--blend-kernel", type=int, default=None,
                       help="blur kernel of the blending (odd; default 21, narrower for models below 512 px)")
    group.add_argument("--crop-to-mask", action="store_true",
                       help="process only a window around the hole at the model's native size (large photos)")
    group.add_argument("--context", type=float, default=0.3,
                       help="with --crop-to-mask, context around the hole as a fraction of its size (default 0.3)")


def _add_output_options(parser, batch: bool) -> None:
    group = parser.add_argument_group("output")
    group.add_argument("--out", "-o", help="output PNG (a folder when IMAGE is a folder)" if batch
                       else "output PNG")
    group.add_argument("--overwrite", action="store_true", help="replace existing outputs (default: keep them)")


# -- commands -----------------------------------------------------------------------------------

def cmd_inpaint(args) -> int:
    from .masks import load_mask, open_image

    jobs = _inpaint_jobs(args)
    if not jobs[0]["batch"] and not args.overwrite:
        _refuse_existing(jobs[0]["outputs"])
    todo = [job for job in jobs if args.overwrite or not all(p.exists() for p in job["outputs"])]
    if len(todo) < len(jobs):
        print(f"skipping {len(jobs) - len(todo)} input(s) whose outputs exist (--overwrite to redo them)")
    if not todo:
        return 0
    _prepare_output_folders([p for job in todo for p in job["outputs"]])
    loaded = []
    for job in todo:  # read every input first, so a bad file stops the run before the model loads
        image = open_image(job["image"])
        mask = load_mask(job["mask"], args.mask_threshold, args.invert_mask, args.dilate)
        if image.size != mask.size:
            raise UserError(f"{job['image']} is {image.width}x{image.height} but {job['mask']} is "
                            f"{mask.width}x{mask.height}: masks must have the size of their image")
        if mask.getbbox() is None:
            raise UserError(f"{job['mask']} has no pixel at or above --mask-threshold {args.mask_threshold}: "
                            "nothing to inpaint (white = fill; --invert-mask if your hole is black)")
        loaded.append((job, image, mask))
    pipe, model_params = _load(args)
    _run_jobs(pipe, model_params, args, loaded)
    return 0


def cmd_outpaint(args) -> int:
    from .masks import open_image
    from .regions import outpaint_canvas

    image_path = Path(args.image)
    prompt = _require_prompt(args.prompt)
    image = open_image(image_path)
    canvas, mask = outpaint_canvas(image, args.left, args.right, args.top, args.bottom)
    outputs = _output_paths(Path(args.out) if args.out else Path(f"{image_path.stem}-outpainted.png"),
                            args.num_images)
    if not args.overwrite:
        _refuse_existing(outputs)
    _prepare_output_folders(outputs)
    job = {"image": image_path, "mask": None, "prompt": prompt, "outputs": outputs, "batch": False,
           "extra_params": {"outpaint": {s: getattr(args, s) for s in ("left", "right", "top", "bottom")}}}
    pipe, model_params = _load(args)
    _run_jobs(pipe, model_params, args, [(job, canvas, mask)])
    return 0


def cmd_demo(args) -> int:
    from .demo.scenes import HELDOUT_SEEDS, make_scene, removal_example

    if not 0 <= args.scene < len(HELDOUT_SEEDS):
        raise UserError(f"--scene must be between 0 and {len(HELDOUT_SEEDS) - 1}; got {args.scene}")
    out = Path(args.out)
    scene = make_scene(HELDOUT_SEEDS[args.scene])
    example = removal_example(scene, len(scene.shapes) - 1)  # the top shape: nothing hides any of it
    paths = {"scene": out / "scene.png", "mask": out / "mask.png", "result": out / "result.png"}
    if not args.overwrite:
        _refuse_existing([*paths.values(), out / "comparison.png"])
    _prepare_output_folders(list(paths.values()))
    from .metadata import save_png

    save_png(scene.image, paths["scene"], {"caption": scene.caption}, overwrite=True)
    save_png(example.mask, paths["mask"], {}, overwrite=True)
    prompt = args.prompt or example.prompt
    inpaint_args = build_parser().parse_args([
        "inpaint", str(paths["scene"]), str(paths["mask"]), "--prompt", prompt, "--out", str(paths["result"]),
        "--seed", str(args.seed), "--steps", str(args.steps), "--overwrite"])
    print(f"scene: {scene.caption}")
    cmd_inpaint(inpaint_args)
    _save_comparison(paths["scene"], paths["mask"], paths["result"], out / "comparison.png")
    print(f"wrote {out / 'comparison.png'} (scene | hole | result, enlarged 4x)")
    print(f"try other prompts:\n  brushnet inpaint {paths['scene']} {paths['mask']} --prompt \"a green square\" "
          f"--out {out / 'green.png'}")
    return 0


def _save_comparison(scene_path, mask_path, result_path, out_path, zoom=4) -> None:
    """Scene, scene with the hole greyed out, and result side by side, enlarged to be seen."""
    from PIL import Image

    from .metadata import save_png

    scene = Image.open(scene_path).convert("RGB")
    hole = Image.open(mask_path).convert("L")
    masked = Image.composite(Image.new("RGB", scene.size, (128, 128, 128)), scene, hole)
    panels = [scene, masked, Image.open(result_path).convert("RGB")]
    strip = Image.new("RGB", (scene.width * 3 + 8, scene.height), (255, 255, 255))
    for k, panel in enumerate(panels):
        strip.paste(panel, (k * (scene.width + 4), 0))
    save_png(strip.resize((strip.width * zoom, strip.height * zoom), Image.NEAREST), out_path, {}, overwrite=True)


def cmd_train(args) -> int:
    from .training import TrainConfig, train

    options = {k: v for k, v in vars(args).items() if k not in ("func", "command")}
    path = train(TrainConfig(**options))
    print(f"BrushNet saved in {path}")
    return 0


def cmd_data_pack(args) -> int:
    from .data import pack_folder

    shards = pack_folder(args.folder, args.out, shard_size=args.shard_size, overwrite=args.overwrite)
    print(f"wrote {len(shards)} shard(s) to {args.out}")
    return 0


def cmd_info(args) -> int:
    from .metadata import read_png_params

    print(json.dumps(read_png_params(args.png), indent=2, sort_keys=True))
    return 0


# -- helpers ------------------------------------------------------------------------------------

def _inpaint_jobs(args) -> list[dict]:
    image, mask = Path(args.image), Path(args.mask)
    if not image.exists():
        raise UserError(f"{image} does not exist")
    if not mask.exists():
        raise UserError(f"{mask} does not exist")
    if image.is_dir() != mask.is_dir():
        raise UserError("IMAGE and MASK must both be files or both be folders")
    if not image.is_dir():
        out = Path(args.out) if args.out else Path(f"{image.stem}-inpainted.png")
        return [{"image": image, "mask": mask, "prompt": _require_prompt(args.prompt),
                 "outputs": _output_paths(out, args.num_images), "batch": False, "extra_params": {}}]

    images = _images_in(image)
    masks = {p.stem: p for p in _images_in(mask)}
    if not images:
        raise UserError(f"no images in {image}")
    missing = [p.name for p in images if p.stem not in masks]
    if missing:
        raise UserError(f"no mask in {mask} for {len(missing)} image(s), e.g. {', '.join(missing[:3])} "
                        "(masks are matched by file name without extension)")
    prompts = _read_prompts(args, image)
    without = [p.name for p in images if p.stem not in prompts and not args.prompt]
    if without:
        raise UserError(f"no prompt for {len(without)} image(s), e.g. {', '.join(without[:3])}: "
                        "pass --prompt for all or list them in --prompts")
    out_dir = Path(args.out) if args.out else Path("brushnet-out")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} must be a folder when IMAGE is a folder")
    return [{"image": p, "mask": masks[p.stem], "prompt": prompts.get(p.stem, args.prompt), "batch": True,
             "outputs": _output_paths(out_dir / f"{p.stem}.png", args.num_images), "extra_params": {}}
            for p in images]


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _read_prompts(args, image_dir: Path) -> dict[str, str]:
    if args.prompts:
        path = Path(args.prompts)
        if not path.is_file():
            raise UserError(f"--prompts {path} does not exist")
    else:
        path = next((image_dir / n for n in ("prompts.json", "prompts.txt") if (image_dir / n).is_file()), None)
        if path is None:
            return {}
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            prompts = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path} is not valid JSON ({e})") from None
        if not isinstance(prompts, dict) or not all(isinstance(v, str) for v in prompts.values()):
            raise UserError(f"{path} must be a JSON object {{\"stem\": \"prompt\"}}")
        return prompts
    prompts = {}
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip() and not line.lstrip().startswith("#"):
            stem, sep, prompt = line.partition(":")
            if not sep:
                raise UserError(f"{path} line {number}: expected 'stem: prompt'")
            prompts[stem.strip()] = prompt.strip()
    return prompts


def _require_prompt(prompt: str | None) -> str:
    if not prompt:
        raise UserError("--prompt is required: describe what to paint in the hole")
    return prompt


def _output_paths(out: Path, num_images: int) -> list[Path]:
    if num_images < 1:
        raise UserError(f"--num-images must be >= 1; got {num_images}")
    if out.suffix.lower() != ".png":
        out = out.with_suffix(".png") if out.suffix else out.with_name(out.name + ".png")
    if num_images == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{k}{out.suffix}") for k in range(num_images)]


def _refuse_existing(paths: list[Path]) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing:
        raise UserError(f"{existing[0]} already exists; pass --overwrite to replace it")


def _prepare_output_folders(paths: list[Path]) -> None:
    """Create the outputs' folders now, so an unusable --out fails before the model loads."""
    for folder in {p.parent for p in paths}:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UserError(f"cannot create the output folder {folder} ({error.strerror}): choose another --out")
        if not os.access(folder, os.W_OK):
            raise UserError(f"the output folder {folder} is not writable: choose another --out")


def _device(name: str, process_device: str | None = None) -> str:
    """The torch device for --device; under a multi-process launch, this process's own GPU."""
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is available")
    if process_device and process_device.startswith("cuda") and name in ("auto", "cuda"):
        return process_device
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def _dtype(name: str, device: str):
    import torch

    if name == "auto":
        return torch.float32 if device == "cpu" else torch.float16
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def _load(args):
    """Load the pipeline named on the command line; returns it and the parameters to record."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    # Loading bars for a handful of components are noise; the denoising bar stays.
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    device = _device(args.device)
    dtype = _dtype(args.dtype, device)
    pipe = load_pipeline_from_args(args, device, dtype)
    pipe.set_progress_bar_config(leave=False, desc="steps")
    return pipe, model_params(args, dtype)


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
    pipe = load_pipeline(args.base, args.brushnet, torch_dtype=dtype, allow_pickle=args.allow_pickle,
                         base_config=args.base_config)
    pipe.scheduler = make_scheduler(args.scheduler, pipe.scheduler.config)
    if args.offload == "none":
        pipe.to(device)
    elif args.offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.enable_sequential_cpu_offload(device=device)
    return pipe


def check_scheduler(name: str) -> None:
    from .schedulers import SCHEDULERS

    if name not in SCHEDULERS:
        raise UserError(f"unknown --scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")


def model_params(args, dtype) -> dict:
    """What outputs record about the models: names, weight fingerprints, scheduler, precision."""
    from .metadata import model_fingerprint

    from .demo.model import DEMO_MODEL_NAME

    names = ((DEMO_MODEL_NAME, DEMO_MODEL_NAME + " (brushnet)") if getattr(args, "demo_model", False)
             else (str(args.base), str(args.brushnet)))
    return {"base": names[0], "brushnet": names[1], "base_hash": model_fingerprint(args.base),
            "brushnet_hash": model_fingerprint(args.brushnet), "scheduler": args.scheduler,
            "dtype": str(dtype).removeprefix("torch."), "brushnet_version": __version__}


def _run_jobs(pipe, model_params: dict, args, loaded) -> None:
    from tqdm.auto import tqdm

    from .inpaint import InpaintSettings, default_blend_kernel, image_seeds, inpaint
    from .metadata import save_png

    seed = args.seed if args.seed is not None else random.randrange(2**31)
    for job, image, mask in tqdm(loaded, desc="images", disable=len(loaded) == 1):
        settings = InpaintSettings(
            prompt=job["prompt"], negative_prompt=args.negative_prompt, steps=args.steps, guidance=args.guidance,
            scale=args.scale, start=args.start, end=args.end, seed=seed, num_images=args.num_images,
            blend=args.blend, blend_kernel=args.blend_kernel or default_blend_kernel(pipe), crop_to_mask=args.crop_to_mask, context=args.context,
        )
        results = inpaint(pipe, image, mask, settings)
        for path, result, image_seed in zip(job["outputs"], results, image_seeds(settings)):
            params = {**settings.as_dict(), **model_params, **job["extra_params"], "seed": image_seed,
                      "num_images": 1, "source_image": Path(job["image"]).name,
                      "source_mask": Path(job["mask"]).name if job["mask"] else None,
                      "width": result.width, "height": result.height}
            params.pop("extra")
            try:
                save_png(result, path, params, overwrite=args.overwrite)
            except OSError as error:
                if isinstance(error, FileExistsError):
                    raise
                raise UserError(f"cannot write {path} ({error.strerror or error}): check the folder") from None
            print(f"wrote {path}")


def main(argv=None) -> int:
    # transformers warns at import that torchvision is absent; the CLI needs no torchvision.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        if os.environ.get("BRUSHNET_DEBUG"):
            raise
        print(f"brushnet: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Outputs are written to a temporary name and renamed: no partial file is left behind.
        print("brushnet: interrupted; every output written so far is complete", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
