"""The names of a run folder, written once: every job that reads or writes one spells them from here.

<run>/.hydra/config.yaml        the composed config (Hydra), how every job recognises a run folder
<run>/.hydra/overrides.yaml     what the command line changed (the report's columns)
<run>/checkpoints/last.ckpt     + step_<N>.ckpt, best.ckpt
<run>/csv/metrics.csv           the CSV logger's metrics (``logger=csv``, the default)
<run>/samples/step_<N>.png      the sample grids
<run>/eval/metrics.jsonl        one evaluation record per line (``diffusion_lab.runs.records``)
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

HYDRA_DIR = Path(".hydra")
HYDRA_CONFIG = HYDRA_DIR / "config.yaml"
HYDRA_OVERRIDES = HYDRA_DIR / "overrides.yaml"
METRICS_CSV = Path("csv") / "metrics.csv"
SAMPLE_GRIDS = "samples"
POSTHOC_EMA = "posthoc_ema"
CHECKPOINTS = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
EVAL_RECORDS = Path("eval") / "metrics.jsonl"
# The key under which a checkpoint stores its run's resolved config (sampling and evaluation rebuild from it).
CONFIG_KEY = "diffusion_lab_config"


def run_config(run_dir: Path) -> DictConfig:
    """The config a training run was composed with (its ``.hydra/config.yaml``)."""
    return OmegaConf.load(Path(run_dir) / HYDRA_CONFIG)


def last_checkpoint(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS / LAST_CHECKPOINT
