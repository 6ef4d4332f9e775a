"""Whether a BrushNet fits a base UNet, decided from the two configs alone (no weights needed).

A BrushNet adds one residual after every layer of the UNet, so it must mirror the UNet's layout
exactly (blocks, widths, layers per block), read latents of the UNet's channel count, and take a
masked-image latent plus one mask channel as its conditioning. An SDXL BrushNet also reads the
UNet's pooled-text and size conditioning, so those widths must agree too.
"""

from collections.abc import Mapping

FAMILY_NAMES = {True: "SDXL", False: "SD1.5"}


def is_sdxl_config(config: Mapping) -> bool:
    return config.get("addition_embed_type") == "text_time"


def _per_block(value, n_blocks: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n_blocks


def layout_differences(brushnet: Mapping, unet: Mapping) -> list[str]:
    """Each way the BrushNet config does not fit the UNet config, as a short phrase; [] if it fits."""
    differences = []
    sdxl = is_sdxl_config(brushnet)
    if sdxl != is_sdxl_config(unet):
        differences.append(f"it is an {FAMILY_NAMES[sdxl]} BrushNet, the base is {FAMILY_NAMES[is_sdxl_config(unet)]}")
    unet_latents = unet.get("in_channels", 4)
    if brushnet.get("in_channels", 4) != unet_latents:
        differences.append(f"it reads {brushnet.get('in_channels')}-channel latents, the UNet's have {unet_latents}")
    conditioning = brushnet.get("conditioning_channels", 5)
    if conditioning != unet_latents + 1:
        differences.append(f"it takes {conditioning} conditioning channels, where a masked-image latent and its mask "
                           f"are {unet_latents + 1}")
    # A single-file base's config is partial (what its keys show): compare only what it has.
    n_blocks = len(brushnet.get("down_block_types") or ())
    if "down_block_types" in unet and n_blocks != len(unet["down_block_types"]):
        differences.append(f"it has {n_blocks} down blocks, the UNet {len(unet['down_block_types'])}")
    channels = list(brushnet.get("block_out_channels") or ())
    if "block_out_channels" in unet and channels != list(unet["block_out_channels"]):
        differences.append(f"its block channels are {channels}, the UNet's {list(unet['block_out_channels'])}")
    if "layers_per_block" in unet and "down_block_types" in unet:
        layers = _per_block(brushnet.get("layers_per_block", 2), n_blocks)
        unet_layers = _per_block(unet["layers_per_block"], len(unet["down_block_types"]))
        if layers != unet_layers:
            show = lambda v: v[0] if len(set(v)) == 1 else v  # noqa: E731
            differences.append(f"its layers_per_block is {show(layers)}, the UNet's {show(unet_layers)}")
    if sdxl and is_sdxl_config(unet):
        for field in ("addition_time_embed_dim", "projection_class_embeddings_input_dim"):
            if field in unet and brushnet.get(field) != unet[field]:
                differences.append(f"its {field} is {brushnet.get(field)}, the UNet's {unet.get(field)}")
    return differences


def mismatch_message(brushnet: Mapping, unet: Mapping, brushnet_name: str = "This BrushNet",
                     unet_name: str = "the base UNet") -> str | None:
    """One sentence naming what differs and the fix, or None when the BrushNet fits."""
    differences = layout_differences(brushnet, unet)
    if not differences:
        return None
    return (f"{brushnet_name} does not fit {unet_name}: {'; '.join(differences)}. Use a BrushNet made for this "
            f"base model's family ({FAMILY_NAMES[is_sdxl_config(unet)]}), e.g. a released checkpoint or "
            "BrushNetModel.from_unet(unet).")
