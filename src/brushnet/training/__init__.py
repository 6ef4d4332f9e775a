"""Training a BrushNet: `train(TrainConfig(...))`, or `brushnet train` on the command line."""

from .config import TrainConfig, build_train_parser, parse_train_args
from .loop import train

__all__ = ["TrainConfig", "build_train_parser", "parse_train_args", "train"]
