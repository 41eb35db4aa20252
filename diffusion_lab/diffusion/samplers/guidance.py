"""Classifier-free guidance (Ho & Salimans 2021)."""

from __future__ import annotations

import torch

from diffusion_lab.diffusion.samplers.chain import ModelFn


def classifier_free_guidance(
    model_fn_cond: ModelFn, model_fn_uncond: ModelFn, w: float, guided_channels: int | None = None
) -> ModelFn:
    """ε̃ = (1 + w) ε_c − w ε_∅: w = 0 is the plain conditional model, larger w trades diversity for
    fidelity to the label. (diffusers' ``guidance_scale`` s is 1 + w.) Works on any prediction type's
    output, since the combination is linear. With ``guided_channels`` only those leading channels are guided and
    the rest (a learned variance) is the conditional model's, as in GLIDE."""
    if w < 0:
        raise ValueError(f"guidance weight w={w!r} must be >= 0 (0 = no guidance).")

    def guided(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        conditional = model_fn_cond(x_t, t)
        if w == 0:
            return conditional
        guided = (1.0 + w) * conditional - w * model_fn_uncond(x_t, t)
        if guided_channels is None:
            return guided
        return torch.cat([guided[:, :guided_channels], conditional[:, guided_channels:]], dim=1)

    return guided
