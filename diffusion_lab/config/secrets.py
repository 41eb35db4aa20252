"""Keep credentials out of everything a run writes.

A run's config is saved in ``.hydra/``, printed as a tree, stored in every checkpoint and sent to W&B, so a
secret put into it would be copied to all of those. W&B reads its key from ``$WANDB_API_KEY`` or
``wandb login``; a config entry that looks like a credential is refused, and Hydra's copies of it are
redacted before the error is raised.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from diffusion_lab.errors import ConfigError

SECRET_KEY_PATTERN = re.compile(r"(api_?key|token|secret|password|passwd)", re.IGNORECASE)
REDACTED = "<redacted>"


def _leaves(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, f"{prefix}{key}.")
    elif isinstance(node, list):
        for index, item in enumerate(node):
            yield from _leaves(item, f"{prefix}{index}.")
    else:
        yield prefix.rstrip("."), node


def secrets_in(cfg: DictConfig) -> dict[str, str]:
    """Config entries whose key names a credential and which hold a value (resolved): {dotted key: value}."""
    try:
        plain = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # an interpolation that cannot resolve here; its text is what would be stored
        plain = OmegaConf.to_container(cfg, resolve=False)
    return {
        key: str(value)
        for key, value in _leaves(plain)
        if value not in (None, "") and SECRET_KEY_PATTERN.search(key.rsplit(".", 1)[-1])
    }


def refuse_secrets(cfg: DictConfig, hydra_dir: Path | None = None) -> None:
    """Raise a ConfigError for credentials in the config, after scrubbing them from Hydra's saved copies."""
    found = secrets_in(cfg)
    if not found:
        return
    if hydra_dir is not None and hydra_dir.is_dir():
        for saved in hydra_dir.glob("*.yaml"):
            text = saved.read_text()
            for value in found.values():
                text = text.replace(value, REDACTED)
            saved.write_text(text)
    keys = ", ".join(sorted(found))
    raise ConfigError(
        f"{keys} would store a credential in the run's config, checkpoints and logs; remove it and give W&B its "
        "key through $WANDB_API_KEY or `wandb login` instead."
    )
