"""The evaluation table of a run: ``<run>/eval/metrics.jsonl``, one JSON record per checkpoint × sampler
setting, appended, never rewritten, so evaluating later adds rows and an interrupted sweep resumes."""

from __future__ import annotations

import json
import os
from dataclasses import fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from filelock import FileLock

from diffusion_lab.config.schemas import SamplerConfig
from diffusion_lab.runs.layout import EVAL_RECORDS

# What makes two evaluations the same measurement: a record with these protocol values is not redone.
KEY_FIELDS = (
    "checkpoint_file",
    "global_step",
    "ema",
    "sampler",
    "num_samples",
    "seed",
    "guidance_scale",
    "class_label",
    "reference_split",
    "feature_extractor",
    "ema_length",
)


def records_path(run_dir: Path) -> Path:
    return Path(run_dir) / EVAL_RECORDS


def read_records(run_dir: Path) -> list[dict[str, Any]]:
    """Every complete record of the run (a line cut short by a kill is skipped)."""
    path = records_path(run_dir)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


# Sampler settings added after records were first written; at their defaults (SamplerConfig's, which leave the
# samplers as they were) a record that lacks them and one that holds them are the same measurement.
SAMPLER_DEFAULTS = {
    f.name: f.default
    for f in fields(SamplerConfig)
    if f.name in ("rho", "sigma_max", "s_churn", "s_tmin", "s_tmax", "s_noise")
}


def record_key(protocol: dict[str, Any]) -> str:
    key = {field: protocol.get(field) for field in KEY_FIELDS}
    if isinstance(key["sampler"], dict):
        key["sampler"] = {k: v for k, v in key["sampler"].items() if SAMPLER_DEFAULTS.get(k, object()) != v}
    return json.dumps(key, sort_keys=True)


def done_metrics(run_dir: Path, protocol: dict[str, Any]) -> set[str]:
    """The metrics already recorded for this measurement."""
    key = record_key(protocol)
    return {
        name
        for record in read_records(run_dir)
        if record_key(record.get("protocol", {})) == key
        for name in record.get("requested", [])
    }


def append_record(run_dir: Path, record: dict[str, Any], unless_recorded: bool = False) -> bool:
    """One line, written with a single write and fsync'ed: a kill leaves at most a partial last line. Appends
    hold the run's lock, so concurrent evaluation jobs never interleave; with ``unless_recorded`` a record whose
    measurement another job recorded meanwhile (same key, its metrics) is dropped. Returns whether it was
    written."""
    path = records_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{path}.lock"):
        if unless_recorded and set(record.get("requested", [])) <= done_metrics(run_dir, record["protocol"]):
            return False
        line = json.dumps(record, sort_keys=True) + "\n"
        if path.is_file() and path.stat().st_size and not ends_with_newline(path):
            line = "\n" + line  # a line cut short by a kill stays alone (and unreadable), not glued to this one
        with open(path, "a") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
    return True


def ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as handle:
        handle.seek(-1, os.SEEK_END)
        return handle.read(1) == b"\n"


def stamped(report: dict[str, Any]) -> dict[str, Any]:
    """The record with the time it was made (UTC)."""
    return {**report, "evaluated_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
