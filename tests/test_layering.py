"""The layering the code promises (pipeline/DESIGN: arrows only point down).

- The math (losses, masking, models, step, flops) imports no Ray, DeepSpeed or MLflow, not even indirectly.
- Jobs (jobs/*.py) import only the library's entry points, pipeline.cli and pipeline.stages, and no private name.
- Only pipeline/engine.py imports DeepSpeed at module level.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MATH = ("pipeline.losses", "pipeline.masking", "pipeline.models", "pipeline.step", "pipeline.flops")
ENTRY_POINTS = {"cli", "stages"}


@pytest.mark.parametrize("module", MATH)
def test_the_math_imports_no_ray_deepspeed_or_mlflow(module):
    code = (f"import sys, {module}; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'deepspeed', 'mlflow')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", f"{module} pulls in {out.strip()}"


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) for every import statement of a file, nested ones included."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.append((node.module, [a.name for a in node.names]))
    return out


@pytest.mark.parametrize("job", sorted(p.name for p in (ROOT / "jobs").glob("*.py") if p.name != "__init__.py"))
def test_jobs_import_only_the_entry_points(job):
    for module, names in _imports(ROOT / "jobs" / job):
        if module == "pipeline":
            assert set(names) <= ENTRY_POINTS, f"jobs/{job} imports {names} from pipeline; allowed: {sorted(ENTRY_POINTS)}"
        elif module.startswith("pipeline."):
            assert module.split(".")[1] in ENTRY_POINTS, f"jobs/{job} imports {module}"
            assert not any(n.startswith("_") for n in names), f"jobs/{job} imports a private name from {module}"


def test_the_jobs_use_no_private_name_of_the_entry_points():
    for job in (ROOT / "jobs").glob("*.py"):
        for node in ast.walk(ast.parse(job.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in ENTRY_POINTS:
                assert not node.attr.startswith("_"), f"{job.name} uses {node.value.id}.{node.attr}"


def test_deepspeed_is_imported_only_by_the_engine():
    for path in (ROOT / "pipeline").rglob("*.py"):
        if path.name == "engine.py":
            continue
        for module, _ in _imports(path):
            assert module.split(".")[0] != "deepspeed", f"{path.relative_to(ROOT)} imports {module}"


def test_the_worker_loop_has_no_task_branch():
    """A new task is a class in pipeline/train/tasks.py, never an `if role ==` / `if task ==` in the loop."""
    text = (ROOT / "pipeline" / "train" / "worker.py").read_text()
    for needle in ("role ==", "task ==", "isinstance(self.task", "DistillTask", "MLMTask"):
        assert needle not in text, f"pipeline/train/worker.py branches on the task: {needle!r}"
