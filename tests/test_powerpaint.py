"""PowerPaint v2 against the reference's outputs on tiny models: the branch with cross-attention, the
branch text encoder with its task tokens, and every run of the pipeline."""

import json

import pytest
import torch
from diffusers import UNet2DConditionModel
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTokenizer

from brushnet import BrushNetModel, StableDiffusionPowerPaintPipeline, unet_forward
from brushnet.loading import load_pipeline
from brushnet.models.task_prompts import (
    ALL_TASK_TOKENS,
    add_task_tokens,
    branch_text_encoder,
    expand_task_words,
    unwrap_state_dict,
)
from brushnet.pipelines.pipeline_powerpaint import TASKS

from test_golden_pipelines import Recorder, _scheduler

MODEL_REL = 1e-5
PIPE_REL = 1e-4
MODEL_CASE, PIPELINE_CASE = "powerpaint_v2_tiny_model", "powerpaint_v2_tiny_pipeline"
BASE = "realisticVisionV60B1_v51VAE"


# -- the branch ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_case(golden):
    case = golden(MODEL_CASE)
    unet = UNet2DConditionModel.from_pretrained(case.dir / "unet")
    branch = BrushNetModel.from_pretrained(case.dir / "PowerPaint_Brushnet")
    return case, unet, branch


def test_branch_every_residual_and_noise_prediction(model_case):
    case, unet, branch = model_case
    inputs = case.inputs
    assert branch.has_attention
    first = None
    for run in case.case["runs"]:
        prefix = run["prefix"]
        with torch.no_grad():
            down, mid, up = branch(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"],
                                   inputs["brushnet_cond"], conditioning_scale=run["conditioning_scale"],
                                   guess_mode=run["guess_mode"], return_dict=False)
        first = case.check_residuals(prefix, (down, mid, up), first, MODEL_REL)
        with torch.no_grad():
            noise = unet_forward(unet, inputs["sample"], inputs["timestep"], inputs["unet_encoder_hidden_states"],
                                 down_block_add_samples=down, mid_block_add_sample=mid, up_block_add_samples=up)
        case.check(f"{prefix}.noise_pred", noise, MODEL_REL)


def test_branch_needs_its_text(model_case):
    case, _, branch = model_case
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        branch(case.inputs["sample"], case.inputs["timestep"], None, case.inputs["brushnet_cond"])


def test_from_unet_keep_attention_gives_the_released_layout(model_case):
    case, unet, branch = model_case
    built = BrushNetModel.from_unet(unet, keep_attention=True)
    released = json.loads((case.dir / "PowerPaint_Brushnet" / "config.json").read_text())
    ours = {k: v for k, v in json.loads(json.dumps(dict(built.config))).items() if not k.startswith("_")}
    assert ours.pop("mask_downsampling") == "nearest"  # the one field our configs add (the reference's behaviour)
    assert ours == {k: v for k, v in released.items() if not k.startswith("_")}
    assert set(built.state_dict()) == set(branch.state_dict())
    # Attention weights come from the UNet, as in the reference.
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    assert torch.equal(built.state_dict()[key], unet.state_dict()[key])


def test_branch_save_and_load_keep_the_released_format(model_case, tmp_path):
    case, _, branch = model_case
    branch.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "diffusion_pytorch_model.safetensors")
    original = load_file(case.dir / "PowerPaint_Brushnet" / "diffusion_pytorch_model.safetensors")
    assert set(saved) == set(original) and len(saved) == case.case["key_counts"]["branch"]
    assert all(torch.equal(saved[k], original[k]) for k in original)


# -- the branch text encoder ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def text_case(golden):
    case = golden(MODEL_CASE)
    tokenizer = add_task_tokens(CLIPTokenizer.from_pretrained(case.dir / "tokenizer"))
    state = torch.load(case.dir / "PowerPaint_Brushnet" / "pytorch_model.bin", weights_only=True)
    encoder = branch_text_encoder(CLIPTextConfig.from_pretrained(case.dir / "text_encoder"), state)
    return case, tokenizer, encoder, state


def _ids(tokenizer, text):
    return tokenizer(expand_task_words(text), padding="max_length", max_length=77, truncation=True,
                     return_tensors="pt").input_ids


def test_task_tokens_and_their_ids(text_case):
    case, tokenizer, encoder, _ = text_case
    vocab = tokenizer.get_vocab()
    for word, info in case.case["placeholder_tokens"].items():
        assert [vocab[t] for t in info["vectors"]] == info["token_ids"]
    assert encoder.config.vocab_size == len(tokenizer) == 282 + len(ALL_TASK_TOKENS)
    for entry in case.case["prompt_strings"]:
        assert expand_task_words(entry["string"]) == entry["expanded"]
        assert torch.equal(_ids(tokenizer, entry["string"])[0], case[f"tokenizer.input_ids.{entry['index']}"])


def test_branch_text_embeddings(text_case):
    case, tokenizer, encoder, _ = text_case
    for entry in case.case["prompt_strings"]:
        i = entry["index"]
        if entry["string"] == "P_obj P_obj":
            continue  # the reference's repeated-word quirk, checked below
        ids = _ids(tokenizer, entry["string"])
        with torch.no_grad():
            case.check(f"text_encoder_brushnet.token_embeds.{i}", encoder.get_input_embeddings()(ids), MODEL_REL)
            case.check(f"text_encoder_brushnet.last_hidden_state.{i}", encoder(ids)[0], MODEL_REL)


def test_a_repeated_task_word_gets_its_vectors_twice(text_case):
    # The reference leaves the second "P_obj" run as token 0's embedding; here both runs are P_obj.
    case, tokenizer, encoder, state = text_case
    index = next(e["index"] for e in case.case["prompt_strings"] if e["string"] == "P_obj P_obj")
    with torch.no_grad():
        embeds = encoder.get_input_embeddings()(_ids(tokenizer, "P_obj P_obj"))[0]
    learned = state["text_model.embeddings.token_embedding.trainable_embeddings.P_obj"]
    assert torch.equal(embeds[1:11], learned) and torch.equal(embeds[11:21], learned)
    golden = case[f"text_encoder_brushnet.token_embeds.{index}"][0]
    assert torch.equal(embeds[:11], golden[:11]) and torch.equal(embeds[21:], golden[21:])


def test_safetensors_copy_holds_the_same_tensors(golden):
    folder = golden(MODEL_CASE).dir / "PowerPaint_Brushnet"
    from_bin = torch.load(folder / "pytorch_model.bin", weights_only=True)
    from_safetensors = load_file(folder / "text_encoder_brushnet.safetensors")
    assert set(from_bin) == set(from_safetensors)
    assert all(torch.equal(from_bin[k], from_safetensors[k]) for k in from_bin)
    plain = unwrap_state_dict(from_bin)
    assert plain["text_model.embeddings.token_embedding.weight"].shape == (282 + 30, 32)


# -- the pipeline -----------------------------------------------------------------------------


class PowerPaintRecorder(Recorder):
    """Also keeps what the branch's cross-attention reads."""

    def __init__(self, pipe):
        super().__init__(pipe)
        self._handles.append(pipe.brushnet.register_forward_pre_hook(self._branch_inputs, with_kwargs=True))

    def _branch_inputs(self, module, args, kwargs):
        self.data.setdefault("brushnet_encoder_hidden_states", kwargs["encoder_hidden_states"])


@pytest.fixture(scope="module")
def pipeline_case(golden):
    case = golden(PIPELINE_CASE)
    pipe = load_pipeline(case.dir / BASE, case.dir / "PowerPaint_Brushnet")
    pipe.set_progress_bar_config(disable=True)
    return case, pipe


def _images(case, run):
    pair = case.case["image_pairs"][run["image_pair"]]
    return (Image.open(case.dir / pair["masked"]).convert("RGB"), Image.open(case.dir / pair["mask"]).convert("RGB"))


def _reference_posterior_sample(pipe, seed):
    """Wrap prepare_brushnet_inputs so the branch gets the reference's sampled latents: one draw per
    CFG row from the global RNG right after set_seed(seed), instead of the posterior mode."""
    original = pipe.prepare_brushnet_inputs

    def prepare(image, mask, height, width, batch_size, device):
        pixels, hole, conditioning = original(image, mask, height, width, batch_size, device)
        masked = torch.where(hole.bool(), torch.full_like(pixels, -1.0), pixels)
        dist = pipe.vae.encode(torch.cat([masked] * 2)).latent_dist
        noise = torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(seed))
        sample = (dist.mean + dist.std * noise) * pipe.vae.config.scaling_factor
        return pixels, hole, torch.cat([sample, torch.cat([conditioning[:, -1:]] * 2)], dim=1)

    pipe.prepare_brushnet_inputs = prepare


def _call_kwargs_by_task(run):
    """The run as a user calls it: task, prompt and fitting degree instead of the authors' keywords."""
    kwargs = {k: v for k, v in run["call_kwargs"].items() if not k.startswith(("prompt", "negative_prompt", "trad"))}
    return dict(kwargs, task=run["task"], prompt=run["user_prompt"], negative_prompt=run["user_negative_prompt"],
                fitting_degree=run["fitting_degree"])


@pytest.mark.parametrize("by_task", [False, True], ids=["authors_keywords", "task"])
def test_every_run_matches_reference(pipeline_case, by_task):
    case, pipe = pipeline_case
    for index, run in enumerate(case.case["runs"]):
        prefix = run["prefix"]
        pipe.scheduler = _scheduler(run)
        image, mask = _images(case, run)
        kwargs = _call_kwargs_by_task(run) if by_task else run["call_kwargs"]
        if run["masked_image_latent"] == "sample_global_rng":
            _reference_posterior_sample(pipe, run["seed"])  # the recorder wraps it, and removes it on close
        recorder = PowerPaintRecorder(pipe)
        try:
            images = pipe(image=image, mask=mask, generator=torch.Generator().manual_seed(run["seed"]),
                          output_type="np", callback_on_step_end=recorder.step_end, **kwargs).images
        finally:
            recorder.close()
        data = recorder.data
        case.check(f"{prefix}.images", torch.from_numpy(images), PIPE_REL)
        case.check(f"{prefix}.latents_per_step", torch.stack(data["latents"]), PIPE_REL)
        case.check(f"{prefix}.latents_init", data["latents_init"], PIPE_REL)
        case.check(f"{prefix}.timesteps", pipe.scheduler.timesteps, 0.0)
        case.check(f"{prefix}.brushnet_scale_per_step", torch.tensor(data["scales"]), 0.0)
        conditioning = data["conditioning"]
        if conditioning.shape[0] == 1:  # one copy for both CFG halves; the reference duplicated it
            conditioning = torch.cat([conditioning] * 2)
        case.check(f"{prefix}.conditioning_latents", conditioning, PIPE_REL)
        case.check(f"{prefix}.unet_encoder_hidden_states", data["encoder_hidden_states"], PIPE_REL)
        case.check(f"{prefix}.brushnet_encoder_hidden_states", data["brushnet_encoder_hidden_states"], PIPE_REL)
        if index == 0:
            case.check(f"{prefix}.unet_noise_pred_per_step", torch.stack(data["noise"]), PIPE_REL)
            down, mid, up = data["residuals"][0]
            case.check(f"{prefix}.step0.down_res.0", down[0], PIPE_REL)
            case.check(f"{prefix}.step0.mid_res", mid, PIPE_REL)
            case.check(f"{prefix}.step0.up_res.14", up[14], PIPE_REL)


def test_branch_prompts_encoded_alone(pipeline_case):
    case, pipe = pipeline_case
    for entry in case.case["all_prompt_strings"]:
        i = entry["index"]
        ids = pipe.tokenizer(expand_task_words(entry["string"]), padding="max_length", max_length=77,
                             truncation=True, return_tensors="pt").input_ids[0]
        assert torch.equal(ids, case[f"tokenizer.input_ids.{i}"])
        if f"text_encoder_brushnet.last_hidden_state.{i}" in case:
            with torch.no_grad():
                embeds = pipe.encode_task_prompts([entry["string"]], [entry["string"]], 1.0, "cpu")
            case.check(f"text_encoder_brushnet.last_hidden_state.{i}", embeds, PIPE_REL)


def test_task_table_is_the_reference_mapping(golden):
    case = golden(PIPELINE_CASE)
    for run in case.case["runs"]:
        kwargs = run["call_kwargs"]
        task = {"image-outpainting": "outpainting"}.get(run["task"], run["task"])
        a, b, neg_a, neg_b, template = TASKS[task]
        assert (a, b, neg_a, neg_b) == (kwargs["promptA"], kwargs["promptB"], kwargs["negative_promptA"],
                                        kwargs["negative_promptB"])
        assert template.format(run["user_prompt"]) == kwargs["promptU"]


# -- where the reference fails ---------------------------------------------------------------------


def _small_call(case, pipe, **kwargs):
    image, mask = _images(case, case.case["runs"][0])
    return pipe(image=image, mask=mask, num_inference_steps=2, height=32, width=48, output_type="np",
                generator=torch.Generator().manual_seed(0), **kwargs).images


def test_no_guidance_gives_a_result(pipeline_case):
    case, pipe = pipeline_case
    images = _small_call(case, pipe, prompt="a red cake", guidance_scale=1.0)
    assert images.shape == (1, 32, 48, 3) and torch.isfinite(torch.from_numpy(images)).all()


def test_prompt_cut_inside_a_task_word_gives_a_result(pipeline_case):
    case, pipe = pipeline_case
    long = " ".join(["cake"] * 70) + " P_obj"  # 70 words + 10 task tokens > 75: truncated inside P_obj
    images = _small_call(case, pipe, task="object-removal", promptA=long)
    assert torch.isfinite(torch.from_numpy(images)).all()


def test_task_word_in_the_user_prompt(pipeline_case):
    case, pipe = pipeline_case
    # The word itself is ordinary text for the UNet's encoder ...
    assert torch.isfinite(torch.from_numpy(_small_call(case, pipe, prompt="a P_obj on a table"))).all()
    # ... a task token is not, and would index past its table.
    with pytest.raises(ValueError, match="task tokens"):
        _small_call(case, pipe, prompt="a P_obj_3 on a table")


def test_argument_errors(pipeline_case):
    case, pipe = pipeline_case
    with pytest.raises(ValueError, match="Unknown PowerPaint task"):
        _small_call(case, pipe, task="erase")
    with pytest.raises(TypeError, match="promptU"):
        _small_call(case, pipe, prompt="a", promptU="b")
    with pytest.raises(ValueError, match="fitting_degree"):
        _small_call(case, pipe, task="shape-guided", fitting_degree=1.5)
    with pytest.raises(TypeError):
        _small_call(case, pipe, not_an_argument=1)
    with pytest.raises(ValueError, match="The PowerPaint task is one name"):  # was: unhashable type 'list'
        _small_call(case, pipe, task=["text-guided"])
    with pytest.raises(ValueError, match="`prompt` must be a string or a non-empty list"):  # was an IndexError
        _small_call(case, pipe, prompt=[])


def test_image_outpainting_is_an_alias(pipeline_case):
    case, pipe = pipeline_case
    a = _small_call(case, pipe, task="outpainting")
    b = _small_call(case, pipe, task="image-outpainting")
    assert (a == b).all()


def test_brushnet_pipeline_refuses_a_powerpaint_branch(golden, pipeline_case):
    from brushnet import StableDiffusionBrushNetPipeline

    case, pipe = pipeline_case
    plain = StableDiffusionBrushNetPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                                            unet=pipe.unet, brushnet=pipe.brushnet, scheduler=pipe.scheduler)
    image, mask = _images(case, case.case["runs"][0])
    with pytest.raises(ValueError, match="StableDiffusionPowerPaintPipeline"):
        plain("x", image=image, mask=mask, num_inference_steps=1, output_type="np")


def test_save_and_reload_the_pipeline(pipeline_case, tmp_path):
    case, pipe = pipeline_case
    pipe.save_pretrained(tmp_path)
    again = StableDiffusionPowerPaintPipeline.from_pretrained(tmp_path)
    again.set_progress_bar_config(disable=True)
    assert len(again.tokenizer) == len(pipe.tokenizer)
    assert (_small_call(case, again, prompt="a red cake") == _small_call(case, pipe, prompt="a red cake")).all()
    # load_pipeline finds the saved folder's own branch text encoder (it asked for a pytorch_model.bin)
    from brushnet import load_pipeline

    loaded = load_pipeline(tmp_path, tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert (_small_call(case, loaded, prompt="a red cake") == _small_call(case, pipe, prompt="a red cake")).all()
