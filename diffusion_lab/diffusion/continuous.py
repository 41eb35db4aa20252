"""Continuous-time objectives: a Gaussian path x_τ = α(τ) x₀ + s(τ) ε over a real noise level τ, the distribution
τ is drawn from in training, what the network sees, and what its output means.

DDPM's process (``process.GaussianDiffusion``) walks T discrete timesteps of a β schedule. EDM (``edm.py``,
τ = σ) and flow matching (``flow_matching.py``, τ = t ∈ [0, 1]) are continuous: each owns its path, its training
distribution of τ and its preconditioning, so no β schedule enters. Both share the probability-flow ODE
dx/dτ = (x − x̂₀)/τ in their own state variable (EDM: x = x₀ + σε; flow matching: x_t = (1 − t)x₀ + tε), which is
what the samplers in ``samplers/continuous.py`` integrate.

Coefficients are computed in float64 and cast to the data's dtype where they are used.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch

# The U-Net's sinusoidal time embedding is tuned to DDPM's timestep range, 0…999: continuous noise inputs are put
# on the same scale (flow matching: 1000·t; EDM: 1000 × its c_noise = ln(σ)/4).
NOISE_INPUT_SCALE = 1000.0


def as_column(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-sample values (B,) shaped (B, 1, …, 1) in ``like``'s dtype and device, to broadcast over images."""
    return values.to(device=like.device, dtype=like.dtype).reshape(values.shape + (1,) * (like.ndim - values.ndim))


class TimestepTables:
    """Named per-timestep tables indexed by a batch's timesteps, each copied to a device once: a training step
    indexes them where its timesteps are (no host sync, no copy per step)."""

    def __init__(self, **tables: torch.Tensor) -> None:
        self._tables = tables
        self._on_device: dict[tuple[str, torch.device], torch.Tensor] = {}

    def column(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """table[t] per sample, shaped (B, 1, …, 1) in ``like``'s dtype and device."""
        key = (name, t.device)
        if key not in self._on_device:
            self._on_device[key] = self._tables[name].to(t.device)
        return as_column(self._on_device[key][t], like)


def standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


class ContinuousObjective(ABC):
    """What training and sampling need of a continuous objective. ``tau`` is a (B,) tensor of noise levels."""

    name: str
    # The level the samplers start from (the prior's) when the grid does not say otherwise.
    tau_max: float

    # -- the path ----------------------------------------------------------------------------------------

    @abstractmethod
    def alpha(self, tau: torch.Tensor) -> torch.Tensor:
        """Signal scale α(τ) (float64)."""

    @abstractmethod
    def noise_std(self, tau: torch.Tensor) -> torch.Tensor:
        """Noise scale s(τ) (float64)."""

    def noisy(self, x0: torch.Tensor, noise: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        """x_τ = α(τ) x₀ + s(τ) ε."""
        return as_column(self.alpha(tau), x0) * x0 + as_column(self.noise_std(tau), x0) * noise

    # -- training ----------------------------------------------------------------------------------------

    @abstractmethod
    def sample_tau(self, count: int, device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
        """Noise levels drawn from the training distribution (float32, on ``device``)."""

    @abstractmethod
    def tau_quantile(self, tau: torch.Tensor) -> torch.Tensor:
        """The training distribution's CDF at τ: uniform in [0, 1] under training, low noise first. The loss is
        logged in equal ranges of it (``train/loss_t{k}``), so each range holds the same share of the batches."""

    @abstractmethod
    def network_input(self, x: torch.Tensor, tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(image, noise input) the network is called with at state x and level τ."""

    @abstractmethod
    def per_sample_loss(
        self, output: torch.Tensor, x0: torch.Tensor, x: torch.Tensor, noise: torch.Tensor, tau: torch.Tensor
    ) -> torch.Tensor:
        """The objective's weighted squared error of the network output, one value per sample (mean over pixels)."""

    # -- sampling ----------------------------------------------------------------------------------------

    @abstractmethod
    def denoised(self, output: torch.Tensor, x: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        """x̂₀ implied by the network output at state x."""

    def ode_velocity(self, x: torch.Tensor, denoised: torch.Tensor, tau: float) -> torch.Tensor:
        """dx/dτ of the probability-flow ODE given x̂₀: (x − x̂₀)/τ for both EDM's and flow matching's path."""
        return (x - denoised) / tau

    def prior(self, noise: torch.Tensor, tau: float) -> torch.Tensor:
        """The state at level τ drawn from the prior: s(τ) ε (the data's share α(τ)x₀ is negligible there, or 0)."""
        return float(self.noise_std(torch.tensor([tau], dtype=torch.float64))) * noise

    def display(self, x: torch.Tensor, tau: float) -> torch.Tensor:
        """The state as an image on the data's scale, x/√(α² + s²), for trajectory pictures."""
        level = torch.tensor([tau], dtype=torch.float64)
        return x / math.sqrt(float(self.alpha(level) ** 2 + self.noise_std(level) ** 2))
