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

The same algebra holds on any Gaussian path x = α x₀ + s ε: a flow-matching teacher (α = 1 − t, s = t) walks its
uniform t grid, where DDIM's deterministic step is exactly Euler's step along the velocity. ``DiscretePath`` and
``FlowPath`` give the distiller the levels, coefficients and x̂₀ of either.

Distilling from trajectories (this project's variant): instead of the teacher's two steps from a noised training
image at every optimiser step, the original teacher solves its ODE once, before training, from a bank of noises
through every point of the finest student grid (``teacher_trajectories``); every round then regresses the student's
single step onto the bank's states, with the same target algebra. The student learns on the states it meets when it
samples (from noise, not from noised data), its targets are the teacher's own ODE rather than the previous round's
student's, and a training step calls no teacher.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch

from diffusion_lab.diffusion.continuous import TimestepTables, as_column
from diffusion_lab.diffusion.flow_matching import FlowMatching
from diffusion_lab.diffusion.process import GaussianDiffusion, clamp_x0
from diffusion_lab.diffusion.samplers.timesteps import sampling_timesteps

# The network as the distiller calls it: (image, noise input) → output; labels are bound in already.
NetworkCall = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


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
        self._tables = TimestepTables(alpha=self.alpha, sigma=self.sigma)

    def at(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._tables.column("alpha", t, like), self._tables.column("sigma", t, like)


class DiscretePath:
    """DDPM's chain as a distiller walks it: levels are training timesteps (T: the clean sample); the network's
    output means what ``diffusion.prediction_type`` says."""

    def __init__(self, diffusion: GaussianDiffusion) -> None:
        self.diffusion = diffusion
        self.coefficients = DDIMCoefficients(diffusion)

    def grid(self, num_steps: int) -> torch.Tensor:
        return student_grid(self.diffusion.num_train_timesteps, num_steps)

    def at(self, levels: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.coefficients.at(levels, like)

    def noisy(self, x0: torch.Tensor, levels: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self.diffusion.q_sample(x0, levels, noise)

    def network_input(self, z: torch.Tensor, levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return z, levels

    def denoised(self, output: torch.Tensor, z: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        return self.diffusion.predict_x0(z, levels, output)

    def student_sampler(self, num_steps: int) -> dict:
        """The sampler settings that walk this grid: DDIM's deterministic steps on the trailing timesteps."""
        return {"sampler": "ddim", "num_steps": num_steps, "eta": 0.0, "timestep_spacing": "trailing"}


class FlowPath:
    """Flow matching's linear path as a distiller walks it: levels are t from 1 (noise) to 0 (the data) on the
    uniform grid (optionally shifted, which keeps the grids nested), the network predicts the velocity."""

    def __init__(self, objective: FlowMatching, shift: float = 1.0) -> None:
        self.objective, self.shift = objective, shift

    def grid(self, num_steps: int) -> torch.Tensor:
        return torch.tensor(self.objective.uniform_times(num_steps, self.shift), dtype=torch.float64)

    def at(self, levels: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return as_column(self.objective.alpha(levels), like), as_column(self.objective.noise_std(levels), like)

    def noisy(self, x0: torch.Tensor, levels: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self.objective.noisy(x0, noise, levels)

    def network_input(self, z: torch.Tensor, levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.objective.network_input(z, levels)

    def denoised(self, output: torch.Tensor, z: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        return self.objective.denoised(output, z, levels)

    def student_sampler(self, num_steps: int) -> dict:
        """Euler on the uniform t grid (DDIM's deterministic step on this path is Euler's)."""
        return {"sampler": "euler", "num_steps": num_steps, "timestep_spacing": "trailing", "shift": self.shift}


DistillationPath = DiscretePath | FlowPath


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
def teacher_walk(
    network: NetworkCall, path: DistillationPath, z: torch.Tensor, levels: Sequence[torch.Tensor], clip_sample=True
) -> torch.Tensor:
    """The teacher's deterministic DDIM steps through ``levels`` (per-sample level tensors, the first z's own),
    x̂₀ clamped as its sampler does; returns the state at the last level."""
    for level, following in itertools.pairwise(levels):
        x_in, noise_input = path.network_input(z, level)
        x0 = clamp_x0(path.denoised(network(x_in, noise_input), z, level), clip_sample)
        z = ddim_step(z, x0, *path.at(level, z), *path.at(following, z))
    return z


@torch.no_grad()
def teacher_trajectories(
    network: NetworkCall, path: DistillationPath, noise: torch.Tensor, fine_grid: torch.Tensor, every: int, clip_sample
) -> torch.Tensor:
    """The teacher's deterministic walk from ``noise`` (at fine_grid[0]) through ``fine_grid``, keeping the state at
    every ``every``-th level: (B, (len(fine_grid) − 1)/every + 1, …). With fine_grid the student grid refined
    ``every`` times, the kept states are the teacher's ODE solution at each point of the student's grid."""
    z, kept = noise, [noise]
    batch = noise.shape[0]
    for start in range(0, len(fine_grid) - 1, every):
        levels = [fine_grid[start + j].expand(batch) for j in range(every + 1)]
        z = teacher_walk(network, path, z, levels, clip_sample)
        kept.append(z)
    return torch.stack(kept, dim=1)
