"""Checkpoint writes that a kill cannot corrupt.

Lightning's local writer opens a temporary file in the system temp folder and moves it into place, which
is a copy (not an atomic rename) whenever that folder is on another filesystem — a tmpfs ``/tmp`` or a
cluster's scratch — and nothing is fsync'ed. A SIGKILL or a node failure during that copy leaves a
truncated ``last.ckpt`` and the run cannot resume. Here the checkpoint goes to a hidden file beside its
destination, is flushed to disk, and replaces the destination with one ``os.replace``: a reader sees the
old checkpoint or the new one, never half of one.
"""

from __future__ import annotations

from typing import Any

from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.plugins.io import TorchCheckpointIO

from diffusion_lab.runs.atomic import atomic_torch_save


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with atomic local writes (remote URLs keep Lightning's own writer)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, str(path).removeprefix("file://"))
