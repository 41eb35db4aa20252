"""EDM and flow matching against closed forms: Table 1's coefficients, the Bayes-optimal model of Gaussian data
(its loss has a known value; samplers driven by it must return the data's distribution), and Algorithm 1."""

from __future__ import annotations

import math

import pytest
import torch

from diffusion_lab.diffusion.edm import EDM
from diffusion_lab.diffusion.flow_matching import (
    FlowMatching,
    eps_from_velocity,
    shifted,
    velocity_from,
    x0_from_velocity,
)
from diffusion_lab.diffusion.samplers import network_calls, sample
from tests.helpers import IdealModel

MEAN, STD = 0.3, 0.5  # the Gaussian data: x₀ ~ N(MEAN, STD²) per pixel


def test_edm_coefficients_are_table_1s():
    edm = EDM(sigma_data=0.5)
    for sigma in (0.002, 0.1, 0.5, 1.0, 80.0):
        s = torch.tensor([sigma], dtype=torch.float64)
        total = sigma**2 + 0.25
        assert float(edm.c_skip(s)) == pytest.approx(0.25 / total, rel=1e-12)
        assert float(edm.c_out(s)) == pytest.approx(sigma * 0.5 / math.sqrt(total), rel=1e-12)
        assert float(edm.c_in(s)) == pytest.approx(1 / math.sqrt(total), rel=1e-12)
        assert float(edm.c_noise(s)) == pytest.approx(math.log(sigma) / 4, rel=1e-12)
        assert float(edm.loss_weight(s)) == pytest.approx(total / (sigma * 0.5) ** 2, rel=1e-12)
        assert float(edm.loss_weight(s) * edm.c_out(s) ** 2) == pytest.approx(1.0, rel=1e-12)  # λ = 1/c_out²
    # the noise levels of training: ln σ ~ N(−1.2, 1.2²)
    logs = edm.sample_tau(200_000, torch.device("cpu"), torch.Generator().manual_seed(0)).log()
    assert float(logs.mean()) == pytest.approx(-1.2, abs=0.01) and float(logs.std()) == pytest.approx(1.2, abs=0.01)


def test_the_edm_denoiser_returns_its_input_as_sigma_goes_to_zero():
    edm, x = EDM(), torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    network_output = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))  # any bounded F
    for sigma, tolerance in ((1e-2, 5e-2), (1e-4, 5e-4), (1e-6, 5e-6)):
        denoised = edm.denoised(network_output, x, torch.full((4,), sigma, dtype=torch.float64))
        assert (denoised - x).abs().max() < tolerance


def test_flow_matching_conversions_between_velocity_noise_and_data():
    generator = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(6, 3, 4, 4, generator=generator), torch.randn(6, 3, 4, 4, generator=generator)
    t = torch.rand(6, generator=generator, dtype=torch.float64)
    flow = FlowMatching()
    x_t = flow.noisy(x0, eps, t)
    expected = (1 - t.float()).reshape(-1, 1, 1, 1) * x0 + t.float().reshape(-1, 1, 1, 1) * eps
    assert torch.allclose(x_t, expected, atol=1e-6)
    velocity = velocity_from(x0, eps)
    assert torch.allclose(x0_from_velocity(x_t, t, velocity), x0, atol=1e-5)
    assert torch.allclose(eps_from_velocity(x_t, t, velocity), eps, atol=1e-5)
    assert torch.allclose(flow.denoised(velocity, x_t, t), x0, atol=1e-5)
    assert shifted(0.5, 3.0) == pytest.approx(0.75) and shifted(1.0, 3.0) == 1.0 and shifted(0.0, 3.0) == 0.0


@pytest.mark.parametrize(
    ("objective", "levels", "ideal_loss"),
    [
        # EDM: λ(σ) × the posterior variance σ_d'²σ²/(σ_d'² + σ²); exactly 1 when the data's std is σ_data
        (EDM(sigma_data=STD), (0.05, 0.5, 5.0), lambda s: 1.0),
        (EDM(sigma_data=1.0), (0.05, 0.5, 5.0), lambda s: (s**2 + 1) / s**2 * STD**2 * s**2 / (STD**2 + s**2)),
        # flow matching: Var(ε − x₀ | x_t) = s_d²/((1 − t)² s_d² + t²)
        (FlowMatching(), (0.1, 0.5, 0.9), lambda t: STD**2 / ((1 - t) ** 2 * STD**2 + t**2)),
    ],
)
def test_the_ideal_models_loss_is_its_analytic_value(objective, levels, ideal_loss):
    generator = torch.Generator().manual_seed(0)
    model = IdealModel(objective)
    for level in levels:
        x0 = MEAN + STD * torch.randn(4000, 1, 4, 4, generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        tau = torch.full((4000,), level, dtype=torch.float64)
        x = objective.noisy(x0, noise, tau)
        x_in, noise_input = objective.network_input(x, tau)
        loss = objective.per_sample_loss(model(x_in, noise_input), x0, x, noise, tau)
        assert float(loss.mean()) == pytest.approx(ideal_loss(level), rel=0.03), level


def moments(objective, sampler: str, num_steps: int, **settings) -> tuple[float, float]:
    samples = sample(
        IdealModel(objective), objective, (4000, 1, 2, 2), sampler=sampler, num_steps=num_steps,
        generator=torch.Generator().manual_seed(0), **settings,
    )  # fmt: skip
    return float(samples.mean()), float(samples.std())


# Deterministic samplers against the exact probability-flow map of Gaussian data, which keeps
# (x_τ − α μ)/√(α² s_d² + s²) constant: the error is the discretisation's alone, and falls at the method's order.
ORDER = {"euler": 1, "ddim": 1, "heun": 2, "dpm_solver++": 2}


@pytest.mark.parametrize("objective", [EDM(), FlowMatching()], ids=["edm", "flow_matching"])
@pytest.mark.parametrize("sampler", list(ORDER))
def test_deterministic_samplers_converge_to_the_exact_flow_map_at_their_order(objective, sampler):
    noise = torch.randn(500, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    level = torch.tensor([objective.tau_max], dtype=torch.float64)
    alpha, std = float(objective.alpha(level)), float(objective.noise_std(level))
    exact = MEAN + STD * (std * noise - alpha * MEAN) / math.sqrt(alpha**2 * STD**2 + std**2)
    errors = []
    for steps in (8, 32, 128):
        result = sample(IdealModel(objective), objective, noise.shape, sampler=sampler, num_steps=steps, noise=noise)
        errors.append(float((result - exact).abs().max()))
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[1] / errors[2] > (3.0 if ORDER[sampler] == 1 else 8.0), errors  # 4× the steps: 4× or 16× less
    assert errors[2] < (0.05 if ORDER[sampler] == 1 else 0.002), errors


@pytest.mark.parametrize(
    ("objective", "sampler", "settings"),
    [
        (EDM(), "euler_ancestral", {}),
        (FlowMatching(), "euler_ancestral", {}),
        (FlowMatching(), "ddim", {"eta": 0.5}),
        (EDM(), "heun", {"s_churn": 10.0}),
        (FlowMatching(), "heun", {"shift": 3.0}),
    ],
)
def test_stochastic_samplers_and_other_grids_return_the_data_distribution(objective, sampler, settings):
    errors = []
    for steps in (16, 256):
        mean, std = moments(objective, sampler, steps, **settings)
        errors.append(abs(mean - MEAN) + abs(std - STD))
    assert errors[1] < 0.015, errors  # 16 000 values: the sampling error of the moments alone is ~0.006
    assert errors[0] > errors[1], errors


def test_edm_heun_is_algorithm_1_step_by_step():
    """Karras et al. 2022, Algorithm 1, written out as printed, with the same D and the same x_0 ~ N(0, σ_0² I)."""
    edm, steps, rho = EDM(), 12, 7.0
    model = IdealModel(edm, mean=0.1, std=0.7)

    def D(x: torch.Tensor, sigma: float) -> torch.Tensor:
        level = torch.full((x.shape[0],), sigma, dtype=torch.float64)
        x_in, noise_input = edm.network_input(x, level)
        return edm.denoised(model(x_in, noise_input), x, level)

    t = [(80 ** (1 / rho) + i / (steps - 1) * (0.002 ** (1 / rho) - 80 ** (1 / rho))) ** rho for i in range(steps)]
    t.append(0.0)
    noise = torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    x = noise * t[0]
    denoised_along_the_way = []
    for i in range(steps):
        denoised_along_the_way.append(D(x, t[i]))
        d_i = (x - denoised_along_the_way[-1]) / t[i]
        x_next = x + (t[i + 1] - t[i]) * d_i
        if t[i + 1] != 0:
            d_prime = (x_next - D(x_next, t[i + 1])) / t[i + 1]
            x_next = x + (t[i + 1] - t[i]) * (0.5 * d_i + 0.5 * d_prime)
        x = x_next

    model.calls = 0
    ours, trajectory = sample(model, edm, noise.shape, sampler="heun", num_steps=steps, noise=noise,
                              return_trajectory=True)  # fmt: skip
    assert model.calls == network_calls("heun", steps) == 2 * steps - 1
    assert torch.allclose(ours, x, atol=1e-5)
    assert len(trajectory) == steps
    for step, expected in zip(trajectory, denoised_along_the_way, strict=True):
        assert torch.allclose(step.pred_x0, expected, atol=1e-5)


def test_continuous_objectives_refuse_what_they_do_not_have():
    edm, flow = EDM(), FlowMatching()
    shape = (2, 1, 2, 2)
    with pytest.raises(ValueError, match=r"sampler='ddpm' walks a β schedule's discrete chain, which objective=edm"):
        sample(IdealModel(edm), edm, shape, sampler="ddpm")
    with pytest.raises(
        ValueError, match=r"variance_type=fixed_large is DDPM's reverse variance; objective=flow_matching"
    ):
        sample(IdealModel(flow), flow, shape, sampler="euler", variance_type="fixed_large")
    with pytest.raises(ValueError, match=r"s_churn=5.0 applies only to sampler=euler or heun on objective=edm"):
        sample(IdealModel(flow), flow, shape, sampler="heun", s_churn=5.0)
    with pytest.raises(ValueError, match=r"shift=3.0 applies to flow matching's uniform-t grid only"):
        sample(IdealModel(edm), edm, shape, sampler="heun", shift=3.0)
    with pytest.raises(ValueError, match=r"time_sampling='beta' is not one of uniform, logit_normal"):
        FlowMatching(time_sampling="beta")
