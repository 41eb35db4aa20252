"""Hydra/OmegaConf registrations shared by every job: config resolvers and the structured schemas that make a
typo or a wrong type in ``schedule``, ``objective``, ``loss_weighting`` or ``sampler`` fail at composition.

Each YAML of those groups starts with ``defaults: [base_<group>]``, so it is merged onto the schema below:
unknown keys, wrong types and values outside an Enum are refused with Hydra's message naming the key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf


class BetaSchedule(str, Enum):
    linear = "linear"
    scaled_linear = "scaled_linear"
    cosine = "cosine"
    sigmoid = "sigmoid"
    constant = "constant"


class PredictionType(str, Enum):
    epsilon = "epsilon"
    sample = "sample"
    v_prediction = "v_prediction"


class WeightingName(str, Enum):
    uniform = "uniform"
    snr = "snr"
    min_snr = "min_snr"
    p2 = "p2"


class TimestepSpacing(str, Enum):
    leading = "leading"
    linspace = "linspace"
    trailing = "trailing"
    karras = "karras"
    log_snr = "log_snr"


class VarianceType(str, Enum):
    fixed_small = "fixed_small"
    fixed_large = "fixed_large"
    learned_range = "learned_range"


@dataclass
class ScheduleConfig:
    """``make_schedule`` arguments; parameters left null take the schedule's defaults."""

    beta_schedule: BetaSchedule = BetaSchedule.linear
    num_train_timesteps: int = 1000
    beta_start: float | None = None
    beta_end: float | None = None
    beta: float | None = None  # constant
    s: float | None = None  # cosine offset
    max_beta: float | None = None  # cosine clip
    rescale_betas_zero_snr: bool = False


class ObjectiveKind(str, Enum):
    ddpm = "ddpm"
    edm = "edm"
    flow_matching = "flow_matching"


class TimeSampling(str, Enum):
    uniform = "uniform"
    logit_normal = "logit_normal"


@dataclass
class ObjectiveConfig:
    """DDPM's objective on a β schedule: what the network predicts; ``learned_variance`` adds Nichol & Dhariwal's
    variance output and trains it with the hybrid objective L_simple + vlb_weight · L_vlb."""

    kind: ObjectiveKind = ObjectiveKind.ddpm
    prediction_type: PredictionType = PredictionType.epsilon
    learned_variance: bool = False
    vlb_weight: float = 0.001


@dataclass
class EDMObjectiveConfig:
    """EDM (Karras et al. 2022): preconditioning with ``sigma_data``, ln σ ~ N(p_mean, p_std²) in training, λ(σ)
    weighting; ``sigma_min``/``sigma_max`` bound the samplers' Karras grid. No β schedule (schedule=none)."""

    kind: ObjectiveKind = ObjectiveKind.edm
    sigma_data: float = 0.5
    p_mean: float = -1.2
    p_std: float = 1.2
    sigma_min: float = 0.002
    sigma_max: float = 80.0


@dataclass
class FlowMatchingObjectiveConfig:
    """Flow matching on the linear path x_t = (1 − t)x₀ + tε, velocity target, t ~ ``time_sampling`` (logit-normal
    with ``logit_mean``/``logit_std``, or uniform). No β schedule (schedule=none)."""

    kind: ObjectiveKind = ObjectiveKind.flow_matching
    time_sampling: TimeSampling = TimeSampling.logit_normal
    logit_mean: float = 0.0
    logit_std: float = 1.0


@dataclass
class LossWeightingConfig:
    """λ(t); ``gamma`` for min_snr and p2, ``k`` for p2."""

    name: WeightingName = WeightingName.uniform
    gamma: float | None = None
    k: float | None = None


@dataclass
class SamplerConfig:
    """Sampling settings; ``sampler`` ∈ {ddpm, ddim, dpm_solver++, euler, heun, euler_ancestral, consistency} (EDM
    and flow matching: all but ddpm and consistency, on their own grids; the chain spacings linspace/leading/trailing
    mean that natural grid),
    ``num_steps`` null = the sampler's default (every timestep for ddpm); ``rho`` shapes ``karras`` spacing;
    ``s_*`` are EDM's stochastic churn for euler/heun (s_churn = 0: deterministic)."""

    sampler: str = "ddim"
    num_steps: int | None = 50
    eta: float = 0.0
    timestep_spacing: TimestepSpacing = TimestepSpacing.trailing
    variance_type: VarianceType | None = None  # DDPM's σ²; null: the model's own (learned_range or fixed_small)
    clip_sample: bool = True
    rho: float = 7.0
    sigma_max: float | None = None  # where karras/log_snr grids start; null: the trained σ(T−1)
    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = float("inf")
    s_noise: float = 1.0
    shift: float = 1.0  # flow matching's uniform-t grid, shifted towards the noise end (SD3: 3)


# (group, schema name, schema): an option's YAML starts with ``defaults: [<schema name>]``.
SCHEMAS = (
    ("schedule", "base_schedule", ScheduleConfig),
    ("objective", "base_objective", ObjectiveConfig),
    ("objective", "base_objective_edm", EDMObjectiveConfig),
    ("objective", "base_objective_flow_matching", FlowMatchingObjectiveConfig),
    ("loss_weighting", "base_loss_weighting", LossWeightingConfig),
    ("sampler", "base_sampler", SamplerConfig),
)


def _integer_division(numerator: int, denominator: int) -> int:
    return int(numerator) // int(denominator)


def _product(a: int, b: int) -> int:
    return int(a) * int(b)


def _log2_ratio(numerator: int, denominator: int) -> int:
    """How many halvings take ``numerator`` to ``denominator`` (rounded; the distillation module checks it is exact)."""
    return max(round(math.log2(int(numerator) / max(int(denominator), 1))), 0)


RESOLVERS = {"div": _integer_division, "mul": _product, "log2_ratio": _log2_ratio}


def register_resolvers() -> None:
    """``${div:a,b}`` → a // b (e.g. attention at half the image size), ``${mul:a,b}``, ``${log2_ratio:a,b}`` (the
    rounds of a distillation). Safe to call repeatedly."""
    for name, resolver in RESOLVERS.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)


def register_configs() -> None:
    """Resolvers plus the ``base_<group>`` schemas in Hydra's ConfigStore. Safe to call repeatedly."""
    register_resolvers()
    store = ConfigStore.instance()
    for group, name, schema in SCHEMAS:
        store.store(group=group, name=name, node=schema)


def plain(node) -> dict:
    """A config node as plain Python (resolved, Enums as strings): what builders and checkpoints take."""
    return OmegaConf.to_container(node, resolve=True, enum_to_str=True)
