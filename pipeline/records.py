"""The records stages hand each other, as small frozen dataclasses written as JSON.

One module owns them (docs/architecture.md: typed records): the prepared corpus's :class:`Manifest`, one record per
stage (:class:`PrepareRecord`, :class:`TeacherRecord`, :class:`TrainRecord` for distill and sweep,
:class:`RegisterRecord`), a :class:`Candidate` student, the sweep's :class:`SweepParent` and
:class:`TrialConfig`, the :class:`EvaluateRecord`, and the :class:`WorkerConfig` the driver passes to the Ray Train workers. Stage code reads attributes, never string keys.

On disk each record is plain JSON with a ``"record_version"`` field. ``from_dict`` reads this version and the
records written before versioning (same fields, no ``"record_version"``); a record with another version, a missing field or an
unknown one raises :class:`RecordError`, which names the file and says how to go on (run the stage again).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

VERSION = 1
VERSION_KEY = "record_version"  # not "version": a registered model's version is a field of RegisterRecord


class RecordError(ValueError):
    """A record this version of distil cannot read: damaged, or written by another version."""


class Record:
    """Base of every record: ``to_dict`` for JSON, ``from_dict`` strict (missing and unknown fields raise)."""

    def to_dict(self) -> dict:
        """Plain JSON-ready data, with the record version; nested records become dicts."""
        return {**_plain(self), VERSION_KEY: VERSION}

    @classmethod
    def from_dict(cls, raw: Any, *, where: str = "") -> typing.Self:
        """The record from its dict; raises :class:`RecordError` naming ``where`` (a file) for anything else."""
        what = f"{cls.__name__}{f' in {where}' if where else ''}"
        if not isinstance(raw, dict):
            raise RecordError(f"{what} is not a JSON object but {type(raw).__name__}")
        version = raw.get(VERSION_KEY, VERSION)  # written before records were versioned: the same fields
        if version != VERSION:
            raise RecordError(f"{what} was written by record version {version!r}; this distil reads version {VERSION}")
        return _build(cls, {k: v for k, v in raw.items() if k != VERSION_KEY}, what)


def _plain(value):
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _build(cls, raw: dict, what: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    missing = sorted(n for n, f in fields.items()
                     if n not in raw and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
    if unknown or missing:
        problems = ([f"unknown field(s) {unknown}"] if unknown else []) + ([f"missing {missing}"] if missing else [])
        raise RecordError(f"{what}: {' and '.join(problems)} (written by another version of distil?)")
    hints = typing.get_type_hints(cls)
    return cls(**{k: _typed(hints[k], v, f"{what}.{k}") for k, v in raw.items()})


def _typed(tp, value, what: str):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if isinstance(tp, type) and issubclass(tp, Record):
        if not isinstance(value, dict):
            raise RecordError(f"{what}: expected an object, got {type(value).__name__}")
        return _build(tp, value, what)
    if origin is tuple and isinstance(value, list) and args and isinstance(args[0], type) and issubclass(args[0], Record):
        return tuple(_typed(args[0], v, f"{what}[{i}]") for i, v in enumerate(value))
    if origin is dict and isinstance(value, dict) and len(args) == 2 and isinstance(args[1], type) and issubclass(args[1], Record):
        return {k: _typed(args[1], v, f"{what}.{k}") for k, v in value.items()}
    return value


# ---- the prepared corpus ---------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class SplitInfo(Record):
    """One prepared split ("train" or "val"): its parquet folder and size in packed rows and real tokens."""

    path: str  # the split's parquet folder, local or s3://
    num_sequences: int  # packed rows
    num_tokens: int  # real (non-pad) tokens


@dataclass(frozen=True, kw_only=True)
class Manifest(Record):
    """The prepare stage's output, also written as ``manifest.json`` beside the shards (the folder's cache key)."""

    key: str  # cache key over sources, vocabulary and packing settings
    path: str  # the prepared corpus's folder
    sources: list  # [{format, names, files}]
    tokenizer: str
    vocab_hash: str
    vocab_size: int
    max_seq_len: int  # tokens per packed row
    counts: dict[str, int]  # documents read, skipped, cut and rows dropped, by reason
    file_counts: dict[str, dict[str, int]]  # the same counts per input file
    token_counts: list[int]  # per vocabulary id, over the training split (frequency-smoothed masking)
    splits: dict[str, SplitInfo]  # "train", "val"
    cached: bool = False  # this call found the corpus prepared already

    def rows(self, split: str) -> int:
        """Packed rows in ``split`` (0 for a split that does not exist)."""
        info = self.splits.get(split)
        return info.num_sequences if info else 0


# ---- stage records ---------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class Candidate(Record):
    """A student the register stage may choose: where it is and how it scored."""

    source: str  # "distill", "sweep trial <id> {overrides}", "hand:checkpoint", "hand:model_dir"
    checkpoint: str  # the final checkpoint's URI (the registry's idempotency key)
    metrics: dict[str, float]  # namespaced: val/mlm_loss, loss/total, …
    run_id: str | None = None  # the MLflow run that trained it
    overrides: dict[str, Any] | None = None  # a sweep trial's sampled settings
    model_dir: str | None = None  # an exported HF folder; default: the checkpoint's hf_model/


@dataclass(frozen=True, kw_only=True)
class PrepareRecord(Record):
    """The prepare stage's record: the prepared corpus's manifest, the stage's wall time in seconds, and whether
    this call found the corpus prepared already (``skipped``)."""

    manifest: Manifest
    seconds: float
    skipped: bool = False


@dataclass(frozen=True, kw_only=True)
class TeacherRecord(Record):
    """The teacher stage's record: the teacher distillation loads, and, for a teacher this pipeline pre-trained,
    its held-out metrics, checkpoint, MLflow run and run name (a pretrained teacher has ``metrics`` {} and 0 s).
    ``seconds`` is the stage's wall time; ``skipped`` says it finished earlier with the same settings."""

    teacher_uri: str  # what distillation loads: a hub id, a folder, s3://, or the pre-trained teacher's hf_model/
    metrics: dict[str, float]
    seconds: float
    checkpoint: str | None = None  # only for a teacher this pipeline pre-trained
    run_id: str | None = None
    name: str | None = None  # the Ray Train run name (settings hash)
    manifest_key: str | None = None
    skipped: bool = False


@dataclass(frozen=True, kw_only=True)
class TrainRecord(Record):
    """The distill or sweep stage's record: its candidates, best first for a sweep."""

    candidates: tuple[Candidate, ...]
    seconds: float
    name: str  # the Ray Train run or Tune experiment name (settings hash)
    manifest_key: str
    skipped: bool = False


@dataclass(frozen=True, kw_only=True)
class RegisterRecord(Record):
    """The register stage's record: the MLflow registered model and version of the chosen candidate, its
    aliases and load URI, and the stage's wall time in seconds (:func:`pipeline.registry.register`)."""

    name: str  # registered model name
    version: str
    aliases: list[str]
    new: bool  # False when this checkpoint was registered before (nothing changed)
    uri: str  # models:/<name>@<alias> for a new version, models:/<name>/<version> for one registered before
    chosen: Candidate
    seconds: float
    version_uri: str | None = None  # models:/<name>/<version>, for a new version
    skipped: bool = False


@dataclass(frozen=True, kw_only=True)
class ExportRecord(Record):
    """The export stage's record: the model it exported, every variant's gate figures and registration, and the
    serving rows of Table 3 (pipeline/stages/export.py)."""

    source: str  # models:/<name>/<version> or a model folder
    key: str  # the source's checkpoint (or folder): with the format, the registry's idempotency key
    # one per format: {format, passed, reason, mlm_acc_pct, drop, agreement_pct, max_abs_diff, latency_ms, size_mb,
    # registered: {name, version, aliases, uri, new} or None}
    variants: list[dict[str, Any]]
    reference: dict[str, Any]  # the PyTorch student's (and teacher's) figures on the same inputs
    markdown: str  # the serving table, as in the summary and the stage's run
    seconds: float
    skipped: bool = False
    # task → {source, key, reference, variants, markdown}: the registered task models' variants
    # (pipeline/stages/export_tasks.py)
    tasks: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class TaskDistillRecord(Record):
    """The task distillation stage's record: per task its Table 2, the registered task model and teacher
    (pipeline/stages/task_distill.py, pipeline/evaluate/table2.py)."""

    name: str  # <run>-task-<settings hash>: the same name is the same work
    student: str  # the general student every task's student started from
    # task → {rows: [{model, what, median, min, max, seeds, retention, params, latency_ms}], best_kd, teacher,
    # max_seq_len, student, registered: {student: {name, version, aliases, uri, new}, teacher: … or None}}
    tasks: dict[str, Any]
    markdown: str  # Table 2 of every task, as in the summary and the stage's run
    seconds: float
    skipped: bool = False


@dataclass(frozen=True, kw_only=True)
class SweepParent(Record):
    """The sweep's MLflow parent run, so a restored sweep logs into the run its trials already use."""

    name: str
    run_id: str


# ---- driver → workers ------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class WorkerConfig(Record):
    """Everything a Ray Train worker needs, as plain data (``train_loop_config``): it rebuilds the RunConfig."""

    cfg: dict[str, Any]  # RunConfig.to_dict()
    task: str  # a name of pipeline.train.tasks.TASKS: "mlm" (teacher pre-training), "distill", "finetune"
    teacher_uri: str | None = None
    tracking_uri: str | None = None
    run_id: str | None = None  # the stage's (or trial's) MLflow run; None logs nothing
    git_sha: str = "unknown"
    replicated_data: bool = False  # in-memory corpus, replicated and sliced per rank (pipeline/train/worker.py)
    manifest_path: str | None = None  # for the token counts of frequency-smoothed masking
    extra: dict[str, Any] = field(default_factory=dict)  # a task's own settings


@dataclass(frozen=True, kw_only=True)
class TrialConfig(Record):
    """What every sweep trial gets beside its sampled point (Tune's ``param_space["trial"]``)."""

    cfg: dict[str, Any]  # the sweep's RunConfig.to_dict(); the trial applies its sample on top
    teacher_uri: str
    parent_run_id: str  # the sweep stage's MLflow run; each trial opens one nested run under it
    sweep_name: str  # the Tune experiment name; a trial's TorchTrainer is "<sweep_name>-<trial id>"
    replicated_data: bool
    manifest_path: str | None = None
    tracking_uri: str | None = None


@dataclass(frozen=True, kw_only=True)
class EvaluateRecord(Record):
    """The evaluate stage's record: what was evaluated, every unit's scores, and the paper's Tables 1 and 3."""

    name: str  # "<run>-eval-<settings hash>-<models hash>": the same name means the same evaluation
    models: list[dict[str, Any]]  # [{key, source, uri, checkpoint, is_teacher}]
    results: list[dict[str, Any]]  # one per (model, task, seed): {model, task, seed, scores, seconds, steps}
    table1: dict[str, Any]  # pipeline/evaluate/report.py table1
    table3: dict[str, Any]
    markdown: str  # both tables, as printed in the summary and the model card
    metrics: dict[str, dict[str, float]]  # a student's checkpoint → its eval/macro, eval/<task>/score, …
    seconds: float
    skipped: bool = False
