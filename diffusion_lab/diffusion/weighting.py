"""Loss weightings λ(t): how much each noise level counts in the training loss.

The loss is ``mean_b λ(t_b) · ‖target_b − prediction_b‖²`` on the network's own target (ε, x₀ or v). The
weightings other than ``uniform`` are defined on the ε-MSE, and converted to the target's MSE with the exact
relations at fixed x_t (SNR = ᾱ/(1−ᾱ)):

    ‖ε − ε̂‖² = SNR · ‖x₀ − x̂₀‖² = SNR/(1+SNR) · ‖v − v̂‖²

so λ = λ_ε(SNR) · c, with c = 1 (epsilon), SNR (sample), SNR/(1+SNR) (v_prediction). This is what makes
them "the same weighting" whatever the network predicts.

======== ======================== ============= ===================== ==========================
name     λ_ε (on ‖ε − ε̂‖²)        ε-prediction  x₀-prediction         v-prediction
======== ======================== ============= ===================== ==========================
uniform  (plain MSE on the target) 1            1                     1
snr      1  (= SNR on ‖x₀−x̂₀‖²)   1             SNR                   SNR/(1+SNR)
min_snr  min(1, γ/SNR)            min(1, γ/SNR) min(SNR, γ)           min(SNR, γ)/(1+SNR)
p2       (k + SNR)^−γ             (k+SNR)^−γ    SNR·(k+SNR)^−γ        SNR/(1+SNR)·(k+SNR)^−γ
======== ======================== ============= ===================== ==========================

``uniform`` is Ho et al.'s L_simple for ε-prediction; ``snr`` is L_simple for any parameterisation (for
ε-prediction the two coincide); ``min_snr`` is Hang et al. 2023 (γ = 5) and ``snr`` is its γ → ∞ limit;
``p2`` is Choi et al. 2022 (γ = 1, k = 1), which is ``snr`` at γ = 0.
"""

from __future__ import annotations

import torch

from diffusion_lab.diffusion.process import GaussianDiffusion, check_prediction_type

WEIGHTING_NAMES = ("uniform", "snr", "min_snr", "p2")


def eps_mse_per_target_mse(snr: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """c(SNR) with ‖ε − ε̂‖² = c · ‖target − prediction‖² for the given prediction type."""
    check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return torch.ones_like(snr)
    if prediction_type == "sample":
        return snr
    return snr / (1.0 + snr)


class LossWeighting:
    """A weighting defined on the ε-MSE: subclasses give λ_ε(SNR)."""

    name = "base"

    def eps_weight(self, snr: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, diffusion: GaussianDiffusion, t: torch.Tensor) -> torch.Tensor:
        """Per-sample weights (float64, shaped like ``t``) on the MSE of the prediction type's target."""
        snr = diffusion.table("snr", t.device)[t]
        return self.eps_weight(snr) * eps_mse_per_target_mse(snr, diffusion.prediction_type)

    def __repr__(self) -> str:
        params = ", ".join(f"{key}={value}" for key, value in vars(self).items())
        return f"{type(self).__name__}({params})"


class UniformWeighting(LossWeighting):
    """λ = 1 on the network's own target: L_simple = ‖ε − ε̂‖² for ε-prediction (Ho et al. 2020), plain
    ‖v − v̂‖² or ‖x₀ − x̂₀‖² otherwise."""

    name = "uniform"

    def __call__(self, diffusion: GaussianDiffusion, t: torch.Tensor) -> torch.Tensor:
        return torch.ones(t.shape, dtype=torch.float64, device=t.device)


class SNRWeighting(LossWeighting):
    """SNR(t) on the x₀-MSE, i.e. λ_ε = 1: the ε-space L_simple whatever the network predicts."""

    name = "snr"

    def eps_weight(self, snr: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(snr)


class MinSNRWeighting(LossWeighting):
    """Min-SNR-γ (Hang et al. 2023): min(SNR, γ) on the x₀-MSE, i.e. λ_ε = min(1, γ/SNR); caps the weight of
    the nearly clean steps, whose gradients conflict with the rest."""

    name = "min_snr"

    def __init__(self, gamma: float = 5.0) -> None:
        if not gamma > 0:
            raise ValueError(f"min_snr gamma={gamma!r} must be > 0 (Hang et al. use 5).")
        self.gamma = float(gamma)

    def eps_weight(self, snr: torch.Tensor) -> torch.Tensor:
        # min(1, γ/SNR) stays finite at SNR = 0 (zero terminal SNR), where min(SNR, γ)/SNR is 0/0.
        return torch.clamp(self.gamma / snr, max=1.0)


class P2Weighting(LossWeighting):
    """Perception-prioritised weighting (Choi et al. 2022): λ_ε = (k + SNR)^−γ, which down-weights the nearly
    clean steps relative to L_simple; γ = 0 gives back ``snr``."""

    name = "p2"

    def __init__(self, gamma: float = 1.0, k: float = 1.0) -> None:
        if gamma < 0:
            raise ValueError(f"p2 gamma={gamma!r} must be >= 0 (Choi et al. use 0.5 or 1).")
        if not k > 0:
            raise ValueError(f"p2 k={k!r} must be > 0 (Choi et al. use 1).")
        self.gamma = float(gamma)
        self.k = float(k)

    def eps_weight(self, snr: torch.Tensor) -> torch.Tensor:
        return (self.k + snr) ** -self.gamma


_WEIGHTINGS: dict[str, type[LossWeighting]] = {
    "uniform": UniformWeighting,
    "snr": SNRWeighting,
    "min_snr": MinSNRWeighting,
    "p2": P2Weighting,
}


def make_loss_weighting(name: str, **kwargs: float) -> LossWeighting:
    """A weighting by name: ``uniform``, ``snr``, ``min_snr`` (gamma), ``p2`` (gamma, k)."""
    if name not in _WEIGHTINGS:
        raise ValueError(f"Unknown loss_weighting {name!r}; valid choices: {', '.join(WEIGHTING_NAMES)}.")
    try:
        return _WEIGHTINGS[name](**kwargs)
    except TypeError as error:
        raise ValueError(f"loss_weighting {name!r} got unexpected arguments {sorted(kwargs)}.") from error
