"""Boxes around the objects a text names, from an open-vocabulary detector in transformers.

Grounding DINO (e.g. IDEA-Research/grounding-dino-tiny) works with transformers' PIL image
processor, so it needs neither torchvision nor scipy; OWLv2 goes through the same code where scipy
is installed (its PIL processor resizes with scipy).
"""

import inspect

import PIL.Image
import torch

from .defaults import BOX_THRESHOLD, TEXT_THRESHOLD
from .sam import _model_type, cannot_load, hub_options, load_part


def split_phrases(texts: list[str]) -> list[str]:
    """One phrase per object kind: "a cat. a dog" and ["a cat", "a dog"] both give two."""
    return [p.strip() for text in texts for p in text.split(".") if p.strip()]


class Detector:
    def __init__(self, model, processor, device: str = "cpu"):
        self.model = model.to(device).eval()
        self.processor = processor
        self.device = device

    @classmethod
    def from_pretrained(cls, source: str, device: str = "cpu") -> "Detector":
        from transformers import AutoConfig, AutoModelForZeroShotObjectDetection, AutoProcessor

        example = "an open-vocabulary detector such as IDEA-Research/grounding-dino-tiny"
        model_type = _model_type(AutoConfig, source, "--detector", example)
        options = hub_options(source, "--detector", example)
        try:
            # The Auto classes look for a PEFT adapter config without passing local_files_only on
            # (transformers 5): adapter_kwargs gives it to that look-up too.
            model = AutoModelForZeroShotObjectDetection.from_pretrained(source, **options,
                                                                        adapter_kwargs=dict(options))
        except ValueError:
            raise ValueError(f"--detector {source} is a {model_type!r} model, not an open-vocabulary detector: give "
                             "one such as IDEA-Research/grounding-dino-tiny.") from None
        except OSError as error:  # no weights file
            raise cannot_load(error, source, "--detector", example) from None
        return cls(model, load_part(AutoProcessor.from_pretrained, source, "--detector", example), device)

    @torch.no_grad()
    def detect(self, image: PIL.Image.Image, phrases: list[str], threshold: float = BOX_THRESHOLD,
               text_threshold: float = TEXT_THRESHOLD) -> list[tuple[float, float, float, float]]:
        """Boxes (x0, y0, x1, y1) in the image's pixels of every object a phrase names, best first."""
        image = image.convert("RGB")
        inputs = self.processor(images=image, text=[phrases], return_tensors="pt").to(self.device)
        outputs = self.model(**inputs)
        # Grounding DINO's post-processing reads the token ids and a text threshold; OWLv2's neither.
        options = {"threshold": threshold, "target_sizes": [(image.height, image.width)]}
        accepted = inspect.signature(self.processor.post_process_grounded_object_detection).parameters
        if "input_ids" in accepted:
            options["input_ids"] = inputs["input_ids"]
        if "text_threshold" in accepted:
            options["text_threshold"] = text_threshold
        result = self.processor.post_process_grounded_object_detection(outputs, **options)[0]
        order = result["scores"].argsort(descending=True)
        # Detectors may reach a little past the borders; SAM takes boxes inside the image.
        limits = torch.tensor([image.width, image.height] * 2, dtype=result["boxes"].dtype)
        boxes = [torch.minimum(result["boxes"][i].clamp(min=0), limits).tolist() for i in order]
        return [tuple(box) for box in boxes if box[0] < box[2] and box[1] < box[3]]
