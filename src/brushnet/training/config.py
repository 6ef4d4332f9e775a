"""Training options. Names are those of the authors' `train_brushnet.py`, so its documented commands
run unchanged (`--learning_rate` and `--learning-rate` both work); new options have clear names."""

import argparse
import math
import sys
import typing
from dataclasses import dataclass, field, fields


@dataclass
class TrainConfig:
    # models
    pretrained_model_name_or_path: str = ""
    brushnet_model_name_or_path: str | None = None  # resume from a BrushNet; default: BrushNetModel.from_unet
    pretrained_vae_model_name_or_path: str | None = None  # e.g. an fp16-safe SDXL VAE
    revision: str | None = None
    allow_pickle: bool = False
    # data
    train_data_dir: str = ""  # BrushData *.tar shards, or a folder of images + .txt captions
    resolution: int = 512
    random_mask: bool = False
    mask_mix: str = "reference"  # see brushnet.data.mask_mix: reference, strokes or drawn
    drawn_weights: str | None = None  # --mask_mix drawn: "kind=weight,..." (brushnet.data.mask_mix.DRAWN_KINDS)
    mask_downsampling: str | None = None  # the branch's mask at latent size; None: the BrushNet's own (nearest if new)
    proportion_empty_prompts: float = 0.0
    dataloader_num_workers: int = 0
    shuffle_buffer: int = 1000
    # optimisation (the reference's recipe)
    train_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    max_train_steps: int = 10000
    learning_rate: float = 1e-5
    scale_lr: bool = False
    lr_scheduler: str = "constant"
    lr_warmup_steps: int | None = None  # None: 500, as in the reference, for the schedulers that warm up
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    use_8bit_adam: bool = False
    mixed_precision: str | None = None  # "no", "fp16", "bf16"; None: accelerate's config
    gradient_checkpointing: bool = False
    set_grads_to_none: bool = False
    use_ema: bool = False
    ema_decay: float = 0.9999
    masked_loss_weight: float = 1.0  # > 1 weights the hole's latent pixels more; 1 = the paper's plain MSE
    noise_offset: float = 0.0  # a per-image, per-channel shift of the noise; 0 = the paper's plain noise
    zero_conv_lr_scale: float = 1.0  # the branch's output convs learn this much faster; 1 = the paper's one rate
    seed: int | None = None
    # SDXL size conditioning of the crops
    crops_coords_top_left_h: int = 0
    crops_coords_top_left_w: int = 0
    # checkpoints, validation, logging
    output_dir: str = "brushnet-model"
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = None
    resume_from_checkpoint: str | None = None  # a checkpoint folder or "latest"
    validation_steps: int = 100
    validation_image: list[str] = field(default_factory=list)
    validation_mask: list[str] = field(default_factory=list)
    validation_prompt: list[str] = field(default_factory=list)
    num_validation_images: int = 1
    validation_inference_steps: int = 20
    report_to: str = "tensorboard"
    logging_dir: str = "logs"
    tracker_project_name: str = "brushnet"


_HELP = {
    "pretrained_model_name_or_path": "base SD1.5/SDXL model: diffusers folder or hub id",
    "brushnet_model_name_or_path": "BrushNet to continue from (default: initialised from the base UNet)",
    "train_data_dir": "BrushData *.tar shards, or a folder of images with same-stem .txt captions",
    "random_mask": "train with random brush masks instead of the segmentation masks",
    "mask_mix": "reference (the authors' masks, as --random_mask says), strokes (their brush strokes scaled to "
                "--resolution; at 512 the same as --random_mask) or drawn (objects, grown objects, boxes, blobs, "
                "strokes, strokes over the background: brushnet.data.mask_mix)",
    "drawn_weights": "with --mask_mix drawn, how often each kind of hole is drawn, as kind=weight,... over shape, "
                     "grown, box, blob, shape+strokes, strokes, background-strokes (default: "
                     "brushnet.data.mask_mix.DRAWN_WEIGHTS)",
    "mask_downsampling": "how the keep mask reaches latent size, stored in the BrushNet's config: nearest (the "
                         "reference's, the default for a new BrushNet) or max (a latent cell is hole if any of its "
                         "pixels is: for holes as thin as the VAE's 8 px, or 4 px on the demo model)",
    "resume_from_checkpoint": "a checkpoint-N folder (a path, or a name in --output_dir), or 'latest': the "
                              "newest complete one (also --resume)",
    "lr_scheduler": "constant (the default: no warm-up, as the reference runs), constant_with_warmup, linear, "
                    "cosine, cosine_with_restarts or polynomial",
    "lr_warmup_steps": "linear warm-up from 0 over this many steps (default 500) for every --lr_scheduler "
                       "but constant",
    "masked_loss_weight": "weight of the hole's pixels in the loss (1 = plain MSE as in the paper)",
    "noise_offset": "add this much of a per-image, per-channel Gaussian to the training noise (diffusers' "
                    "--noise_offset; 0, the default, as the paper). At high noise a latent still carries its "
                    "image's mean colour, which inference's pure noise does not; with an offset (0.1 is usual) "
                    "the branch learns to take the colours from the known region instead",
    "zero_conv_lr_scale": "the learning rate of the branch's zero-initialised output convs (the brushnet_*_blocks "
                          "that add into the UNet) times this (1, the default: one rate for all, as the paper). "
                          "Above 1 the branch's residuals grow faster, for a branch that holds the known region too "
                          "weakly",
    "report_to": "tensorboard, wandb, all or none",
    "validation_image": "images to inpaint at every validation (with --validation_mask and --validation_prompt)",
}


_ALIASES = {"resume_from_checkpoint": ["--resume"]}


def _value_type(annotation):
    """int for `int | None`, str for `list[str]`, ...: what argparse should convert values to."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return _value_type(args[0]) if args else annotation


def build_train_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    if parser is None:
        from ..options import CommandLineParser

        parser = CommandLineParser(prog="brushnet train", description="Train a BrushNet.")
    for f in fields(TrainConfig):
        names = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        names += _ALIASES.get(f.name, [])
        kwargs = {"dest": f.name, "help": _HELP.get(f.name)}
        if f.type is bool:
            parser.add_argument(*names, action="store_true", **kwargs)
        elif typing.get_origin(f.type) is list:
            parser.add_argument(*names, nargs="+", default=f.default_factory(), type=_value_type(f.type), **kwargs)
        else:
            parser.add_argument(*names, type=_value_type(f.type), default=f.default, **kwargs)
    return parser


# The schedulers of diffusers' get_scheduler that the options can configure; piecewise_constant
# needs step rules that no option gives.
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
DEFAULT_WARMUP_STEPS = 500

# Whole-number options: (lowest, highest or None); the optional ones may also be None.
_WHOLE = {
    "resolution": (8, None), "dataloader_num_workers": (0, None), "shuffle_buffer": (0, None),
    "train_batch_size": (1, None), "gradient_accumulation_steps": (1, None), "max_train_steps": (1, None),
    "lr_warmup_steps": (0, None), "seed": (0, 2**32 - 1),  # numpy's seeds are 32-bit
    "crops_coords_top_left_h": (0, None), "crops_coords_top_left_w": (0, None),
    "checkpointing_steps": (1, None), "checkpoints_total_limit": (1, None), "validation_steps": (1, None),
    "num_validation_images": (1, None), "validation_inference_steps": (1, 1000),  # the pipelines' limit
}
_OPTIONAL = {"lr_warmup_steps", "seed", "checkpoints_total_limit"}
# Real-valued options: (low, high, low included, high included); every one must also be finite.
_REAL = {
    "learning_rate": (0, math.inf, False, False), "proportion_empty_prompts": (0, 1, True, True),
    "adam_beta1": (0, 1, True, False), "adam_beta2": (0, 1, True, False),
    "adam_weight_decay": (0, math.inf, True, False), "adam_epsilon": (0, math.inf, False, False),
    "max_grad_norm": (0, math.inf, False, False), "ema_decay": (0, 1, False, False),
    "masked_loss_weight": (0, math.inf, True, False), "noise_offset": (0, 1, True, True),
    "zero_conv_lr_scale": (0, math.inf, False, False),
}


def check_options(config: TrainConfig) -> None:
    """Every numeric option in its range and the scheduler known, in one line naming the option.

    Checked before anything loads: a NaN learning rate or a zero interval would otherwise surface
    as a NaN loss, a ZeroDivisionError or a traceback only after the models load, or thousands of
    steps later at the first checkpoint or validation.
    """
    for name, (low, high) in _WHOLE.items():
        value = getattr(config, name)
        if value is None and name in _OPTIONAL:
            continue
        whole = isinstance(value, int) and not isinstance(value, bool)
        if not whole or value < low or (high is not None and value > high):
            expected = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise ValueError(f"--{name} must be a whole number {expected}; got {value!r}.")
    for name, (low, high, low_in, high_in) in _REAL.items():
        value = getattr(config, name)
        real = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not (real and (low <= value if low_in else low < value) and (value <= high if high_in else value < high)):
            if high == math.inf:
                expected = f"{'>=' if low_in else '>'} {low}"
            else:
                expected = f"in {'[' if low_in else '('}{low}, {high}{']' if high_in else ')'}"
            raise ValueError(f"--{name} must be a finite number {expected}; got {value!r}.")
    if config.resolution % 8:
        raise ValueError(f"--resolution must be a multiple of 8 (the VAE and UNet downsample by 8); "
                         f"got {config.resolution}.")
    from ..arguments import check_choice
    from ..data.mask_mix import MASK_MIXES, parse_drawn_weights
    from ..masks import check_mask_downsampling

    check_choice(config.mask_mix, MASK_MIXES, "--mask_mix")
    parse_drawn_weights(config.drawn_weights)  # refused here, before anything loads
    if config.mask_downsampling is not None:
        check_mask_downsampling(config.mask_downsampling, "--mask_downsampling")
    check_choice(config.lr_scheduler, LR_SCHEDULERS, "--lr_scheduler")
    from accelerate.utils import LoggerType

    check_choice(config.report_to, ("none", *(kind.value for kind in LoggerType)), "--report_to")
    if config.lr_scheduler == "polynomial" and config.learning_rate <= 1e-7:
        raise ValueError("--lr_scheduler polynomial decays to 1e-7: give a --learning_rate above it; "
                         f"got {config.learning_rate}.")


def warmup_steps(config: TrainConfig) -> tuple[int, str | None]:
    """The warm-up the scheduler will do, and a one-line warning when the options ask for one it ignores
    or for one that never ends.

    The reference's defaults (constant, 500 warm-up steps) warm up nothing: diffusers' constant
    schedule has no warm-up. They are kept, so its commands train as they did; asking for warm-up
    steps explicitly with that schedule is what gets the warning.
    """
    if config.lr_scheduler == "constant":
        if config.lr_warmup_steps:
            return 0, (f"--lr_warmup_steps {config.lr_warmup_steps} has no effect with --lr_scheduler constant: "
                       "the learning rate is constant from step 1 (use --lr_scheduler constant_with_warmup "
                       "to warm up).")
        return 0, None
    steps = DEFAULT_WARMUP_STEPS if config.lr_warmup_steps is None else config.lr_warmup_steps
    if steps >= config.max_train_steps:
        return steps, (f"--lr_warmup_steps {steps} is not below --max_train_steps {config.max_train_steps}: the "
                       f"learning rate never reaches --learning_rate {config.learning_rate}.")
    return steps, None


def parse_train_args(argv=None) -> TrainConfig:
    from ..options import join_signed_numbers

    args = build_train_parser().parse_args(join_signed_numbers(sys.argv[1:] if argv is None else list(argv)))
    return TrainConfig(**vars(args))
