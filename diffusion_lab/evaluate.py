"""Evaluate a checkpoint (or a samples.npz): ``python -m diffusion_lab.evaluate ckpt_path=… metrics=[fid,kid]``.

Sample quality comes from torch-fidelity (``fid``, ``kid``, ``isc``, ``prc``) against the held-out split of the
training data; ``nll`` is the variational bound in bits/dim on that split. ``metrics.json`` records the values and
the protocol (data, split, N, sampler and function evaluations, EMA or raw, seed, feature extractor);
``runs=<sweep>`` scores every run's checkpoints over a grid of sampler settings (``diffusion_lab.evaluation``).
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from diffusion_lab.cli.user_errors import report_user_errors
from diffusion_lab.config import CONFIG_DIR, register_configs
from diffusion_lab.evaluation.job import evaluate

register_configs()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="evaluate")
def main(cfg: DictConfig) -> float | None:
    report = report_user_errors(evaluate, cfg)
    return report.get("metrics", {}).get("fid") if report else None


if __name__ == "__main__":
    main()
