"""Compare runs: ``python -m diffusion_lab.report <dir> [<dir> …] [--output DIR]``.

Each dir is a multirun folder, a run folder, or a folder holding either. Writes report.md with its PNG figures and a
self-contained report.html (figures inlined). Nothing in the run folders is written.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime
from pathlib import Path

from diffusion_lab.errors import ConfigError, UserError
from diffusion_lab.reporting import figures
from diffusion_lab.reporting.document import Document, to_html, to_markdown
from diffusion_lab.reporting.run_data import INCEPTION, Run, features_of, load_run, metric_label, sampler_label
from diffusion_lab.reporting.tables import Table, differing_overrides, groups_table, jobs_table, label_runs, seed_groups
from diffusion_lab.runs.folders import find_runs

SMALL_N = 10_000


def build_report(paths: list[Path], output: Path) -> tuple[Path, Path, list[str]]:
    """Write the report of the runs under ``paths`` into ``output``; returns (report.md, report.html, problems)."""
    found = find_runs(paths)
    if not found:
        raise ConfigError(
            f"no training runs under {', '.join(map(str, paths))} (a run folder holds .hydra/config.yaml); "
            "give a run folder (outputs/<date>/<time>) or a multirun folder (outputs/multirun/<date>/<time>)."
        )
    runs, problems = [], []
    for folder in found:
        run = load_run(folder.path)
        if run.problem is not None:
            problems.append(f"{folder.path}: {run.problem}")
        else:
            runs.append(run)
    if not runs:
        raise ConfigError("no run could be reported: " + "; ".join(problems))
    keys = differing_overrides(runs)
    label_runs(runs, keys)
    output.mkdir(parents=True, exist_ok=True)
    document = Document("Run summary" if len(runs) == 1 else f"Comparison of {len(runs)} runs")
    document.paragraph(
        f"Generated {datetime.now():%Y-%m-%d %H:%M} from {', '.join(str(p) for p in paths)}. "
        + ("Columns: the overrides in which the runs differ, then training and evaluation figures; "
           "the best value of each column is marked." if len(runs) > 1 else "")
    )  # fmt: skip
    if problems:
        document.note("Not reported (crashed or incomplete): " + "; ".join(problems))

    document.heading("Runs")
    table = jobs_table(runs, keys)
    document.table(table)
    groups = seed_groups(runs, keys)
    if "seed" in keys and any(len(group.runs) > 1 for group in groups):
        document.heading("Grouped over seeds (mean ± std)")
        document.table(groups_table(groups, keys, table.header[1 + len(keys) :]))
    _evaluation_section(document, runs, problems)

    document.heading("Figures")
    figures_dir = output / "figures"
    figures_dir.mkdir(exist_ok=True)
    document.figure(figures.loss_curves(runs, figures_dir / "loss_curves.png"), "Training and validation losses")
    document.figure(
        figures.loss_profile(runs, figures_dir / "loss_profile.png"),
        "Loss by range of t at the end of training (where schedules and weightings differ)",
    )
    for features in evaluated_feature_spaces(runs):
        suffix = "" if features == INCEPTION else f"_{features}"
        fid = metric_label("FID", {"feature_extractor": features})
        document.figure(
            figures.fid_against_step(runs, figures_dir / f"fid_vs_step{suffix}.png", features),
            f"{fid} and {metric_label('KID', {'feature_extractor': features})} against step",
        )
        document.figure(
            figures.fid_against_nfe(groups, figures_dir / f"fid_vs_nfe{suffix}.png", features),
            f"{fid} against network calls per sample at the final checkpoint",
        )
        document.figure(
            figures.fid_against_ema_length(runs, figures_dir / f"fid_vs_ema_length{suffix}.png", features),
            f"{fid} against the post-hoc EMA length at the final checkpoint",
        )
    document.figure(figures.sample_grids(runs, figures_dir / "samples.png"), "Last sample grid of each run")
    markdown, page = output / "report.md", output / "report.html"
    markdown.write_text(to_markdown(document, output))
    page.write_text(to_html(document))
    return markdown, page, problems


def _evaluation_section(document: Document, runs: list[Run], problems: list[str]) -> None:
    records = [(run, record) for run in runs for record in run.evaluations]
    document.heading("Evaluation")
    if not records:
        document.paragraph(
            "No evaluated metrics yet. Add FID/KID for every run with "
            "`python -m diffusion_lab.evaluate runs=<this folder> num_samples=1000 grid.sampler=[ddim,dpm_solver] "
            "grid.num_steps=[10,20,50]` (add checkpoints=all for FID against training step), then run the report again."
        )
        return
    protocols = [record["protocol"] for _, record in records if "fid" in record["metrics"]]
    if any(protocol.get("num_samples", SMALL_N) < SMALL_N for protocol in protocols):
        document.note(
            f"N < {SMALL_N:,} generated images: FID is biased upwards at small N, so these values compare the runs "
            "with each other (same N, same reference, same seeds), not with published numbers."
        )
    header = ["run", "step", "sampler·NFE", "EMA", "features", "FID", "KID", "N gen"]
    rows = []
    for run, record in sorted(records, key=lambda r: (r[0].label, r[1]["protocol"].get("global_step", 0))):
        protocol, metrics = record["protocol"], record["metrics"]
        rows.append([
            run.legend_name or run.path.name, protocol.get("global_step"), sampler_label(protocol), ema_label(protocol),
            features_of(protocol),
            metrics.get("fid"), metrics.get("kid_mean"), protocol.get("num_samples"),
        ])  # fmt: skip
    document.paragraph("Every evaluation recorded in the runs' eval/metrics.jsonl (EMA weights unless noted).")
    if any(features_of(protocol) != INCEPTION for protocol in protocols):
        document.note(
            "cFID and cKID are FID and KID in the feature space of the digits classifier (eval.features=digits), "
            "not Inception's: they compare runs with each other, and their scale is that network's own."
        )
    document.table(Table(header, rows, {}))
    document.paragraph("Protocol: " + "; ".join(protocol_lines(protocols)) + ".")


def ema_label(protocol: dict) -> str:
    if protocol.get("ema_length") is not None:
        return f"post-hoc σ_rel {protocol['ema_length']:g}"
    return "checkpoint's" if protocol.get("ema", True) else "none (raw)"


def evaluated_feature_spaces(runs: list[Run]) -> list[str]:
    """The feature networks the runs were evaluated in, Inception's first."""
    spaces = {features_of(record["protocol"]) for run in runs for record in run.evaluations}
    return sorted(spaces, key=lambda name: (name != INCEPTION, name)) or [INCEPTION]


def protocol_lines(protocols: list[dict]) -> list[str]:
    """The protocol of the FIDs above, each distinct setting once: what a reader needs to trust them."""

    def distinct(make) -> str:
        return " / ".join(dict.fromkeys(str(make(p)) for p in protocols))

    lines = [
        f"N generated {distinct(lambda p: p.get('num_samples'))}, seeds from {distinct(lambda p: p.get('seed'))}",
        "reference " + distinct(lambda p: f"{p.get('num_reference')} images of {p.get('dataset')} "
                                          f"'{p.get('reference_split')}'"),
        f"images {distinct(lambda p: p.get('resize', '?'))}",
        f"features {distinct(lambda p: p.get('feature_extractor'))}",
    ]  # fmt: skip
    floors = [floor_line(p) for p in protocols if "real_data_floor" in p]
    if floors:
        lines.append(
            "real-data floor (FID of as many real images of the other split against the same reference, what a "
            "perfect model would score at this N): " + " / ".join(dict.fromkeys(floors))
        )
    return lines


def floor_line(protocol: dict) -> str:
    floor = protocol["real_data_floor"]
    how = floor.get("method") or f"{floor['n']} '{floor['split']}' images"
    return f"{metric_label('FID', protocol)} {floor['fid']:.4g} ({how})"


def default_output(paths: list[Path]) -> Path:
    if len(paths) == 1:
        return paths[0] / "report"
    return Path("outputs") / "report" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffusion_lab.report", description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+", type=Path, help="multirun folders, run folders, or folders holding them")
    parser.add_argument("--output", type=Path, help="where to write (default: <dir>/report for one dir)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        markdown, page, problems = build_report(args.dirs, args.output or default_output(args.dirs))
    except UserError as error:
        print(f"Error: {error}", file=sys.stderr)
        return 1
    for problem in problems:
        print(f"not reported: {problem}", file=sys.stderr)
    print(f"wrote {markdown} and {page} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
