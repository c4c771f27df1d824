"""The evaluate stage: the teacher and the students fine-tuned (or probed) on downstream tasks, the paper's
Tables 1 and 3. Run by ``jobs.evaluate`` and by ``jobs.pipeline`` when ``evaluate.tasks`` is set.

The plan (:func:`make_plan`) is made before Ray starts: the models (the teacher and the students, or models
given by hand), every task's examples loaded, or the record of the same evaluation finished earlier. Then one
unit per (model, task, seed) runs on Ray (pipeline/evaluate/units.py), and the tables are built and logged
(pipeline/evaluate/report.py). Not to be confused with the training runs' held-out validation (the ``eval``
config section, :class:`~pipeline.config.ValidationSection`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass

from pipeline import assets, families, models, registry, storage, tracking
from pipeline.config import RunConfig, flatten
from pipeline.config import tasks as task_specs
from pipeline.evaluate import loaders, report, serving, units
from pipeline.records import EvaluateRecord
from pipeline.stages.store import load_record, optional, record_path, write_record
from pipeline.train import driver


def check_tasks(cfg: RunConfig) -> None:
    """Load every ``evaluate.tasks`` entry's examples once (no Ray): a missing file or field, an unreachable dataset
    or bad labels stop a pipeline job at its start, not after training. ValueError names the task and the fix.
    One line names the tasks checked; their sizes are printed when the stage loads them again to run."""
    data = load_tasks(cfg, announce=False)
    print(f"[distil] evaluate: {len(data)} task(s) checked before training: {', '.join(data)}", flush=True)


def make_plan(cfg: RunConfig, *, model=None) -> Plan:
    """The evaluate stage's work, checked without Ray or MLflow: the models (the teacher and the students, or one
    ``model``, a pipeline.evaluate.units.Model, given by hand), and every task's examples loaded, or the record of
    the same evaluation finished earlier. One ValueError for bad input."""
    if not cfg.evaluate.tasks:
        raise ValueError("evaluate.tasks is empty: list the downstream tasks, e.g. evaluate: {tasks: "
                         "[package:rotten_tomatoes]} (or glue:mrpc, … with Hub access or evaluate.glue_dir)")
    chosen = models_to_evaluate(cfg, given=model)
    name = stage_name(cfg, chosen)
    earlier = optional(cfg, "evaluate")
    if earlier is not None and earlier.name == name:
        return Plan(name=name, models=chosen, data={}, earlier=earlier)
    return Plan(name=name, models=chosen, data=load_tasks(cfg))


def run(cfg: RunConfig, *, cluster_cpus: float, model=None, plan=None) -> EvaluateRecord:
    """Fine-tune (or probe) the teacher and the students on ``evaluate.tasks`` (pipeline/evaluate/);
    Tables 1 and 3. ``plan``: :func:`make_plan`'s (made here when not given)."""
    t0 = time.perf_counter()
    plan = plan or make_plan(cfg, model=model)
    if plan.earlier is not None:
        print(f"[distil] evaluate: finished earlier with these settings ({record_path(cfg, 'evaluate')}); skipped. "
              "Delete that file to run it again.", flush=True)
        return dataclasses.replace(plan.earlier, skipped=True)
    params = {**flatten({"evaluate": cfg.to_dict()["evaluate"]}), "evaluate.models": ", ".join(m.key for m in plan.models)}
    with tracking.stage_run("evaluate", params=params):
        log_task_data(plan.data)
        out = _score(cfg, plan, cluster_cpus=cluster_cpus)
    return write_record(cfg, "evaluate", EvaluateRecord(
        name=plan.name, models=[dataclasses.asdict(m) for m in plan.models], seconds=time.perf_counter() - t0, **out))


def models_to_evaluate(cfg: RunConfig, *, given: units.Model | list[units.Model] | None = None) -> list[units.Model]:
    """The teacher (when the teacher stage ran) and the students: ``given`` (one model or several, e.g. the paper's
    ablation), or the distill and sweep stages' candidates (all, or the ``evaluate.candidates`` best by
    val/mlm_loss). ValueError when there is no student, or when two models share a key."""

    out = []
    teacher = load_record(cfg, "teacher")
    if teacher is not None:
        out.append(units.Model(key="teacher", source="teacher", uri=teacher.teacher_uri,
                               checkpoint=teacher.checkpoint or "", is_teacher=True))
    if given is not None:
        out += list(given) if isinstance(given, list) else [given]
        keys = [m.key for m in out]
        if len(set(keys)) != len(keys):
            raise ValueError(f"two models to evaluate share a key ({keys}): give each its own")
        return out
    candidates = [c for stage in ("distill", "sweep") if (r := load_record(cfg, stage)) for c in r.candidates]
    if not candidates:
        raise ValueError("no student to evaluate: run the distill or sweep stage first, or pass --model, --checkpoint "
                         "or --model-dir")
    if cfg.evaluate.candidates != "all":
        held_out = f"val/{families.get(cfg.teacher.family).objective}_loss"  # val/mlm_loss, a causal LM's val/clm_loss
        candidates = registry.ranked(candidates, held_out, "min")[: int(cfg.evaluate.candidates)]
    for c in candidates:
        key = "distill" if c.source == "distill" else "trial-" + c.source.split()[2] if c.source.startswith("sweep trial") else c.source
        out.append(units.Model(key=key, source=c.source, uri=c.model_dir or driver.model_uri(c.checkpoint), checkpoint=c.checkpoint))
    return out


def stage_name(cfg: RunConfig, chosen: list[units.Model]) -> str:
    """``<run>-eval-<settings hash>-<models hash>``: an evaluation with the same name is the same work."""
    models_hash = hashlib.sha256(json.dumps([m.uri for m in chosen]).encode()).hexdigest()[:6]
    return f"{cfg.run.name}-eval-{units.settings_hash(cfg)}-{models_hash}"


def load_tasks(cfg: RunConfig, *, announce: bool = True, specs=None, stage: str = "evaluate") -> dict[str, loaders.TaskData]:
    """Every configured task's examples, before any fine-tuning: one ValueError for the first that cannot load.
    ``announce``: print one line per task (its train and dev sizes, its classes); ``specs``: these tasks instead of
    ``evaluate.tasks`` (the task distillation stage's), loaded with the evaluate section's settings."""
    e = cfg.evaluate
    src = loaders.Sources(glue_dir=e.glue_dir, cache_dir=os.path.join(cfg.cache_dir, "datasets"),
                          distill_sources=tuple(cfg.data.sources), val_fraction=cfg.data.val_fraction,
                          max_line_chars=cfg.data.max_line_chars,
                          dev_fraction=e.dev_fraction, max_train_examples=e.max_train_examples,
                          max_dev_examples=e.max_dev_examples, skip_bad_rows=e.skip_bad_rows)
    out = {}
    for spec in task_specs.parse_all(e.tasks) if specs is None else specs:
        out[spec.name] = loaders.load(spec, src)
        d = out[spec.name]
        if announce:
            print(f"[distil] {stage}: task {spec.name}: {len(d.train)} train, {len(d.dev)} dev examples, "
                  f"{'regression' if spec.regression else f'{d.num_labels} classes'}{_left_out(d)}", flush=True)
    return out


def _left_out(d: loaders.TaskData) -> str:
    """"; rows left out: train.tsv 3 (line 12: 4 fields, the header has 6; …), dev.tsv 0", or "" when none were."""
    if not (d.train.bad_rows or d.dev.bad_rows):
        return ""
    parts = [f"{os.path.basename(ex.origin) or split} {len(ex.bad_rows):,}"
             + (f" ({'; '.join(ex.bad_rows[:2])}{'; …' if len(ex.bad_rows) > 2 else ''})" if ex.bad_rows else "")
             for split, ex in (("train", d.train), ("dev", d.dev))]
    return "; rows left out: " + ", ".join(parts)


def task_data_metrics(data: dict[str, loaders.TaskData]) -> dict[str, float]:
    """Per task, the examples read and the rows of its files left out (evaluate.skip_bad_rows), as metrics of the
    stage's run: ``data/<task>/num_{train,dev}_examples`` and ``data/<task>/num_{train,dev}_rows_left_out``."""
    out = {}
    for task, d in data.items():
        for split, ex in (("train", d.train), ("dev", d.dev)):
            out[f"data/{task}/num_{split}_examples"] = float(len(ex))
            out[f"data/{task}/num_{split}_rows_left_out"] = float(len(ex.bad_rows))
    return out


def log_task_data(data: dict[str, loaders.TaskData]) -> None:
    """Log :func:`task_data_metrics` to the active MLflow run and, when rows were left out, every one of them (file,
    line and why) as ``evaluation/rows_left_out.json``."""
    import mlflow

    mlflow.log_metrics(task_data_metrics(data))
    left_out = {task: {split: {"file": ex.origin, "rows": ex.bad_rows} for split, ex in (("train", d.train), ("dev", d.dev))
                       if ex.bad_rows}
                for task, d in data.items() if d.train.bad_rows or d.dev.bad_rows}
    if left_out:
        mlflow.log_dict(left_out, "evaluation/rows_left_out.json")


@dataclass(frozen=True)
class Plan:
    """What the stage will evaluate, checked before Ray starts: its name, the models, every task's examples (or
    the record of the same evaluation finished earlier)."""

    name: str
    models: list
    data: dict
    earlier: object = None


def _score(cfg: RunConfig, plan: Plan, *, cluster_cpus: float) -> dict:
    """Evaluate the plan's models on every task; returns {"results", "table1", "table3", "markdown", "metrics"}
    where metrics maps each model's checkpoint to its eval/* metrics (eval/macro, eval/<task>/score)."""
    import mlflow

    chosen, data, name = plan.models, plan.data, plan.name
    tokenizer = assets.load_tokenizer(cfg.data.tokenizer, cfg.cache_dir)
    tables = {t: units.tokenize(d, tokenizer, units.max_seq_len(cfg, d.spec)) for t, d in data.items()}
    out_dir = units.results_dir(cfg, name)
    seeds = range(cfg.run.seed, cfg.run.seed + cfg.evaluate.seeds)
    if cfg.evaluate.mode == "probe":
        results = units.run_probe(cfg, chosen, data, tables, out_dir=out_dir)
    else:
        # the first seed's run on Table 3's task is kept until its serving rows are measured
        todo = [units.Unit(model=m, task=t, seed=s, name=f"{name}-{m.key}-{t}-s{s}",
                           extra={"keep": True} if (t, s) == (table3_task(data), cfg.run.seed) else {})
                for m in chosen for t in data for s in seeds]
        results = units.run_finetune(cfg, todo, tables, data, cluster_cpus=cluster_cpus, out_dir=out_dir)
    baselines = {t: report.majority_baseline(d) for t, d in data.items()}
    chance = {t: report.chance_level(baselines[t], len(d.dev.labels)) for t, d in data.items()}
    t1 = report.table1(results, chosen, list(data), chance)
    t3 = _table3(cfg, chosen, t1, data)
    markdown = report.table1_markdown(t1) + "\n\n" + report.table3_markdown(t3)
    if cfg.evaluate.mode == "finetune":
        t3["serving"] = _serving(cfg, name, results, t1, data, out_dir=out_dir)
        if t3["serving"]:
            markdown += "\n\n" + report.serving_markdown(t3["serving"])
    mlflow.log_text(markdown, "evaluation/tables.md")
    mlflow.log_dict({"table1": t1, "table3": t3, "results": results}, "evaluation/tables.json")
    mlflow.log_figure(report.scores_figure(t1, baselines), "evaluation/scores.png")
    _log_loss_curves(cfg)
    per_model = _metrics(t1)
    mlflow.log_metrics({f"eval/{m}/{k.removeprefix('eval/')}": v for m, ms in per_model.items() for k, v in ms.items()})
    by_checkpoint = {m.checkpoint: per_model[m.key] for m in chosen if m.checkpoint and m.key in per_model}
    return {"results": results, "table1": t1, "table3": t3, "markdown": markdown, "metrics": by_checkpoint}


def _metrics(t1: dict) -> dict[str, dict[str, float]]:
    """Each model's eval/macro and eval/<task>/score (medians), and its retention in % where a teacher was scored."""
    out = {}
    for r in t1["rows"]:
        ms = {f"eval/{t}/score": v["median"] for t, v in r["tasks"].items()}
        if r["macro"] is not None:
            ms["eval/macro"] = r["macro"]
        if r["retention"] is not None:
            ms["eval/retention_pct"] = r["retention"]
        out[r["model"]] = ms
    return out


def table3_task(data: dict) -> str:
    """The task Table 3 times the models on: STS-B when evaluated (the paper's), else the first task."""
    return "stsb" if "stsb" in data else next(iter(data))


def _best_student(t1: dict) -> str | None:
    students = [r for r in t1["rows"] if not r["is_teacher"] and r["macro"] is not None]
    return max(students, key=lambda r: r["macro"])["model"] if students else None


def _serving(cfg: RunConfig, name: str, results: list[dict], t1: dict, data: dict, *, out_dir: str) -> dict | None:
    """Table 3's serving rows: the teacher and the best student fine-tuned on Table 3's task (the first seed's
    runs), PyTorch fp32 each, and the student's ONNX Runtime variants of ``export.formats``: dev score, size,
    batch-1 latency (pipeline/evaluate/serving.py). The kept runs are deleted after; the rows are kept in a file
    of the stage's folder, so a resubmission does not need them. None when a kept model is missing (a unit
    finished by an earlier version, which did not keep it)."""
    path = os.path.join(out_dir, "serving.json")
    try:
        if (earlier := storage.read_json(path)) is not None:
            return earlier
    except storage.DamagedFile:
        pass  # measured again
    task, best = table3_task(data), _best_student(t1)
    teachers = [r["model"] for r in t1["rows"] if r["is_teacher"]]
    firsts = {r["model"]: r for r in results if r["task"] == task and r["seed"] == cfg.run.seed}
    want = [k for k in [*teachers[:1], best] if k]
    if not want or any(not (firsts.get(k) or {}).get("model_dir") for k in want):
        print(f"[distil] evaluate: no serving rows in Table 3: the fine-tuned {task} models of {want} were not kept "
              "(their units ran before this version; delete the stage's folder to rerun them)", flush=True)
        return None
    out = {"task": task, "seq_len": units.max_seq_len(cfg, data[task].spec), "threads": cfg.export.threads, "rows": []}
    for key in want:
        folder = assets.resolve_local(firsts[key]["model_dir"], cfg.cache_dir)
        is_teacher = key in teachers
        m = serving.measure(cfg, folder, data[task], formats=() if is_teacher else cfg.export.formats,
                            work=os.path.join(out_dir, "serving", key))
        out["rows"].append({"model": key, "runtime": "PyTorch fp32", "is_teacher": is_teacher, **m["reference"]})
        out["rows"] += [{"model": key, "runtime": f"ONNX Runtime {'int8' if v['format'] == serving.INT8 else 'fp32'}",
                         "is_teacher": False, "parameters": m["reference"]["parameters"],
                         **{k: v[k] for k in ("score", "latency_ms", "size_mb", "drop", "max_abs_diff", "reason")}}
                        for v in m["variants"]]
    storage.write_json(path, out)
    for r in results:
        if r.get("model_dir"):
            units.delete_run(cfg, f"{name}-{r['model']}-{r['task']}-s{r['seed']}")
    return out


def _table3(cfg: RunConfig, chosen: list[units.Model], t1: dict, data: dict) -> dict:
    """Parameters and the CPU batch-1 dev pass of the teacher and the best student (by eval/macro)."""
    best = _best_student(t1)
    task = table3_task(data)
    dev = data[task].dev
    n = min(len(dev), cfg.evaluate.speed_examples or len(dev))
    tokenizer = assets.load_tokenizer(cfg.data.tokenizer, cfg.cache_dir)
    rows = [tokenizer(dev.texts[i], dev.pairs[i] if dev.pairs else None, truncation="longest_first",
                      max_length=units.max_seq_len(cfg, data[task].spec))["input_ids"] for i in range(n)]
    measured = []
    for m in chosen:
        if m.is_teacher or m.key == best:
            encoder, _ = assets.load_for_downstream(assets.resolve_local(m.uri, cfg.cache_dir))
            encoder.eval()
            measured.append({"model": m.key, "is_teacher": m.is_teacher, "params": models.count_parameters(encoder),
                             "seconds": report.dev_pass_seconds(encoder, rows)})
    return report.table3(measured, task, n)


def _log_loss_curves(cfg: RunConfig) -> None:
    """The distill run's loss curves (from its MLflow run) as a PNG artifact of the evaluate stage's run."""
    import mlflow
    from mlflow.tracking import MlflowClient

    try:
        record = load_record(cfg, "distill")
    except ValueError:
        return
    run_id = record.candidates[0].run_id if record and record.candidates else None
    if not run_id:
        return
    client = MlflowClient()
    try:
        history = {k: [(m.step, m.value) for m in client.get_metric_history(run_id, k) if math.isfinite(m.value)]
                   for k in ("loss/total", "loss/ce", "loss/mlm", "loss/clm", "loss/cos")}
    except Exception as e:  # noqa: BLE001 -- the distill run lives in another tracking store: no plot, say so
        print(f"[distil] evaluate: no loss curves (the distill run {run_id} is not in this tracking store: {e})", flush=True)
        return
    mlflow.log_figure(report.loss_figure(history), "evaluation/distill_losses.png")
