"""A training run as the report sees it: what was overridden, how training went, its evaluations and grid."""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from diffusion_lab.config.schemas import SamplerConfig, TimestepSpacing
from diffusion_lab.diffusion.samplers.sigmas import SIGMA_SPACINGS
from diffusion_lab.runs.folders import last_error_line
from diffusion_lab.runs.layout import HYDRA_CONFIG, HYDRA_OVERRIDES, METRICS_CSV, SAMPLE_GRIDS, run_config
from diffusion_lab.runs.records import read_records

INCEPTION = "inception-v3-compat"
# How the report names FID/KID in each feature space: plain for Inception's (the literature's), "c" (classifier)
# for the digits classifier's (eval.features=digits).
METRIC_PREFIX = {INCEPTION: "", "digits-classifier": "c"}
LOG_TIME = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3})\]")
IGNORED_OVERRIDES = ("hydra.", "paths.", "ckpt_path", "print_config")


# The settings a sampler label names when a record's differ from these (the sampler, its steps, spacing and σ cap
# are named on their own; DDPM's variance, which records hold resolved, only when it is not fixed_small).
SAMPLER_DEFAULTS = {
    key: value
    for key, value in vars(SamplerConfig()).items()
    if key not in ("sampler", "num_steps", "timestep_spacing", "sigma_max", "variance_type")
}
LEGEND_WIDTH = 60  # characters of a run label a figure legend shows before it names the folder instead


@dataclass
class Run:
    """Everything the report reads from one run folder (nothing is written there)."""

    path: Path
    overrides: dict[str, str]
    config: dict[str, Any]
    rows: list[dict[str, float]]
    wall_seconds: float | None
    grid: Path | None
    evaluations: list[dict[str, Any]]
    problem: str | None = None
    label: str = ""
    columns: dict[str, Any] = field(default_factory=dict)

    @property
    def legend_name(self) -> str:
        """The label where it fits a figure's legend, else the run's folder name (the runs table gives both): a
        distillation's teacher path and its overrides would squeeze the plots to slivers."""
        return legend_text(self.label, self.path.name)

    def series(self, key: str) -> list[tuple[int, float]]:
        """(step, value) of every logged value of ``key``."""
        return [(int(row["step"]), row[key]) for row in self.rows if key in row and "step" in row]

    def last(self, key: str) -> float | None:
        values = self.series(key)
        return values[-1][1] if values else None

    @property
    def steps(self) -> int | None:
        steps = [int(row["step"]) + 1 for row in self.rows if "train/loss" in row]
        return max(steps) if steps else None

    @property
    def loss_profile(self) -> list[float] | None:
        """The last logged train/loss_t0 … t9: the loss in ten equal ranges of t at the end of training."""
        keys = sorted((k for row in self.rows for k in row if k.startswith("train/loss_t")), key=_bucket)
        keys = list(dict.fromkeys(keys))
        if not keys:
            return None
        rows = [row for row in self.rows if all(k in row for k in keys)]
        return [rows[-1][k] for k in keys] if rows else None

    @property
    def images_per_s(self) -> float | None:
        """Training images/s over all processes across the run: images over seconds of training (validation
        excluded) as Lightning's ThroughputMonitor counts them per process. Not its last windowed rate, which the
        work at the end of a run (the final grid, the last checkpoint) can cut to a third."""
        rows = [row for row in self.rows if row.get("train/samples") and row.get("train/time")]
        if not rows:
            return None
        trainer = self.config.get("trainer", {})
        devices = trainer.get("devices") if isinstance(trainer.get("devices"), int) else 1
        return rows[-1]["train/samples"] / rows[-1]["train/time"] * devices * int(trainer.get("num_nodes", 1))

    @property
    def final_evaluations(self) -> list[dict[str, Any]]:
        """The records of the run's latest evaluated step (one per sampler setting, the newest of each), with the
        checkpoint's own EMA weights (post-hoc EMA lengths have their own figure)."""
        own_ema = [r for r in self.evaluations if r["protocol"].get("ema_length") is None]
        if not own_ema:
            return []
        last_step = max(r["protocol"].get("global_step", -1) for r in own_ema)
        newest: dict[tuple[str, str], dict] = {}
        for record in own_ema:
            protocol = record["protocol"]
            if protocol.get("global_step", -1) == last_step:
                newest[(features_of(protocol), sampler_label(protocol))] = record
        return list(newest.values())


def _bucket(key: str) -> int:
    return int(key.rsplit("_t", 1)[1])


def features_of(protocol: dict[str, Any]) -> str:
    """The feature network a record's FID/KID were computed in (records without one predate the choice)."""
    return protocol.get("feature_extractor") or INCEPTION


def legend_text(label: str, folder: str) -> str:
    """``label`` where it fits a figure's legend (LEGEND_WIDTH characters), else the folder name."""
    return label if len(label) <= LEGEND_WIDTH else folder


def metric_label(name: str, protocol: dict[str, Any]) -> str:
    """'FID', 'KID' in Inception's space; 'cFID', 'cKID' in the digits classifier's."""
    features = features_of(protocol)
    return f"{METRIC_PREFIX.get(features, features + ' ')}{name}"


def sampler_label(protocol: dict[str, Any]) -> str:
    """'ddim·20', 'heun/karras·19', 'euler shift=3·2' — the sampler, its spacing unless trailing, every other
    setting that is not the default, and its network calls per sample: two settings are two columns and lines, never
    one label whose newest record hides the other (a shifted grid's FID once stood for the plain one's)."""
    sampler = protocol.get("sampler") or {}
    name = {"dpm_solver++": "dpm++"}.get(sampler.get("sampler"), sampler.get("sampler") or "samples")
    spacing = sampler.get("timestep_spacing", TimestepSpacing.trailing.value)
    if spacing != TimestepSpacing.trailing.value:
        name = f"{name}/{spacing}"
    if spacing in SIGMA_SPACINGS and sampler.get("sigma_max") is not None:
        name = f"{name} σ≤{sampler['sigma_max']:g}"
    for key, default in SAMPLER_DEFAULTS.items():
        value = sampler.get(key, default)
        if value != default:
            name = f"{name} {key}={value:g}" if isinstance(value, float) else f"{name} {key}={value}"
    if sampler.get("sampler") == "ddpm" and sampler.get("variance_type") not in (None, "fixed_small"):  # resolved
        name = f"{name} variance_type={sampler['variance_type']}"
    nfe = protocol.get("nfe_per_sample")
    return f"{name}·{nfe}" if nfe else name


def load_run(path: Path) -> Run:
    overrides = {}
    if (path / HYDRA_OVERRIDES).is_file():
        for item in OmegaConf.to_container(OmegaConf.load(path / HYDRA_OVERRIDES)) or []:
            key, _, value = str(item).partition("=")
            if not key.lstrip("+~").startswith(IGNORED_OVERRIDES):
                overrides[key.lstrip("+~")] = value
    config = OmegaConf.to_container(run_config(path)) if (path / HYDRA_CONFIG).is_file() else {}
    rows = read_metrics_csv(path / METRICS_CSV)
    grids = sorted((path / SAMPLE_GRIDS).glob("step_*.png"))
    run = Run(
        path=path,
        overrides=overrides,
        config=config,
        rows=rows,
        wall_seconds=log_wall_seconds(path),
        grid=grids[-1] if grids else None,
        evaluations=read_records(path),
    )
    if not rows:
        run.problem = f"no training metrics ({last_error_line(path) or 'no log'})"
    return run


def read_metrics_csv(path: Path) -> list[dict[str, float]]:
    """Lightning's CSV rows with the empty cells dropped and numbers parsed."""
    if not path.is_file():
        return []
    rows = []
    with open(path) as handle:
        for row in csv.DictReader(handle):
            parsed = {}
            for key, value in row.items():
                try:
                    number = float(value)
                except (TypeError, ValueError):
                    continue
                if math.isfinite(number):
                    parsed[key] = number
            rows.append(parsed)
    return rows


def log_wall_seconds(path: Path) -> float | None:
    """Seconds from the first to the last timestamped line of the run's log (training, validation, grids)."""
    stamps = []
    for log in path.glob("*.log"):
        for line in log.read_text(errors="replace").splitlines():
            match = LOG_TIME.match(line)
            if match:
                stamps.append(
                    datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S").timestamp() + int(match.group(2)) / 1e3
                )
    return max(stamps) - min(stamps) if len(stamps) > 1 else None
