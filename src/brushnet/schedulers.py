"""Schedulers by short name, built from a base model's scheduler config."""

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    PNDMScheduler,
    TCDScheduler,
    UniPCMultistepScheduler,
)

# name -> (class, config overrides). UniPC uses sigma_min on its last step because the authors'
# diffusers fork always did: that is what the paper's numbers were made with.
SCHEDULERS = {
    "unipc": (UniPCMultistepScheduler, {"final_sigmas_type": "sigma_min"}),
    "ddim": (DDIMScheduler, {}),
    "dpmpp": (DPMSolverMultistepScheduler, {}),
    "dpmpp_karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "pndm": (PNDMScheduler, {"skip_prk_steps": True}),
    # For few-step LoRAs (LCM-LoRA, TCD-LoRA, loaded with --lora): 4-8 steps, guidance 1-2.
    "lcm": (LCMScheduler, {}),
    "tcd": (TCDScheduler, {}),
}


def make_scheduler(name: str, config):
    """A scheduler of kind `name` (see SCHEDULERS) from a base model's scheduler config."""
    if name not in SCHEDULERS:
        raise ValueError(f"Unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}.")
    cls, overrides = SCHEDULERS[name]
    config = dict(config)
    # DDIM clips its predicted x0 to [-1, 1] unless told not to: right for pixel-space models, ruinous
    # for latents (they run past 1). SD's own PNDM config says clip_sample false, but a config saved
    # by a scheduler without that field (UniPC, Euler, DPM++: the demo model's, many fine-tunes')
    # does not, and DDIM would fall back to clipping: a latent model here never clips unless its
    # config asks to.
    config.setdefault("clip_sample", False)
    return cls.from_config({**config, **overrides})
