"""`brushnet train` on tiny models: it learns, checkpoints, resumes, validates, and runs on 2 processes."""

import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from brushnet.cli import main
from brushnet.models import BrushNetModel
from brushnet.training import TrainConfig, parse_train_args, train
from brushnet.training.config import warmup_steps
from brushnet.training.loop import diffusion_loss, load_base_components, training_noise

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
    train(config(golden, data, out, max_train_steps=4, checkpointing_steps=2, checkpoints_total_limit=1,
                 mask_downsampling="max"))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4"]
    assert BrushNetModel.from_pretrained(out / "checkpoint-4" / "brushnet").config.mask_downsampling == "max"
    assert (out / "config.json").is_file() and (out / "diffusion_pytorch_model.safetensors").is_file()
    final4 = BrushNetModel.from_pretrained(out).state_dict()

    train(config(golden, data, out, max_train_steps=6, checkpointing_steps=2, checkpoints_total_limit=1,
                 resume_from_checkpoint="latest"))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-6"]
    final6 = BrushNetModel.from_pretrained(out)
    assert final6.config.mask_downsampling == "max"  # resumed without the option: the run's own
    final6 = final6.state_dict()
    assert any(not torch.equal(final4[k], final6[k]) for k in final4)


def test_zero_conv_lr_scale_speeds_up_the_output_convs_only(golden, data, tmp_path):
    from brushnet.training.loop import ZERO_CONV_PREFIXES

    # One Adam step moves each weight by about lr * sign(gradient), whatever the gradient's size, and the
    # first step sees the same batch and the same gradients in both runs: the output convs (zero before
    # it) move exactly `scale` times as far, and every other weight the same.
    trained = {}
    for scale in (1.0, 10.0):
        out = tmp_path / f"scale-{scale:g}"
        train(config(golden, data, out, max_train_steps=1, learning_rate=1e-4, zero_conv_lr_scale=scale,
                     checkpointing_steps=1))
        trained[scale] = BrushNetModel.from_pretrained(out).state_dict()
    outputs = [k for k in trained[1.0] if k.startswith(ZERO_CONV_PREFIXES)]
    assert outputs and len(outputs) < len(trained[1.0])
    for key, one in trained[1.0].items():
        ten = trained[10.0][key]
        if key in outputs:
            assert one.abs().max() > 5e-5, key  # it moved: the comparison below means something
            torch.testing.assert_close(ten, 10 * one, rtol=1e-3, atol=1e-8)
        else:
            torch.testing.assert_close(ten, one, rtol=0, atol=1e-7)

    # Resumed with another scale: refused in one line, with either number of parameter groups.
    for other in (1.0, 5.0):
        with pytest.raises(ValueError, match=r"another --zero_conv_lr_scale than") as error:
            train(config(golden, data, tmp_path / "scale-10", max_train_steps=2, zero_conv_lr_scale=other,
                         resume_from_checkpoint="latest"))
        assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="another --zero_conv_lr_scale"):
        train(config(golden, data, tmp_path / "scale-1", max_train_steps=2, zero_conv_lr_scale=10.0,
                     resume_from_checkpoint="latest"))


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
    assert (cfg.lr_scheduler, cfg.adam_weight_decay, cfg.max_grad_norm) == ("constant", 1e-2, 1.0)
    # The reference's constant schedule ignores its 500 warm-up steps; other schedules get them.
    assert warmup_steps(cfg) == (0, None)
    assert warmup_steps(TrainConfig(lr_scheduler="cosine")) == (500, None)
    assert parse_train_args(["--resume", "latest"]).resume_from_checkpoint == "latest"
    # A negative number after a space reaches the option (and its check), not argparse's "expected one argument".
    assert parse_train_args(["--learning_rate", "-1e-4"]).learning_rate == -1e-4
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
        capture_output=True, text=True, timeout=300,
        # Processes on CPUs join (gloo) only when accelerate is told to use the CPU; else each trains alone.
        env={**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "checkpoint-2" / "brushnet" / "config.json").is_file()
    # Renamed only once both processes had written their random states into it.
    assert sorted(p.name for p in out.glob("checkpoint*")) == ["checkpoint-2"]
    assert all((out / "checkpoint-2" / f"random_states_{rank}.pkl").is_file() for rank in (0, 1))
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


def test_noise_offset_shifts_each_images_channels(golden, data, tmp_path, monkeypatch):
    # diffusers' --noise_offset: each (image, channel) of the training noise shifted by one draw,
    # so its mean no longer tells the model the image's mean colour at high noise.
    from diffusers import DDPMScheduler

    drawn, add_noise = [], DDPMScheduler.add_noise

    def recording(self, latents, noise, timesteps):
        drawn.append(noise.detach().clone())
        return add_noise(self, latents, noise, timesteps)

    monkeypatch.setattr(DDPMScheduler, "add_noise", recording)
    spread = {}
    for offset in (0.0, 0.5):
        drawn.clear()
        train(config(golden, data, tmp_path / str(offset), max_train_steps=3, noise_offset=offset))
        means = torch.cat(drawn).mean(dim=(2, 3))  # one per image and channel
        spread[offset] = means.std().item()
    cells = drawn[0][0, 0].numel()
    assert spread[0.0] < 2 / cells ** 0.5, spread  # plain noise: the mean of `cells` draws
    assert 0.3 < spread[0.5] < 0.8, spread


def test_training_noise_shifts_only_by_one_draw_per_image_and_channel():
    latents = torch.zeros(3, 4, 8, 8)
    torch.manual_seed(0)
    plain = torch.randn_like(latents)
    torch.manual_seed(0)
    assert torch.equal(training_noise(latents), plain)  # offset 0: the same draws as plain noise
    torch.manual_seed(0)
    shift = training_noise(latents, 0.5) - plain
    assert shift.shape == latents.shape
    assert torch.allclose(shift, shift[..., :1, :1].expand_as(shift), atol=1e-6)  # one value per (image, channel)
    assert 0.1 < shift[..., 0, 0].std() < 1.5


def _run(golden, data, out, steps, **overrides):
    train(config(golden, data, out, max_train_steps=steps, checkpointing_steps=2, lr_scheduler="constant_with_warmup",
                 lr_warmup_steps=2, **overrides))
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
    wide_mask = tmp_path / "wide-mask.png"
    Image.new("L", (Image.open(data / "00.png").width * 2, Image.open(data / "00.png").height), 255).save(wide_mask)
    cases = [
        (["--resolution", "12", "--output_dir", str(tmp_path / "o1")], "multiple of 8"),
        (["--resolution", "16", "--output_dir", str(tmp_path / "done")], "another run"),
        (["--resolution", "16", "--output_dir", str(tmp_path / "o2"), "--train_data_dir", str(broken)],
         "could be used"),
        (["--resolution", "16", "--output_dir", str(tmp_path / "o3"), "--pretrained_model_name_or_path",
          str(tmp_path)], "not a diffusers base model"),
        # Each of these used to fail only after the models loaded and a step trained, or much later.
        (["--resolution", "16", "--output_dir", str(broken / "a.png")], "is a file, not a folder"),
        (["--resolution", "16", "--output_dir", str(broken / "a.png" / "run")], "is a file, not a folder"),
        (["--resolution", "16", "--output_dir", str(tmp_path / "o4"), "--validation_image", str(tmp_path / "no.png"),
          "--validation_mask", str(data / "masks" / "00.png"), "--validation_prompt", "a cat"], "no.png"),
        # Both are resized to --resolution: a mask of another size used to be stretched over other pixels.
        (["--resolution", "16", "--output_dir", str(tmp_path / "o4"), "--validation_image", str(data / "00.png"),
          "--validation_mask", str(wide_mask), "--validation_prompt", "a cat"], "masks must have the size of"),
        # A DataLoader worker's error is its message, not the worker's traceback.
        (["--resolution", "16", "--output_dir", str(tmp_path / "o5"), "--train_data_dir", str(broken),
          "--dataloader_num_workers", "2"], "could be used"),
        (["--resolution", "16", "--output_dir", str(tmp_path / "o6"), "--resume_from_checkpoint", str(data)],
         "named checkpoint-N"),
        (["--resolution", "16", "--output_dir", str(tmp_path / "o7"), "--resume_from_checkpoint", "checkpoint-3"],
         "not a checkpoint folder"),
    ]
    import importlib.util

    if not torch.cuda.is_available():  # was a dtype traceback at the first step
        cases.append((["--resolution", "16", "--output_dir", str(tmp_path / "o8"), "--mixed_precision", "fp16"],
                      "--mixed_precision fp16 needs a GPU"))
    if importlib.util.find_spec("wandb") is None:  # was a Python warning, and a run that logged nothing
        cases.append((["--resolution", "16", "--output_dir", str(tmp_path / "o9"), "--report_to", "wandb"],
                      "--report_to wandb: its package is not installed here"))
    for extra, message in cases:
        capsys.readouterr()
        assert main([*args, *extra]) == 2, extra
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if "brushnet: error:" in line]
        assert len(errors) == 1 and message in errors[0] and "Traceback" not in err, err
        assert len(err.strip().splitlines()[-1]) < 300 and errors[0] == err.strip().splitlines()[-1], err
    assert sorted(p.name for p in (tmp_path / "done").iterdir()) == ["checkpoint-10"]
    assert not (tmp_path / "o4").exists() and not (tmp_path / "o5").exists()


def test_bf16_mixed_precision(golden, data, tmp_path):
    # with validation too: on a CPU it failed in a dtype error (the fp32 branch beside the bf16 base)
    train(config(golden, data, tmp_path / "bf16", max_train_steps=2, mixed_precision="bf16",
                 gradient_checkpointing=True, validation_steps=2, validation_image=[str(data / "00.png")],
                 validation_mask=[str(data / "masks" / "00.png")], validation_prompt=["a red square"],
                 validation_inference_steps=2))
    assert (tmp_path / "bf16" / "validation" / "step-2" / "0-0.png").is_file()
    assert (tmp_path / "bf16" / "diffusion_pytorch_model.safetensors").is_file()
    brushnet = BrushNetModel.from_pretrained(tmp_path / "bf16")
    assert brushnet.dtype == torch.float32  # the trained weights stay fp32; only the frozen base runs in bf16
    assert all(torch.isfinite(p).all() for p in brushnet.parameters())


def test_an_interrupted_save_keeps_the_previous_checkpoint(golden, data, tmp_path, monkeypatch, capsys):
    from accelerate import Accelerator

    out = tmp_path / "run"
    real_save, saves = Accelerator.save_state, []

    def interrupted(self, output_dir, **kwargs):
        saves.append(output_dir)
        if len(saves) == 2:  # Ctrl-C after the first file of checkpoint-4 is written
            os.makedirs(output_dir, exist_ok=True)
            with open(os.path.join(output_dir, "model.safetensors"), "wb") as f:
                f.write(b"half a file")
            raise KeyboardInterrupt
        return real_save(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", interrupted)
    options = dict(max_train_steps=6, checkpointing_steps=2, checkpoints_total_limit=1)
    with pytest.raises(KeyboardInterrupt):
        train(config(golden, data, out, **options))
    monkeypatch.setattr(Accelerator, "save_state", real_save)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == \
        ["checkpoint-2", "checkpoint-4.partial"]
    BrushNetModel.from_pretrained(out / "checkpoint-2" / "brushnet")

    capsys.readouterr()
    train(config(golden, data, out, resume_from_checkpoint="latest", **options))
    assert f"resuming from {out / 'checkpoint-2'}" in capsys.readouterr().out
    # The leftover is gone, the limit holds, and the run reached its last step.
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-6"]
    BrushNetModel.from_pretrained(out / "checkpoint-6" / "brushnet")


def test_an_interrupted_final_save_leaves_no_half_model(golden, data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_save = BrushNetModel.save_pretrained

    def interrupted(self, save_directory, *args, **kwargs):
        if "checkpoint" in str(save_directory):
            return real_save(self, save_directory, *args, **kwargs)
        os.makedirs(save_directory, exist_ok=True)  # Ctrl-C halfway through the weights
        with open(os.path.join(save_directory, "diffusion_pytorch_model.safetensors"), "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(BrushNetModel, "save_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(config(golden, data, out, max_train_steps=2, checkpointing_steps=2))
    monkeypatch.setattr(BrushNetModel, "save_pretrained", real_save)
    assert not (out / "diffusion_pytorch_model.safetensors").exists() and not (out / "config.json").exists()
    train(config(golden, data, out, max_train_steps=2, checkpointing_steps=2, resume_from_checkpoint="latest"))
    BrushNetModel.from_pretrained(out)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


def test_resume_skips_incomplete_checkpoints(golden, data, tmp_path, caplog, capsys):
    import logging
    import shutil

    out = tmp_path / "run"
    train(config(golden, data, out, max_train_steps=2, checkpointing_steps=2))
    (out / "checkpoint-4").mkdir()  # empty, as an older version left it when interrupted
    shutil.copytree(out / "checkpoint-2" / "brushnet", out / "checkpoint-6" / "brushnet")  # no state files
    (out / "checkpoint-8.partial").mkdir()
    (out / "checkpoint-8.partial" / "optimizer.bin").write_bytes(b"cut short")

    with pytest.raises(ValueError, match=r"checkpoint-6 is incomplete \(no random_states_0.pkl\).*latest"):
        train(config(golden, data, out, max_train_steps=8, resume_from_checkpoint="checkpoint-6"))
    capsys.readouterr()
    with caplog.at_level(logging.WARNING):
        train(config(golden, data, out, max_train_steps=4, checkpointing_steps=2, resume_from_checkpoint="latest"))
    assert f"resuming from {out / 'checkpoint-2'}" in capsys.readouterr().out
    skipped = [r.getMessage() for r in caplog.records if "Skipping" in r.getMessage()]
    assert len(skipped) == 2 and "checkpoint-6: incomplete" in skipped[0] and "checkpoint-4" in skipped[1], skipped
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == \
        ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    # checkpoint-4 was written again, complete: an explicit resume from it works, and says when there is
    # nothing left to train.
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        train(config(golden, data, out, max_train_steps=3, resume_from_checkpoint=str(out / "checkpoint-4")))
    assert "nothing to train" in caplog.text
    # Resuming a run saved without EMA with --use_ema cannot restore the EMA weights: said before loading.
    with pytest.raises(ValueError, match="checkpoint-4 was saved without --use_ema"):
        train(config(golden, data, out, max_train_steps=8, resume_from_checkpoint="latest", use_ema=True))


@pytest.mark.parametrize("options, expected, warning", [
    # The defaults, as the reference runs: no warm-up, the full rate from step 1.
    (dict(lr_warmup_steps=None), [1.0, 1.0, 1.0, 1.0], None),
    # Warm-up steps with the constant schedule do nothing: said once.
    (dict(lr_warmup_steps=3), [1.0, 1.0, 1.0, 1.0], "has no effect with --lr_scheduler constant"),
    # A warm-up rises linearly from 0, counted in optimiser steps (not batches).
    (dict(lr_scheduler="constant_with_warmup", lr_warmup_steps=2, gradient_accumulation_steps=2),
     [0.0, 0.5, 1.0, 1.0], None),
    (dict(lr_scheduler="linear", lr_warmup_steps=2), [0.0, 0.5, 1.0, 0.5], None),
    # The default 500 warm-up steps of the other schedulers, longer than this run: said once.
    (dict(lr_scheduler="constant_with_warmup", lr_warmup_steps=None), [0.0, 1 / 500, 2 / 500, 3 / 500],
     "--lr_warmup_steps 500 is not below --max_train_steps 4"),
])
def test_learning_rate_at_each_step(golden, data, tmp_path, monkeypatch, caplog, options, expected, warning):
    import logging

    import brushnet.training.loop as loop

    used = []
    real_optimizer = loop.make_optimizer

    def recording(*args):
        optimizer = real_optimizer(*args)
        optimizer.register_step_pre_hook(lambda opt, *_: used.append(opt.param_groups[0]["lr"]))
        return optimizer

    monkeypatch.setattr(loop, "make_optimizer", recording)
    with caplog.at_level(logging.WARNING):
        train(config(golden, data, tmp_path / "run", max_train_steps=4, learning_rate=1e-3, **options))
    assert used == pytest.approx([1e-3 * e for e in expected], abs=1e-12)
    warnings = [r.getMessage() for r in caplog.records if "lr_warmup_steps" in r.getMessage()]
    assert len(warnings) == (1 if warning else 0), warnings
    assert all(warning in w and "\n" not in w for w in warnings)


@pytest.mark.parametrize("option, value", [
    ("--learning_rate", "nan"), ("--learning_rate", "0"), ("--learning_rate", "-0.5"), ("--learning_rate", "inf"),
    ("--checkpointing_steps", "0"), ("--checkpoints_total_limit", "0"), ("--validation_steps", "0"),
    ("--num_validation_images", "0"), ("--validation_inference_steps", "0"),
    ("--validation_inference_steps", "1001"),  # passed, then killed the run at its first validation
    ("--lr_warmup_steps", "-5"),
    ("--adam_beta1", "1.0"), ("--adam_beta2", "nan"), ("--adam_weight_decay", "-0.1"), ("--adam_epsilon", "0"),
    ("--max_grad_norm", "0"), ("--max_grad_norm", "inf"), ("--ema_decay", "1.5"), ("--ema_decay", "0"),
    ("--masked_loss_weight", "-1"), ("--masked_loss_weight", "nan"), ("--noise_offset", "-0.1"),
    ("--noise_offset", "2"), ("--seed", "-1"), ("--seed", str(2**32)),
    ("--shuffle_buffer", "-1"), ("--crops_coords_top_left_h", "-1"), ("--lr_scheduler", "cosine_annealing"),
    ("--report_to", "tensorbord"),
])
def test_numeric_options_are_checked_before_anything_loads(golden, data, tmp_path, monkeypatch, capsys,
                                                           option, value):
    import brushnet.training.loop as loop

    def loading(cfg):
        raise AssertionError("the models loaded before the options were checked")

    monkeypatch.setattr(loop, "load_base_components", loading)
    code = main(["train", "--pretrained_model_name_or_path", str(golden("sd15_tiny_pipeline").dir),
                 "--train_data_dir", str(data), "--output_dir", str(tmp_path / "run"), "--resolution", "16",
                 "--report_to", "none", "--use_ema", f"{option}={value}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("brushnet: error:") == 1 and "Traceback" not in err, err
    assert option in err and value in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name, value", [("train_batch_size", 2.5), ("max_train_steps", True),
                                         ("resolution", 520.0), ("learning_rate", "1e-5")])
def test_python_options_of_the_wrong_type_are_refused(tmp_path, name, value):
    with pytest.raises(ValueError, match=f"--{name} must be a"):
        train(TrainConfig(**{"pretrained_model_name_or_path": "m", "train_data_dir": str(tmp_path),
                             "output_dir": str(tmp_path / "run"), name: value}))


def test_processes_that_accelerate_cannot_join_are_refused(golden, data, tmp_path, monkeypatch):
    # torchrun on a machine without a GPU: each process would train alone, all into the same folder.
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    with pytest.raises(ValueError, match="Launched as 2 processes.*ACCELERATE_USE_CPU=1"):
        train(config(golden, data, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_a_cached_hub_base_trains_offline_without_retries(golden, data, tmp_path, unreachable_hub, monkeypatch,
                                                          capfd):
    # Every part of the base (configs, UNet, VAE, tokenizer, text encoder, scheduler) used to go to the
    # hub first and retry for half a minute each, a warning line per try, before the cache answered.
    from huggingface_hub import constants

    from hub_cache import put_in_hub_cache

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    put_in_hub_cache(tmp_path / "cache", "test-org/tiny-base", golden("sd15_tiny_pipeline").dir)
    capfd.readouterr()
    train(config(golden, data, tmp_path / "run", pretrained_model_name_or_path="test-org/tiny-base",
                 max_train_steps=1))
    assert unreachable_hub, "the probe was not asked"
    err = capfd.readouterr().err
    assert "thrown while requesting" not in err and "Retrying in" not in err, err
    assert (tmp_path / "run" / "config.json").is_file()


def test_a_run_without_seed_resumes_on_the_same_data(golden, data, tmp_path):
    # Without --seed each process draws its data seed; the checkpoint keeps it, so two resumes of
    # one checkpoint read the same stream and end equal (they differed by a new draw each).
    _run(golden, data, tmp_path / "a", 2, seed=None)
    assert (tmp_path / "a" / "checkpoint-2" / "data_seed-0.json").is_file()
    ends = []
    for copy in ("b", "c"):
        shutil.copytree(tmp_path / "a", tmp_path / copy)
        ends.append(_run(golden, data, tmp_path / copy, 4, seed=None, resume_from_checkpoint="latest"))
    for key in ends[0]:
        assert torch.equal(ends[0][key], ends[1][key]), key


def test_validation_that_would_never_run_is_told(golden, data, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="brushnet.training"):
        train(config(golden, data, tmp_path / "v", max_train_steps=2, validation_steps=100,
                     validation_image=[str(data / "00.png")], validation_mask=[str(data / "masks" / "00.png")],
                     validation_prompt=["a red square"]))
    assert "--validation_steps 100 is more than --max_train_steps 2: no validation image will be made" in caplog.text
    assert not (tmp_path / "v" / "validation").exists()


def test_a_batch_larger_than_the_images_is_told(golden, data, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="brushnet.training"):
        train(config(golden, data, tmp_path / "b", max_train_steps=1, train_batch_size=32))
    assert "training image(s) for 32 samples a step: every step repeats them" in caplog.text


def test_resume_latest_into_a_folder_holding_a_model_is_refused(golden, data, tmp_path, capsys):
    # A downloaded BrushNet given as --output_dir to go on from it: "no checkpoint, starting a new
    # run", then its files were replaced by the new run's; a folder's own config.json likewise.
    import shutil

    run = tmp_path / "downloaded"
    shutil.copytree(golden("sd15_tiny_pipeline").dir / "brushnet", run)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    base = ["train", "--pretrained_model_name_or_path", str(golden("sd15_tiny_pipeline").dir), "--train_data_dir",
            str(data), "--output_dir", str(run), "--resolution", "16", "--report_to", "none", "--max_train_steps", "1"]
    assert main([*base, "--resume_from_checkpoint", "latest"]) == 2
    assert "holds a model but no checkpoint-N to resume" in capsys.readouterr().err
    assert main(base) == 2
    assert "already holds another run" in capsys.readouterr().err
    assert before == {p.name: p.read_bytes() for p in run.iterdir()}


def test_resuming_another_models_checkpoint_is_one_line(golden, data, tmp_path):
    # An SDXL run's checkpoint resumed on SD1.5: a traceback with a line per mismatched weight.
    xl = tmp_path / "xl"
    train(config(golden, data, xl, pretrained_model_name_or_path=str(golden("sdxl_tiny_pipeline").dir),
                 max_train_steps=1, checkpointing_steps=1, train_batch_size=2))
    with pytest.raises(ValueError, match="holds a BrushNet of another shape than this run's") as error:
        train(config(golden, data, tmp_path / "sd", max_train_steps=2, train_batch_size=2,
                     resume_from_checkpoint=str(xl / "checkpoint-1")))
    assert "\n" not in str(error.value)


def test_options_changed_on_resume_are_told(golden, data, tmp_path, caplog):
    # --learning_rate 1e-2 on resume: the checkpoint's optimiser kept 1e-3, without a word.
    out = tmp_path / "run"
    train(config(golden, data, out, max_train_steps=2, checkpointing_steps=1, train_batch_size=2))
    with caplog.at_level(logging.WARNING):
        train(config(golden, data, out, max_train_steps=3, checkpointing_steps=1, train_batch_size=2,
                     resume_from_checkpoint="latest"))
    assert "options its run did not have" not in caplog.text
    with caplog.at_level(logging.WARNING):
        train(config(golden, data, out, max_train_steps=4, checkpointing_steps=1, train_batch_size=2,
                     learning_rate=1e-2, resume_from_checkpoint="latest"))
    assert "--learning_rate 0.01 (the checkpoint's run: 0.001)" in caplog.text


def test_a_brushnet_of_another_base_is_refused_before_training(golden, data, tmp_path):
    # An SDXL branch on an SD1.5 base failed at the first step, asking for added_cond_kwargs.
    with pytest.raises(ValueError) as error:
        train(config(golden, data, tmp_path / "run", max_train_steps=1,
                     brushnet_model_name_or_path=str(golden("sdxl_tiny_pipeline").dir / "brushnet")))
    assert "added_cond_kwargs" not in str(error.value) and "\n" not in str(error.value)
    assert not list((tmp_path / "run").glob("checkpoint-*"))
