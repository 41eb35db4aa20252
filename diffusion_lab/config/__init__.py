"""Configuration: the conf/ tree, the structured schemas Hydra checks it against, composing a job's config
in-process, and building objects from a config (fresh or stored in a checkpoint)."""

from pathlib import Path

from diffusion_lab.config.schemas import SamplerConfig, plain, register_configs

# The Hydra config tree shipped beside the package (conf/ at the repository root).
CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")

__all__ = ["CONFIG_DIR", "SamplerConfig", "plain", "register_configs"]
