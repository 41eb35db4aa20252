"""Noise schedules: the fixed β_t of the forward chain q(x_t | x_{t-1}) = N(√(1-β_t) x_{t-1}, β_t I).

Timesteps are 0-indexed: index t is step t+1 of Ho et al. and of the course notes, so
``alphas_cumprod[t] = ∏_{s≤t} (1 - betas[s])``. Everything is float64: ᾱ_t near 0 and 1 loses digits in
float32, and every coefficient the process and samplers use is derived from these tables.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

SCHEDULE_NAMES = ("linear", "scaled_linear", "cosine", "sigmoid", "constant")


def _check_open_unit_interval(name: str, value: float) -> None:
    if not (0.0 < value < 1.0):
        raise ValueError(f"{name}={value!r} is outside (0, 1); choose a value strictly between 0 and 1.")


def _check_num_timesteps(num_train_timesteps: int) -> None:
    if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, int):
        raise ValueError(f"num_train_timesteps={num_train_timesteps!r} must be a positive integer, e.g. 1000.")
    if num_train_timesteps <= 0:
        raise ValueError(f"num_train_timesteps={num_train_timesteps} must be a positive integer, e.g. 1000.")


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """A β schedule and the quantities derived from it (all float64, 1-D, length T).

    Build one with :func:`make_schedule` or :meth:`from_betas`; the tensors are read-only data, never
    parameters, so they stay out of optimisers and weight averages.
    """

    betas: torch.Tensor

    def __post_init__(self) -> None:
        betas = self.betas
        if betas.ndim != 1 or betas.numel() == 0:
            raise ValueError(f"betas must be a non-empty 1-D tensor, got shape {tuple(betas.shape)}.")
        if not torch.isfinite(betas).all():
            raise ValueError("betas contain NaN or Inf; every β_t must be a finite number in (0, 1).")
        # β = 1 is allowed only as the last step: it is how a zero-terminal-SNR schedule ends.
        is_last = torch.arange(betas.numel()) == betas.numel() - 1
        bad = (betas <= 0) | (betas > 1) | ((betas == 1) & ~is_last)
        if bad.any():
            i = int(bad.nonzero()[0])
            raise ValueError(
                f"betas[{i}]={betas[i].item()!r} is outside (0, 1); every β_t must lie strictly between "
                "0 and 1 (only the final β may equal 1, for a zero-terminal-SNR schedule)."
            )

    @classmethod
    def from_betas(cls, betas: torch.Tensor | list[float]) -> NoiseSchedule:
        """A schedule from explicit β values (copied to float64)."""
        return cls(torch.as_tensor(betas, dtype=torch.float64).detach().clone())

    @property
    def num_train_timesteps(self) -> int:
        return self.betas.numel()

    @property
    def alphas(self) -> torch.Tensor:
        """α_t = 1 - β_t, the per-step signal retention."""
        return 1.0 - self.betas

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """ᾱ_t = ∏_{s≤t} α_s: x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε."""
        return torch.cumprod(self.alphas, dim=0)

    @property
    def alphas_cumprod_prev(self) -> torch.Tensor:
        """ᾱ_{t-1}, with ᾱ_{-1} = 1 (the clean data) before the first step."""
        return torch.cat([self.alphas_cumprod.new_ones(1), self.alphas_cumprod[:-1]])

    @property
    def snr(self) -> torch.Tensor:
        """Signal-to-noise ratio ᾱ_t / (1 - ᾱ_t); decreasing in t."""
        alphas_cumprod = self.alphas_cumprod
        return alphas_cumprod / (1.0 - alphas_cumprod)

    @property
    def log_snr(self) -> torch.Tensor:
        """log ᾱ_t - log(1 - ᾱ_t), the natural axis for comparing schedules (−inf at zero terminal SNR)."""
        alphas_cumprod = self.alphas_cumprod
        return torch.log(alphas_cumprod) - torch.log1p(-alphas_cumprod)

    def respace(self, timesteps: torch.Tensor) -> NoiseSchedule:
        """The shorter chain that visits only ``timesteps`` (any order, unique indices).

        Its k-th step goes from ᾱ of the k-th smallest index to that of the next, so that
        ``respace(ts).alphas_cumprod == alphas_cumprod[sorted(ts)]``: the construction of Nichol & Dhariwal
        that lets DDPM, DDIM and DPM-Solver run on any subset of the training timesteps.
        """
        kept = torch.as_tensor(timesteps, dtype=torch.long).sort().values
        if kept.numel() == 0 or kept.unique().numel() != kept.numel():
            raise ValueError(f"respace needs unique timesteps, got {kept.tolist()}.")
        if kept[0] < 0 or kept[-1] >= self.num_train_timesteps:
            raise ValueError(
                f"timesteps must lie in [0, {self.num_train_timesteps - 1}], got {kept[0].item()}..{kept[-1].item()}."
            )
        kept_cumprod = self.alphas_cumprod[kept]
        previous = torch.cat([kept_cumprod.new_ones(1), kept_cumprod[:-1]])
        return NoiseSchedule.from_betas(1.0 - kept_cumprod / previous)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift and scale √ᾱ so that ᾱ_{T-1} = 0 while ᾱ_0 is kept (Lin et al. 2024, "Common diffusion noise
    schedules and sample steps are flawed"); training then sees pure noise at the last step, as sampling does.
    """
    sqrt_cumprod = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_cumprod[0].clone(), sqrt_cumprod[-1].clone()
    sqrt_cumprod = (sqrt_cumprod - last) * first / (first - last)
    cumprod = sqrt_cumprod**2
    alphas = torch.cat([cumprod[:1], cumprod[1:] / cumprod[:-1]])
    return 1.0 - alphas


def _cosine_alpha_bar(step_fraction: torch.Tensor, s: float) -> torch.Tensor:
    return torch.cos((step_fraction + s) / (1.0 + s) * math.pi / 2.0) ** 2


def _betas_linear(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    _check_open_unit_interval("beta_start", beta_start)
    _check_open_unit_interval("beta_end", beta_end)
    return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)


def _betas_scaled_linear(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    _check_open_unit_interval("beta_start", beta_start)
    _check_open_unit_interval("beta_end", beta_end)
    return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2


def _betas_cosine(T: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal's ᾱ(t) = cos²((t/T + s)/(1 + s) · π/2), β clipped at max_beta (diffusers'
    ``squaredcos_cap_v2``)."""
    if s < 0:
        raise ValueError(f"s={s!r} must be >= 0 (Nichol & Dhariwal use 0.008).")
    _check_open_unit_interval("max_beta", max_beta)
    steps = torch.arange(T + 1, dtype=torch.float64) / T
    alpha_bar = _cosine_alpha_bar(steps, s)
    return torch.clamp(1.0 - alpha_bar[1:] / alpha_bar[:-1], max=max_beta)


def _betas_sigmoid(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    _check_open_unit_interval("beta_start", beta_start)
    _check_open_unit_interval("beta_end", beta_end)
    ramp = torch.sigmoid(torch.linspace(-6.0, 6.0, T, dtype=torch.float64))
    return ramp * (beta_end - beta_start) + beta_start


def _betas_constant(T: int, beta: float = 0.02) -> torch.Tensor:
    _check_open_unit_interval("beta", beta)
    return torch.full((T,), float(beta), dtype=torch.float64)


_BETA_FUNCTIONS: dict[str, Callable[..., torch.Tensor]] = {
    "linear": _betas_linear,
    "scaled_linear": _betas_scaled_linear,
    "cosine": _betas_cosine,
    "sigmoid": _betas_sigmoid,
    "constant": _betas_constant,
}


def make_schedule(
    name: str,
    num_train_timesteps: int = 1000,
    *,
    rescale_betas_zero_snr: bool = False,
    **kwargs: float,
) -> NoiseSchedule:
    """Build a named schedule.

    - ``linear``: beta_start=1e-4, beta_end=0.02 (Ho et al.)
    - ``scaled_linear``: linear in √β, diffusers' defaults (latent diffusion uses 0.00085 and 0.012)
    - ``cosine``: s=0.008, max_beta=0.999 (Nichol & Dhariwal)
    - ``sigmoid``: beta_start, beta_end; ``constant``: beta

    ``rescale_betas_zero_snr`` makes the final ᾱ exactly 0.
    """
    if name not in _BETA_FUNCTIONS:
        raise ValueError(f"Unknown beta_schedule {name!r}; valid choices: {', '.join(SCHEDULE_NAMES)}.")
    _check_num_timesteps(num_train_timesteps)
    beta_function = _BETA_FUNCTIONS[name]
    try:
        betas = beta_function(num_train_timesteps, **kwargs)
    except TypeError as error:
        accepted = [p for p in inspect.signature(beta_function).parameters if p != "T"]
        raise ValueError(
            f"Schedule {name!r} got unexpected arguments {sorted(kwargs)}; it accepts {accepted}."
        ) from error
    if rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    return NoiseSchedule(betas)
