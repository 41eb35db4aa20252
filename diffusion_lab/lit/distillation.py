"""TeacherStudent, what every distillation student shares (a frozen teacher kept in its checkpoints, the training and
validation steps around the method's loss), and ProgressiveDistillation: a student that learns from its teacher to
sample in half the DDIM steps, round after round (Salimans & Ho 2022; the maths in
``diffusion_lab.diffusion.distillation``).

The run is ``num_rounds × steps_per_round`` optimiser steps. Round r distils a teacher walking 2N steps into a
student walking N = start_steps / 2^(r+1); at the round's end the student's EMA weights become the next teacher
(and the student's own weights, which continue from there). The student predicts v (x̂₀ from an ε-prediction at
one step from pure noise divides by α ≈ 0), starting from the teacher's weights; a flow-matching teacher's student
keeps its velocity and walks Euler's steps on the uniform t grid. In the first round ``teacher_substeps`` > 1 has
the original teacher take each of its two steps in that many finer ones, so the first student learns a more exact
map of the teacher's ODE than two coarse steps give. Everything else is the training
loop's: EMA, checkpoints, sample grids, DDP/bf16, resuming — a resumed run restores its round and its teacher, which
live in the checkpoint beside the student. The student's checkpoints record the DDIM sampler of their round, so
``sample`` and ``evaluate`` draw with it by default and count its calls.

With ``trajectories`` = M the targets come from a bank instead: on its first step the run has the original teacher
solve its ODE from M seeded noises through the finest student grid (``teacher_trajectories``), and every round
regresses the student's single step between two of the bank's states (a tenth of the bank, at most 256, is held
out for the validation loss). No teacher call per step, targets from the teacher's own ODE in every round, and the
student trains on the states it meets when sampling. With ``rollout`` each training pair starts instead where the
student's own steps take the trajectory's noise (the target stays the teacher's next state): the student learns to
step back onto the teacher's trajectory from where its earlier steps really leave it. The bank is rebuilt from the
seed on resume (bit for bit on the same device); it holds M × (start_steps/2 + 1) images in the device's memory.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from diffusion_lab.callbacks.ema import find_ema
from diffusion_lab.diffusion import GaussianDiffusion
from diffusion_lab.diffusion.distillation import (
    DiscretePath,
    DistillationPath,
    FlowPath,
    teacher_trajectories,
    teacher_walk,
    truncated_snr_weight,
    two_step_target,
)
from diffusion_lab.diffusion.flow_matching import FlowMatching
from diffusion_lab.lit.module import DiffusionModule, eval_mode

DISTILLATION_KEY = "distillation"
BANK_CHUNK = 512  # trajectories whose noise is drawn at once while the bank is made (a GPU walks them at once too)
# trajectories the teacher walks at once on a CPU: MNIST's U-Net takes 0.62 ms an image there at 64–128, 0.95 at 512
# (its activations spill out of the cache), so the bank takes 35 s instead of 50 for 3200 trajectories
CPU_WALK_BATCH = 128
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrajectoryBank:
    """The teacher's ODE states at every level of the finest student grid: states (M, levels, C, H, W), labels (M,)
    or None, levels (the grid, noise first); trajectories from num_train on are held out for validation."""

    states: torch.Tensor
    labels: torch.Tensor | None
    levels: torch.Tensor
    num_train: int


class TeacherStudent(DiffusionModule):
    """A DiffusionModule (the student: predicting v on DDPM's chain, the velocity on flow matching's path) with a
    frozen teacher network beside it: the teacher is not a submodule (no optimiser, no EMA, not in the student's
    state dict) but lives in every checkpoint, so a resumed run has the teacher it stopped with."""

    def __init__(self, *, teacher: nn.Module, teacher_prediction_type: str, **module_args: Any) -> None:
        super().__init__(prediction_type="v_prediction", **module_args)
        if self.diffusion is None and not isinstance(self.continuous, FlowMatching):
            raise ValueError(
                f"distillation walks a β schedule's DDIM chain or flow matching's path; objective="
                f"{self.continuous.name} is neither (train the teacher with objective=v_prediction or flow_matching)."
            )
        self._teacher = [copy.deepcopy(teacher).eval().requires_grad_(False)]  # a list: not a submodule of ours
        self.student_path = self.make_path("v_prediction")
        self.teacher_path = self.make_path(teacher_prediction_type)

    def make_path(self, prediction_type: str) -> DistillationPath:
        """The chain a network with this prediction walks (flow matching: always its velocity)."""
        if self.diffusion is None:
            return FlowPath(self.continuous, float(self.sampler_settings.get("shift", 1.0)))
        return DiscretePath(GaussianDiffusion(self.diffusion.schedule, prediction_type))

    @property
    def teacher_diffusion(self) -> GaussianDiffusion | None:
        """A DDPM teacher's process (its prediction type); None for flow matching."""
        return getattr(self.teacher_path, "diffusion", None)

    @property
    def teacher_prediction_type(self) -> str:
        return self.teacher_diffusion.prediction_type if self.teacher_diffusion is not None else "velocity"

    @property
    def teacher(self) -> nn.Module:
        return self._teacher[0]

    def teacher_fn(self, labels: torch.Tensor | None):
        """The teacher's network output at (x, t) for these labels (none: unconditional)."""
        return self.network_call(self.teacher, labels)

    @staticmethod
    def network_call(network: nn.Module, labels: torch.Tensor | None):
        """``network``'s output at (x, t) for these labels (none: unconditional)."""

        def call(x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
            return network(x, timesteps, labels) if labels is not None else network(x, timesteps)

        return call

    def set_student_sampler(self, sampler: dict[str, Any], **record: Any) -> None:
        """The student's own sampler, for its sample grids and for the config its checkpoints store."""
        self.sampler_settings.update(sampler)
        if self.config is not None:
            self.config["sampler"] = {**self.config.get("sampler", {}), **sampler}
            if self.diffusion is not None:
                self.config.setdefault("objective", {})["prediction_type"] = "v_prediction"
            self.config.setdefault(DISTILLATION_KEY, {}).update(record)

    def distillation_state(self) -> dict[str, Any]:
        """What a checkpoint keeps beside the teacher (a subclass adds its round)."""
        return {}

    def load_distillation_state(self, state: dict[str, Any]) -> None:
        """Restore what ``distillation_state`` saved."""

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor | None], batch_idx: int) -> torch.Tensor:
        x0, labels = batch
        losses, t = self.distillation_loss(self.net, x0, self._labels_for(labels, drop=True))
        loss = losses.mean()
        self._loss_is_finite = loss.detach().isfinite()
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        self.log_progress()
        self._update_bucket_losses(losses.detach(), t)
        return loss

    def log_progress(self) -> None:
        """Logs of the method's own progress beside the loss (a progressive round)."""

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor | None], batch_idx: int) -> None:
        x0, labels = batch
        generator = torch.Generator(device=x0.device).manual_seed(
            self.val_seed + 1_000_003 * self.global_rank + batch_idx
        )
        loss = self.distillation_loss(self.net, x0, self._labels_for(labels, drop=False), generator)[0].mean()
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=x0.shape[0])

    def distillation_loss(
        self, net: nn.Module, x0: torch.Tensor, labels: torch.Tensor | None, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample losses and the timesteps they were taken at."""
        raise NotImplementedError

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[DISTILLATION_KEY] = {
            **self.distillation_state(),
            "teacher_prediction_type": self.teacher_prediction_type,
            "teacher": {key: value.detach().cpu().clone() for key, value in self.teacher.state_dict().items()},
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get(DISTILLATION_KEY)
        if state:
            self.teacher.load_state_dict(state["teacher"])
            self.teacher_path = self.make_path(state["teacher_prediction_type"])
            self.load_distillation_state(state)

    def setup(self, stage: str) -> None:
        self.teacher.to(self.device)


class ProgressiveDistillation(TeacherStudent):
    def __init__(
        self,
        *,
        start_steps: int,
        final_steps: int,
        steps_per_round: int,
        teacher_substeps: int = 1,
        trajectories: int | None = None,
        trajectory_seed: int = 0,
        rollout: bool = False,
        **module_args: Any,
    ) -> None:
        rounds = math.log2(start_steps / final_steps) if final_steps >= 1 and start_steps > final_steps else 0
        if rounds < 1 or rounds != int(rounds):
            raise ValueError(
                f"start_steps={start_steps} and final_steps={final_steps}: the steps halve every round, so start_steps "
                "must be final_steps × 2^k with k >= 1 (e.g. 64 → 1 in 6 rounds)."
            )
        if steps_per_round < 1:
            raise ValueError(f"steps_per_round={steps_per_round} must be >= 1.")
        if teacher_substeps < 1 or teacher_substeps & (teacher_substeps - 1):
            raise ValueError(
                f"teacher_substeps={teacher_substeps} must be a power of two (1, 2, 4, …): the teacher's finer grid "
                "must hold the student's points."
            )
        if trajectories is not None and trajectories < 10:
            raise ValueError(
                f"trajectories={trajectories}: the bank needs at least 10 teacher trajectories (a tenth is held out "
                "for validation); thousands are usual (6400 for MNIST), or null to walk the teacher at every step."
            )
        if rollout and trajectories is None:
            raise ValueError(
                "rollout=true starts each pair where the student's own steps take a bank trajectory's noise: it needs "
                "a bank (distillation.trajectories=M, e.g. 6400), or set distillation.rollout=false."
            )
        super().__init__(**module_args)
        self.start_steps, self.final_steps, self.steps_per_round = start_steps, final_steps, steps_per_round
        self.teacher_substeps = teacher_substeps
        self.trajectories, self.trajectory_seed = trajectories, trajectory_seed
        self.rollout = rollout
        self._bank: TrajectoryBank | None = None
        self.num_rounds = int(rounds)
        finest = start_steps * teacher_substeps
        if self.diffusion is not None and finest > self.diffusion.num_train_timesteps:
            raise ValueError(
                f"start_steps × teacher_substeps = {finest} is more than the teacher's "
                f"{self.diffusion.num_train_timesteps} timesteps."
            )
        self.round = 0
        self._grids: dict[tuple[int, torch.device], torch.Tensor] = {}
        self._set_round_sampler()

    # -- rounds --------------------------------------------------------------------------------------------

    def student_steps(self, round_index: int | None = None) -> int:
        return self.start_steps // 2 ** ((self.round if round_index is None else round_index) + 1)

    def teacher_steps_per_student_step(self) -> int:
        """2, or 2 × teacher_substeps while the original teacher teaches (the first round)."""
        return 2 * (self.teacher_substeps if self.round == 0 else 1)

    def round_of_step(self, step: int) -> int:
        return min(step // self.steps_per_round, self.num_rounds - 1)

    def _set_round_sampler(self) -> None:
        steps = self.student_steps()
        sampler = self.student_path.student_sampler(steps)
        self.set_student_sampler(
            sampler, method="progressive", round=self.round, student_steps=steps, trajectories=self.trajectories
        )

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        round_index = self.round_of_step(self.global_step)
        while self.round < round_index:
            self._promote()

    def _promote(self) -> None:
        """The round ends: the student's EMA weights (its raw ones without EMA) teach the next round (from a bank,
        the original teacher's trajectories go on teaching, and the teacher stays for a resumed run to rebuild it)."""
        if self.trajectories is None:
            ema = find_ema(self._trainer)
            averaged = ema.ema_module(self) if ema is not None else self
            self.teacher.load_state_dict(averaged.net.state_dict())
            self.teacher.to(self.device)
            self.teacher_path = self.student_path
        self.round += 1
        self._set_round_sampler()

    # -- the loss ------------------------------------------------------------------------------------------

    def _grid(self, num_steps: int, device: torch.device) -> torch.Tensor:
        """The path's grid of ``num_steps`` steps on ``device``, made once (not copied to the device every step)."""
        key = (num_steps, device)
        if key not in self._grids:
            self._grids[key] = self.student_path.grid(num_steps).to(device)
        return self._grids[key]

    def log_progress(self) -> None:
        self.log("distill/round", float(self.round), on_step=True, on_epoch=False)
        self.log("distill/student_steps", float(self.student_steps()), on_step=True, on_epoch=False)

    def distillation_loss(
        self, net: nn.Module, x0: torch.Tensor, labels: torch.Tensor | None, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample max(SNR, 1)·‖x̂₀ − x̃‖² at a student step drawn uniformly, and the levels it was taken at."""
        if self.trajectories is not None:
            # validation (eval mode) draws from the held-out trajectories; x0 and labels give only the batch size
            z_t, z_s, t, s, labels = self._bank_pairs(x0.shape[0], x0.device, generator, held_out=not self.training)
        else:
            z_t, z_s, t, s = self._teacher_pairs(x0, labels, generator)
        path = self.student_path
        x_in, noise_input = path.network_input(z_t, t)
        output = net(x_in, noise_input, labels) if labels is not None else net(x_in, noise_input)
        with torch.autocast(device_type=x0.device.type, enabled=False):
            alpha_t, sigma_t = path.at(t, z_t.float())
            alpha_s, sigma_s = path.at(s, z_t.float())
            target = two_step_target(z_t.float(), z_s.float(), alpha_t, sigma_t, alpha_s, sigma_s)
            x0_hat = path.denoised(output.float(), z_t.float(), t)
            squared_error = (x0_hat - target).square().flatten(1).mean(dim=1)
            return truncated_snr_weight(alpha_t, sigma_t).flatten() * squared_error, t

    def _teacher_pairs(
        self, x0: torch.Tensor, labels: torch.Tensor | None, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, ...]:
        """(z_t, z_s, t, s): a noised training image at a student level and where the teacher's steps take it."""
        steps, per_step = self.student_steps(), self.teacher_steps_per_student_step()
        fine = self._grid(steps * per_step, x0.device)  # the teacher's grid; every per_step-th point is ours
        index = torch.randint(0, steps, (x0.shape[0],), device=x0.device, generator=generator)
        levels = [fine[per_step * index + j] for j in range(per_step + 1)]
        noise = torch.randn(x0.shape, device=x0.device, generator=generator)
        z_t = self.student_path.noisy(x0, levels[0], noise)
        clip = self.sampler_settings.get("clip_sample", True)  # the teacher's DDIM clamps x̂₀ as its sampler does
        z_s = teacher_walk(self.teacher_fn(labels), self.teacher_path, z_t, levels, clip)
        return z_t, z_s, levels[0], levels[-1]

    # -- distilling from a bank of teacher trajectories ---------------------------------------------------------

    def _bank_pairs(
        self, count: int, device: torch.device, generator: torch.Generator | None, *, held_out: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(z_t, z_s, t, s, labels) for ``count`` student steps between two states of one bank trajectory."""
        bank = self.trajectory_bank(device)
        steps = self.student_steps()
        stride = (len(bank.levels) - 1) // steps
        low, high = (bank.num_train, len(bank.states)) if held_out else (0, bank.num_train)
        which = torch.randint(low, high, (count,), device=device, generator=generator)
        start = stride * torch.randint(0, steps, (count,), device=device, generator=generator)
        labels = None if bank.labels is None else bank.labels[which]
        if self.rollout and not held_out:
            z_t = self._student_states(bank, which, start, stride, labels)
        else:
            z_t = bank.states[which, start]
        return z_t, bank.states[which, start + stride], bank.levels[start], bank.levels[start + stride], labels

    def _student_states(
        self, bank: TrajectoryBank, which: torch.Tensor, start: torch.Tensor, stride: int, labels: torch.Tensor | None
    ) -> torch.Tensor:
        """Where the student's own steps take each pair's bank noise by its start level (it learns to step back onto
        the teacher's trajectory from the states it reaches when it samples, not only from the teacher's). The walk
        runs in eval mode, as sampling does (no dropout)."""
        z = bank.states[which, 0].clone()
        hops = start // stride
        clip = self.sampler_settings.get("clip_sample", True)
        with eval_mode(self.net) as net:
            for hop in range(int(hops.max())):
                moving = (hops > hop).nonzero().squeeze(1)
                count = len(moving)
                levels = [bank.levels[hop * stride].expand(count), bank.levels[(hop + 1) * stride].expand(count)]
                student = self.network_call(net, None if labels is None else labels[moving])
                z[moving] = teacher_walk(student, self.student_path, z[moving], levels, clip)  # any network's walk
        return z

    def trajectory_bank(self, device: torch.device) -> TrajectoryBank:
        """The bank on ``device``, made on first use: the original teacher's deterministic walk from seeded noises
        through the finest student grid, each of its steps in 2 × teacher_substeps of the teacher's."""
        if self._bank is not None and self._bank.states.device == device:
            return self._bank
        started = time.perf_counter()
        points, every = self.start_steps // 2, 2 * self.teacher_substeps
        fine = self.student_path.grid(points * every).to(device)
        generator = torch.Generator(device=device).manual_seed(self.trajectory_seed + 1_000_003 * self.global_rank)
        labels = self._bank_labels(generator, device)
        shape = (self.net.in_channels, self.net.image_size, self.net.image_size)
        clip = self.sampler_settings.get("clip_sample", True)
        walk_batch = CPU_WALK_BATCH if device.type == "cpu" else BANK_CHUNK
        chunks = []
        for first in range(0, self.trajectories, BANK_CHUNK):
            count = min(BANK_CHUNK, self.trajectories - first)
            noise = torch.randn((count, *shape), device=device, generator=generator)
            for part in range(0, count, walk_batch):
                stop = min(part + walk_batch, count)
                teacher = self.teacher_fn(None if labels is None else labels[first + part : first + stop])
                walk = teacher_trajectories(teacher, self.teacher_path, noise[part:stop], fine, every, clip)
                chunks.append(walk.float())
        held_out = min(256, self.trajectories // 10)
        self._bank = TrajectoryBank(torch.cat(chunks), labels, fine[::every], self.trajectories - held_out)
        log.info(
            "distillation bank: %d teacher trajectories, %d teacher calls each, in %.1f s",
            self.trajectories, points * every, time.perf_counter() - started,
        )  # fmt: skip
        return self._bank

    def _bank_labels(self, generator: torch.Generator, device: torch.device) -> torch.Tensor | None:
        """Uniform class labels for the bank's trajectories, a label_dropout share of them null (unconditional)."""
        if self.num_classes is None:
            return None
        labels = torch.randint(0, self.num_classes, (self.trajectories,), device=device, generator=generator)
        if self.label_dropout > 0:
            dropped = torch.rand(self.trajectories, device=device, generator=generator) < self.label_dropout
            labels = torch.where(dropped, torch.full_like(labels, self.null_label), labels)
        return labels

    # -- checkpoints ---------------------------------------------------------------------------------------

    def distillation_state(self) -> dict[str, Any]:
        return {"round": self.round}

    def load_distillation_state(self, state: dict[str, Any]) -> None:
        self.round = int(state["round"])
        self._set_round_sampler()
