"""The task_distill section's checks (pipeline/stages/task_distill.py) and what its ``tasks`` entries name: the
entries of ``evaluate.tasks`` (pipeline/config/tasks.py), where a mapping may add ``teacher:``."""

from __future__ import annotations

import math

from pipeline.config import tasks as task_specs
from pipeline.config.tree import RunConfig

TEACHER_KEY = "teacher"
TEACHER_LAYERS = "teacher-layers"


def parse_tasks(entries: list) -> list[tuple[task_specs.TaskSpec, str]]:
    """(task spec, its teacher: "" when the stage fine-tunes one) per entry of ``task_distill.tasks``. ValueError,
    one line naming ``task_distill.tasks``, for a bad entry or two tasks of one name."""
    specs, teachers = [], []
    for entry in entries:
        teacher = ""
        if isinstance(entry, dict) and TEACHER_KEY in entry:
            teacher = entry[TEACHER_KEY]
            if not isinstance(teacher, str) or not teacher.strip():
                raise ValueError(f"task_distill.tasks: {TEACHER_KEY}={teacher!r} must name a fine-tuned classifier (a "
                                 "folder, hub id, s3:// or models:/…), or be left out to fine-tune one here")
            entry = {k: v for k, v in entry.items() if k != TEACHER_KEY}
            if set(entry) == {"task"}:
                entry = entry["task"]  # {task: package:bbc_news, teacher: …}: the named task as it is
        try:
            specs.append(task_specs.parse_all([entry])[0])
        except ValueError as err:
            raise ValueError(str(err).replace("evaluate.tasks", "task_distill.tasks")) from None
        teachers.append(teacher.strip())
    names = [s.name for s in specs]
    if dup := sorted({n for n in names if names.count(n) > 1}):
        raise ValueError(f"task_distill.tasks: task name(s) {dup} given twice: each task gets one student")
    return list(zip(specs, teachers))


def task_distill_problems(cfg: RunConfig) -> list[str]:
    """Every problem of the task_distill section, one fix-it line each; [] when valid."""
    t, p = cfg.task_distill, []
    if not t.tasks:
        return p
    try:
        parsed = parse_tasks(t.tasks)
    except ValueError as err:
        return [str(err)]
    for key in ("temperature", "alpha_kd", "alpha_ce", "alpha_cos"):
        value = getattr(t, key)
        if not math.isfinite(value) or value < 0 or (key == "temperature" and value == 0):
            p.append(f"task_distill.{key}={value}: must be a finite number {'> 0' if key == 'temperature' else '>= 0'}")
    if t.alpha_kd == 0 and t.alpha_ce == 0:
        p.append("task_distill.alpha_kd and task_distill.alpha_ce are both 0: the student would learn nothing; the "
                 "paper's second step uses both (e.g. 0.5 and 0.5)")
    if t.transfer and t.alpha_kd == 0 and t.alpha_cos == 0:
        p.append("task_distill.transfer is set with alpha_kd=0 and alpha_cos=0: its texts have no gold label, so only "
                 "the teacher's terms learn from them; raise alpha_kd or leave transfer empty")
    for key, value, low in (("seeds", t.seeds, 1), ("transfer_examples", t.transfer_examples, 1)):
        if value < low:
            p.append(f"task_distill.{key}={value}: must be >= {low}")
    for spec, _ in parsed:
        if t.transfer and spec.text_pair_field:
            p.append(f"task_distill.transfer with task {spec.name!r}: its examples are text pairs and a transfer set is "
                     "single texts; leave transfer empty, or distil the pair task without it")
        if spec.max_seq_len and not 8 <= spec.max_seq_len <= cfg.teacher.max_position_embeddings:
            p.append(f"task_distill.tasks: task {spec.name!r}: max_seq_len={spec.max_seq_len:g} must be in [8, "
                     f"teacher.max_position_embeddings={cfg.teacher.max_position_embeddings}]")
    p += _names(cfg, [s.name for s, _ in parsed])
    return p


def _names(cfg: RunConfig, tasks: list[str]) -> list[str]:
    from mlflow.exceptions import MlflowException  # deferred: importing pipeline.config must not import MLflow
    from mlflow.utils import validation  # deferred: the same

    out = []
    for task in tasks:
        try:
            validation._validate_model_name(f"{cfg.tracking.model_name}-{task}")
        except MlflowException as err:
            out.append(f"task_distill.tasks: the task model registers as {cfg.tracking.model_name}-{task}, which "
                       f"MLflow refuses ({err.message}); pick a shorter tracking.model_name or task name")
    return out
