"""The report's figures (matplotlib, written as PNG): losses, the per-timestep loss profile, FID against training
step and against network calls, and the runs' last sample grids side by side."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from PIL import Image

from diffusion_lab.reporting.run_data import INCEPTION, Run, features_of, metric_label, sampler_label
from diffusion_lab.reporting.tables import Group, mean_std

COLOURS = plt.get_cmap("tab10").colors
PANELS_PER_ROW = 3  # of the FID-against-calls figure, one panel per sampler setting


def _colour(index: int):
    return COLOURS[index % len(COLOURS)]


def _colours(count: int) -> list:
    """``count`` distinguishable colours: the report's ten, or tab20's twenty when a sampler comparison holds more
    lines (beyond twenty they repeat)."""
    if count <= len(COLOURS):
        return [_colour(i) for i in range(count)]
    return [matplotlib.colormaps["tab20"](i % 20) for i in range(count)]


def _smooth(values: list[float], weight: float = 0.8) -> list[float]:
    smoothed, running = [], None
    for value in values:
        running = value if running is None else weight * running + (1 - weight) * value
        smoothed.append(running)
    return smoothed


PLAIN = matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:.4g}")


def _plain_numbers(ax, axis: str = "y") -> None:
    """Log axes label ticks as 0.9, 1.2 … rather than 9×10⁻¹ (the ranges here are often under a decade)."""
    target = ax.yaxis if axis == "y" else ax.xaxis
    low, high = ax.get_ylim() if axis == "y" else ax.get_xlim()
    within_a_decade = axis == "y" and low > 0 and high / low < 10
    target.set_major_formatter(PLAIN)
    # minor ticks get labels only where a decade has no major tick to read from
    target.set_minor_formatter(PLAIN if within_a_decade else matplotlib.ticker.NullFormatter())


def _spread_ticks(values: list[float], min_ratio: float = 1.3) -> list[float]:
    """One tick per cluster of increasing values closer than ``min_ratio`` on a log axis (labels 9, 10, 11
    collide), the roundest of each cluster (10 over 9 and 11)."""
    clusters: list[list[float]] = []
    for value in values:
        if clusters and value / clusters[-1][0] < min_ratio:
            clusters[-1].append(value)
        else:
            clusters.append([value])
    return [max(cluster, key=lambda v: (v % 10 == 0, v % 5 == 0, -v)) for cluster in clusters]


def _legend(ax, count: int) -> None:
    ax.legend(fontsize=7 if count > 6 else 8, loc="best", framealpha=0.85)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def loss_curves(runs: list[Run], path: Path) -> Path | None:
    """Training loss (smoothed) and validation losses (raw weights dashed, EMA solid) against step."""
    if not any(run.series("train/loss") for run in runs):
        return None
    fig, (train_ax, val_ax) = plt.subplots(1, 2, figsize=(12, 4.2))
    for index, run in enumerate(runs):
        steps, values = zip(*run.series("train/loss"), strict=True) if run.series("train/loss") else ((), ())
        train_ax.plot(steps, _smooth(list(values)), color=_colour(index), label=run.legend_name, linewidth=1.3)
        for key, style in (("val/loss", "--"), ("val/loss_ema", "-")):
            series = run.series(key)
            if series:
                xs, ys = zip(*series, strict=True)
                val_ax.plot(xs, ys, style, marker="o", markersize=3, color=_colour(index), linewidth=1.2,
                            label=f"{run.legend_name} ({'EMA' if key.endswith('ema') else 'raw'})")  # fmt: skip
    train_ax.set(title="training loss (exponentially smoothed, 0.8)", xlabel="optimiser step", ylabel="train/loss")
    val_ax.set(title="validation loss (colours as left): EMA solid, raw dashed", xlabel="optimiser step",
               ylabel="val/loss (fixed seeds)")  # fmt: skip
    for ax in (train_ax, val_ax):
        ax.set_yscale("log")
        _plain_numbers(ax)
        ax.grid(alpha=0.3, which="both")
    _legend(train_ax, len(runs))
    return _save(fig, path)


def loss_profile(runs: list[Run], path: Path) -> Path | None:
    """train/loss_t0…t9 at the end of training: where in t each run's loss sits."""
    profiled = [(index, run) for index, run in enumerate(runs) if run.loss_profile]
    if not profiled:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for index, run in profiled:
        profile = run.loss_profile
        centres = [(k + 0.5) / len(profile) for k in range(len(profile))]
        ax.plot(centres, profile, marker="o", markersize=3, color=_colour(index), label=run.legend_name)
    ax.set(title="loss by timestep range at the end of training", xlabel="t / T (bucket centre; 0 = clean, 1 = noise)",
           ylabel="train/loss_t (weighted loss)", yscale="log")  # fmt: skip
    _plain_numbers(ax)
    ax.grid(alpha=0.3, which="both")
    _legend(ax, len(profiled))
    return _save(fig, path)


def fid_against_step(runs: list[Run], path: Path, features: str = INCEPTION) -> Path | None:
    """FID and KID (in the ``features`` space) of every evaluated checkpoint against its training step
    (``checkpoints=all``)."""
    curves = defaultdict(list)
    for index, run in enumerate(runs):
        for record in run.evaluations:
            protocol = record["protocol"]
            if (
                "fid" in record["metrics"] and "global_step" in protocol and features_of(protocol) == features
                and protocol.get("ema_length") is None
            ):  # fmt: skip
                curves[(index, sampler_label(record["protocol"]))].append(record)
    curves = {
        key: records for key, records in curves.items() if len({r["protocol"]["global_step"] for r in records}) > 1
    }
    if not curves:
        return None
    has_kid = any("kid_mean" in r["metrics"] for records in curves.values() for r in records)
    fig, axes = plt.subplots(1, 2 if has_kid else 1, figsize=(12 if has_kid else 7, 4.2), squeeze=False)
    styles = {
        label: style for label, style in zip(sorted({k[1] for k in curves}), ("-", "--", ":", "-."), strict=False)
    }
    for (index, label), records in sorted(curves.items()):
        records = sorted(records, key=lambda r: r["protocol"]["global_step"])
        steps = [r["protocol"]["global_step"] for r in records]
        for ax, metric in zip(axes[0], ("fid", "kid_mean"), strict=False):
            ax.plot(steps, [r["metrics"].get(metric, float("nan")) for r in records], styles.get(label, "-"),
                    marker="o", markersize=3, color=_colour(index),
                    label=f"{runs[index].legend_name} · {label}")  # fmt: skip
    names = [metric_label(name, {"feature_extractor": features}) for name in ("FID", "KID")]
    for ax, name in zip(axes[0], names, strict=False):
        ax.set(title=f"{name} against training step", xlabel="optimiser step of the checkpoint", ylabel=name)
        ax.grid(alpha=0.3)
    _legend(axes[0][0], len(curves))
    return _save(fig, path)


def fid_against_ema_length(runs: list[Run], path: Path, features: str = INCEPTION) -> Path | None:
    """FID at the final checkpoint against the post-hoc EMA length σ_rel (``grid.ema_length``), one line per run
    and sampler setting: where the average should be, chosen after training."""
    curves = defaultdict(dict)
    for index, run in enumerate(runs):
        last_step = max((r["protocol"].get("global_step", -1) for r in run.evaluations), default=-1)
        for record in run.evaluations:
            protocol = record["protocol"]
            if (
                "fid" in record["metrics"] and protocol.get("ema_length") is not None
                and protocol.get("global_step", -1) == last_step and features_of(protocol) == features
            ):  # fmt: skip
                curves[(index, sampler_label(protocol))][protocol["ema_length"]] = record["metrics"]["fid"]
    curves = {key: points for key, points in curves.items() if len(points) > 1}
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for (index, label), points in sorted(curves.items()):
        lengths = sorted(points)
        ax.plot(lengths, [points[x] for x in lengths], marker="o", markersize=3, color=_colour(index),
                label=f"{runs[index].legend_name} · {label}")  # fmt: skip
    fid = metric_label("FID", {"feature_extractor": features})
    ax.set(title=f"{fid} against the post-hoc EMA length", xlabel="relative EMA length σ_rel (EDM2)", ylabel=fid)
    ax.grid(alpha=0.3)
    _legend(ax, len(curves))
    return _save(fig, path)


def fid_against_nfe(groups: list[Group], path: Path, features: str = INCEPTION) -> Path | None:
    """FID (in the ``features`` space) at the final checkpoint against network calls per sample, the real-data
    floor dashed. Several groups
    of runs: one panel per sampler, one line per group (mean ± std over seeds). One group: the samplers side by
    side, one line each, in one panel."""
    points = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))  # sampler → group → nfe → [fid]
    floors = []
    for g, group in enumerate(groups):
        for run in group.runs:
            for record in run.final_evaluations:
                protocol = record["protocol"]
                if "fid" in record["metrics"] and protocol.get("nfe_per_sample") and features_of(protocol) == features:
                    sampler = sampler_label(protocol).split("·")[0]
                    points[sampler][g][protocol["nfe_per_sample"]].append(record["metrics"]["fid"])
                    if "real_data_floor" in protocol:
                        floors.append(protocol["real_data_floor"]["fid"])
    if not points or not any(len(nfes) > 1 for by_group in points.values() for nfes in by_group.values()):
        return None
    samplers = sorted(points)
    if len(groups) == 1:  # one panel: every sampler's line
        panels = [("samplers", {i: points[name][0] for i, name in enumerate(samplers)}, samplers)]
    else:
        panels = [(name, points[name], None) for name in samplers]
    # Each panel its own y range: samplers differ by orders of magnitude at few calls.
    # At most PANELS_PER_ROW side by side: a teacher scored by ten sampler settings was one 5000-pixel row.
    columns = min(len(panels), PANELS_PER_ROW)
    rows = math.ceil(len(panels) / columns)
    width = 5.5 * columns + (2 if len(groups) == 1 else 0)
    fig, axes = plt.subplots(rows, columns, figsize=(width, 4.2 * rows), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    for ax, (title, lines, line_names) in zip(axes.flat, panels, strict=False):
        colours = _colours(max(lines) + 1)
        for key, by_nfe in sorted(lines.items()):
            nfes = sorted(by_nfe)
            stats = [mean_std(by_nfe[n]) for n in nfes]
            label = groups[key].legend_name if line_names is None else line_names[key]
            ax.errorbar(nfes, [s[0] for s in stats], yerr=[s[1] for s in stats], marker="o", markersize=3,
                        capsize=3, color=colours[key], label=f"{label} (n={stats[0][2]})")  # fmt: skip
        if floors:
            ax.axhline(min(floors), color="grey", linestyle="--", linewidth=1, label="real-data floor")
        fid = metric_label("FID", {"feature_extractor": features})
        ax.set(title=f"{title}: {fid} against network calls", xlabel="network calls per sample (NFE)", xscale="log",
               ylabel=f"{fid} (mean ± std over seeds)")  # fmt: skip
        ax.set_xticks(_spread_ticks(sorted({n for by_nfe in lines.values() for n in by_nfe})))
        _plain_numbers(ax, "x")
        if line_names is not None:  # samplers can differ by orders of magnitude at few calls
            ax.set_yscale("log")
            ax.yaxis.set_minor_locator(matplotlib.ticker.LogLocator(subs=(2.0, 3.0, 5.0)))
            ax.yaxis.set_major_formatter(PLAIN)
            ax.yaxis.set_minor_formatter(PLAIN)
        ax.grid(alpha=0.3, which="both")
        _legend(ax, len(lines))
    return _save(fig, path)


def sample_grids(runs: list[Run], path: Path) -> Path | None:
    """Each run's last sample grid, labelled, side by side."""
    shown = [run for run in runs if run.grid is not None]
    if not shown:
        return None
    columns = min(4, len(shown))
    rows = -(-len(shown) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 4.1 * rows), squeeze=False, layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for ax, run in zip(axes.flat, shown, strict=False):
        ax.imshow(Image.open(run.grid).convert("RGB"), interpolation="nearest")
        step = int(run.grid.stem.split("_")[-1])
        ax.set_title(f"{run.legend_name}\nsamples at step {step}", fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
