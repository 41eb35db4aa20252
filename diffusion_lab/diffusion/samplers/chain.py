"""What every sampler shares: the respaced reverse chain it walks, seeded noise, and the trajectory record."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from diffusion_lab.diffusion.process import GaussianDiffusion
from diffusion_lab.diffusion.schedules import NoiseSchedule

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Generator = torch.Generator | Sequence[torch.Generator] | None


def randn(shape: Sequence[int], generator: Generator, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
    """Standard normal noise, drawn in float32 on the generator's device and then cast and moved, so a seed
    gives the same values whatever the sample's dtype or device. With a list of generators, row i comes from
    generator i alone: a sample's noise does not depend on the batch it was drawn in."""
    if generator is None:
        noise = torch.randn(tuple(shape), device=device)
    elif isinstance(generator, torch.Generator):
        noise = torch.randn(tuple(shape), generator=generator, device=generator.device)
    else:
        if len(generator) != shape[0]:
            raise ValueError(f"Got {len(generator)} generators for a batch of {shape[0]}; pass one per sample.")
        noise = torch.stack([torch.randn(tuple(shape[1:]), generator=g, device=g.device) for g in generator])
    return noise.to(device=device, dtype=dtype)


@dataclass
class TrajectoryStep:
    """One reverse step: the timestep, the input x_t and the x̂₀ the network implied there (on the CPU); ``label``
    names a continuous objective's noise level (σ = 2.5, t = 0.40) where a timestep index would not."""

    t: int
    x_t: torch.Tensor
    pred_x0: torch.Tensor
    label: str = ""


@dataclass
class SamplingChain:
    """The reverse chain over a subset of the training timesteps.

    ``diffusion`` runs on the respaced schedule (index i ↔ training timestep ``timesteps[i]``, ascending),
    so its posterior and conversions are exact for the jumps the sampler makes; the step after index 0
    lands on the clean sample (ᾱ = 1).
    """

    diffusion: GaussianDiffusion
    timesteps: torch.Tensor
    trajectory: list[TrajectoryStep] | None = None
    alphas_cumprod: list[float] = field(init=False)

    def __post_init__(self) -> None:
        self.alphas_cumprod = self.diffusion.schedule.alphas_cumprod.tolist()

    @classmethod
    def build(
        cls, schedule: NoiseSchedule, timesteps: torch.Tensor, prediction_type: str, record: bool
    ) -> SamplingChain:
        ascending = timesteps.sort().values
        diffusion = GaussianDiffusion(schedule.respace(ascending), prediction_type)
        return cls(diffusion, ascending, [] if record else None)

    def __len__(self) -> int:
        return self.timesteps.numel()

    def alpha_cumprod_prev(self, i: int) -> float:
        """ᾱ of the point the step from index i lands on (1.0, the clean sample, after index 0)."""
        return self.alphas_cumprod[i - 1] if i > 0 else 1.0

    def evaluate(self, model_fn: ModelFn, x: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Call the network at chain index i; returns (model output in x's dtype, respaced index tensor)."""
        t_model = torch.full((x.shape[0],), int(self.timesteps[i]), device=x.device, dtype=torch.long)
        output = model_fn(x, t_model).to(x.dtype)
        return output, torch.full_like(t_model, i)

    def record(self, i: int, x_t: torch.Tensor, pred_x0: torch.Tensor) -> None:
        if self.trajectory is not None:
            self.trajectory.append(TrajectoryStep(int(self.timesteps[i]), x_t.detach().cpu(), pred_x0.detach().cpu()))
