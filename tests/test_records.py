"""The typed records stages hand each other: JSON round trips, earlier runs' records, other versions' records."""

import json
from pathlib import Path

import pytest

from pipeline import records
from pipeline.stages import store
from pipeline.config import load_config
from pipeline.records import Candidate, Manifest, RecordError, SplitInfo, TeacherRecord, TrainRecord, WorkerConfig

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def _manifest() -> Manifest:
    split = SplitInfo(path="/d/train", num_sequences=10, num_tokens=900)
    return Manifest(key="k", path="/d", sources=[{"format": "text", "names": ["a"], "files": ["/a"]}], tokenizer="t",
                    vocab_hash="h", vocab_size=30, max_seq_len=128, counts={"docs": 3}, file_counts={"/a": {"docs": 3}},
                    token_counts=[0, 1], splits={"train": split, "val": SplitInfo(path="/d/val", num_sequences=0, num_tokens=0)})


@pytest.mark.parametrize("record", [
    records.PrepareRecord(manifest=_manifest(), seconds=1.5),
    TrainRecord(candidates=(Candidate(source="distill", checkpoint="/c", metrics={"val/mlm_loss": 6.0}),
                            Candidate(source="sweep trial t1 {}", checkpoint="s3://b/c", metrics={}, overrides={"loss.temperature": 4.0})),
                seconds=2.0, name="n", manifest_key="k"),
    TeacherRecord(teacher_uri="/t/hf_model", metrics={"val/mlm_acc": 0.2}, seconds=3.0, checkpoint="/t", name="n"),
    WorkerConfig(cfg={"run": {"name": "x"}}, task="distill", teacher_uri="/t", replicated_data=True),
])
def test_a_record_survives_json_and_reads_as_the_same_typed_value(record):
    text = json.dumps(record.to_dict())
    back = type(record).from_dict(json.loads(text))
    assert back == record and json.loads(text)["record_version"] == records.VERSION


def test_nested_records_come_back_typed():
    back = records.PrepareRecord.from_dict(records.PrepareRecord(manifest=_manifest(), seconds=1.0).to_dict())
    assert isinstance(back.manifest, Manifest) and isinstance(back.manifest.splits["train"], SplitInfo)
    assert back.manifest.rows("train") == 10 and back.manifest.rows("val") == 0 and back.manifest.rows("test") == 0


def test_a_record_an_earlier_run_wrote_without_a_version_still_reads():
    """What a resubmitted job finds from a run before records were typed: the same fields, no "record_version"."""
    old = {"candidates": [{"source": "distill", "checkpoint": "/c", "metrics": {"val/mlm_loss": 6.0}, "run_id": "r"}],
           "seconds": 12.0, "name": "tiny-distill-0123abcd", "manifest_key": "k"}
    rec = TrainRecord.from_dict(old)
    assert rec.candidates[0].run_id == "r" and rec.candidates[0].model_dir is None and not rec.skipped


@pytest.mark.parametrize("raw,match", [
    ({"teacher_uri": "/t", "metrics": {}, "seconds": 0.0, "record_version": 2}, r"record version 2; this distil reads version 1"),
    ({"teacher_uri": "/t", "metrics": {}}, r"missing \['seconds'\]"),
    ({"teacher_uri": "/t", "metrics": {}, "seconds": 0.0, "teacher_kind": "x"}, r"unknown field\(s\) \['teacher_kind'\]"),
    ([1, 2], "not a JSON object"),
])
def test_a_record_of_another_shape_is_one_clear_error(raw, match):
    with pytest.raises(RecordError, match=match):
        TeacherRecord.from_dict(raw)


def test_a_later_stage_names_the_file_of_another_versions_record_and_says_how_to_go_on(tmp_path):
    cfg = load_config(CONFIG, [f"run.root={tmp_path}"])
    path = Path(store.record_path(cfg, "teacher"))
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"teacher_uri": "/t", "metrics": {}, "seconds": 0.0, "record_version": 7}))
    with pytest.raises(ValueError) as e:
        store.read_record(cfg, "teacher", needed_by="distill")
    assert str(path) in str(e.value) and "record version 7" in str(e.value)
    assert f"delete {path} to run the teacher stage again" in str(e.value)


def test_a_finished_stage_of_another_version_runs_again(tmp_path, capsys):
    cfg = load_config(CONFIG, [f"run.root={tmp_path}"])
    path = Path(store.record_path(cfg, "distill"))
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"candidates": [], "seconds": 1.0, "name": "n", "manifest_key": "k", "record_version": 0}))
    assert store.finished(cfg, "distill", name="n", manifest_key="k") is None
    assert "record version 0" in capsys.readouterr().out


def test_a_registered_models_version_is_a_field_of_its_own_not_the_record_version():
    reg = records.RegisterRecord(name="m", version="3", aliases=["champion"], new=True, uri="models:/m@champion",
                                 chosen=Candidate(source="distill", checkpoint="/c", metrics={}), seconds=1.0)
    raw = json.loads(json.dumps(reg.to_dict()))
    assert raw["version"] == "3" and raw["record_version"] == records.VERSION
    assert records.RegisterRecord.from_dict(raw) == reg
    old = {k: v for k, v in raw.items() if k != "record_version"}  # a register.json from before: version "3" only
    assert records.RegisterRecord.from_dict(old).version == "3"
