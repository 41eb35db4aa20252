"""Progressive distillation (Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of Diffusion Models"):
the maths of one round, for a DDPM teacher on a β schedule.

A student learns to take in one deterministic DDIM step what the teacher takes in two. With α = √ᾱ and σ = √(1 − ᾱ)
at the student's point t, its next point s and the teacher's midpoint m between them, the teacher's two DDIM steps
z_t → z_m → z_s give the x̃ for which the student's single step lands on z_s:

    z_s = α_s x̃ + (σ_s/σ_t)(z_t − α_t x̃)   ⇒   x̃ = (z_s − (σ_s/σ_t) z_t) / (α_s − (σ_s/σ_t) α_t)        (Alg. 2)

and the student regresses x̂₀ onto x̃ with the truncated-SNR weight max(SNR_t, 1). Each round halves the steps:
the student of a round is the teacher of the next. Grids are nested "trailing" DDIM grids of the training timesteps
(the 2N-step grid holds the N-step one at every other point), and the step after the last lands on the clean
sample (ᾱ = 1, here the index T).
"""

from __future__ import annotations

import torch

from diffusion_lab.diffusion.process import GaussianDiffusion, clamp_x0
from diffusion_lab.diffusion.samplers.timesteps import sampling_timesteps


def student_grid(num_train_timesteps: int, num_steps: int) -> torch.Tensor:
    """The N descending training timesteps a student's DDIM walks, then T (the clean sample): N + 1 entries."""
    grid = sampling_timesteps(num_train_timesteps, num_steps, "trailing")
    return torch.cat([grid, torch.tensor([num_train_timesteps])])


class DDIMCoefficients:
    """α = √ᾱ and σ = √(1 − ᾱ) of every training timestep, plus the clean sample at index T (α = 1, σ = 0)."""

    def __init__(self, diffusion: GaussianDiffusion) -> None:
        alphas_cumprod = torch.cat([diffusion.schedule.alphas_cumprod, torch.ones(1, dtype=torch.float64)])
        self.alpha = alphas_cumprod.sqrt()
        self.sigma = (1.0 - alphas_cumprod).clamp(min=0.0).sqrt()

    def at(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = t.shape + (1,) * (like.ndim - t.ndim)
        index = t.cpu()
        return (
            self.alpha[index].reshape(shape).to(like.device, like.dtype),
            self.sigma[index].reshape(shape).to(like.device, like.dtype),
        )


def ddim_step(
    x_t: torch.Tensor, x0: torch.Tensor, alpha_t: torch.Tensor, sigma_t: torch.Tensor, alpha_s, sigma_s
) -> torch.Tensor:
    """DDIM's deterministic step from t to s given x̂₀: α_s x̂₀ + σ_s (x_t − α_t x̂₀)/σ_t."""
    return alpha_s * x0 + sigma_s * (x_t - alpha_t * x0) / sigma_t


def two_step_target(
    z_t: torch.Tensor, z_s: torch.Tensor, alpha_t: torch.Tensor, sigma_t: torch.Tensor, alpha_s, sigma_s
) -> torch.Tensor:
    """x̃ with ddim_step(z_t, x̃, t → s) = z_s (Salimans & Ho, Algorithm 2); at s = clean it is z_s itself."""
    ratio = sigma_s / sigma_t
    return (z_s - ratio * z_t) / (alpha_s - ratio * alpha_t)


def truncated_snr_weight(alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """max(SNR, 1) = max(α²/σ², 1): the x̂₀-loss weight of Salimans & Ho's "truncated SNR" weighting."""
    return torch.clamp(alpha.square() / sigma.square().clamp(min=1e-20), min=1.0)


@torch.no_grad()
def teacher_two_steps(
    teacher_fn,
    teacher: GaussianDiffusion,
    coefficients: DDIMCoefficients,
    z_t: torch.Tensor,
    t: torch.Tensor,
    middle: torch.Tensor,
    s: torch.Tensor,
    clip_sample: bool | float = True,
) -> torch.Tensor:
    """z_s after the teacher's two DDIM steps t → middle → s (``teacher_fn(x, t)`` returns its network output)."""
    alpha_t, sigma_t = coefficients.at(t, z_t)
    alpha_m, sigma_m = coefficients.at(middle, z_t)
    alpha_s, sigma_s = coefficients.at(s, z_t)
    x0 = clamp_x0(teacher.predict_x0(z_t, t, teacher_fn(z_t, t)), clip_sample)
    z_m = ddim_step(z_t, x0, alpha_t, sigma_t, alpha_m, sigma_m)
    x0_m = clamp_x0(teacher.predict_x0(z_m, middle, teacher_fn(z_m, middle)), clip_sample)
    return ddim_step(z_m, x0_m, alpha_m, sigma_m, alpha_s, sigma_s)
