"""The config documents itself: every section has a docstring, every field a comment (its unit and meaning),
and every module of pipeline/ and jobs/ stays small (docs/contributing.md: files ≤ 400 lines)."""

import ast
import dataclasses
import io
import tokenize
from pathlib import Path

import pytest

from pipeline import config

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline" / "config"
MODULES = sorted(PACKAGE.glob("*.py"))
MAX_LINES = 400
MIN_COMMENT_WORDS = 3  # "# rows" alone says a unit, not a meaning


def comment_lines(source: str) -> tuple[dict[int, str], set[int]]:
    """``({line: comment text}, {lines that hold nothing but a comment})`` of Python source."""
    comments: dict[int, str] = {}
    code_lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            code_lines.update(range(tok.start[0], tok.end[0] + 1))
    return comments, {line for line in comments if line not in code_lines}


def field_comment(node: ast.AnnAssign, comments: dict[int, str], alone: set[int]) -> str:
    """A field's comment: trailing on one of its lines, or the block of comment-only lines directly above it."""
    trailing = [comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments and n not in alone]
    above, n = [], node.lineno - 1
    while n in alone:
        above.insert(0, comments[n])
        n -= 1
    return " ".join(above + trailing)


def undocumented(source: str, class_names: set[str]) -> list[str]:
    """Each problem in ``source``: a class of ``class_names`` without a docstring, or a field of one without a
    comment of at least MIN_COMMENT_WORDS words; and a class of ``class_names`` that ``source`` lacks."""
    comments, alone = comment_lines(source)
    problems, seen = [], set()
    for node in ast.parse(source).body:
        if not (isinstance(node, ast.ClassDef) and node.name in class_names):
            continue
        seen.add(node.name)
        if not ast.get_docstring(node):
            problems.append(f"class {node.name} (line {node.lineno}) has no docstring: say what it configures and "
                            "which stage reads it")
        for item in node.body:
            if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                text = field_comment(item, comments, alone)
                if len(text.split()) < MIN_COMMENT_WORDS:
                    problems.append(f"{node.name}.{item.target.id} (line {item.lineno}) has no comment with its unit "
                                    f"and meaning (got {text!r})")
    problems += [f"class {name} is not defined in this source" for name in sorted(class_names - seen)]
    return problems


def section_classes() -> dict[str, type]:
    """RunConfig and every section class it holds, by name."""
    out = {"RunConfig": config.RunConfig}
    for f in dataclasses.fields(config.RunConfig):
        section = f.default_factory()
        out[type(section).__name__] = type(section)
    return out


def module_trees() -> dict[str, tuple[str, ast.Module]]:
    """``{file name: (source, its AST)}`` of every module of the config package: a section may live in any."""
    out = {}
    for path in MODULES:
        source = path.read_text(encoding="utf-8")
        out[path.name] = (source, ast.parse(source))
    return out


def test_every_section_has_a_docstring_and_every_field_a_comment():
    classes = section_classes()
    assert len(classes) == 19  # RunConfig and its 18 section classes (teacher_optim shares OptimSection)
    problems, seen = [], set()
    for name, (source, tree) in module_trees().items():
        here = {node.name for node in tree.body if isinstance(node, ast.ClassDef)} & set(classes)
        seen |= here
        problems += [f"pipeline/config/{name}: {p}" for p in undocumented(source, here)]
    problems += [f"class {name} is defined in no module of pipeline/config/" for name in sorted(set(classes) - seen)]
    assert not problems, "\n".join(problems)


def test_the_check_sees_every_field_the_dataclasses_declare():
    # The source scan must cover what the config really holds: a field it skipped would go unchecked.
    scanned = {
        (node.name, item.target.id)
        for _, tree in module_trees().values()
        for node in tree.body if isinstance(node, ast.ClassDef)
        for item in node.body if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)
    }
    declared = {(name, f.name) for name, cls in section_classes().items() for f in dataclasses.fields(cls)}
    assert declared <= scanned
    assert len(declared) == 121 + 19  # the sections' fields, and RunConfig's one per section


BAD = '''
from dataclasses import dataclass


@dataclass
class ASection:
    """Configures a thing; read by a stage."""

    # rows of a batch, per worker
    documented_above: int = 1
    documented_after: int = 2  # seconds between two reports
    bare: int = 3
    short: int = 4  # rows
    # a comment that belongs to no field

    after_blank_line: int = 5
    multi: list = field(
        default_factory=list,
    )  # trailing on the last line of the field


@dataclass
class BSection:
    x: int = 0  # the x of the y, in tokens
'''


@pytest.mark.parametrize("expected", [
    "ASection.bare (line 12)", "ASection.short (line 13)", "ASection.after_blank_line (line 16)",
    "class BSection (line 23) has no docstring", "class CSection is not defined",
])
def test_the_check_reports_each_kind_of_gap(expected):
    problems = undocumented(BAD, {"ASection", "BSection", "CSection"})
    assert any(p.startswith(expected) for p in problems), problems
    assert len(problems) == 5, problems  # documented_above, documented_after and multi pass


def test_the_package_has_its_modules():
    # The docs checks above read the package's modules by glob: an empty or moved folder would pass vacuously.
    names = {path.name for path in MODULES}
    assert {"__init__.py", "tree.py", "load.py", "build.py", "yaml_reader.py", "checks.py", "sweep_checks.py",
            "metrics.py", "tasks.py"} <= names, names


def test_every_module_of_pipeline_and_jobs_stays_small():
    """Every .py file under pipeline/ and jobs/, found by glob (so a new or moved module, the config package's
    included, is checked without editing this test), has at most MAX_LINES lines."""
    root = PACKAGE.parents[1]
    modules = sorted(p for folder in ("pipeline", "jobs") for p in (root / folder).rglob("*.py"))
    # pipeline/config.py, or pipeline/config/__init__.py once the config is a package (rglob takes its modules too)
    assert Path(config.__file__).resolve() in modules, "the config module (or package) is among those checked"
    long = {str(p.relative_to(root)): n for p in modules
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split each along its concerns): {long}"
