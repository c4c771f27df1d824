"""The task distillation stage in the shared end-to-end run (configs/tiny.yaml: Rotten Tomatoes, one seed): Table 2
in the record, the stage's run and the summary; the registered task model classifies text with the task's label
names, and the export stage gates and serves its ONNX Runtime variants; a resubmitted stage reruns only the unit
whose result is missing."""

import json
import subprocess
import sys

from conftest import E2E_OVERRIDES, ROOT


def _mlflow(e2e_run):
    import mlflow

    mlflow.set_tracking_uri(e2e_run["tracking_uri"])
    return mlflow


def test_table2_holds_the_teacher_and_both_students_and_the_summary_prints_it(e2e_run):
    rec = e2e_run["records"]["task_distill"]
    table = rec["tasks"]["rotten_tomatoes"]
    assert [r["model"] for r in table["rows"]] == ["teacher", "ce", "kd"]
    teacher, ce, kd = table["rows"]
    assert teacher["what"] == "teacher (fine-tuned here)" and table["teacher"]["fine_tuned"]
    assert ce["params"] == kd["params"] < teacher["params"]
    for row in table["rows"]:
        assert 0.0 <= row["min"] <= row["median"] <= row["max"] <= 1.0 and row["latency_ms"] > 0
        want = None if teacher["at_chance"] else 100.0 * row["median"] / teacher["median"]
        assert row["retention"] == want or abs(row["retention"] - want) < 1e-9
    assert table["best_kd"]["score"] == kd["max"]
    assert "Table 2, rotten_tomatoes" in e2e_run["stdout"] and "student, task-distilled" in e2e_run["stdout"]
    assert f"task model for rotten_tomatoes: {table['registered']['student']['uri']}" in e2e_run["stdout"]
    mlflow = _mlflow(e2e_run)
    run = mlflow.search_runs(experiment_names=["distil-tiny"], filter_string="tags.stage = 'task_distill'",
                             order_by=["attributes.start_time ASC"], output_format="list")[0]
    files = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "task_distill")}
    assert files == {"task_distill/table2.md", "task_distill/table2.json", "task_distill/table2.png"}


def test_the_loss_settings_are_searched_and_the_students_train_with_the_best(e2e_run):
    rec = e2e_run["records"]["task_distill"]
    table = rec["tasks"]["rotten_tomatoes"]
    search = table["search"]
    assert sorted(t["settings"]["temperature"] for t in search["trials"]) == [1.0, 4.0]  # the grid, one trial each
    assert search["trials"][0]["score"] >= search["trials"][1]["score"] and search["seed"] == 0
    assert table["settings"] == {"temperature": search["trials"][0]["settings"]["temperature"], "alpha_kd": 0.5,
                                 "alpha_ce": 0.5, "alpha_cos": 0.0}
    # The kd student of seed 0 is the best trial's run again (same seed, data and settings): the same dev score.
    # A student trained with the config's T (2) or the other trial's would not reproduce it.
    assert table["best_kd"]["seed"] == 0 and table["best_kd"]["score"] == search["trials"][0]["score"]
    assert "Loss settings searched on rotten_tomatoes (seed 0, 2 points" in rec["markdown"]
    version = _mlflow(e2e_run).MlflowClient().get_model_version(table["registered"]["student"]["name"],
                                                                 table["registered"]["student"]["version"])
    assert json.loads(version.tags["distil.settings"])["temperature"] == search["best"]["temperature"]
    storage = e2e_run["root"] / "e2e" / "ray"
    assert not list(storage.glob(f"{rec['name']}-search-rotten_tomatoes-*/checkpoint_*"))  # a point's score is its result


def test_the_registered_task_model_classifies_text_with_the_tasks_label_names(e2e_run):
    mlflow = _mlflow(e2e_run)
    reg = e2e_run["records"]["task_distill"]["tasks"]["rotten_tomatoes"]["registered"]
    assert reg["student"]["name"] == "e2e-student-rotten_tomatoes" and reg["student"]["aliases"] == ["champion"]
    classify = mlflow.transformers.load_model(reg["student"]["uri"])
    answers = classify(["a warm and funny film", "dull from start to end"])
    assert {a["label"] for a in answers} <= {"rotten", "fresh"} and all(0 < a["score"] <= 1 for a in answers)
    version = mlflow.MlflowClient().get_model_version(reg["student"]["name"], reg["student"]["version"])
    assert version.tags["distil.task"] == "rotten_tomatoes"
    assert version.tags["distil.general_student"] == e2e_run["records"]["register"]["version_uri"]
    assert "fine-tuned on rotten_tomatoes" in version.tags["distil.teacher"]
    assert "Table 2, rotten_tomatoes" in version.description
    assert reg["teacher"]["name"] == "e2e-student-rotten_tomatoes-teacher"  # the teacher fine-tuned here, to compare


def test_a_resubmitted_stage_reruns_only_the_unit_that_did_not_finish(e2e_run):
    rec = e2e_run["records"]["task_distill"]
    stage_dir = e2e_run["root"] / "e2e" / "task_distill" / rec["name"]
    (stage_dir / f"{rec['name']}-ce-rotten_tomatoes-s0.json").unlink()  # as if the job died while this unit ran
    record = e2e_run["root"] / "e2e" / "stages" / "task_distill.json"
    saved = record.read_text()
    record.unlink()
    cmd = [sys.executable, "-m", "jobs.distill_task", "--config", "configs/tiny.yaml", "--set", f"run.root={e2e_run['root']}"]
    for o in E2E_OVERRIDES:
        cmd += ["--set", o]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=e2e_run["env"])
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
        out = proc.stdout + proc.stderr
        assert "task_distill: 1 fine-tuning units (1 finished earlier)" in out  # the teacher
        assert "task_distill: 2 fine-tuning units (1 finished earlier)" in out  # ce reruns, kd does not
        assert "searching the loss settings" not in out and "the search's best loss settings" in out  # read, not rerun
        again = json.loads(record.read_text())
        first = rec["tasks"]["rotten_tomatoes"]
        assert again["tasks"]["rotten_tomatoes"]["best_kd"] == first["best_kd"]
        assert again["tasks"]["rotten_tomatoes"]["registered"]["student"]["version"] == first["registered"]["student"]["version"]
        assert again["tasks"]["rotten_tomatoes"]["registered"]["student"]["new"] is False  # the same checkpoint: reused
    finally:
        record.write_text(saved)


def test_the_task_model_is_exported_gated_on_its_dev_score_and_served_as_text(e2e_run):
    rec = e2e_run["records"]["export"]["tasks"]["rotten_tomatoes"]
    table = e2e_run["records"]["task_distill"]["tasks"]["rotten_tomatoes"]
    assert rec["key"] == table["best_kd"]["model_dir"]
    assert [v["format"] for v in rec["variants"]] == ["onnx", "onnx-int8"]
    fp32, int8 = rec["variants"]
    assert fp32["max_abs_diff"] <= 1e-3 and abs(fp32["drop"] - 100 * (rec["reference"]["score"] - fp32["score"])) < 1e-9
    # the same dev set and model, scored in the worker's loop then here (a near-tie may flip an example or two)
    assert abs(rec["reference"]["score"] - table["best_kd"]["score"]) <= 2 / 400
    for v in rec["variants"]:
        assert v["passed"] == (v["drop"] <= 1.0) and (v["registered"] is not None) == v["passed"]
    mlflow = _mlflow(e2e_run)
    served = mlflow.pyfunc.load_model("models:/e2e-student-rotten_tomatoes-onnx@champion")
    answers = served.predict(["a warm and funny film", "dull from start to end"])
    assert {a["label"] for a in answers} <= {"rotten", "fresh"}
    assert "served rotten_tomatoes model: models:/e2e-student-rotten_tomatoes-onnx/" in e2e_run["stdout"]
