"""Config → objects. The same functions build a fresh run (train) and rebuild a trained one from the config
stored in its checkpoint (sample, evaluate)."""

from __future__ import annotations

from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from diffusion_lab.config.schemas import plain
from diffusion_lab.diffusion import LossWeighting, NoiseSchedule, make_loss_weighting, make_schedule
from diffusion_lab.diffusion.samplers import SAMPLERS, check_sampler_settings, resolve_variance_type
from diffusion_lab.lit import DiffusionModule


def instantiate_group(group: DictConfig | None) -> list[Any]:
    """Instantiate every entry of a dict-of-configs group (callbacks, loggers); null entries are skipped."""
    if not group:
        return []
    return [instantiate(entry) for entry in group.values() if entry is not None and "_target_" in entry]


def build_schedule(schedule_cfg: DictConfig | dict) -> NoiseSchedule:
    params = dict(plain(schedule_cfg) if isinstance(schedule_cfg, DictConfig) else schedule_cfg)
    name = params.pop("beta_schedule")
    num_train_timesteps = params.pop("num_train_timesteps")
    rescale = params.pop("rescale_betas_zero_snr", False)
    kwargs = {key: value for key, value in params.items() if value is not None}
    return make_schedule(name, num_train_timesteps, rescale_betas_zero_snr=rescale, **kwargs)


def build_loss_weighting(weighting_cfg: DictConfig | dict) -> LossWeighting:
    params = dict(plain(weighting_cfg) if isinstance(weighting_cfg, DictConfig) else weighting_cfg)
    name = params.pop("name")
    return make_loss_weighting(name, **{key: value for key, value in params.items() if value is not None})


def sampler_settings(sampler_cfg: DictConfig | dict) -> dict[str, Any]:
    settings = dict(plain(sampler_cfg) if isinstance(sampler_cfg, DictConfig) else sampler_cfg)
    if settings["sampler"] not in SAMPLERS:
        raise ValueError(f"Unknown sampler.sampler {settings['sampler']!r}; valid choices: {', '.join(SAMPLERS)}.")
    return settings


def build_module(cfg: DictConfig, run_config: dict[str, Any] | None = None) -> DiffusionModule:
    """The DiffusionModule a run config describes (network, process, weighting, optimiser, sampler)."""
    lr_scheduler = instantiate(cfg.lr_scheduler) if cfg.get("lr_scheduler") else None
    schedule = build_schedule(cfg.schedule)
    sampler = sampler_settings(cfg.sampler)
    check_sampler_settings(schedule, **sampler)
    objective = plain(cfg.objective)
    learned_variance = bool(objective.get("learned_variance", False))
    resolve_variance_type(sampler, learned_variance)  # learned_range without objective=hybrid: refused up front
    # A learned variance doubles the output: the prediction and v (Nichol & Dhariwal's interpolation weight).
    net = instantiate(cfg.model, out_channels=2 * cfg.model.in_channels) if learned_variance else instantiate(cfg.model)
    return DiffusionModule(
        net=net,
        schedule=schedule,
        prediction_type=objective["prediction_type"],
        learned_variance=learned_variance,
        vlb_weight=float(objective.get("vlb_weight", 0.001)),
        loss_weighting=build_loss_weighting(cfg.loss_weighting),
        optimizer=instantiate(cfg.optimizer),
        lr_scheduler=lr_scheduler,
        sampler=sampler,
        label_dropout=cfg.label_dropout,
        loss_buckets=cfg.loss_buckets,
        compile=cfg.compile,
        max_nonfinite_steps=cfg.get("max_nonfinite_steps", 10),
        config=run_config,
    )


def storable_config(cfg: DictConfig) -> dict[str, Any]:
    """The run config as plain, resolved Python values: safe for ``torch.load(weights_only=True)``."""
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
