"""experiment=mnist_cpu learns digits: a short fixed-seed run on real MNIST draws samples that a classifier fitted
on real MNIST assigns confidently to every one of the ten classes, spread evenly, where the same sampler's output
from the untrained network falls into a few classes (its blobs look like one or two digits to the classifier):
the check fails for a model that has not learnt digits."""

import pytest
import torch
from omegaconf import OmegaConf
from torchvision.datasets import MNIST

from diffusion_lab.config.build import build_module

STEPS = 150
SAMPLES = 200


def fit_softmax_regression(images: torch.Tensor, labels: torch.Tensor) -> torch.nn.Linear:
    """Multinomial logistic regression on raw pixels in [0, 1] (≈ 90 % test accuracy on MNIST)."""
    torch.manual_seed(0)
    classifier = torch.nn.Linear(images.shape[1], 10)
    optimizer = torch.optim.LBFGS(classifier.parameters(), max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(classifier(images), labels) + 1e-4 * classifier.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return classifier


def confident_labels(classifier: torch.nn.Linear, samples: torch.Tensor) -> tuple[float, list[int]]:
    """Share of samples (in [−1, 1]) classified with probability ≥ 0.9, and how many of them fall in each class."""
    with torch.no_grad():
        probabilities = classifier(((samples + 1) / 2).clamp(0, 1).flatten(1)).softmax(1)
    confidence, predicted = probabilities.max(1)
    confident = confidence >= 0.9
    return confident.float().mean().item(), torch.bincount(predicted[confident], minlength=10).tolist()


def spread_over_all_digits(counts: list[int]) -> bool:
    """Every digit present and none above 30 % of the confident samples."""
    return min(counts) >= 1 and max(counts) <= 0.3 * sum(counts)


@pytest.mark.slow
def test_short_mnist_cpu_run_samples_every_digit(compose_config, mnist_root, tmp_path):
    from diffusion_lab.train import train

    run = tmp_path / "run"
    overrides = ["experiment=mnist_cpu", f"data.root={mnist_root}", "data.download=false", f"trainer.max_steps={STEPS}",
                 "lr_scheduler.warmup_steps=50", f"trainer.val_check_interval={STEPS}", "callbacks.sample_grid=null",
                 "print_config=false", "callbacks.progress_bar=null", "callbacks.model_summary=null"]  # fmt: skip
    train(compose_config(overrides, run_dir=run))
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    config = OmegaConf.create(checkpoint["diffusion_lab_config"])
    assert checkpoint["global_step"] == STEPS and config.sampler.sampler == "dpm_solver++"

    real = MNIST(str(mnist_root), train=True, download=False)
    classifier = fit_softmax_regression(real.data[:10000].flatten(1).float() / 255, real.targets[:10000])
    test = MNIST(str(mnist_root), train=False, download=False)
    accuracy = (classifier(test.data[:2000].flatten(1).float() / 255).argmax(1) == test.targets[:2000]).float().mean()
    assert accuracy > 0.85

    untrained = build_module(config)
    trained = build_module(config)
    trained.load_state_dict(checkpoint["state_dict"])  # the EMA weights
    seeds = range(SAMPLES)
    trained_share, trained_counts = confident_labels(classifier, trained.generate(seeds=seeds))
    untrained_share, untrained_counts = confident_labels(classifier, untrained.generate(seeds=seeds))
    print(f"confident: trained {trained_share:.2f} {trained_counts}")
    print(f"confident: untrained {untrained_share:.2f} {untrained_counts}")
    assert trained_share >= 0.2 and spread_over_all_digits(trained_counts)
    assert not spread_over_all_digits(untrained_counts)  # the control: blobs fall into a few classes
