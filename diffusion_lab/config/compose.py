"""A job's config composed in this process the way its CLI composes it, so that tests and benchmarks can call
``train``, ``sample`` or ``evaluate`` directly instead of starting an interpreter (~8 s of imports each)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from diffusion_lab.config import CONFIG_DIR, register_configs


def compose_job(config_name: str, overrides: Sequence[str], output_dir: str | Path) -> DictConfig:
    """``config_name`` (train, sample or evaluate) with ``overrides``, writing to ``output_dir``.

    Hydra's runtime config is set as the CLI sets it (the jobs read their output folder from it) and then left
    out of the returned config, as ``@hydra.main`` leaves it out of the config it passes to the job."""
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name, overrides=list(overrides), return_hydra_config=True)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.job.num = 0
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        del cfg["hydra"]
    return cfg
