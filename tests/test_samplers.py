"""Samplers: they reach the right distribution, are reproducible per sample, and reject bad options."""

import pytest
import torch

from diffusion_lab.diffusion.samplers import classifier_free_guidance, sample, sampler_timesteps
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


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm_solver++"])
def test_trajectory_records_every_step(sampler):
    model = GaussianDataDenoiser(LINEAR, "epsilon")
    x, trajectory = sample(
        model,
        LINEAR,
        (2, 1, 4, 4),
        sampler=sampler,
        num_steps=10,
        generator=torch.Generator().manual_seed(0),
        return_trajectory=True,
    )
    assert [step.t for step in trajectory] == sampler_timesteps(sampler, 1000, 10, "trailing").tolist()
    assert all(step.x_t.shape == x.shape and step.pred_x0.shape == x.shape for step in trajectory)
    # x̂₀ sharpens along the chain: its distance to the final sample shrinks.
    first_gap = (trajectory[0].pred_x0 - x).abs().mean()
    last_gap = (trajectory[-1].pred_x0 - x).abs().mean()
    assert last_gap < first_gap


def test_sampling_keeps_the_requested_dtype():
    model = GaussianDataDenoiser(LINEAR, "epsilon")
    x = sample(model, LINEAR, (2, 1, 2, 2), num_steps=5, dtype=torch.float64)
    assert x.dtype == torch.float64


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sampler": "euler"}, "Unknown sampler 'euler'; valid choices: ddpm, ddim, dpm_solver\\+\\+"),
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
