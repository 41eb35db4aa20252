"""DiffusionModule's objective and sampling, the EMA callback, the LR schedule and the sample grid."""

import pytest
import torch
from PIL import Image

from diffusion_lab.callbacks import DiffusionEMA
from diffusion_lab.config.build import build_module
from diffusion_lab.generation.grids import save_grid
from diffusion_lab.lit import WarmupDecay
from tests.test_unet import randomise_zero_layers


@pytest.fixture
def module(compose_config):
    module = build_module(compose_config(["experiment=quickstart", "model=unet_tiny"]))
    randomise_zero_layers(module.net)
    return module


@pytest.fixture
def conditional_module(compose_config):
    module = build_module(compose_config(["experiment=quickstart", "model=unet_tiny", "model.num_classes=10"]))
    randomise_zero_layers(module.net)
    return module


def test_per_sample_loss_is_the_weighted_mse_of_the_target(compose_config):
    module = build_module(
        compose_config(["experiment=quickstart", "model=unet_tiny", "objective=v_prediction", "loss_weighting=min_snr"])
    )
    randomise_zero_layers(module.net)
    generator = torch.Generator().manual_seed(0)
    x0 = torch.rand(6, 1, 8, 8, generator=generator) * 2 - 1
    noise = torch.randn(6, 1, 8, 8, generator=generator)
    t = torch.tensor([0, 10, 200, 500, 800, 999])
    losses = module.per_sample_loss(module.net, x0, None, t, noise)
    ab = module.schedule.alphas_cumprod[t].view(-1, 1, 1, 1)  # float64, as the process keeps it
    signal, noise_scale = ab.sqrt().float(), (1 - ab).sqrt().float()
    x_t = signal * x0 + noise_scale * noise
    v = signal * noise - noise_scale * x0
    snr = (ab / (1 - ab)).flatten()
    weight = (torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)) / (snr + 1)).float()
    expected = weight * (module.net(x_t, t) - v).square().mean((1, 2, 3))
    assert torch.allclose(losses, expected, rtol=1e-5, atol=1e-9)


def test_label_dropout_uses_the_null_label_at_the_configured_rate(conditional_module):
    conditional_module.label_dropout = 0.25
    labels = torch.randint(0, 10, (20_000,))
    dropped = conditional_module._labels_for(labels, drop=True)
    replaced = dropped == conditional_module.null_label
    assert replaced.float().mean().item() == pytest.approx(0.25, abs=0.02)
    assert torch.equal(dropped[~replaced], labels[~replaced])
    assert torch.equal(conditional_module._labels_for(labels, drop=False), labels)


def test_conditioning_without_labels_is_a_clear_error(conditional_module):
    with pytest.raises(
        ValueError, match=r"model\.num_classes=10 asks for class conditioning but the data has no labels"
    ):
        conditional_module._labels_for(None, drop=True)


def test_generate_is_reproducible_per_seed_and_batch_independent(module):
    ddim = {"sampler": "ddim", "num_steps": 8, "timestep_spacing": "trailing"}  # the quickstart's Heun uses Karras σ
    together = module.generate(seeds=[5, 6, 7], **ddim)
    apart = torch.cat([module.generate(seeds=[5], **ddim), module.generate(seeds=[6, 7], **ddim)])
    assert together.shape == (3, 1, 8, 8)
    assert torch.allclose(together, apart, atol=1e-5)
    assert not torch.allclose(together[0], together[1])


def test_guidance_changes_conditional_samples_and_is_refused_without_labels(conditional_module, module):
    labels = torch.tensor([1, 1])
    plain = conditional_module.generate(seeds=[0, 1], labels=labels, num_steps=6)
    guided = conditional_module.generate(seeds=[0, 1], labels=labels, guidance_scale=3.0, num_steps=6)
    unconditional = conditional_module.generate(seeds=[0, 1], num_steps=6)
    assert (plain - guided).abs().max() > 1e-4 and (plain - unconditional).abs().max() > 1e-4
    with pytest.raises(ValueError, match="need a class-conditional model"):
        module.generate(seeds=[0], labels=torch.tensor([1]), num_steps=4)


def test_guided_model_is_one_plus_w_conditional_minus_w_unconditional(conditional_module):
    """A stand-in network whose output is its label makes ε_c = k and ε_∅ = the null label (10) known, so
    the module's guided function must return (1 + w)·k − w·10; swapped arguments would give (1 + w)·10 − w·k."""

    def label_as_output(x, t, y):
        return y.to(x.dtype).view(-1, 1, 1, 1).expand_as(x)

    labels = torch.tensor([3, 7])
    x, t = torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long)
    for w in (0.0, 1.5, 4.0):
        guided = conditional_module._model_fn(label_as_output, labels, w)(x, t)
        expected = ((1 + w) * labels - w * conditional_module.null_label).float().view(-1, 1, 1, 1)
        assert torch.allclose(guided, expected.expand_as(x)), w
    unconditional = conditional_module._model_fn(label_as_output, None, 0.0)(x, t)
    assert torch.all(unconditional == conditional_module.null_label)


def test_ema_decay_warms_up_to_its_target():
    ema = DiffusionEMA(decay=0.999)
    assert ema.decay_at(0) == pytest.approx(0.1)
    assert ema.decay_at(90) == pytest.approx(0.91)
    assert ema.decay_at(100_000) == 0.999
    assert DiffusionEMA(decay=0.99, warmup=False).decay_at(0) == 0.99
    with pytest.raises(ValueError, match=r"ema decay=1\.0 must lie strictly between 0 and 1"):
        DiffusionEMA(decay=1.0)


def test_one_ema_update_follows_the_formula(compose_config, tmp_path):
    """Between two saved steps the averaged weights move by ema ← d·ema + (1 − d)·w, d = decay_at(step)."""
    from diffusion_lab.train import train
    from tests.conftest import FAST

    train(
        compose_config(
            [*FAST, "trainer.max_steps=3", "callbacks.last_and_periodic.every_n_train_steps=1",
             "callbacks.ema.decay=0.7", "callbacks.ema.warmup=true", "trainer.val_check_interval=100"]
        )
    )  # fmt: skip
    folder = tmp_path / "run" / "checkpoints"
    before, after = (torch.load(folder / f"step_{s:07d}.ckpt", weights_only=True) for s in (2, 3))
    d = DiffusionEMA(decay=0.7).decay_at(3)  # after the 3rd optimiser step global_step is already 3
    assert d == pytest.approx(4 / 13)
    moved = 0
    for key, raw in after["current_model_state"].items():
        if not raw.is_floating_point():
            continue
        expected = d * before["state_dict"][key] + (1 - d) * raw
        assert torch.allclose(after["state_dict"][key], expected, atol=1e-6), key
        moved += int(not torch.equal(before["state_dict"][key], after["state_dict"][key]))
    assert moved > 10  # the weights really changed between the two steps


@pytest.mark.parametrize(
    ("schedule", "step", "factor"),
    [
        (WarmupDecay(100), 0, 0.01),
        (WarmupDecay(100), 49, 0.5),
        (WarmupDecay(100), 5000, 1.0),
        (WarmupDecay(10, "cosine", 110, 0.1), 60, 0.1 + 0.9 * 0.5),
        (WarmupDecay(10, "cosine", 110, 0.1), 110, 0.1),
        (WarmupDecay(0, "linear", 100), 25, 0.75),
    ],
)
def test_warmup_and_decay_factors(schedule, step, factor):
    assert schedule(step) == pytest.approx(factor)


def test_sample_grid_png_has_one_tile_per_image(tmp_path):
    images = torch.randint(0, 256, (12, 1, 8, 8), dtype=torch.uint8)
    path = save_grid(images, tmp_path / "grid.png", nrow=4, upscale_to=32)
    grid = Image.open(path)
    # 4 columns × 3 rows of 32-pixel tiles with 2-pixel padding around each.
    assert grid.size == (4 * 34 + 2, 3 * 34 + 2)


def test_a_jobs_sampler_setting_left_null_is_the_samplers_default_not_the_modules(module):
    """``sampler=ddpm`` (num_steps: null, "every training timestep") on a module whose own sampler walks 20 steps:
    the job's explicit null must mean all T steps (it once silently became the module's 20)."""
    from diffusion_lab.generation.draw import nfe_per_sample

    module.sampler_settings.update(sampler="dpm_solver++", num_steps=20)
    settings = module.resolve_sampler_settings(sampler="ddpm", num_steps=None, variance_type=None)
    assert nfe_per_sample(settings, module.schedule, guidance_scale=0.0) == module.schedule.num_train_timesteps
    assert module.resolve_sampler_settings(sampler="ddim")["num_steps"] == 20  # a key left out keeps the module's
