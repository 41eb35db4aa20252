"""``torch.save`` that a kill cannot corrupt: write beside the destination, flush, then one ``os.replace``.

A reader sees the old file or the new one, never half of one. Plain torch, so that anything saving a file can
use it (the Lightning checkpoint plugin in ``diffusion_lab.runs.checkpoint_io`` does).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

PARTIAL_SUFFIX = ".partial"


def partial_path(path: Path) -> Path:
    """Where the checkpoint bound for ``path`` is written before it is moved into place."""
    return path.with_name(f".{path.name}.{os.getpid()}{PARTIAL_SUFFIX}")


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` that leaves either the previous file or the complete new one at ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = partial_path(path)
    try:
        with open(temporary, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    _fsync_directory(path.parent)
    _remove_leftovers(path)


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _remove_leftovers(path: Path) -> None:
    """Partial files of earlier, killed writers of this checkpoint are garbage once a write succeeds."""
    for leftover in path.parent.glob(f".{path.name}.*{PARTIAL_SUFFIX}"):
        leftover.unlink(missing_ok=True)
