"""Comparing runs: a real sweep evaluated over a sampler grid (appended, resumable records), the offline report
(tables with only the differing overrides, seed groups, inlined figures), the real-data floor, and bad input."""

import hashlib
import json
import re
import statistics
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch_fidelity

from diffusion_lab import report
from diffusion_lab.config.schemas import plain
from diffusion_lab.evaluation.fidelity import FEATURE_EXTRACTOR, reference_cache_name
from diffusion_lab.evaluation.job import evaluate
from diffusion_lab.reporting.run_data import Run
from diffusion_lab.runs.records import read_records
from tests.conftest import run_cli
from tests.test_fidelity import PlainRGB

EVALUATED = ("0", "3")  # (linear, uniform) and (cosine, min_snr)
GRID = ["grid.sampler=[ddim,dpm_solver]", "grid.num_steps=[4,8]", "num_samples=4", "eval.batch_size=8"]


def snapshot(folder: Path) -> dict[str, str]:
    """Content hash of every file under a folder (to prove nothing but the eval records changed)."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def records(run: Path) -> list[dict]:
    return read_records(run)  # complete lines only


# Its module fixture takes minutes on a 2-core CPU.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def evaluated_sweep(quickstart_sweep, tmp_path_factory):
    """Two of the session's 2×2 sweep's jobs (``runs=[a,b]``, the list form) evaluated once through the CLI with a
    2×2 sampler grid (4 samples a cell; each cell's FID costs ~5 s here, so not all four jobs)."""
    import os

    if not os.environ.get("DIFFUSION_LAB_INCEPTION_WEIGHTS"):
        pytest.skip("needs the Inception weights")
    before = snapshot(quickstart_sweep)
    out = tmp_path_factory.mktemp("evaluate") / "job"
    runs = f"runs=[{quickstart_sweep / EVALUATED[0]},{quickstart_sweep / EVALUATED[1]}]"
    result = run_cli([runs, *GRID, f"hydra.run.dir={out}"], cwd=out.parent, module="diffusion_lab.evaluate")
    assert result.returncode == 0, result.stderr[-3000:]
    return quickstart_sweep, before, out


def test_a_sweep_is_evaluated_over_the_sampler_grid_with_the_same_seeds(evaluated_sweep, inception_weights):
    sweep, before, out = evaluated_sweep
    summary = json.loads((out / "summary.json").read_text())
    assert summary["evaluated"] == 8 and summary["failed"] == {}
    assert not (sweep / "1" / "eval").exists() and not (sweep / "2" / "eval").exists()  # only the listed runs
    for job in EVALUATED:
        rows = records(sweep / job)
        cells = {(r["protocol"]["sampler"]["sampler"], r["protocol"]["sampler"]["num_steps"]) for r in rows}
        assert cells == {("ddim", 4), ("ddim", 8), ("dpm_solver++", 4), ("dpm_solver++", 8)}
        assert {r["protocol"]["seed"] for r in rows} == {0} and {r["protocol"]["num_samples"] for r in rows} == {4}
        for row in rows:
            protocol = row["protocol"]
            assert row["metrics"]["fid"] > 0 and protocol["global_step"] == 10 and protocol["ema"] is True
            assert protocol["nfe_per_sample"] == protocol["sampler"]["num_steps"]
            assert protocol["num_reference"] == 180 and protocol["reference_split"] == "val"
            assert protocol["image_resolution"] == "8×8×1" and "299×299" in protocol["resize"]
            assert protocol["real_data_floor"]["split"] == "train" and protocol["real_data_floor"]["n"] == 4
            assert "not with published ones" in protocol["warning"]
    # nothing in the run folders changed but the appended records
    after = snapshot(sweep)
    added = {name for name in after if name not in before}
    assert all(name.endswith(("eval/metrics.jsonl", "eval/metrics.jsonl.lock")) for name in added)
    assert all(after[name] == digest for name, digest in before.items() if not name.endswith("metrics.jsonl"))


def test_evaluating_again_resumes_and_new_settings_append(evaluated_sweep, compose_config, tmp_path):
    sweep, _, _ = evaluated_sweep
    first_lines = {job: (sweep / job / "eval" / "metrics.jsonl").read_text() for job in EVALUATED}
    runs = f"runs=[{sweep / EVALUATED[0]},{sweep / EVALUATED[1]}]"
    again = evaluate(compose_config([runs, *GRID], config_name="evaluate"))
    assert again["evaluated"] == 0 and again["skipped"] == 8
    # an evaluation killed mid-write: job 3 lost its last record and holds half a line
    path = sweep / "3" / "eval" / "metrics.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-1]) + lines[-1][:40])
    resumed = evaluate(compose_config([runs, *GRID], config_name="evaluate"))
    assert resumed["evaluated"] == 1 and resumed["skipped"] == 7
    assert len(records(sweep / "3")) == 4 and path.read_text().count("\n") == 5  # 3 kept, 1 torn, 1 new
    # a new grid value adds rows; what was there stays byte for byte
    evaluate(compose_config([f"runs={sweep / '0'}", "grid.sampler=[ddim]", "grid.num_steps=[2]", "num_samples=4",
                             "eval.batch_size=8"], config_name="evaluate"))  # fmt: skip
    text = (sweep / "0" / "eval" / "metrics.jsonl").read_text()
    assert text.startswith(first_lines["0"]) and len(text.splitlines()) == 5


def test_the_real_data_floor_equals_a_direct_torch_fidelity_call(evaluated_sweep, inception_weights):
    """The floor: 4 training images (the fixed subset) against the cached validation reference."""
    import os

    from diffusion_lab.data import DigitsDataModule

    sweep, _, _ = evaluated_sweep
    floor = records(sweep / "0")[0]["protocol"]["real_data_floor"]
    data = DigitsDataModule(image_size=8)
    train, reference = data.reference_images("train"), data.reference_images("val")
    chosen = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:4].sort().values
    direct = torch_fidelity.calculate_metrics(
        input1=PlainRGB(train[chosen]), input2=PlainRGB(reference), fid=True, cuda=False, verbose=False,
        input2_cache_name=reference_cache_name("digits", "val", reference), cache=True,
        cache_root=os.path.join(os.environ["DIFFUSION_LAB_CACHE_DIR"], "fidelity"), batch_size=8,
        feature_extractor=FEATURE_EXTRACTOR, feature_extractor_weights_path=inception_weights, save_cpu_ram=True,
    )["frechet_inception_distance"]  # fmt: skip
    assert floor["fid"] == pytest.approx(direct, rel=1e-5)  # stock NCHW network against our channels-last copy


def test_the_report_of_an_evaluated_sweep(evaluated_sweep, tmp_path):
    sweep, _, _ = evaluated_sweep
    before = snapshot(sweep)
    assert report.main([str(sweep), "--output", str(tmp_path / "report")]) == 0
    markdown = (tmp_path / "report" / "report.md").read_text()
    table = markdown.split("## Runs")[1].split("##")[0].strip().splitlines()
    header = [cell.strip() for cell in table[0].strip("|").split("|")]
    assert header[:3] == ["run", "schedule", "loss_weighting"]  # exactly the overrides that differ
    assert "seed" not in header and "model" not in header
    assert {"FID ddim·4", "FID ddim·8", "FID dpm++·4", "FID dpm++·8", "val/loss_ema", "images/s"} <= set(header)
    rows = table[2:]
    assert len(rows) == 4
    assert {tuple(c.strip() for c in row.strip("|").split("|")[1:3]) for row in rows} == {
        ("linear", "uniform"), ("linear", "min_snr"), ("cosine", "uniform"), ("cosine", "min_snr")
    }  # fmt: skip
    fid_column = header.index("FID ddim·8")
    cells = {row.strip("|").split("|")[0].strip(): row.strip("|").split("|")[fid_column].strip() for row in rows}
    assert cells["1"] == cells["2"] == "–"  # the jobs that were not evaluated
    values = [float(cells[job].strip("*")) for job in EVALUATED]
    best = [row for row in rows if row.strip("|").split("|")[fid_column].strip().startswith("**")]
    assert len(best) == 1 and f"{min(values):.4g}" in best[0]  # the best of the column is marked
    assert "Protocol: N generated 4" in markdown and "real-data floor" in markdown and "N < 10,000" in markdown
    figures = re.findall(r"!\[[^]]*\]\((figures/[^)]+\.png)\)", markdown)
    assert set(figures) == {f"figures/{n}.png" for n in ("loss_curves", "loss_profile", "fid_vs_nfe", "samples")}
    page = (tmp_path / "report" / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == len(figures) and "figures/" not in page
    assert snapshot(sweep) == before  # the report writes nothing into the runs


def write_run(folder: Path, overrides: dict, val_loss_ema: float, fid: float | None = None, steps=(10,)) -> Path:
    """A synthetic finished run folder with known numbers."""
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "config.yaml").write_text("trainer:\n  devices: 1\nschedule:\n  num_train_timesteps: 1000\n")
    (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {k}={v}\n" for k, v in overrides.items()))
    (folder / "csv").mkdir()
    (folder / "csv" / "metrics.csv").write_text(f"step,train/loss,val/loss_ema\n9,0.5,\n9,,{val_loss_ema}\n")
    (folder / "checkpoints").mkdir()
    (folder / "checkpoints" / "last.ckpt").write_bytes(b"")
    if fid is not None:
        (folder / "eval").mkdir()
        lines = []
        for step in steps:
            protocol = {"global_step": step, "sampler": {"sampler": "ddim", "num_steps": 10}, "nfe_per_sample": 10,
                        "num_samples": 100, "seed": 0, "num_reference": 180, "dataset": "digits"}  # fmt: skip
            lines.append(json.dumps({"metrics": {"fid": fid + 100.0 / step, "kid_mean": 0.01}, "protocol": protocol}))
        (folder / "eval" / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_runs_that_differ_only_in_seed_are_grouped_as_mean_and_std(tmp_path):
    known = {("linear", 0): (0.10, 20.0), ("linear", 1): (0.14, 26.0), ("linear", 2): (0.12, 23.0),
             ("cosine", 0): (0.20, 40.0), ("cosine", 1): (0.30, 50.0)}  # fmt: skip
    for index, ((schedule, seed), (loss, fid)) in enumerate(known.items()):
        write_run(tmp_path / "sweep" / str(index), {"schedule": schedule, "seed": seed}, loss, fid, steps=(10, 20))
    assert report.main([str(tmp_path / "sweep"), "--output", str(tmp_path / "out")]) == 0
    markdown = (tmp_path / "out" / "report.md").read_text()
    section = markdown.split("## Grouped over seeds")[1].split("##")[0]
    grouped = [line for line in section.splitlines() if line.startswith("|")]
    header = [c.strip() for c in grouped[0].strip("|").split("|")]
    assert header[:2] == ["schedule", "n"]
    rows = {row.strip("|").split("|")[0].strip(): [c.strip() for c in row.strip("|").split("|")] for row in grouped[2:]}
    for schedule, n in (("linear", 3), ("cosine", 2)):
        losses = [v[0] for (s, _), v in known.items() if s == schedule]
        fids = [v[1] + 100.0 / 20 for (s, _), v in known.items() if s == schedule]  # the final step's FID
        assert rows[schedule][1] == str(n)
        loss_cell = rows[schedule][header.index("val/loss_ema")].strip("*")
        fid_cell = rows[schedule][header.index("FID ddim·10")].strip("*")
        assert loss_cell == f"{statistics.fmean(losses):.4g} ± {statistics.stdev(losses):.4g}"
        assert fid_cell == f"{statistics.fmean(fids):.4g} ± {statistics.stdev(fids):.4g}"
    assert (tmp_path / "out" / "figures" / "fid_vs_step.png").is_file()  # two evaluated steps per run


def test_images_per_s_is_the_runs_mean_rate_over_all_processes_not_the_last_window():
    """ThroughputMonitor's per-process counts at two logged steps; its last 5-step window is slowed by the end of
    the run (as a real mnist_cpu run's was: 77 images/s against 218 over the run)."""
    rows = [{"step": 19, "train/samples": 1280, "train/time": 5.0, "train/device/samples_per_sec": 256.0},
            {"step": 39, "train/samples": 2560, "train/time": 12.8, "train/device/samples_per_sec": 76.8}]  # fmt: skip
    run = Run(path=Path("run"), overrides={}, config={"trainer": {"devices": 2, "num_nodes": 1}}, rows=rows,
              wall_seconds=None, grid=None, evaluations=[])  # fmt: skip
    assert run.images_per_s == pytest.approx(2 * 2560 / 12.8)


def test_figure_legends_name_a_run_by_its_folder_when_its_label_would_not_fit():
    """Distillation runs differ in a teacher path and several overrides (≈ 250 characters): as legends they
    squeezed the loss plots to slivers, so a figure names such a run by its folder (the runs table maps the two)."""
    run = Run(path=Path("outputs/j_mnist"), overrides={}, config={}, rows=[], wall_seconds=None, grid=None,
              evaluations=[])  # fmt: skip
    run.label = "schedule=cosine"
    assert run.legend_name == "schedule=cosine"
    run.label = "teacher=/tmp/sweep/flow_matching_s0/checkpoints/last.ckpt distillation.trajectories=6400"
    assert run.legend_name == "j_mnist"

    from diffusion_lab.reporting.tables import Group  # FID against calls draws a line per seed group: the same rule

    assert Group({"schedule": "cosine"}, [run]).legend_name == "schedule=cosine"
    long = {"teacher": "/tmp/sweep/flow_matching_s0/checkpoints/last.ckpt", "distillation.trajectories": "6400"}
    assert Group(long, [run]).legend_name == "j_mnist"


def test_sampler_settings_other_than_the_defaults_are_columns_of_their_own():
    """Two evaluations of one checkpoint at 2 Euler calls, on the plain and a shifted grid: the shifted one's
    label names its shift, so the runs table shows both and neither hides the other (the report once showed a
    shift-3 FID, 106.5, as the plain grid's 'euler·2', 76.7); the same for DDIM's η, spacing and Heun's churn."""
    from diffusion_lab.reporting.run_data import sampler_label

    def record(fid: float, **settings) -> dict:
        sampler = {"sampler": "euler", "timestep_spacing": "trailing", "shift": 1.0, "eta": 0.0, **settings}
        return {"protocol": {"sampler": sampler, "nfe_per_sample": 2, "global_step": 2000}, "metrics": {"fid": fid}}

    run = Run(path=Path("teacher"), overrides={}, config={}, rows=[], wall_seconds=None, grid=None,
              evaluations=[record(76.7), record(106.5, shift=3.0)])  # fmt: skip
    labels = {sampler_label(r["protocol"]): r["metrics"]["fid"] for r in run.final_evaluations}
    assert labels == {"euler·2": 76.7, "euler shift=3·2": 106.5}
    assert sampler_label(record(0, sampler="ddim", eta=1.0, timestep_spacing="leading")["protocol"]) == (
        "ddim/leading eta=1·2"
    )
    heun = {"sampler": "heun", "timestep_spacing": "karras", "sigma_max": 80.0, "s_churn": 40.0}
    assert sampler_label({"sampler": heun, "nfe_per_sample": 19}) == "heun/karras σ≤80 s_churn=40·19"
    assert sampler_label({"sampler": {"sampler": "ddim"}, "nfe_per_sample": 20}) == "ddim·20"  # an older record
    ddpm = {"sampler": "ddpm", "variance_type": "fixed_small"}  # records hold the model's own variance resolved
    assert sampler_label({"sampler": ddpm, "nfe_per_sample": 1000}) == "ddpm·1000"
    ddpm["variance_type"] = "fixed_large"
    assert sampler_label({"sampler": ddpm, "nfe_per_sample": 1000}) == "ddpm variance_type=fixed_large·1000"


def test_a_crashed_job_is_listed_and_the_rest_reported(tmp_path):
    write_run(tmp_path / "sweep" / "0", {"schedule": "linear"}, 0.1, 20.0)
    crashed = tmp_path / "sweep" / "1"
    (crashed / ".hydra").mkdir(parents=True)
    (crashed / ".hydra" / "config.yaml").write_text("trainer:\n  devices: 1\n")
    (crashed / "train.log").write_text("[2026-01-01 10:00:00,000][x][INFO] - start\nRuntimeError: CUDA out of memory\n")
    result = run_cli([str(tmp_path / "sweep"), "--output", str(tmp_path / "out")], cwd=tmp_path,
                     module="diffusion_lab.report")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "not reported:" in result.stderr and "RuntimeError: CUDA out of memory" in result.stderr
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "Run summary" in markdown and "RuntimeError: CUDA out of memory" in markdown


def test_a_run_without_evaluations_says_how_to_add_fid(tmp_path):
    write_run(tmp_path / "run", {"schedule": "cosine"}, 0.1)
    assert report.main([str(tmp_path / "run"), "--output", str(tmp_path / "out")]) == 0
    assert "python -m diffusion_lab.evaluate runs=" in (tmp_path / "out" / "report.md").read_text()


def test_bad_report_and_sweep_input_is_one_clear_line(tmp_path, compose_config, capsys, quickstart_sweep):
    (tmp_path / "empty").mkdir()
    assert report.main([str(tmp_path / "empty")]) == 1
    assert "Error: no training runs under" in capsys.readouterr().err
    from diffusion_lab.errors import ConfigError

    before = snapshot(quickstart_sweep)
    for overrides, message in (
        (["grid.num_steps=[5000]"], "num_steps=5000 must be an integer between 1 and num_train_timesteps=1000"),
        (["grid.sampler=[eulr]"], "grid.sampler: unknown sampler 'eulr'; valid choices: consistency, ddim, ddpm"),
        (["checkpoints=first"], "checkpoints=first is not one of last, best, all"),
    ):
        with pytest.raises(ConfigError, match=re.escape(message)):
            evaluate(compose_config([f"runs={quickstart_sweep}", *overrides], config_name="evaluate"))
    with pytest.raises(ConfigError, match="found no training run with checkpoints"):
        evaluate(compose_config([f"runs={tmp_path / 'empty'}"], config_name="evaluate"))
    assert snapshot(quickstart_sweep) == before  # refused before anything was sampled or written


def test_checkpoints_all_takes_every_step_and_last_only_when_its_step_is_new(tmp_path):
    from diffusion_lab.runs.folders import RunFolder, select_checkpoints

    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    for step in (350, 175, 1050):
        torch.save({"global_step": step}, folder / f"step_{step:07d}.ckpt")
    torch.save({"global_step": 1050}, folder / "last.ckpt")
    torch.save({"global_step": 1050}, folder / "best.ckpt")
    run = RunFolder(tmp_path / "run")
    assert [p.name for p in select_checkpoints(run, "all")] == [
        "step_0000175.ckpt", "step_0000350.ckpt", "step_0001050.ckpt"
    ]  # fmt: skip
    torch.save({"global_step": 1200}, folder / "last.ckpt")  # stopped between periodic saves
    assert select_checkpoints(run, "all")[-1].name == "last.ckpt"
    assert [p.name for p in select_checkpoints(run, "best")] == ["best.ckpt"]


def test_a_record_from_before_the_sigma_sampler_settings_is_the_same_measurement(tmp_path):
    """Records written before rho/s_churn/… existed lack them; at their defaults they are the same measurement
    (not redone), with churn they are not."""
    from diffusion_lab.runs.records import append_record, done_metrics

    old = {"sampler": "ddim", "num_steps": 10, "eta": 0.0, "timestep_spacing": "trailing", "clip_sample": True}
    base = {"checkpoint_file": "last.ckpt", "global_step": 10, "ema": True, "num_samples": 4, "seed": 0}
    append_record(tmp_path, {"protocol": {**base, "sampler": old}, "requested": ["fid"], "metrics": {"fid": 1.0}})
    new = {**old, "rho": 7.0, "s_churn": 0.0, "s_tmin": 0.0, "s_tmax": float("inf"), "s_noise": 1.0}
    assert done_metrics(tmp_path, {**base, "sampler": new}) == {"fid"}
    assert done_metrics(tmp_path, {**base, "sampler": {**new, "s_churn": 5.0}}) == set()
    assert done_metrics(tmp_path, {**base, "sampler": {**new, "timestep_spacing": "karras"}}) == set()


def test_two_jobs_scoring_the_same_cell_record_it_once(tmp_path):
    """Two evaluation jobs started on one run both score a cell neither had recorded; the one that appends second
    (it waits for the run's lock while the other writes) finds the cell recorded and drops its copy."""
    import threading

    from filelock import FileLock

    from diffusion_lab.runs.records import append_record, read_records, records_path

    protocol = {"checkpoint_file": "checkpoints/last.ckpt", "global_step": 10, "ema": True, "num_samples": 4,
                "seed": 0, "sampler": {"sampler": "ddim", "num_steps": 2}}  # fmt: skip
    record = {"protocol": protocol, "requested": ["fid"], "metrics": {"fid": 7.0}}
    written = []
    with FileLock(f"{records_path(tmp_path)}.lock"):  # the other job is appending its record right now
        records_path(tmp_path).parent.mkdir(parents=True, exist_ok=True)
        records_path(tmp_path).write_text(json.dumps(record) + "\n")
        second = threading.Thread(target=lambda: written.append(append_record(tmp_path, record, unless_recorded=True)))
        second.start()
        second.join(timeout=1)
        assert second.is_alive() and written == []  # it waits for the lock
    second.join(timeout=30)
    assert written == [False] and len(read_records(tmp_path)) == 1
    # another metric of the same cell, or a plain append (a re-evaluation by ckpt_path), is written
    assert append_record(tmp_path, {**record, "requested": ["kid"]}, unless_recorded=True)
    assert append_record(tmp_path, record) and len(read_records(tmp_path)) == 3


def test_the_sampler_grid_crosses_samplers_spacings_and_steps():
    from diffusion_lab.evaluation.sweep import sampler_grid

    cells = sampler_grid(
        {}, {"sampler": ["euler", "heun"], "timestep_spacing": ["karras", "trailing"], "num_steps": [3, 6]}
    )
    assert [(c["sampler"], c["timestep_spacing"], c["num_steps"]) for c in cells] == [
        (s, spacing, n) for s in ("euler", "heun") for spacing in ("karras", "trailing") for n in (3, 6)
    ]
    assert all(c["rho"] == 7.0 and c["s_churn"] == 0.0 for c in cells)  # the rest from conf/sampler/<name>.yaml
    base = {"sampler": "ddim", "num_steps": 50, "timestep_spacing": "trailing"}
    assert sampler_grid(base, {"timestep_spacing": ["log_snr"]}) == [{**base, "timestep_spacing": "log_snr"}]


def test_the_jobs_own_sampler_settings_reach_every_grid_sampler(compose_config):
    """`sampler=heun sampler.sigma_max=80 grid.sampler=[euler,heun]`: σ_max 80 in both cells (not each option's
    default), while what the job left at its option's default stays each option's own."""
    from diffusion_lab.evaluation.sweep import sampler_choice, sampler_grid

    cfg = compose_config(["sampler=heun", "sampler.sigma_max=80", "grid.sampler=[euler,dpm_solver]",
                          "grid.num_steps=[6]"], config_name="evaluate")  # fmt: skip
    cells = sampler_grid(plain(cfg.sampler), plain(cfg.grid), sampler_choice())
    assert [(c["sampler"], c["sigma_max"], c["timestep_spacing"]) for c in cells] == [
        ("euler", 80.0, "karras"), ("dpm_solver++", 80.0, "trailing")
    ]  # fmt: skip


def test_one_checkpoint_scored_by_several_samplers_is_one_panel_of_lines(tmp_path):
    """The sampler comparison figure: with a single group of runs, every sampler (and σ spacing) is a line of
    FID against network calls in one panel."""
    from diffusion_lab.reporting.figures import fid_against_nfe
    from diffusion_lab.reporting.run_data import sampler_label
    from diffusion_lab.reporting.tables import Group

    one_run = SimpleNamespace(
        final_evaluations=[
            {"protocol": {"sampler": {"sampler": name, "timestep_spacing": spacing}, "nfe_per_sample": nfe},
             "metrics": {"fid": fid}}
            for name, spacing, nfe, fid in [("heun", "karras", 5, 30.0), ("heun", "karras", 19, 10.0),
                                            ("ddim", "trailing", 5, 40.0), ("ddim", "trailing", 20, 12.0)]
        ]
    )  # fmt: skip

    assert sampler_label({"sampler": {"sampler": "heun", "timestep_spacing": "karras"}, "nfe_per_sample": 19}) == (
        "heun/karras·19"
    )
    assert sampler_label({"sampler": {"sampler": "dpm_solver++", "timestep_spacing": "trailing"}}) == "dpm++"
    path = fid_against_nfe([Group(settings={}, runs=[one_run])], tmp_path / "nfe.png")
    import matplotlib.image

    assert path is not None and matplotlib.image.imread(path).shape[1] < 1100  # one panel, not two
