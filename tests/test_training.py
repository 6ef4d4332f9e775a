"""`brushnet train` on tiny models: it learns, checkpoints, resumes, validates, and runs on 2 processes."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from brushnet.cli import main
from brushnet.models import BrushNetModel
from brushnet.training import TrainConfig, parse_train_args, train
from brushnet.training.loop import diffusion_loss, load_base_components

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


def make_folder(root, n=8, size=32):
    """Coloured squares on grey: images, .txt captions and masks/ (white = the square)."""
    rng = np.random.default_rng(0)
    (root / "masks").mkdir(parents=True)
    for i in range(n):
        name, colour = list(COLOURS.items())[i % len(COLOURS)]
        image = np.full((size, size, 3), 128, np.uint8)
        mask = np.zeros((size, size), np.uint8)
        top, left = rng.integers(0, size // 2, 2)
        image[top:top + size // 2, left:left + size // 2] = colour
        mask[top:top + size // 2, left:left + size // 2] = 255
        Image.fromarray(image).save(root / f"{i:02d}.png")
        Image.fromarray(mask).save(root / "masks" / f"{i:02d}.png")
        (root / f"{i:02d}.txt").write_text(f"a {name} square")
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("squares"))


def config(golden, data, out, **overrides) -> TrainConfig:
    options = dict(pretrained_model_name_or_path=str(golden("sd15_tiny_pipeline").dir), train_data_dir=str(data),
                   output_dir=str(out), resolution=16, train_batch_size=4, max_train_steps=4, learning_rate=1e-3,
                   lr_warmup_steps=0, checkpointing_steps=1000, report_to="none", seed=0)
    return TrainConfig(**{**options, **overrides})


def fixed_loss(cfg: TrainConfig, brushnet: BrushNetModel, batches: int = 4) -> float:
    """Loss of a BrushNet on fixed batches, noise and timesteps, as the training loop computes it."""
    from diffusers import DDPMScheduler

    from brushnet.models import unet_forward
    from brushnet.training.loop import make_dataset
    from brushnet.data import collate

    base = load_base_components(cfg)
    scheduler = DDPMScheduler.from_pretrained(cfg.pretrained_model_name_or_path, subfolder="scheduler")
    dataset = make_dataset(cfg, seed=123, rank=0, world_size=1)
    samples = iter(dataset)
    generator = torch.Generator().manual_seed(0)
    losses = []
    with torch.no_grad():
        for _ in range(batches):
            batch = collate([next(samples) for _ in range(4)])
            vae = base["vae"]
            latents = vae.encode(batch["pixel_values"]).latent_dist.mode() * vae.config.scaling_factor
            masked = vae.encode(batch["conditioning_pixel_values"]).latent_dist.mode() * vae.config.scaling_factor
            keep = torch.nn.functional.interpolate(batch["masks"], size=latents.shape[-2:])
            embeds, added = base["text"].encode(batch, cfg, "cpu", torch.float32)
            noise = torch.randn(latents.shape, generator=generator)
            t = torch.randint(0, 1000, (latents.shape[0],), generator=generator)
            noisy = scheduler.add_noise(latents, noise, t)
            down, mid, up = brushnet(noisy, t, embeds, torch.cat([masked, keep], 1), return_dict=False)
            pred = unet_forward(base["unet"], noisy, t, embeds, down_block_add_samples=down,
                                mid_block_add_sample=mid, up_block_add_samples=up)
            losses.append(diffusion_loss(pred, noise, keep, 1.0).item())
    return float(np.mean(losses))


def test_training_reduces_the_loss(golden, data, tmp_path):
    cfg = config(golden, data, tmp_path / "run", max_train_steps=60)
    initial = BrushNetModel.from_unet(load_base_components(cfg)["unet"])
    before = fixed_loss(cfg, initial)
    train(cfg)
    trained = BrushNetModel.from_pretrained(tmp_path / "run")
    after = fixed_loss(cfg, trained)
    print(f"fixed-batch loss before {before:.4f} after {after:.4f}")
    assert after < 0.85 * before, (before, after)
    # The branch started as the base UNet's copy and learned: its output convs are no longer zero.
    assert trained.brushnet_mid_block.weight.abs().sum() > 0


def test_checkpoints_keep_last_and_resume(golden, data, tmp_path):
    out = tmp_path / "run"
    train(config(golden, data, out, max_train_steps=4, checkpointing_steps=2, checkpoints_total_limit=1))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4"]
    BrushNetModel.from_pretrained(out / "checkpoint-4" / "brushnet")
    assert (out / "config.json").is_file() and (out / "diffusion_pytorch_model.safetensors").is_file()
    final4 = BrushNetModel.from_pretrained(out).state_dict()

    train(config(golden, data, out, max_train_steps=6, checkpointing_steps=2, checkpoints_total_limit=1,
                 resume_from_checkpoint="latest"))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-6"]
    final6 = BrushNetModel.from_pretrained(out).state_dict()
    assert any(not torch.equal(final4[k], final6[k]) for k in final4)


def test_cli_with_the_reference_option_names_validation_and_tensorboard(golden, data, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    base = golden("sd15_tiny_pipeline").dir
    code = main([
        "train", "--pretrained_model_name_or_path", str(base), "--train_data_dir", str(data),
        "--output_dir", str(out), "--resolution", "16", "--train_batch_size", "2", "--max_train_steps", "2",
        "--learning-rate", "1e-4", "--gradient_accumulation_steps", "2", "--checkpointing_steps", "2",
        "--validation_steps", "2", "--validation_image", str(data / "00.png"),
        "--validation_mask", str(data / "masks" / "00.png"), "--validation_prompt", "a red square",
        "--validation_inference_steps", "2", "--random_mask", "--proportion_empty_prompts", "0.1",
        "--use_ema", "--masked_loss_weight", "2.0", "--seed", "1", "--report_to", "tensorboard",
    ])
    assert code == 0
    assert (out / "validation" / "step-2" / "0-0.png").is_file()
    assert list((out / "logs").rglob("events.out.tfevents.*"))
    assert json.loads((out / "config.json").read_text())["_class_name"] == "BrushNetModel"


def test_sdxl_training_runs(golden, data, tmp_path):
    cfg = config(golden, data, tmp_path / "xl", max_train_steps=2,
                 pretrained_model_name_or_path=str(golden("sdxl_tiny_pipeline").dir))
    train(cfg)
    brushnet = BrushNetModel.from_pretrained(tmp_path / "xl")
    assert brushnet.config.addition_embed_type == "text_time"


def test_option_names_and_errors(tmp_path):
    cfg = parse_train_args(["--pretrained_model_name_or_path", "m", "--train_data_dir", "d", "--learning_rate",
                            "2e-5", "--train-batch-size", "3", "--random_mask", "--checkpoints_total_limit", "2"])
    assert (cfg.learning_rate, cfg.train_batch_size, cfg.random_mask, cfg.checkpoints_total_limit) == \
        (2e-5, 3, True, 2)
    assert (cfg.lr_scheduler, cfg.lr_warmup_steps, cfg.adam_weight_decay, cfg.max_grad_norm) == \
        ("constant", 500, 1e-2, 1.0)
    assert parse_train_args(["--resume", "latest"]).resume_from_checkpoint == "latest"
    with pytest.raises(ValueError, match="does not exist"):
        train(TrainConfig(pretrained_model_name_or_path="m", train_data_dir=str(tmp_path / "nothing")))


def test_two_processes_with_torchrun(golden, data, tmp_path):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    out = tmp_path / "ddp"
    result = subprocess.run(
        [torchrun, "--nproc_per_node", "2", "--master_port", "29517", "-m", "brushnet", "train",
         "--pretrained_model_name_or_path", str(golden("sd15_tiny_pipeline").dir), "--train_data_dir", str(data),
         "--output_dir", str(out), "--resolution", "16", "--train_batch_size", "2", "--max_train_steps", "2",
         "--checkpointing_steps", "2", "--report_to", "none", "--seed", "0"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "checkpoint-2" / "brushnet" / "config.json").is_file()
    BrushNetModel.from_pretrained(out)


def test_base_stays_frozen_and_only_brushnet_learns(golden, data, tmp_path, monkeypatch):
    import brushnet.training.loop as loop

    held = {}

    def loading(cfg):
        held.update(loop_load(cfg))
        return held

    loop_load = loop.load_base_components
    monkeypatch.setattr(loop, "load_base_components", loading)
    cfg = config(golden, data, tmp_path / "run", max_train_steps=3)
    train(cfg)
    fresh = loop_load(cfg)
    frozen = {"unet": (held["unet"], fresh["unet"]), "vae": (held["vae"], fresh["vae"]),
              "text_encoder": (held["text"].encoders[0], fresh["text"].encoders[0])}
    for name, (used, original) in frozen.items():
        used_state, original_state = used.state_dict(), original.state_dict()
        assert all(torch.equal(used_state[k], original_state[k]) for k in original_state), name
        assert all(p.grad is None and not p.requires_grad for p in used.parameters()), name


def _run(golden, data, out, steps, **overrides):
    train(config(golden, data, out, max_train_steps=steps, checkpointing_steps=2, lr_warmup_steps=2, **overrides))
    return BrushNetModel.from_pretrained(out).state_dict()


def test_resume_continues_the_same_trajectory(golden, data, tmp_path, monkeypatch):
    import brushnet.training.loop as loop

    uninterrupted = _run(golden, data, tmp_path / "a", 6)
    _run(golden, data, tmp_path / "b", 4)
    resumed = _run(golden, data, tmp_path / "b", 6, resume_from_checkpoint="latest")

    # A run killed at step 5 resumes from checkpoint-4.
    real_loss, calls = loop.diffusion_loss, []

    def dying(*args):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt("killed")
        return real_loss(*args)

    monkeypatch.setattr(loop, "diffusion_loss", dying)
    with pytest.raises(KeyboardInterrupt):
        _run(golden, data, tmp_path / "c", 6)
    monkeypatch.setattr(loop, "diffusion_loss", real_loss)
    assert sorted(p.name for p in (tmp_path / "c").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    restarted = _run(golden, data, tmp_path / "c", 6, resume_from_checkpoint="latest")
    for key in uninterrupted:
        assert torch.allclose(resumed[key], uninterrupted[key], atol=1e-7, rtol=0), key
        assert torch.allclose(restarted[key], uninterrupted[key], atol=1e-7, rtol=0), key


def test_brushdata_with_broken_samples_trains_and_reports(golden, data, tmp_path, caplog):
    import io
    import logging
    import tarfile

    from brushnet.data import pack_folder

    shards = tmp_path / "shards"
    pack_folder(data, shards, shard_size=4)
    with tarfile.open(shards / "broken.tar", "w") as tar:
        def add(name, payload: bytes):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
        add("bad.image", b"not a jpeg")
        add("bad.caption", b"a broken sample")
        add("bad.height", b"32"), add("bad.width", b"32")
        add("bad.segmentation", b'{"mask": []}')
        good = io.BytesIO()
        Image.new("RGB", (32, 32), (10, 200, 10)).save(good, format="PNG")
        add("noseg.image", good.getvalue())
        add("noseg.caption", b"no segmentation here")
        add("noseg.height", b"32"), add("noseg.width", b"32")
    with caplog.at_level(logging.WARNING):
        train(config(golden, shards, tmp_path / "run", max_train_steps=6, shuffle_buffer=4))
    assert "Skipped" in caplog.text and "bad" in caplog.text
    BrushNetModel.from_pretrained(tmp_path / "run")


def test_training_mistakes_are_one_line_errors(golden, data, tmp_path, capsys):
    base = str(golden("sd15_tiny_pipeline").dir)
    args = ["train", "--pretrained_model_name_or_path", base, "--train_data_dir", str(data), "--report_to", "none",
            "--max_train_steps", "1", "--train_batch_size", "2"]
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"garbage")
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "checkpoint-10").mkdir()
    cases = [
        (["--resolution", "12", "--output_dir", str(tmp_path / "o1")], "multiple of 8"),
        (["--resolution", "16", "--output_dir", str(tmp_path / "done")], "another run"),
        (["--resolution", "16", "--output_dir", str(tmp_path / "o2"), "--train_data_dir", str(broken)],
         "could be used"),
        (["--resolution", "16", "--output_dir", str(tmp_path / "o3"), "--pretrained_model_name_or_path",
          str(tmp_path)], "not a diffusers base model"),
    ]
    for extra, message in cases:
        capsys.readouterr()
        assert main([*args, *extra]) == 2, extra
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if "brushnet: error:" in line]
        assert len(errors) == 1 and message in errors[0] and "Traceback" not in err, err
    assert sorted(p.name for p in (tmp_path / "done").iterdir()) == ["checkpoint-10"]


def test_bf16_mixed_precision(golden, data, tmp_path):
    train(config(golden, data, tmp_path / "bf16", max_train_steps=2, mixed_precision="bf16",
                 gradient_checkpointing=True))
    brushnet = BrushNetModel.from_pretrained(tmp_path / "bf16")
    assert brushnet.dtype == torch.float32  # the trained weights stay fp32; only the frozen base runs in bf16
    assert all(torch.isfinite(p).all() for p in brushnet.parameters())
