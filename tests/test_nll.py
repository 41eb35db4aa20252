"""The likelihood bound: its parts against closed forms."""

import math

import pytest
import torch

from diffusion_lab.diffusion import GaussianDiffusion, make_schedule
from diffusion_lab.evaluation.nll import discretized_gaussian_log_likelihood, nll_bits_per_dim, normal_kl


def test_normal_kl_closed_form():
    kl = normal_kl(torch.tensor(1.0), torch.tensor(math.log(4.0)), torch.tensor(0.0), torch.tensor(0.0))
    assert kl.item() == pytest.approx(0.5 * (4.0 + 1.0 - 1.0 - math.log(4.0)))
    assert normal_kl(torch.tensor(0.3), torch.tensor(-1.0), torch.tensor(0.3), torch.tensor(-1.0)).item() == 0.0


def test_discretized_likelihood_sums_to_one_over_the_256_bins():
    bins = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    for mean, log_scale in ((0.1, math.log(0.05)), (-0.97, math.log(0.3)), (0.999, math.log(0.01))):
        log_p = discretized_gaussian_log_likelihood(bins, torch.tensor(mean), torch.tensor(log_scale))
        assert log_p.exp().sum().item() == pytest.approx(1.0, abs=1e-6)


def test_the_bound_of_a_model_that_knows_x0_is_prior_plus_decoder():
    """With ε̂ the true noise, every denoising KL is 0, and the decoder term is the mass of a Gaussian of
    variance β̃_1 on the pixel's own bin: −log₂(Φ(δ/σ) − Φ(−δ/σ)) inside, −log₂ Φ(δ/σ) at the edges."""
    diffusion = GaussianDiffusion(make_schedule("linear", 50))
    x0 = torch.tensor([[-1.0, 0.0 - 1 / 255, 0.5 + 1 / 255, 1.0]], dtype=torch.float64).view(1, 1, 2, 2)

    def oracle(x_t, t):
        ab = diffusion.schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
        return (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()

    bits = nll_bits_per_dim(oracle, diffusion, x0, generator=torch.Generator().manual_seed(0))
    assert bits["denoising"].item() == pytest.approx(0.0, abs=1e-9)
    sigma = diffusion.table("posterior_variance", torch.device("cpu"))[1].sqrt().item()
    phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
    inside = -math.log2(phi(1 / 255 / sigma) - phi(-1 / 255 / sigma))
    edge = -math.log2(phi(1 / 255 / sigma))
    assert bits["decoder"].item() == pytest.approx((2 * inside + 2 * edge) / 4, rel=1e-6)
    ab_last = diffusion.schedule.alphas_cumprod[-1].item()
    prior = sum(0.5 * (ab_last * v**2 + (1 - ab_last) - 1 - math.log(1 - ab_last)) for v in x0.flatten().tolist())
    assert bits["prior"].item() == pytest.approx(prior / (4 * math.log(2)), rel=1e-6)
    assert bits["total"].item() == pytest.approx((bits["prior"] + bits["decoder"]).item())


def test_a_worse_denoiser_has_a_larger_bound():
    diffusion = GaussianDiffusion(make_schedule("linear", 50))
    x0 = torch.randint(0, 256, (8, 1, 4, 4), generator=torch.Generator().manual_seed(0)).double() / 127.5 - 1

    def oracle(x_t, t):
        ab = diffusion.schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
        return (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()

    def noisy(x_t, t):
        return oracle(x_t, t) + 0.1

    good = nll_bits_per_dim(oracle, diffusion, x0, generator=torch.Generator().manual_seed(1))["total"]
    bad = nll_bits_per_dim(noisy, diffusion, x0, generator=torch.Generator().manual_seed(1))["total"]
    assert torch.all(bad > good + 0.1)
