"""Errors that mean "the input is wrong" (a config value, missing data, a bad checkpoint) rather than a bug.

The jobs print these as one line naming the value and the fix, and exit with status 1; anything else keeps its
traceback, because it is ours to fix.
"""


class UserError(Exception):
    """Base class: a mistake in what the user asked for or supplied."""


class ConfigError(UserError, ValueError):
    """A configuration value is invalid or inconsistent."""


class DataNotFoundError(UserError, FileNotFoundError):
    """A dataset is missing on disk and may not be downloaded."""


class UnreadableImageError(UserError, ValueError):
    """An image file cannot be decoded."""


class CheckpointError(UserError, ValueError):
    """A checkpoint is missing, truncated, unsafe or not one of ours."""


class NonFiniteLossError(UserError, RuntimeError):
    """Training produced NaN/Inf losses or gradients for too many steps in a row."""
