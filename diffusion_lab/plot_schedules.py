"""Plot ᾱ_t and log-SNR of noise schedules side by side.

    python -m diffusion_lab.plot_schedules [--output docs/schedules.png] [--schedules linear cosine]

The picture behind Nichol & Dhariwal's cosine schedule: linear drives ᾱ to ~0 long before T, so the last
quarter of its steps are spent on nearly pure noise, while cosine spreads the destruction evenly in log-SNR.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from diffusion_lab.diffusion.schedules import make_schedule


def plot_schedules(
    output: str | Path,
    schedules: Sequence[str] = ("linear", "cosine"),
    num_train_timesteps: int = 1000,
) -> Path:
    """Write a PNG with ᾱ_t (left) and log-SNR (right) against the timestep index for each schedule."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    for name in schedules:
        schedule = make_schedule(name, num_train_timesteps)
        steps = range(num_train_timesteps)
        left.plot(steps, schedule.alphas_cumprod.numpy(), label=name)
        right.plot(steps, schedule.log_snr.numpy(), label=name)
    left.set(title="ᾱ_t (signal kept)", xlabel="timestep index t", ylabel="ᾱ_t", ylim=(0, 1.02))
    right.set(title="log SNR = log ᾱ_t − log(1 − ᾱ_t)", xlabel="timestep index t", ylabel="log SNR")
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(f"Noise schedules, T = {num_train_timesteps}")
    figure.tight_layout()
    figure.savefig(output)
    plt.close(figure)
    return output


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="docs/schedules.png", help="PNG to write")
    parser.add_argument("--schedules", nargs="+", default=["linear", "cosine"])
    parser.add_argument("--num-train-timesteps", type=int, default=1000)
    args = parser.parse_args(argv)
    path = plot_schedules(args.output, args.schedules, args.num_train_timesteps)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
