"""Progressive distillation: the target's algebra, one round against an exact teacher, and the distill job (rounds,
checkpoints that sample with their own steps, resuming bit for bit)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from diffusion_lab.diffusion import make_schedule
from diffusion_lab.diffusion.continuous import NOISE_INPUT_SCALE
from diffusion_lab.diffusion.distillation import (
    DDIMCoefficients,
    DiscretePath,
    FlowPath,
    ddim_step,
    student_grid,
    teacher_trajectories,
    teacher_walk,
    two_step_target,
)
from diffusion_lab.diffusion.flow_matching import FlowMatching
from diffusion_lab.diffusion.process import GaussianDiffusion
from diffusion_lab.lit.distillation import ProgressiveDistillation
from tests.helpers import GaussianDataDenoiser, IdealModel

MEAN, STD = 0.3, 0.5


class ExactTeacher(nn.Module):
    """The Bayes-optimal ε-network of Gaussian data, as a (parameter-free) module."""

    def __init__(self, schedule) -> None:
        super().__init__()
        self.denoiser = GaussianDataDenoiser(schedule, "epsilon", MEAN, STD)

    def forward(self, x, t, labels=None):
        return self.denoiser(x, t)


class AffinePerTimestep(nn.Module):
    """A student that can represent the exact answer for Gaussian data: per timestep, an affine map of x_t."""

    def __init__(self, num_train_timesteps: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.zeros(num_train_timesteps))
        self.shift = nn.Parameter(torch.zeros(num_train_timesteps))

    def forward(self, x, t, labels=None):
        shape = (-1,) + (1,) * (x.ndim - 1)
        return self.scale[t].reshape(shape) * x + self.shift[t].reshape(shape)


def test_the_target_makes_one_student_step_land_where_the_teachers_two_do():
    schedule = make_schedule("cosine", 1000)
    teacher = GaussianDiffusion(schedule, "epsilon")
    coefficients = DDIMCoefficients(teacher)
    model = ExactTeacher(schedule)
    student, doubled = student_grid(1000, 4), student_grid(1000, 8)
    assert student.tolist() == [999, 749, 499, 249, 1000] and doubled[::2].tolist() == student.tolist()
    z_t = torch.randn(4, 1, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    index = torch.arange(4)
    t, middle, s = student[index], doubled[2 * index + 1], student[index + 1]
    z_s = teacher_walk(model, DiscretePath(teacher), z_t, [t, middle, s], clip_sample=False)
    target = two_step_target(z_t, z_s, *coefficients.at(t, z_t), *coefficients.at(s, z_t))
    one_step = ddim_step(z_t, target, *coefficients.at(t, z_t), *coefficients.at(s, z_t))
    assert torch.allclose(one_step, z_s, atol=1e-10)
    assert torch.equal(target[-1], z_s[-1])  # the last step lands on the clean sample: x̃ is the teacher's answer


def train_one_round(distiller: ProgressiveDistillation) -> torch.Generator:
    """400 Adam steps on the Gaussian data's distillation loss; returns the generator, to draw fresh states from."""
    optimizer = torch.optim.Adam(distiller.net.parameters(), lr=0.05)
    generator = torch.Generator().manual_seed(0)
    for _ in range(400):
        x0 = MEAN + STD * torch.randn(512, 1, 2, 2, generator=generator)
        loss = distiller.distillation_loss(distiller.net, x0, None, generator)[0].mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return generator


def test_one_round_against_an_exact_teacher_learns_its_two_step_map():
    schedule = make_schedule("cosine", 1000)
    distiller = ProgressiveDistillation(
        teacher=ExactTeacher(schedule), teacher_prediction_type="epsilon", start_steps=8, final_steps=4,
        steps_per_round=1, net=AffinePerTimestep(1000), schedule=schedule, sampler={"clip_sample": False},
    )  # fmt: skip
    assert distiller.student_steps() == 4
    generator = train_one_round(distiller)
    # The student's single DDIM step against the teacher's two, from every point of its grid, on fresh states.
    student, doubled = student_grid(1000, 4), student_grid(1000, 8)
    coefficients = distiller.teacher_path.coefficients
    for i in range(4):
        t, middle, s = (torch.full((2000,), int(v)) for v in (student[i], doubled[2 * i + 1], student[i + 1]))
        x0 = MEAN + STD * torch.randn(2000, 1, 1, 1, generator=generator)
        z_t = distiller.diffusion.q_sample(x0, t, torch.randn(x0.shape, generator=generator))
        expected = teacher_walk(distiller.teacher, distiller.teacher_path, z_t, [t, middle, s], clip_sample=False)
        with torch.no_grad():
            x0 = distiller.diffusion.predict_x0(z_t, t, distiller.net(z_t, t))
        ours = ddim_step(z_t, x0, *coefficients.at(t, z_t), *coefficients.at(s, z_t))
        error = float((ours - expected).abs().max() / expected.abs().max())
        assert error < 0.02, (i, error)


class ExactVelocity(nn.Module):
    """The Bayes-optimal flow-matching velocity of Gaussian data, as a (parameter-free) module."""

    def __init__(self) -> None:
        super().__init__()
        self.ideal = IdealModel(FlowMatching(), MEAN, STD)

    def forward(self, x, noise_input, labels=None):
        return self.ideal(x, noise_input)


class AffinePerLevel(nn.Module):
    """A flow-matching student that can represent the exact answer for Gaussian data: per noise input 1000·t
    (rounded), an affine map of x_t."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.zeros(int(NOISE_INPUT_SCALE) + 1))
        self.shift = nn.Parameter(torch.zeros(int(NOISE_INPUT_SCALE) + 1))

    def forward(self, x, noise_input, labels=None):
        index, shape = noise_input.round().long(), (-1,) + (1,) * (x.ndim - 1)
        return self.scale[index].reshape(shape) * x + self.shift[index].reshape(shape)


def distil_flow_round(teacher_substeps: int) -> ProgressiveDistillation:
    """One round, 8 → 4 Euler steps, of a per-level affine student against the exact Gaussian-data velocity."""
    distiller = ProgressiveDistillation(
        teacher=ExactVelocity(), teacher_prediction_type="velocity", start_steps=8, final_steps=4,
        steps_per_round=1, teacher_substeps=teacher_substeps, net=AffinePerLevel(), schedule=FlowMatching(),
        sampler={"clip_sample": False},
    )  # fmt: skip
    train_one_round(distiller)
    return distiller


def student_euler_steps(distiller: ProgressiveDistillation, z: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """(t, s, z_t, the student's single Euler step t → s) from every point of its 4-step grid, for states z_t on
    the data's path."""
    grid, steps = FlowPath(FlowMatching()).grid(4), []
    for i in range(4):
        t, s = torch.full((z.shape[1],), float(grid[i]), dtype=torch.float64), float(grid[i + 1])
        z_t = distiller.student_path.noisy(MEAN + STD * z[0], t, z[1])
        with torch.no_grad():
            velocity = distiller.net(z_t, (NOISE_INPUT_SCALE * t).float())
        steps.append((t, s, z_t, z_t + (s - float(t[0])) * velocity))  # Euler = DDIM on this path
    return steps


def test_a_flow_matching_teacher_is_distilled_into_half_its_euler_steps():
    distiller = distil_flow_round(teacher_substeps=1)
    assert distiller.student_steps() == 4 and distiller.sampler_settings["sampler"] == "euler"
    fine = FlowPath(FlowMatching()).grid(8)
    assert fine.tolist() == [1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0.0]
    z = torch.randn(2, 2000, 1, 1, 1, generator=torch.Generator().manual_seed(1))
    for i, (t, _, z_t, ours) in enumerate(student_euler_steps(distiller, z)):
        levels = [torch.full_like(t, float(fine[2 * i + j])) for j in range(3)]
        expected = teacher_walk(distiller.teacher, distiller.teacher_path, z_t, levels, clip_sample=False)
        error = float((ours - expected).abs().max() / expected.abs().max())
        assert error < 0.02, (i, error)


def test_teacher_substeps_make_the_first_student_follow_the_exact_flow():
    """The exact probability-flow map of Gaussian data keeps (x_t − α μ)/√(α² s_d² + s²) constant; a first student
    taught by the teacher's 8 sub-steps per step lands nearer it than one taught by two coarse Euler steps."""
    z = torch.randn(2, 2000, 1, 1, 1, generator=torch.Generator().manual_seed(1))
    errors = {}
    for substeps in (1, 8):
        distiller = distil_flow_round(substeps)
        assert distiller.teacher_steps_per_student_step() == 2 * substeps
        worst = 0.0
        for t, s, z_t, ours in student_euler_steps(distiller, z):
            tau_t, tau_s = float(t[0]), s
            scale = lambda tau: math.sqrt((1 - tau) ** 2 * STD**2 + tau**2)  # noqa: E731
            exact = (1 - tau_s) * MEAN + scale(tau_s) / scale(tau_t) * (z_t - (1 - tau_t) * MEAN)
            worst = max(worst, float((ours - exact).abs().max()))
        errors[substeps] = worst
    assert errors[8] < errors[1] / 5, errors  # measured: 0.018 against 0.142


class CountingVelocity(ExactVelocity):
    """The exact velocity, counting the samples it is called on."""

    calls = 0

    def forward(self, x, noise_input, labels=None):
        self.calls += x.shape[0]
        return super().forward(x, noise_input, labels)


class AffineImage(AffinePerLevel):
    in_channels, image_size = 1, 2  # what the bank reads off the network to draw its noises


def test_a_bank_of_teacher_trajectories_teaches_without_calling_the_teacher_again():
    """trajectories=M: the bank holds the teacher's own walk (8 Euler sub-steps per student step) through the
    student's grid, seeded; training then never calls the teacher, and the student still learns the exact flow."""
    teacher = CountingVelocity()
    distiller = ProgressiveDistillation(
        teacher=teacher, teacher_prediction_type="velocity", start_steps=8, final_steps=4, steps_per_round=1,
        teacher_substeps=8, trajectories=4096, trajectory_seed=3, net=AffineImage(), schedule=FlowMatching(),
        sampler={"clip_sample": False},
    )  # fmt: skip
    bank = distiller.trajectory_bank(torch.device("cpu"))
    assert bank.states.shape == (4096, 5, 1, 2, 2) and bank.levels.tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert bank.num_train == 4096 - 256 and bank.labels is None
    assert distiller.teacher.calls == 4096 * 4 * 16  # 16 teacher steps per student step (2 × 8 sub-steps)
    fine = FlowPath(FlowMatching()).grid(64)
    walked = teacher_walk(
        ExactVelocity(), FlowPath(FlowMatching()), bank.states[:5, 0], [v.expand(5) for v in fine[:17]]
    )
    assert torch.allclose(walked, bank.states[:5, 1], atol=1e-6)  # the state after one student step's worth
    scale = lambda tau: math.sqrt((1 - tau) ** 2 * STD**2 + tau**2)  # noqa: E731
    exact_end = MEAN + STD * bank.states[:, 0]  # the exact flow map of N(MEAN, STD²) from t = 1 to 0
    assert float((bank.states[:, -1] - exact_end).abs().max()) < 0.06

    train_one_round(distiller)
    assert distiller.teacher.calls == 4096 * 4 * 16  # no teacher call while training
    z = torch.randn(2, 2000, 1, 1, 1, generator=torch.Generator().manual_seed(1))
    worst = 0.0
    for t, s, z_t, ours in student_euler_steps(distiller, z):
        exact = (1 - s) * MEAN + scale(s) / scale(float(t[0])) * (z_t - (1 - float(t[0])) * MEAN)
        worst = max(worst, float((ours - exact).abs().max()))
    assert worst < 0.03, worst  # measured 0.018, as when the teacher walks 8 sub-steps at every step

    again = ProgressiveDistillation(
        teacher=ExactVelocity(), teacher_prediction_type="velocity", start_steps=8, final_steps=4, steps_per_round=1,
        teacher_substeps=8, trajectories=4096, trajectory_seed=3, net=AffineImage(), schedule=FlowMatching(),
        sampler={"clip_sample": False},
    )  # fmt: skip
    assert torch.equal(again.trajectory_bank(torch.device("cpu")).states, bank.states)  # rebuilt from its seed


class LabelledAffineImage(AffineImage):
    num_classes, null_label = 10, 10  # the bank draws a label for every trajectory (10: none)


class LabelShiftedVelocity(ExactVelocity):
    """The exact velocity shifted by a hundredth of the label: a teacher whose walk depends on its label."""

    def forward(self, x, noise_input, labels=None):
        return super().forward(x, noise_input) + 0.01 * labels.reshape(-1, 1, 1, 1)


def test_the_bank_walks_each_trajectory_with_its_own_label_across_chunks_and_walk_batches():
    """The bank draws noises 512 at a time and walks them in smaller batches on a CPU: every trajectory is still its
    own noise walked with its own label (null for label dropout), as walking it alone gives."""
    from diffusion_lab.lit.distillation import BANK_CHUNK, CPU_WALK_BATCH

    distiller = ProgressiveDistillation(
        teacher=LabelShiftedVelocity(), teacher_prediction_type="velocity", start_steps=8, final_steps=4,
        steps_per_round=1, teacher_substeps=2, trajectories=600, trajectory_seed=3, net=LabelledAffineImage(),
        schedule=FlowMatching(), sampler={"clip_sample": False}, label_dropout=0.2,
    )  # fmt: skip
    bank = distiller.trajectory_bank(torch.device("cpu"))
    assert CPU_WALK_BATCH < BANK_CHUNK < 600 and bank.labels.shape == (600,)
    assert set(bank.labels.tolist()) == set(range(11))  # every class, and the null label 10
    fine = FlowPath(FlowMatching()).grid(16)
    for row in (0, CPU_WALK_BATCH - 1, CPU_WALK_BATCH, BANK_CHUNK - 1, BANK_CHUNK, 599):
        teacher = distiller.network_call(distiller.teacher, bank.labels[row : row + 1])
        alone = teacher_trajectories(teacher, FlowPath(FlowMatching()), bank.states[row : row + 1, 0], fine, 4, False)
        assert torch.allclose(alone[0], bank.states[row], atol=1e-6), row


class DroppingAffineImage(AffineImage):
    """AffineImage with dropout on its output: different in every training-mode call."""

    def __init__(self) -> None:
        super().__init__()
        self.dropout = nn.Dropout(0.5)

    def forward(self, x, noise_input, labels=None):
        return self.dropout(super().forward(x, noise_input, labels))


def rollout_distiller() -> ProgressiveDistillation:
    return ProgressiveDistillation(
        teacher=ExactVelocity(), teacher_prediction_type="velocity", start_steps=8, final_steps=4, steps_per_round=1,
        teacher_substeps=8, trajectories=4096, trajectory_seed=3, net=AffineImage(), schedule=FlowMatching(),
        sampler={"clip_sample": False}, rollout=True,
    )  # fmt: skip


def test_rollout_starts_each_training_pair_where_the_students_own_steps_take_the_banks_noise():
    """distillation.rollout: a training pair starts from the student's own Euler walk from its trajectory's noise
    (validation keeps the teacher's states), and the student still learns the exact flow from such pairs."""
    distiller = rollout_distiller()
    with torch.no_grad():  # a student whose walk is far from the teacher's
        distiller.net.scale.uniform_(-1.0, 0.0, generator=torch.Generator().manual_seed(0))
        distiller.net.shift.uniform_(-0.5, 0.5, generator=torch.Generator().manual_seed(1))
    bank = distiller.trajectory_bank(torch.device("cpu"))
    which, start = torch.tensor([5, 6, 7, 8]), torch.tensor([0, 1, 2, 3])
    ours = distiller._student_states(bank, which, start, 1, None)
    for row, (trajectory, hops) in enumerate(zip(which.tolist(), start.tolist(), strict=True)):
        z = bank.states[trajectory, 0]
        for hop in range(hops):
            t, s = float(bank.levels[hop]), float(bank.levels[hop + 1])
            with torch.no_grad():
                z = z + (s - t) * distiller.net(z[None], torch.tensor([NOISE_INPUT_SCALE * t]))[0]
        assert torch.allclose(ours[row], z, atol=1e-6), row
        assert hops == 0 or not torch.allclose(ours[row], bank.states[trajectory, hops], atol=0.05), row

    def on_the_bank(z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Whether each state is one of the teacher's bank states at its level."""
        levels = ((1.0 - t) / 0.25).round().long()
        return torch.stack(
            [
                (bank.states[:, level] - z).flatten(1).abs().amax(1).amin() < 1e-6
                for z, level in zip(z_t, levels, strict=True)
            ]
        )

    for held_out in (True, False):
        generator = torch.Generator().manual_seed(2)
        z_t, _, t, _, _ = distiller._bank_pairs(256, torch.device("cpu"), generator, held_out=held_out)
        expected = torch.ones_like(t, dtype=torch.bool) if held_out else t == 1.0  # training: the student's states
        assert bool(on_the_bank(z_t, t).eq(expected).all()), held_out

    with_dropout = rollout_distiller()  # the walk samples as sampling does: in eval mode, so no dropout
    with_dropout.net = DroppingAffineImage()
    with torch.no_grad():
        with_dropout.net.scale.fill_(-0.5)
    walks = [with_dropout._student_states(bank, which, start, 1, None) for _ in range(2)]
    assert torch.equal(walks[0], walks[1]) and with_dropout.net.training

    trained = rollout_distiller()  # from the student's usual start (here: zero velocity), the exact flow is learnt
    train_one_round(trained)
    z = torch.randn(2, 2000, 1, 1, 1, generator=torch.Generator().manual_seed(1))
    scale = lambda tau: math.sqrt((1 - tau) ** 2 * STD**2 + tau**2)  # noqa: E731
    worst = 0.0
    for t, s, z_t, ours in student_euler_steps(trained, z):
        exact = (1 - s) * MEAN + scale(s) / scale(float(t[0])) * (z_t - (1 - float(t[0])) * MEAN)
        worst = max(worst, float((ours - exact).abs().max()))
    assert worst < 0.03, worst


def test_a_bank_needs_enough_trajectories():
    with pytest.raises(ValueError, match=r"rollout=true starts each pair .* it needs a bank \(distillation\.traj"):
        ProgressiveDistillation(
            teacher=ExactVelocity(), teacher_prediction_type="velocity", start_steps=8, final_steps=4,
            steps_per_round=1, rollout=True, net=AffineImage(), schedule=FlowMatching(),
        )  # fmt: skip
    with pytest.raises(ValueError, match=r"trajectories=5: the bank needs at least 10 teacher trajectories"):
        ProgressiveDistillation(
            teacher=ExactVelocity(), teacher_prediction_type="velocity", start_steps=8, final_steps=4,
            steps_per_round=1, trajectories=5, net=AffineImage(), schedule=FlowMatching(),
        )  # fmt: skip


def test_the_rounds_must_halve_to_the_final_steps():
    schedule = make_schedule("cosine", 1000)
    with pytest.raises(ValueError, match=r"start_steps=12 and final_steps=1: the steps halve every round"):
        ProgressiveDistillation(
            teacher=ExactTeacher(schedule), teacher_prediction_type="epsilon", start_steps=12, final_steps=1,
            steps_per_round=1, net=AffinePerTimestep(1000), schedule=schedule,
        )  # fmt: skip


DISTILL = ["distillation.start_steps=8", "distillation.final_steps=2", "distillation.steps_per_round=4",
           "print_config=false", "callbacks.progress_bar=null", "callbacks.model_summary=null", "trainer=cpu",
           "callbacks.sample_grid.num_samples=4", "trainer.limit_val_batches=1", "batch_size=32"]  # fmt: skip


def assert_the_last_grid_draws_with_the_last_rounds_sampler(student, grid_path) -> None:
    """The sample grid at the last round's end shows the student drawn with that round's steps, not the first
    round's (the EMA copy of the module was made when training started, with the first round's sampler)."""
    import numpy as np
    from PIL import Image

    from diffusion_lab.data.base import to_uint8
    from diffusion_lab.generation.grids import image_grid

    drawn = np.asarray(Image.open(grid_path).convert("L"), dtype=np.float64)
    distance = {}
    for steps in (2, 4):
        images = to_uint8(student.generate(seeds=range(4), num_steps=steps))
        distance[steps] = np.abs(image_grid(images, None, 32)[0].double().numpy() - drawn).mean()
    assert distance[2] < distance[4] / 3, distance


def final_state(path):
    from diffusion_lab.runs.checkpoints import load_checkpoint

    checkpoint = load_checkpoint(path)
    return {**checkpoint["state_dict"], **{f"raw.{k}": v for k, v in checkpoint["current_model_state"].items()}}


def test_the_distill_job_halves_per_round_records_its_sampler_and_resumes_bit_exact(
    checkpoint, compose_config, tmp_path
):
    from diffusion_lab.distill import distill
    from diffusion_lab.runs.checkpoints import load_checkpoint, load_module

    straight = tmp_path / "straight"
    distill(compose_config([f"teacher={checkpoint}", *DISTILL], run_dir=straight, config_name="distill"))
    rounds = {4: 4, 8: 2}  # the checkpoint at the end of each round samples with that round's DDIM steps
    for step, steps in rounds.items():
        stored = load_checkpoint(straight / "checkpoints" / f"step_{step:07d}.ckpt")
        config = stored["diffusion_lab_config"]
        assert config["sampler"]["sampler"] == "ddim" and config["sampler"]["num_steps"] == steps
        assert config["objective"]["prediction_type"] == "v_prediction"
        assert stored["distillation"]["round"] == (0 if step == 4 else 1)
    module, _ = load_module(straight / "checkpoints" / "last.ckpt")  # a plain DiffusionModule, the student alone
    assert type(module).__name__ == "DiffusionModule" and module.sampler_settings["num_steps"] == 2
    assert torch.isfinite(module.generate(seeds=range(2))).all()
    assert_the_last_grid_draws_with_the_last_rounds_sampler(module, straight / "samples" / "step_0000008.png")

    assert_resuming_mid_round_is_bit_exact([f"teacher={checkpoint}", *DISTILL], straight, compose_config)


def assert_resuming_mid_round_is_bit_exact(overrides, straight, compose_config) -> None:
    """A run stopped at step 6 (mid-round) and resumed ends with the straight run's weights, raw and EMA."""
    from diffusion_lab.distill import distill

    resumed = straight.parent / "resumed"
    distill(compose_config([*overrides, "trainer.max_steps=6"], run_dir=resumed, config_name="distill"))
    distill(compose_config([*overrides, "ckpt_path=auto"], run_dir=resumed, config_name="distill"))
    expected, got = (final_state(run / "checkpoints" / "last.ckpt") for run in (straight, resumed))
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


def test_evaluating_a_distilled_run_counts_each_rounds_own_steps(checkpoint, compose_config, tmp_path):
    from omegaconf import OmegaConf

    from diffusion_lab.distill import distill
    from diffusion_lab.evaluation.job import evaluate
    from diffusion_lab.runs.records import read_records

    run = tmp_path / "run"
    cfg = compose_config([f"teacher={checkpoint}", *DISTILL], run_dir=run, config_name="distill")
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")  # as Hydra's launcher writes it
    distill(cfg)
    evaluate(compose_config([f"runs={run}", "checkpoints=all", "num_samples=16", "eval.features=digits",
                             "reference_split=train", "metrics=[fid]"], config_name="evaluate"))  # fmt: skip
    calls = {r["protocol"]["global_step"]: r["protocol"]["nfe_per_sample"] for r in read_records(run)}
    assert calls == {4: 4, 8: 2}


@pytest.fixture(scope="module")
def flow_teacher(tmp_path_factory):
    """A tiny flow-matching run on the 8×8 digits (10 steps): the kind of checkpoint experiment=mnist_cpu makes."""
    from diffusion_lab.config.compose import compose_job
    from diffusion_lab.train import train
    from tests.conftest import FAST

    folder = tmp_path_factory.mktemp("flow_teacher")
    train(compose_job("train", [*FAST, "objective=flow_matching", f"paths.log_dir={folder}"], folder / "run"))
    return folder / "run" / "checkpoints" / "last.ckpt"


def test_a_flow_matching_checkpoint_distils_into_euler_students_counted_right(
    flow_teacher, compose_config, tmp_path, capsys
):
    from omegaconf import OmegaConf

    from diffusion_lab.distill import distill
    from diffusion_lab.evaluation.job import evaluate
    from diffusion_lab.runs.checkpoints import load_checkpoint, load_module
    from diffusion_lab.runs.records import read_records
    from tests.helpers import user_error

    run = tmp_path / "run"
    cfg = compose_config([f"teacher={flow_teacher}", *DISTILL, "distillation.teacher_substeps=2"], run_dir=run,
                         config_name="distill")  # fmt: skip
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    distill(cfg)
    stored = load_checkpoint(run / "checkpoints" / "last.ckpt")
    config = stored["diffusion_lab_config"]
    assert config["objective"]["kind"] == "flow_matching" and config["schedule"] is None
    assert config["sampler"]["sampler"] == "euler" and config["sampler"]["num_steps"] == 2
    assert stored["distillation"]["teacher_prediction_type"] == "velocity"
    module, _ = load_module(run / "checkpoints" / "last.ckpt")
    assert isinstance(module.continuous, FlowMatching) and torch.isfinite(module.generate(seeds=range(2))).all()
    evaluate(compose_config([f"runs={run}", "checkpoints=all", "num_samples=16", "eval.features=digits",
                             "reference_split=train", "metrics=[fid]"], config_name="evaluate"))  # fmt: skip
    calls = {r["protocol"]["global_step"]: r["protocol"]["nfe_per_sample"] for r in read_records(run)}
    assert calls == {4: 4, 8: 2}

    refused = compose_config([f"teacher={flow_teacher}", "distillation=consistency", "print_config=false"],
                             config_name="distill")  # fmt: skip
    message = user_error(distill, refused, capsys)
    assert "distillation=consistency walks a β schedule's DDIM chain" in message
    assert "objective=flow_matching: use distillation=progressive" in message


def test_distilling_from_a_bank_resumes_bit_exact_and_keeps_the_original_teacher(
    flow_teacher, compose_config, tmp_path
):
    """The bank preset (distillation=progressive_bank: a bank, rollout) through the job, made small: the bank is
    rebuilt from the seed when a run resumes mid-round (same weights as a straight run, bit for bit, rollout's
    walks included), the original teacher stays in the checkpoints (the rounds learn from its trajectories, not
    from the previous student), and the checkpoints record the bank's size and rollout."""
    from diffusion_lab.distill import distill
    from diffusion_lab.runs.checkpoints import load_checkpoint

    bank = [f"teacher={flow_teacher}", "distillation=progressive_bank", *DISTILL, "distillation.trajectories=40"]
    straight = tmp_path / "straight"
    distill(compose_config(bank, run_dir=straight, config_name="distill"))
    assert_resuming_mid_round_is_bit_exact(bank, straight, compose_config)

    stored = load_checkpoint(straight / "checkpoints" / "last.ckpt")
    recorded = stored["diffusion_lab_config"]["distillation"]
    assert recorded["trajectories"] == 40 and recorded["rollout"] is True and recorded["method"] == "progressive"
    assert stored["diffusion_lab_config"]["sampler"]["num_steps"] == 2
    original = load_checkpoint(flow_teacher)["state_dict"]
    for key, value in stored["distillation"]["teacher"].items():
        assert torch.equal(value, original[f"net.{key}"]), key
    learnt = stored["state_dict"]["net.output.2.weight"]
    assert not torch.equal(learnt, original["net.output.2.weight"])  # the student moved away from its teacher


def test_the_two_call_preset_learns_from_the_four_call_presets_bank_in_one_round(flow_teacher, compose_config):
    """distillation=progressive_bank_2call walks the same teacher trajectories as progressive_bank (16 teacher calls
    through the student grid, bit for bit: its measurements are against the same bank), and goes straight to two
    calls in one round, each student step taught by eight of the teacher's."""
    from diffusion_lab.config.build import build_distillation
    from diffusion_lab.distill import inherit_teacher_config
    from diffusion_lab.runs.checkpoints import load_checkpoint
    from diffusion_lab.runs.layout import CONFIG_KEY

    teacher = load_checkpoint(flow_teacher)
    banks, students = [], []
    for preset in ("progressive_bank", "progressive_bank_2call"):
        cfg = compose_config([f"teacher={flow_teacher}", f"distillation={preset}", "distillation.trajectories=20"],
                             config_name="distill")  # fmt: skip
        inherit_teacher_config(cfg, teacher[CONFIG_KEY])
        student = build_distillation(cfg, teacher)
        banks.append(student.trajectory_bank(torch.device("cpu")))
        students.append(student)
    four, two = students
    assert len(banks[0].levels) == 5 and torch.equal(banks[0].levels[::2], banks[1].levels)  # t = 1, ½, 0 in both
    assert torch.equal(banks[0].states[:, ::2], banks[1].states)  # the same noises, walked to the same states
    assert (four.num_rounds, four.student_steps()) == (1, 4)
    assert (two.num_rounds, two.student_steps(), two.teacher_steps_per_student_step()) == (1, 2, 8)
    assert two.rollout and two.steps_per_round > four.steps_per_round


def test_each_ddp_rank_distils_from_its_own_bank_in_bf16(flow_teacher, tmp_path):
    """trainer=ddp_cpu in bf16-mixed: each rank builds its own bank (seeded by rank: different trajectories, twice
    the data) and the ranks end with the same student, as DDP's averaged gradients require — with rollout, whose
    student walks run on each rank's own module under autocast."""
    from tests.conftest import REPO_ROOT, run_cli

    dumps = tmp_path / "dumps"
    result = run_cli(
        [f"teacher={flow_teacher}", *DISTILL, "distillation.trajectories=40", "distillation.rollout=true",
         "trainer=ddp_cpu", "trainer.precision=bf16-mixed", "+callbacks.bank._target_=tests.probes.DumpBankPerRank",
         f"+callbacks.bank.output_dir={dumps}", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path, module="diffusion_lab.distill", env_extra={"PYTHONPATH": str(REPO_ROOT)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(dumps / f"bank_rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert not torch.equal(ranks[0]["states"], ranks[1]["states"])
    assert ranks[0]["weights"].keys() == ranks[1]["weights"].keys()
    for key, value in ranks[0]["weights"].items():
        assert torch.equal(value, ranks[1]["weights"][key]), key
