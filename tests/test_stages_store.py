"""When a resubmitted job skips a stage: same settings, same prepared corpus, checkpoints still there."""

import json
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.stages import store, training

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def _finished_distill(tmp_path, *overrides):
    """A config, and the record a distill stage that finished under it would have left (checkpoint included)."""
    cfg = load_config(CONFIG, [f"run.root={tmp_path}", *overrides])
    name = training.run_name(cfg, "distill", training.TRAIN_SECTIONS, extra="teacher-uri")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir(exist_ok=True)
    (ckpt / "train_state.json").write_text(json.dumps({"step": 60}))
    record = {"candidates": [{"source": "distill", "checkpoint": str(ckpt), "metrics": {}}], "name": name,
              "manifest_key": "k1", "seconds": 1.0}
    path = Path(store.record_path(cfg, "distill"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))
    return cfg, name, ckpt


def test_a_stage_that_finished_with_the_same_settings_is_skipped(tmp_path, capsys):
    cfg, name, _ = _finished_distill(tmp_path)
    earlier = store.finished(cfg, "distill", name=name, manifest_key="k1")
    assert earlier.skipped and earlier.name == name
    assert "distill: finished earlier with these settings" in capsys.readouterr().out


def test_a_changed_setting_a_changed_corpus_or_a_lost_checkpoint_runs_the_stage_again(tmp_path, capsys):
    cfg, name, ckpt = _finished_distill(tmp_path)
    changed = load_config(CONFIG, [f"run.root={tmp_path}", "loss.temperature=4.0"])
    new_name = training.run_name(changed, "distill", training.TRAIN_SECTIONS, extra="teacher-uri")
    assert new_name != name
    assert store.finished(changed, "distill", name=new_name, manifest_key="k1") is None
    assert store.finished(cfg, "distill", name=name, manifest_key="k2") is None, "re-prepared corpus"
    (ckpt / "train_state.json").unlink()
    assert store.finished(cfg, "distill", name=name, manifest_key="k1") is None
    assert "names checkpoints that are gone" in capsys.readouterr().out


def test_a_damaged_record_or_checkpoint_state_runs_the_stage_again_without_a_traceback(tmp_path, capsys):
    cfg, name, ckpt = _finished_distill(tmp_path)
    (ckpt / "train_state.json").write_text('{"step": 6')  # cut off mid-write
    assert store.finished(cfg, "distill", name=name, manifest_key="k1") is None
    assert "gone or damaged" in capsys.readouterr().out
    record = Path(store.record_path(cfg, "distill"))
    record.write_text(record.read_text()[:40])
    assert store.finished(cfg, "distill", name=name, manifest_key="k1") is None
    out = capsys.readouterr().out
    assert "distill.json is damaged" in out and "running the stage again" in out


def test_a_damaged_record_that_a_later_stage_needs_is_one_clear_error(tmp_path):
    import pytest

    cfg, _, _ = _finished_distill(tmp_path)
    Path(store.record_path(cfg, "prepare")).write_text("[1, 2")
    with pytest.raises(ValueError, match=r"prepare.json is damaged .*delete it"):
        store.read_record(cfg, "prepare", needed_by="distill")


def _input_records() -> dict:
    """A record each of the stages that others read (their content is not what require_inputs checks)."""
    from pipeline.records import Manifest, PrepareRecord, SplitInfo, TeacherRecord

    split = SplitInfo(path="/d/train", num_sequences=10, num_tokens=900)
    manifest = Manifest(key="k", path="/d", sources=[], tokenizer="t", vocab_hash="h", vocab_size=30, max_seq_len=128,
                        counts={}, file_counts={}, token_counts=[0, 1], splits={"train": split})
    return {"prepare": PrepareRecord(manifest=manifest, seconds=1.0),
            "teacher": TeacherRecord(teacher_uri="/t/hf_model", metrics={}, seconds=0.0)}


def test_each_training_stage_requires_each_record_it_reads(tmp_path):
    """store.require_inputs: the prepare record for the teacher; prepare and teacher for distill and sweep. Each
    record a stage reads is removed in turn, the others in place: the error names that one; with all in place, none."""
    from pipeline.config import RunConfig

    cfg = RunConfig().with_overrides({"run.root": str(tmp_path)})
    needs = {"teacher": ("prepare",), "distill": ("prepare", "teacher"), "sweep": ("prepare", "teacher")}
    assert store.INPUTS == needs
    records = _input_records()
    for stage, inputs in needs.items():
        for missing in inputs:
            for name, record in records.items():
                store.write_record(cfg, name, record)
            Path(store.record_path(cfg, missing)).unlink()
            with pytest.raises(ValueError, match=f"the {stage} stage needs the {missing} stage's output"):
                store.require_inputs(cfg, stage)
        for name, record in records.items():
            store.write_record(cfg, name, record)
        store.require_inputs(cfg, stage)  # everything it reads is there
    for name in records:
        Path(store.record_path(cfg, name)).unlink()
    store.require_inputs(cfg, "prepare")  # nothing before it
