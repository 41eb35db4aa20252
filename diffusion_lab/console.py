"""One line per message on the console: Lightning's loggers routed through Hydra's handlers, its noise dropped.

``import lightning`` installs a console handler of its own on the ``lightning`` logger (and, when logging is not
yet configured, on ``lightning.pytorch`` and ``lightning.fabric``). Under Hydra every INFO line then appeared
twice: once bare from that handler, once from Hydra's handler, which also writes the run's log file.
"""

from __future__ import annotations

import logging
import warnings

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
