"""Steps/s of the real training loop (Lightning, every default callback) against the bare training step of the
same network, in one run: how much the framework around the network costs.

The loop is `python -m diffusion_lab.train` as composed from conf/ (default: experiment=mnist_ddpm), timed
between optimiser steps ``--warmup`` and ``--warmup + --steps`` (validation off, no sample grids). The bare step
is benchmarks/unet_throughput.py's forward + backward + AdamW of the run's own network at the run's image size.

    python benchmarks/training_loop.py --device cuda --precision bf16 --batch-size 128
    python benchmarks/training_loop.py --device cuda --precision bf16 --batch-size 512
    python benchmarks/training_loop.py --without-nonfinite-guard ...   # what the guard's per-step host read costs
    python benchmarks/training_loop.py --device cpu --batch-size 16 --warmup 2 --steps 3 trainer.max_time=null

Extra arguments are Hydra overrides for the loop. Needs the MNIST files under $DIFFUSION_LAB_DATA_DIR.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig, open_dict

sys.path.insert(0, str(Path(__file__).resolve().parent))
import unet_throughput

from diffusion_lab.config.build import build_module
from diffusion_lab.config.compose import compose_job
from diffusion_lab.train import train

CLOCKS: list[StepClock] = []  # the clocks Hydra instantiated, newest last


class StepClock(L.Callback):
    """Wall time at the start of two optimiser steps (after the device has finished the work queued before)."""

    def __init__(self, first: int, last: int) -> None:
        self.first, self.last, self.times = first, last, {}
        CLOCKS.append(self)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if trainer.global_step in (self.first, self.last):
            unet_throughput.synchronize(str(pl_module.device))
            self.times[trainer.global_step] = time.perf_counter()

    def steps_per_s(self) -> float:
        return (self.last - self.first) / (self.times[self.last] - self.times[self.first])


def compose_run(args: argparse.Namespace, overrides: list[str]) -> DictConfig:
    """The train config as the CLI would compose it, timed by a StepClock, writing to a temporary folder."""
    first, last = args.warmup, args.warmup + args.steps
    trainer_group = "gpu" if args.device == "cuda" else "cpu"
    precision = "bf16-mixed" if args.precision == "bf16" else "32-true"
    overrides = [
        f"experiment={args.experiment}", f"trainer={trainer_group}", f"trainer.precision={precision}",
        f"data.batch_size={args.batch_size}", "data.download=false", f"trainer.max_steps={last + 1}",
        "trainer.limit_val_batches=0", "callbacks.sample_grid=null", "logger=csv", "print_config=false", *overrides,
    ]  # fmt: skip
    cfg = compose_job("train", overrides, tempfile.mkdtemp(prefix="training_loop_"))
    with open_dict(cfg):
        cfg.callbacks.step_clock = {"_target_": f"{__name__}.StepClock", "first": first, "last": last}
    return cfg


def loop_steps_per_s(cfg: DictConfig, without_nonfinite_guard: bool) -> float:
    if without_nonfinite_guard:  # diagnostic only: the run would no longer skip NaN/Inf updates
        from diffusion_lab.lit.module import DiffusionModule

        DiffusionModule.on_before_optimizer_step = lambda self, optimizer: None
    train(cfg)
    return CLOCKS[-1].steps_per_s()


def bare_steps_per_s(cfg: DictConfig, args: argparse.Namespace) -> float:
    """The median of five rounds of the bare step of the run's own network at its image size (no Lightning, no
    callbacks, no data pipeline)."""
    bench = argparse.Namespace(device=args.device, precision=args.precision, batch_size=args.batch_size, compile=False)
    net = build_module(cfg).net
    layout = {"image_size": cfg.data.image_size, "channels": cfg.data.channels}
    contender = unet_throughput.Contender("ours", net, lambda x, t: net(x, t))
    step = unet_throughput.make_step(unet_throughput._finish(contender, bench), bench, layout)
    unet_throughput.seconds_per_step(step, args.device, 3)  # warm-up
    rounds = [unet_throughput.seconds_per_step(step, args.device, args.bare_steps) for _ in range(5)]
    return 1.0 / statistics.median(rounds)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="mnist_ddpm")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=60, help="optimiser steps before the clock starts")
    parser.add_argument("--steps", type=int, default=400, help="optimiser steps timed")
    parser.add_argument("--bare-steps", type=int, default=20, help="bare steps per round (5 rounds)")
    parser.add_argument("--without-nonfinite-guard", action="store_true")
    args, overrides = parser.parse_known_args(argv)
    cfg = compose_run(args, overrides)
    bare = bare_steps_per_s(cfg, args)
    loop = loop_steps_per_s(cfg, args.without_nonfinite_guard)
    result = {"loop_steps_per_s": loop, "bare_steps_per_s": bare, "loop_over_bare": loop / bare}
    print(f"device={args.device}, {args.precision}, batch {args.batch_size}, experiment={args.experiment}")
    print(f"  training loop: {loop:7.2f} steps/s = {loop * args.batch_size:8.0f} images/s")
    print(f"  bare step:     {bare:7.2f} steps/s = {bare * args.batch_size:8.0f} images/s")
    print(f"  loop / bare:   {loop / bare:7.2f}")
    return result


if __name__ == "__main__":
    main()
