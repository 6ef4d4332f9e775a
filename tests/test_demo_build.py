"""tools/build_demo_model.py end to end with tiny step counts: every stage runs, resumes, and the
assembled folder is a BrushNet pipeline the command line loads (the real build trains far longer)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from brushnet.cli import main
from brushnet.demo.scenes import HELDOUT_SEEDS, make_scene, removal_example

TOOL = Path(__file__).resolve().parents[1] / "tools" / "build_demo_model.py"


def assert_inpaints(model: Path, tmp_path: Path) -> None:
    """The command line fills a held-out removal hole with the assembled `model`, at 64x64."""
    example = removal_example(make_scene(HELDOUT_SEEDS[0]), 0)
    example.masked_image.save(tmp_path / "scene.png")
    example.mask.save(tmp_path / "mask.png")
    assert main(["inpaint", str(tmp_path / "scene.png"), str(tmp_path / "mask.png"), "-p", example.prompt,
                 "--base", str(model), "--brushnet", str(model / "brushnet"), "--steps", "2",
                 "--out", str(tmp_path / "result.png")]) == 0
    assert np.asarray(Image.open(tmp_path / "result.png").convert("RGB")).shape == (64, 64, 3)


def test_build_runs_every_stage_and_resumes(tmp_path):
    out = tmp_path / "build"
    command = [sys.executable, str(TOOL), str(out), "--device", "cpu", "--scenes", "48", "--batch", "4",
               "--vae-batch", "4", "--vae-steps", "2", "--base-steps", "2", "--base-schedule", "linear",
               "--decoder-steps", "2", "--decoder-latent-noise", "0.5", "--brushnet-steps", "4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    first = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    model = out / "demo-model"
    size = sum(p.stat().st_size for p in model.rglob("*") if p.is_file())
    assert size < 16 * 2**20, size  # float16 weights
    # A second run finds every stage done and only re-assembles.
    again = subprocess.run([*command[:3], "--stage", "brushnet", *command[3:]], capture_output=True, text=True,
                           env=env, timeout=300)
    assert again.returncode == 0 and "resuming" in again.stdout + again.stderr

    assert_inpaints(model, tmp_path)

    # The decoder stage trained the decoder alone: the shipped VAE's encoder is the base's, so the
    # latents the base and the BrushNet learned are unchanged.
    from safetensors.torch import load_file

    trained, assembled = (load_file(next((folder / "vae").glob("*.safetensors"))) for folder in (out, model))
    encoder = [k for k in trained if k.startswith(("encoder.", "quant_conv."))]
    decoder = [k for k in trained if k.startswith(("decoder.", "post_quant_conv."))]
    assert encoder and decoder
    # (the assembled weights are stored in float16)
    assert all(torch.equal(trained[k].half(), assembled[k]) for k in encoder)
    assert not all(torch.equal(trained[k].half(), assembled[k]) for k in decoder)

    # A snapshot saves the base stage's checkpoint as a base folder (a BrushNet can start against a
    # base still training); here that checkpoint is the finished base's, step 2.
    snapshot = subprocess.run([*command[:3], "--stage", "snapshot"], capture_output=True, text=True, env=env,
                              timeout=300)
    assert snapshot.returncode == 0 and "the base at step 2" in snapshot.stdout, snapshot.stderr[-2000:]
    for part in ("unet", "text_encoder"):
        [ours] = (out / "base-at-2" / part).glob("*.safetensors")
        [theirs] = (out / "base" / part).glob("*.safetensors")
        first, second = load_file(ours), load_file(theirs)
        assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first), part
    assert (out / "base-at-2" / "scheduler" / "scheduler_config.json").read_text() == \
        (out / "base" / "scheduler" / "scheduler_config.json").read_text()

    # --base-from a base folder starts from its weights (0 steps: saved as loaded).
    again = subprocess.run([sys.executable, str(TOOL), str(tmp_path / "more"), "--stage", "base", "--device", "cpu",
                            "--scenes", "8", "--base-from", str(out / "base"), "--base-steps", "0"],
                           capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    for part in ("unet", "text_encoder"):
        [ours] = (tmp_path / "more" / "base" / part).glob("*.safetensors")
        [theirs] = (out / "base" / part).glob("*.safetensors")
        first, second = load_file(ours), load_file(theirs)
        assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first), part


def test_fine_tuning_the_shipped_brushnet_with_the_drawn_mix(tmp_path):
    from brushnet.demo.model import DEMO_MODEL_DIR

    shipped = {p.relative_to(DEMO_MODEL_DIR): p.stat().st_mtime_ns for p in DEMO_MODEL_DIR.rglob("*") if p.is_file()}
    out = tmp_path / "ft"
    command = [sys.executable, str(TOOL), str(out), "--device", "cpu", "--stage", "brushnet", "--brushnet-from",
               "shipped", "--mask-mix", "drawn", "--scene-layout", "varied", "--scenes", "16", "--batch", "4",
               "--brushnet-steps", "2", "--brushnet-schedule", "linear", "--masked-loss-weight", "2",
               "--colour-jitter", "45"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (out / "shipped" / "brushnet").is_dir() and len(list((out / "data").glob("*.png"))) == 16
    # --colour-jitter reached the scenes: drawn in jittered shades, not the palette's.
    from brushnet.demo.scenes import TRAIN_SEEDS, scene_stem

    seed = int(TRAIN_SEEDS[0])
    written = np.asarray(Image.open(out / "data" / f"{scene_stem(seed)}.png"))
    assert np.array_equal(written, np.asarray(make_scene(seed, "varied", colour_jitter=45).image))
    assert not np.array_equal(written, np.asarray(make_scene(seed, "varied").image))
    # --brushnet-schedule linear reached the trainer: no warm-up, the rate at 0 after the last step.
    import torch

    schedule = torch.load(out / "brushnet" / "checkpoint-2" / "scheduler.bin", weights_only=True)
    assert schedule["base_lrs"] == [3e-4] and schedule["_last_lr"] == [0.0], schedule
    assert (out / "brushnet" / "diffusion_pytorch_model.safetensors").is_file()
    assemble = subprocess.run([sys.executable, str(TOOL), str(out), "--stage", "assemble"], capture_output=True,
                              text=True, env=env, timeout=300)
    assert assemble.returncode == 0, assemble.stderr[-2000:]
    # The shipped base is the base, unchanged; without --install the package's model is untouched.
    for part in ("unet", "vae", "text_encoder"):
        [ours] = (out / "demo-model" / part).glob("*.safetensors")
        [theirs] = (DEMO_MODEL_DIR / part).glob("*.safetensors")
        assert ours.read_bytes() == theirs.read_bytes(), part
    assert shipped == {p.relative_to(DEMO_MODEL_DIR): p.stat().st_mtime_ns for p in DEMO_MODEL_DIR.rglob("*")
                       if p.is_file()}


def test_a_base_from_that_is_no_base_folder_is_one_line(tmp_path):
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, str(TOOL), str(out), "--stage", "base", "--base-from", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "not a base folder" in run.stderr and "Traceback" not in run.stderr
    assert not out.exists()


def test_the_base_stage_trains_on_offset_noise(tmp_path, monkeypatch):
    import runpy

    import brushnet.training.loop as loop

    offsets, plain = [], loop.training_noise
    monkeypatch.setattr(loop, "training_noise", lambda latents, offset=0.0: offsets.append(offset) or plain(
        latents, offset))
    monkeypatch.setattr(sys, "argv", [str(TOOL), str(tmp_path / "out"), "--stage", "base", "--base-from", "shipped",
                                      "--device", "cpu", "--scenes", "8", "--batch", "2", "--base-steps", "2",
                                      "--noise-offset", "0.25"])
    runpy.run_path(str(TOOL), run_name="__main__")
    assert offsets == [0.25, 0.25]
    assert (tmp_path / "out" / "base" / "unet").is_dir()


def test_the_base_stage_trains_and_saves_a_zero_terminal_snr_schedule(tmp_path, monkeypatch):
    import json
    import runpy

    import pytest
    from diffusers import DDPMScheduler

    velocities, plain = [], DDPMScheduler.get_velocity
    monkeypatch.setattr(DDPMScheduler, "get_velocity", lambda self, *a: velocities.append(
        self.alphas_cumprod[-1].item()) or plain(self, *a))
    out = tmp_path / "out"
    common = [str(TOOL), str(out), "--base-from", "shipped", "--device", "cpu", "--scenes", "8", "--batch", "2"]

    def build(*arguments):
        monkeypatch.setattr(sys, "argv", [*common, *arguments])
        runpy.run_path(str(TOOL), run_name="__main__")

    build("--stage", "base", "--base-steps", "2", "--zero-terminal-snr")
    # Each step's loss aims at the velocity, under betas that reach pure noise at t = 999.
    assert velocities == [0.0, 0.0]
    saved = json.loads((out / "base" / "scheduler" / "scheduler_config.json").read_text())
    assert (saved["rescale_betas_zero_snr"], saved["prediction_type"], saved["timestep_spacing"]) == (
        True, "v_prediction", "trailing")
    # A snapshot of the checkpoint is saved under the schedule it was trained with.
    build("--stage", "snapshot")
    snapshot = json.loads((out / "base-at-2" / "scheduler" / "scheduler_config.json").read_text())
    assert snapshot["prediction_type"] == "v_prediction" and snapshot["rescale_betas_zero_snr"]
    # Going on without the flag would train a v-prediction checkpoint on epsilon: refused in one line.
    import shutil

    shutil.rmtree(out / "base")
    with pytest.raises(SystemExit, match="trained with --zero-terminal-snr .*give the same flag"):
        build("--stage", "base", "--base-steps", "4")
    assert not (out / "base").exists()


def test_a_noise_offset_out_of_range_is_one_line(tmp_path):
    run = subprocess.run([sys.executable, str(TOOL), str(tmp_path / "out"), "--stage", "base", "--noise-offset", "2"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "--noise-offset 2.0: give a number from 0 to 1" in run.stderr
    assert "Traceback" not in run.stderr and not (tmp_path / "out").exists()


def test_a_build_on_the_32x32_latent_grid_seeded_by_the_shipped_model(tmp_path):
    from safetensors.torch import load_file

    from brushnet.demo.model import DEMO_MODEL_DIR

    out = tmp_path / "grid32"
    common = [sys.executable, str(TOOL), str(out), "--device", "cpu", "--scenes", "16", "--batch", "4",
              "--vae-batch", "4", "--latent-size", "32"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    for stage in (["--stage", "data"], ["--stage", "vae", "--vae-steps", "2", "--vae-schedule", "linear"],
                  ["--stage", "base", "--base-from", "shipped", "--base-steps", "0"],
                  ["--stage", "brushnet", "--brushnet-from", "shipped", "--mask-mix", "drawn", "--brushnet-steps", "2"],
                  ["--stage", "assemble"]):
        run = subprocess.run([*common, *stage], capture_output=True, text=True, env=env, timeout=300)
        assert run.returncode == 0, (stage, run.stderr[-2000:])
    # The VAE downsamples 2x; the base's UNet works on 32x32 latents.
    vae = load_file(next((out / "vae").glob("*.safetensors")))
    assert vae["encoder.conv_out.weight"].shape[0] == 8 and "encoder.down_blocks.2.resnets.0.conv1.weight" not in vae
    # The shipped 16x16 base seeded the 32x32 one: its down blocks one level in, the rest in place
    # (0 base steps: saved as seeded), the outer level fresh.
    shipped_unet = load_file(next((DEMO_MODEL_DIR / "unet").glob("*.safetensors")))
    seeded = load_file(next((out / "base" / "unet").glob("*.safetensors")))
    pairs = {"down_blocks.1.attentions.0.proj_in.weight": "down_blocks.0.attentions.0.proj_in.weight",
             "down_blocks.3.resnets.0.conv1.weight": "down_blocks.2.resnets.0.conv1.weight",
             "up_blocks.2.attentions.1.proj_out.weight": "up_blocks.2.attentions.1.proj_out.weight",
             "mid_block.resnets.0.conv1.weight": "mid_block.resnets.0.conv1.weight"}
    for ours, theirs in pairs.items():
        assert torch.equal(seeded[ours].float(), shipped_unet[theirs].float()), ours
    assert "up_blocks.3.resnets.0.conv1.weight" in seeded and "up_blocks.2.upsamplers.0.conv.weight" in seeded
    # The shipped BrushNet seeded the new one: its residual convs two places on, the new outer ones zero.
    shipped_branch = load_file(next((DEMO_MODEL_DIR / "brushnet").glob("*.safetensors")))
    seed = load_file(next((out / "brushnet-seed").glob("*.safetensors")))
    assert torch.equal(seed["brushnet_down_blocks.2.weight"].float(), shipped_branch["brushnet_down_blocks.0.weight"].float())
    assert torch.equal(seed["brushnet_up_blocks.7.weight"].float(), shipped_branch["brushnet_up_blocks.7.weight"].float())
    assert not seed["brushnet_down_blocks.0.weight"].any() and not seed["brushnet_up_blocks.10.weight"].any()
    assert '"mask_downsampling": "max"' in (out / "brushnet" / "config.json").read_text()

    assert_inpaints(out / "demo-model", tmp_path)
