"""The ε-network: a time-conditioned U-Net in the design of Ho et al. (2020) and Dhariwal & Nichol (2021)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from diffusion_lab.models.blocks import AttentionBlock, Downsample, ResBlock, Upsample, group_norm, zero_init
from diffusion_lab.models.embeddings import LabelEmbedding, TimestepEmbedding


class UNet(nn.Module):
    """ε_θ(x_t, t[, y]): an encoder–decoder with skip connections, residual blocks at every level,
    self-attention at the chosen resolutions and in the middle, and the timestep (plus an optional class
    label) embedded and injected into every residual block.

    Args:
        image_size: side of the (square) input; must be divisible by 2^(len(channel_mult) − 1).
        in_channels: 1 (grey) or 3 (RGB); ``out_channels`` defaults to it.
        model_channels: width of the first level; level i has ``model_channels * channel_mult[i]``.
        num_res_blocks: residual blocks per level on the way down (one more on the way up).
        attention_resolutions: pixel sizes at which to add self-attention (16 = "at the 16×16 level").
        num_classes: enables class conditioning, with label index ``num_classes`` as the null label.
        num_heads / num_head_channels: attention heads (a fixed count, or a fixed width per head).
        scale_shift: inject the time embedding as a GroupNorm scale and shift instead of adding it.
        channels_last: keep weights and activations in NHWC memory order. "auto" (the default) does so where it
            was measured faster: on CPUs (oneDNN), not on CUDA, where cuDNN's NCHW path trained the CIFAR-10
            network 1.26× faster in bf16 on an H200 (README); the layout follows the weights' device on ``.to()``.
        gradient_checkpointing: recompute block activations in the backward pass to save memory.
        winograd: let wide residual-block convolutions take the Winograd weight gradient in float32 training
            on AVX2 CPUs, where it is faster (see ``diffusion_lab.models.kernels.winograd``); False keeps the stock
            kernels everywhere.
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int = 1,
        model_channels: int = 64,
        channel_mult: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (16,),
        dropout: float = 0.0,
        num_classes: int | None = None,
        out_channels: int | None = None,
        num_heads: int = 1,
        num_head_channels: int | None = None,
        scale_shift: bool = False,
        norm_groups: int = 32,
        channels_last: bool | str = "auto",
        gradient_checkpointing: bool = False,
        winograd: bool = True,
    ) -> None:
        super().__init__()
        channel_mult = tuple(channel_mult)
        levels = [image_size // 2**i for i in range(len(channel_mult))]
        _check_geometry(image_size, channel_mult, levels, tuple(attention_resolutions))
        self.image_size = image_size
        self.in_channels = in_channels
        self.out_channels = out_channels or in_channels
        self.num_classes = num_classes
        self.downsampling_factor = 2 ** (len(channel_mult) - 1)
        if channels_last not in (True, False, "auto"):
            raise ValueError(
                f"channels_last={channels_last!r} is not a layout; set model.channels_last to auto (NHWC on CPUs, "
                "NCHW on CUDA), true or false."
            )
        self.channels_last = channels_last
        self.gradient_checkpointing = gradient_checkpointing

        embed_dim = 4 * model_channels
        self.time_embedding = TimestepEmbedding(model_channels, embed_dim)
        self.label_embedding = LabelEmbedding(num_classes, embed_dim) if num_classes else None

        def attention(channels: int) -> AttentionBlock:
            heads = channels // num_head_channels if num_head_channels else num_heads
            return AttentionBlock(channels, heads, norm_groups)

        def resblock(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, cout, embed_dim, dropout, scale_shift, norm_groups, winograd)

        self.input_conv = nn.Conv2d(in_channels, model_channels, 3, padding=1)
        self.down = nn.ModuleList()
        skip_channels = [model_channels]
        channels = model_channels
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [resblock(channels, model_channels * mult)]
                channels = model_channels * mult
                if levels[level] in attention_resolutions:
                    layers.append(attention(channels))
                self.down.append(nn.ModuleList(layers))
                skip_channels.append(channels)
            if level < len(channel_mult) - 1:
                self.down.append(nn.ModuleList([Downsample(channels)]))
                skip_channels.append(channels)

        self.middle = nn.ModuleList([resblock(channels, channels), attention(channels), resblock(channels, channels)])

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for block in range(num_res_blocks + 1):
                layers = [resblock(channels + skip_channels.pop(), model_channels * mult)]
                channels = model_channels * mult
                if levels[level] in attention_resolutions:
                    layers.append(attention(channels))
                if level > 0 and block == num_res_blocks:
                    layers.append(Upsample(channels))
                self.up.append(nn.ModuleList(layers))

        self.output = nn.Sequential(
            group_norm(channels, norm_groups),
            nn.SiLU(),
            zero_init(nn.Conv2d(channels, self.out_channels, 3, padding=1)),
        )
        self._match_memory_format()

    def _uses_channels_last(self, device: torch.device) -> bool:
        return self.channels_last is True or (self.channels_last == "auto" and device.type == "cpu")

    def _match_memory_format(self) -> None:
        """Put the 4-d weights in the layout this device gets (convolutions run in the weights' format)."""
        device = self.input_conv.weight.device
        layout = torch.channels_last if self._uses_channels_last(device) else torch.contiguous_format
        super()._apply(lambda t: t.contiguous(memory_format=layout) if t.dim() == 4 else t)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> UNet:
        # .to(device), .cuda(), .cpu() all come through here: re-match the layout to the new device.
        module = super()._apply(fn, recurse)
        if self.channels_last == "auto":
            self._match_memory_format()
        return module

    @property
    def null_label(self) -> int | None:
        """The label index that means "no label" (for classifier-free guidance), or None if unconditional."""
        return self.label_embedding.null_label if self.label_embedding is not None else None

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Predict the network's target (ε, x₀ or v) for noisy images ``x`` (B, C, H, W) at timesteps ``t``."""
        height, width = x.shape[-2:]
        if height % self.downsampling_factor or width % self.downsampling_factor:
            raise ValueError(
                f"Input of {height}×{width} pixels is not divisible by this U-Net's downsampling factor "
                f"{self.downsampling_factor}; resize the data (data.image_size) or use fewer channel_mult levels."
            )
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        embedding = self.time_embedding(t)
        if self.label_embedding is not None:
            embedding = embedding + self.label_embedding(y, x.shape[0], x.device)
        elif y is not None:
            raise ValueError("This U-Net is unconditional (num_classes unset) but labels y were given.")

        if self._uses_channels_last(x.device):
            x = x.contiguous(memory_format=torch.channels_last)
        h = self.input_conv(x)
        skips = [h]
        for layers in self.down:
            h = self._run(layers, h, embedding)
            skips.append(h)
        h = self._run(self.middle, h, embedding)
        for layers in self.up:
            h = self._run(layers, torch.cat([h, skips.pop()], dim=1), embedding)
        return self.output(h)

    def _run(self, layers: nn.ModuleList, h: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        for layer in layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(_apply, layer, h, embedding, use_reentrant=False)
            else:
                h = _apply(layer, h, embedding)
        return h


def _apply(layer: nn.Module, h: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
    return layer(h, embedding) if isinstance(layer, ResBlock) else layer(h)


def _check_geometry(
    image_size: int, channel_mult: tuple[int, ...], levels: list[int], attention_resolutions: tuple[int, ...]
) -> None:
    factor = 2 ** (len(channel_mult) - 1)
    if image_size <= 0 or image_size % factor:
        raise ValueError(
            f"image_size={image_size} is not divisible by 2^(levels−1) = {factor} for "
            f"channel_mult={list(channel_mult)}; use an image_size that is a multiple of {factor} or fewer levels."
        )
    unknown = [r for r in attention_resolutions if r not in levels]
    if unknown:
        raise ValueError(
            f"attention_resolutions={list(attention_resolutions)} includes {unknown}, which are not levels of this "
            f"U-Net at image_size={image_size} (its levels are {levels}); pick from those."
        )


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
