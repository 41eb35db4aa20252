"""Noise schedules: the course notes' worked examples, invariants, and clear errors for bad arguments."""

import math

import pytest
import torch

from diffusion_lab.diffusion.schedules import NoiseSchedule, make_schedule, rescale_zero_terminal_snr


def test_constant_beta_01_matches_course_notes():
    """Notes, part 1, schedule A: steps 1, 5, 10 are indices 0, 4, 9."""
    schedule = make_schedule("constant", 10, beta=0.1)
    alphas_cumprod = schedule.alphas_cumprod[[0, 4, 9]]
    assert alphas_cumprod.tolist() == pytest.approx([0.9, 0.59049, 0.34868], abs=5e-6)
    # Within one unit of the last printed digit: the notes print √0.59049 = 0.76843 as 0.769.
    assert alphas_cumprod.sqrt().tolist() == pytest.approx([0.949, 0.769, 0.590], abs=1e-3)
    assert (1 - alphas_cumprod).sqrt().tolist() == pytest.approx([0.316, 0.640, 0.807], abs=5e-4)
    assert alphas_cumprod.sqrt()[1].item() == pytest.approx(0.76843, abs=5e-6)


def test_constant_beta_001_matches_course_notes():
    alphas_cumprod = make_schedule("constant", 10, beta=0.01).alphas_cumprod[[0, 4, 9]]
    assert alphas_cumprod.tolist() == pytest.approx([0.99, 0.951, 0.904], abs=5e-4)
    assert alphas_cumprod.sqrt().tolist() == pytest.approx([0.995, 0.975, 0.951], abs=5e-4)
    # Within one unit of the last printed digit: the notes print √(1 − 0.99¹⁰) = 0.30922 as 0.310.
    assert (1 - alphas_cumprod).sqrt().tolist() == pytest.approx([0.100, 0.221, 0.310], abs=1e-3)


def test_linear_endpoints_are_ho_et_al():
    schedule = make_schedule("linear", 1000)
    assert schedule.betas[0].item() == pytest.approx(1e-4)
    assert schedule.betas[-1].item() == pytest.approx(0.02)
    assert schedule.betas.dtype == torch.float64
    # Ho et al.: ᾱ_T ≈ 4e-5, so x_T is indistinguishable from N(0, I).
    assert schedule.alphas_cumprod[-1].item() == pytest.approx(4.04e-5, rel=0.01)


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "cosine", "sigmoid", "constant"])
def test_alphas_cumprod_strictly_decreasing_inside_unit_interval(name):
    schedule = make_schedule(name, 1000)
    alphas_cumprod = schedule.alphas_cumprod
    assert alphas_cumprod.dtype == torch.float64 and alphas_cumprod.shape == (1000,)
    assert torch.all(alphas_cumprod > 0) and torch.all(alphas_cumprod < 1)
    assert torch.all(torch.diff(alphas_cumprod) < 0)
    assert torch.all(torch.diff(schedule.log_snr) < 0)
    assert torch.allclose(schedule.snr, alphas_cumprod / (1 - alphas_cumprod))


def test_cosine_follows_nichol_dhariwal_and_clips_at_0999():
    T, s = 1000, 0.008
    schedule = make_schedule("cosine", T)
    assert schedule.betas.max().item() == pytest.approx(0.999)
    assert schedule.betas[-1].item() == pytest.approx(0.999)  # the clip is what bounds the last step
    # Away from the clip, ᾱ_t = f(t+1)/f(0) with f(u) = cos²((u/T + s)/(1 + s) · π/2).
    f = [math.cos(((u / T) + s) / (1 + s) * math.pi / 2) ** 2 for u in (0, 1, 500)]
    assert schedule.alphas_cumprod[0].item() == pytest.approx(f[1] / f[0], rel=1e-12)
    assert schedule.alphas_cumprod[499].item() == pytest.approx(f[2] / f[0], rel=1e-9)
    # Cosine destroys information more slowly than linear in the middle of the chain.
    linear = make_schedule("linear", T)
    assert schedule.alphas_cumprod[T // 2] > linear.alphas_cumprod[T // 2]


def test_zero_terminal_snr_rescaling():
    betas = make_schedule("linear", 1000).betas
    rescaled = NoiseSchedule(rescale_zero_terminal_snr(betas))
    assert rescaled.alphas_cumprod[-1].item() == 0.0
    assert rescaled.alphas_cumprod[0].item() == pytest.approx(1 - 1e-4, rel=1e-12)
    assert torch.all(torch.diff(rescaled.alphas_cumprod) < 0)
    assert rescaled.log_snr[-1].item() == -math.inf
    via_factory = make_schedule("linear", 1000, rescale_betas_zero_snr=True)
    assert torch.equal(via_factory.betas, rescaled.betas)


def test_from_betas_keeps_values_in_float64():
    schedule = NoiseSchedule.from_betas([0.1, 0.2, 0.3])
    assert schedule.betas.dtype == torch.float64
    assert schedule.alphas_cumprod.tolist() == pytest.approx([0.9, 0.72, 0.504])
    assert schedule.alphas_cumprod_prev.tolist() == pytest.approx([1.0, 0.9, 0.72])


def test_respace_keeps_alphas_cumprod_at_kept_steps():
    schedule = make_schedule("linear", 1000)
    kept = torch.tensor([999, 500, 250, 0])
    respaced = schedule.respace(kept)
    expected = schedule.alphas_cumprod[kept.sort().values]
    assert torch.allclose(respaced.alphas_cumprod, expected, rtol=1e-12, atol=0)
    full = schedule.respace(torch.arange(1000))
    assert torch.allclose(full.betas, schedule.betas, rtol=1e-9, atol=0)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda: make_schedule("quadratic", 1000),
            "Unknown beta_schedule 'quadratic'; valid choices: linear",
        ),
        (lambda: make_schedule("linear", 0), "num_train_timesteps=0 must be a positive integer"),
        (lambda: make_schedule("linear", -5), "num_train_timesteps=-5"),
        (lambda: make_schedule("linear", 10.5), "num_train_timesteps=10.5"),
        (lambda: make_schedule("linear", 10, beta_end=1.5), r"beta_end=1.5 is outside \(0, 1\)"),
        (lambda: make_schedule("linear", 10, beta_start=0.0), r"beta_start=0.0 is outside \(0, 1\)"),
        (lambda: make_schedule("constant", 10, beta=-0.1), r"beta=-0.1 is outside \(0, 1\)"),
        (lambda: make_schedule("cosine", 10, max_beta=1.0), r"max_beta=1.0 is outside \(0, 1\)"),
        (lambda: make_schedule("linear", 10, beta=0.1), "'linear' got unexpected arguments \\['beta'\\]"),
        (lambda: NoiseSchedule.from_betas([0.1, 1.0, 0.2]), r"betas\[1\]=1.0 is outside \(0, 1\)"),
        (lambda: NoiseSchedule.from_betas([0.1, 0.0]), r"betas\[1\]=0.0 is outside \(0, 1\)"),
        (lambda: NoiseSchedule.from_betas([0.1, float("nan")]), "NaN or Inf"),
    ],
)
def test_invalid_arguments_raise_a_clear_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()
