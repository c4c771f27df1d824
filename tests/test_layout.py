"""The house's rooms stay findable (docs/testing.md, docs/architecture.md): a test file is named after the place
it tests, so that a module's tests are found by its name."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Test files about the whole system rather than one place: what each covers is in docs/testing.md.
SUBJECTS = {"e2e", "e2e_roberta", "e2e_gpt2", "multinode", "layering", "layout", "docstrings", "docs", "install"}


def place(stem: str) -> str | None:
    """The place a test file's name points at: ``test_corpus_prepare`` → pipeline/corpus/prepare.py, the longest
    prefix of its words that names a module or package of pipeline/, a benchmark or a folder of the repository
    (``test_losses_fused`` → pipeline/losses.py, ``test_cluster_kuberay`` → cluster/kuberay); None if nothing."""
    words = stem.removeprefix("test_").split("_")
    for n in range(len(words), 0, -1):
        for base in (ROOT / "pipeline", ROOT / "benchmarks", ROOT):
            for sep in ("/", "_"):  # a module of a package (corpus/prepare) or a name with underscores (paper_tables)
                path = base / sep.join(words[:n])
                for candidate in (path.with_suffix(".py"), path):
                    if candidate.exists() and candidate != ROOT / "tests":
                        return str(candidate.relative_to(ROOT))
    return None


def test_every_test_file_is_named_after_the_place_it_tests():
    unplaced = [p.name for p in sorted((ROOT / "tests").glob("test_*.py"))
                if p.stem.removeprefix("test_") not in SUBJECTS and place(p.stem) is None]
    assert not unplaced, (f"name these test files after the module they test (test_<package>_<module>.py, e.g. "
                          f"test_corpus_prepare.py), or add a whole-system subject to SUBJECTS: {unplaced}")


def test_the_place_rule_finds_modules_packages_and_benchmarks():
    assert place("test_corpus_prepare") == "pipeline/corpus/prepare.py"
    assert place("test_losses_fused") == "pipeline/losses.py"
    assert place("test_evaluate") == "pipeline/evaluate"
    assert place("test_paper_tables") == "benchmarks/paper_tables.py"
    assert place("test_cluster_kuberay") == "cluster/kuberay"
    assert place("test_issue_27") is None
