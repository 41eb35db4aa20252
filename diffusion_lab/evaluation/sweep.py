"""What a sweep evaluation walks: the run folders under the given paths, the checkpoints of each, and the grid
of sampler settings every checkpoint is scored with."""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from diffusion_lab.configs import SamplerConfig, plain
from diffusion_lab.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[2] / "conf"
CHECKPOINT_CHOICES = ("last", "best", "all")
STEP_CHECKPOINT = re.compile(r"step_(\d+)\.ckpt$")


@dataclass
class RunFolder:
    """One training run (a single run or one job of a multirun): its folder and why it cannot be used, if so."""

    path: Path
    problem: str | None = None

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / "checkpoints"


def is_run_folder(path: Path) -> bool:
    """A folder a training job wrote: Hydra's ``.hydra/`` record (every job has one, even one that crashed)."""
    return (path / ".hydra" / "config.yaml").is_file()


def find_runs(paths: list[str | Path]) -> list[RunFolder]:
    """Every run folder at or below ``paths`` (multirun folders, single runs, or a mix), in path order; runs
    that left no checkpoint carry the last error line of their log as ``problem``."""
    found: dict[Path, RunFolder] = {}
    for given in paths:
        root = Path(given).expanduser()
        if not root.exists():
            raise ConfigError(f"runs: {root} does not exist; give a run folder or a multirun folder.")
        candidates = (
            [root] if is_run_folder(root) else sorted(p.parent.parent for p in root.glob("**/.hydra/config.yaml"))
        )
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
        return "trainer" in OmegaConf.load(folder / ".hydra" / "config.yaml")
    except Exception:  # an unreadable record: let the report name the folder rather than skip it silently
        return True


def last_error_line(folder: Path) -> str | None:
    """The last line of the run's log that reports an error (or the last line at all), for a crashed job."""
    lines: list[str] = []
    for log in sorted(folder.glob("*.log")):
        if log.name == "config_tree.log":
            continue
        lines += [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
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
    last = folder / "last.ckpt"
    if last.is_file() and saved_step(last) not in by_step:
        return [*(by_step[s] for s in sorted(by_step)), last]
    return [by_step[s] for s in sorted(by_step)]


def saved_step(path: Path) -> int | None:
    """The global step a checkpoint was saved at (memory-mapped: the weights are not read)."""
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"])
    except Exception:  # unreadable: keep it in the list, and the evaluation will name the problem
        return None


def sampler_option(name: str) -> dict[str, Any]:
    """The settings of one option of the ``sampler`` config group (conf/sampler/<name>.yaml)."""
    options = sorted(p.stem for p in (CONFIG_DIR / "sampler").glob("*.yaml"))
    if name not in options:
        raise ConfigError(f"grid.sampler: unknown sampler {name!r}; valid choices: {', '.join(options)}.")
    option = OmegaConf.load(CONFIG_DIR / "sampler" / f"{name}.yaml")
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
