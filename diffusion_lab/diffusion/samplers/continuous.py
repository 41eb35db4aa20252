"""Samplers for the continuous objectives (EDM, flow matching): the same algorithms as for DDPM, on the objective's
own path x_τ = α(τ)x₀ + s(τ)ε and its natural grid of noise levels.

Grids end at τ = 0, where the state is the clean sample. EDM's natural grid is Karras et al.'s σ spacing
(σ_min 0.002, σ_max 80, ρ 7); flow matching's is uniform in t from 1 (pure noise) to 0, optionally shifted. The
timestep spacings that mean a respaced DDPM chain (``linspace``, ``leading``, ``trailing``) select that natural
grid; ``karras`` and ``log_snr`` select those σ grids on either objective (flow matching's t = σ/(1 + σ)).

- ``euler`` / ``heun``: the probability-flow ODE dx/dτ = (x − x̂₀)/τ, first or second order (Heun's last step,
  to τ = 0, is Euler's: 2N − 1 calls); on EDM with EDM's churn (Algorithm 2) when s_churn > 0. Heun on EDM's grid
  is Algorithm 1.
- ``ddim``: x' = α' x̂₀ + √(s'² − c²) ε̂ + c z with c = η (s'/s) √(s² − (α s'/α')²), which keeps every marginal;
  η = 0 is the ODE's exact first-order step (= Euler), η = 1 the ancestral sampler (``euler_ancestral``).
- ``dpm_solver++``: DPM-Solver++(2M) in λ = log(α/s), exact in the linear part.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from diffusion_lab.diffusion.continuous import ContinuousObjective
from diffusion_lab.diffusion.edm import EDM
from diffusion_lab.diffusion.flow_matching import FlowMatching
from diffusion_lab.diffusion.process import clamp_x0
from diffusion_lab.diffusion.samplers.chain import Generator, ModelFn, TrajectoryStep, randn
from diffusion_lab.diffusion.samplers.euler import Churn
from diffusion_lab.diffusion.samplers.options import DEFAULT_NUM_STEPS, check_spacing, check_steps_eta_churn
from diffusion_lab.diffusion.samplers.sigmas import SIGMA_SPACINGS

CONTINUOUS_SAMPLERS = ("euler", "heun", "dpm_solver++", "ddim", "euler_ancestral")
# Where a σ grid on flow matching's path stops and starts, as on EDM's (t = σ/(1 + σ)).
FLOW_SIGMA_MIN, FLOW_SIGMA_MAX = 0.002, 80.0


def continuous_grid(
    objective: ContinuousObjective,
    num_steps: int,
    spacing: str,
    rho: float = 7.0,
    sigma_max: float | None = None,
    shift: float = 1.0,
) -> list[float]:
    """The decreasing noise levels τ_0 > … > τ_{N−1} > τ_N = 0 a sampler walks."""
    if isinstance(objective, EDM):
        if spacing == "log_snr":
            return objective.log_sigmas(num_steps, sigma_max)
        return objective.karras_sigmas(num_steps, rho, sigma_max)
    if spacing not in SIGMA_SPACINGS:
        return objective.uniform_times(num_steps, shift)
    sigmas = EDM(sigma_min=FLOW_SIGMA_MIN, sigma_max=sigma_max or FLOW_SIGMA_MAX)
    grid = sigmas.log_sigmas(num_steps) if spacing == "log_snr" else sigmas.karras_sigmas(num_steps, rho)
    return [sigma / (1.0 + sigma) for sigma in grid]


def check_continuous_settings(
    objective: ContinuousObjective,
    sampler: str = "ddim",
    num_steps: int | None = None,
    eta: float = 0.0,
    timestep_spacing: str = "trailing",
    variance_type: str | None = None,
    clip_sample: bool | float = False,
    rho: float = 7.0,
    sigma_max: float | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
    shift: float = 1.0,
) -> list[float]:
    """Raise the ValueError sampling would, before it starts; returns the grid."""
    objective_name = f"objective={objective.name}"
    if sampler not in CONTINUOUS_SAMPLERS:
        raise ValueError(
            f"sampler={sampler!r} walks a β schedule's discrete chain, which {objective_name} does not have; use one "
            f"of {', '.join(CONTINUOUS_SAMPLERS)}."
        )
    check_spacing(timestep_spacing)
    steps = DEFAULT_NUM_STEPS[sampler] if num_steps is None else num_steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"num_steps={num_steps!r} must be a positive integer.")
    churn_samplers = ("euler", "heun") if isinstance(objective, EDM) else ()
    churn = Churn(s_churn, s_tmin, s_tmax, s_noise)
    check_steps_eta_churn(sampler, steps, eta, churn, churn_samplers, where=" on objective=edm")
    if variance_type is not None:
        raise ValueError(
            f"variance_type={variance_type} is DDPM's reverse variance; {objective_name} has none, leave it null."
        )
    if not (isinstance(rho, int | float) and math.isfinite(rho) and rho > 0):
        raise ValueError(f"rho={rho!r} must be a positive number (Karras et al. use 7).")
    if not (isinstance(shift, int | float) and math.isfinite(shift) and shift > 0):
        raise ValueError(f"shift={shift!r} must be a positive number (1: no shift; SD3 uses 3).")
    if shift != 1.0 and not (isinstance(objective, FlowMatching) and timestep_spacing not in SIGMA_SPACINGS):
        raise ValueError(f"shift={shift} applies to flow matching's uniform-t grid only; leave shift=1.")
    if sigma_max is not None:
        floor = objective.sigma_min if isinstance(objective, EDM) else FLOW_SIGMA_MIN
        if not (isinstance(sigma_max, int | float) and sigma_max > floor):
            raise ValueError(f"sigma_max={sigma_max!r} must be a number above σ_min = {floor} (EDM uses 80).")
    return continuous_grid(objective, steps, timestep_spacing, rho, sigma_max, shift)


@dataclass
class ContinuousChain:
    """The objective, the grid, and the denoiser x̂₀(x, τ) built from one network call."""

    objective: ContinuousObjective
    taus: list[float]
    clip_sample: bool | float
    trajectory: list[TrajectoryStep] | None = None

    def denoise(self, model_fn: ModelFn, x: torch.Tensor, tau: float, record: bool = True) -> torch.Tensor:
        level = torch.full((x.shape[0],), tau, dtype=torch.float64)
        x_in, noise_input = self.objective.network_input(x, level)
        output = model_fn(x_in, noise_input.to(x.device)).to(x.dtype)
        denoised = clamp_x0(self.objective.denoised(output, x, level), self.clip_sample)
        if record and self.trajectory is not None:
            shown = self.objective.display(x, tau).detach().cpu()
            label = f"σ={tau:.3g}" if isinstance(self.objective, EDM) else f"t={tau:.2f}"
            step = TrajectoryStep(round(float(noise_input[0])), shown, denoised.detach().cpu(), label)
            self.trajectory.append(step)
        return denoised

    def coefficients(self, tau: float) -> tuple[float, float]:
        level = torch.tensor([tau], dtype=torch.float64)
        return float(self.objective.alpha(level)), float(self.objective.noise_std(level))


def heun_loop(
    model_fn: ModelFn,
    chain: ContinuousChain,
    x: torch.Tensor,
    *,
    second_order: bool,
    churn: Churn,
    generator: Generator,
) -> torch.Tensor:
    """Euler, or Heun with the slope at the Euler point averaged in (EDM's Algorithms 1 and 2 on EDM's path)."""
    taus, objective = chain.taus, chain.objective
    for i in range(len(taus) - 1):
        tau, tau_next = taus[i], taus[i + 1]
        gamma = churn.gamma(tau, len(taus) - 1)
        tau_hat = tau * (1.0 + gamma)
        if gamma > 0:  # EDM only (checked): raise the noise level to σ̂ with fresh noise
            x = x + churn.s_noise * math.sqrt(tau_hat**2 - tau**2) * randn(x.shape, generator, x.device, x.dtype)
        slope = objective.ode_velocity(x, chain.denoise(model_fn, x, tau_hat), tau_hat)
        x_euler = x + (tau_next - tau_hat) * slope
        if not second_order or tau_next == 0.0:
            x = x_euler
            continue
        slope_next = objective.ode_velocity(x_euler, chain.denoise(model_fn, x_euler, tau_next, record=False), tau_next)
        x = x + (tau_next - tau_hat) * 0.5 * (slope + slope_next)
    return x


def ddim_loop(model_fn: ModelFn, chain: ContinuousChain, x: torch.Tensor, *, eta: float, generator: Generator):
    """DDIM on the objective's path: x' = α' x̂₀ + √(s'² − c²) ε̂ + c z, c = η (s'/s)√(s² − (α s'/α')²)."""
    taus = chain.taus
    for i in range(len(taus) - 1):
        (alpha, std), (alpha_next, std_next) = chain.coefficients(taus[i]), chain.coefficients(taus[i + 1])
        denoised = chain.denoise(model_fn, x, taus[i])
        eps = (x - alpha * denoised) / std
        spread = 0.0
        if eta > 0 and std_next > 0:
            spread = eta * (std_next / std) * math.sqrt(max(std**2 - (alpha * std_next / alpha_next) ** 2, 0.0))
        x = alpha_next * denoised + math.sqrt(max(std_next**2 - spread**2, 0.0)) * eps
        if spread > 0:
            x = x + spread * randn(x.shape, generator, x.device, x.dtype)
    return x


def _half_log_snr(alpha: float, std: float) -> float:
    if alpha <= 0.0:
        return -math.inf
    return math.inf if std <= 0.0 else math.log(alpha / std)


def dpm_solver_2m_loop(model_fn: ModelFn, chain: ContinuousChain, x: torch.Tensor) -> torch.Tensor:
    """x' = (s'/s) x − α'(e^{−h} − 1)(x̂₀ + (x̂₀ − x̂₀_prev)/(2r)), h = λ' − λ, r = h_prev/h (first order at the
    first step, and the last, which lands on τ = 0 and returns x̂₀)."""
    taus = chain.taus
    previous_x0, previous_h = None, math.nan
    for i in range(len(taus) - 1):
        (alpha, std), (alpha_next, std_next) = chain.coefficients(taus[i]), chain.coefficients(taus[i + 1])
        denoised = chain.denoise(model_fn, x, taus[i])
        if taus[i + 1] == 0.0:
            return denoised
        h = _half_log_snr(alpha_next, std_next) - _half_log_snr(alpha, std)
        linear = -alpha_next * math.expm1(-h)
        x_next = (std_next / std) * x + linear * denoised
        if previous_x0 is not None and math.isfinite(previous_h):
            x_next = x_next + (0.5 * linear * h / previous_h) * (denoised - previous_x0)
        x, previous_x0, previous_h = x_next, denoised, h
    return x


def sample_continuous(
    model_fn: ModelFn,
    objective: ContinuousObjective,
    shape: Sequence[int],
    *,
    sampler: str = "heun",
    num_steps: int | None = None,
    eta: float = 0.0,
    timestep_spacing: str = "trailing",
    variance_type: str | None = None,
    clip_sample: bool | float = False,
    rho: float = 7.0,
    sigma_max: float | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
    shift: float = 1.0,
    generator: Generator = None,
    noise: torch.Tensor | None = None,
    return_trajectory: bool = False,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor | tuple[torch.Tensor, list[TrajectoryStep]]:
    """Samples of a continuous objective's model: from the prior at the grid's first level to τ = 0.
    ``model_fn(x_in, noise_input)`` is the network (with labels or guidance bound in)."""
    taus = check_continuous_settings(
        objective, sampler, num_steps, eta, timestep_spacing, variance_type, clip_sample, rho, sigma_max,
        s_churn, s_tmin, s_tmax, s_noise, shift,
    )  # fmt: skip
    if noise is None:
        noise = randn(shape, generator, device or "cpu", dtype)
    elif tuple(noise.shape) != tuple(shape):
        raise ValueError(f"noise has shape {tuple(noise.shape)} but shape={tuple(shape)} was asked for.")
    x = objective.prior(noise.to(device=device or noise.device, dtype=dtype), taus[0])
    chain = ContinuousChain(objective, taus, clip_sample, [] if return_trajectory else None)
    with torch.no_grad():
        if sampler in ("euler", "heun"):
            churn = Churn(s_churn, s_tmin, s_tmax, s_noise)
            x = heun_loop(model_fn, chain, x, second_order=sampler == "heun", churn=churn, generator=generator)
        elif sampler in ("ddim", "euler_ancestral"):
            x = ddim_loop(model_fn, chain, x, eta=1.0 if sampler == "euler_ancestral" else eta, generator=generator)
        else:
            x = dpm_solver_2m_loop(model_fn, chain, x)
    if return_trajectory:
        return x, chain.trajectory
    return x
