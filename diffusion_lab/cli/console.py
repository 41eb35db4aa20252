"""The job's console: Lightning's messages once each, through Hydra's handlers, without its noise; the resolved
config as a tree.

``import lightning`` installs a console handler of its own on the ``lightning`` logger (and, when logging is not
yet configured, on ``lightning.pytorch`` and ``lightning.fabric``). Under Hydra every INFO line then appeared
twice: once bare from that handler, once from Hydra's handler, which also writes the run's log file.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

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
LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_fabric", "pytorch_lightning")

# Lines that tell a user nothing about their run: advertisements and restatements of defaults they did not set.
NOISE = (
    "💡 Tip:",
    "litlogger",
    "Trainer already configured with model summary callbacks",
    "TPU available:",
    "HPU available:",
    "was configured so 100% of the batches",
    "`isinstance(treespec, LeafSpec)` is deprecated",
)


class DropNoise(logging.Filter):
    """Refuses records whose message contains one of ``NOISE``."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in NOISE)


def route_lightning_logs() -> None:
    """Send Lightning's messages once, through the root logger's (Hydra's) handlers, without its noise.

    Outside Hydra (no root handlers) Lightning's own handlers are kept, so a library user still sees its output.
    """
    root = logging.getLogger()
    handlers = list(root.handlers)
    for name in LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        if root.handlers:
            logger.handlers.clear()
            logger.propagate = True
        handlers += logger.handlers
    # A logger's filters skip records propagated from its children (rank_zero's, …): filter at the handlers.
    for handler in handlers:
        if not any(isinstance(existing, DropNoise) for existing in handler.filters):
            handler.addFilter(DropNoise())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")


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
