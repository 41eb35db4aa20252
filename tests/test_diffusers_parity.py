"""Parity with huggingface diffusers' schedulers (an independent implementation), to 1e-5.

The one intended difference: diffusers' DDIM steps to t − ⌊T/N⌋ even on ``linspace`` grids, where that is not
the next listed timestep (diffusers issue #12633); we step to the next listed timestep, and check that case
against a direct transcription of Song et al.'s update instead.
"""

import math

import diffusers  # a dev dependency: missing means a broken install, which must fail rather than skip
import pytest
import torch

from diffusion_lab.diffusion.process import GaussianDiffusion
from diffusion_lab.diffusion.samplers import sample, sampler_timesteps
from diffusion_lab.diffusion.schedules import make_schedule
from tests.helpers import GaussianDataDenoiser

DIFFUSERS_SCHEDULE_NAMES = {
    "linear": "linear",
    "scaled_linear": "scaled_linear",
    "cosine": "squaredcos_cap_v2",
}
SHAPE = (4, 3, 8, 8)


def initial_noise() -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))


def run_diffusers_loop(scheduler, model, x: torch.Tensor, **step_kwargs) -> torch.Tensor:
    for t in scheduler.timesteps:
        t_batch = torch.full((x.shape[0],), int(t), dtype=torch.long)
        x = scheduler.step(model(x, t_batch), t, x, **step_kwargs).prev_sample
    return x


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "cosine"])
def test_alphas_cumprod_match(name):
    ours = make_schedule(name, 1000).alphas_cumprod
    theirs = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule=DIFFUSERS_SCHEDULE_NAMES[name])
    assert torch.allclose(ours, theirs.alphas_cumprod.double(), atol=1e-5, rtol=0)


def test_scaled_linear_with_latent_diffusion_betas_matches():
    ours = make_schedule("scaled_linear", 1000, beta_start=0.00085, beta_end=0.012).alphas_cumprod
    theirs = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    assert torch.allclose(ours, theirs.alphas_cumprod.double(), atol=1e-5, rtol=0)


def test_zero_terminal_snr_matches():
    ours = make_schedule("linear", 1000, rescale_betas_zero_snr=True).alphas_cumprod
    theirs = diffusers.DDIMScheduler(rescale_betas_zero_snr=True).alphas_cumprod
    assert torch.allclose(ours, theirs.double(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_add_noise_matches_q_sample(name):
    diffusion = GaussianDiffusion(make_schedule(name, 1000))
    scheduler = diffusers.DDPMScheduler(beta_schedule=DIFFUSERS_SCHEDULE_NAMES[name])
    generator = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(SHAPE, generator=generator), torch.randn(SHAPE, generator=generator)
    t = torch.tensor([0, 17, 500, 999])
    assert torch.allclose(diffusion.q_sample(x0, t, noise), scheduler.add_noise(x0, noise, t), atol=1e-5)


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("num_steps", [10, 30, 50])
def test_timestep_grids_match(spacing, num_steps):
    ddim = diffusers.DDIMScheduler(timestep_spacing=spacing)
    ddim.set_timesteps(num_steps)
    assert sampler_timesteps("ddim", 1000, num_steps, spacing).tolist() == ddim.timesteps.tolist()
    dpm = diffusers.DPMSolverMultistepScheduler(timestep_spacing=spacing)
    dpm.set_timesteps(num_steps)
    assert sampler_timesteps("dpm_solver++", 1000, num_steps, spacing).tolist() == dpm.timesteps.tolist()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("clip_sample", [True, False])
def test_ddim_eta0_loop_matches(prediction_type, spacing, clip_sample):
    """diffusers' DDIM defaults (clip_sample=True, set_alpha_to_one=True) apart from the varied options."""
    schedule = make_schedule("linear", 1000)
    # Data at 0.8 ± 0.5 pushes x̂₀ past 1, so clipping really acts.
    model = GaussianDataDenoiser(schedule, prediction_type, mean=0.8, std=0.5)
    scheduler = diffusers.DDIMScheduler(
        prediction_type=prediction_type, timestep_spacing=spacing, clip_sample=clip_sample
    )
    scheduler.set_timesteps(50)
    theirs = run_diffusers_loop(scheduler, model, initial_noise(), eta=0.0)
    ours = sample(
        model,
        schedule,
        SHAPE,
        sampler="ddim",
        num_steps=50,
        timestep_spacing=spacing,
        prediction_type=prediction_type,
        clip_sample=clip_sample,
        noise=initial_noise(),
    )
    assert (ours - theirs).abs().max().item() <= 1e-5


def reference_ddim(model, alphas_cumprod, timesteps, x):
    """Song et al. eq. (12) with η = 0, stepping through the listed timesteps and then to ᾱ = 1."""
    for i, t in enumerate(timesteps):
        ab = alphas_cumprod[t].item()
        ab_prev = alphas_cumprod[timesteps[i + 1]].item() if i + 1 < len(timesteps) else 1.0
        eps = model(x, torch.full((x.shape[0],), t))
        x0 = (x - math.sqrt(1 - ab) * eps) / math.sqrt(ab)
        x = math.sqrt(ab_prev) * x0 + math.sqrt(1 - ab_prev) * eps
    return x


def test_ddim_linspace_steps_to_the_next_listed_timestep():
    schedule = make_schedule("linear", 1000)
    model = GaussianDataDenoiser(schedule, "epsilon")
    timesteps = sampler_timesteps("ddim", 1000, 30, "linspace").tolist()
    expected = reference_ddim(model, schedule.alphas_cumprod, timesteps, initial_noise().double())
    ours = sample(
        model,
        schedule,
        SHAPE,
        sampler="ddim",
        num_steps=30,
        timestep_spacing="linspace",
        noise=initial_noise().double(),
        dtype=torch.float64,
    )
    assert (ours - expected).abs().max().item() <= 1e-10
    # diffusers' linspace DDIM is the documented divergence: it lands elsewhere.
    scheduler = diffusers.DDIMScheduler(timestep_spacing="linspace", clip_sample=False)
    scheduler.set_timesteps(30)
    theirs = run_diffusers_loop(scheduler, model, initial_noise())
    assert (ours.float() - theirs).abs().max().item() > 1e-3


def run_both_dpm_solvers(schedule_name, prediction_type, spacing, num_steps, dtype=torch.float32):
    schedule = make_schedule(schedule_name, 1000)
    model = GaussianDataDenoiser(schedule, prediction_type)
    scheduler = diffusers.DPMSolverMultistepScheduler(
        beta_schedule=DIFFUSERS_SCHEDULE_NAMES[schedule_name],
        prediction_type=prediction_type,
        timestep_spacing=spacing,
    )
    scheduler.set_timesteps(num_steps)
    theirs = run_diffusers_loop(scheduler, model, initial_noise())
    ours = sample(
        model,
        schedule,
        SHAPE,
        sampler="dpm_solver++",
        num_steps=num_steps,
        timestep_spacing=spacing,
        prediction_type=prediction_type,
        noise=initial_noise().to(dtype),
        dtype=dtype,
    )
    return ours, theirs


@pytest.mark.parametrize(
    ("schedule_name", "prediction_type", "spacing"),
    [("linear", p, s) for p in ("epsilon", "v_prediction") for s in ("leading", "linspace", "trailing")]
    + [("cosine", "v_prediction", s) for s in ("leading", "linspace", "trailing")]
    + [("cosine", "epsilon", "leading")],
)
def test_dpm_solver_2m_loop_matches(schedule_name, prediction_type, spacing):
    """diffusers' DPMSolverMultistepScheduler defaults: order 2, dpmsolver++, midpoint, final σ = 0."""
    ours, theirs = run_both_dpm_solvers(schedule_name, prediction_type, spacing, num_steps=20)
    assert (ours - theirs).abs().max().item() <= 1e-5


@pytest.mark.parametrize("spacing", ["linspace", "trailing"])
def test_dpm_solver_on_cosine_from_pure_noise_is_exact_where_float32_diffusers_is_not(spacing):
    """Cosine's ᾱ_999 = 2.4e-9: recovering x̂₀ from ε there multiplies float32 rounding by 1/√ᾱ = 2e4.
    Our float64 coefficients keep the float32 run within 1e-5 of a float64 run; diffusers' float32
    coefficients land ~3e-4 away from it, so the two agree only to that level."""
    ours, theirs = run_both_dpm_solvers("cosine", "epsilon", spacing, num_steps=25)
    exact, _ = run_both_dpm_solvers("cosine", "epsilon", spacing, num_steps=25, dtype=torch.float64)
    assert (ours.double() - exact).abs().max().item() <= 1e-5
    assert (theirs.double() - exact).abs().max().item() <= 1e-3


@pytest.mark.parametrize(("num_steps", "spacing"), [(1000, "leading"), (50, "leading"), (50, "linspace")])
def test_ddpm_ancestral_loop_matches_with_the_same_generator(num_steps, spacing):
    """Stochastic, so both draw from identically seeded generators (same draws in the same order).

    Over all 1000 steps diffusers recovers each β_t as 1 − ᾱ_t/ᾱ_{t−1} from float32 ᾱ (up to 5e-4 relative
    error), which drifts its chain ~4e-5 from a float64 run; ours stays within 1e-5 of it."""
    schedule = make_schedule("linear", 1000)
    model = GaussianDataDenoiser(schedule, "epsilon")
    scheduler = diffusers.DDPMScheduler(timestep_spacing=spacing)  # fixed_small, clip_sample=True
    scheduler.set_timesteps(num_steps)
    theirs = run_diffusers_loop(scheduler, model, initial_noise(), generator=torch.Generator().manual_seed(5))

    def ours(dtype):
        return sample(
            model,
            schedule,
            SHAPE,
            sampler="ddpm",
            num_steps=num_steps,
            timestep_spacing=spacing,
            clip_sample=True,
            noise=initial_noise().to(dtype),
            generator=torch.Generator().manual_seed(5),
            dtype=dtype,
        )

    ours32, exact = ours(torch.float32), ours(torch.float64)
    assert (ours32.double() - exact).abs().max().item() <= 1e-5
    tolerance = 1e-4 if num_steps == 1000 else 1e-5
    assert (ours32 - theirs).abs().max().item() <= tolerance


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm_solver++"])
def test_x0_prediction_matches_for_every_sampler(sampler):
    """prediction_type='sample' (the network predicts x₀) through each of diffusers' three schedulers."""
    schedule = make_schedule("linear", 1000)
    model = GaussianDataDenoiser(schedule, "sample")
    kwargs, step_kwargs = {}, {}
    if sampler == "ddpm":
        scheduler = diffusers.DDPMScheduler(prediction_type="sample", timestep_spacing="leading", clip_sample=True)
        step_kwargs = {"generator": torch.Generator().manual_seed(5)}
        kwargs = {"generator": torch.Generator().manual_seed(5), "timestep_spacing": "leading", "clip_sample": True}
    elif sampler == "ddim":
        scheduler = diffusers.DDIMScheduler(prediction_type="sample", timestep_spacing="trailing", clip_sample=True)
        kwargs = {"timestep_spacing": "trailing", "clip_sample": True}
    else:
        scheduler = diffusers.DPMSolverMultistepScheduler(prediction_type="sample", timestep_spacing="trailing")
        kwargs = {"timestep_spacing": "trailing", "clip_sample": False}
    scheduler.set_timesteps(25)
    theirs = run_diffusers_loop(scheduler, model, initial_noise(), **step_kwargs)
    ours = sample(
        model, schedule, SHAPE, sampler=sampler, num_steps=25, prediction_type="sample", noise=initial_noise(),
        **kwargs,
    )  # fmt: skip
    assert (ours - theirs).abs().max().item() <= 1e-5


@pytest.mark.parametrize("eta", [0.3, 0.7])
def test_ddim_with_eta_between_zero_and_one_matches_with_the_same_generator(eta):
    """0 < η < 1 interpolates DDIM and DDPM's noise; both implementations draw it from the same generator."""
    schedule = make_schedule("linear", 1000)
    model = GaussianDataDenoiser(schedule, "epsilon")
    scheduler = diffusers.DDIMScheduler(timestep_spacing="trailing", clip_sample=False)
    scheduler.set_timesteps(20)
    theirs = run_diffusers_loop(scheduler, model, initial_noise(), eta=eta, generator=torch.Generator().manual_seed(9))
    ours = sample(
        model, schedule, SHAPE, sampler="ddim", num_steps=20, eta=eta, timestep_spacing="trailing", clip_sample=False,
        noise=initial_noise(), generator=torch.Generator().manual_seed(9),
    )  # fmt: skip
    assert (ours - theirs).abs().max().item() <= 1e-5
    deterministic = sample(
        model, schedule, SHAPE, sampler="ddim", num_steps=20, timestep_spacing="trailing", clip_sample=False,
        noise=initial_noise(),
    )  # fmt: skip
    assert (ours - deterministic).abs().max().item() > 1e-2  # η really adds noise


def test_dpm_solver_with_clip_sample_matches_diffusers_fed_the_clipped_x0():
    """Our DPM-Solver++ clips x̂₀ to [−1, 1] by default (clip_sample=True). diffusers' solver has no such
    option, but in data-prediction form it consumes x̂₀ directly: fed a network that returns the clipped x̂₀
    (prediction_type='sample'), it must take exactly our clipped steps."""
    schedule = make_schedule("linear", 1000)
    model = GaussianDataDenoiser(schedule, "epsilon", mean=0.8, std=0.5)  # x̂₀ often beyond 1: clipping acts
    ab = schedule.alphas_cumprod

    def clipped_x0(x, t):
        a = ab[t].to(x).reshape(-1, 1, 1, 1)
        return ((x - (1 - a).sqrt() * model(x, t)) / a.sqrt()).clamp(-1, 1)

    scheduler = diffusers.DPMSolverMultistepScheduler(prediction_type="sample", timestep_spacing="trailing")
    scheduler.set_timesteps(20)
    theirs = run_diffusers_loop(scheduler, clipped_x0, initial_noise().double()).float()
    ours = sample(
        model, schedule, SHAPE, sampler="dpm_solver++", num_steps=20, timestep_spacing="trailing", clip_sample=True,
        noise=initial_noise(),
    )  # fmt: skip
    assert (ours - theirs).abs().max().item() <= 1e-4
    unclipped = sample(
        model, schedule, SHAPE, sampler="dpm_solver++", num_steps=20, timestep_spacing="trailing", clip_sample=False,
        noise=initial_noise(),
    )  # fmt: skip
    assert (ours - unclipped).abs().max().item() > 1e-2
