"""Checkpoint writes that a kill cannot corrupt.

Lightning's local writer opens a temporary file in the system temp folder and moves it into place, which
is a copy (not an atomic rename) whenever that folder is on another filesystem — a tmpfs ``/tmp`` or a
cluster's scratch — and nothing is fsync'ed. A SIGKILL or a node failure during that copy leaves a
truncated ``last.ckpt`` and the run cannot resume. Here the checkpoint goes to a hidden file beside its
destination, is flushed to disk, and replaces the destination with one ``os.replace``: a reader sees the
old checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.plugins.io import TorchCheckpointIO

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


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with atomic local writes (remote URLs keep Lightning's own writer)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, str(path).removeprefix("file://"))
