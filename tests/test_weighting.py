"""Loss weightings: the stated formulas, and the same effective objective whatever the network predicts."""

import pytest
import torch

from diffusion_lab.diffusion.process import GaussianDiffusion
from diffusion_lab.diffusion.schedules import make_schedule
from diffusion_lab.diffusion.weighting import make_loss_weighting

SCHEDULE = make_schedule("linear", 1000)
T_INDICES = torch.tensor([0, 10, 100, 400, 999])
SNR = SCHEDULE.snr[T_INDICES]


def weights(name, prediction_type, **params):
    return make_loss_weighting(name, **params)(GaussianDiffusion(SCHEDULE, prediction_type), T_INDICES)


@pytest.mark.parametrize(
    ("name", "params", "prediction_type", "expected"),
    [
        ("uniform", {}, "epsilon", torch.ones_like(SNR)),
        ("uniform", {}, "v_prediction", torch.ones_like(SNR)),
        ("snr", {}, "epsilon", torch.ones_like(SNR)),
        ("snr", {}, "sample", SNR),
        ("snr", {}, "v_prediction", SNR / (SNR + 1)),
        # Min-SNR-γ as Hang et al. and diffusers' training scripts write it.
        ("min_snr", {"gamma": 5.0}, "epsilon", torch.minimum(SNR, torch.tensor(5.0)) / SNR),
        ("min_snr", {"gamma": 5.0}, "sample", torch.minimum(SNR, torch.tensor(5.0))),
        ("min_snr", {"gamma": 5.0}, "v_prediction", torch.minimum(SNR, torch.tensor(5.0)) / (SNR + 1)),
        ("p2", {"gamma": 1.0, "k": 1.0}, "epsilon", 1 / (1 + SNR)),
        ("p2", {"gamma": 0.5, "k": 2.0}, "sample", SNR / (2 + SNR) ** 0.5),
    ],
)
def test_weights_match_their_formulas(name, params, prediction_type, expected):
    got = weights(name, prediction_type, **params)
    assert got.dtype == torch.float64
    assert torch.allclose(got, expected, rtol=1e-12)


def test_min_snr_caps_only_the_nearly_clean_steps():
    w = weights("min_snr", "epsilon", gamma=5.0)
    assert w[0].item() == pytest.approx(5.0 / SNR[0].item())  # t = 0: SNR ≈ 1e4, so weight ≈ 5e-4
    assert w[-1].item() == 1.0  # noisy steps keep L_simple's weight


@pytest.mark.parametrize("name,params", [("snr", {}), ("min_snr", {"gamma": 5.0}), ("p2", {"gamma": 1.0})])
def test_weighted_loss_is_the_same_objective_for_every_prediction_type(name, params):
    """The same denoiser error costs the same weighted loss whether the network outputs ε, x₀ or v."""
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(64, 8, generator=generator, dtype=torch.float64)
    noise = torch.randn(64, 8, generator=generator, dtype=torch.float64)
    t = torch.randint(0, 1000, (64,), generator=generator)
    pred_x0 = x0 + 0.1 * torch.randn(64, 8, generator=generator, dtype=torch.float64)
    losses = {}
    for prediction_type in ("epsilon", "sample", "v_prediction"):
        diffusion = GaussianDiffusion(SCHEDULE, prediction_type)
        x_t = diffusion.q_sample(x0, t, noise)
        # What a network of this type outputs when its implied x̂₀ is pred_x0.
        as_sample = GaussianDiffusion(SCHEDULE, "sample")
        output = {
            "epsilon": as_sample.predict_eps(x_t, t, pred_x0),
            "sample": pred_x0,
            "v_prediction": as_sample.predict_v(x_t, t, pred_x0),
        }[prediction_type]
        mse = ((diffusion.training_target(x0, noise, t) - output) ** 2).mean(dim=1)
        losses[prediction_type] = (make_loss_weighting(name, **params)(diffusion, t) * mse).mean()
    assert losses["sample"].item() == pytest.approx(losses["epsilon"].item(), rel=1e-8)
    assert losses["v_prediction"].item() == pytest.approx(losses["epsilon"].item(), rel=1e-8)


def test_zero_terminal_snr_weights_stay_finite():
    schedule = make_schedule("linear", 1000, rescale_betas_zero_snr=True)
    t = torch.tensor([998, 999])
    for name in ("snr", "min_snr", "p2"):
        w = make_loss_weighting(name)(GaussianDiffusion(schedule, "v_prediction"), t)
        assert torch.isfinite(w).all(), name
    eps_space = make_loss_weighting("min_snr").eps_weight(schedule.snr[t])
    assert eps_space[-1].item() == 1.0


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("focal", {}, "Unknown loss_weighting 'focal'; valid choices: uniform, snr, min_snr, p2"),
        ("min_snr", {"gamma": 0.0}, "min_snr gamma=0.0 must be > 0"),
        ("p2", {"gamma": -1.0}, "p2 gamma=-1.0 must be >= 0"),
        ("p2", {"k": 0.0}, "p2 k=0.0 must be > 0"),
        ("uniform", {"gamma": 5.0}, r"'uniform' got unexpected arguments \['gamma'\]"),
    ],
)
def test_invalid_weightings_are_named(name, params, message):
    with pytest.raises(ValueError, match=message):
        make_loss_weighting(name, **params)
