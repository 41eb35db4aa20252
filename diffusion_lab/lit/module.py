"""DiffusionModule: the LightningModule that composes a network, a noise process and its objective (DDPM's
Gaussian process with a loss weighting, or a continuous objective: EDM, flow matching) and a sampler. Training
logic only; the maths lives in ``diffusion_lab.diffusion``."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torchmetrics import MeanMetric

from diffusion_lab.callbacks.ema import find_ema
from diffusion_lab.diffusion import (
    GaussianDiffusion,
    LossWeighting,
    NoiseSchedule,
    classifier_free_guidance,
    make_loss_weighting,
)
from diffusion_lab.diffusion.continuous import ContinuousObjective
from diffusion_lab.diffusion.likelihood import vlb_term
from diffusion_lab.diffusion.process import split_learned_variance
from diffusion_lab.diffusion.samplers import TrajectoryStep, resolve_variance_type, sample
from diffusion_lab.lit.nonfinite import NonFiniteGuard, all_finite
from diffusion_lab.lit.optimizers import fused_optimizer_option
from diffusion_lab.lit.rng import capture_rng_state, restore_rng_state
from diffusion_lab.models.compilation import compile_network, graph_safe
from diffusion_lab.runs.layout import CONFIG_KEY

SAMPLER_DEFAULTS: dict[str, Any] = {
    "sampler": "ddim",
    "num_steps": 50,
    "eta": 0.0,
    "timestep_spacing": "trailing",
    "variance_type": None,  # the model's own: learned_range if it learned its variance, else fixed_small
    "clip_sample": True,
}


@contextmanager
def eval_mode(net: nn.Module) -> Iterator[nn.Module]:
    """``net`` in eval mode (no dropout) for a while, then back in the mode it had: sampling and validation walks
    inside training."""
    was_training = net.training
    net.eval()
    try:
        yield net
    finally:
        net.train(was_training)


class DiffusionModule(L.LightningModule):
    """ε-objective training of ``net`` (or x₀/v, per ``prediction_type``; or a continuous objective's) and
    sampling from it.

    Args:
        net: the network, ``net(x_t, t, y=None)``; its ``num_classes`` (if any) enables class conditioning.
        schedule: the noise schedule of DDPM's forward process, or a continuous objective (EDM, flow matching),
            which owns its noise path, its training distribution of noise levels and its loss.
        prediction_type: ``epsilon``, ``sample`` or ``v_prediction`` (DDPM only).
        loss_weighting: λ(t) on each sample's MSE (DDPM only; None: uniform).
        learned_variance: the network also outputs v for σ² = exp((v+1)/2 log β_t + (1−(v+1)/2) log β̃_t)
            (Nichol & Dhariwal; output channels doubled), trained by the hybrid objective
            L_simple + vlb_weight · T · L_t with the mean's gradient stopped in L_t.
        vlb_weight: λ of the hybrid objective (0.001 in improved-diffusion).
        optimizer / lr_scheduler: factories (Hydra ``_partial_`` configs) given the parameters / optimiser.
        sampler: default sampling settings (sampler, num_steps, eta, timestep_spacing, variance_type,
            clip_sample) for sample grids and ``generate``.
        label_dropout: probability of replacing a label by the null label in training, which teaches the
            same network the unconditional model that classifier-free guidance needs.
        loss_buckets: how many equal ranges of t the per-timestep loss is logged in (``train/loss_t{k}``).
        val_seed: seeds t and ε of validation batch i, so validation losses are comparable across epochs.
        compile: ``torch.compile`` the network: true or "regional" its residual and attention blocks (each shape
            compiled once, seconds instead of minutes), "full" the whole graph, "graphs" the whole graph replayed
            as CUDA graphs (launch-bound steps); false: eager.
        max_nonfinite_steps: NaN/Inf losses or gradients in a row that are skipped before training stops.
        config: the resolved run configuration, stored in every checkpoint so sampling and evaluation can
            rebuild the module from the checkpoint alone.
    """

    def __init__(
        self,
        net: nn.Module,
        schedule: NoiseSchedule | ContinuousObjective,
        prediction_type: str = "epsilon",
        loss_weighting: LossWeighting | None = None,
        optimizer: Callable[..., torch.optim.Optimizer] = torch.optim.AdamW,
        *,
        learned_variance: bool = False,
        vlb_weight: float = 0.001,
        lr_scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
        sampler: dict[str, Any] | None = None,
        label_dropout: float = 0.1,
        loss_buckets: int = 10,
        val_seed: int = 1234,
        compile: bool | str = False,
        max_nonfinite_steps: int = 10,
        config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= label_dropout < 1.0:
            raise ValueError(f"label_dropout={label_dropout} must lie in [0, 1) (0.1 is usual for guidance).")
        if loss_buckets < 1:
            raise ValueError(f"loss_buckets={loss_buckets} must be >= 1.")
        if learned_variance:
            image_channels, out_channels = getattr(net, "in_channels", None), getattr(net, "out_channels", None)
            if image_channels is not None and out_channels != 2 * image_channels:
                raise ValueError(
                    f"learned_variance needs a network with 2 × {image_channels} output channels (prediction and "
                    f"variance), got {out_channels}; build it with out_channels={2 * image_channels}."
                )
            if not vlb_weight >= 0:
                raise ValueError(f"vlb_weight={vlb_weight} must be >= 0 (improved-diffusion uses 0.001).")
        self.net = net
        self.learned_variance = learned_variance
        self.vlb_weight = vlb_weight
        if isinstance(schedule, ContinuousObjective):
            if learned_variance:
                raise ValueError(f"learned_variance is DDPM's (objective=hybrid); objective={schedule.name} has none.")
            self.continuous, self.diffusion = schedule, None
        else:
            self.continuous, self.diffusion = None, GaussianDiffusion(schedule, prediction_type)
        self.loss_weighting = loss_weighting or make_loss_weighting("uniform")
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.sampler_settings = {**SAMPLER_DEFAULTS, **(sampler or {})}
        self.label_dropout = label_dropout
        self.val_seed = val_seed
        self.config = config
        self.bucket_losses = nn.ModuleList(MeanMetric(nan_strategy="ignore") for _ in range(loss_buckets))
        for metric in self.bucket_losses:
            metric.persistent(True)  # a resumed run continues the running means it was logging
        self.nonfinite = NonFiniteGuard(max_nonfinite_steps)
        self.last_step_skipped = False
        self._loss_is_finite: torch.Tensor | None = None
        self.compile_mode = compile
        compile_network(self.net, compile)
        if hasattr(net, "in_channels") and hasattr(net, "image_size"):
            # One image through the network: Lightning's model summary then reports real FLOPs per image.
            size = (1, net.in_channels, net.image_size, net.image_size)
            self.example_input_array = (torch.zeros(size), torch.zeros(1, dtype=torch.long))

    # Read by Lightning's ThroughputMonitor; None: it reports images/s without a FLOP-based utilisation.
    flops_per_batch = None

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """The network's prediction (ε, x₀ or v per ``prediction_type``) for noisy images at timesteps ``t``."""
        return self.net(x_t, t) if labels is None else self.net(x_t, t, labels)

    # -- properties ------------------------------------------------------------------------------------

    @property
    def noise_process(self) -> NoiseSchedule | ContinuousObjective:
        """What the samplers walk: DDPM's β schedule, or the continuous objective."""
        return self.continuous if self.continuous is not None else self.diffusion.schedule

    @property
    def schedule(self) -> NoiseSchedule | None:
        """DDPM's β schedule (None for a continuous objective)."""
        return self.diffusion.schedule if self.diffusion is not None else None

    @property
    def num_classes(self) -> int | None:
        return getattr(self.net, "num_classes", None)

    @property
    def null_label(self) -> int | None:
        return getattr(self.net, "null_label", None)

    # -- the objective ----------------------------------------------------------------------------------

    def per_sample_loss(
        self,
        net: nn.Module,
        x0: torch.Tensor,
        labels: torch.Tensor | None,
        t: torch.Tensor,
        noise: torch.Tensor,
    ) -> torch.Tensor:
        """λ(t) · mean-squared error of the prediction-type target, one value per sample (float32).

        The network may run under autocast (bf16-mixed); the forward process, the target and the loss are
        computed in float32 outside it.
        """
        x_t = self.diffusion.q_sample(x0, t, noise)
        output = net(x_t, t, labels) if labels is not None else net(x_t, t)
        with torch.autocast(device_type=x0.device.type, enabled=False):
            output = output.float()
            prediction = split_learned_variance(output)[0] if self.learned_variance else output
            target = self.diffusion.training_target(x0, noise, t)
            squared_error = (prediction - target).square().flatten(1).mean(dim=1)
            loss = self.loss_weighting(self.diffusion, t).float() * squared_error
            if self.learned_variance:
                # L_vlb trains only the variance: the mean's gradient comes from L_simple alone.
                frozen_mean = torch.cat([prediction.detach(), split_learned_variance(output)[1]], dim=1)
                vlb = vlb_term(self.diffusion, x0, x_t, t, frozen_mean, "learned_range")
                loss = loss + self.vlb_weight * self.diffusion.num_train_timesteps * vlb
            return loss

    def continuous_loss(
        self,
        net: nn.Module,
        x0: torch.Tensor,
        labels: torch.Tensor | None,
        tau: torch.Tensor,
        noise: torch.Tensor,
    ) -> torch.Tensor:
        """The continuous objective's loss at noise levels ``tau``, one value per sample (float32; the network may
        run under autocast, the path, target and loss do not)."""
        objective = self.continuous
        x = objective.noisy(x0, noise, tau)
        x_in, noise_input = objective.network_input(x, tau)
        output = net(x_in, noise_input, labels) if labels is not None else net(x_in, noise_input)
        with torch.autocast(device_type=x0.device.type, enabled=False):
            return objective.per_sample_loss(output.float(), x0, x, noise, tau).float()

    def draw_noise_levels(self, count: int, device: torch.device, generator: torch.Generator | None = None):
        """Training's noise levels: t uniform over DDPM's timesteps, or the continuous objective's τ."""
        if self.continuous is not None:
            return self.continuous.sample_tau(count, device, generator)
        return torch.randint(0, self.diffusion.num_train_timesteps, (count,), device=device, generator=generator)

    def objective_loss(self, net: nn.Module, x0, labels, levels, noise) -> torch.Tensor:
        if self.continuous is not None:
            return self.continuous_loss(net, x0, labels, levels, noise)
        return self.per_sample_loss(net, x0, labels, levels, noise)

    def _labels_for(self, labels: torch.Tensor | None, *, drop: bool) -> torch.Tensor | None:
        if self.num_classes is None:
            return None
        if labels is None:
            raise ValueError(
                f"model.num_classes={self.num_classes} asks for class conditioning but the data has no labels; "
                "set model.num_classes=null or use a labelled dataset."
            )
        if drop and self.label_dropout > 0:
            dropped = torch.rand(labels.shape[0], device=labels.device) < self.label_dropout
            labels = torch.where(dropped, torch.full_like(labels, self.null_label), labels)
        return labels

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor | None], batch_idx: int) -> torch.Tensor:
        x0, labels = batch
        t = self.draw_noise_levels(x0.shape[0], x0.device)
        noise = torch.randn_like(x0)
        losses = self.objective_loss(self.net, x0, self._labels_for(labels, drop=True), t, noise)
        loss = losses.mean()
        self._loss_is_finite = loss.detach().isfinite()
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        self._update_bucket_losses(losses.detach(), t)
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Drop this step's update when the loss or a gradient is NaN/Inf on any rank (see ``NonFiniteGuard``)."""
        loss_is_finite = self._loss_is_finite if self._loss_is_finite is not None else torch.tensor(True)
        finite = bool(all_finite(loss_is_finite.to(self.device), self.parameters()))
        finite = not self.trainer.strategy.reduce_boolean_decision(not finite, all=False)
        self.last_step_skipped = self.nonfinite.record(self.global_step, finite, self._last_checkpoint_path())
        if self.last_step_skipped:
            # Optimisers skip parameters without a gradient: no update, no moment or step-count change.
            for parameter in self.parameters():
                parameter.grad = None
            rank_zero_warn(
                f"step {self.global_step}: non-finite loss or gradient, update skipped "
                f"({self.nonfinite.in_a_row} in a row of {self.nonfinite.patience} allowed)."
            )
        self.log("train/skipped_steps", float(self.nonfinite.total_skipped), on_step=True, on_epoch=False)

    def _last_checkpoint_path(self) -> str | None:
        paths = [getattr(callback, "last_model_path", "") for callback in self.trainer.checkpoint_callbacks]
        return next((path for path in paths if path), None)

    def _update_bucket_losses(self, losses: torch.Tensor, t: torch.Tensor) -> None:
        """Per-bucket running means (synced across ranks), logged every ``log_every_n_steps`` steps. Buckets are
        equal ranges of t (DDPM), or of the training distribution's quantile of τ (continuous objectives): equal
        shares of the batches either way, low noise first."""
        buckets = len(self.bucket_losses)
        if self.continuous is not None:
            bucket = (self.continuous.tau_quantile(t) * buckets).long().clamp(0, buckets - 1).to(losses.device)
        else:
            bucket = t * buckets // self.diffusion.num_train_timesteps
        counts = torch.zeros(buckets, device=losses.device).index_add_(0, bucket, torch.ones_like(losses))
        sums = torch.zeros(buckets, device=losses.device).index_add_(0, bucket, losses)
        for k, metric in enumerate(self.bucket_losses):
            metric.update(sums[k] / counts[k].clamp(min=1), weight=counts[k])
        every = self.trainer.log_every_n_steps if self._trainer is not None else 1
        if (self.global_step + 1) % every == 0:
            for k, metric in enumerate(self.bucket_losses):
                self.log(f"train/loss_t{k}", metric.compute(), on_step=True, on_epoch=False)
                metric.reset()

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor | None], batch_idx: int) -> None:
        x0, labels = batch
        generator = torch.Generator(device=x0.device).manual_seed(
            self.val_seed + 1_000_003 * self.global_rank + batch_idx
        )
        t = self.draw_noise_levels(x0.shape[0], x0.device, generator)
        noise = torch.randn(x0.shape, device=x0.device, generator=generator)
        labels = self._labels_for(labels, drop=False)
        ema = find_ema(self._trainer)
        if ema is None:
            loss = self.objective_loss(self.net, x0, labels, t, noise).mean()
            self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=x0.shape[0])
            return
        # During validation the EMA callback has swapped the averaged weights into this module.
        ema_loss = self.objective_loss(self.net, x0, labels, t, noise).mean()
        with eval_mode(ema.raw_module(self).net) as raw_net:
            raw_loss = self.objective_loss(raw_net, x0, labels, t, noise).mean()
        self.log("val/loss", raw_loss, sync_dist=True, batch_size=x0.shape[0])
        self.log("val/loss_ema", ema_loss, prog_bar=True, sync_dist=True, batch_size=x0.shape[0])

    # -- optimisation ---------------------------------------------------------------------------------

    def configure_optimizers(self):
        fused = fused_optimizer_option(self.optimizer_factory, self.net)
        optimizer = self.optimizer_factory(params=self.net.parameters(), **fused)
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    # -- sampling -------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        num_samples: int | None = None,
        *,
        seeds: Sequence[int] | None = None,
        noise: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        guidance_scale: float = 0.0,
        return_trajectory: bool = False,
        **sampler_overrides: Any,
    ) -> torch.Tensor | tuple[torch.Tensor, list[TrajectoryStep]]:
        """Samples in [−1, 1] from this module's current weights (eval mode).

        ``seeds[i]`` seeds sample i alone (its own CPU generator), so a sample does not depend on the batch
        it is drawn in; ``labels`` and ``guidance_scale`` (w of ε̃ = (1 + w) ε_c − w ε_∅) need a
        class-conditional network.
        """
        settings = self.resolve_sampler_settings(**sampler_overrides)
        net = self.net
        if seeds is not None:
            num_samples = len(seeds)
        if num_samples is None:
            raise ValueError("generate needs num_samples, seeds or noise.")
        shape = (num_samples, net.in_channels, net.image_size, net.image_size)
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds] if seeds is not None else None
        model_fn = self._model_fn(net, labels, guidance_scale)
        if self.learned_variance and settings["variance_type"] != "learned_range":
            full_output = model_fn
            model_fn = lambda x, t: split_learned_variance(full_output(x, t))[0]  # noqa: E731  (mean only)
        with eval_mode(net):
            return sample(
                model_fn,
                self.noise_process,
                shape,
                prediction_type=self.diffusion.prediction_type if self.diffusion is not None else "epsilon",
                generator=generators,
                noise=noise,
                device=self.device,
                return_trajectory=return_trajectory,
                **settings,
            )

    def resolve_sampler_settings(self, **overrides: Any) -> dict[str, Any]:
        """This module's sampler settings with ``overrides`` (keys left out keep the module's value; an explicit
        None is the sampler's own default: ``num_steps=None`` with ddpm walks all T steps, not the module's
        number) and ``variance_type`` made concrete for this model (see ``resolve_variance_type``)."""
        settings = {**self.sampler_settings, **overrides}
        if self.continuous is not None:  # no reverse variance to resolve
            return settings
        return resolve_variance_type(settings, self.learned_variance)

    def _model_fn(self, net: nn.Module, labels: torch.Tensor | None, guidance_scale: float):
        network, net = net, graph_safe(net, self.compile_mode)
        if self.num_classes is None:
            if labels is not None or guidance_scale:
                raise ValueError(
                    "class_label / guidance_scale need a class-conditional model (trained with model.num_classes "
                    "set on labelled data); this one is unconditional."
                )
            return net
        if labels is None:  # the unconditional model that label dropout trained
            return lambda x, t: net(x, t, torch.full((x.shape[0],), self.null_label, device=x.device))
        labels = labels.to(self.device)

        def conditional(x, t):
            return net(x, t, labels[: x.shape[0]])

        def unconditional(x, t):
            return net(x, t, torch.full((x.shape[0],), self.null_label, device=x.device))

        guided_channels = network.in_channels if self.learned_variance else None
        return classifier_free_guidance(conditional, unconditional, guidance_scale, guided_channels)

    # -- checkpoints ----------------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.config is not None:
            checkpoint[CONFIG_KEY] = self.config
        checkpoint["nonfinite_steps"] = self.nonfinite.state_dict()
        checkpoint["rng_states"] = self._rng_states_of_every_rank()
        checkpoint["logger_run_ids"] = logger_run_ids(self._trainer)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "nonfinite_steps" in checkpoint:
            self.nonfinite.load_state_dict(checkpoint["nonfinite_steps"])
        states = checkpoint.get("rng_states")
        if states:
            restore_rng_state(states[self.global_rank % len(states)])

    def _rng_states_of_every_rank(self) -> list[dict[str, Any]]:
        """Every rank's generators (each draws its own timesteps and noise); all ranks call this together."""
        state = capture_rng_state()
        if self._trainer is None or self.trainer.world_size == 1 or not torch.distributed.is_initialized():
            return [state]
        gathered: list[Any] = [None] * self.trainer.world_size
        torch.distributed.all_gather_object(gathered, state)
        return gathered


def logger_run_ids(trainer: L.Trainer | None) -> dict[str, str]:
    """The W&B run id, so a resumed run continues the same dashboard run."""
    if trainer is None:
        return {}
    for logger in trainer.loggers:
        if type(logger).__name__ == "WandbLogger" and logger.version is not None:
            return {"wandb": str(logger.version)}
    return {}
