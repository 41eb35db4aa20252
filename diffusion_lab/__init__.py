"""diffusion_lab: a PyTorch Lightning + Hydra framework for training, sampling and evaluating denoising
diffusion models."""

__version__ = "0.1.0"
