"""Consistency distillation: the boundary condition by parameterisation, the loss against the exact ODE map of
Gaussian data (closed form), the multistep sampler's distribution, and the distill job's consistency students."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from diffusion_lab.diffusion import make_schedule, sample
from diffusion_lab.diffusion.consistency import ConsistencyParameterisation, consistency_grid, sampling_grid
from diffusion_lab.lit.consistency import ConsistencyDistillation
from tests.test_distillation import DISTILL, ExactTeacher, final_state

MEAN, STD = 0.3, 0.5


def exact_consistency_function(parameterisation, z, t, mean=MEAN, std=STD):
    """The probability-flow ODE's map to t = 0 for data N(mean, std²), in x̃ = z/α: (x̃ − μ)/√(s² + σ²) is constant
    along a trajectory, so x̃(σ_min) = μ + (x̃ − μ)·√(s² + σ_min²)/√(s² + σ²)."""
    sigma = parameterisation.sigma(t, z)
    x_tilde = z * (1.0 + sigma.square()).sqrt()  # z/α with α = 1/√(1 + σ²)
    scale = math.sqrt(std**2 + parameterisation.sigma_min**2) / (std**2 + sigma.square()).sqrt()
    return mean + (x_tilde - mean) * scale


def exact_ode_step(parameterisation, z, t, s, mean=MEAN, std=STD):
    """The exact ODE's point at s from z at t (VP coordinates)."""
    sigma_t, sigma_s = parameterisation.sigma(t, z), parameterisation.sigma(s, z)
    x_tilde = z * (1.0 + sigma_t.square()).sqrt()
    x_tilde_s = mean + (x_tilde - mean) * ((std**2 + sigma_s.square()) / (std**2 + sigma_t.square())).sqrt()
    return x_tilde_s / (1.0 + sigma_s.square()).sqrt()


class ExactConsistencyNet(nn.Module):
    """The v-prediction for which f(z, t) is the exact ODE map of N(mean, std²) data (any output at t = 0, where
    f ignores it)."""

    def __init__(self, schedule, mean=MEAN, std=STD) -> None:
        super().__init__()
        self.parameterisation = ConsistencyParameterisation(schedule.alphas_cumprod)
        self.alphas_cumprod = schedule.alphas_cumprod
        self.mean, self.std = mean, std
        self.unused = nn.Parameter(torch.zeros(()))  # an optimiser needs something to hold

    def forward(self, z, t, labels=None):
        p = self.parameterisation
        target = exact_consistency_function(p, z, t, self.mean, self.std)
        c_skip = p.c_skip(t, z)
        x_tilde = z * (1.0 + p.sigma(t, z).square()).sqrt()
        x0 = torch.where(c_skip < 1.0, (target - c_skip * x_tilde) / (1.0 - c_skip).clamp(min=1e-30), x_tilde)
        alpha_cumprod = self.alphas_cumprod[t.cpu()].to(z).reshape(-1, *([1] * (z.ndim - 1)))
        return (alpha_cumprod.sqrt() * z - x0) / (1.0 - alpha_cumprod).sqrt() + 0.0 * self.unused


class ExactODEDistillation(ConsistencyDistillation):
    """Consistency distillation from a teacher whose step is the exact ODE map (a perfect solver)."""

    def teacher_step(self, z, t, s, labels):
        return exact_ode_step(self.parameterisation, z, t, s)


def distiller(schedule, net, num_intervals=16, cls=ConsistencyDistillation, **settings):
    return cls(
        teacher=ExactTeacher(schedule), teacher_prediction_type="epsilon", num_intervals=num_intervals,
        pairs=settings.pop("pairs", "teacher"), num_steps=1, huber_c=0.0, net=net, schedule=schedule,
        sampler={"clip_sample": False}, **settings,
    )  # fmt: skip


def gaussian_data(n, generator, dtype=torch.float64):
    return MEAN + STD * torch.randn(n, 1, 2, 2, generator=generator, dtype=dtype)


def test_the_boundary_holds_by_parameterisation_whatever_the_network_says():
    schedule = make_schedule("cosine", 1000)
    f = ConsistencyParameterisation(schedule.alphas_cumprod)
    generator = torch.Generator().manual_seed(0)
    z, x0 = torch.randn(3, 1, 4, 4, generator=generator), torch.randn(3, 1, 4, 4, generator=generator)
    at_boundary = torch.zeros(3, dtype=torch.long)
    alpha_min = schedule.alphas_cumprod[0].sqrt().float()
    assert torch.equal(f(z, at_boundary, x0), f(z, at_boundary, 100 * x0))
    assert torch.allclose(f(z, at_boundary, x0), z / alpha_min, rtol=0, atol=1e-7)
    late = torch.full((3,), 999)
    assert torch.allclose(f(z, late, x0), x0, atol=1e-4)  # far from the boundary f is the network's x̂₀
    assert consistency_grid(1000, 4).tolist() == [999, 749, 500, 250, 0]
    assert sampling_grid(1000, 2).tolist() == [999, 500] and sampling_grid(1000, 4).tolist() == [999, 749, 500, 250]


def test_the_loss_vanishes_for_the_exact_ode_map_and_not_for_a_wrong_one():
    schedule = make_schedule("cosine", 1000)
    generator = torch.Generator().manual_seed(1)
    exact = distiller(schedule, ExactConsistencyNet(schedule), cls=ExactODEDistillation)
    x0 = gaussian_data(4096, generator)
    loss = exact.distillation_loss(exact.net, x0, None, generator)[0].detach()
    wrong = distiller(schedule, ExactConsistencyNet(schedule, std=0.6), cls=ExactODEDistillation)
    wrong_loss = wrong.distillation_loss(wrong.net, x0, None, torch.Generator().manual_seed(1))[0].detach()
    assert float(loss.mean()) < 1e-5 * float(wrong_loss.mean()), (float(loss.mean()), float(wrong_loss.mean()))
    assert float(wrong_loss.mean()) > 1e-3


def test_distilling_from_a_ddim_teacher_converges_to_the_exact_map_as_the_grid_refines():
    """With the exact model, the only loss left is the teacher's DDIM error, which shrinks as the grid refines."""
    schedule = make_schedule("cosine", 1000)
    losses = {}
    for intervals in (8, 64):
        model = distiller(schedule, ExactConsistencyNet(schedule), num_intervals=intervals)
        generator = torch.Generator().manual_seed(2)
        losses[intervals] = float(model.distillation_loss(model.net, gaussian_data(8192, generator), None,
                                                          generator)[0].mean())  # fmt: skip
    assert 0 < losses[64] < losses[8] / 6, losses  # first order: 8× finer, ~8× smaller


@pytest.mark.parametrize("num_steps", [1, 2, 4])
def test_the_consistency_sampler_draws_the_data_distribution_from_the_exact_function(num_steps):
    schedule = make_schedule("cosine", 1000)
    net = ExactConsistencyNet(schedule)
    generator = torch.Generator().manual_seed(3)
    x = sample(lambda z, t: net(z, t), schedule, (20000, 1, 1, 1), sampler="consistency", num_steps=num_steps,
               prediction_type="v_prediction", clip_sample=False, generator=generator, dtype=torch.float64)  # fmt: skip
    sigma_min = ConsistencyParameterisation(schedule.alphas_cumprod).sigma_min
    assert abs(float(x.mean()) - MEAN) < 0.02
    assert abs(float(x.std()) - math.sqrt(STD**2 + sigma_min**2)) < 0.02


def test_consistency_training_pairs_need_no_teacher_and_bad_settings_are_refused():
    schedule = make_schedule("cosine", 1000)
    tuned = distiller(schedule, ExactConsistencyNet(schedule), pairs="data")
    calls = []
    tuned._teacher[0] = nn.Module()
    tuned._teacher[0].forward = lambda *args: calls.append(args)  # would be called by a teacher step
    generator = torch.Generator().manual_seed(4)
    loss = tuned.distillation_loss(tuned.net, gaussian_data(256, generator), None, generator)[0]
    assert torch.isfinite(loss).all() and not calls
    with pytest.raises(ValueError, match=r"pairs='ode': use 'teacher'"):
        distiller(schedule, ExactConsistencyNet(schedule), pairs="ode")
    with pytest.raises(ValueError, match=r"num_intervals=1000 must lie between 1 and"):
        distiller(schedule, ExactConsistencyNet(schedule), num_intervals=1000)


CONSISTENCY = ["distillation=consistency", "distillation.total_steps=6", "distillation.checkpoint_every=3",
               "distillation.num_intervals=8"]  # fmt: skip
SHARED = [item for item in DISTILL if not item.startswith("distillation.")]


def test_the_distill_job_writes_consistency_students_that_sample_in_their_calls_and_resume_bit_exact(
    checkpoint, compose_config, tmp_path
):
    from omegaconf import OmegaConf

    from diffusion_lab.distill import distill
    from diffusion_lab.evaluation.job import evaluate
    from diffusion_lab.runs.checkpoints import load_checkpoint, load_module
    from diffusion_lab.runs.records import read_records

    straight = tmp_path / "straight"
    cfg = compose_config([f"teacher={checkpoint}", *SHARED, *CONSISTENCY], run_dir=straight, config_name="distill")
    (straight / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, straight / ".hydra" / "config.yaml")
    distill(cfg)
    stored = load_checkpoint(straight / "checkpoints" / "last.ckpt")
    config = stored["diffusion_lab_config"]
    assert config["sampler"]["sampler"] == "consistency" and config["sampler"]["num_steps"] == 2
    assert config["objective"]["prediction_type"] == "v_prediction"
    module, _ = load_module(straight / "checkpoints" / "last.ckpt")
    assert type(module).__name__ == "DiffusionModule"
    samples = module.generate(seeds=range(2))
    assert torch.isfinite(samples).all() and samples.abs().max() <= 1.0

    evaluate(compose_config([f"runs={straight}", "checkpoints=last", "num_samples=16", "eval.features=digits",
                             "reference_split=train", "metrics=[fid]", "grid.num_steps=[1,4]"],
                            config_name="evaluate"))  # fmt: skip
    protocols = [record["protocol"] for record in read_records(straight)]
    assert sorted(p["nfe_per_sample"] for p in protocols) == [1, 4]  # the student's own sampler at the grid's steps
    assert {p["sampler"]["sampler"] for p in protocols} == {"consistency"}

    resumed = tmp_path / "resumed"
    distill(compose_config([f"teacher={checkpoint}", *SHARED, *CONSISTENCY, "trainer.max_steps=4"], run_dir=resumed,
                           config_name="distill"))  # fmt: skip
    distill(compose_config([f"teacher={checkpoint}", *SHARED, *CONSISTENCY, "ckpt_path=auto"], run_dir=resumed,
                           config_name="distill"))  # fmt: skip
    expected = final_state(straight / "checkpoints" / "last.ckpt")
    got = final_state(resumed / "checkpoints" / "last.ckpt")
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


def test_a_students_own_sampler_takes_the_command_lines_keys_and_yields_to_a_chosen_option(monkeypatch, compose_config):
    from diffusion_lab.config import build

    stored = {"distillation": {"method": "consistency"}, "sampler": {"sampler": "consistency", "num_steps": 2}}
    cfg = compose_config(["sampler.num_steps=1"], config_name="evaluate")
    monkeypatch.setattr(build, "command_line_overrides", lambda: ["sampler.num_steps=1"])
    assert build.checkpoint_sampler(cfg, stored) == {"sampler": "consistency", "num_steps": 1}
    monkeypatch.setattr(build, "command_line_overrides", lambda: ["sampler=heun"])
    assert build.checkpoint_sampler(cfg, stored) is None  # the job chose another sampler
    monkeypatch.setattr(build, "command_line_overrides", lambda: [])
    assert build.checkpoint_sampler(cfg, stored) == stored["sampler"]
    assert build.checkpoint_sampler(cfg, {"sampler": stored["sampler"]}) is None  # not a student
