"""Every option of every config group composes and instantiates; schema violations fail at composition."""

from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.errors import ConfigCompositionException, MissingConfigException
from hydra.utils import instantiate
from omegaconf.errors import ConfigKeyError, ValidationError

from diffusion_lab.config.build import build_module, build_schedule, drop_preset_schedule, instantiate_group
from diffusion_lab.train import CONFIG_DIR
from tests.helpers import write_cifar10, write_idx_dataset, write_image_folder

CONF = Path(CONFIG_DIR)


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_the_documented_groups_exist():
    expected = {
        "data",
        "model",
        "schedule",
        "objective",
        "loss_weighting",
        "sampler",
        "optimizer",
        "lr_scheduler",
        "trainer",
        "logger",
        "callbacks",
        "paths",
        "hydra",
        "experiment",
        "debug",
    }
    assert expected <= {p.name for p in CONF.iterdir() if p.is_dir()}
    assert set(options("trainer")) == {"default", "cpu", "gpu", "ddp", "ddp_cpu"}
    assert {"wandb", "tensorboard", "csv", "none"} <= set(options("logger"))
    assert {"quickstart", "mnist_ddpm", "cifar10_ddpm"} <= set(options("experiment"))
    assert set(options("debug")) == {"fdr", "limit", "overfit"}


@pytest.mark.parametrize("option", options("data"))
def test_every_data_option_instantiates(option, compose_config, tmp_path):
    overrides = [f"data={option}", "model=unet_tiny", "data.batch_size=4"]
    if option == "image_folder":
        overrides.append(f"data.root={write_image_folder(tmp_path / 'images')}")
    elif option == "cifar10":
        overrides.append(f"data.root={write_cifar10(tmp_path / 'cifar').parent}")
    elif option in ("mnist", "fashion_mnist"):
        folder = "MNIST" if option == "mnist" else "FashionMNIST"
        overrides += [f"data.root={write_idx_dataset(tmp_path / 'idx', folder)}", "data.download=false"]
    datamodule = instantiate(compose_config(overrides).data)
    datamodule.setup()
    images, _ = next(iter(datamodule.train_dataloader()))
    assert images.dtype == torch.uint8 and images.shape[1] == datamodule.channels


@pytest.mark.parametrize("option", options("model"))
def test_every_model_preset_instantiates(option, compose_config):
    data = "cifar10" if option == "unet_ddpm_cifar10" else "digits"
    cfg = compose_config([f"data={data}", f"model={option}"])
    net = instantiate(cfg.model)
    size = cfg.data.image_size
    out = net(torch.zeros(1, cfg.data.channels, size, size), torch.tensor([3]))
    assert out.shape == (1, cfg.data.channels, size, size)


@pytest.mark.parametrize("group", ["schedule", "objective", "loss_weighting", "sampler"])
def test_every_math_option_builds_a_module(group, compose_config):
    for option in options(group):
        overrides = ["experiment=quickstart", "model=unet_tiny", f"{group}={option}"]
        if option == "linear_zero_snr":
            overrides.append("objective=v_prediction")
        if option == "none":  # no β schedule: for the objectives that own their noise path
            overrides.append("objective=flow_matching")
        cfg = compose_config(overrides)
        drop_preset_schedule(cfg, overrides)  # as the train job does: the quickstart's cosine beside EDM
        module = build_module(cfg)
        x = torch.zeros(2, 1, 8, 8)
        levels = module.draw_noise_levels(2, x.device)
        losses = module.objective_loss(module.net, x, None, levels, torch.randn_like(x))
        assert torch.isfinite(losses).all(), option


@pytest.mark.parametrize("group", ["optimizer", "lr_scheduler"])
def test_every_optimisation_option_instantiates(group, compose_config):
    for option in options(group):
        module = build_module(compose_config(["experiment=quickstart", "model=unet_tiny", f"{group}={option}"]))
        optimizers = module.configure_optimizers()
        optimizer = optimizers["optimizer"] if isinstance(optimizers, dict) else optimizers
        assert isinstance(optimizer, torch.optim.Optimizer)


@pytest.mark.parametrize("option", options("trainer"))
def test_every_trainer_option_instantiates(option, compose_config):
    overrides = [f"trainer={option}"]
    if option in ("gpu", "ddp") and not torch.cuda.is_available():
        overrides.append("trainer.accelerator=cpu")  # the option itself asks for GPUs this machine lacks
    cfg = compose_config(overrides)
    trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    assert isinstance(trainer, L.Trainer)
    if option == "ddp_cpu":
        assert trainer.num_devices == 2 and type(trainer.strategy).__name__ == "DDPStrategy"


@pytest.mark.parametrize("option", options("logger"))
def test_every_logger_option_instantiates(option, compose_config):
    loggers = instantiate_group(compose_config([f"logger={option}"]).get("logger"))
    assert len(loggers) == (0 if option == "none" else 1)


@pytest.mark.parametrize("option", options("callbacks"))
def test_every_callbacks_option_instantiates(option, compose_config):
    callbacks = instantiate_group(compose_config([f"callbacks={option}"]).get("callbacks"))
    names = {type(c).__name__ for c in callbacks}
    expected = {
        "default": {
            "RunCheckpoint",
            "ModelCheckpoint",
            "DiffusionEMA",
            "SampleGrid",
            "LearningRateMonitor",
            "StepProgressBar",
        },
        "fid": {"FIDCallback"},
        "posthoc_ema": {"PostHocEMA"},
        "none": set(),
    }[option]
    assert expected <= names and (names or not expected)


@pytest.mark.parametrize("option", options("experiment"))
def test_every_experiment_builds(option, compose_config):
    overrides = [f"experiment={option}"]
    cfg = compose_config(overrides)
    drop_preset_schedule(cfg, overrides)  # as the jobs do: mnist_cpu's cosine (for ε/v) beside flow matching
    module = build_module(cfg)
    assert module.net.image_size == cfg.data.image_size


def test_cifar10_experiment_is_the_papers_setup(compose_config):
    cfg = compose_config(["experiment=cifar10_ddpm"])
    schedule = build_schedule(cfg.schedule)
    assert schedule.num_train_timesteps == 1000 and schedule.betas[-1].item() == pytest.approx(0.02)
    assert cfg.optimizer.lr == 2e-4 and cfg.data.batch_size == 128 and cfg.lr_scheduler.warmup_steps == 5000
    assert cfg.trainer.gradient_clip_val == 1.0 and cfg.callbacks.ema.decay == 0.9999
    assert cfg.trainer.max_steps == 800_000
    assert sum(p.numel() for p in instantiate(cfg.model).parameters()) == pytest.approx(35.7e6, rel=0.01)


@pytest.mark.parametrize("option", options("debug"))
def test_every_debug_option_composes(option, compose_config):
    cfg = compose_config(["experiment=quickstart", f"debug={option}"])
    assert cfg.task_name == "debug"


@pytest.mark.parametrize(
    ("override", "error", "message"),
    [
        ("schedule.beta_schedule=quadratic", ValidationError, "quadratic"),
        ("objective.prediction_type=noise", ValidationError, "noise"),
        ("loss_weighting.name=focal", ValidationError, "focal"),
        ("sampler.timestep_spacing=uniform", ValidationError, "uniform"),
        ("schedule.num_train_timesteps=many", ValidationError, "many"),
        ("sampler.eta=high", ValidationError, "high"),
    ],
)
def test_schema_rejects_bad_values_at_composition(override, error, message, compose_config):
    with pytest.raises((ConfigCompositionException, error)) as raised:
        compose_config([override])
    assert message in str(raised.value) + str(raised.value.__cause__)


def test_unknown_keys_and_options_fail_at_composition(compose_config):
    with pytest.raises((ConfigCompositionException, ConfigKeyError)) as raised:
        compose_config(["schedule.beta_ned=0.1"])
    assert "beta_ned" in str(raised.value) + str(raised.value.__cause__)
    with pytest.raises(MissingConfigException) as missing:
        compose_config(["schedule=quadratic"])
    assert "quadratic" in str(missing.value) and "cosine" in str(missing.value)


@pytest.mark.parametrize("job", ["sample", "evaluate"])
def test_sample_and_evaluate_configs_compose(job, compose_config, tmp_path):
    cfg = compose_config([f"ckpt_path={tmp_path / 'x.ckpt'}", "sampler=dpm_solver"], config_name=job)
    assert cfg.sampler.sampler == "dpm_solver++" and cfg.seed == 0 and cfg.use_ema is True
    assert cfg.output_dir == str(tmp_path / "run")
    if job == "evaluate":
        assert list(cfg.metrics) == ["fid", "kid"] and cfg.get("data") is None
        assert instantiate(compose_config(["data=digits"], config_name="evaluate").data).name == "digits"
