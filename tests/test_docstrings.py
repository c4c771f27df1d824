"""Every module of pipeline/ has a docstring, and so does every public function, class and method (issue 11 item 5).

Public: a name without a leading underscore, at module level or a method (properties included) of a public
class. A method needs none when a base class in the same module (followed through its bases by name, e.g.
``MLMTask`` → ``MaskedLMTask`` → ``Task`` in pipeline/train/tasks.py) documents a method of that name: the
override inherits it. Dunder methods and property setters/deleters need none.
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = ROOT / "pipeline"

_FUNCS = (ast.FunctionDef, ast.AsyncFunctionDef)


def _public(name: str) -> bool:
    return not name.startswith("_")


def _base_names(cls: ast.ClassDef) -> list[str]:
    """The names of a class's bases: ``Task`` and ``abc.ABC`` give "Task" and "ABC"."""
    out = []
    for base in cls.bases:
        if isinstance(base, ast.Name):
            out.append(base.id)
        elif isinstance(base, ast.Attribute):
            out.append(base.attr)
    return out


def _documented_in_base(cls: ast.ClassDef, method: str, classes: dict[str, ast.ClassDef], seen=None) -> bool:
    """Whether a base of ``cls`` defined in the same module or imported from a pipeline module (or one of its
    bases) documents ``method``."""
    seen = set() if seen is None else seen
    for name in _base_names(cls):
        base = classes.get(name)
        if base is None or name in seen:
            continue
        seen.add(name)
        if any(isinstance(n, _FUNCS) and n.name == method and ast.get_docstring(n) for n in base.body):
            return True
        if _documented_in_base(base, method, classes, seen):
            return True
    return False


def _is_accessor(fn: ast.FunctionDef) -> bool:
    """``@x.setter`` / ``@x.deleter``: the property's getter holds the docstring."""
    return any(isinstance(d, ast.Attribute) and d.attr in ("setter", "deleter") for d in fn.decorator_list)


def gaps(source: str, rel: str) -> list[str]:
    """``rel:line name`` for each module, public function, class or method of ``source`` without a docstring."""
    tree = ast.parse(source)
    out = [] if ast.get_docstring(tree) else [f"{rel}: the module"]
    classes = {**_imported_classes(tree), **{n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}}
    for node in tree.body:
        if not (isinstance(node, (*_FUNCS, ast.ClassDef)) and _public(node.name)):
            continue
        if not ast.get_docstring(node):
            out.append(f"{rel}:{node.lineno} {node.name}")
        if isinstance(node, ast.ClassDef):
            for m in node.body:
                if (isinstance(m, _FUNCS) and _public(m.name) and not ast.get_docstring(m) and not _is_accessor(m)
                        and not _documented_in_base(node, m.name, classes)):
                    out.append(f"{rel}:{m.lineno} {node.name}.{m.name}")
    return out


def _imported_classes(tree: ast.Module) -> dict[str, ast.ClassDef]:
    """Classes a module imports from another pipeline module (``from pipeline.train.tasks import Task``), with
    that module's own classes (their bases), so an override of an imported base's method is found documented."""
    out = {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline."):
            path = ROOT / (node.module.replace(".", "/") + ".py")
            if path.exists():
                defined = {n.name: n for n in ast.parse(path.read_text()).body if isinstance(n, ast.ClassDef)}
                out.update(defined)
    return out


def _modules() -> dict[str, Path]:
    return {p.relative_to(PIPELINE).as_posix(): p for p in sorted(PIPELINE.rglob("*.py"))}


def test_every_public_name_has_a_docstring():
    missing = [g for rel, path in _modules().items() for g in gaps(path.read_text(), f"pipeline/{rel}")]
    assert not missing, ("write a docstring (what it returns, with shapes, units, errors and source) for:\n  "
                         + "\n  ".join(missing))


def test_the_checker_finds_each_kind_of_gap():
    source = textwrap.dedent('''
        import abc

        def public(): pass
        def _private(): pass
        class Base(abc.ABC):
            """Documented."""
            def run(self):
                """Runs."""
            def bare(self): pass
            def __init__(self): pass
            @property
            def size(self):
                """A size."""
            @size.setter
            def size(self, value): pass
        class _Middle(Base):
            def _helper(self): pass
        class Child(_Middle):
            """Documented."""
            def run(self): pass
            def bare(self): pass
            def new(self): pass
        class Undocumented: pass
        class _Hidden:
            def open(self): pass
        ''')
    assert gaps(source, "m.py") == ["m.py: the module", "m.py:4 public", "m.py:10 Base.bare", "m.py:22 Child.bare",
                                    "m.py:23 Child.new", "m.py:24 Undocumented"]
    assert gaps('"""A module."""\ndef f():\n    """F."""\n', "ok.py") == []
