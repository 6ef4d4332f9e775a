"""Training options. Names are those of the authors' `train_brushnet.py`, so its documented commands
run unchanged (`--learning_rate` and `--learning-rate` both work); new options have clear names."""

import argparse
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
    lr_warmup_steps: int = 500
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
    "resume_from_checkpoint": "a checkpoint-N folder, or 'latest' (also --resume)",
    "masked_loss_weight": "weight of the hole's pixels in the loss (1 = plain MSE as in the paper)",
    "report_to": "tensorboard, wandb, all or none",
    "validation_image": "images to inpaint at every validation (with --validation_mask and --validation_prompt)",
}


_ALIASES = {"resume_from_checkpoint": ["--resume"]}


def _value_type(annotation):
    """int for `int | None`, str for `list[str]`, ...: what argparse should convert values to."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return _value_type(args[0]) if args else annotation


def build_train_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="brushnet train", description="Train a BrushNet.")
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


def parse_train_args(argv=None) -> TrainConfig:
    args = build_train_parser().parse_args(argv)
    return TrainConfig(**vars(args))
