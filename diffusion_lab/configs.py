"""Hydra/OmegaConf registrations shared by every job: config resolvers (and, below, the structured schemas)."""

from __future__ import annotations

from omegaconf import OmegaConf


def _integer_division(numerator: int, denominator: int) -> int:
    return int(numerator) // int(denominator)


def register_resolvers() -> None:
    """``${div:a,b}`` → a // b (e.g. attention at half the image size). Safe to call repeatedly."""
    if not OmegaConf.has_resolver("div"):
        OmegaConf.register_new_resolver("div", _integer_division)
