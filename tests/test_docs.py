"""The docs stay true to the code: a page that names something gone, or leaves something out, fails here.

- docs/configuration.md names every section of RunConfig and every field of every section, and its reference
  block is what the config's own docstrings and comments say today (``python tests/test_docs.py --write``
  regenerates the block);
- every repository path a page names in code (``pipeline/…``, ``jobs/…``, ``tests/…``, ``configs/…``,
  ``benchmarks/…``, ``cluster/…``, ``docs/…``, ``.ci/…``, and top-level files such as ``Makefile``) exists, and
  every relative link, with its ``#anchor``, leads somewhere;
- README.md links every page of docs/, stays a front door (at most 200 lines), and its sample summary lists the
  stages jobs.pipeline runs (``pipeline.stages.ORDER``), in order;
- no page cites internal ticket numbers or files outside the repository.

The checkers are plain functions of text, so the tests at the end can feed them bad pages and see them fail.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import json
import re
import sys
import textwrap
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
CONFIG_PAGE = DOCS / "configuration.md"
MAX_README_LINES = 200

PATH_RE = re.compile(r"(?<![\w./-])((?:pipeline|jobs|tests|configs|benchmarks|cluster|docs|\.ci)/[\w./*-]*)")
TOP_LEVEL = {"Makefile", "pyproject.toml", "requirements.in", "requirements.lock", "README.md", ".gitignore"}
LINK_RE = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE_RE = re.compile(r"^```.*?^```[ \t]*$", re.MULTILINE | re.DOTALL)
INLINE_CODE_RE = re.compile(r"`([^`\n]+)`")
INTERNAL_RE = re.compile(r"\bissues? #\d+|\bSTYLE\.md\b|\bDESIGN\.md\b|/work/", re.IGNORECASE)
BEGIN, END = "<!-- config-reference:begin -->", "<!-- config-reference:end -->"


# ---- reading pages ---------------------------------------------------------------------------------------------
def code_spans(text: str) -> list[str]:
    """The code of a markdown page: each fenced block's body and each inline `code` span outside them."""
    fenced = FENCE_RE.findall(text)
    return fenced + INLINE_CODE_RE.findall(FENCE_RE.sub("", text))


def named_paths(text: str) -> set[str]:
    """The repository paths a page names in code: ``pipeline/losses.py``, ``configs/*.yaml``, ``Makefile``."""
    out = set()
    for span in code_spans(text):
        out |= {m.rstrip(".,:;") for m in PATH_RE.findall(span)}
        if span.strip() in TOP_LEVEL:
            out.add(span.strip())
    return out


def missing_paths(text: str, root: Path = ROOT) -> list[str]:
    """The named paths that do not exist under ``root`` (a glob must match at least one file)."""
    return sorted(p for p in named_paths(text)
                  if not (any(root.glob(p)) if "*" in p else (root / p).exists()))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading's anchor on a page (headings inside fenced code are not headings); repeats get -1, -2, …"""
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE_RE.sub("", text).splitlines():
        if m := re.match(r"#{1,6}\s+(.*)", line):
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def broken_links(text: str, page: Path) -> list[str]:
    """Relative links of ``page`` whose file does not exist, or whose #anchor is no heading of that file."""
    out = []
    for target in LINK_RE.findall(FENCE_RE.sub("", text)):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        if not file:  # an anchor on this page
            if anchor not in anchors(text):
                out.append(f"{target}: no heading with that anchor on this page")
            continue
        path = (page.parent / file).resolve()
        if not path.exists():
            out.append(f"{target}: no such file")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path.read_text(encoding="utf-8")):
            out.append(f"{target}: no heading with that anchor in {path.name}")
    return out


def summary_stages(readme: str) -> list[str]:
    """The stage names of README's sample summary: the lines under ``stage times:`` up to ``total``."""
    block = next((b for b in FENCE_RE.findall(readme) if "distil: pipeline finished" in b), None)
    if block is None:
        return []
    lines = block.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "stage times:")
    names = []
    for line in lines[start + 1:]:
        name = line.split()[0] if line.split() else ""
        if name == "total" or not name:
            break
        names.append(name)
    return names


# ---- the config reference ----------------------------------------------------------------------------------------
def _field_comments(cls: type) -> dict[str, str]:
    """Each field's comment in ``cls``'s source: trailing on its lines, or the comment-only lines right above it."""
    source = textwrap.dedent(inspect.getsource(cls))
    comments, code = {}, set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            code.update(range(tok.start[0], tok.end[0] + 1))
    out = {}
    for node in ast.parse(source).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            above, n = [], node.lineno - 1
            while n in comments and n not in code:
                above.insert(0, comments[n])
                n -= 1
            trailing = [comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments and n in code]
            out[node.target.id] = " ".join(above + trailing)
    return out


def _shown(value) -> str:
    if isinstance(value, str):
        return value if value else '""'
    if isinstance(value, (bool, list, dict)) or value is None:
        return json.dumps(value)
    return repr(value)


def _cell(text: str) -> str:
    """Text for a table cell: ``|`` escaped, and ``<`` so that ``<root>/<name>`` is not read as an HTML tag."""
    return text.replace("|", "\\|").replace("<", "&lt;")


def config_reference() -> str:
    """The reference block of docs/configuration.md, from the typed config: per section its docstring, then each
    field's dotted name, default and comment."""
    from pipeline.config import RunConfig

    lines = []
    for section in dataclasses.fields(RunConfig):
        cls = section.default_factory
        doc = " ".join(inspect.getdoc(cls).split())
        lines += [f"### `{section.name}`", "", f"{cls.__name__}: {_cell(doc)}", "",
                  "| field | default | meaning |", "|---|---|---|"]
        comments = _field_comments(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            shown = _shown(default).replace("|", "\\|")
            lines.append(f"| `{section.name}.{f.name}` | `{shown}` | {_cell(comments.get(f.name, ''))} |")
        lines.append("")
    return "\n".join(lines).rstrip("\n")


def reference_block(text: str) -> str | None:
    if BEGIN not in text or END not in text:
        return None
    return text[text.index(BEGIN) + len(BEGIN):text.index(END)].strip("\n")


def write_reference() -> None:
    """Regenerate docs/configuration.md's reference block from the code."""
    text = CONFIG_PAGE.read_text(encoding="utf-8")
    assert reference_block(text) is not None, f"{CONFIG_PAGE} has no {BEGIN} … {END} block"
    text = text[:text.index(BEGIN) + len(BEGIN)] + "\n" + config_reference() + "\n" + text[text.index(END):]
    CONFIG_PAGE.write_text(text, encoding="utf-8")


# ---- the checks ---------------------------------------------------------------------------------------------------
def test_configuration_names_every_section_and_field():
    from pipeline.config import RunConfig

    text = CONFIG_PAGE.read_text(encoding="utf-8")
    headings = [line for line in text.splitlines() if line.startswith("#")]
    missing = []
    for section in dataclasses.fields(RunConfig):
        if not any(f"`{section.name}`" in h for h in headings):
            missing.append(f"section {section.name} (a heading naming `{section.name}`)")
        missing += [f"field `{section.name}.{f.name}`" for f in dataclasses.fields(section.default_factory)
                    if f"`{section.name}.{f.name}`" not in text]
    assert not missing, f"{CONFIG_PAGE.name} does not name: " + ", ".join(missing)


def test_the_configuration_reference_is_what_the_code_says():
    block = reference_block(CONFIG_PAGE.read_text(encoding="utf-8"))
    assert block is not None, f"{CONFIG_PAGE.name} has lost its {BEGIN} … {END} block"
    assert block == config_reference(), ("docs/configuration.md's reference is stale: run "
                                         "`python tests/test_docs.py --write` and read the diff")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_path_a_page_names_exists(page):
    missing = missing_paths(page.read_text(encoding="utf-8"))
    assert not missing, f"{page.relative_to(ROOT)} names paths that do not exist: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_link_leads_somewhere(page):
    broken = broken_links(page.read_text(encoding="utf-8"), page)
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_page_cites_tickets_or_files_outside_the_repository(page):
    found = INTERNAL_RE.findall(page.read_text(encoding="utf-8"))
    assert not found, f"{page.relative_to(ROOT)} cites {found}: cite papers and public issues (owner/repo#N)"


def test_the_readme_links_every_docs_page():
    readme = README.read_text(encoding="utf-8")
    linked = {t.partition("#")[0] for t in LINK_RE.findall(readme)}
    unlinked = [p.name for p in sorted(DOCS.glob("*.md")) if f"docs/{p.name}" not in linked]
    assert not unlinked, f"README.md does not link {unlinked}"


def test_the_readme_is_a_front_door():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= MAX_README_LINES, (f"README.md has {lines} lines (at most {MAX_README_LINES}): "
                                       "move reference material to docs/")


def test_the_readme_summary_lists_the_stages_the_pipeline_runs():
    from pipeline.stages import ORDER

    assert summary_stages(README.read_text(encoding="utf-8")) == list(ORDER)


# ---- the checkers fail on bad pages --------------------------------------------------------------------------------
def test_the_path_check_sees_paths_in_inline_and_fenced_code(tmp_path):
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "pipeline" / "losses.py").write_text("")
    (tmp_path / "Makefile").write_text("")
    page = ("`pipeline/losses.py` and `pipeline/gone.py`, `Makefile`, `README.md`, pipeline/prose.py, "
            "`configs/*.yaml`\n```bash\npython jobs/run.py --config configs/x.yaml\n```\n")
    assert missing_paths(page, tmp_path) == ["README.md", "configs/*.yaml", "configs/x.yaml", "jobs/run.py",
                                             "pipeline/gone.py"]


def test_the_link_check_sees_missing_files_and_anchors(tmp_path):
    (tmp_path / "a.md").write_text("# Ray's token\n\n```bash\n# not a heading\n```\n## Twice\n## Twice\n")
    page = tmp_path / "b.md"
    text = ("[ok](a.md#rays-token) [ok](a.md#twice-1) [gone](c.md) [bad](a.md#not-a-heading) "
            "[web](https://example.com/x#y) [self](#here) [self](#gone)\n# Here\n")
    assert broken_links(text, page) == ["c.md: no such file", "a.md#not-a-heading: no heading with that anchor in a.md",
                                        "#gone: no heading with that anchor on this page"]


def test_the_summary_check_reads_the_stage_lines():
    readme = "```\ndistil: pipeline finished\n  stage times:\n    prepare   … s\n    register  … s\n    total  … s\n```\n"
    assert summary_stages(readme) == ["prepare", "register"]
    assert summary_stages("no summary here") == []


def test_the_internal_reference_check():
    assert INTERNAL_RE.findall("see issue #16 and STYLE.md") and not INTERNAL_RE.findall("ray-project/ray#66085")


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        sys.path.insert(0, str(ROOT))
        write_reference()
        print(f"wrote the reference block of {CONFIG_PAGE.relative_to(ROOT)}")
    else:
        sys.exit("usage: python tests/test_docs.py --write   (regenerates docs/configuration.md's reference block)")
