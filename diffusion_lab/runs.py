"""What every job does around its work: show the config, find the checkpoint to resume, report user errors."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf

from diffusion_lab.errors import ConfigError, UserError

log = logging.getLogger("diffusion_lab")
T = TypeVar("T")

GROUP_ORDER = (
    "data",
    "model",
    "schedule",
    "objective",
    "loss_weighting",
    "sampler",
    "optimizer",
    "lr_scheduler",
    "trainer",
    "callbacks",
    "logger",
    "paths",
)


def instantiate_group(group: DictConfig | None) -> list[Any]:
    """Instantiate every entry of a dict-of-configs group (callbacks, loggers); null entries are skipped."""
    if not group:
        return []
    return [instantiate(entry) for entry in group.values() if entry is not None and "_target_" in entry]


@rank_zero_only
def print_config_tree(cfg: DictConfig, save_to: Path | None = None) -> None:
    """The resolved config as a rich tree, one branch per group (and saved as text next to the run)."""
    from rich.console import Console
    from rich.syntax import Syntax
    from rich.tree import Tree

    tree = Tree("config", style="bold")
    keys = [k for k in GROUP_ORDER if k in cfg] + [k for k in cfg if k not in GROUP_ORDER]
    for key in keys:
        value = cfg[key]
        text = OmegaConf.to_yaml(value, resolve=True) if isinstance(value, DictConfig) else str(value)
        tree.add(f"[bold]{key}[/bold]").add(Syntax(text, "yaml", theme="ansi_dark", word_wrap=True))
    Console().print(tree)
    if save_to is not None:
        save_to.parent.mkdir(parents=True, exist_ok=True)
        with open(save_to, "w") as handle:
            Console(file=handle, width=120).print(tree)


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
    own = current_run_dir / "checkpoints" / "last.ckpt"
    if str(ckpt_path) in ("last", "auto") and own.is_file():
        announce(f"ckpt_path={ckpt_path} → {own} (this run folder's own last checkpoint)")
        return str(own)
    if str(ckpt_path) == "auto":
        if not fresh_start_allowed:
            raise ConfigError(
                "ckpt_path=auto resumes training in a fixed run folder; here give a checkpoint's path or "
                "ckpt_path=last."
            )
        announce(f"ckpt_path=auto: {current_run_dir} has no checkpoints/last.ckpt yet; starting a fresh run")
        return None
    if str(ckpt_path) == "last":
        candidates = [path for path in log_dir.glob("**/checkpoints/last.ckpt") if path.is_file()]
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


@contextmanager
def config_errors() -> Iterator[None]:
    """Inside: building objects from the config, where a ValueError (or Lightning's MisconfigurationException)
    means a bad value, and its message names it."""
    try:
        yield
    except UserError:
        raise
    except (ValueError, InstantiationException) as error:
        cause = error
        while isinstance(cause, InstantiationException) and cause.__cause__ is not None:
            cause = cause.__cause__
        if isinstance(cause, UserError):
            raise cause from None
        if isinstance(cause, (ValueError, TypeError, MisconfigurationException)):
            raise ConfigError(str(cause)) from error
        raise


def report_user_errors(job: Callable[..., T], *args, **kwargs) -> T:
    """Run ``job``; a ``UserError`` ends the process with its one-line message (exit status 1), not a traceback."""
    try:
        return job(*args, **kwargs)
    except UserError as error:
        log.error("%s: %s", type(error).__name__, error)
        print(f"\nError: {error}", file=sys.stderr)
        sys.exit(1)
