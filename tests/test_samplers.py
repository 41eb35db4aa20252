"""Samplers: they reach the right distribution, are reproducible per sample, and reject bad options."""

import itertools

import pytest
import torch

from diffusion_lab.diffusion.samplers import SIGMA_SAMPLERS, classifier_free_guidance, sample, sampler_timesteps
from diffusion_lab.diffusion.schedules import make_schedule
from tests.helpers import GaussianDataDenoiser

LINEAR = make_schedule("linear", 1000)


@pytest.mark.parametrize(
    ("spacing", "expected"),
    [
        ("leading", [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]),
        ("trailing", [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]),
        ("linspace", [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]),
    ],
)
def test_timestep_grids(spacing, expected):
    assert sampler_timesteps("ddim", 1000, 10, spacing).tolist() == expected


def test_dpm_solver_grid_drops_the_clean_end():
    assert sampler_timesteps("dpm_solver++", 1000, 4, "linspace").tolist() == [999, 749, 500, 250]
    assert sampler_timesteps("dpm_solver++", 1000, 4, "leading").tolist() == [800, 600, 400, 200]
    assert sampler_timesteps("dpm_solver++", 1000, 4, "trailing").tolist() == [999, 749, 499, 249]


def draw_gaussian_data(sampler, num_steps, schedule_name, prediction_type, n=20_000):
    schedule = make_schedule(schedule_name, 1000)
    model = GaussianDataDenoiser(schedule, prediction_type, mean=0.3, std=0.5)
    return sample(
        model,
        schedule,
        (n, 1, 1, 1),
        sampler=sampler,
        num_steps=num_steps,
        prediction_type=prediction_type,
        generator=torch.Generator().manual_seed(0),
    )


@pytest.mark.parametrize(
    ("sampler", "coarse", "fine", "schedule_name", "prediction_type"),
    [
        ("ddpm", 100, 1000, "linear", "epsilon"),
        ("ddpm", 100, 1000, "cosine", "v_prediction"),
        ("ddim", 20, 250, "linear", "epsilon"),
        ("ddim", 20, 250, "cosine", "v_prediction"),
        ("dpm_solver++", 10, 50, "linear", "epsilon"),
        ("dpm_solver++", 10, 30, "cosine", "sample"),
    ],
)
def test_samplers_converge_to_gaussian_data(sampler, coarse, fine, schedule_name, prediction_type):
    """Driven by the exact denoiser of N(0.3, 0.5²) data, each sampler returns that distribution as its steps
    shrink; with few steps the deterministic ones under-disperse (the discretisation error), never more."""
    x = draw_gaussian_data(sampler, fine, schedule_name, prediction_type)
    assert x.mean().item() == pytest.approx(0.3, abs=0.015)
    assert x.std().item() == pytest.approx(0.5, abs=0.01)
    coarse_std = draw_gaussian_data(sampler, coarse, schedule_name, prediction_type).std().item()
    assert abs(coarse_std - 0.5) > abs(x.std().item() - 0.5)


def test_ddim_eta0_is_deterministic_and_draws_no_noise():
    model = GaussianDataDenoiser(LINEAR, "epsilon")
    noise = torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    generator = torch.Generator().manual_seed(7)
    state = generator.get_state()
    first = sample(model, LINEAR, noise.shape, sampler="ddim", num_steps=25, noise=noise, generator=generator)
    second = sample(model, LINEAR, noise.shape, sampler="ddim", num_steps=25, noise=noise.clone())
    assert torch.equal(first, second)
    assert torch.equal(generator.get_state(), state)


@pytest.mark.parametrize("num_steps", [100, 20])
def test_ddim_eta1_equals_ddpm_with_the_same_noise(num_steps):
    """Song et al.: η = 1 gives DDPM's posterior variance, so with the same noise draws both chains agree."""
    schedule = make_schedule("linear", 100)
    model = GaussianDataDenoiser(schedule, "epsilon")
    noise = torch.randn(16, 1, 3, 3, generator=torch.Generator().manual_seed(2))
    runs = {}
    for sampler, eta in (("ddim", 1.0), ("ddpm", 0.0)):
        runs[sampler] = sample(
            model,
            schedule,
            noise.shape,
            sampler=sampler,
            num_steps=num_steps,
            eta=eta,
            noise=noise,
            generator=torch.Generator().manual_seed(3),
        )
    assert torch.allclose(runs["ddim"], runs["ddpm"], atol=1e-5)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm_solver++"])
def test_per_sample_generators_make_samples_batch_independent(sampler):
    model = GaussianDataDenoiser(LINEAR, "epsilon")
    kwargs = {"sampler": sampler, "num_steps": 20, "eta": 0.5 if sampler == "ddim" else 0.0}

    def draw(seeds):
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        return sample(model, LINEAR, (len(seeds), 1, 4, 4), generator=generators, **kwargs)

    together = draw([10, 11, 12, 13])
    apart = torch.cat([draw([10, 11]), draw([12]), draw([13])])
    assert torch.allclose(together, apart, atol=1e-6)
    assert not torch.allclose(together[0], together[1])


def test_classifier_free_guidance_formula():
    cond = lambda x, t: torch.full_like(x, 2.0)  # noqa: E731
    uncond = lambda x, t: torch.full_like(x, 0.5)  # noqa: E731
    x, t = torch.zeros(2, 3), torch.zeros(2, dtype=torch.long)
    assert torch.all(classifier_free_guidance(cond, uncond, 3.0)(x, t) == 4 * 2.0 - 3 * 0.5)
    assert torch.all(classifier_free_guidance(cond, uncond, 0.0)(x, t) == 2.0)
    with pytest.raises(ValueError, match="guidance weight w=-1"):
        classifier_free_guidance(cond, uncond, -1.0)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm_solver++", "euler", "heun", "euler_ancestral"])
def test_trajectory_records_the_chain_the_sampler_walked(sampler):
    """Each record is the state the network saw and the x̂₀ it implied there, in the order they happened."""
    model = GaussianDataDenoiser(LINEAR, "epsilon", mean=0.3, std=0.5)
    noise = torch.randn(4000, 1, 1, 1, generator=torch.Generator().manual_seed(0))
    _x, trajectory = sample(
        model,
        LINEAR,
        noise.shape,
        sampler=sampler,
        num_steps=10,
        noise=noise,
        clip_sample=False,
        generator=torch.Generator().manual_seed(0),
        return_trajectory=True,
    )
    assert [step.t for step in trajectory] == sampler_timesteps(sampler, 1000, 10, "trailing").tolist()
    assert torch.allclose(trajectory[0].x_t, noise, rtol=1e-6, atol=0)  # the chain starts at x_T
    ab = LINEAR.alphas_cumprod
    for step in trajectory:
        # x̂₀ recorded = the exact denoiser's E[x₀ | x_t] at the recorded x_t and t (float32 ε → x̂₀ at t = 999
        # divides by √ᾱ = 0.006, hence the tolerance)
        a = ab[step.t].item()
        exact_x0 = 0.3 + a**0.5 * 0.25 * (step.x_t - a**0.5 * 0.3) / (a * 0.25 + 1 - a)
        assert torch.allclose(step.pred_x0, exact_x0, atol=2e-4)
    # x̂₀ sharpens: its spread over samples grows from ≈ 0 at t = T toward the data's 0.5, step by step.
    spreads = [step.pred_x0.std().item() for step in trajectory]
    assert spreads[0] < 0.05 and all(a < b for a, b in itertools.pairwise(spreads))
    if sampler == "ddim":  # η = 0: each recorded state is the deterministic update of the one before
        for before, after in itertools.pairwise(trajectory):
            a, a_next = ab[before.t].item(), ab[after.t].item()
            eps = (before.x_t - a**0.5 * before.pred_x0) / (1 - a) ** 0.5
            assert torch.allclose(after.x_t, a_next**0.5 * before.pred_x0 + (1 - a_next) ** 0.5 * eps, atol=1e-5)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm_solver++", "euler", "heun", "euler_ancestral"])
@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_every_sampler_handles_zero_terminal_snr(sampler, prediction_type):
    """With ᾱ_{T−1} = 0 (Lin et al.) x_T is pure noise and x̂₀ there comes from v or x₀ alone (ε cannot give it):
    the first step must be finite and equal that x̂₀, and the chain must still reach the data distribution.
    The σ samplers start at ᾱ = 2⁻²⁴ instead of 0 (σ must be finite), so √ᾱ·x_T ≈ 2e-4·x_T enters x̂₀ there."""
    schedule = make_schedule("linear", 1000, rescale_betas_zero_snr=True)
    assert schedule.alphas_cumprod[-1].item() == 0.0
    model = GaussianDataDenoiser(schedule, prediction_type, mean=0.3, std=0.5)
    x, trajectory = sample(
        model,
        schedule,
        (8000, 1, 1, 1),
        sampler=sampler,
        num_steps=50,
        prediction_type=prediction_type,
        clip_sample=False,
        generator=torch.Generator().manual_seed(0),
        return_trajectory=True,
    )
    first = trajectory[0]
    assert first.t == 999 and torch.isfinite(first.pred_x0).all()
    tolerance = 1e-3 if sampler in SIGMA_SAMPLERS and prediction_type == "v_prediction" else 1e-5
    assert torch.allclose(first.pred_x0, torch.full_like(first.pred_x0, 0.3), atol=tolerance)  # E[x₀], no signal
    assert torch.isfinite(x).all()
    assert x.mean().item() == pytest.approx(0.3, abs=0.03)
    assert x.std().item() == pytest.approx(0.5, abs=0.06)


def test_fixed_large_variance_is_used_by_the_ddpm_sampler():
    """fixed_large draws with σ² = β_t (Ho et al.'s other choice) — more noise than β̃_t: on a 2-step chain the
    difference between two seeds' samples is larger, and equals the hand-computed step."""
    schedule = make_schedule("linear", 1000)
    model = GaussianDataDenoiser(schedule, "epsilon")
    noise = torch.randn(1, 1, 1, 1, generator=torch.Generator().manual_seed(0))
    outputs = {}
    for variance_type in ("fixed_small", "fixed_large"):
        outputs[variance_type] = sample(
            model, schedule, (1, 1, 1, 1), sampler="ddpm", num_steps=2, noise=noise.double(), clip_sample=False,
            variance_type=variance_type, generator=torch.Generator().manual_seed(1), dtype=torch.float64,
            timestep_spacing="trailing",
        )  # fmt: skip
    # Hand-computed: grid [999, 499]; one stochastic step 999 → 499, then the deterministic mean to x₀.
    chain = schedule.respace(torch.tensor([499, 999]))
    ab, ab_prev = chain.alphas_cumprod[1].item(), chain.alphas_cumprod[0].item()
    beta = 1 - ab / ab_prev
    eps = model(noise.double(), torch.tensor([999]))
    x0 = (noise.double() - (1 - ab) ** 0.5 * eps) / ab**0.5
    mean = (ab_prev**0.5 * beta * x0 + (1 - beta) ** 0.5 * (1 - ab_prev) * noise.double()) / (1 - ab)
    z = torch.randn(1, 1, 1, 1, generator=torch.Generator().manual_seed(1)).double()
    for variance_type, variance in (("fixed_small", beta * (1 - ab_prev) / (1 - ab)), ("fixed_large", beta)):
        x_mid = mean + variance**0.5 * z
        eps_mid = model(x_mid, torch.tensor([499]))
        expected = (x_mid - (1 - ab_prev) ** 0.5 * eps_mid) / ab_prev**0.5
        assert torch.allclose(outputs[variance_type], expected, atol=1e-9), variance_type


def test_sampling_keeps_the_requested_dtype():
    model = GaussianDataDenoiser(LINEAR, "epsilon")
    x = sample(model, LINEAR, (2, 1, 2, 2), num_steps=5, dtype=torch.float64)
    assert x.dtype == torch.float64


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sampler": "eulr"}, "Unknown sampler 'eulr'; valid choices: ddpm, ddim, dpm_solver\\+\\+, consistency"),
        ({"num_steps": 0}, "num_steps=0 must be an integer between 1 and num_train_timesteps=1000"),
        ({"num_steps": 1001}, "num_steps=1001 must be an integer between 1 and num_train_timesteps=1000"),
        ({"eta": -0.1}, r"eta=-0.1 must lie in \[0, 1\]"),
        ({"sampler": "ddpm", "eta": 0.5}, "eta=0.5 applies only to sampler='ddim'"),
        ({"timestep_spacing": "uniform"}, "Unknown timestep_spacing 'uniform'; valid choices: leading"),
        ({"variance_type": "learned"}, "Unknown variance_type 'learned'"),
        ({"prediction_type": "score"}, "Unknown prediction_type 'score'"),
        ({"noise": torch.zeros(1, 1, 2, 2)}, r"noise has shape \(1, 1, 2, 2\) but shape=\(2, 1, 2, 2\)"),
        ({"generator": [torch.Generator()]}, "Got 1 generators for a batch of 2"),
    ],
)
def test_bad_sampler_options_raise_clear_errors(kwargs, message):
    model = GaussianDataDenoiser(LINEAR, "epsilon")
    with pytest.raises(ValueError, match=message):
        sample(model, LINEAR, (2, 1, 2, 2), **kwargs)
