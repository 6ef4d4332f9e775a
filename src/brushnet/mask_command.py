"""`brushnet mask` and the selection options `brushnet inpaint` shares with it: --point,
--negative-point, --box and --text, turned into a mask by --segmenter (SAM) and --detector."""

import argparse
import os
from pathlib import Path

from .options import UserError, prepare_output_folders, resolve_device, user_checked

SEGMENTER_HELP = "SAM checkpoint: folder or hub id (e.g. facebook/sam-vit-base, or a SlimSAM)"
DETECTOR_HELP = "open-vocabulary detector for --text: folder or hub id (e.g. IDEA-Research/grounding-dino-tiny)"


def _numbers(text: str, count: int, what: str) -> tuple[float, ...]:
    parts = text.split(",")
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != count:
        raise argparse.ArgumentTypeError(f"expected {what} (pixels, comma-separated), got {text!r}")
    return values


def parse_point(text: str) -> tuple[float, float]:
    return _numbers(text, 2, "X,Y")


def parse_box(text: str) -> tuple[float, float, float, float]:
    return _numbers(text, 4, "X0,Y0,X1,Y1")


def add_selection_options(parser) -> None:
    from .segmentation import BOX_THRESHOLD

    group = parser.add_argument_group(
        "selection", "select the region to fill instead of giving a mask (pixel coordinates of the image)")
    group.add_argument("--point", action="append", type=parse_point, default=[], metavar="X,Y",
                       help="a pixel on the object (repeatable)")
    group.add_argument("--negative-point", action="append", type=parse_point, default=[], metavar="X,Y",
                       help="a pixel that is not part of the object (repeatable)")
    group.add_argument("--box", action="append", type=parse_box, default=[], metavar="X0,Y0,X1,Y1",
                       help="a box around an object (repeatable; with --point, one box)")
    group.add_argument("--text", action="append", default=[], metavar="WORDS",
                       help="words naming the objects to select, e.g. 'a dog' or 'a cat. a dog' (needs --detector)")
    group.add_argument("--segmenter", metavar="SAM", help=SEGMENTER_HELP)
    group.add_argument("--detector", metavar="DET", help=DETECTOR_HELP)
    group.add_argument("--threshold", type=float,
                       help=f"the detector's score threshold for --text (default {BOX_THRESHOLD})")


def add_mask_command(commands) -> None:
    parser = commands.add_parser(
        "mask", help="make a mask by clicking points, a box or naming the object (SAM)",
        description="Write the mask (white = fill) of the objects selected in IMAGE by --point/--box (SAM) or "
                    "--text (an open-vocabulary detector, then SAM), at the image's size.")
    parser.add_argument("image", metavar="IMAGE", help="image file")
    add_selection_options(parser)
    parser.add_argument("--dilate", type=int, default=0, metavar="PX", help="grow the mask by PX pixels")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("--out", "-o", metavar="MASK.png",
                        help="output PNG, or a folder to write IMAGE-mask.png in (default IMAGE-mask.png)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.set_defaults(func=cmd_mask)


def has_selection(args) -> bool:
    return bool(args.point or args.negative_point or args.box or args.text)


def check_selection_args(args, mask_given: bool = False, mask_accepted: bool = True) -> None:
    """What can be checked before the image is read: a selection and the models it needs.
    `mask_accepted`: the command also takes a MASK file (inpaint does, `brushnet mask` does not)."""
    if mask_given and has_selection(args):
        raise UserError("give either MASK or --point/--box/--text, not both")
    if not has_selection(args):
        if not mask_accepted:
            raise UserError("nothing selects the objects to mask: give --point X,Y or --box X0,Y0,X1,Y1 with "
                            "--segmenter, or --text WORDS with --detector and --segmenter")
        if not mask_given:
            raise UserError("nothing selects the region to fill: give MASK, or --point/--box/--text with --segmenter "
                            "(or erase the hole to transparent in IMAGE)")
        unused = [flag for flag, value in (("--segmenter", args.segmenter), ("--detector", args.detector),
                                           ("--threshold", args.threshold)) if value is not None]
        if unused:
            raise UserError(f"{unused[0]} is only used with --point/--box/--text; with MASK, leave it out")
        return
    if not args.segmenter:
        raise UserError("--point/--box/--text need --segmenter: a SAM checkpoint, e.g. facebook/sam-vit-base")
    if args.text and not args.detector:
        raise UserError("--text needs --detector: an open-vocabulary detector, e.g. IDEA-Research/grounding-dino-tiny")
    for flag, value in (("--detector", args.detector), ("--threshold", args.threshold)):
        if value is not None and not args.text:
            raise UserError(f"{flag} is only used with --text: name the objects to find")
    from .arguments import check_number

    if args.threshold is not None:
        user_checked(check_number, args.threshold, "--threshold", low=0.0, high=1.0, low_inclusive=False)
    user_checked(check_number, args.dilate, "--dilate", low=0, integer=True)


def selected_mask(args, image, dilate: int | None = None):
    """The mask (255 = fill, the image's size) of the selection on the command line, grown by
    `dilate` pixels (default --dilate)."""
    from .segmentation import Detector, Segmenter, build_prompts, select_mask
    from .segmentation.select import check_dilate

    user_checked(build_prompts, image.size, args.point, args.negative_point, args.box, has_text=bool(args.text))
    dilate = args.dilate if dilate is None else dilate
    # select_mask's own check, here under the flag's name and before the models load.
    user_checked(check_dilate, dilate, image.size, "--dilate")
    device = resolve_device(args.device)
    segmenter = user_checked(Segmenter.from_pretrained, args.segmenter, device)
    detector = user_checked(Detector.from_pretrained, args.detector, device) if args.text else None
    return user_checked(select_mask, image, segmenter, points=args.point, negative_points=args.negative_point,
                        boxes=args.box, text=args.text, detector=detector, threshold=_threshold(args),
                        dilate=dilate)


def read_selection_job(job, args):
    """(image, mask) of a `brushnet inpaint` job whose hole is selected rather than given; the
    models run once per job, however often the job is read."""
    from .masks import load_mask, open_image

    if "selection" not in job:
        image = open_image(job["image"])
        # --invert-mask first, so that --dilate always grows the region to fill.
        mask = load_mask(selected_mask(args, image, dilate=0), invert=args.invert_mask, dilate=args.dilate)
        job["selection"] = image, mask
        job["extra_params"]["selection"] = selection_params(args)
    return job["selection"]


def _threshold(args) -> float:
    from .segmentation import BOX_THRESHOLD

    return BOX_THRESHOLD if args.threshold is None else args.threshold


def selection_params(args) -> dict:
    """What an output records about the selection that made its mask."""
    params = {"segmenter": args.segmenter, "points": [list(p) for p in args.point],
              "negative_points": [list(p) for p in args.negative_point], "boxes": [list(b) for b in args.box]}
    if args.text:
        params.update(text=args.text, detector=args.detector, threshold=_threshold(args))
    return params


def cmd_mask(args) -> int:
    from .masks import open_image
    from .metadata import save_png

    check_selection_args(args, mask_accepted=False)
    image_path = Path(args.image)
    out = Path(args.out) if args.out else Path(f"{image_path.stem}-mask.png")
    if args.out and (out.is_dir() or args.out.endswith(("/", os.sep))):
        # A folder, as inpaint's --out may be: the mask goes into it under its default name.
        out = out / f"{image_path.stem}-mask.png"
    if out.suffix.lower() != ".png":
        raise UserError(f"--out {out}: masks are written as PNG; give a .png name")
    if out.exists() and out.resolve() == image_path.resolve():  # --overwrite replaced the photo with its mask
        raise UserError(f"--out {out} is the IMAGE file itself: the mask would replace it; give another name")
    if out.exists() and not args.overwrite:
        raise UserError(f"{out} already exists; pass --overwrite to replace it")
    prepare_output_folders([out])
    image = open_image(image_path)
    mask = selected_mask(args, image)
    save_png(mask, out, {**selection_params(args), "dilate": args.dilate, "source_image": image_path.name},
             overwrite=args.overwrite)
    print(f"wrote {out} ({100 * mask.histogram()[255] / (mask.width * mask.height):.1f} % of the image selected)")
    return 0
