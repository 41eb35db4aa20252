"""The U-Net's building blocks: residual blocks with time conditioning, self-attention, resampling."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diffusion_lab.models.kernels.winograd import Conv3x3


def group_norm(channels: int, max_groups: int = 32, min_group_channels: int = 4) -> nn.GroupNorm:
    """GroupNorm with the most groups (≤ ``max_groups``) that divide ``channels`` into groups of at least
    ``min_group_channels``. With one channel per group, the normalisation would subtract exactly the
    per-channel constant that an additive time or label embedding adds, erasing the conditioning."""
    groups = max(
        g for g in range(1, max_groups + 1) if channels % g == 0 and channels // g >= min(min_group_channels, channels)
    )
    return nn.GroupNorm(groups, channels, eps=1e-6)


def zero_init(module: nn.Module) -> nn.Module:
    """Zero a layer's weights so its residual branch starts as the identity (DDPM's init_scale=0)."""
    for parameter in module.parameters():
        nn.init.zeros_(parameter)
    return module


class ResBlock(nn.Module):
    """GroupNorm → SiLU → conv, time embedding injected, GroupNorm → SiLU → dropout → conv, plus a skip.

    ``scale_shift`` injects the embedding as GN(h)·(1 + scale) + shift (Dhariwal & Nichol); otherwise it
    is added to the activations (Ho et al.).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        embed_dim: int,
        dropout: float = 0.0,
        scale_shift: bool = False,
        norm_groups: int = 32,
        winograd: bool = True,
    ) -> None:
        super().__init__()
        self.scale_shift = scale_shift
        self.norm1 = group_norm(in_channels, norm_groups)
        self.conv1 = Conv3x3(in_channels, out_channels, winograd)
        self.embed = nn.Linear(embed_dim, out_channels * (2 if scale_shift else 1))
        self.norm2 = group_norm(out_channels, norm_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(Conv3x3(out_channels, out_channels, winograd))
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        conditioning = self.embed(F.silu(embedding))[:, :, None, None].to(h.dtype)
        if self.scale_shift:
            scale, shift = conditioning.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + conditioning)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over all pixels, through ``scaled_dot_product_attention``.

    It works on (B, H·W, C) tokens, which a channels-last feature map already is in memory, so no layout
    copy is needed on the way in or out.
    """

    def __init__(self, channels: int, num_heads: int = 1, norm_groups: int = 32) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide the {channels} channels at this level.")
        self.num_heads = num_heads
        self.norm = group_norm(channels, norm_groups)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = zero_init(nn.Linear(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        tokens = self.norm(x).permute(0, 2, 3, 1).reshape(batch, height * width, channels)
        qkv = self.qkv(tokens).reshape(batch, height * width, 3, self.num_heads, channels // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, HW, head_dim)
        attended = F.scaled_dot_product_attention(q, k, v)
        attended = attended.transpose(1, 2).reshape(batch, height * width, channels)
        out = self.proj(attended).reshape(batch, height, width, channels).permute(0, 3, 1, 2)
        return x + out


class Downsample(nn.Module):
    """Stride-2 3×3 convolution (halves H and W)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour ×2 followed by a 3×3 convolution, computed without the upsampled map.

    Each of the four output phases (even/odd row × even/odd column) of that composite sees the
    low-resolution input through a 2×2 window whose taps are sums of the 3×3 taps, so one 2×2 convolution
    with 4× the output channels computes all phases: the same parameters and the same function as
    ``conv3x3(upsample(x))``, with 16/36 of its multiply-adds.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def phase_weights(self) -> torch.Tensor:
        """(4·C_out, C_in, 2, 2) kernels for phases (0,0), (0,1), (1,0), (1,1) of the upsampled output."""
        w = self.conv.weight
        # Along one axis, the even phase reads input offsets (−1, 0) with taps (w0, w1 + w2) and the odd
        # phase reads (0, +1) with taps (w0 + w1, w2).
        rows = [torch.stack(pair, dim=2) for pair in _fold_taps(w[:, :, 0], w[:, :, 1], w[:, :, 2])]
        phases = []
        for row in rows:
            phases += [torch.stack(pair, dim=3) for pair in _fold_taps(row[..., 0], row[..., 1], row[..., 2])]
        return torch.cat(phases, dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv2d(F.pad(x, (1, 1, 1, 1)), self.phase_weights(), self.conv.bias.repeat(4))
        return _InterleavePhases.apply(y)


class _InterleavePhases(torch.autograd.Function):
    """(B, 4C, H+1, W+1) phase maps → (B, C, 2H, 2W) image, with phase (a, b) read at offset (a, b).

    Written by hand because autograd's backward of the four strided slice copies zero-fills a full-size
    gradient per slice; this one fills once.
    """

    @staticmethod
    def forward(ctx, y: torch.Tensor) -> torch.Tensor:
        batch, channels4, height1, width1 = y.shape
        channels, height, width = channels4 // 4, height1 - 1, width1 - 1
        ctx.shape = (batch, channels, height, width)
        phases = y.permute(0, 2, 3, 1).unflatten(3, (2, 2, channels))
        out = y.new_empty(batch, height, 2, width, 2, channels)
        for a in (0, 1):
            for b in (0, 1):
                out[:, :, a, :, b] = phases[:, a : a + height, b : b + width, a, b]
        return out.view(batch, 2 * height, 2 * width, channels).permute(0, 3, 1, 2)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = ctx.shape
        grad = grad_out.permute(0, 2, 3, 1).reshape(batch, height, 2, width, 2, channels)
        grad_y = grad_out.new_zeros(batch, height + 1, width + 1, 2, 2, channels)
        for a in (0, 1):
            for b in (0, 1):
                grad_y[:, a : a + height, b : b + width, a, b] = grad[:, :, a, :, b]
        return grad_y.view(batch, height + 1, width + 1, 4 * channels).permute(0, 3, 1, 2)


def _fold_taps(
    w0: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The 2-tap kernels that 3 taps become after nearest ×2 upsampling: (even phase, odd phase)."""
    return (w0, w1 + w2), (w0 + w1, w2)
