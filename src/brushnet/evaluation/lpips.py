"""LPIPS with the SqueezeNet-1.1 backbone, as the BrushBench evaluation uses it, in plain torch.

This reimplements the function the authors call, torchmetrics'
`LearnedPerceptualImagePatchSimilarity(net_type="squeeze")`, which is the LPIPS v0.1 metric of
Zhang et al., "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric" (CVPR 2018;
`lpips.LPIPS(net="squeeze", version="0.1")` of the `lpips` package). For two images x0, x1 in
[-1, 1]:

    x  <- (x - shift) / scale                 shift = (-0.030, -0.088, -0.188), scale = (0.458, 0.448, 0.450)
    f_l = SqueezeNet-1.1 activations after 7 stages l (64, 128, 256, 384, 384, 512, 512 channels)
    f_l <- f_l / sqrt(||f_l||^2_channels + 1e-8)   unit length along the channels at every position
    d   = sum_l  mean_{h,w}  w_l . (f_l(x0) - f_l(x1))^2      w_l >= 0: the learned 1x1 "lin" heads

No torchvision and no `lpips` package are needed: the backbone is written here with the module
names of torchvision's `squeezenet1_1`, so its ImageNet weights load as they are, and the heads
with the names of the `lpips` package's `weights/v0.1/squeeze.pth`. The weights come from two local
files:

- backbone: torchvision's `squeezenet1_1-b8a52dc0.pth`
  (https://download.pytorch.org/models/squeezenet1_1-b8a52dc0.pth), keys `features.0.weight` ...;
  its ImageNet classifier (`classifier.1.*`) is accepted and ignored;
- heads: the LPIPS v0.1 linear layers `squeeze.pth` of the `lpips` package (also shipped inside
  torchmetrics as `functional/image/lpips_models/squeeze.pth`), keys `lin0.model.1.weight` ...
  `lin6.model.1.weight`, each (1, C, 1, 1).
"""

from __future__ import annotations

import os

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from torch import nn

from .weights import load_strict, read_state_dict

# (in, squeeze, expand 1x1, expand 3x3) of the Fire modules of SqueezeNet 1.1 by their index in
# torchvision's `features` Sequential; the other indices are the first conv, its ReLU and the pools.
_FIRE = {3: (64, 16, 64, 64), 4: (128, 16, 64, 64), 6: (128, 32, 128, 128), 7: (256, 32, 128, 128),
         9: (256, 48, 192, 192), 10: (384, 48, 192, 192), 11: (384, 64, 256, 256), 12: (512, 64, 256, 256)}
# LPIPS taps the network after these runs of `features` (end exclusive): 7 stages.
STAGES = ((0, 2), (2, 5), (5, 8), (8, 10), (10, 11), (11, 12), (12, 13))
CHANNELS = (64, 128, 256, 384, 384, 512, 512)
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
# torchmetrics >= 1.2 (what the authors' unpinned requirement installs) puts the epsilon under the
# root; the lpips package adds 1e-10 after it. The two differ only for near-zero features.
EPS = 1e-8
CLASSIFIER_KEYS = ("classifier.1.weight", "classifier.1.bias")


class Fire(nn.Module):
    """SqueezeNet's Fire module: a 1x1 squeeze, then 1x1 and 3x3 expansions concatenated."""

    def __init__(self, inplanes: int, squeeze: int, expand1x1: int, expand3x3: int):
        super().__init__()
        self.squeeze = nn.Conv2d(inplanes, squeeze, kernel_size=1)
        self.expand1x1 = nn.Conv2d(squeeze, expand1x1, kernel_size=1)
        self.expand3x3 = nn.Conv2d(squeeze, expand3x3, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.squeeze(x))
        return torch.cat([F.relu(self.expand1x1(x)), F.relu(self.expand3x3(x))], dim=1)


class SqueezeNet11Features(nn.Module):
    """The convolutional part of SqueezeNet 1.1 (Iandola et al. 2016), torchvision's key names."""

    def __init__(self):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, 64, kernel_size=3, stride=2), nn.ReLU()]
        for index in range(2, 13):
            if index in _FIRE:
                layers.append(Fire(*_FIRE[index]))
            else:  # 2, 5, 8
                layers.append(nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True))
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The activations after each of LPIPS's 7 stages."""
        outputs = []
        for start, end in STAGES:
            for index in range(start, end):
                x = self.features[index](x)
            outputs.append(x)
        return outputs


class _LinearHead(nn.Module):
    """LPIPS's `NetLinLayer`: dropout (inactive in eval) and a 1x1 conv to one channel, no bias."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, kernel_size=1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class LPIPSHeads(nn.Module):
    """The 7 linear heads, named `lin0` ... `lin6` as in the `lpips` package's weight files."""

    def __init__(self):
        super().__init__()
        for k, channels in enumerate(CHANNELS):
            self.add_module(f"lin{k}", _LinearHead(channels))

    def __getitem__(self, k: int) -> _LinearHead:
        return getattr(self, f"lin{k}")


class LPIPSSqueeze(nn.Module):
    """LPIPS v0.1, SqueezeNet-1.1 backbone: `model(x0, x1)` -> (N,) distances for (N, 3, H, W) in [-1, 1].

    Inputs must be at least 17x17 pixels (three stride-2 poolings follow a stride-2 convolution).
    Build it with `from_files(backbone, heads)`; a bare `LPIPSSqueeze()` holds random weights.
    """

    def __init__(self):
        super().__init__()
        self.backbone = SqueezeNet11Features()
        self.heads = LPIPSHeads()
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_files(cls, backbone: str | os.PathLike, heads: str | os.PathLike, device=None) -> LPIPSSqueeze:
        """Load torchvision's squeezenet1_1 state dict and LPIPS's squeeze.pth heads, strictly."""
        model = cls()
        model.load_backbone(read_state_dict(backbone, "the LPIPS backbone file (torchvision squeezenet1_1)"))
        model.load_heads(read_state_dict(heads, "the LPIPS heads file (lpips v0.1 squeeze.pth)"))
        return model.to(device) if device is not None else model

    def load_backbone(self, state_dict) -> None:
        """Strict load of a torchvision `squeezenet1_1` state dict (`classifier.1.*` optional, unused)."""
        load_strict(self.backbone, state_dict, "the LPIPS backbone state dict (torchvision squeezenet1_1 keys)",
                    optional=CLASSIFIER_KEYS)

    def load_heads(self, state_dict) -> None:
        """Strict load of the LPIPS v0.1 heads (`lin0.model.1.weight` ... `lin6.model.1.weight`)."""
        load_strict(self.heads, state_dict, "the LPIPS heads state dict (lin0.model.1.weight ...)")

    def train(self, mode: bool = True) -> LPIPSSqueeze:
        # Always in evaluation mode: the heads' dropout must stay off.
        return super().train(False)

    @torch.no_grad()
    def forward(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        if x0.shape != x1.shape or x0.ndim != 4 or x0.shape[1] != 3:
            raise ValueError(f"LPIPS needs two (N, 3, H, W) batches of one shape; got {tuple(x0.shape)} "
                             f"and {tuple(x1.shape)}.")
        if min(x0.shape[-2:]) < 17:
            raise ValueError(f"LPIPS (SqueezeNet) needs images of at least 17x17 pixels; got {tuple(x0.shape[-2:])}.")
        param = next(self.parameters())
        x0, x1 = x0.to(param), x1.to(param)
        features0 = self.backbone((x0 - self.shift) / self.scale)
        features1 = self.backbone((x1 - self.shift) / self.scale)
        total = 0
        for k, (f0, f1) in enumerate(zip(features0, features1)):
            f0 = f0 / (f0.pow(2).sum(dim=1, keepdim=True) + EPS).sqrt()
            f1 = f1 / (f1.pow(2).sum(dim=1, keepdim=True) + EPS).sqrt()
            total = total + self.heads[k]((f0 - f1) ** 2).mean(dim=(2, 3))
        return total.view(-1)


def masked_lpips_inputs(image, keep: np.ndarray) -> torch.Tensor:
    """A (1, 3, H, W) LPIPS input as the authors build it: uint8/255 in float32, the hole (keep = 0)
    set to 0, then mapped to [-1, 1] (so the hole is -1, black, in both images)."""
    array = np.asarray(image.convert("RGB") if isinstance(image, PIL.Image.Image) else image, dtype=np.float32)
    array = array / np.float32(255.0)
    array = array * keep.astype(np.float32)[:, :, None]
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)[None] * 2 - 1


class MaskedLPIPS:
    """BrushBench's LPIPS: distance between the original and the result with the hole zeroed in both.

    Reproduces the authors' `calculate_lpips(img_gt, img_pred, mask)` (evaluate_brushnet.py): both
    images in [0, 1] multiplied by the keep mask, then `lpips(pred * 2 - 1, gt * 2 - 1)` with
    torchmetrics' SqueezeNet LPIPS. Lower is better; the paper reports it x10^3.
    """

    def __init__(self, model: LPIPSSqueeze):
        self.model = model

    def __call__(self, sample) -> float:
        device = next(self.model.parameters()).device
        predicted = masked_lpips_inputs(sample.result, sample.keep).to(device)
        reference = masked_lpips_inputs(sample.original, sample.keep).to(device)
        return float(self.model(predicted, reference)[0])
