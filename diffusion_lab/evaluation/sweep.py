"""Evaluating a sweep: every run under ``runs=`` × its selected checkpoints × a grid of sampler settings, each
result appended to the run's eval/metrics.jsonl; a measurement already recorded there is skipped, so an
interrupted sweep evaluation resumes where it stopped."""

from __future__ import annotations

import itertools
import json
import logging
import time
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from diffusion_lab.callbacks.posthoc_ema import check_ema_length
from diffusion_lab.config import CONFIG_DIR
from diffusion_lab.config.build import checkpoint_sampler, objective_kind, resolve_sampling
from diffusion_lab.config.schemas import SamplerConfig, plain
from diffusion_lab.errors import CheckpointError, ConfigError
from diffusion_lab.evaluation.nll import check_nll_applies
from diffusion_lab.evaluation.scoring import Evaluation, ema_lengths, with_ema_length
from diffusion_lab.runs.checkpoints import load_checkpoint, load_module
from diffusion_lab.runs.folders import CHECKPOINT_CHOICES, find_runs, saved_step, select_checkpoints
from diffusion_lab.runs.layout import CONFIG_KEY, POSTHOC_EMA
from diffusion_lab.runs.records import append_record, done_metrics, stamped

log = logging.getLogger(__name__)


def evaluate_runs(cfg: DictConfig) -> dict[str, Any]:
    """Every run under ``runs`` × its selected checkpoints × the sampler grid, appended to each run's
    eval/metrics.jsonl; measurements already recorded there are skipped (a rerun resumes)."""
    paths = [cfg.runs] if isinstance(cfg.runs, str) else list(cfg.runs)
    if cfg.checkpoints not in CHECKPOINT_CHOICES:
        raise ConfigError(f"checkpoints={cfg.checkpoints} is not one of {', '.join(CHECKPOINT_CHOICES)}.")
    runs = find_runs(paths)
    usable = [run for run in runs if run.problem is None]
    failed = {str(run.path): run.problem for run in runs if run.problem is not None}
    for path, problem in failed.items():
        log.warning("skipping %s: %s", path, problem)
    if not usable:
        raise ConfigError(
            f"runs={paths}: found no training run with checkpoints"
            + (f" ({len(failed)} without: {'; '.join(f'{p}: {m}' for p, m in failed.items())})" if failed else "")
            + "; point runs= at a run folder (outputs/<date>/<time>) or a multirun folder."
        )
    cells = sampler_grid(plain(cfg.sampler), plain(cfg.get("grid")), sampler_choice())
    for run in usable:  # every grid cell is checked against every checkpoint before anything is sampled
        for ema_length in ema_lengths(cfg):
            if ema_length is not None:
                check_ema_length(run.path / POSTHOC_EMA, ema_length)
        for path in select_checkpoints(run, cfg.checkpoints):
            trained = trained_config(path)
            if trained is None:
                continue  # unreadable: the evaluation names the problem when it reaches it
            if "nll" in cfg.metrics:
                check_nll_applies(objective_kind(trained.objective))
            for cell in cells_for(cfg, trained, cells):
                resolve_sampling(trained, cell)
    job = Evaluation(cfg)
    summary: dict[str, Any] = {"evaluated": 0, "skipped": 0, "failed": dict(failed), "records": []}
    started = time.perf_counter()
    for run in usable:
        for path in select_checkpoints(run, cfg.checkpoints):
            try:
                evaluate_checkpoint(job, run.path, path, cells, summary)
            except CheckpointError as error:
                log.warning("skipping %s: %s", path, error)
                summary["failed"][str(path)] = str(error)
    summary["seconds"] = round(time.perf_counter() - started, 1)
    if job.is_main:
        output = Path(cfg.output_dir)
        output.mkdir(parents=True, exist_ok=True)
        (output / "summary.json").write_text(json.dumps(summary, indent=2))
        log.info(
            "evaluated %d, already recorded %d, failed %d, in %.0f s",
            summary["evaluated"], summary["skipped"], len(summary["failed"]), summary["seconds"],
        )  # fmt: skip
    if not summary["evaluated"] and not summary["skipped"]:
        raise ConfigError(f"runs={paths}: nothing could be evaluated ({'; '.join(summary['failed'].values())}).")
    return summary


def evaluate_checkpoint(job: Evaluation, run_dir: Path, path: Path, cells: list[dict], summary: dict) -> None:
    for ema_length in ema_lengths(job.cfg):
        evaluate_checkpoint_at(job, run_dir, path, cells, summary, ema_length)


def evaluate_checkpoint_at(
    job: Evaluation, run_dir: Path, path: Path, cells: list[dict], summary: dict, ema_length: float | None
) -> None:
    """Every grid cell of one checkpoint with one EMA length (None: the checkpoint's own EMA)."""
    cfg = job.cfg
    module = checkpoint = None
    step = saved_step(path)  # memory-mapped: a fully recorded checkpoint is never loaded
    trained = trained_config(path)
    if trained is None:
        raise CheckpointError(f"{path} cannot be read (truncated or not a diffusion_lab checkpoint).")
    for settings in (resolve_sampling(trained, cell) for cell in cells_for(cfg, trained, cells)):
        key = {
            "checkpoint_file": f"{path.parent.name}/{path.name}", "global_step": step,
            "ema": bool(cfg.use_ema), "sampler": settings if job.fidelity else None,
            "num_samples": cfg.num_samples if job.fidelity else None, "seed": cfg.seed if job.fidelity else None,
            "guidance_scale": cfg.guidance_scale if job.fidelity else None,
            "class_label": plain(cfg).get("class_label") if job.fidelity else None,
            "reference_split": cfg.reference_split,
            "feature_extractor": job.feature_protocol()["feature_extractor"],
            "ema_length": None if ema_length is None else float(ema_length),
        }  # fmt: skip
        if set(job.metrics) <= done_metrics(run_dir, key):
            summary["skipped"] += 1
            log.info("already recorded: %s %s %s", run_dir.name, path.name, settings.get("sampler"))
            continue
        if module is None:
            module, checkpoint = load_module(str(path), use_ema=cfg.use_ema)
            if ema_length is not None:
                with_ema_length(module, checkpoint, path, ema_length)
        report = job.score(module=module, checkpoint=checkpoint, checkpoint_path=str(path), settings=settings,
                           ema_length=ema_length)  # fmt: skip
        if report is not None:
            if not append_record(run_dir, stamped(report), unless_recorded=True):
                # Another evaluation job on this run scored the same cell meanwhile; one record is enough.
                summary["skipped"] += 1
                log.info("recorded meanwhile elsewhere: %s %s %s", run_dir.name, path.name, settings.get("sampler"))
                continue
            summary["records"].append({"run": str(run_dir), **{k: report[k] for k in ("metrics", "protocol")}})
            log.info("%s %s %s: %s", run_dir.name, path.name, settings.get("sampler"), json.dumps(report["metrics"]))
        summary["evaluated"] += 1
        if not job.fidelity:
            break  # nll does not depend on the sampler


def trained_config(path: Path) -> DictConfig | None:
    """The config a checkpoint was trained with, as stored in it (memory-mapped: the weights are not read)."""
    try:
        return OmegaConf.create(load_checkpoint(path, mmap=True)[CONFIG_KEY])
    except CheckpointError:
        return None


def cells_for(cfg: DictConfig, trained: DictConfig, cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The grid's cells, or a distilled checkpoint's own sampler when neither the grid nor the command line chose
    one (each round's checkpoint then counts its own DDIM steps; ``grid.num_steps`` still spans its steps)."""
    own = checkpoint_sampler(cfg, OmegaConf.to_container(trained, resolve=True))
    if own is None:
        return cells
    grid = plain(cfg.get("grid")) or {}
    return sampler_grid(own, {"num_steps": grid.get("num_steps"), "timestep_spacing": grid.get("timestep_spacing")})


def sampler_choice() -> str | None:
    """The ``sampler`` option this job was composed with (Hydra's runtime choice); None outside a Hydra job."""
    if not HydraConfig.initialized():
        return None
    return HydraConfig.get().runtime.choices.get("sampler")


def sampler_option(name: str) -> dict[str, Any]:
    """The settings of one option of the ``sampler`` config group (conf/sampler/<name>.yaml)."""
    options = sorted(p.stem for p in (Path(CONFIG_DIR) / "sampler").glob("*.yaml"))
    if name not in options:
        raise ConfigError(f"grid.sampler: unknown sampler {name!r}; valid choices: {', '.join(options)}.")
    option = OmegaConf.load(Path(CONFIG_DIR) / "sampler" / f"{name}.yaml")
    option.pop("defaults", None)
    return plain(OmegaConf.merge(OmegaConf.structured(SamplerConfig), option))


def sampler_grid(
    base: dict[str, Any], grid: dict[str, Any] | None, base_option: str | None = None
) -> list[dict[str, Any]]:
    """The sampler settings of every grid cell: ``grid.sampler`` × ``grid.timestep_spacing`` × ``grid.num_steps``
    (each may be empty, which keeps the job's ``sampler``); every cell is checked before anything is sampled.
    Each ``grid.sampler`` option starts from its conf/sampler file, plus what the job set on top of its own option
    ``base_option`` (``sampler=heun sampler.sigma_max=80 grid.sampler=[euler,heun]``: σ_max 80 in every cell)."""
    grid = grid or {}
    names = list(grid.get("sampler") or [])
    spacings = list(grid.get("timestep_spacing") or [])
    steps = list(grid.get("num_steps") or [])
    overridden = {}
    if names and base_option:  # what the job changed from its own option's file
        own = sampler_option(base_option)
        overridden = {k: v for k, v in base.items() if k != "sampler" and own.get(k) != v}
    bases = [{**sampler_option(name), **overridden} for name in names] or [dict(base)]
    cells = []
    for settings, spacing, num_steps in itertools.product(bases, spacings or [None], steps or [None]):
        cell = dict(settings)
        if spacing is not None:
            cell["timestep_spacing"] = str(spacing)
        if num_steps is not None:
            cell["num_steps"] = int(num_steps)
        if cell not in cells:
            cells.append(cell)
    return cells
