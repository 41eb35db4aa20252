"""The samplers' names, defaults and the checks on their settings: what a config may ask for, refused with a
message naming the value before any sampling starts."""

from __future__ import annotations

import math

from diffusion_lab.diffusion.process import VARIANCE_TYPES
from diffusion_lab.diffusion.samplers.euler import Churn
from diffusion_lab.diffusion.samplers.sigmas import SIGMA_SPACINGS
from diffusion_lab.diffusion.samplers.timesteps import GRID_SPACINGS

CHAIN_SAMPLERS = ("ddpm", "ddim", "dpm_solver++", "consistency")
SIGMA_SAMPLERS = ("euler", "heun", "euler_ancestral")
SAMPLERS = CHAIN_SAMPLERS + SIGMA_SAMPLERS
# None: every training timestep. Heun's 10 steps are 19 network calls.
# A consistency model (a consistency-distilled student) samples in 1 call, or a few with re-noising between.
DEFAULT_NUM_STEPS = {
    "ddpm": None, "ddim": 50, "dpm_solver++": 20, "euler": 20, "heun": 10, "euler_ancestral": 20, "consistency": 1,
}  # fmt: skip
TIMESTEP_SPACINGS = GRID_SPACINGS + SIGMA_SPACINGS


def network_calls(sampler: str, num_steps: int) -> int:
    """Network evaluations per sample (without guidance) for ``num_steps`` steps: Heun's 2nd-order correction
    costs one more call on every step but the last, which goes to σ = 0."""
    return 2 * num_steps - 1 if sampler == "heun" else num_steps


def check_options(
    sampler: str, num_steps: int, eta: float, variance_type: str | None, churn: Churn, spacing: str
) -> None:
    if sampler not in SAMPLERS:
        raise ValueError(f"Unknown sampler {sampler!r}; valid choices: {', '.join(SAMPLERS)}.")
    check_spacing(spacing)
    if variance_type is not None and variance_type not in VARIANCE_TYPES:
        raise ValueError(f"Unknown variance_type {variance_type!r}; valid choices: {', '.join(VARIANCE_TYPES)}.")
    if variance_type == "learned_range" and sampler != "ddpm":
        raise ValueError(
            f"variance_type=learned_range applies only to sampler=ddpm; {sampler!r} uses the mean alone (a "
            "learned-variance model's prediction channels), so leave variance_type null."
        )
    check_steps_eta_churn(sampler, num_steps, eta, churn, churn_samplers=("euler", "heun"))


def check_spacing(spacing: str) -> None:
    if spacing not in TIMESTEP_SPACINGS:
        raise ValueError(f"Unknown timestep_spacing {spacing!r}; valid choices: {', '.join(TIMESTEP_SPACINGS)}.")


def check_steps_eta_churn(
    sampler: str, num_steps: int, eta: float, churn: Churn, churn_samplers: tuple[str, ...], where: str = ""
) -> None:
    """What every sampler family checks alike: DDIM's η, Heun's two steps at least, EDM's churn (allowed for
    ``churn_samplers``; ``where`` names what else the churn needs, e.g. " on objective=edm")."""
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta={eta!r} must lie in [0, 1] (0: deterministic DDIM, 1: DDPM-like noise).")
    if eta != 0.0 and sampler != "ddim":
        raise ValueError(f"eta={eta} applies only to sampler='ddim', not {sampler!r}; leave eta=0.")
    if sampler == "heun" and num_steps < 2:
        raise ValueError(
            f"num_steps={num_steps} is too few for sampler='heun': its only step would go to σ = 0, which is an "
            "Euler step. Use num_steps >= 2 (each step but the last costs 2 network calls) or sampler=euler."
        )
    if churn.s_churn < 0 or not math.isfinite(churn.s_churn):
        raise ValueError(f"s_churn={churn.s_churn!r} must be a finite number >= 0 (0: the deterministic ODE).")
    if churn.s_churn > 0 and sampler not in churn_samplers:
        raise ValueError(
            f"s_churn={churn.s_churn} applies only to sampler=euler or heun{where}, not {sampler!r}; set 0."
        )
    if not 0.0 <= churn.s_tmin <= churn.s_tmax:
        raise ValueError(
            f"s_tmin={churn.s_tmin!r}, s_tmax={churn.s_tmax!r}: churn applies to σ in [s_tmin, s_tmax], so they "
            "need 0 <= s_tmin <= s_tmax (s_tmax may be .inf)."
        )
    if not (churn.s_noise > 0 and math.isfinite(churn.s_noise)):
        raise ValueError(f"s_noise={churn.s_noise!r} must be a positive number (EDM uses 1.0 to 1.007).")


def resolve_variance_type(settings: dict, learned_variance: bool) -> dict:
    """``settings`` with ``variance_type`` made concrete: null means the model's own — learned_range for DDPM on
    a model that learned its variance, fixed_small otherwise. learned_range without a learned variance is an
    error (the model has no variance output to read)."""
    variance_type = settings.get("variance_type")
    if variance_type is None:
        learned = learned_variance and settings.get("sampler") == "ddpm"
        variance_type = "learned_range" if learned else "fixed_small"
    if variance_type == "learned_range" and not learned_variance:
        raise ValueError(
            "variance_type=learned_range needs a model that learned its variance (trained with objective=hybrid); "
            "this one did not: use fixed_small, fixed_large or leave it null."
        )
    return {**settings, "variance_type": variance_type}


def resolve_num_steps(sampler: str, num_steps: int | None, num_train_timesteps: int) -> int:
    """``num_steps``, or the sampler's default when null (every timestep for ddpm); refused outside [1, T]."""
    if num_steps is None:
        return min(DEFAULT_NUM_STEPS.get(sampler) or num_train_timesteps, num_train_timesteps)
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(
            f"num_steps={num_steps!r} must be an integer between 1 and num_train_timesteps={num_train_timesteps}."
        )
    return num_steps
