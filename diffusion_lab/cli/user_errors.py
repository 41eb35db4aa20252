"""A user's mistake ends a job with one line naming the value and the fix (exit status 1), not a traceback."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from hydra.errors import InstantiationException
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from diffusion_lab.errors import ConfigError, UserError

log = logging.getLogger("diffusion_lab")
T = TypeVar("T")


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
