"""Run an unmodified diffusers `UNet2DConditionModel` with BrushNet residuals added inside it.

The injection points, in the order BrushNet returns its residuals (checkpoint-exact outputs
depend on them):

1. down residual 0 is added to the `conv_in` output as it enters the first down block; the skip
   connection the UNet already stored from `conv_in` does not carry it;
2. in each down block, one residual after each resnet (+ its attention) and one after the
   downsampler; the sums are what the block passes on *and* stores as skips;
3. one residual after the mid block;
4. in each up block, one residual after each resnet (+ its attention) and one after the upsampler.

They are applied with forward hooks registered for the duration of one call and removed
afterwards, also when the call raises (or, for a UNet about to be compiled, with hooks installed
once that read the call's residuals from fixed slots: see `install_residual_slots`). Hooks instead of a re-implemented UNet forward keep every
diffusers feature that lives in the stock forward and its blocks (LoRA, IP-Adapter, attention
processors, FreeU, gradient checkpointing) working unchanged. Each hook adds one fixed tensor to
one module's output, so it is idempotent: gradient checkpointing may re-run a module during the
backward pass and gets the same value again.
"""

import weakref
from collections.abc import Sequence
from contextlib import contextmanager

import torch
from torch import nn


def injection_points(unet) -> tuple[list[nn.Module], nn.Module, list[nn.Module]]:
    """The modules after which residuals are added: (down points after residual 0, mid, up points)."""
    unet = getattr(unet, "_orig_mod", unet)  # torch.compile wrapper
    down = [module for block in unet.down_blocks for module in _block_points(block, "downsamplers")]
    up = [module for block in unet.up_blocks for module in _block_points(block, "upsamplers")]
    return down, unet.mid_block, up


def _block_points(block: nn.Module, sampler_name: str) -> list[nn.Module]:
    attentions = getattr(block, "attentions", None)
    # A layer's output is its attention's output where it has one, else its resnet's.
    layers = list(attentions) if attentions is not None and len(attentions) else list(block.resnets)
    samplers = getattr(block, sampler_name, None)
    return layers + ([samplers[-1]] if samplers is not None else [])


def count_residuals(unet) -> tuple[int, int]:
    """(number of down residuals, number of up residuals) a UNet takes; one mid residual besides."""
    down, _, up = injection_points(unet)
    return 1 + len(down), len(up)


def _add_to_output(residual: torch.Tensor):
    def hook(module, args, output):
        if isinstance(output, torch.Tensor):
            return output + residual
        if isinstance(output, tuple):  # attention blocks called with return_dict=False
            return (output[0] + residual,) + tuple(output[1:])
        output.sample = output.sample + residual
        return output

    return hook


def _add_to_input(residual: torch.Tensor):
    def pre_hook(module, args, kwargs):
        if args:
            return (args[0] + residual,) + tuple(args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"] + residual}

    return pre_hook


@contextmanager
def brushnet_residuals(
    unet,
    down_block_add_samples: Sequence[torch.Tensor],
    mid_block_add_sample: torch.Tensor,
    up_block_add_samples: Sequence[torch.Tensor],
):
    """Within this context every forward of `unet` adds the given BrushNet residuals."""
    down_points, mid_point, up_points = injection_points(unet)
    _check_counts(1 + len(down_points), len(up_points), down_block_add_samples, up_block_add_samples)
    slots = _SLOTS.get(getattr(unet, "_orig_mod", unet))
    if slots is not None:  # hooks installed for good: fill their slots for this call
        slots.fill(down_block_add_samples, mid_block_add_sample, up_block_add_samples)
        try:
            yield unet
        finally:
            slots.clear()
        return
    first_block = getattr(unet, "_orig_mod", unet).down_blocks[0]
    handles = [first_block.register_forward_pre_hook(_add_to_input(down_block_add_samples[0]), with_kwargs=True)]
    try:
        for module, residual in zip(down_points, down_block_add_samples[1:]):
            handles.append(module.register_forward_hook(_add_to_output(residual)))
        handles.append(mid_point.register_forward_hook(_add_to_output(mid_block_add_sample)))
        for module, residual in zip(up_points, up_block_add_samples):
            handles.append(module.register_forward_hook(_add_to_output(residual)))
        yield unet
    finally:
        for handle in handles:
            handle.remove()


class ResidualSlots:
    """The residuals of the UNet call in progress, read by hooks that stay on the UNet.

    torch.compile does not guard on a module's hooks (dynamo's `skip_nnmodule_hook_guards`), so a
    compiled UNet would keep running the hooks it was traced with, whatever is registered later.
    Hooks installed once, reading these slots, are traced with the slots' tensors as graph inputs
    and `active` as a guard: one captured variant with residuals, one without, never stale.
    """

    def __init__(self, n_down: int, n_up: int):
        self.n_down, self.n_up = n_down, n_up
        self.clear()

    def fill(self, down: Sequence[torch.Tensor], mid: torch.Tensor, up: Sequence[torch.Tensor]) -> None:
        _check_counts(self.n_down, self.n_up, down, up)
        self.active, self.down, self.mid, self.up = True, list(down), mid, list(up)

    def clear(self) -> None:
        self.active, self.down, self.mid, self.up = False, [], None, []


_SLOTS: "weakref.WeakKeyDictionary[nn.Module, ResidualSlots]" = weakref.WeakKeyDictionary()


def install_residual_slots(unet) -> ResidualSlots:
    """Install the injection hooks on `unet` for good, reading `ResidualSlots` (idempotent);
    `unet_forward` then fills the slots instead of registering hooks per call. For UNets that
    are to be compiled; the residuals enter at the same points in the same order."""
    unet = getattr(unet, "_orig_mod", unet)
    if unet in _SLOTS:
        return _SLOTS[unet]
    down_points, mid_point, up_points = injection_points(unet)
    slots = ResidualSlots(1 + len(down_points), len(up_points))
    unet.down_blocks[0].register_forward_pre_hook(_add_slot_to_input(slots), with_kwargs=True)
    for index, module in enumerate(down_points, start=1):
        module.register_forward_hook(_add_slot_to_output(slots, "down", index))
    mid_point.register_forward_hook(_add_slot_to_output(slots, "mid", None))
    for index, module in enumerate(up_points):
        module.register_forward_hook(_add_slot_to_output(slots, "up", index))
    _SLOTS[unet] = slots
    return slots


def _add_slot_to_output(slots: ResidualSlots, kind: str, index: int | None):
    def hook(module, args, output):
        if not slots.active:
            return output
        residual = slots.mid if kind == "mid" else getattr(slots, kind)[index]
        return _add_to_output(residual)(module, args, output)

    return hook


def _add_slot_to_input(slots: ResidualSlots):
    def pre_hook(module, args, kwargs):
        if not slots.active:
            return args, kwargs
        return _add_to_input(slots.down[0])(module, args, kwargs)

    return pre_hook


def _check_counts(n_down: int, n_up: int, down, up) -> None:
    if len(down) != n_down or len(up) != n_up:
        raise ValueError(
            f"The UNet takes {n_down} down and {n_up} up BrushNet residuals, got {len(down)} "
            f"and {len(up)}: the BrushNet was made for another base model family "
            "(SD1.5 vs SDXL) or layout."
        )


def unet_forward(
    unet,
    sample: torch.Tensor,
    timestep,
    encoder_hidden_states: torch.Tensor,
    *,
    down_block_add_samples: Sequence[torch.Tensor],
    mid_block_add_sample: torch.Tensor,
    up_block_add_samples: Sequence[torch.Tensor],
    **unet_kwargs,
) -> torch.Tensor:
    """The noise prediction of a stock `UNet2DConditionModel` with BrushNet residuals injected.

    `unet_kwargs` go to the UNet unchanged (`added_cond_kwargs`, `cross_attention_kwargs`,
    `timestep_cond`, ...). The residual sequences are read, never modified, and the UNet carries no
    hook or state afterwards.
    """
    unet_kwargs.pop("return_dict", None)
    with brushnet_residuals(unet, down_block_add_samples, mid_block_add_sample, up_block_add_samples):
        return unet(sample, timestep, encoder_hidden_states, return_dict=False, **unet_kwargs)[0]
