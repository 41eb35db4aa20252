"""A run folder on disk: what a training job writes (its ``.hydra/`` record, checkpoints, evaluation records),
how the other jobs find and read it, and how it is written so that a kill cannot corrupt it.

The submodules are imported one by one (``diffusion_lab.runs.atomic`` needs torch alone, so that a process
that only saves does not import Lightning)."""
