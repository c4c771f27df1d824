"""The stage records on disk and the resubmit skip.

Each stage writes its record to ``<run.root>/<run.name>/stages/<stage>.json`` (the typed dataclasses of
pipeline/records.py); a later stage reads the records it needs with :func:`read_record`, and a job checks them
with :func:`require_inputs` before it starts Ray. :func:`finished` is the skip: the stage's record when it
finished earlier with the same settings, on the same prepared corpus, its checkpoints still in place.
"""

from __future__ import annotations

import dataclasses
import os

from pipeline import checkpoint as checkpoint_lib
from pipeline import storage
from pipeline.config import RunConfig
from pipeline.records import (
    EvaluateRecord,
    ExportRecord,
    PrepareRecord,
    Record,
    RecordError,
    RegisterRecord,
    TaskDistillRecord,
    TeacherRecord,
    TrainRecord,
)

RECORDS: dict[str, type[Record]] = {"prepare": PrepareRecord, "teacher": TeacherRecord, "distill": TrainRecord,
                                    "sweep": TrainRecord, "evaluate": EvaluateRecord, "register": RegisterRecord,
                                    "task_distill": TaskDistillRecord, "export": ExportRecord}


def record_path(cfg: RunConfig, stage: str) -> str:
    """Where ``stage`` writes its record: ``<run.root>/<run.name>/stages/<stage>.json``."""
    return os.path.join(cfg.run_dir, "stages", f"{stage}.json")


def load_record(cfg: RunConfig, stage: str) -> Record | None:
    """The stage's record, or None when it never ran. Raises ``storage.DamagedFile`` (not JSON) and
    ``RecordError`` (another version's record), both ValueErrors naming the file."""
    path = record_path(cfg, stage)
    raw = storage.read_json(path)
    if raw is None:
        return None
    try:
        return RECORDS[stage].from_dict(raw, where=path)
    except RecordError as e:
        raise RecordError(f"{e}: delete {path} to run the {stage} stage again") from None


def read_record(cfg: RunConfig, stage: str, *, needed_by: str) -> Record:
    """The record a later stage needs; one clear ValueError when it is missing, damaged or from another version."""
    record = load_record(cfg, stage)
    if record is None:
        raise ValueError(
            f"the {needed_by} stage needs the {stage} stage's output, and {record_path(cfg, stage)} does not exist: "
            f"run `python -m jobs.{stage} --config <the same config>` first, or `python -m jobs.pipeline`"
        )
    return record


# What each training stage reads from the stages before it: checked by its job before Ray starts.
INPUTS = {"teacher": ("prepare",), "distill": ("prepare", "teacher"), "sweep": ("prepare", "teacher")}


def require_inputs(cfg: RunConfig, stage: str) -> None:
    """Raise :func:`read_record`'s one-line ValueError when a record ``stage`` needs is missing (jobs call this
    before they start Ray, so a stage run out of order costs no cluster start)."""
    for earlier in INPUTS.get(stage, ()):
        read_record(cfg, earlier, needed_by=stage)


def write_record(cfg: RunConfig, stage: str, record: Record) -> Record:
    """Write ``record`` as the stage's JSON record (atomically: pipeline/storage.py) and return it."""
    storage.write_json(record_path(cfg, stage), record.to_dict())
    return record


def finished(cfg: RunConfig, stage: str, *, name: str, manifest_key: str) -> Record | None:
    """The stage's record if it finished earlier under this Ray Train/Tune name (same settings), on the same
    prepared corpus, and its checkpoints are still there; the caller then skips the stage."""
    path = record_path(cfg, stage)
    try:
        record = load_record(cfg, stage)
    except ValueError as e:  # damaged, or written by another version: the stage runs again
        print(f"[distil] {stage}: {e}; running the stage again", flush=True)
        return None
    if record is None or record.name != name or record.manifest_key != manifest_key:
        return None
    ckpts = [record.checkpoint] if isinstance(record, TeacherRecord) else [c.checkpoint for c in record.candidates]
    missing = [c for c in ckpts if _checkpoint_gone(c)]
    if missing:
        print(f"[distil] {stage}: the record {path} names checkpoints that are gone or damaged ({missing[0]}): running "
              "the stage again", flush=True)
        return None
    print(f"[distil] {stage}: finished earlier with these settings ({path}); skipped. Delete that file to run it again.", flush=True)
    return dataclasses.replace(record, skipped=True)


def _checkpoint_gone(uri: str | None) -> bool:
    try:
        return uri is None or storage.read_json(storage.join(uri, checkpoint_lib.STATE_FILE)) is None
    except storage.DamagedFile:
        return True


def optional(cfg: RunConfig, stage: str) -> Record | None:
    """An earlier stage's record for lineage: None when absent, damaged or from another version."""
    try:
        return load_record(cfg, stage)
    except ValueError:
        return None
