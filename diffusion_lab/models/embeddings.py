"""Conditioning embeddings: the diffusion timestep and the (optional) class label."""

from __future__ import annotations

import math

import torch
from torch import nn


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Transformer-style features of the timestep: [cos(t ω_k), sin(t ω_k)] with ω_k = max_period^(−k/half).

    Always float32 (t up to 1000 times ω needs the mantissa), shape (B, dim).
    """
    half = dim // 2
    frequencies = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * frequencies[None]
    embedding = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    if dim % 2:
        embedding = torch.nn.functional.pad(embedding, (0, 1))
    return embedding


class TimestepEmbedding(nn.Module):
    """Sinusoidal features → Linear → SiLU → Linear, as in DDPM: the vector every residual block reads."""

    def __init__(self, feature_dim: int, embed_dim: int) -> None:
        super().__init__()
        self.feature_dim = feature_dim
        self.mlp = nn.Sequential(nn.Linear(feature_dim, embed_dim), nn.SiLU(), nn.Linear(embed_dim, embed_dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        features = sinusoidal_embedding(t, self.feature_dim)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class LabelEmbedding(nn.Module):
    """A learned vector per class plus one extra "null" label (index ``num_classes``), added to the time
    embedding. Training replaces labels by the null label at random, so one network also learns the
    unconditional model that classifier-free guidance subtracts."""

    def __init__(self, num_classes: int, embed_dim: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, embed_dim)

    @property
    def null_label(self) -> int:
        return self.num_classes

    def forward(self, y: torch.Tensor | None, batch_size: int, device: torch.device) -> torch.Tensor:
        if y is None:
            y = torch.full((batch_size,), self.null_label, device=device, dtype=torch.long)
        return self.table(y)
