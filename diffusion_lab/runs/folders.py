"""Finding run folders and their checkpoints: the runs under a path (a sweep's jobs), which checkpoints of a run
to take, and which checkpoint a ``ckpt_path=`` means."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

from diffusion_lab.errors import ConfigError
from diffusion_lab.runs.layout import CHECKPOINTS, HYDRA_CONFIG, LAST_CHECKPOINT, last_checkpoint

log = logging.getLogger("diffusion_lab")
CHECKPOINT_CHOICES = ("last", "best", "all")
STEP_CHECKPOINT = re.compile(r"step_(\d+)\.ckpt$")


@dataclass
class RunFolder:
    """One training run (a single run or one job of a multirun): its folder and why it cannot be used, if so."""

    path: Path
    problem: str | None = None

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / CHECKPOINTS


def is_run_folder(path: Path) -> bool:
    """A folder a training job wrote: Hydra's ``.hydra/`` record (every job has one, even one that crashed)."""
    return (path / HYDRA_CONFIG).is_file()


def find_runs(paths: list[str | Path]) -> list[RunFolder]:
    """Every run folder at or below ``paths`` (multirun folders, single runs, or a mix), in path order; runs
    that left no checkpoint carry the last error line of their log as ``problem``."""
    found: dict[Path, RunFolder] = {}
    for given in paths:
        root = Path(given).expanduser()
        if not root.exists():
            raise ConfigError(f"runs: {root} does not exist; give a run folder or a multirun folder.")
        candidates = [root] if is_run_folder(root) else sorted(p.parents[1] for p in root.glob(f"**/{HYDRA_CONFIG}"))
        for folder in candidates:
            if not is_run_folder(folder) or "eval" in folder.relative_to(root).parts:
                continue
            if not _is_training_run(folder):
                continue  # an evaluate or sample job's own folder
            run = RunFolder(folder.resolve())
            if not any(run.checkpoints_dir.glob("*.ckpt")):
                run.problem = f"no checkpoint ({last_error_line(folder) or 'no log line'})"
            found.setdefault(run.path, run)
    return list(found.values())


def _is_training_run(folder: Path) -> bool:
    try:
        return "trainer" in OmegaConf.load(folder / HYDRA_CONFIG)
    except Exception:  # an unreadable record: let the report name the folder rather than skip it silently
        return True


def last_error_line(folder: Path) -> str | None:
    """The last line of the run's log that reports an error (or the last line at all), for a crashed job."""
    lines: list[str] = []
    for log_file in sorted(folder.glob("*.log")):
        if log_file.name == "config_tree.log":
            continue
        lines += [line.strip() for line in log_file.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "Traceback" in line or "[ERROR]" in line]
    return (errors or lines or [None])[-1]


def select_checkpoints(run: RunFolder, which: str) -> list[Path]:
    """``last`` → last.ckpt; ``best`` → best.ckpt; ``all`` → every step_*.ckpt by step (and last.ckpt when its
    step is not among them, e.g. a run stopped between periodic saves)."""
    if which not in CHECKPOINT_CHOICES:
        raise ConfigError(f"checkpoints={which} is not one of {', '.join(CHECKPOINT_CHOICES)}.")
    folder = run.checkpoints_dir
    if which in ("last", "best"):
        path = folder / f"{which}.ckpt"
        return [path] if path.is_file() else []
    by_step = {int(STEP_CHECKPOINT.search(p.name).group(1)): p for p in folder.glob("step_*.ckpt")}
    last = folder / LAST_CHECKPOINT
    if last.is_file() and saved_step(last) not in by_step:
        return [*(by_step[s] for s in sorted(by_step)), last]
    return [by_step[s] for s in sorted(by_step)]


def saved_step(path: Path) -> int | None:
    """The global step a checkpoint was saved at (memory-mapped: the weights are not read)."""
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"])
    except Exception:  # unreadable: keep it in the list, and the evaluation will name the problem
        return None


def resolve_checkpoint(
    ckpt_path: str | None,
    log_dir: Path,
    current_run_dir: Path,
    announce: Callable[[str], None] | None = None,
    fresh_start_allowed: bool = False,
) -> str | None:
    """The checkpoint to resume or load.

    ``None`` → none; ``"last"`` → this run folder's ``checkpoints/last.ckpt`` when it has one (a fixed
    ``hydra.run.dir``), else the newest one of an earlier run under ``log_dir``; ``"auto"`` → this run folder's
    ``last.ckpt`` when it has one, else none (a fresh start: the form for SLURM requeues, whose first launch must
    not pick up another run; training only, ``fresh_start_allowed``); anything else → that file, which must
    exist. ``announce`` hears the choice and why.
    """
    if not ckpt_path:
        return None
    announce = announce or log.info
    own = last_checkpoint(current_run_dir)
    if str(ckpt_path) in ("last", "auto") and own.is_file():
        announce(f"ckpt_path={ckpt_path} → {own} (this run folder's own last checkpoint)")
        return str(own)
    if str(ckpt_path) == "auto":
        if not fresh_start_allowed:
            raise ConfigError(
                "ckpt_path=auto resumes training in a fixed run folder; here give a checkpoint's path or "
                "ckpt_path=last."
            )
        announce(f"ckpt_path=auto: {current_run_dir} has no {CHECKPOINTS}/{LAST_CHECKPOINT} yet; starting a fresh run")
        return None
    if str(ckpt_path) == "last":
        candidates = [path for path in log_dir.glob(f"**/{CHECKPOINTS}/{LAST_CHECKPOINT}") if path.is_file()]
        if not candidates:
            raise ConfigError(
                f"ckpt_path=last found no checkpoints/last.ckpt in this run folder ({current_run_dir}) nor in "
                f"any run under {log_dir}/; give the checkpoint's path instead "
                "(ckpt_path=outputs/<date>/<time>/checkpoints/last.ckpt)."
            )
        newest = max(candidates, key=lambda path: path.stat().st_mtime)
        announce(f"ckpt_path=last → {newest} (the newest under {log_dir}/; this run folder has none)")
        return str(newest)
    path = Path(ckpt_path).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"ckpt_path={ckpt_path} does not exist; give an existing .ckpt file, ckpt_path=last or ckpt_path=auto."
        )
    return str(path)
