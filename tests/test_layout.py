"""The package's shape, which README's "Layout" section describes: the root holds only what a user runs, the jobs
do not import each other, and the maths layer knows nothing of Lightning, Hydra or the run folders."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "diffusion_lab"
ENTRY_POINTS = {"train", "distill", "sample", "evaluate", "report", "plot_schedules"}


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports (``from a.b import c`` counts as a.b and a.b.c)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def modules_under(folder: Path) -> dict[str, Path]:
    return {".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts): path for path in folder.rglob("*.py")}


def test_the_package_root_holds_the_entry_points_and_errors_only():
    root = {path.stem for path in PACKAGE.glob("*.py")}
    assert root == ENTRY_POINTS | {"__init__", "errors"}
    for name in ENTRY_POINTS:
        assert "__main__" in (PACKAGE / f"{name}.py").read_text(), f"{name}.py is not runnable with python -m"


def test_no_module_imports_a_job():
    jobs = {f"diffusion_lab.{name}" for name in ENTRY_POINTS}
    offenders = {name: sorted(imported_modules(path) & jobs) for name, path in modules_under(PACKAGE).items()}
    assert {name: jobs for name, jobs in offenders.items() if jobs} == {}


def test_the_maths_layer_imports_neither_lightning_hydra_nor_the_rest_of_the_package():
    allowed = ("diffusion_lab.diffusion", "diffusion_lab.models")
    for name, path in {**modules_under(PACKAGE / "diffusion"), **modules_under(PACKAGE / "models")}.items():
        imports = imported_modules(path)
        assert not [m for m in imports if m.split(".")[0] in ("lightning", "hydra", "omegaconf")], name
        ours = [m for m in imports if m.startswith("diffusion_lab")]
        assert all(m.startswith(allowed) for m in ours), f"{name} imports {ours}"


def test_the_samplers_package_only_re_exports():
    tree = ast.parse((PACKAGE / "diffusion" / "samplers" / "__init__.py").read_text())
    defined = [node for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))]
    assert defined == []
