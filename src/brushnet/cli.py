"""The `brushnet` command line: a thin layer over the library."""

import argparse
import json
import os
import random
import sys
from dataclasses import replace
from pathlib import Path

from . import __version__
from .options import (
    CommandLineParser,
    UserError,
    add_model_options,
    check_generation_args,
    check_steps_fit_scheduler,
    join_signed_numbers,
    load_pipeline_from_args,
    model_params,
    prepare_output_folders,
    resolve_device,
    resolve_dtype,
    say,
    user_checked,
)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
HOLE_SHARE_NOTE = 0.75  # a hole this large gets a note that the mask may be drawn the other way round


# -- argument parsing ---------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = CommandLineParser(
        prog="brushnet", description="BrushNet text-guided inpainting (Ju et al., ECCV 2024) on stock diffusers.")
    parser.add_argument("--version", action="version", version=f"brushnet {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    inpaint = commands.add_parser(
        "inpaint", help="fill the white region of a mask, guided by a prompt",
        description="Fill the white region of MASK in IMAGE, guided by --prompt. IMAGE and MASK may be "
                    "folders: images and masks are then paired by file name (stem).")
    inpaint.add_argument("image", metavar="IMAGE", help="image file, or a folder of images")
    inpaint.add_argument("mask", metavar="MASK", nargs="?",
                         help="mask file (white = fill), or a folder of masks (one mask file also serves a whole folder of "
                              "images); or select with --point/--box/--text")
    _add_prompt_options(inpaint, batch=True)
    _add_task_options(inpaint)
    masks = inpaint.add_argument_group("mask")
    masks.add_argument("--invert-mask", action="store_true", help="fill the black region instead of the white")
    masks.add_argument("--mask-threshold", type=int, default=128, metavar="0-255",
                       help="mask pixels at or above this value are filled (default 128)")
    masks.add_argument("--dilate", type=int, default=0, metavar="PX", help="grow the hole by PX pixels")
    from .mask_command import add_mask_command, add_selection_options

    add_selection_options(inpaint)
    add_model_options(inpaint)
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
    add_model_options(outpaint)
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
    pack.add_argument("folder", metavar="FOLDER",
                      help="images (.png/.jpg/.webp) with same-name .txt captions, optional masks/NAME.png "
                           "(white = hole) or NAME.json segmentations")
    pack.add_argument("out", metavar="OUT_DIR", help="folder for the brushdata-NNNNN.tar shards (made if missing)")
    pack.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    pack.add_argument("--overwrite", action="store_true", help="replace existing shards")
    pack.set_defaults(func=cmd_data_pack)

    from .evaluation.cli import add_bench_command

    add_bench_command(commands)

    from .serve import add_serve_command

    add_serve_command(commands)
    add_mask_command(commands)

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

    convert = commands.add_parser(
        "convert", help="write a safetensors copy of a PowerPaint release's pickled text encoder",
        description="Write text_encoder_brushnet.safetensors beside a PowerPaint v2 release's pytorch_model.bin "
                    "(the branch's text encoder: same tensors, same names), so the model loads without unpickling.")
    convert.add_argument("path", metavar="PATH", help="the PowerPaint folder (PowerPaint_Brushnet/ or the one above "
                                                      "it), or its pytorch_model.bin")
    convert.add_argument("--allow-pickle", action="store_true",
                         help="also read a .bin that holds more than plain tensors (it can run code: only if trusted)")
    convert.add_argument("--overwrite", action="store_true", help="replace an existing text_encoder_brushnet.safetensors")
    convert.set_defaults(func=cmd_convert)

    info = commands.add_parser("info", help="print the generation parameters stored in an output image")
    info.add_argument("png", metavar="OUTPUT.png", help="an image brushnet wrote (.png, .jpg or .webp)")
    info.set_defaults(func=cmd_info)
    return parser


def _add_prompt_options(parser, batch: bool) -> None:
    group = parser.add_argument_group("prompt")
    group.add_argument("--prompt", "-p", help="what to paint in the hole")
    group.add_argument("--negative-prompt", "-n", default="", help="what to avoid")
    if batch:
        group.add_argument("--prompts", metavar="FILE",
                           help="per-image prompts (a folder's, or the one image's line): .txt with 'stem: prompt' "
                                "lines or .json {stem: prompt}; default IMAGE/prompts.txt or .json if present")


# PowerPaint tasks by their command-line names; "remove" is the everyday word for object removal.
TASK_CHOICES = {"text-guided": "text-guided", "object-removal": "object-removal", "remove": "object-removal",
                "shape-guided": "shape-guided", "context-aware": "context-aware", "outpainting": "outpainting"}
PROMPT_FREE_TASKS = {"object-removal", "context-aware", "outpainting"}


def _add_task_options(parser) -> None:
    group = parser.add_argument_group("PowerPaint (with a PowerPaint v2 --brushnet)")
    group.add_argument("--task", choices=list(TASK_CHOICES), default=None,
                       help="what to do with the hole: text-guided (default), object-removal (alias remove; no "
                            "prompt needed), shape-guided, context-aware, outpainting")
    group.add_argument("--fitting-degree", type=float, default=None, metavar="0-1",
                       help="shape-guided: how closely the object follows the mask's shape (default 1)")


def _powerpaint_keywords(pipe, args, job) -> dict:
    """The task keywords of a PowerPaint pipeline (outpaint jobs use the outpainting task); a task
    other than text-guided with a plain BrushNet is a mistake."""
    from .pipelines import StableDiffusionPowerPaintPipeline

    task = TASK_CHOICES[getattr(args, "task", None) or "text-guided"]
    if not isinstance(pipe, StableDiffusionPowerPaintPipeline):
        if task != "text-guided":
            raise UserError(f"--task {args.task} needs a PowerPaint v2 model as --brushnet; a BrushNet only does "
                            "text-guided inpainting (for removal, try random_mask_brushnet_ckpt and a negative "
                            "prompt)")
        return {}
    if "canvas" in job:
        task = "outpainting"
    fitting_degree = getattr(args, "fitting_degree", None)
    return {"task": task, "fitting_degree": 1.0 if fitting_degree is None else fitting_degree}


def _add_generation_options(parser) -> None:
    group = parser.add_argument_group("generation")
    group.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    group.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    group.add_argument("--guidance-rescale", type=float, default=0.0, metavar="R",
                       help="0 to 1: pull the guided prediction back toward the prompt's own spread (diffusers' "
                            "guidance_rescale; for zero-terminal-SNR models, about 0.7; default 0: plain guidance)")
    group.add_argument("--scale", type=float, default=1.0, help="BrushNet conditioning scale (default 1.0)")
    group.add_argument("--start", type=float, default=0.0, help="fraction of the steps where BrushNet starts")
    group.add_argument("--end", type=float, default=1.0, help="fraction of the steps where BrushNet stops")
    group.add_argument("--seed", type=int, help="random seed (default or -1: random, recorded in the output)")
    group.add_argument("--num-images", type=int, default=1, help="images per input (seeds seed, seed+1, ...)")
    group.add_argument("--blend", action=argparse.BooleanOptionalAction, default=True,
                       help="paste the result over the original through a blurred mask (default on)")
    group.add_argument("--blend-kernel", type=int, default=None,
                       help="blur kernel of the blending (odd; default 21, narrower for models below 512 px)")
    group.add_argument("--crop-to-mask", action="store_true",
                       help="process only a window around the hole at the model's native size (large photos)")
    group.add_argument("--context", type=float, default=0.3,
                       help="with --crop-to-mask, context around the hole as a fraction of its size (default 0.3)")
    group.add_argument("--strength", type=float, default=1.0,
                       help="below 1: start from the image noised to this fraction of the steps, keeping its "
                            "colours (default 1: from noise)")
    group.add_argument("--brushnet-every", type=int, default=1, metavar="K",
                       help="run the BrushNet branch on every K-th step only, reusing its residuals between: "
                            "faster, approximate (default 1: every step; drift and quality in BENCHMARKS.md)")


def _add_output_options(parser, batch: bool) -> None:
    group = parser.add_argument_group("output")
    written = "output image (.png, the default; .jpg or .webp written as such), or an existing folder to write it in"
    group.add_argument("--out", "-o", help=f"{written} (the folder of results when IMAGE is a folder)" if batch
                       else written)
    group.add_argument("--overwrite", action="store_true", help="replace existing outputs (default: keep them)")


# -- commands -----------------------------------------------------------------------------------

def cmd_inpaint(args) -> int:
    check_generation_args(args)
    jobs, process_device = _share_of_launch(_inpaint_jobs(args))
    if not jobs:
        return 0
    if not jobs[0]["batch"] and not args.overwrite:
        _refuse_existing(jobs[0]["outputs"])
    todo = [job for job in jobs if args.overwrite or not all(p.exists() for p in job["outputs"])]
    if len(todo) < len(jobs):
        print(f"skipping {len(jobs) - len(todo)} input(s) whose outputs exist (--overwrite to redo them)")
    if not todo:
        return 0
    prepare_output_folders([p for job in todo for p in job["outputs"]])
    # Read every input before the model loads: a single bad file stops the run at once; in a
    # folder, the broken ones are named now and at the end, and the good ones are processed.
    broken = {}
    for job in todo:
        try:
            _read_job(job, args)
        except ValueError as error:
            if not job["batch"]:
                raise
            broken[job["image"].name] = str(error).rstrip(".")
            print(f"brushnet: skipping {job['image'].name}: {broken[job['image'].name]}", file=sys.stderr)
    good = [job for job in todo if job["image"].name not in broken]
    if good:
        pipe, model_params = _load(args, process_device)
        broken.update(_run_jobs(pipe, model_params, args, good))
    if broken:
        names = ", ".join(f"{name} ({reason})" for name, reason in broken.items())
        raise UserError(f"{len(broken)} of {len(todo)} input(s) could not be processed: {names}")
    return 0


def _share_of_launch(jobs: list[dict]) -> tuple[list[dict], str | None]:
    """Under `accelerate launch` or `torchrun`, this process's share of a folder's inputs (each
    input done by exactly one process) and its device; else all of them."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return jobs, None
    from .processes import process_info, shard

    if not jobs[0]["batch"]:
        raise UserError("a multi-process launch splits a folder of images between its processes, but IMAGE is one "
                        "file: run brushnet inpaint without accelerate launch / torchrun")
    process = process_info()
    mine = shard(jobs, process.rank, process.world_size)
    say(f"process {process.rank + 1} of {process.world_size}: {len(mine)} of {len(jobs)} input(s)")
    return mine, process.device


def _read_job(job, args):
    """(image, mask) of a job, or a ValueError saying what is wrong with its files."""
    from .masks import faint_hole, load_mask, open_image

    if "canvas" in job:
        return job["canvas"]
    if job.get("transparent_hole") is not None:
        mask = load_mask(job["transparent_hole"], invert=args.invert_mask, dilate=args.dilate)
        if mask.getbbox() is None:
            raise UserError(f"--invert-mask leaves nothing to inpaint: {job['image']} is transparent everywhere")
        return open_image(job["image"]), mask
    if job["mask"] is None:
        from .mask_command import read_selection_job

        return read_selection_job(job, args)
    image = open_image(job["image"])
    mask = load_mask(job["mask"], args.mask_threshold, args.invert_mask, args.dilate)
    if image.size != mask.size:
        raise UserError(f"{job['image']} is {image.width}x{image.height} but {job['mask']} is "
                        f"{mask.width}x{mask.height}: masks must have the size of their image")
    if mask.getbbox() is None:
        brightest = None if args.invert_mask else faint_hole(job["mask"], args.mask_threshold)
        if brightest is not None:
            lower = f" or pass --mask-threshold {int(brightest)}" if brightest >= 1 else ""
            raise UserError(f"{job['mask']} has no pixel at or above --mask-threshold {args.mask_threshold}: its "
                            f"brightest is {brightest:g} (a 0/1 array saved as an image?); save the hole as 255 "
                            f"(white){lower}")
        if args.invert_mask:
            raise UserError(f"{job['mask']} inverted leaves nothing to fill: every pixel is at or above "
                            f"--mask-threshold {args.mask_threshold}; leave out --invert-mask or raise the threshold")
        raise UserError(f"{job['mask']} has no pixel at or above --mask-threshold {args.mask_threshold}: "
                        "nothing to inpaint (white = fill; --invert-mask if your hole is black)")
    hole_share = mask.histogram()[255] / (mask.width * mask.height)  # load_mask's masks are 0 or 255
    if HOLE_SHARE_NOTE <= hole_share < 1 and not args.invert_mask:
        # Most likely a mask drawn the other way round (the object black on white); say so, but go on:
        # a large hole is also what some people mean.
        say(f"note: the hole is {hole_share:.0%} of {job['image']} (white = fill); if your mask marks the hole "
            "in black, pass --invert-mask")
    return image, mask


def cmd_outpaint(args) -> int:
    from .masks import open_image
    from .regions import outpaint_canvas

    check_generation_args(args)
    image_path = Path(args.image)
    from .loading import is_powerpaint

    # PowerPaint outpaints from the surroundings alone; a BrushNet needs to be told what to paint.
    powerpaint = bool(args.brushnet) and is_powerpaint(args.brushnet)
    prompt = (args.prompt or "") if powerpaint else _require_prompt(args.prompt)
    image = open_image(image_path)
    canvas = outpaint_canvas(image, args.left, args.right, args.top, args.bottom)
    out = _single_output(args.out, f"{image_path.stem}-outpainted.png")
    outputs = _output_paths(out, args.num_images)
    _refuse_output_over_input(outputs, {"IMAGE": image_path})
    if not args.overwrite:
        _refuse_existing(outputs)
    prepare_output_folders(outputs)
    job = {"image": image_path, "mask": None, "prompt": prompt, "outputs": outputs, "batch": False,
           "canvas": canvas,
           "extra_params": {"outpaint": {s: getattr(args, s) for s in ("left", "right", "top", "bottom")}}}
    pipe, model_params = _load(args)
    _run_jobs(pipe, model_params, args, [job])
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
    prompt = args.prompt or example.prompt
    inpaint_args = build_parser().parse_args([
        "inpaint", str(paths["scene"]), str(paths["mask"]), "--prompt", prompt, "--out", str(paths["result"]),
        "--seed", str(args.seed), "--steps", str(args.steps), "--overwrite"])
    # Checked before the scene and mask are written: they would otherwise stay behind and make
    # the corrected command refuse to replace them.
    check_generation_args(inpaint_args)
    from .demo.model import DEMO_MODEL_DIR

    check_steps_fit_scheduler(inpaint_args.steps, inpaint_args.scheduler, DEMO_MODEL_DIR)
    _require_prompt(prompt)
    prepare_output_folders(list(paths.values()))
    from .metadata import save_png

    save_png(scene.image, paths["scene"], {"caption": scene.caption}, overwrite=True)
    save_png(example.mask, paths["mask"], {}, overwrite=True)
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
    from .arguments import check_number
    from .data import pack_folder

    user_checked(check_number, args.shard_size, "--shard-size", low=1, integer=True)
    shards = pack_folder(args.folder, args.out, shard_size=args.shard_size, overwrite=args.overwrite)
    print(f"wrote {len(shards)} shard(s) to {args.out}")
    return 0


def cmd_convert(args) -> int:
    from .loading import write_text_encoder_safetensors

    print(f"wrote {write_text_encoder_safetensors(args.path, allow_pickle=args.allow_pickle, overwrite=args.overwrite)}")
    return 0


def cmd_info(args) -> int:
    from .metadata import read_png_params

    print(json.dumps(read_png_params(args.png), indent=2, sort_keys=True))
    return 0


# -- helpers ------------------------------------------------------------------------------------

def _inpaint_jobs(args) -> list[dict]:
    from .mask_command import check_selection_args, has_selection
    from .masks import transparent_hole

    image, mask = Path(args.image), Path(args.mask) if args.mask else None
    # An image with an erased (transparent) hole and nothing else selecting one is its own mask.
    transparent = (transparent_hole(image) if mask is None and not has_selection(args) and image.is_file()
                   else None)
    check_selection_args(args, mask_given=mask is not None or transparent is not None)
    if transparent is not None:
        print(f"the hole: the transparent pixels of {image} (no MASK given)")
    if not image.exists():
        raise UserError(f"{image} does not exist")
    if mask is None and image.is_dir():
        raise UserError("--point/--box/--text select in one image: IMAGE must be a file (for a folder, give MASK)")
    if mask is not None and not mask.exists():
        raise UserError(f"{mask} does not exist")
    if mask is not None and mask.is_dir() and not image.is_dir():
        raise UserError(f"MASK {mask} is a folder but IMAGE {image} is a file: give one mask file for one image "
                        "(a folder of masks goes with a folder of images)")
    if not image.is_dir():
        out = _single_output(args.out, f"{image.stem}-inpainted.png")
        outputs = _output_paths(out, args.num_images)
        _refuse_output_over_input(outputs, {"IMAGE": image, "MASK": mask})
        task = TASK_CHOICES[args.task or "text-guided"]
        prompt = args.prompt
        if args.prompts:  # the file's line for this image, as in a folder (it was ignored here)
            listed = _read_prompts(args, image.parent)
            prompt = listed.get(image.stem, prompt)
            if prompt is None and task not in PROMPT_FREE_TASKS:
                raise UserError(f"--prompts {args.prompts} has no prompt for {image.stem}: add a line "
                                f"'{image.stem}: ...' or pass --prompt")
        prompt = (prompt or "") if task in PROMPT_FREE_TASKS else _require_prompt(prompt)
        return [{"image": image, "mask": mask, "prompt": prompt, "transparent_hole": transparent,
                 "outputs": outputs, "batch": False,
                 "extra_params": {"mask_from": "transparency"} if transparent is not None else {}}]

    from .data.folder import check_unique_stems

    images = _images_in(image)
    check_unique_stems(images, image, "their results would both be {stem}.png; rename one of them")
    # One mask file serves every image of the folder (the same hole in a series of shots).
    if mask.is_dir():
        mask_files = _images_in(mask)
        check_unique_stems(mask_files, mask, "only one of them would be the mask of {stem}; rename one of them")
        masks = {p.stem: p for p in mask_files}
    else:
        masks = {p.stem: mask for p in images}
    if not images:
        raise UserError(f"no images in {image}")
    missing = [p.name for p in images if p.stem not in masks]
    if missing:
        raise UserError(f"no mask in {mask} for {len(missing)} image(s), e.g. {', '.join(missing[:3])} "
                        "(masks are matched by file name without extension)")
    prompts = _read_prompts(args, image)
    prompt_free = TASK_CHOICES[args.task or "text-guided"] in PROMPT_FREE_TASKS
    without = [] if prompt_free else [p.name for p in images if p.stem not in prompts and not args.prompt]
    if without:
        raise UserError(f"no prompt for {len(without)} image(s), e.g. {', '.join(without[:3])}: "
                        "pass --prompt for all or list them in --prompts")
    out_dir = Path(args.out).expanduser() if args.out else Path("brushnet-out")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} must be a folder when IMAGE is a folder")
    if not out_dir.exists() and out_dir.suffix.lower() in IMAGE_SUFFIXES:
        raise UserError(f"--out {out_dir} names an image file, but IMAGE is a folder: give the folder to write the "
                        "results in")
    for name, folder in (("IMAGE", image), ("MASK", mask if mask.is_dir() else None)):
        if folder is not None and out_dir.resolve() == folder.resolve():
            # Its files would pass for finished results, and --overwrite would replace them.
            raise UserError(f"--out {out_dir} is the {name} folder: the results would replace its files; give "
                            "another folder")
    return [{"image": p, "mask": masks[p.stem], "prompt": prompts.get(p.stem, args.prompt or ""), "batch": True,
             "outputs": _output_paths(out_dir / f"{p.stem}.png", args.num_images), "extra_params": {}}
            for p in images]


def _single_output(out_arg: str | None, default_name: str) -> Path:
    """The output file of a one-image command: --out as given (~ expanded), or `default_name` inside
    it where it is an existing folder or ends in a slash (a folder to make), or `default_name`."""
    if not out_arg:
        return Path(default_name)
    if out_arg == "-":  # written as a file named "-.png" before
        raise UserError("--out - (standard output) is not supported: give a file name or a folder")
    out = Path(out_arg).expanduser()
    if out.is_dir() or out_arg.endswith(("/", os.sep)):
        return out / default_name
    return out


def _refuse_output_over_input(outputs: list[Path], inputs: dict) -> None:
    """No output may be a file the run reads (--out MASK.png --overwrite replaced the mask)."""
    for name, source in inputs.items():
        if source is not None and any(p.resolve() == Path(source).resolve() for p in outputs):
            raise UserError(f"--out {outputs[0]} is the {name} file itself: the result would replace it; give "
                            "another name")


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
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: Notepad starts UTF-8 with a BOM
    except UnicodeDecodeError as error:
        raise UserError(f"{path} is not UTF-8 text (byte {error.start}): save it as UTF-8") from None
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
    if not prompt or not prompt.strip():
        raise UserError("--prompt is required: describe what to paint in the hole")
    return prompt


def _output_paths(out: Path, num_images: int) -> list[Path]:
    if num_images < 1:
        raise UserError(f"--num-images must be >= 1; got {num_images}")
    from .metadata import OUTPUT_FORMATS

    if not out.suffix:
        out = out.with_name(out.name + ".png")
    elif out.suffix.lower() not in OUTPUT_FORMATS:
        # Writing "result.txt" as result.png, or "photo.v2" as photo.png, put the image where nobody looked.
        raise UserError(f"--out {out}: {out.suffix} is not an image format brushnet writes; end the name in .png, "
                        ".jpg or .webp (with no suffix it is written as .png)")
    if num_images == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{k}{out.suffix}") for k in range(num_images)]


def _refuse_existing(paths: list[Path]) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing:
        raise UserError(f"{existing[0]} already exists; pass --overwrite to replace it")


def _load(args, process_device: str | None = None):
    """Load the pipeline named on the command line (on this process's own GPU under a multi-process
    launch); returns it and the parameters to record."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    # Loading bars for a handful of components are noise; the denoising bar stays.
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    device = resolve_device(args.device, process_device)
    dtype = resolve_dtype(args.dtype, device)
    pipe = load_pipeline_from_args(args, device, dtype)
    pipe.set_progress_bar_config(leave=False, desc="steps")
    return pipe, model_params(args, dtype)


def _run_jobs(pipe, model_params: dict, args, jobs) -> dict[str, str]:
    """Generate and save every job's images, each saved as soon as it is made. In a folder, an input
    that fails is recorded and the others go on; returns {input name: reason} of those."""
    from tqdm.auto import tqdm

    from . import inpaint as inpainting
    from .pipelines.base import NonFiniteOutputError

    seed = args.seed if args.seed is not None and args.seed >= 0 else random.randrange(2**31)
    failed = {}
    for job in tqdm(jobs, desc="images", disable=len(jobs) == 1):
        keywords = _powerpaint_keywords(pipe, args, job)
        job["extra_params"].update(keywords)
        if "canvas" not in job:  # how the hole was read, so that `brushnet info` can reproduce it
            job["extra_params"].update(mask_threshold=args.mask_threshold, invert_mask=args.invert_mask,
                                       dilate=args.dilate)
        settings = inpainting.InpaintSettings(
            prompt=job["prompt"], negative_prompt=args.negative_prompt, steps=args.steps, guidance=args.guidance,
            guidance_rescale=args.guidance_rescale, scale=args.scale, start=args.start, end=args.end, seed=seed, num_images=args.num_images,
            blend=args.blend, blend_kernel=args.blend_kernel or inpainting.default_blend_kernel(pipe),
            crop_to_mask=args.crop_to_mask, context=args.context, strength=args.strength,
            brushnet_every=args.brushnet_every, vae_tiling=args.vae_tiling, extra=keywords,
        )
        try:
            image, mask = _read_job(job, args)
            saved = set()
            for attempt in range(2):
                try:
                    for path, result, image_seed in _missing_results(inpainting, pipe, image, mask, settings, job,
                                                                     args.overwrite):
                        if path not in saved:
                            _save_result(result, path, job, settings, model_params, image_seed, args.overwrite)
                            saved.add(path)
                    break
                except NonFiniteOutputError:
                    if attempt or not _fall_back_to_fp32(pipe, args, model_params):
                        raise
        except (ValueError, FileNotFoundError) as error:
            if not job["batch"]:
                raise
            failed[job["image"].name] = str(error).rstrip(".")
            say(f"brushnet: {job['image'].name} failed: {failed[job['image'].name]}", sys.stderr)
    return failed


def _missing_results(inpainting, pipe, image, mask, settings, job, overwrite: bool):
    """(path, image, seed) for each output of `job` still to make. A folder run stopped part-way
    through an input's --num-images left some of them: only the others are made, each from its own
    seed (a result depends on its seed alone), so the rerun goes on instead of stopping at the first."""
    seeds = inpainting.image_seeds(settings)
    pending = [(path, seed) for path, seed in zip(job["outputs"], seeds) if overwrite or not path.exists()]
    if len(pending) == len(seeds):
        yield from zip(job["outputs"], inpainting.iter_inpaint(pipe, image, mask, settings), seeds)
        return
    for path, seed in pending:
        (result,) = inpainting.iter_inpaint(pipe, image, mask, replace(settings, seed=seed, num_images=1))
        yield path, result, seed


def _fall_back_to_fp32(pipe, args, model_params: dict) -> bool:
    """After NaNs from bfloat16 that --dtype auto chose on a CPU, move the pipeline to float32 for this
    image and the rest (the user asked for no precision, only for a fast one); False where the
    precision was asked for, or is float32 already."""
    import torch

    if args.dtype != "auto" or pipe.unet.dtype != torch.bfloat16 or pipe.unet.device.type != "cpu":
        return False
    say("brushnet: note: bfloat16 gave NaN values on this image (a oneDNN fault on this CPU); redoing it, and "
        "the rest, in float32", sys.stderr)
    pipe.to(torch.float32)
    model_params["dtype"] = "float32"
    return True


def _save_result(result, path: Path, job, settings, model_params: dict, image_seed: int, overwrite: bool) -> None:
    from .metadata import save_png

    params = {**settings.as_dict(), **model_params, **job["extra_params"], "seed": image_seed,
              "num_images": 1, "source_image": Path(job["image"]).name,
              "source_mask": Path(job["mask"]).name if job["mask"] else None,
              "width": result.width, "height": result.height}
    params.pop("extra")
    try:
        save_png(result, path, params, overwrite=overwrite)
    except OSError as error:
        if isinstance(error, FileExistsError):
            raise
        raise UserError(f"cannot write {path} ({error.strerror or error}): check the folder") from None
    say(f"wrote {path}")


def main(argv=None) -> int:
    # transformers warns at import that torchvision is absent; the CLI needs no torchvision.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        argv = sys.argv[1:] if argv is None else list(argv)
        args = build_parser().parse_args(join_signed_numbers(argv))
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        if os.environ.get("BRUSHNET_DEBUG"):
            raise
        say(f"brushnet: error: {error}", sys.stderr)
        return 2
    except BrokenPipeError:
        # `brushnet info OUT.png | head`: the reader has gone, which is no error. Python's own advice:
        # point stdout at devnull so the exit's flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as error:  # the file system said no (permissions, a full disk, a folder for a file)
        if os.environ.get("BRUSHNET_DEBUG"):
            raise
        where = f": {error.filename}" if getattr(error, "filename", None) else ""
        say(f"brushnet: error: {error.strerror or error}{where}", sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Outputs are written to a temporary name and renamed: no partial file is left behind.
        say("brushnet: interrupted; every output written so far is complete", sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
