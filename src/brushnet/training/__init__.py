"""Training a BrushNet: `train(TrainConfig(...))`, or `brushnet train` on the command line.

`train` is imported on first use, so the command line builds its parser without importing torch.
"""

from .config import TrainConfig, build_train_parser, parse_train_args

__all__ = ["TrainConfig", "build_train_parser", "parse_train_args", "train"]


def __getattr__(name):
    if name == "train":
        from .loop import train

        globals()["train"] = train
        return train
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
