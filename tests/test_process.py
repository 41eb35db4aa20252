"""GaussianDiffusion: the notes' worked examples, the closed forms, and the ε ↔ x̂₀ ↔ v conversions."""

import pytest
import torch

from diffusion_lab.diffusion.process import GaussianDiffusion
from diffusion_lab.diffusion.schedules import NoiseSchedule, make_schedule


def schedule_with_alpha_cumprod_at(index: int, alpha_cumprod: float, length: int = 4) -> NoiseSchedule:
    """A constant-β schedule whose ᾱ at ``index`` is exactly ``alpha_cumprod``."""
    beta = 1 - alpha_cumprod ** (1 / (index + 1))
    return NoiseSchedule.from_betas([beta] * length)


def test_training_step_example_x5():
    """Notes part 2: β = 0.1, x₀ = 2, ε = 0.3 at step 5 (index 4) gives x₅ ≈ 1.730 (with 3-digit
    coefficients; exactly 1.7288), and the step's loss values."""
    diffusion = GaussianDiffusion(make_schedule("constant", 10, beta=0.1))
    t = torch.tensor([4])
    x5 = diffusion.q_sample(torch.tensor([2.0]), t, torch.tensor([0.3]))
    assert x5.item() == pytest.approx(1.730, abs=1.5e-3)
    assert x5.item() == pytest.approx(0.9**2.5 * 2 + (1 - 0.9**5) ** 0.5 * 0.3, rel=1e-6)
    target = diffusion.training_target(torch.tensor([2.0]), torch.tensor([0.3]), t)
    assert ((target - 0.4) ** 2).item() == pytest.approx(0.01)
    assert ((target - (-0.3)) ** 2).item() == pytest.approx(0.36)


def test_x0_reconstruction_example():
    """ᾱ = 0.36, x_t = (1.2, −0.3), ε̂ = (0.5, −1.0) gives x̂₀ = (1.333, 0.833)."""
    diffusion = GaussianDiffusion(schedule_with_alpha_cumprod_at(2, 0.36))
    t = torch.tensor([2])
    x0 = diffusion.predict_x0(torch.tensor([[1.2, -0.3]]), t, torch.tensor([[0.5, -1.0]]))
    assert x0.squeeze().tolist() == pytest.approx([4 / 3, 5 / 6], abs=1e-6)


def test_reverse_mean_example():
    """x_t = 0.7, α_t = 0.9, ᾱ_t = 0.5, ε̂ = 0.2 gives μ_θ ≈ 0.7081."""
    # β_1 = 0.1 at index 1 and ᾱ_0 = 0.5/0.9 so that ᾱ_1 = 0.5.
    diffusion = GaussianDiffusion(NoiseSchedule.from_betas([1 - 0.5 / 0.9, 0.1]))
    t = torch.tensor([1], dtype=torch.long)
    mean, variance = diffusion.p_mean_variance(torch.tensor([0.7]), t, torch.tensor([0.2]))
    assert mean.item() == pytest.approx(0.7081, abs=5e-5)
    # fixed_small variance is the posterior β̃_t = β_t (1 − ᾱ_{t−1})/(1 − ᾱ_t).
    assert variance.item() == pytest.approx(0.1 * (1 - 0.5 / 0.9) / 0.5, rel=1e-6)
    _, large = diffusion.p_mean_variance(torch.tensor([0.7]), t, torch.tensor([0.2]), "fixed_large")
    assert large.item() == pytest.approx(0.1, rel=1e-6)


def test_closed_form_forward_example():
    """ᾱ = 0.64, x₀ = (3, 0), ε = (−1, 2) gives x_t = (1.8, 1.2)."""
    diffusion = GaussianDiffusion(schedule_with_alpha_cumprod_at(0, 0.64))
    x_t = diffusion.q_sample(torch.tensor([[3.0, 0.0]]), torch.tensor([0]), torch.tensor([[-1.0, 2.0]]))
    assert x_t.squeeze().tolist() == pytest.approx([1.8, 1.2], abs=1e-6)


@pytest.mark.parametrize("schedule_name", ["linear", "cosine"])
def test_reverse_mean_is_ddpm_epsilon_formula(schedule_name):
    """For ε-prediction the posterior mean at x̂₀ equals (x_t − β_t/√(1−ᾱ_t) ε̂)/√α_t at every t ≥ 1."""
    schedule = make_schedule(schedule_name, 1000)
    diffusion = GaussianDiffusion(schedule)
    generator = torch.Generator().manual_seed(0)
    x_t = torch.randn(16, 3, 4, 4, generator=generator, dtype=torch.float64)
    eps = torch.randn(16, 3, 4, 4, generator=generator, dtype=torch.float64)
    t = torch.randint(1, 1000, (16,), generator=generator)
    mean, _ = diffusion.p_mean_variance(x_t, t, eps)
    beta = schedule.betas[t].view(-1, 1, 1, 1)
    ab = schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
    expected = (x_t - beta / (1 - ab).sqrt() * eps) / (1 - beta).sqrt()
    assert torch.allclose(mean, expected, rtol=1e-9, atol=1e-9)


def test_q_posterior_matches_bayes_rule():
    """q(x_{t−1} | x_t, x₀) ∝ q(x_t | x_{t−1}) q(x_{t−1} | x₀): product of two Gaussians in x_{t−1}."""
    schedule = make_schedule("cosine", 200)
    diffusion = GaussianDiffusion(schedule)
    generator = torch.Generator().manual_seed(1)
    x0 = torch.randn(32, 5, generator=generator, dtype=torch.float64)
    x_t = torch.randn(32, 5, generator=generator, dtype=torch.float64)
    t = torch.randint(1, 200, (32,), generator=generator)
    mean, variance = diffusion.q_posterior(x0, x_t, t)
    alpha = schedule.alphas[t].view(-1, 1)
    beta = schedule.betas[t].view(-1, 1)
    ab_prev = schedule.alphas_cumprod[t - 1].view(-1, 1)
    precision = alpha / beta + 1 / (1 - ab_prev)
    expected_mean = (alpha.sqrt() / beta * x_t + ab_prev.sqrt() / (1 - ab_prev) * x0) / precision
    assert torch.allclose(variance, (1 / precision).expand_as(x_t), rtol=1e-10)
    assert torch.allclose(mean, expected_mean, rtol=1e-10, atol=1e-12)
    # At t = 0 the posterior collapses onto x₀.
    mean0, variance0 = diffusion.q_posterior(x0, x_t, torch.zeros(32, dtype=torch.long))
    assert torch.allclose(mean0, x0) and torch.all(variance0 == 0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_eps_x0_v_round_trips(prediction_type):
    """From the true target of any prediction type, the process recovers the true ε, x₀ and v."""
    diffusion = GaussianDiffusion(make_schedule("linear", 1000), prediction_type)
    generator = torch.Generator().manual_seed(2)
    x0 = torch.randn(64, 1, 3, 3, generator=generator, dtype=torch.float64)
    noise = torch.randn(64, 1, 3, 3, generator=generator, dtype=torch.float64)
    t = torch.randint(0, 1000, (64,), generator=generator)
    x_t = diffusion.q_sample(x0, t, noise)
    target = diffusion.training_target(x0, noise, t)
    v = GaussianDiffusion(diffusion.schedule, "v_prediction").training_target(x0, noise, t)
    assert torch.allclose(diffusion.predict_x0(x_t, t, target), x0, atol=1e-8)
    assert torch.allclose(diffusion.predict_eps(x_t, t, target), noise, atol=1e-6)
    assert torch.allclose(diffusion.predict_v(x_t, t, target), v, atol=1e-6)


def test_q_sample_moments_over_many_draws():
    diffusion = GaussianDiffusion(make_schedule("linear", 1000))
    generator = torch.Generator().manual_seed(3)
    n = 200_000
    x0 = torch.full((n,), 0.8)
    t = torch.full((n,), 300, dtype=torch.long)
    x_t = diffusion.q_sample(x0, t, torch.randn(n, generator=generator))
    ab = diffusion.schedule.alphas_cumprod[300].item()
    assert x_t.mean().item() == pytest.approx(ab**0.5 * 0.8, abs=4 * (1 - ab) ** 0.5 / n**0.5)
    assert x_t.var().item() == pytest.approx(1 - ab, rel=0.01)
    mean, variance = diffusion.q_mean_variance(x0[:1], t[:1])
    assert mean.item() == pytest.approx(ab**0.5 * 0.8, rel=1e-6) and variance.item() == pytest.approx(1 - ab)


def test_score_of_gaussian_data_is_exact():
    """The score view: for x₀ ~ N(0, s²), ∇ log p_t(x) = −x/(ᾱ s² + 1 − ᾱ), and −ε*/√(1−ᾱ) is that."""
    schedule = make_schedule("linear", 1000)
    diffusion = GaussianDiffusion(schedule)
    s2 = 0.25
    x_t = torch.linspace(-3, 3, 7, dtype=torch.float64).repeat(3, 1)
    t = torch.tensor([10, 500, 990])
    ab = schedule.alphas_cumprod[t].view(-1, 1)
    optimal_eps = (1 - ab).sqrt() * x_t / (ab * s2 + 1 - ab)
    assert torch.allclose(diffusion.score(x_t, t, optimal_eps), -x_t / (ab * s2 + 1 - ab), rtol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_results_follow_the_input_dtype(dtype):
    diffusion = GaussianDiffusion(make_schedule("linear", 1000))
    x = torch.randn(2, 3, 4, 4).to(dtype)
    t = torch.tensor([0, 999])
    assert diffusion.q_sample(x, t, x).dtype == dtype
    assert diffusion.predict_x0(x, t, x).dtype == dtype
    mean, variance = diffusion.p_mean_variance(x, t, x)
    assert mean.dtype == dtype and variance.dtype == dtype


def test_epsilon_prediction_refuses_zero_terminal_snr():
    schedule = make_schedule("linear", 100, rescale_betas_zero_snr=True)
    with pytest.raises(ValueError, match=r"zero-terminal-SNR.*prediction_type='v_prediction'"):
        GaussianDiffusion(schedule, "epsilon")
    GaussianDiffusion(schedule, "v_prediction")  # the supported combination


def test_unknown_prediction_and_variance_types_are_named():
    with pytest.raises(ValueError, match="Unknown prediction_type 'noise'; valid choices: epsilon, sample"):
        GaussianDiffusion(make_schedule("linear", 10), "noise")
    diffusion = GaussianDiffusion(make_schedule("linear", 10))
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="Unknown variance_type 'learned'"):
        diffusion.p_mean_variance(x, torch.tensor([1]), x, "learned")
