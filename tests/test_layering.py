"""The layering the code promises (docs/architecture.md): arrows only point down.

- The method (losses, masking, models, step, flops) imports no Ray, DeepSpeed or MLflow, not even indirectly.
- Jobs (jobs/*.py) import only the library's entry points, pipeline.cli and pipeline.stages, and no private name.
- Only pipeline/engine.py imports DeepSpeed.
- No two modules import each other, directly or through others, counting the imports inside functions.
- An import of a pipeline module inside a function says why on its line (``# deferred: <reason>``): a heavy or
  optional dependency kept off an import path, or a driver-side module that must not load the worker side.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MATH = ("pipeline.losses", "pipeline.masking", "pipeline.models", "pipeline.step", "pipeline.flops", "pipeline.glue_metrics",
        "pipeline.families")
ENTRY_POINTS = {"cli", "stages"}
DEFERRED = "# deferred:"


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


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    """Every module of the library and the jobs, by dotted name."""
    files = [*(ROOT / "pipeline").rglob("*.py"), *(ROOT / "jobs").glob("*.py")]
    return {_module_name(p): p for p in files}


def _targets(module: str, names: list[str], known: dict[str, Path]) -> set[str]:
    """The modules of this repository an import statement loads: ``from a import b`` is the module a.b when
    there is one, else a itself."""
    if module.split(".")[0] not in ("pipeline", "jobs"):
        return set()
    subs = {f"{module}.{n}" for n in names if f"{module}.{n}" in known}
    rest = [n for n in names if f"{module}.{n}" not in known]
    return subs | ({module} if (rest or not names) and module in known else set())


def import_graph(known: dict[str, Path] | None = None) -> dict[str, set[str]]:
    """module → the modules of this repository it imports, at module level or inside functions."""
    known = known or _modules()
    return {m: set().union(*(_targets(mod, names, known) for mod, names in _imports(p))) - {m}
            for m, p in known.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm), each sorted."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_two_modules_import_each_other_even_inside_functions():
    found = cycles(import_graph())
    assert not found, "import circles (a concept sits in the wrong module): " + "; ".join(" <-> ".join(c) for c in found)


def test_the_cycle_finder_sees_a_circle_hidden_inside_a_function(tmp_path):
    """The check above must see what it is meant to: a circle closed by an import inside a function."""
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "pipeline" / "a.py").write_text("from pipeline import b\n")
    (tmp_path / "pipeline" / "b.py").write_text("def f():\n    from pipeline import a  # deferred: a test\n")
    (tmp_path / "pipeline" / "c.py").write_text("from pipeline import a\n")
    known = {f"pipeline.{n}": tmp_path / "pipeline" / f"{n}.py" for n in "abc"}
    graph = {m: set().union(*(_targets(mod, names, known) for mod, names in _imports(p))) - {m} for m, p in known.items()}
    assert cycles(graph) == [["pipeline.a", "pipeline.b"]]


def _function_level_imports(path: Path):
    """(line number, source line, imported module) of every import inside a function or method."""
    tree = ast.parse(path.read_text())
    lines = path.read_text().splitlines()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom) and node.module:
                    yield node.lineno, lines[node.lineno - 1], node.module
                elif isinstance(node, ast.Import):
                    yield from ((node.lineno, lines[node.lineno - 1], a.name) for a in node.names)


def test_an_import_of_our_own_modules_inside_a_function_says_why():
    unexplained = sorted({f"{p.relative_to(ROOT)}:{n}: {line.strip()}"
                          for p in _modules().values() for n, line, module in _function_level_imports(p)
                          if module.split(".")[0] in ("pipeline", "jobs") and DEFERRED not in line})
    assert not unexplained, (f"an import of a pipeline module inside a function needs `{DEFERRED} <reason>` on its line "
                             "(docs/architecture.md), or belongs at the top of the module:\n  " + "\n  ".join(unexplained))


@pytest.mark.parametrize("job", sorted(p.name for p in (ROOT / "jobs").glob("*.py") if p.name != "__init__.py"))
def test_jobs_import_only_the_entry_points(job):
    for module, names in _imports(ROOT / "jobs" / job):
        if module == "pipeline":
            assert set(names) <= ENTRY_POINTS, f"jobs/{job} imports {names} from pipeline; allowed: {sorted(ENTRY_POINTS)}"
        elif module.startswith("pipeline."):
            assert module.split(".")[1] in ENTRY_POINTS, f"jobs/{job} imports {module}"
            assert not any(n.startswith("_") for n in names), f"jobs/{job} imports a private name from {module}"


def test_the_jobs_use_no_private_name_of_the_entry_points():
    stage_modules = {p.stem for p in (ROOT / "pipeline" / "stages").glob("*.py")}
    for job in (ROOT / "jobs").glob("*.py"):
        for node in ast.walk(ast.parse(job.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and \
                    node.value.id in ENTRY_POINTS | stage_modules:
                assert not node.attr.startswith("_"), f"{job.name} uses {node.value.id}.{node.attr}"


def test_deepspeed_is_imported_only_by_the_engine():
    for path in (ROOT / "pipeline").rglob("*.py"):
        if path.name == "engine.py":
            continue
        for module, _ in _imports(path):
            assert module.split(".")[0] != "deepspeed", f"{path.relative_to(ROOT)} imports {module}"


def test_the_worker_loop_has_no_task_branch():
    """A new task is a module in pipeline/train/tasks/, never an `if role ==` / `if task ==` in the loop."""
    text = (ROOT / "pipeline" / "train" / "worker.py").read_text()
    for needle in ("role ==", "task ==", "isinstance(self.task", "DistillTask", "MLMTask"):
        assert needle not in text, f"pipeline/train/worker.py branches on the task: {needle!r}"
