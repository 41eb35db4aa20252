"""The comparison tables: one row per run with only the overrides in which runs differ, the best value of each
column marked, and runs that differ only in ``seed`` grouped as mean ± std (n)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

from diffusion_lab.reporting.run_data import Run, legend_text, metric_label, sampler_label

DEFAULT = "(default)"
# Columns where larger is better; every other numeric column is better smaller (losses, FID, KID, time).
HIGHER_IS_BETTER = ("images/s", "steps")
UNMARKED = ("steps", "n")


@dataclass
class Table:
    header: list[str]
    rows: list[list[Any]]
    best: dict[str, Any]  # column → its best value (marked where it appears)


def differing_overrides(runs: list[Run]) -> list[str]:
    """The override keys whose values are not the same in every run (all of them for a single run)."""
    keys = list(dict.fromkeys(key for run in runs for key in run.overrides))
    if len(runs) == 1:
        return keys
    return [key for key in keys if len({run.overrides.get(key, DEFAULT) for run in runs}) > 1]


def label_runs(runs: list[Run], keys: list[str]) -> None:
    """A run's label is its differing overrides (or its folder name when nothing differs)."""
    for run in runs:
        parts = [f"{key}={run.overrides.get(key, DEFAULT)}" for key in keys]
        run.label = " ".join(parts) or run.path.name


def evaluation_columns(runs: list[Run]) -> list[str]:
    """'FID ddim·20', 'cFID dpm++·20' (the digits classifier's), … for every sampler setting and feature space
    evaluated at some run's final checkpoint."""
    columns = []
    for run in runs:
        for record in run.final_evaluations:
            for metric, name in (("fid", "FID"), ("kid_mean", "KID")):
                if metric in record["metrics"]:
                    columns.append(f"{metric_label(name, record['protocol'])} {sampler_label(record['protocol'])}")

    def order(column: str) -> tuple:
        metric, setting = column.split(" ", 1)
        sampler, _, nfe = setting.partition("·")
        return "KID" in metric, metric, sampler, int(nfe) if nfe.isdigit() else 0

    return sorted(dict.fromkeys(columns), key=order)


def run_columns(run: Run, eval_columns: list[str]) -> dict[str, Any]:
    values: dict[str, Any] = {
        "steps": run.steps,
        "wall time (s)": run.wall_seconds,
        "images/s": run.images_per_s,
        "train/loss": run.last("train/loss"),
        "val/loss": run.last("val/loss"),
        "val/loss_ema": run.last("val/loss_ema"),
    }
    for record in run.final_evaluations:
        label = sampler_label(record["protocol"])
        for metric, name in (("fid", "FID"), ("kid_mean", "KID")):
            column = f"{metric_label(name, record['protocol'])} {label}"
            if metric in record["metrics"] and column in eval_columns:
                values[column] = record["metrics"][metric]
    return values


def best_values(header: list[str], rows: list[list[Any]]) -> dict[str, Any]:
    best = {}
    for index, column in enumerate(header):
        if column in UNMARKED:
            continue
        numbers = [row[index] for row in rows if isinstance(row[index], int | float)]
        if len(numbers) > 1:
            best[column] = max(numbers) if column in HIGHER_IS_BETTER else min(numbers)
    return best


def jobs_table(runs: list[Run], keys: list[str]) -> Table:
    eval_columns = evaluation_columns(runs)
    metric_names = ["steps", "wall time (s)", "images/s", "train/loss", "val/loss", "val/loss_ema", *eval_columns]
    rows = []
    for run in runs:
        run.columns = run_columns(run, eval_columns)
        rows.append(
            [run.path.name, *(run.overrides.get(k, DEFAULT) for k in keys), *(run.columns.get(m) for m in metric_names)]
        )
    header = ["run", *keys, *metric_names]
    return Table(header, rows, best_values(header, rows))


@dataclass
class Group:
    settings: dict[str, str]
    runs: list[Run]

    @property
    def legend_name(self) -> str:
        """Its settings where they fit a figure's legend, else its first run's folder name (as ``Run.legend_name``:
        a distillation's teacher path and overrides ran past the figure's edge)."""
        label = " ".join(f"{key}={value}" for key, value in self.settings.items()) or "all runs"
        return legend_text(label, self.runs[0].path.name)


def seed_groups(runs: list[Run], keys: list[str]) -> list[Group]:
    """Runs whose differing overrides agree on everything but ``seed``."""
    others = [key for key in keys if key != "seed"]
    groups: dict[tuple, Group] = {}
    for run in runs:
        settings = {key: run.overrides.get(key, DEFAULT) for key in others}
        groups.setdefault(tuple(settings.items()), Group(settings, [])).runs.append(run)
    return list(groups.values())


def mean_std(values: list[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (0 for one value) and n."""
    if not values:
        return float("nan"), float("nan"), 0
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values)


def groups_table(groups: list[Group], keys: list[str], metric_names: list[str]) -> Table:
    """One row per seed group: each metric as (mean, std, n) over the group's runs."""
    others = [key for key in keys if key != "seed"]
    rows = []
    for group in groups:
        cells = []
        for name in metric_names:
            values = [run.columns[name] for run in group.runs if isinstance(run.columns.get(name), int | float)]
            cells.append(mean_std(values) if values else None)
        rows.append([*(group.settings[k] for k in others), len(group.runs), *cells])
    header = [*others, "n", *metric_names]
    means = [[cell[0] if isinstance(cell, tuple) else cell for cell in row] for row in rows]
    return Table(header, rows, best_values(header, means))
