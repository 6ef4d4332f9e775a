"""unet_forward on a stock UNet: no state left behind, and diffusers features keep working."""

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

from brushnet import BrushNetModel, unet_forward


@pytest.fixture(scope="module")
def models(golden):
    case = golden("sd15_tiny_model")
    unet = UNet2DConditionModel.from_pretrained(case.dir / "unet")
    brushnet = BrushNetModel.from_pretrained(case.dir / "brushnet")
    inputs = case.inputs
    args = (inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"])
    with torch.no_grad():
        down, mid, up = brushnet(*args, inputs["brushnet_cond"], return_dict=False)
    return case, unet, brushnet, args, (down, mid, up)


def _forward(unet, args, residuals, scale=1.0, **kwargs):
    down, mid, up = residuals
    return unet_forward(unet, *args, down_block_add_samples=[r * scale for r in down],
                        mid_block_add_sample=mid * scale, up_block_add_samples=[r * scale for r in up], **kwargs)


def _hook_count(module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def test_leaves_no_hooks_and_does_not_touch_the_lists(models):
    case, unet, _, args, (down, mid, up) = models
    down_list, up_list = list(down), list(up)
    before = _hook_count(unet)
    with torch.no_grad():
        unet_forward(unet, *args, down_block_add_samples=down_list, mid_block_add_sample=mid,
                     up_block_add_samples=up_list)
    assert _hook_count(unet) == before == 0
    assert len(down_list) == len(down) and all(a is b for a, b in zip(down_list, down))
    assert len(up_list) == len(up) and all(a is b for a, b in zip(up_list, up))


def test_hooks_removed_when_the_forward_raises(models):
    _, unet, _, args, (down, mid, up) = models
    broken = list(up)
    broken[-1] = torch.zeros(1, 3, 2, 2)  # wrong shape: the UNet fails inside its last block
    with pytest.raises(RuntimeError):
        with torch.no_grad():
            unet_forward(unet, *args, down_block_add_samples=down, mid_block_add_sample=mid,
                         up_block_add_samples=broken)
    assert _hook_count(unet) == 0


def test_wrong_number_of_residuals_is_a_clear_error(models):
    _, unet, _, args, (down, mid, up) = models
    with pytest.raises(ValueError, match="another base model family"):
        unet_forward(unet, *args, down_block_add_samples=down[:-1], mid_block_add_sample=mid,
                     up_block_add_samples=up)
    assert _hook_count(unet) == 0


def test_zero_residuals_give_the_plain_unet(models):
    _, unet, _, args, residuals = models
    with torch.no_grad():
        assert torch.equal(_forward(unet, args, residuals, scale=0.0), unet(*args).sample)


def test_attention_processors_are_used(models):
    case, unet, _, args, residuals = models
    calls = []

    class Counting(AttnProcessor):
        def __call__(self, attn, hidden_states, *a, **k):
            calls.append(1)
            return super().__call__(attn, hidden_states, *a, **k)

    with torch.no_grad():
        expected = _forward(unet, args, residuals)
        unet.set_attn_processor(Counting())
        try:
            counted = _forward(unet, args, residuals)
        finally:
            unet.set_attn_processor(AttnProcessor2_0())
    assert calls, "the custom attention processor was not called"
    assert torch.allclose(counted, expected, atol=1e-5)
    case.check("scale1.0.noise_pred", counted, 1e-5)


def test_lora_adapter_is_applied(golden, models):
    from peft import LoraConfig
    from peft.tuners.tuners_utils import BaseTunerLayer

    case, _, _, args, residuals = models
    unet = UNet2DConditionModel.from_pretrained(case.dir / "unet")
    torch.manual_seed(0)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]))
    with torch.no_grad():
        with_lora = _forward(unet, args, residuals)
        for module in unet.modules():
            if isinstance(module, BaseTunerLayer):
                module.merge()
        merged = _forward(unet, args, residuals)
    assert (with_lora - case["scale1.0.noise_pred"]).abs().max() > 1e-3, "LoRA had no effect"
    assert torch.allclose(with_lora, merged, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients(models, golden):
    case, _, _, args, _ = models
    grads = []
    for checkpointing in (False, True):
        unet = UNet2DConditionModel.from_pretrained(case.dir / "unet").requires_grad_(False)
        brushnet = BrushNetModel.from_pretrained(case.dir / "brushnet").train()
        unet.train()
        if checkpointing:
            unet.enable_gradient_checkpointing()
            brushnet.enable_gradient_checkpointing()
        down, mid, up = brushnet(*args, case.inputs["brushnet_cond"], return_dict=False)
        noise = unet_forward(unet, *args, down_block_add_samples=down, mid_block_add_sample=mid,
                             up_block_add_samples=up)
        noise.square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in brushnet.named_parameters() if p.grad is not None})
        assert _hook_count(unet) == 0
    plain, checkpointed = grads
    assert set(plain) == set(checkpointed) == {n for n, _ in brushnet.named_parameters()}
    for name in plain:
        assert torch.allclose(plain[name], checkpointed[name], rtol=1e-4, atol=1e-7), name
    assert plain["conv_in_condition.bias"].abs().sum() > 0  # untied from the frozen UNet, so it trains


def test_torch_compile(models):
    _, unet, _, args, residuals = models
    torch._dynamo.reset()
    compiled = torch.compile(unet, backend="aot_eager")
    with torch.no_grad():
        for scale in (1.0, 0.5):
            assert torch.allclose(_forward(compiled, args, residuals, scale), _forward(unet, args, residuals, scale),
                                  atol=1e-6)
        assert torch.allclose(compiled(*args).sample, unet(*args).sample, atol=1e-6)
    assert _hook_count(unet) == 0
    torch._dynamo.reset()
