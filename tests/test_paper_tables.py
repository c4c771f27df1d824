"""benchmarks/paper_tables.py: its code path on tiny models (--smoke), the tables it writes and their arithmetic."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper")
    proc = subprocess.run([sys.executable, "benchmarks/paper_tables.py", "--smoke", "--set", f"run.root={root}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    out = json.loads((root / "paper-smoke" / "paper-tables.json").read_text())
    return {"root": root, "out": out, "md": (root / "paper-smoke" / "paper-tables.md").read_text(), "stdout": proc.stdout}


def test_every_student_is_its_own_pipeline_run_at_one_budget(smoke):
    root = smoke["root"]
    for key in ("distilled", "no_ce", "no_cos", "no_mlm", "random_init", "mlm_only"):
        record = json.loads((root / f"paper-smoke-{key}" / "stages" / "distill.json").read_text())
        assert record["candidates"][0]["metrics"]["step"] == smoke["out"]["settings"]["optim.max_steps"]
        teacher = json.loads((root / f"paper-smoke-{key}" / "stages" / "teacher.json").read_text())
        assert teacher["teacher_uri"] == smoke["out"]["teacher"]["uri"]  # every student distils from the one teacher


def test_table1_has_the_teacher_the_student_and_three_controls(smoke):
    t1 = {r["model"]: r for r in smoke["out"]["tables"]["table1"]}
    assert set(t1) == {"teacher", "distilled", "mlm_only", "untrained", "tfidf_logreg"}
    tasks = smoke["out"]["tables"]["tasks"]
    at_chance = smoke["out"]["tables"]["teacher_at_chance"]
    for r in t1.values():
        assert r["macro"] == pytest.approx(sum(r[t] for t in tasks) / len(tasks), abs=0.011)
        if at_chance:  # a ratio of two chance scores says nothing: withheld, and the markdown says why
            assert r["retention_pct"] is None
        else:
            assert r["retention_pct"] == pytest.approx(100 * r["macro"] / t1["teacher"]["macro"], abs=0.06)
    assert ("not judged (the teacher scores at chance)" in smoke["md"]) == at_chance
    assert smoke["out"]["verdicts"]["retention_ge_95"] is None if at_chance else isinstance(
        smoke["out"]["verdicts"]["retention_ge_95"], bool)
    assert t1["tfidf_logreg"]["macro"] > 0  # scikit-learn's pipeline was fitted and scored


def test_table4_is_relative_to_the_distilled_student_with_the_papers_numbers(smoke):
    t4 = {r["model"]: r for r in smoke["out"]["tables"]["table4"]}
    assert t4["distilled"]["delta_macro"] == 0
    for key, paper in {"no_ce": -2.96, "no_cos": -1.46, "no_mlm": -0.31, "random_init": -3.69}.items():
        assert t4[key]["delta_macro"] == pytest.approx(t4[key]["macro"] - t4["distilled"]["macro"], abs=0.011)
        assert t4[key]["paper_delta"] == paper
        assert t4[key]["val_mlm_loss"] > 0


def test_table3_compares_teacher_and_student_and_the_markdown_holds_all_three(smoke):
    rows = smoke["out"]["tables"]["table3"]["rows"]
    student = next(r for r in rows if not r["is_teacher"])
    assert 0 < student["params_ratio"] < 1
    md = smoke["md"]
    assert "**Table 1 (retention)**" in md and "**Table 3 (size and speed)**" in md and "**Table 4 (ablation)**" in md
    assert md in smoke["stdout"]


def test_a_second_run_skips_every_finished_stage(smoke):
    proc = subprocess.run([sys.executable, "benchmarks/paper_tables.py", "--smoke", "--set", f"run.root={smoke['root']}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert proc.stdout.count("finished earlier") >= 1 + 6 + 1  # the teacher, six distill runs, the evaluation
    again = json.loads((smoke["root"] / "paper-smoke" / "paper-tables.json").read_text())
    assert again["tables"]["table1"] == smoke["out"]["tables"]["table1"]


def test_bad_input_stops_before_any_work(tmp_path):
    proc = subprocess.run([sys.executable, "benchmarks/paper_tables.py", "--config", "configs/teacher-minilm.yaml",
                           "--set", "loss.alpha_cos=-1", "--set", f"run.root={tmp_path}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "loss alphas" in proc.stderr
    assert not any(tmp_path.iterdir())
