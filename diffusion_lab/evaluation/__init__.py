"""Sample quality (torch-fidelity: FID, KID, IS, precision/recall) and likelihood (bits/dim)."""

from diffusion_lab.evaluation.fidelity import (
    FIDELITY_METRICS,
    fidelity_metrics,
    reference_cache_name,
    resolve_inception_weights,
)
from diffusion_lab.evaluation.nll import nll_bits_per_dim

__all__ = [
    "FIDELITY_METRICS",
    "fidelity_metrics",
    "nll_bits_per_dim",
    "reference_cache_name",
    "resolve_inception_weights",
]
