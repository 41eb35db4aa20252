"""Learned reverse variance (Nichol & Dhariwal 2021): the learned_range interpolation on full and respaced
chains, the VLB terms against their closed forms, the hybrid objective's stop-gradient, and objective=hybrid
end to end (train → sample → NLL)."""

import math

import pytest
import torch
from torch import nn

from diffusion_lab.diffusion import GaussianDiffusion, make_loss_weighting, make_schedule
from diffusion_lab.diffusion.likelihood import vlb_term
from diffusion_lab.diffusion.samplers import classifier_free_guidance, sample
from diffusion_lab.lit.module import DiffusionModule
from tests.conftest import FAST

LINEAR = make_schedule("linear", 1000)


def with_variance(model, v: float):
    """A learned-variance model: ``model``'s ε and a constant interpolation weight v."""
    return lambda x, t: torch.cat([model(x, t), torch.full_like(x, v)], dim=1)


def zero_eps(x, t):
    return torch.zeros_like(x)


def test_learned_range_interpolates_the_respaced_chains_own_beta_and_posterior_variance():
    """On a respaced chain the range ends are the respaced β'_i = 1 − ᾱ[s_i]/ᾱ[s_{i−1}] and β̃'_i, not the
    full schedule's β at s_i (the trap diffusers fixed in PR #3006)."""
    kept = [0, 250, 500, 750, 999]
    diffusion = GaussianDiffusion(LINEAR.respace(torch.tensor(kept)))
    ab = [LINEAR.alphas_cumprod[k].item() for k in kept]
    x = torch.zeros(1, 1, 1, 1, dtype=torch.float64)
    for i in (1, 3, 4):
        beta = 1 - ab[i] / ab[i - 1]
        posterior = beta * (1 - ab[i - 1]) / (1 - ab[i])
        t = torch.tensor([i])
        for v, expected in ((1.0, math.log(beta)), (-1.0, math.log(posterior)),
                            (0.5, 0.75 * math.log(beta) + 0.25 * math.log(posterior))):  # fmt: skip
            output = torch.cat([x, torch.full_like(x, v)], dim=1)
            assert diffusion.p_log_variance(t, x, "learned_range", output).item() == pytest.approx(expected, rel=1e-12)
        assert math.log(beta) > 10 * LINEAR.betas[kept[i]].log().item() / 10  # far above the full schedule's β
        assert beta > 5 * LINEAR.betas[kept[i]].item()


@pytest.mark.parametrize(("v", "fixed"), [(1.0, "fixed_large"), (-1.0, "fixed_small")])
def test_ddpm_with_a_learned_variance_at_the_range_ends_is_the_fixed_sampler(v, fixed):
    """v = +1 is σ² = β, v = −1 is σ² = β̃: with the same generator the chains must agree exactly, respaced."""
    noise = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def draw(model, variance_type):
        return sample(model, LINEAR, noise.shape, sampler="ddpm", num_steps=20, variance_type=variance_type,
                      noise=noise, dtype=torch.float64, generator=torch.Generator().manual_seed(1))  # fmt: skip

    model = lambda x, t: 0.1 * x  # noqa: E731
    learned = draw(with_variance(model, v), "learned_range")
    assert torch.allclose(learned, draw(model, fixed), atol=1e-12)
    assert not torch.allclose(learned, draw(model, "fixed_small" if fixed == "fixed_large" else "fixed_large"))


def test_vlb_terms_are_the_closed_form_kl_and_the_discretised_decoder_in_bits_per_dim():
    diffusion = GaussianDiffusion(make_schedule("linear", 50), "epsilon")
    x0 = torch.tensor([-1.0, -0.2, 0.4, 1.0], dtype=torch.float64).view(1, 1, 2, 2)
    x_t = torch.tensor([0.3, -0.7, 0.1, 0.9], dtype=torch.float64).view(1, 1, 2, 2)
    eps, v = 0.25, 0.2
    output = torch.cat([torch.full_like(x0, eps), torch.full_like(x0, v)], dim=1)
    sched = diffusion.schedule
    ab, betas = sched.alphas_cumprod.tolist(), sched.betas.tolist()

    # t = 7: KL(q(x_6 | x_7, x0) ‖ p(x_6 | x_7)) by hand, averaged over the 4 pixels, in bits
    t, a, a_prev, beta = 7, ab[7], ab[6], betas[7]
    posterior_var = beta * (1 - a_prev) / (1 - a)
    log_var = (v + 1) / 2 * math.log(beta) + (1 - v) / 2 * math.log(posterior_var)
    kls = []
    for x0_i, xt_i in zip(x0.flatten().tolist(), x_t.flatten().tolist(), strict=True):
        coef_x0, coef_xt = beta * math.sqrt(a_prev) / (1 - a), (1 - a_prev) * math.sqrt(1 - beta) / (1 - a)
        true_mean = coef_x0 * x0_i + coef_xt * xt_i
        x0_hat = (xt_i - math.sqrt(1 - a) * eps) / math.sqrt(a)
        model_mean = coef_x0 * x0_hat + coef_xt * xt_i
        diff = true_mean - model_mean
        kls.append(0.5 * (-1 + log_var - math.log(posterior_var) + math.exp(math.log(posterior_var) - log_var)
                          + diff**2 * math.exp(-log_var)))  # fmt: skip
    term = vlb_term(diffusion, x0, x_t, torch.tensor([t]), output, "learned_range")
    assert term.item() == pytest.approx(sum(kls) / 4 / math.log(2), rel=1e-10)

    # t = 0: the decoder's −log₂ of the Gaussian mass on each pixel's bin (edges to ±∞), at an x_0-state whose
    # x̂₀ lies within a few bins of x0 (so every mass is representable)
    a0 = ab[0]
    offsets = torch.tensor([0.003, -0.002, 0.001, -0.004], dtype=torch.float64).view(1, 1, 2, 2)
    x_t = math.sqrt(a0) * (x0 + offsets) + math.sqrt(1 - a0) * eps
    log_var0 = (v + 1) / 2 * math.log(betas[0]) + (1 - v) / 2 * math.log(betas[1] * (1 - ab[0]) / (1 - ab[1]))
    sigma = math.exp(0.5 * log_var0)
    phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
    bits = []
    for x0_i, xt_i in zip(x0.flatten().tolist(), x_t.flatten().tolist(), strict=True):
        mean = (xt_i - math.sqrt(1 - a0) * eps) / math.sqrt(a0)  # β̃_0 = 0: the posterior mean is x̂₀
        upper, lower = (x0_i - mean + 1 / 255) / sigma, (x0_i - mean - 1 / 255) / sigma
        mass = phi(upper) if x0_i < -0.999 else 1 - phi(lower) if x0_i > 0.999 else phi(upper) - phi(lower)
        bits.append(-math.log2(mass))
    decoder = vlb_term(diffusion, x0, x_t, torch.tensor([0]), output, "learned_range")
    assert decoder.item() == pytest.approx(sum(bits) / 4, rel=1e-8)


class Constant(nn.Module):
    """A 'network' whose output is one trainable tensor: the loss's gradients land on it directly."""

    in_channels, out_channels, image_size = 1, 2, 2

    def __init__(self, output: torch.Tensor) -> None:
        super().__init__()
        self.output = nn.Parameter(output.clone())

    def forward(self, x, t):
        return self.output


def test_the_hybrid_objective_stops_the_vlb_gradient_at_the_mean():
    """∂L_hybrid/∂(prediction) is ∂L_simple/∂(prediction) alone; ∂L_hybrid/∂v is λ·T·∂L_t/∂v."""
    generator = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 1, 2, 2, generator=generator) * 2 - 1
    noise = torch.randn(4, 1, 2, 2, generator=generator)
    t = torch.tensor([0, 3, 400, 999])
    start = torch.randn(4, 2, 2, 2, generator=generator) * 0.3

    def module(learned: bool, weight: float = 0.001) -> DiffusionModule:
        net = Constant(start) if learned else Constant(start[:, :1])
        return DiffusionModule(net, LINEAR, "epsilon", make_loss_weighting("uniform"), torch.optim.SGD,
                               learned_variance=learned, vlb_weight=weight)  # fmt: skip

    hybrid = module(True)
    hybrid.per_sample_loss(hybrid.net, x0, None, t, noise).sum().backward()
    simple = module(False)
    simple.net.in_channels = simple.net.out_channels = 1
    simple.per_sample_loss(simple.net, x0, None, t, noise).sum().backward()
    assert torch.allclose(hybrid.net.output.grad[:, :1], simple.net.output.grad, atol=1e-7)

    variance = start[:, 1:].clone().requires_grad_(True)
    x_t = hybrid.diffusion.q_sample(x0, t, noise)
    vlb = vlb_term(hybrid.diffusion, x0, x_t, t, torch.cat([start[:, :1], variance], dim=1), "learned_range")
    (0.001 * 1000 * vlb).sum().backward()
    assert torch.allclose(hybrid.net.output.grad[:, 1:], variance.grad, atol=1e-7)
    assert variance.grad.abs().sum() > 0


def test_a_learned_variance_network_must_output_twice_the_channels():
    with pytest.raises(ValueError, match=r"learned_variance needs a network with 2 × 1 output channels .* got 1"):
        net = Constant(torch.zeros(1, 1, 2, 2))
        net.out_channels = 1
        DiffusionModule(net, LINEAR, "epsilon", make_loss_weighting("uniform"), torch.optim.SGD, learned_variance=True)


def test_guidance_guides_the_prediction_and_keeps_the_conditional_variance():
    cond = lambda x, t: torch.cat([torch.full_like(x, 2.0), torch.full_like(x, 0.3)], dim=1)  # noqa: E731
    uncond = lambda x, t: torch.cat([torch.full_like(x, 0.5), torch.full_like(x, -0.9)], dim=1)  # noqa: E731
    guided = classifier_free_guidance(cond, uncond, 3.0, guided_channels=1)(torch.zeros(2, 1, 2, 2), None)
    assert torch.all(guided[:, :1] == 4 * 2.0 - 3 * 0.5) and torch.all(guided[:, 1:] == 0.3)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"sampler": "ddim", "variance_type": "learned_range"}, r"learned_range applies only to sampler=ddpm"),
        ({"sampler": "ddpm", "variance_type": "learned"}, r"Unknown variance_type 'learned'"),
    ],
)
def test_bad_variance_settings_are_one_clear_error(settings, message):
    with pytest.raises(ValueError, match=message):
        sample(zero_eps, LINEAR, (1, 1, 2, 2), **settings)


def test_objective_hybrid_trains_samples_and_scores_its_likelihood(tmp_path, compose_config, capsys):
    """End to end: the checkpoint says it learned its variance, DDPM samples with it (other samplers with the
    mean alone), metrics=[nll] uses it, and asking learned_range of a fixed-variance checkpoint is one line."""
    from diffusion_lab.cli.user_errors import report_user_errors
    from diffusion_lab.evaluation.job import evaluate
    from diffusion_lab.runs.checkpoints import load_module
    from diffusion_lab.sample import sample as sample_job
    from diffusion_lab.train import train

    runs = {}
    for objective in ("hybrid", "epsilon"):
        run = tmp_path / objective
        train(compose_config([*FAST, f"objective={objective}", "callbacks.sample_grid=null"], run_dir=run))
        runs[objective] = run / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(runs["hybrid"], weights_only=False, map_location="cpu")
    assert checkpoint["diffusion_lab_config"]["objective"] == {
        "kind": "ddpm", "prediction_type": "epsilon", "learned_variance": True, "vlb_weight": 0.001,
    }  # fmt: skip
    module, _ = load_module(str(runs["hybrid"]))
    assert module.learned_variance and module.net.out_channels == 2
    assert module.resolve_sampler_settings(sampler="ddpm")["variance_type"] == "learned_range"
    for sampler in ("ddpm", "ddim", "heun"):
        images = module.generate(seeds=[0, 1], sampler=sampler, num_steps=10)
        assert images.shape == (2, 1, 8, 8) and torch.isfinite(images).all()

    nll = evaluate(compose_config([f"ckpt_path={runs['hybrid']}", "metrics=[nll]", "nll.num_batches=1",
                                   "nll.batch_size=4"], run_dir=tmp_path / "nll", config_name="evaluate"))  # fmt: skip
    assert nll["protocol"]["nll_variance_type"] == "learned_range" and math.isfinite(nll["metrics"]["nll_bpd"])

    overrides = [f"ckpt_path={runs['epsilon']}", "sampler=ddpm", "sampler.num_steps=10",
                 "sampler.variance_type=learned_range"]  # fmt: skip
    cfg = compose_config(overrides, run_dir=tmp_path / "bad", config_name="sample")
    with pytest.raises(SystemExit):
        report_user_errors(sample_job, cfg)
    assert "variance_type=learned_range needs a model that learned its variance" in capsys.readouterr().err
