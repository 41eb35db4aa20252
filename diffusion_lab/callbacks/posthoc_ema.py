"""Post-hoc EMA (Karras et al. 2024, "EDM2", §3): choose the EMA length after training instead of before.

During training two power-function EMAs of the network are tracked (relative lengths σ_rel = 0.05 and 0.10 by
default, EDM2's) and snapshotted every ``snapshot_every_n_steps`` steps into ``<run>/posthoc_ema/``. Afterwards
the average for any σ_rel is reconstructed as the least-squares combination of the snapshots whose averaging
profiles best match the wanted one (EDM2's Algorithm 3): ``python -m diffusion_lab.evaluate … ema_length=0.08``,
or ``grid.ema_length=[…]`` to score FID against the EMA length.

The tracking, the profiles and the solve are ema-pytorch's (``PostHocEMA``, ``KarrasEMA``); this callback fits
them to Lightning: it updates after every optimiser step that was not skipped, writes the snapshots atomically
(a kill cannot leave half a file), keeps the EMAs in the checkpoint so a resumed run continues them, and writes
on rank 0 only.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from diffusion_lab.runs.atomic import atomic_torch_save
from diffusion_lab.runs.layout import POSTHOC_EMA

SETTINGS_FILE = "settings.json"


def _tracker(net: nn.Module, sigma_rels: Sequence[float], folder: Path):
    from ema_pytorch import PostHocEMA as Tracker

    return Tracker(
        net, sigma_rels=tuple(sigma_rels), checkpoint_every_num_steps="manual", checkpoint_folder=str(folder),
        checkpoint_dtype=torch.float32, update_every=1,
    )  # fmt: skip


class PostHocEMA(L.Callback):
    def __init__(
        self,
        sigma_rels: Sequence[float] = (0.05, 0.10),
        snapshot_every_n_steps: int = 1000,
        output_dir: str | None = None,
    ) -> None:
        if len(set(sigma_rels)) < 2 or not all(0 < s < 0.3 for s in sigma_rels):
            raise ValueError(
                f"posthoc_ema sigma_rels={list(sigma_rels)} needs two or more different relative lengths in (0, 0.3) "
                "(EDM2 tracks 0.05 and 0.10)."
            )
        if snapshot_every_n_steps < 1:
            raise ValueError(f"posthoc_ema snapshot_every_n_steps={snapshot_every_n_steps} must be >= 1.")
        self.sigma_rels = tuple(float(s) for s in sigma_rels)
        self.every = snapshot_every_n_steps
        self.output_dir = output_dir
        self.tracker = None
        self._restored: dict[str, Any] | None = None
        self._last_snapshot = -1

    def folder(self, trainer: L.Trainer) -> Path:
        return Path(self.output_dir or trainer.default_root_dir) / POSTHOC_EMA

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or self.tracker is not None:
            return
        folder = self.folder(trainer)
        # ema-pytorch's tracker makes its snapshot folder; off rank 0 it points at a throwaway one (nothing is written)
        self.tracker = _tracker(
            pl_module.net, self.sigma_rels, folder if trainer.is_global_zero else tempfile.mkdtemp()
        )
        if trainer.is_global_zero:
            (folder / SETTINGS_FILE).write_text(json.dumps({"sigma_rels": list(self.sigma_rels)}))
        if self._restored is not None:
            self.tracker.load_state_dict(self._restored)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.tracker.to(pl_module.device)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int):
        if getattr(pl_module, "last_step_skipped", False):
            return  # the weights did not change; the averages should not count the step
        self.tracker.update()
        if trainer.global_step % self.every == 0:
            self.snapshot(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.snapshot(trainer)  # the last step can always be reconstructed

    def snapshot(self, trainer: L.Trainer) -> None:
        """Both EMAs as ``<index>.<updates>.pt`` (ema-pytorch's names), in float32, written atomically."""
        updates = int(self.tracker.step)
        if not trainer.is_global_zero or updates == self._last_snapshot or updates == 0:
            return
        write_snapshots(self.tracker, self.folder(trainer))
        self._last_snapshot = updates

    def state_dict(self) -> dict[str, Any]:
        return {"tracker": self.tracker.state_dict()} if self.tracker is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = state_dict.get("tracker")
        if self.tracker is not None and self._restored is not None:
            self.tracker.load_state_dict(self._restored)


def write_snapshots(tracker, folder: Path) -> None:
    """Each tracked EMA as ``<index>.<updates>.pt`` (ema-pytorch's names), in float32, written atomically."""
    updates = int(tracker.step)
    for index, ema in enumerate(tracker.ema_models):
        state = {key: value.detach().to("cpu", torch.float32, copy=True) for key, value in ema.state_dict().items()}
        atomic_torch_save(state, Path(folder) / f"{index}.{updates}.pt")


def snapshot_steps(folder: Path) -> list[int]:
    """The update counts at which a run's post-hoc EMA snapshots were taken."""
    return sorted({int(path.stem.split(".")[1]) for path in Path(folder).glob("*.*.pt")})


def check_ema_length(folder: str | Path, sigma_rel: float) -> list[float]:
    """The tracked relative lengths of a run's snapshots, or a ConfigError naming what is missing."""
    from diffusion_lab.errors import ConfigError

    if isinstance(sigma_rel, bool) or not isinstance(sigma_rel, int | float) or not 0 < sigma_rel < 0.3:
        raise ConfigError(f"ema_length={sigma_rel} must be a number in (0, 0.3): a relative EMA length (EDM2's σ_rel).")
    settings = Path(folder) / SETTINGS_FILE
    if not settings.is_file():
        raise ConfigError(
            f"ema_length={sigma_rel} needs the run's post-hoc EMA snapshots ({folder} has none): train with "
            "callbacks=[default,posthoc_ema]."
        )
    return json.loads(settings.read_text())["sigma_rels"]


def synthesize_ema_weights(net: nn.Module, folder: str | Path, sigma_rel: float, step: int) -> dict[str, torch.Tensor]:
    """The network's state dict averaged with relative EMA length ``sigma_rel`` as of update ``step``,
    reconstructed from the snapshots taken up to then (a later snapshot would know the future)."""
    from diffusion_lab.errors import ConfigError

    folder = Path(folder)
    sigma_rels = check_ema_length(folder, sigma_rel)
    usable = [path for path in folder.glob("*.*.pt") if int(path.stem.split(".")[1]) <= step]
    if not usable:
        raise ConfigError(f"ema_length={sigma_rel}: {folder} holds no snapshot at or before update {step}.")
    step = max(int(path.stem.split(".")[1]) for path in usable)  # skipped (non-finite) steps made no update
    with tempfile.TemporaryDirectory() as chosen:
        for path in usable:  # the snapshots up to this step, for ema-pytorch's solver, which takes a whole folder
            (Path(chosen) / path.name).symlink_to(path.resolve())
        synthesized = _tracker(net, sigma_rels, Path(chosen)).synthesize_ema_model(sigma_rel=sigma_rel, step=step)
    return {key: value.detach().clone() for key, value in synthesized.ema_model.state_dict().items()}
