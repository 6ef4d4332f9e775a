"""Masks from clicks and boxes with Segment Anything (SAM) through transformers.

Coordinates are pixels of the image as given (x to the right, y down); SAM's processor maps them
to its resized input and `post_process_masks` maps the masks back, so any aspect ratio works.
"""

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from .. import hub
from ..arguments import check_number

# SAM's prompt labels: 1 = the object is here, 0 = it is not.
POSITIVE, NEGATIVE = 1, 0
SAM_EXAMPLE = "a SAM checkpoint such as facebook/sam-vit-base"


@dataclass
class Prompt:
    """One object to select: points that are on it, points that are not, and at most one box."""

    points: list[tuple[float, float]] = field(default_factory=list)
    negative_points: list[tuple[float, float]] = field(default_factory=list)
    box: tuple[float, float, float, float] | None = None

    def check(self, size: tuple[int, int]) -> None:
        """ValueError unless every point lies on a pixel of an image of `size` (W, H) and the box
        inside it with a positive area."""
        if not self.points and self.box is None:
            raise ValueError("A selection needs a point on the object or a box around it; negative points only "
                             "take parts away from one.")
        width, height = size
        for kind, points in (("point", self.points), ("negative point", self.negative_points)):
            for x, y in points:
                name = f"{kind} {_fmt((x, y))} (on the {width}x{height} image)"
                check_number(x, f"{name}: x", low=0, high=width - 1)
                check_number(y, f"{name}: y", low=0, high=height - 1)
        both = sorted(set(map(tuple, self.points)) & set(map(tuple, self.negative_points)))
        if both:
            raise ValueError(f"The pixel {_fmt(both[0])} is given as a point on the object and as a negative point: "
                             "keep one of the two.")
        if self.box is not None:
            name = f"box {_fmt(self.box)} (on the {width}x{height} image)"
            x0, y0, x1, y1 = self.box
            for value, axis, limit in ((x0, "x0", width), (y0, "y0", height), (x1, "x1", width), (y1, "y1", height)):
                check_number(value, f"{name}: {axis}", low=0, high=limit)
            if not (x0 < x1 and y0 < y1):
                raise ValueError(f"{name} must have x0 < x1 and y0 < y1 (left, top, right, bottom); got {self.box}.")


def _fmt(values) -> str:
    return ",".join(f"{v:g}" for v in values)


class Segmenter:
    """A SAM checkpoint (SAM ViT-B/L/H, SlimSAM, any `SamModel` folder or hub id) and its processor."""

    def __init__(self, model, processor, device: str = "cpu"):
        self.model = model.to(device).eval()
        self.processor = processor
        self.device = device

    @classmethod
    def from_pretrained(cls, source: str, device: str = "cpu") -> "Segmenter":
        from transformers import AutoConfig, SamModel, SamProcessor

        model_type = _model_type(AutoConfig, source, "--segmenter", SAM_EXAMPLE)
        if model_type != "sam":
            raise ValueError(
                f"--segmenter {source} is a {model_type!r} model, not SAM: give a SAM or SlimSAM checkpoint such as "
                "facebook/sam-vit-base (SAM 2's processor in transformers needs torchvision, which this package "
                "does not use).")
        return cls(load_part(SamModel.from_pretrained, source, "--segmenter", SAM_EXAMPLE),
                   load_part(SamProcessor.from_pretrained, source, "--segmenter", SAM_EXAMPLE), device)

    @torch.no_grad()
    def segment(self, image: PIL.Image.Image, prompts: list[Prompt]) -> np.ndarray:
        """The union of one mask per prompt, (H, W) bool. Each mask is the one of SAM's three
        candidates with the best predicted IoU, as SAM's own predictor picks it."""
        image = image.convert("RGB")
        for prompt in prompts:
            prompt.check(image.size)
        inputs = self.processor(images=image, return_tensors="pt")
        # The image is encoded once; every prompt reuses its embedding.
        embeddings = self.model.get_image_embeddings(inputs["pixel_values"].to(self.device))
        union = np.zeros((image.height, image.width), dtype=bool)
        for prompt in prompts:
            union |= self._mask(image, embeddings, prompt)
        return union

    def _mask(self, image, embeddings, prompt: Prompt) -> np.ndarray:
        kwargs = {}
        points = [*prompt.points, *prompt.negative_points]
        if points:
            kwargs["input_points"] = [[[list(map(float, p)) for p in points]]]
            kwargs["input_labels"] = [[[POSITIVE] * len(prompt.points) + [NEGATIVE] * len(prompt.negative_points)]]
        if prompt.box is not None:
            kwargs["input_boxes"] = [[list(map(float, prompt.box))]]
        inputs = self.processor(images=image, return_tensors="pt", **kwargs)
        prompt_inputs = {k: inputs[k].to(self.device) for k in ("input_points", "input_labels", "input_boxes")
                         if k in inputs}
        outputs = self.model(image_embeddings=embeddings, multimask_output=True, **prompt_inputs)
        masks = self.processor.post_process_masks(
            outputs.pred_masks.cpu(), inputs["original_sizes"], inputs["reshaped_input_sizes"])[0]
        best = outputs.iou_scores[0, 0].argmax().item()
        return masks[0, best].numpy().astype(bool)


def _model_type(auto_config, source: str, flag: str, example: str) -> str:
    # AutoConfig reads a config.json named as a file, but transformers' model loaders then take that
    # file for the weights and fail inside torch.load: only a folder or a hub id is a checkpoint.
    if Path(source).is_file():
        raise ValueError(f"{flag} {source} is a file: give the folder that holds it (config.json and the weights) "
                         f"or a hub id of {example}.")
    if not Path(source).exists() and not hub.looks_like_hub_id(source):
        # Else the hub's rules for naming a repository, for what was meant as a path.
        raise ValueError(f"{flag} {source} does not exist: give a folder or a hub id of {example}.")
    return load_part(auto_config.from_pretrained, source, flag, example).model_type


def load_part(loader, source: str, flag: str, example: str):
    """`loader(source)` (a config, the weights, a processor), a missing or unreadable file one line
    naming the flag instead of transformers' paragraph."""
    options = hub_options(source, flag, example)
    try:
        return loader(source, **options)
    except (OSError, ValueError) as error:
        raise cannot_load(error, source, flag, example) from None


def hub_options(source: str, flag: str, example: str) -> dict:
    """The from_pretrained options for `source`: `local_files_only=True` for a hub id when the hub
    cannot be reached (transformers would retry for half a minute first). A hub id that is then
    not in the local cache is one line at once."""
    if not hub.looks_like_hub_id(source):
        return {}
    options = hub.local_only_if_unreachable({})
    if (options or hub.hub_offline()) and not _cached(source):
        raise ValueError(f"{flag} {source} is not a local folder, and the Hugging Face Hub could not be reached "
                         f"(offline or no network) to fetch it: give a local folder of {example}.")
    return options


def _cached(source: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(source, "config.json"), str)
    except ValueError:  # not a valid repo id (HFValidationError): transformers says what is wrong
        return True


def cannot_load(error: Exception, source: str, flag: str, example: str) -> ValueError:
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return ValueError(f"{flag} {source}: cannot load it ({reason}); give a folder or hub id of {example}.")
