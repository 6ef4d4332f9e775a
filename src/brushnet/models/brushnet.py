"""The BrushNet branch: a Stable Diffusion UNet without attention, conditioned on the masked image.

PowerPaint v2 (open-mmlab/PowerPaint, `PowerPaint_Brushnet/`) is the same branch with the UNet's
cross-attention kept: its config names the attention block types, and the blocks read the branch
text encoder's task-prompt embeddings. Either way the config fields and state-dict keys are those of
the released checkpoints (`config.json` + `diffusion_pytorch_model.safetensors`), so
`from_pretrained` loads them as they are.
"""

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d_blocks import (
    DownBlock2D,
    UNetMidBlock2D,
    UpBlock2D,
    get_down_block,
    get_mid_block,
    get_up_block,
)
from diffusers.utils import BaseOutput
from torch import nn

from ..masks import check_mask_downsampling

# Number of latent channels the branch sees besides the noisy latent: masked-image latent (4) + mask (1).
CONDITIONING_CHANNELS = 5
# Block types of a branch that keeps the UNet's cross-attention (PowerPaint v2's BrushNet_CA).
ATTENTION_DOWN, ATTENTION_MID, ATTENTION_UP = "CrossAttnDownBlock2D", "UNetMidBlock2DCrossAttn", "CrossAttnUpBlock2D"


@dataclass
class BrushNetOutput(BaseOutput):
    """Residuals for the frozen UNet, already multiplied by the conditioning scale.

    down_block_res_samples: one per down layer (conv_in, each resnet, each downsampler).
    mid_block_res_sample: one for the mid block.
    up_block_res_samples: one per up layer (each resnet, each upsampler).
    """

    down_block_res_samples: tuple[torch.Tensor, ...]
    mid_block_res_sample: torch.Tensor
    up_block_res_samples: tuple[torch.Tensor, ...]


def _zero_conv(channels: int) -> nn.Conv2d:
    conv = nn.Conv2d(channels, channels, kernel_size=1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class BrushNetModel(ModelMixin, ConfigMixin):
    """The BrushNet branch of Ju et al. (ECCV 2024).

    A copy of the base UNet's down, mid and up blocks with every attention layer removed. Its input is
    the noisy latent concatenated with `brushnet_cond` (masked-image latent + mask, 1 = keep,
    0 = hole). After every layer a zero-initialised 1x1 conv produces a residual that is added to
    the frozen UNet's hidden state at the same layer (see `brushnet.unet_forward`).

    The constructor arguments are the config of the released checkpoints. With attention-free block
    types, the fields that only make sense for attention blocks (`cross_attention_dim`,
    `attention_head_dim`, `num_attention_heads`, `transformer_layers_per_block`,
    `use_linear_projection`, `only_cross_attention`, `upcast_attention`) are accepted and kept in
    the config but do not shape the model. With PowerPaint's block types (`CrossAttnDownBlock2D`,
    `UNetMidBlock2DCrossAttn`, `CrossAttnUpBlock2D`) they build the attention exactly as the UNet's,
    and `forward` needs `encoder_hidden_states` (the branch text encoder's task prompt).
    `conditioning_embedding_out_channels`, `encoder_hid_dim*` and `addition_embed_type_num_heads`
    never shape it. `mask_downsampling` is how the keep mask reaches latent size
    (`brushnet.masks.latent_keep_mask`): "nearest", the reference's and every released checkpoint's
    (a config without the field), or "max" for a branch trained so.
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        in_channels: int = 4,
        conditioning_channels: int = CONDITIONING_CHANNELS,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        down_block_types: tuple[str, ...] = ("DownBlock2D",) * 4,
        mid_block_type: str | None = "UNetMidBlock2D",
        up_block_types: tuple[str, ...] = ("UpBlock2D",) * 4,
        only_cross_attention: bool | tuple[bool, ...] = False,
        block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280),
        layers_per_block: int = 2,
        downsample_padding: int = 1,
        mid_block_scale_factor: float = 1,
        act_fn: str = "silu",
        norm_num_groups: int | None = 32,
        norm_eps: float = 1e-5,
        cross_attention_dim: int = 1280,
        transformer_layers_per_block: int | tuple[int, ...] = 1,
        encoder_hid_dim: int | None = None,
        encoder_hid_dim_type: str | None = None,
        attention_head_dim: int | tuple[int, ...] = 8,
        num_attention_heads: int | tuple[int, ...] | None = None,
        use_linear_projection: bool = False,
        class_embed_type: str | None = None,
        addition_embed_type: str | None = None,
        addition_time_embed_dim: int | None = None,
        num_class_embeds: int | None = None,
        upcast_attention: bool = False,
        resnet_time_scale_shift: str = "default",
        projection_class_embeddings_input_dim: int | None = None,
        brushnet_conditioning_channel_order: str = "rgb",
        conditioning_embedding_out_channels: tuple[int, ...] | None = (16, 32, 96, 256),
        global_pool_conditions: bool = False,
        addition_embed_type_num_heads: int = 64,
        mask_downsampling: str = "nearest",
    ):
        super().__init__()
        _check_config(down_block_types, mid_block_type, up_block_types, block_out_channels, encoder_hid_dim,
                      encoder_hid_dim_type, addition_embed_type, brushnet_conditioning_channel_order)
        check_mask_downsampling(mask_downsampling)
        self.gradient_checkpointing = False

        self.conv_in_condition = nn.Conv2d(
            in_channels + conditioning_channels, block_out_channels[0], kernel_size=3, padding=1
        )

        time_embed_dim = block_out_channels[0] * 4
        self.time_proj = Timesteps(block_out_channels[0], flip_sin_to_cos, freq_shift)
        self.time_embedding = TimestepEmbedding(block_out_channels[0], time_embed_dim, act_fn=act_fn)

        if class_embed_type is None and num_class_embeds is not None:
            self.class_embedding = nn.Embedding(num_class_embeds, time_embed_dim)
        elif class_embed_type == "timestep":
            self.class_embedding = TimestepEmbedding(block_out_channels[0], time_embed_dim)
        elif class_embed_type == "identity":
            self.class_embedding = nn.Identity(time_embed_dim, time_embed_dim)
        elif class_embed_type == "projection":
            if projection_class_embeddings_input_dim is None:
                raise ValueError("class_embed_type='projection' needs projection_class_embeddings_input_dim.")
            self.class_embedding = TimestepEmbedding(projection_class_embeddings_input_dim, time_embed_dim)
        elif class_embed_type is None:
            self.class_embedding = None
        else:
            raise ValueError(f"Unknown class_embed_type {class_embed_type!r}.")

        if addition_embed_type == "text_time":  # SDXL: pooled text embedding + size/crop time ids
            self.add_time_proj = Timesteps(addition_time_embed_dim, flip_sin_to_cos, freq_shift)
            self.add_embedding = TimestepEmbedding(projection_class_embeddings_input_dim, time_embed_dim)

        resnet_kwargs = dict(
            temb_channels=time_embed_dim, resnet_eps=norm_eps, resnet_act_fn=act_fn,
            resnet_groups=norm_num_groups, resnet_time_scale_shift=resnet_time_scale_shift,
        )
        n_blocks = len(block_out_channels)

        # The attention settings per block, as UNet2DConditionModel reads them (num_attention_heads
        # falls back to attention_head_dim, diffusers' historical naming).
        per_block = lambda value: list(value) if isinstance(value, (list, tuple)) else [value] * n_blocks  # noqa: E731
        heads = per_block(num_attention_heads or attention_head_dim)
        head_dims = per_block(attention_head_dim)
        transformer_layers = per_block(transformer_layers_per_block)
        cross_only = per_block(only_cross_attention)
        attention_kwargs = dict(cross_attention_dim=cross_attention_dim, use_linear_projection=use_linear_projection,
                                upcast_attention=upcast_attention)

        self.down_blocks = nn.ModuleList()
        self.brushnet_down_blocks = nn.ModuleList([_zero_conv(block_out_channels[0])])
        output_channel = block_out_channels[0]
        for i in range(n_blocks):
            input_channel, output_channel = output_channel, block_out_channels[i]
            is_final_block = i == n_blocks - 1
            if down_block_types[i] == ATTENTION_DOWN:
                self.down_blocks.append(get_down_block(
                    ATTENTION_DOWN, num_layers=layers_per_block, in_channels=input_channel,
                    out_channels=output_channel, temb_channels=time_embed_dim, add_downsample=not is_final_block,
                    resnet_eps=norm_eps, resnet_act_fn=act_fn, resnet_groups=norm_num_groups,
                    resnet_time_scale_shift=resnet_time_scale_shift, downsample_padding=downsample_padding,
                    transformer_layers_per_block=transformer_layers[i], num_attention_heads=heads[i],
                    attention_head_dim=head_dims[i] or output_channel, only_cross_attention=cross_only[i],
                    **attention_kwargs,
                ))
            else:
                self.down_blocks.append(DownBlock2D(
                    in_channels=input_channel, out_channels=output_channel, num_layers=layers_per_block,
                    add_downsample=not is_final_block, downsample_padding=downsample_padding, **resnet_kwargs,
                ))
            n_outputs = layers_per_block + (0 if is_final_block else 1)
            self.brushnet_down_blocks.extend(_zero_conv(output_channel) for _ in range(n_outputs))

        mid_channel = block_out_channels[-1]
        if mid_block_type == ATTENTION_MID:
            self.mid_block = get_mid_block(
                ATTENTION_MID, temb_channels=time_embed_dim, in_channels=mid_channel, resnet_eps=norm_eps,
                resnet_act_fn=act_fn, resnet_groups=norm_num_groups, output_scale_factor=mid_block_scale_factor,
                resnet_time_scale_shift=resnet_time_scale_shift, transformer_layers_per_block=transformer_layers[-1],
                num_attention_heads=heads[-1], **attention_kwargs,
            )
        else:
            # "MidBlock2D" (what from_unet writes) has two resnets; the reference builds "UNetMidBlock2D" with one.
            self.mid_block = UNetMidBlock2D(
                in_channels=mid_channel, num_layers=1 if mid_block_type == "MidBlock2D" else 0, add_attention=False,
                output_scale_factor=mid_block_scale_factor, **resnet_kwargs,
            )
        self.brushnet_mid_block = _zero_conv(mid_channel)

        self.up_blocks = nn.ModuleList()
        self.brushnet_up_blocks = nn.ModuleList()
        reversed_channels = list(reversed(block_out_channels))
        output_channel = reversed_channels[0]
        for i in range(n_blocks):
            is_final_block = i == n_blocks - 1
            prev_output_channel, output_channel = output_channel, reversed_channels[i]
            input_channel = reversed_channels[min(i + 1, n_blocks - 1)]
            if up_block_types[i] == ATTENTION_UP:
                self.up_blocks.append(get_up_block(
                    ATTENTION_UP, num_layers=layers_per_block + 1, in_channels=input_channel,
                    out_channels=output_channel, prev_output_channel=prev_output_channel,
                    temb_channels=time_embed_dim, add_upsample=not is_final_block, resnet_eps=norm_eps,
                    resnet_act_fn=act_fn, resolution_idx=i, resnet_groups=norm_num_groups,
                    resnet_time_scale_shift=resnet_time_scale_shift,
                    transformer_layers_per_block=transformer_layers[::-1][i], num_attention_heads=heads[::-1][i],
                    only_cross_attention=cross_only[::-1][i], attention_head_dim=head_dims[::-1][i] or output_channel,
                    **attention_kwargs,
                ))
            else:
                self.up_blocks.append(UpBlock2D(
                    in_channels=input_channel, prev_output_channel=prev_output_channel,
                    out_channels=output_channel, num_layers=layers_per_block + 1, resolution_idx=i,
                    add_upsample=not is_final_block, **resnet_kwargs,
                ))
            n_outputs = layers_per_block + 1 + (0 if is_final_block else 1)
            self.brushnet_up_blocks.extend(_zero_conv(output_channel) for _ in range(n_outputs))

    @classmethod
    def load_config(cls, pretrained_model_name_or_path, *args, **kwargs):
        """ConfigMixin's, refusing another model's config: from a UNet folder, diffusers would build
        a BrushNet of its shape with every branch weight random (a warning only), and its
        cross-attention blocks would pass it for a PowerPaint branch."""
        loaded = super().load_config(pretrained_model_name_or_path, *args, **kwargs)
        config = loaded[0] if isinstance(loaded, tuple) else loaded
        class_name = config.get("_class_name")
        if class_name not in (None, cls.__name__):
            where = "/".join(str(p) for p in (pretrained_model_name_or_path, kwargs.get("subfolder")) if p)
            raise ValueError(f"{where} holds a {class_name}, not a {cls.__name__}: pass a "
                             "BrushNet folder (its config.json says \"_class_name\": \"BrushNetModel\").")
        return loaded

    @classmethod
    def from_unet(
        cls,
        unet,
        brushnet_conditioning_channel_order: str = "rgb",
        conditioning_embedding_out_channels: tuple[int, ...] | None = (16, 32, 96, 256),
        load_weights_from_unet: bool = True,
        conditioning_channels: int = CONDITIONING_CHANNELS,
        keep_attention: bool = False,
    ) -> "BrushNetModel":
        """Build a BrushNet from an SD1.5- or SDXL-shaped `UNet2DConditionModel`, as the reference does.

        Layout and config follow the UNet, with attention-free blocks. Weights copied from the UNet:
        time embedding, class embedding, every resnet and down/upsampler. `conv_in_condition` gets
        the UNet's `conv_in` weight on the noisy-latent channels *and* on the masked-latent channels,
        zero on the mask channel. All `brushnet_*` output convs start at zero, so the new branch
        leaves the UNet's output unchanged. SDXL's `add_embedding` is not copied (nor in the reference).

        `keep_attention=True` builds PowerPaint v2's branch instead: the UNet's own block types, its
        cross-attention weights copied too (the layout of `PowerPaint_Brushnet/config.json`).

        Unlike the reference, `conv_in_condition.bias` is a copy of the UNet's `conv_in.bias`, not the
        same Parameter: the reference ties them, which silently freezes that bias in training when
        the UNet is frozen.
        """
        config = unet.config
        n_blocks = len(config.down_block_types)
        if keep_attention:
            block_types = dict(down_block_types=config.down_block_types, mid_block_type=config.mid_block_type,
                               up_block_types=config.up_block_types)
        else:
            block_types = dict(down_block_types=["DownBlock2D"] * n_blocks, mid_block_type="MidBlock2D",
                               up_block_types=["UpBlock2D"] * n_blocks)
        brushnet = cls(
            in_channels=config.in_channels,
            conditioning_channels=conditioning_channels,
            flip_sin_to_cos=config.flip_sin_to_cos,
            freq_shift=config.freq_shift,
            **block_types,
            only_cross_attention=config.only_cross_attention,
            block_out_channels=config.block_out_channels,
            layers_per_block=config.layers_per_block,
            downsample_padding=config.downsample_padding,
            mid_block_scale_factor=config.mid_block_scale_factor,
            act_fn=config.act_fn,
            norm_num_groups=config.norm_num_groups,
            norm_eps=config.norm_eps,
            cross_attention_dim=config.cross_attention_dim,
            transformer_layers_per_block=config.get("transformer_layers_per_block", 1),
            encoder_hid_dim=config.get("encoder_hid_dim"),
            encoder_hid_dim_type=config.get("encoder_hid_dim_type"),
            attention_head_dim=config.attention_head_dim,
            num_attention_heads=config.num_attention_heads,
            use_linear_projection=config.use_linear_projection,
            class_embed_type=config.class_embed_type,
            addition_embed_type=config.get("addition_embed_type"),
            addition_time_embed_dim=config.get("addition_time_embed_dim"),
            num_class_embeds=config.num_class_embeds,
            upcast_attention=config.upcast_attention,
            resnet_time_scale_shift=config.resnet_time_scale_shift,
            projection_class_embeddings_input_dim=config.projection_class_embeddings_input_dim,
            brushnet_conditioning_channel_order=brushnet_conditioning_channel_order,
            conditioning_embedding_out_channels=conditioning_embedding_out_channels,
        )
        if not load_weights_from_unet:
            return brushnet

        brushnet.to(dtype=unet.dtype)
        with torch.no_grad():
            weight = brushnet.conv_in_condition.weight
            latent_channels = unet.conv_in.weight.shape[1]
            weight.zero_()
            weight[:, :latent_channels] = unet.conv_in.weight
            weight[:, latent_channels:2 * latent_channels] = unet.conv_in.weight
            brushnet.conv_in_condition.bias.copy_(unet.conv_in.bias)
        brushnet.time_embedding.load_state_dict(unet.time_embedding.state_dict())
        if brushnet.class_embedding is not None:
            brushnet.class_embedding.load_state_dict(unet.class_embedding.state_dict())
        # strict=False: without attention, the UNet's attention weights have no place in the branch.
        for name in ("down_blocks", "mid_block", "up_blocks"):
            missing, _ = getattr(brushnet, name).load_state_dict(getattr(unet, name).state_dict(), strict=False)
            if missing:
                raise ValueError(f"from_unet: the UNet has no weights for BrushNet {name} keys {missing[:3]}...")
        return brushnet

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor | None,
        brushnet_cond: torch.Tensor,
        conditioning_scale: float = 1.0,
        class_labels: torch.Tensor | None = None,
        timestep_cond: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        cross_attention_kwargs: dict | None = None,
        guess_mode: bool = False,
        return_dict: bool = True,
    ) -> BrushNetOutput | tuple:
        """Compute the residuals for the frozen UNet.

        `brushnet_cond` is (B, 5, h, w): masked-image latent (4) and mask (1 = keep, 0 = hole).
        `encoder_hidden_states`, `attention_mask` and `cross_attention_kwargs` feed the cross-attention
        of a PowerPaint branch; a BrushNet has no attention and does not read them.
        With `guess_mode`, residual k (down..., mid, up...) is scaled by
        `logspace(-1, 0, N)[k] * conditioning_scale` instead of `conditioning_scale`.
        """
        if self.config.brushnet_conditioning_channel_order == "bgr":
            brushnet_cond = torch.flip(brushnet_cond, dims=[1])

        emb = self._embed_time(sample, timestep, class_labels, timestep_cond, added_cond_kwargs)
        text = {}
        if self.has_attention:
            if encoder_hidden_states is None:
                raise ValueError("This BrushNet has cross-attention (PowerPaint): pass `encoder_hidden_states`.")
            if attention_mask is not None:  # as the UNet: 1 = attend, 0 = masked out
                attention_mask = ((1 - attention_mask.to(sample.dtype)) * -10000.0).unsqueeze(1)
            text = dict(encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask,
                        cross_attention_kwargs=cross_attention_kwargs)
        reads_text = lambda block: getattr(block, "has_cross_attention", False)  # noqa: E731

        hidden = self.conv_in_condition(torch.cat([sample, brushnet_cond], dim=1))
        down_outputs = [hidden]
        for block in self.down_blocks:
            hidden, layer_outputs = block(hidden, emb, **text) if reads_text(block) else block(hidden, emb)
            down_outputs.extend(layer_outputs)

        hidden = self.mid_block(hidden, emb, **text) if reads_text(self.mid_block) else self.mid_block(hidden, emb)
        mid_output = hidden

        up_outputs = []
        skips = list(down_outputs)
        for block in self.up_blocks:
            block_skips = skips[-len(block.resnets):]
            del skips[-len(block.resnets):]
            upsample_size = skips[-1].shape[2:] if skips else None
            hidden = self._up_block(block, hidden, block_skips, emb, upsample_size, up_outputs,
                                    text if reads_text(block) else None)

        down = [conv(h) for conv, h in zip(self.brushnet_down_blocks, down_outputs)]
        mid = self.brushnet_mid_block(mid_output)
        up = [conv(h) for conv, h in zip(self.brushnet_up_blocks, up_outputs)]

        if guess_mode and not self.config.global_pool_conditions:
            scales = torch.logspace(-1, 0, len(down) + 1 + len(up), device=sample.device) * conditioning_scale
            down = [h * s for h, s in zip(down, scales[: len(down)])]
            mid = mid * scales[len(down)]
            up = [h * s for h, s in zip(up, scales[len(down) + 1:])]
        else:
            down = [h * conditioning_scale for h in down]
            mid = mid * conditioning_scale
            up = [h * conditioning_scale for h in up]

        if self.config.global_pool_conditions:
            down = [h.mean(dim=(2, 3), keepdim=True) for h in down]
            mid = mid.mean(dim=(2, 3), keepdim=True)
            up = [h.mean(dim=(2, 3), keepdim=True) for h in up]

        if not return_dict:
            return down, mid, up
        return BrushNetOutput(down_block_res_samples=down, mid_block_res_sample=mid, up_block_res_samples=up)

    def _embed_time(self, sample, timestep, class_labels, timestep_cond, added_cond_kwargs) -> torch.Tensor:
        timesteps = timestep
        if not torch.is_tensor(timesteps):
            is_mps = sample.device.type == "mps"
            if isinstance(timestep, float):
                dtype = torch.float32 if is_mps else torch.float64
            else:
                dtype = torch.int32 if is_mps else torch.int64
            timesteps = torch.tensor([timesteps], dtype=dtype, device=sample.device)
        elif timesteps.ndim == 0:
            timesteps = timesteps[None].to(sample.device)
        timesteps = timesteps.expand(sample.shape[0])

        # time_proj has no weights and returns float32; the embedding may run in half precision.
        emb = self.time_embedding(self.time_proj(timesteps).to(dtype=sample.dtype), timestep_cond)

        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError("This BrushNet has a class embedding: pass `class_labels`.")
            if self.config.class_embed_type == "timestep":
                class_labels = self.time_proj(class_labels)
            emb = emb + self.class_embedding(class_labels).to(dtype=self.dtype)

        if self.config.addition_embed_type == "text_time":
            if not added_cond_kwargs or "text_embeds" not in added_cond_kwargs or "time_ids" not in added_cond_kwargs:
                raise ValueError(
                    "This is an SDXL BrushNet: pass added_cond_kwargs={'text_embeds': ..., 'time_ids': ...}."
                )
            text_embeds = added_cond_kwargs["text_embeds"]
            time_embeds = self.add_time_proj(added_cond_kwargs["time_ids"].flatten())
            time_embeds = time_embeds.reshape((text_embeds.shape[0], -1))
            add_embeds = torch.cat([text_embeds, time_embeds], dim=-1).to(emb.dtype)
            emb = emb + self.add_embedding(add_embeds)
        return emb

    @property
    def has_attention(self) -> bool:
        """True for a PowerPaint branch, whose blocks keep the UNet's cross-attention."""
        types = (*self.config.down_block_types, self.config.mid_block_type, *self.config.up_block_types)
        return any(t in (ATTENTION_DOWN, ATTENTION_MID, ATTENTION_UP) for t in types)

    def _up_block(self, block, hidden, skips, emb, upsample_size, outputs, text=None) -> torch.Tensor:
        # The up blocks' forward returns only their final state; the branch needs every layer's output.
        checkpoint = torch.is_grad_enabled() and block.gradient_checkpointing
        attentions = block.attentions if text is not None else [None] * len(block.resnets)
        for resnet, attention in zip(block.resnets, attentions):
            hidden = torch.cat([hidden, skips.pop()], dim=1)
            hidden = block._gradient_checkpointing_func(resnet, hidden, emb) if checkpoint else resnet(hidden, emb)
            if attention is not None:
                hidden = attention(hidden, return_dict=False, **text)[0]
            outputs.append(hidden)
        if block.upsamplers is not None:
            for upsampler in block.upsamplers:
                hidden = upsampler(hidden, upsample_size)
            outputs.append(hidden)
        return hidden


def _check_config(down_block_types, mid_block_type, up_block_types, block_out_channels, encoder_hid_dim,
                  encoder_hid_dim_type, addition_embed_type, channel_order) -> None:
    unknown = ({t for t in down_block_types if t not in ("DownBlock2D", ATTENTION_DOWN)}
               | {t for t in up_block_types if t not in ("UpBlock2D", ATTENTION_UP)})
    if mid_block_type not in ("MidBlock2D", "UNetMidBlock2D", ATTENTION_MID):
        unknown.add(mid_block_type)
    if unknown:
        raise ValueError(
            f"Unknown BrushNet block types {sorted(map(str, unknown))}: a BrushNet has DownBlock2D/UpBlock2D, "
            f"a PowerPaint branch also {ATTENTION_DOWN}/{ATTENTION_MID}/{ATTENTION_UP}."
        )
    if not len(down_block_types) == len(up_block_types) == len(block_out_channels):
        raise ValueError("down_block_types, up_block_types and block_out_channels must have the same length.")
    if encoder_hid_dim is not None or encoder_hid_dim_type is not None:
        raise ValueError("BrushNet configs with encoder_hid_dim are not supported (no released branch has one).")
    if addition_embed_type not in (None, "text_time"):
        raise ValueError(f"addition_embed_type {addition_embed_type!r} is not supported (only None and 'text_time').")
    if channel_order not in ("rgb", "bgr"):
        raise ValueError(f"Unknown brushnet_conditioning_channel_order {channel_order!r}: use 'rgb' or 'bgr'.")
