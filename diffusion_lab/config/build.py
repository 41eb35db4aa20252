"""Config → objects. The same functions build a fresh run (train) and rebuild a trained one from the config
stored in its checkpoint (sample, evaluate)."""

from __future__ import annotations

import logging
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from diffusion_lab.config.schemas import plain
from diffusion_lab.diffusion import LossWeighting, NoiseSchedule, make_loss_weighting, make_schedule
from diffusion_lab.diffusion.continuous import ContinuousObjective
from diffusion_lab.diffusion.edm import EDM
from diffusion_lab.diffusion.flow_matching import FlowMatching
from diffusion_lab.diffusion.samplers import SAMPLERS, check_sampler_settings, resolve_variance_type
from diffusion_lab.errors import ConfigError
from diffusion_lab.lit import DiffusionModule

log = logging.getLogger("diffusion_lab")


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


def objective_kind(objective_cfg: DictConfig | dict) -> str:
    """ddpm, edm or flow_matching (configs written before the continuous objectives have no kind: ddpm)."""
    kind = objective_cfg.get("kind") or "ddpm"
    return getattr(kind, "value", str(kind))


def build_continuous_objective(objective_cfg: DictConfig | dict) -> ContinuousObjective:
    params = dict(plain(objective_cfg) if isinstance(objective_cfg, DictConfig) else objective_cfg)
    kind = objective_kind(params)
    params.pop("kind", None)
    return {"edm": EDM, "flow_matching": FlowMatching}[kind](**params)


def noise_process(cfg: DictConfig) -> NoiseSchedule | ContinuousObjective:
    """What a run's samplers walk: its β schedule (DDPM), or its continuous objective."""
    if objective_kind(cfg.objective) == "ddpm":
        return build_schedule(cfg.schedule)
    return build_continuous_objective(cfg.objective)


def resolve_sampling(cfg: DictConfig, settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` made concrete for the run's model (DDPM's variance type), checked against its process."""
    process = noise_process(cfg)
    if isinstance(process, NoiseSchedule):
        settings = resolve_variance_type(settings, bool(cfg.objective.get("learned_variance", False)))
    check_sampler_settings(process, **settings)
    return settings


def drop_preset_schedule(cfg: DictConfig, command_line: list[str]) -> None:
    """A continuous objective owns its noise path, so a β schedule means nothing beside it. Given on the command
    line, that is a mistake and is refused; set by a preset (``experiment=quickstart objective=edm``: the preset's
    cosine schedule), it is dropped, and the stored config says schedule: null."""
    kind = objective_kind(cfg.objective)
    if kind == "ddpm" or cfg.get("schedule") is None:
        return
    if any(item.lstrip("+~").split("=")[0].split(".")[0] == "schedule" for item in command_line):
        raise ConfigError(schedule_refusal(cfg, kind))
    log.info("objective=%s walks its own noise path: the preset's β schedule is not used (schedule: null)", kind)
    with open_dict(cfg):
        cfg.schedule = None


def checkpoint_sampler(job_cfg: DictConfig, checkpoint_config: dict[str, Any]) -> dict[str, Any] | None:
    """A distilled checkpoint's own sampler (a progressive round's DDIM steps, a consistency student's sampler)
    when the job chose no sampler option (no ``sampler=<name>`` on the command line, no ``grid.sampler``): a
    student is drawn with the sampler it was distilled for unless asked otherwise, and ``sampler.<key>=…`` on the
    command line changes that key of it (``sampler.num_steps=1``). None for any other checkpoint, or when the job
    chose an option."""
    overrides = [item.lstrip("+~").split("=")[0] for item in command_line_overrides()]
    chosen = "sampler" in overrides or bool((job_cfg.get("grid") or {}).get("sampler"))
    if not checkpoint_config.get("distillation") or chosen:
        return None
    own = sampler_settings(checkpoint_config["sampler"])
    for key in overrides:
        if key.startswith("sampler.") and key.count(".") == 1:
            own[key.split(".")[1]] = sampler_settings(job_cfg.sampler)[key.split(".")[1]]
    return own


def command_line_overrides() -> list[str]:
    """The overrides the job was started with (Hydra's runtime record; none outside a Hydra job)."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def schedule_refusal(cfg: DictConfig, kind: str) -> str:
    name = getattr(cfg.schedule.get("beta_schedule"), "value", cfg.schedule.get("beta_schedule"))
    return (
        f"schedule={name} is a β schedule, which objective={kind} does not use: it owns its noise path "
        f"({'x = x₀ + σε' if kind == 'edm' else 'x_t = (1 − t)x₀ + tε'}). Drop schedule=… (objective={kind} sets "
        "schedule=none)."
    )


def check_objective_combination(cfg: DictConfig) -> None:
    """What has no meaning beside a continuous objective, refused with the value and the fix."""
    kind = objective_kind(cfg.objective)
    if kind == "ddpm":
        if cfg.get("schedule") is None:
            raise ConfigError(
                "schedule=none leaves DDPM's objective without its β schedule; pick one (schedule=linear, cosine, …) "
                "or an objective that owns its path (objective=edm, flow_matching)."
            )
        return
    if cfg.get("schedule") is not None:
        raise ConfigError(schedule_refusal(cfg, kind))
    weighting = cfg.get("loss_weighting") or {}
    name = getattr(weighting.get("name"), "value", weighting.get("name"))
    if name not in (None, "uniform"):
        raise ConfigError(
            f"loss_weighting={name} weights DDPM's timesteps; objective={kind} has its own weighting "
            f"({'λ(σ) = (σ² + σ_data²)/(σ·σ_data)²' if kind == 'edm' else 'the plain velocity MSE'}): use "
            "loss_weighting=uniform."
        )


def build_module(cfg: DictConfig, run_config: dict[str, Any] | None = None) -> DiffusionModule:
    """The DiffusionModule a run config describes (network, process, weighting, optimiser, sampler)."""
    lr_scheduler = instantiate(cfg.lr_scheduler) if cfg.get("lr_scheduler") else None
    check_objective_combination(cfg)
    sampler = sampler_settings(cfg.sampler)
    if objective_kind(cfg.objective) != "ddpm":
        objective = build_continuous_objective(cfg.objective)
        check_sampler_settings(objective, **sampler)
        return DiffusionModule(net=instantiate(cfg.model), schedule=objective, sampler=sampler,
                               **_training_settings(cfg, lr_scheduler, run_config))  # fmt: skip
    schedule = build_schedule(cfg.schedule)
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
        sampler=sampler,
        **_training_settings(cfg, lr_scheduler, run_config),
    )


def _training_settings(cfg: DictConfig, lr_scheduler, run_config: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "optimizer": instantiate(cfg.optimizer),
        "lr_scheduler": lr_scheduler,
        "label_dropout": cfg.label_dropout,
        "loss_buckets": cfg.loss_buckets,
        "compile": cfg.compile,
        "max_nonfinite_steps": cfg.get("max_nonfinite_steps", 10),
        "config": run_config,
    }


def build_distillation(cfg: DictConfig, teacher_checkpoint: dict[str, Any], run_config: dict[str, Any] | None = None):
    """The student of ``distillation.method`` (progressive or consistency): its teacher's network and weights,
    predicting v (a flow-matching teacher's: its velocity), beside the frozen teacher (the checkpoint's EMA
    weights)."""
    from diffusion_lab.lit.consistency import ConsistencyDistillation
    from diffusion_lab.lit.distillation import ProgressiveDistillation
    from diffusion_lab.runs.checkpoints import module_from_checkpoint

    settings = cfg.distillation
    methods = {"progressive": ProgressiveDistillation, "consistency": ConsistencyDistillation}
    if settings.method not in methods:
        raise ConfigError(
            f"distillation.method={settings.method!r}; choose distillation=progressive or distillation=consistency."
        )
    kind = objective_kind(cfg.objective)
    if kind == "edm" or cfg.objective.get("learned_variance"):
        raise ConfigError(
            f"teacher={cfg.teacher} was trained with objective={kind if kind != 'ddpm' else 'hybrid'}; distillation "
            "walks DDIM on a β schedule or Euler on flow matching's path with the network's prediction alone: give "
            "a checkpoint trained with objective=epsilon, sample, v_prediction or flow_matching."
        )
    if kind == "flow_matching" and settings.method != "progressive":
        raise ConfigError(
            f"distillation={settings.method} walks a β schedule's DDIM chain; teacher={cfg.teacher} was trained with "
            "objective=flow_matching: use distillation=progressive (Euler steps on its path)."
        )
    teacher = module_from_checkpoint(teacher_checkpoint, cfg.teacher, use_ema=True)
    student = instantiate(cfg.model)
    student.load_state_dict(teacher.net.state_dict())
    lr_scheduler = instantiate(cfg.lr_scheduler) if cfg.get("lr_scheduler") else None
    if settings.method == "progressive":
        method_args = {
            "start_steps": int(settings.start_steps),
            "final_steps": int(settings.final_steps),
            "steps_per_round": int(settings.steps_per_round),
            "teacher_substeps": int(settings.get("teacher_substeps", 1)),
            "trajectories": None if settings.get("trajectories") is None else int(settings.trajectories),
            "trajectory_seed": int(cfg.seed),
            "rollout": bool(settings.get("rollout", False)),
        }
    else:
        huber_c = settings.get("huber_c")
        method_args = {
            "num_intervals": int(settings.num_intervals),
            "pairs": str(settings.pairs),
            "num_steps": int(settings.num_steps),
            "huber_c": None if huber_c is None else float(huber_c),
        }
    return methods[settings.method](
        teacher=teacher.net,
        teacher_prediction_type=teacher.diffusion.prediction_type if teacher.diffusion is not None else "velocity",
        **method_args,
        net=student,
        schedule=noise_process(cfg),
        sampler=sampler_settings(cfg.sampler),
        **_training_settings(cfg, lr_scheduler, run_config),
    )


def storable_config(cfg: DictConfig) -> dict[str, Any]:
    """The run config as plain, resolved Python values: safe for ``torch.load(weights_only=True)``."""
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
