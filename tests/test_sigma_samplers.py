"""Euler, Heun and Euler-ancestral on σ grids (Karras, log-SNR, or a timestep grid's σ): parity with diffusers'
EulerDiscrete/HeunDiscrete/EulerAncestralDiscrete schedulers on the same model function, EDM's churn against
a hand-written transcription of Karras et al.'s Algorithm 2, and the known answer for Gaussian data.

Where diffusers' conventions differ from ours the test says so: its Karras σ_min/σ_max are the ends of the
*timestep* grid (equal to the trained σ(0), σ(T−1) only for ``linspace``), its trailing Euler starts at
σ_max·z rather than √(1+σ_max²)·z, and its Euler churn calls the network before adding the churn noise
(EDM evaluates at the raised σ̂, as we do), so churn is checked against EDM itself.
"""

import math

import diffusers
import pytest
import torch

from diffusion_lab.diffusion.samplers import network_calls, sample, sampler_sigmas, sampler_timesteps
from diffusion_lab.diffusion.samplers.sigmas import sigma_grid, sigma_to_timestep, trained_sigmas
from diffusion_lab.diffusion.schedules import make_schedule
from diffusion_lab.generation.draw import nfe_per_sample
from tests.helpers import GaussianDataDenoiser

SHAPE = (4, 3, 8, 8)
DIFFUSERS_SCHEDULE_NAMES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}
DDPM_BETAS = {"beta_start": 1e-4, "beta_end": 0.02}  # Heun's defaults are Stable Diffusion's, not DDPM's


def initial_noise(dtype=torch.float32) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)).to(dtype)


class CountingModel:
    def __init__(self, model):
        self.model, self.calls, self.timesteps = model, 0, []

    def __call__(self, x, t):
        self.calls += 1
        self.timesteps.append(t[0].item())
        return self.model(x, t)


def run_diffusers(scheduler, model, x, **step_kwargs):
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(x, t)
        x = scheduler.step(model(model_input, t.expand(x.shape[0])), t, x, **step_kwargs).prev_sample
    return x


# -- the σ grids ---------------------------------------------------------------------------------------------


def test_karras_grid_follows_its_formula_between_the_trained_extremes():
    schedule = make_schedule("linear", 1000)
    sigmas = trained_sigmas(schedule)
    grid = sigma_grid(schedule, 6, "karras", rho=7.0)
    assert grid[0].item() == pytest.approx(sigmas[-1].item(), rel=1e-12)  # σ_max = σ(T−1) ≈ 157.4
    assert grid[-1].item() == pytest.approx(sigmas[0].item(), rel=1e-12)  # σ_min = σ(0) = √(β_0/(1−β_0))
    assert sigmas[0].item() == pytest.approx(math.sqrt(1e-4 / (1 - 1e-4)), rel=1e-9)
    lo, hi = sigmas[0].item() ** (1 / 7), sigmas[-1].item() ** (1 / 7)
    expected = [(hi + i / 5 * (lo - hi)) ** 7 for i in range(6)]
    assert grid.tolist() == pytest.approx(expected, rel=1e-12)
    log_snr = sigma_grid(schedule, 6, "log_snr")
    steps = torch.diff(torch.log(log_snr))
    assert torch.allclose(steps, steps[0].expand_as(steps), rtol=1e-12)  # equal steps in log σ = −½ log-SNR


def test_sigma_to_timestep_is_exact_on_trained_sigmas_and_log_linear_between():
    schedule = make_schedule("cosine", 1000)
    sigmas = trained_sigmas(schedule)
    assert sigma_to_timestep(sigmas, schedule).tolist() == pytest.approx(list(range(1000)), abs=1e-9)
    midpoint = torch.exp(0.5 * (sigmas[10].log() + sigmas[11].log()))
    assert sigma_to_timestep(midpoint, schedule).item() == pytest.approx(10.5, abs=1e-12)
    assert sigma_to_timestep(torch.tensor([1e-6, 1e9]), schedule).tolist() == [0.0, 999.0]  # clamped at the ends


def test_karras_spacing_for_the_chain_samplers_rounds_to_trained_timesteps():
    schedule = make_schedule("linear", 1000)
    expected = sigma_to_timestep(sigma_grid(schedule, 10, "karras"), schedule).round().long()
    assert sampler_timesteps("ddim", schedule, 10, "karras").tolist() == expected.tolist()
    assert expected[0] == 999 and expected[-1] == 0
    with pytest.raises(ValueError, match=r"num_steps=200 is too many for timestep_spacing='karras'.*sampler=euler"):
        sampler_timesteps("ddim", schedule, 200, "karras")
    # cosine's last step jumps from σ ≈ 700 to 2e4: a Karras grid puts several points inside it
    with pytest.raises(ValueError, match=r"repeats timesteps \[998, 999\]"):
        sampler_timesteps("ddim", make_schedule("cosine", 1000), 10, "karras")


@pytest.mark.parametrize("spacing", ["linspace", "trailing"])
def test_a_timestep_grid_gives_the_trained_sigmas_of_its_points(spacing):
    schedule = make_schedule("linear", 1000)
    timesteps = sampler_timesteps("ddim", 1000, 10, spacing)
    assert sampler_sigmas(schedule, 10, spacing) == pytest.approx([*trained_sigmas(schedule)[timesteps].tolist(), 0.0])


# -- parity with diffusers -----------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", ["euler", "heun"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("schedule_name", ["linear", "cosine"])
def test_karras_euler_and_heun_match_diffusers(sampler, prediction_type, schedule_name):
    """diffusers with use_karras_sigmas=True and timestep_spacing='linspace' (so its σ range is the trained
    one), fractional timesteps by the same log-σ interpolation, init_noise_sigma = √(σ_max² + 1).

    diffusers keeps ᾱ, σ and t in float32, which moves its samples up to ~3e-5 (linear) from a float64 run;
    our float32 run stays within 1e-5 of it (5e-5 on cosine), so the two implementations agree to 1e-4."""
    schedule = make_schedule(schedule_name, 1000)
    model = GaussianDataDenoiser(schedule, prediction_type)
    cls = diffusers.EulerDiscreteScheduler if sampler == "euler" else diffusers.HeunDiscreteScheduler
    scheduler = cls(
        beta_schedule=DIFFUSERS_SCHEDULE_NAMES[schedule_name], prediction_type=prediction_type,
        use_karras_sigmas=True, timestep_spacing="linspace", **DDPM_BETAS,
    )  # fmt: skip
    scheduler.set_timesteps(12)
    theirs = run_diffusers(scheduler, model, initial_noise() * scheduler.init_noise_sigma)
    counted = CountingModel(model)
    kwargs = {"sampler": sampler, "num_steps": 12, "timestep_spacing": "karras", "prediction_type": prediction_type}
    ours = sample(counted, schedule, SHAPE, noise=initial_noise(), **kwargs)
    exact = sample(model, schedule, SHAPE, noise=initial_noise(torch.float64), dtype=torch.float64, **kwargs)
    assert counted.timesteps == pytest.approx(scheduler.timesteps.tolist(), rel=2e-4, abs=1e-5)  # float32 ᾱ
    assert counted.calls == network_calls(sampler, 12) == len(scheduler.timesteps)
    # cosine's σ_max ≈ 2e4 scales float32 rounding of the start by that much; it shrinks with σ
    assert (ours.double() - exact).abs().max().item() <= (1e-5 if schedule_name == "linear" else 5e-5)
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_heun_with_clip_sample_matches_diffusers():
    schedule = make_schedule("linear", 1000)
    model = GaussianDataDenoiser(schedule, "epsilon", mean=0.8, std=0.5)  # x̂₀ often beyond 1: clipping acts
    scheduler = diffusers.HeunDiscreteScheduler(
        use_karras_sigmas=True, timestep_spacing="linspace", clip_sample=True, **DDPM_BETAS
    )
    scheduler.set_timesteps(10)
    theirs = run_diffusers(scheduler, model, initial_noise() * scheduler.init_noise_sigma)
    kwargs = {"sampler": "heun", "num_steps": 10, "timestep_spacing": "karras", "noise": initial_noise()}
    ours = sample(model, schedule, SHAPE, clip_sample=True, **kwargs)
    assert (ours - theirs).abs().max().item() <= 1e-4  # float32 ᾱ, σ in diffusers, as above
    assert (ours - sample(model, schedule, SHAPE, clip_sample=False, **kwargs)).abs().max().item() > 1e-2


def test_trailing_euler_matches_diffusers_from_the_same_start():
    """Without Karras σ, diffusers' Euler walks the trained σ of its timestep grid, as ours does; its trailing
    start is σ_max·z, ours the exact x_T/√ᾱ = √(1+σ_max²)·z, so it is handed our starting point."""
    schedule = make_schedule("linear", 1000)
    model = GaussianDataDenoiser(schedule, "epsilon")
    scheduler = diffusers.EulerDiscreteScheduler(timestep_spacing="trailing", **DDPM_BETAS)
    scheduler.set_timesteps(15)
    start = initial_noise() * math.sqrt(1 + trained_sigmas(schedule)[-1].item() ** 2)
    theirs = run_diffusers(scheduler, model, start)
    ours = sample(model, schedule, SHAPE, sampler="euler", num_steps=15, timestep_spacing="trailing",
                  noise=initial_noise())  # fmt: skip
    assert (ours - theirs).abs().max().item() <= 1e-5


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_euler_ancestral_matches_diffusers_with_the_same_generator(prediction_type):
    schedule = make_schedule("linear", 1000)
    model = GaussianDataDenoiser(schedule, prediction_type)
    scheduler = diffusers.EulerAncestralDiscreteScheduler(
        prediction_type=prediction_type, timestep_spacing="trailing", **DDPM_BETAS
    )
    scheduler.set_timesteps(20)
    start = initial_noise() * math.sqrt(1 + trained_sigmas(schedule)[-1].item() ** 2)
    theirs = run_diffusers(scheduler, model, start, generator=torch.Generator().manual_seed(3))
    ours = sample(
        model, schedule, SHAPE, sampler="euler_ancestral", num_steps=20, timestep_spacing="trailing",
        prediction_type=prediction_type, noise=initial_noise(), generator=torch.Generator().manual_seed(3),
    )  # fmt: skip
    assert (ours - theirs).abs().max().item() <= 1e-5


# -- EDM's churn ---------------------------------------------------------------------------------------------


def edm_algorithm_2(denoise, sigmas, x, s_churn, s_tmin, s_tmax, s_noise, generator):
    """Karras et al. 2022, Algorithm 2, line by line (float64)."""
    n = len(sigmas) - 1
    for i in range(n):
        gamma = min(s_churn / n, 2**0.5 - 1) if s_tmin <= sigmas[i] <= s_tmax else 0.0
        eps = torch.randn(x.shape, generator=generator).double() * s_noise if gamma > 0 else 0.0
        sigma_hat = sigmas[i] * (1 + gamma)
        x_hat = x + (sigma_hat**2 - sigmas[i] ** 2) ** 0.5 * eps
        d = (x_hat - denoise(x_hat, sigma_hat)) / sigma_hat
        x = x_hat + (sigmas[i + 1] - sigma_hat) * d
        if sigmas[i + 1] != 0:
            d_prime = (x - denoise(x, sigmas[i + 1])) / sigmas[i + 1]
            x = x_hat + (sigmas[i + 1] - sigma_hat) * (0.5 * d + 0.5 * d_prime)
    return x


def test_heun_with_churn_is_edm_algorithm_2():
    schedule = make_schedule("linear", 1000)
    model = GaussianDataDenoiser(schedule, "epsilon")

    def denoise(x, sigma):  # D(x; σ) from the ε-model at x_t = x/√(1+σ²), t(σ)
        t = sigma_to_timestep(torch.tensor(sigma), schedule).float().expand(x.shape[0])
        return x - sigma * model(x / math.sqrt(1 + sigma**2), t)

    churn = {"s_churn": 40.0, "s_tmin": 0.05, "s_tmax": 50.0, "s_noise": 1.003}
    sigmas = sampler_sigmas(schedule, 10, "karras")
    start = initial_noise(torch.float64) * math.sqrt(1 + sigmas[0] ** 2)
    expected = edm_algorithm_2(denoise, sigmas, start, generator=torch.Generator().manual_seed(4), **churn)
    ours = sample(
        model, schedule, SHAPE, sampler="heun", num_steps=10, timestep_spacing="karras",
        noise=initial_noise(torch.float64), dtype=torch.float64, generator=torch.Generator().manual_seed(4), **churn,
    )  # fmt: skip
    assert (ours - expected).abs().max().item() <= 1e-9
    deterministic = sample(model, schedule, SHAPE, sampler="heun", num_steps=10, timestep_spacing="karras",
                           noise=initial_noise(torch.float64), dtype=torch.float64)  # fmt: skip
    assert (ours - deterministic).abs().max().item() > 1e-2  # churn really acts


# -- the known answer: Gaussian data -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sampler", "few", "many", "gain"),
    [("euler", 100, 400, 2.0), ("heun", 25, 100, 4.0), ("euler_ancestral", 100, 400, 2.0)],
)
@pytest.mark.parametrize("spacing", ["karras", "log_snr"])
@pytest.mark.parametrize("schedule_name", ["cosine", "linear_zero_snr"])
def test_sigma_samplers_converge_to_the_gaussian_data_distribution(sampler, few, many, gain, spacing, schedule_name):
    """Data N(0.3, 0.5²) per pixel and its exact denoiser: with enough steps the samples' mean and std are the
    data's, including on a zero-terminal-SNR schedule (σ_max = ∞, started at ᾱ = 2⁻²⁴ as diffusers does), and
    the std's error shrinks with the steps as the method's order says (Euler first, Heun second)."""
    if schedule_name == "cosine":
        schedule = make_schedule("cosine", 1000)
    else:
        schedule = make_schedule("linear", 1000, rescale_betas_zero_snr=True)
    model = GaussianDataDenoiser(schedule, "v_prediction")

    def draw(num_steps):
        return sample(
            model, schedule, (4000, 1, 1, 1), sampler=sampler, num_steps=num_steps, timestep_spacing=spacing,
            prediction_type="v_prediction", generator=torch.Generator().manual_seed(0),
        )  # fmt: skip

    coarse, fine = draw(few), draw(many)
    assert torch.isfinite(fine).all()
    assert fine.mean().item() == pytest.approx(0.3, abs=0.02)
    assert fine.std().item() == pytest.approx(0.5, abs=0.02)
    assert abs(coarse.std().item() - 0.5) >= gain * abs(fine.std().item() - 0.5)


def test_dpm_solver_on_a_log_snr_grid_beats_trailing_at_ten_steps():
    """The chain samplers take a σ spacing too (rounded to trained timesteps): on a zero-terminal-SNR schedule
    DPM-Solver++ with 10 log-SNR-uniform steps reaches the data's std within 0.02, trailing only within 0.1."""
    schedule = make_schedule("linear", 1000, rescale_betas_zero_snr=True)
    model = GaussianDataDenoiser(schedule, "v_prediction")

    def std_error(spacing):
        samples = sample(
            model, schedule, (4000, 1, 1, 1), sampler="dpm_solver++", num_steps=10, timestep_spacing=spacing,
            prediction_type="v_prediction", generator=torch.Generator().manual_seed(0),
        )  # fmt: skip
        assert samples.mean().item() == pytest.approx(0.3, abs=0.01)
        return abs(samples.std().item() - 0.5)

    log_snr, trailing = std_error("log_snr"), std_error("trailing")
    assert log_snr <= 0.02 and trailing >= 2 * log_snr


def test_heun_counts_two_calls_per_step_but_the_last():
    schedule = make_schedule("linear", 1000)
    counted = CountingModel(GaussianDataDenoiser(schedule, "epsilon"))
    sample(counted, schedule, (2, 1, 2, 2), sampler="heun", num_steps=5, timestep_spacing="karras")
    assert counted.calls == 9 == network_calls("heun", 5)
    assert nfe_per_sample({"sampler": "heun", "num_steps": 5}, schedule, guidance_scale=0.0) == 9
    assert nfe_per_sample({"sampler": "heun", "num_steps": 5}, schedule, guidance_scale=2.0) == 18
    assert nfe_per_sample({"sampler": "euler", "num_steps": None}, schedule, guidance_scale=0.0) == 20
    assert nfe_per_sample({"sampler": "ddpm", "num_steps": None}, schedule, guidance_scale=0.0) == 1000
    assert nfe_per_sample({"sampler": "heun", "num_steps": None}, None, guidance_scale=0.0) == 19  # EDM, flow


def test_sigma_samplers_record_a_trajectory_and_take_per_sample_seeds():
    schedule = make_schedule("linear", 1000)
    model = GaussianDataDenoiser(schedule, "epsilon")
    seeds = [torch.Generator().manual_seed(s) for s in (7, 8, 9)]
    batch, trajectory = sample(model, schedule, (3, 1, 4, 4), sampler="euler_ancestral", num_steps=8,
                               timestep_spacing="karras", generator=seeds, return_trajectory=True)  # fmt: skip
    alone = sample(model, schedule, (1, 1, 4, 4), sampler="euler_ancestral", num_steps=8, timestep_spacing="karras",
                   generator=[torch.Generator().manual_seed(8)])  # fmt: skip
    assert torch.allclose(batch[1:2], alone, atol=1e-6)  # sample 1 depends only on its own seed
    assert [step.t for step in trajectory] == [999, *[round(t) for t in sigma_to_timestep(
        torch.tensor(sampler_sigmas(schedule, 8, "karras")[1:-1]), schedule).tolist()]]  # fmt: skip
    assert torch.allclose(trajectory[-1].pred_x0, batch)  # the last step lands on the last x̂₀


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"sampler": "heun", "num_steps": 1}, r"num_steps=1 is too few for sampler='heun'"),
        ({"sampler": "euler", "s_churn": -1.0}, r"s_churn=-1.0 must be a finite number >= 0"),
        ({"sampler": "ddim", "s_churn": 5.0}, r"s_churn=5.0 applies only to sampler=euler or heun, not 'ddim'"),
        ({"sampler": "heun", "s_tmin": 2.0, "s_tmax": 1.0}, r"need 0 <= s_tmin <= s_tmax"),
        ({"sampler": "heun", "s_noise": 0.0}, r"s_noise=0.0 must be a positive number"),
        ({"sampler": "euler", "timestep_spacing": "karas"}, r"Unknown timestep_spacing 'karas'; valid .*karras"),
        ({"sampler": "heunn"}, r"Unknown sampler 'heunn'; valid choices: .*heun, euler_ancestral"),
        ({"sampler": "euler", "rho": -1.0}, r"rho=-1.0 must be a positive number"),
    ],
)
def test_bad_sigma_sampler_settings_are_one_clear_error(settings, message):
    schedule = make_schedule("linear", 1000)
    with pytest.raises(ValueError, match=message):
        model = GaussianDataDenoiser(schedule, "epsilon")
        sample(model, schedule, (1, 1, 2, 2), **{"timestep_spacing": "karras", **settings})


def test_sigma_max_caps_where_a_sigma_spacing_starts():
    """EDM starts at σ_max = 80; a cosine schedule's own σ(T−1) ≈ 2·10⁴ would spend Karras steps far above any
    data scale (and make Heun's trapezoid overshoot on the first steps)."""
    schedule = make_schedule("cosine", 1000)
    capped = sigma_grid(schedule, 8, "karras", sigma_max=80.0)
    assert capped[0].item() == pytest.approx(80.0) and capped[-1].item() == pytest.approx(
        trained_sigmas(schedule)[0].item()
    )
    assert sigma_grid(schedule, 8, "karras", sigma_max=1e9)[0].item() == pytest.approx(trained_sigmas(schedule)[-1])
    assert sampler_sigmas(schedule, 8, "log_snr", sigma_max=80.0)[0] == pytest.approx(80.0)
    with pytest.raises(ValueError, match=r"sigma_max=0.001 must be a number above the schedule's σ_min"):
        sigma_grid(schedule, 8, "karras", sigma_max=1e-3)
