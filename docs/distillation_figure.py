"""The README's distillation figure: the teacher's samples beside its students' at 4, 2 and 1 network calls, drawn
from the same seeds (so each cell shows the same noise through each sampler). Each number of calls comes from the
first of the ``--students`` runs that has a round checkpoint sampling with it (list the best run first).

    python docs/distillation_figure.py --teacher <run>/checkpoints/last.ckpt --students <distill run> [<run> …] \
        --out docs/distillation_mnist_samples.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from torchvision.utils import make_grid

from diffusion_lab.runs.checkpoints import load_checkpoint, load_module
from diffusion_lab.runs.layout import CONFIG_KEY


def students_by_calls(runs: list[Path]) -> dict[int, Path]:
    """Round checkpoints of progressive runs, keyed by the number of steps their sampler records; the first run
    listed wins a number both have."""
    found = {}
    for run in reversed(runs):
        for path in sorted((run / "checkpoints").glob("step_*.ckpt")):
            found[int(load_checkpoint(path)[CONFIG_KEY]["sampler"]["num_steps"])] = path
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", type=Path, required=True)
    parser.add_argument("--students", type=Path, nargs="+", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--teacher-sampler", default="dpm_solver++")
    parser.add_argument("--teacher-steps", type=int, default=10)
    parser.add_argument("--samples", type=int, default=36)
    args = parser.parse_args()

    students = students_by_calls(args.students)
    missing = [calls for calls in (4, 2, 1) if calls not in students]
    if missing:
        runs = " ".join(str(run) for run in args.students)
        parser.error(f"--students {runs}: no round checkpoint samples with {missing} steps")
    panels = [(args.teacher, {"sampler": args.teacher_sampler, "num_steps": args.teacher_steps},
               f"teacher, {args.teacher_sampler} ({args.teacher_steps} steps)")]  # fmt: skip
    panels += [(students[calls], {}, f"student, {calls} call{'s' if calls > 1 else ''}") for calls in (4, 2, 1)]
    figure, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4.4))
    for axis, (path, settings, title) in zip(axes, panels, strict=True):
        module, _ = load_module(path)
        with torch.no_grad():
            images = module.generate(seeds=range(args.samples), **settings)
        grid = make_grid((images + 1) / 2, nrow=int(args.samples**0.5), padding=1, pad_value=0.5).clamp(0, 1)
        axis.imshow(grid.permute(1, 2, 0).numpy(), cmap="gray")
        axis.set_title(title, fontsize=12)
        axis.axis("off")
    figure.tight_layout()
    figure.savefig(args.out, dpi=80)
    print(args.out)


if __name__ == "__main__":
    main()
