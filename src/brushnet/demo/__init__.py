"""The built-in demo: a tiny Stable-Diffusion-shaped model trained from scratch on procedural
scenes (`brushnet.demo.scenes`), so inpainting can be tested end to end without downloads."""
