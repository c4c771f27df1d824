"""The task_distill section's checks (pipeline/stages/task_distill.py) and what its ``tasks`` entries name: the
entries of ``evaluate.tasks`` (pipeline/config/tasks.py), where a mapping may add ``teacher:``."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from pipeline.config import tasks as task_specs
from pipeline.config import sweep_checks
from pipeline.config.tree import RunConfig

TEACHER_KEY, TRANSFER_KEY = "teacher", "transfer"
TEACHER_LAYERS = "teacher-layers"
LOSS_KEYS = ("temperature", "alpha_kd", "alpha_ce", "alpha_cos")  # what task_distill.space may search


@dataclass(frozen=True)
class TaskEntry:
    """One entry of ``task_distill.tasks``: the task, its teacher ("" when the stage fine-tunes one) and its transfer
    set's sources (the entry's own ``transfer:``, else ``task_distill.transfer``)."""

    spec: task_specs.TaskSpec
    teacher: str
    transfer: tuple[str, ...]


def parse_tasks(entries: list, transfer: list[str] | tuple[str, ...] = ()) -> list[TaskEntry]:
    """Every entry of ``task_distill.tasks`` parsed; ``transfer``: the section's sources, for entries without their
    own. ValueError, one line naming ``task_distill.tasks``, for a bad entry or two tasks of one name."""
    out = []
    for entry in entries:
        teacher, own = "", None
        if isinstance(entry, dict) and (TEACHER_KEY in entry or TRANSFER_KEY in entry):
            teacher, own = entry.get(TEACHER_KEY, ""), entry.get(TRANSFER_KEY)
            if TEACHER_KEY in entry and (not isinstance(teacher, str) or not teacher.strip()):
                raise ValueError(f"task_distill.tasks: teacher={teacher!r} must name a fine-tuned classifier (a "
                                 "folder, hub id, s3:// or models:/…), or be left out to fine-tune one here")
            if own is not None and not (isinstance(own, list) and all(isinstance(x, str) and x.strip() for x in own)):
                raise ValueError(f"task_distill.tasks: transfer={own!r} must be a list of sources (as data.sources), "
                                 "e.g. [/data/unlabelled.txt]; [] for none")
            entry = {k: v for k, v in entry.items() if k not in (TEACHER_KEY, TRANSFER_KEY)}
            if set(entry) == {"task"}:
                entry = entry["task"]  # {task: package:bbc_news, teacher: …}: the named task as it is
        try:
            spec = task_specs.parse_all([entry])[0]
        except ValueError as err:
            raise ValueError(str(err).replace("evaluate.tasks", "task_distill.tasks")) from None
        out.append(TaskEntry(spec, teacher.strip(), tuple(transfer if own is None else own)))
    names = [e.spec.name for e in out]
    if dup := sorted({n for n in names if names.count(n) > 1}):
        raise ValueError(f"task_distill.tasks: task name(s) {dup} given twice: each task gets one student")
    return out


def task_distill_problems(cfg: RunConfig) -> list[str]:
    """Every problem of the task_distill section, one fix-it line each; [] when valid."""
    t, p = cfg.task_distill, []
    if not t.tasks:
        return p
    try:
        parsed = parse_tasks(t.tasks, t.transfer)
    except ValueError as err:
        return [str(err)]
    p += _loss_problems(t, any(e.transfer for e in parsed))
    p += _space_problems(cfg, any(e.transfer for e in parsed))
    if t.num_samples < 1:
        p.append(f"task_distill.num_samples={t.num_samples}: must be >= 1")
    for key, value, low in (("seeds", t.seeds, 1), ("transfer_examples", t.transfer_examples, 1)):
        if value < low:
            p.append(f"task_distill.{key}={value}: must be >= {low}")
    for e in parsed:
        spec = e.spec
        if e.transfer and spec.text_pair_field:
            p.append(f"task_distill.transfer with task {spec.name!r}: its examples are text pairs and a transfer set is "
                     "single texts; leave transfer empty, or distil the pair task without it")
        if spec.max_seq_len and not 8 <= spec.max_seq_len <= cfg.teacher.max_position_embeddings:
            p.append(f"task_distill.tasks: task {spec.name!r}: max_seq_len={spec.max_seq_len:g} must be in [8, "
                     f"teacher.max_position_embeddings={cfg.teacher.max_position_embeddings}]")
    p += _names(cfg, [e.spec.name for e in parsed])
    return p


def _loss_problems(t, transfer: bool, where: str = "") -> list[str]:
    """The loss settings' problems (``where``: the sampled point they come from, for the messages)."""
    p = []
    for key in LOSS_KEYS:
        value = getattr(t, key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0 or (
                key == "temperature" and value == 0):
            p.append(f"task_distill.{key}={value!r}{where}: must be a finite number {'> 0' if key == 'temperature' else '>= 0'}")
    if p:
        return p
    if t.alpha_kd == 0 and t.alpha_ce == 0:
        p.append(f"task_distill.alpha_kd and task_distill.alpha_ce are both 0{where}: the student would learn nothing; "
                 "the paper's second step uses both (e.g. 0.5 and 0.5)")
    if transfer and t.alpha_kd == 0 and t.alpha_cos == 0:
        p.append(f"task_distill.transfer is set with alpha_kd=0 and alpha_cos=0{where}: its texts have no gold label, so "
                 "only the teacher's terms learn from them; raise alpha_kd or leave transfer empty")
    return p


def _space_problems(cfg: RunConfig, transfer: bool) -> list[str]:
    """``task_distill.space``: entries of the sweep grammar over the loss settings only, and every point its
    probes stand for a valid loss (as the sweep stage probes its space)."""
    space, p = cfg.task_distill.space, []
    for key, spec in space.items():
        if key not in [f"task_distill.{k}" for k in LOSS_KEYS]:
            p.append(f"task_distill.space key {key!r}: the stage searches its loss settings only: "
                     f"{', '.join(f'task_distill.{k}' for k in LOSS_KEYS)}")
            continue
        p += sweep_checks.space_entry_problems(key, spec, where="task_distill.space")
    if p:
        return p
    for sample in sweep_checks.probe_samples(cfg, space):
        point = dataclasses.replace(cfg.task_distill, **{k.removeprefix("task_distill."): v for k, v in sample.items()})
        if found := _loss_problems(point, transfer, where=f" (a point of task_distill.space: {sample})"):
            return found[:1]
    return p


def _names(cfg: RunConfig, tasks: list[str]) -> list[str]:
    from mlflow.exceptions import MlflowException  # deferred: importing pipeline.config must not import MLflow
    from mlflow.utils import validation  # deferred: the same

    out = []
    for task in tasks:
        name = f"{cfg.tracking.model_name}-{task}-teacher"  # the longest name the stage registers for the task
        try:
            validation._validate_model_name(name)
        except MlflowException as err:
            out.append(f"task_distill.tasks: the stage registers {cfg.tracking.model_name}-{task} and {name}, which "
                       f"MLflow refuses ({err.message}); pick a shorter tracking.model_name or task name")
    return out
