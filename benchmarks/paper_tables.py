"""The paper's Tables 1, 3 and 4 (Sanh et al. 2019), reproduced downstream with the pipeline's own stages.

One command runs the whole comparison; every step is a pipeline stage, so a second run skips what finished:

1. ``prepare`` and ``teacher``: the config's corpus, and its teacher (configs/teacher-minilm.yaml: the packaged
   MiniLM encoder adapted to masked-LM by continued pre-training). The teacher's held-out masked-token accuracy
   over training is read back from its MLflow run.
2. ``distill``, once per student, all at one budget (the same steps, batches, per-step masks and seed), each its
   own run ``<run.name>-<student>`` distilling from that teacher:

   =============  =====================================================================
   distilled      the paper's recipe: triple loss, initialised from teacher layers
   no_ce          without L_ce                                         (Table 4)
   no_cos         without L_cos                                        (Table 4)
   no_mlm         without L_mlm                                        (Table 4)
   random_init    triple loss, random initialisation                   (Table 4)
   mlm_only       L_mlm only, random initialisation: no teacher at all (Table 1 control)
   =============  =====================================================================

   plus ``untrained``: the student's architecture, randomly initialised and fine-tuned directly (Table 1 control).
3. ``evaluate``: the evaluate stage fine-tunes the teacher and all seven students on every ``evaluate.tasks``
   task with ``evaluate.seeds`` seeds (median), and times the CPU batch-1 dev pass (Table 3).
4. TF-IDF + logistic regression (scikit-learn) on the same train and dev examples (Table 1 control).

Writes ``--out`` (JSON: settings, wall times, the three tables, the paper's numbers) and ``--markdown`` (the
tables beside the paper's, and where they agree). ``--smoke`` runs the same code on configs/tiny.yaml's models
with a handful of steps, one seed and the evaluate stage's probe mode instead of fine-tuning (the test suite
runs it); its files go to the smoke run's folder.

    python benchmarks/paper_tables.py --config configs/teacher-minilm.yaml --docs benchmarks/RESULTS.md

``--docs`` replaces the block between the paper-tables markers of each file named (benchmarks/RESULTS.md, where
measured figures live); a file without the markers is refused before any work.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from pipeline import assets, cli, config as config_lib, models, storage, teachers  # noqa: E402
from pipeline.config import checks  # noqa: E402
from pipeline.stages import distill, evaluate, prepare, teacher as teacher_stage  # noqa: E402

STUDENTS = {  # key: (what it is, config overrides)
    "distilled": ("triple loss, initialised from teacher layers", {}),
    "no_ce": ("− L_ce", {"loss.alpha_ce": 0.0}),
    "no_cos": ("− L_cos", {"loss.alpha_cos": 0.0}),
    "no_mlm": ("− L_mlm", {"loss.alpha_mlm": 0.0}),
    "random_init": ("triple loss, random initialisation", {"student.init": "random"}),
    "mlm_only": ("L_mlm only, random initialisation (no teacher)",
                 {"loss.alpha_ce": 0.0, "loss.alpha_cos": 0.0, "student.init": "random"}),
}
UNTRAINED = "untrained"  # random initialisation, no pre-training: fine-tuned directly

# Sanh et al. 2019: Table 1 (GLUE dev macro-score), Table 3 (parameters, CPU batch-1 STS-B dev pass), Table 4
# (change in GLUE macro-score against the triple loss with teacher initialisation).
PAPER = {
    "table1": {"BERT-base": 79.5, "DistilBERT": 77.0, "ELMo": 68.7, "retention_pct": 97.0},
    "table3": {"BERT-base": {"params_m": 110, "seconds": 668}, "DistilBERT": {"params_m": 66, "seconds": 410}},
    "table4": {"no_ce": -2.96, "no_cos": -1.46, "no_mlm": -0.31, "random_init": -3.69},
}
SMOKE = {  # configs/tiny.yaml's models, a handful of steps, one seed, probes for fine-tuning: the code path
    "run.name": "paper-smoke", "data.sources": ["package:rotten_tomatoes"], "data.max_docs": 2000,
    "teacher_optim.max_steps": 6, "teacher_optim.warmup_steps": 1, "optim.max_steps": 4, "optim.warmup_steps": 1,
    "scaling.num_workers": 1, "checkpoint.every_steps": 4, "eval.every_steps": 4, "eval.max_batches": 1,
    "tracking.select_metric": "val/mlm_loss", "evaluate.mode": "probe", "evaluate.tasks": ["package:rotten_tomatoes"],
    "evaluate.seeds": 1, "evaluate.max_train_examples": 32, "evaluate.max_dev_examples": 16, "evaluate.speed_examples": 4,
}


def student_config(cfg: config_lib.RunConfig, key: str, teacher_uri: str) -> config_lib.RunConfig:
    """The base config for one student: its own run name, the base run's prepared corpus and trained teacher."""
    overrides = {"run.name": f"{cfg.run.name}-{key}", "data.output": cfg.data_dir, "teacher.source": teacher_uri,
                 "teacher.init_from": "", **STUDENTS[key][1]}
    out = cfg.with_overrides(overrides)
    checks.validate(out)
    return out


def teacher_curve(record) -> list[dict]:
    """The teacher run's held-out masked-token accuracy and loss at each evaluation (from its MLflow run)."""
    from mlflow.tracking import MlflowClient

    if not record.run_id:
        return []
    client = MlflowClient()
    acc = {m.step: m.value for m in client.get_metric_history(record.run_id, "val/mlm_acc")}
    loss = {m.step: m.value for m in client.get_metric_history(record.run_id, "val/mlm_loss")}
    return [{"step": s, "val_mlm_acc": acc[s], "val_mlm_loss": loss.get(s)} for s in sorted(acc)]


def untrained_student(cfg: config_lib.RunConfig, teacher_uri: str) -> str:
    """The student's architecture with random weights, saved as a Hugging Face folder (no pre-training at all)."""
    out = os.path.join(cfg.run_dir, "students", UNTRAINED)
    if not os.path.exists(os.path.join(out, "config.json")):
        teacher = teachers.load_teacher(teacher_uri, cache_root=cfg.cache_dir)
        student = models.build_student(dataclasses.replace(cfg.student, init="random"), teacher, seed=cfg.run.seed)
        assets.export_model(student, assets.load_tokenizer(cfg.data.tokenizer, cfg.cache_dir), out)
    return out


def tfidf_scores(data: dict) -> dict[str, float]:
    """TF-IDF (word 1–2-grams, sublinear tf) + logistic regression, scikit-learn, scored with each task's metrics."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.pipeline import make_pipeline

    from pipeline import glue_metrics as metrics

    out = {}
    for name, d in data.items():
        head = Ridge() if d.spec.regression else LogisticRegression(max_iter=2000, C=10.0)
        model = make_pipeline(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1), head)
        model.fit(_texts(d.train), d.train.labels)
        out[name] = metrics.scores(d.spec.metrics, model.predict(_texts(d.dev)), d.dev.labels)["score"]
    return out


def _texts(ex) -> list[str]:
    """A split's texts for TF-IDF; a pair task's two sentences joined by [SEP]."""
    return ex.texts if not ex.pairs else [f"{t} [SEP] {p}" for t, p in zip(ex.texts, ex.pairs)]


def build_tables(evaluated, trained: dict, teacher_record, tfidf: dict) -> dict:
    """Tables 1, 3 and 4 from the evaluate record, the students' distill records and the TF-IDF scores."""
    rows = {r["model"]: r for r in evaluated.table1["rows"]}
    tasks = evaluated.table1["tasks"]

    def spread(r):  # the largest per-task min–max range over seeds, ×100
        return max(100 * (v["max"] - v["min"]) for v in r["tasks"].values())

    teacher = next(r for r in rows.values() if r["is_teacher"])
    t1 = []
    for key in ["teacher", "distilled", "mlm_only", UNTRAINED]:
        r = rows[key]
        t1.append({"model": key, "what": "teacher" if key == "teacher" else STUDENTS.get(key, ("random initialisation, "
                   "no pre-training",))[0], **{t: round(100 * r["tasks"][t]["median"], 2) for t in tasks},
                   "macro": round(100 * r["macro"], 2), "retention_pct": _round(r["retention"], 1), "seed_spread": round(spread(r), 2)})
    t1.append({"model": "tfidf_logreg", "what": "TF-IDF + logistic regression (scikit-learn)",
               **{t: round(100 * v, 2) for t, v in tfidf.items()},
               "macro": round(100 * statistics.mean(tfidf.values()), 2),
               # No retention against a teacher at chance (report.table1 withholds it for the same reason).
               "retention_pct": None if evaluated.table1.get("teacher_at_chance")
               else round(100 * statistics.mean(tfidf.values()) / teacher["macro"], 1), "seed_spread": 0.0})
    ref = rows["distilled"]["macro"]
    t4 = []
    for key in ["distilled", "no_ce", "no_cos", "no_mlm", "random_init"]:
        r, m = rows[key], trained[key].candidates[0].metrics
        t4.append({"model": key, "what": STUDENTS[key][0], "macro": round(100 * r["macro"], 2),
                   "delta_macro": round(100 * (r["macro"] - ref), 2), "val_mlm_loss": round(m.get("val/mlm_loss", float("nan")), 4),
                   "val_mlm_acc": round(m.get("val/mlm_acc", float("nan")), 4), "seed_spread": round(spread(r), 2),
                   "paper_delta": PAPER["table4"].get(key)})
    t3 = evaluated.table3
    return {"tasks": tasks, "table1": t1, "table3": t3, "table4": t4,
            "teacher_at_chance": bool(evaluated.table1.get("teacher_at_chance")),
            "teacher_val_mlm_acc": teacher_record.metrics.get("val/mlm_acc"),
            "teacher_val_mlm_loss": teacher_record.metrics.get("val/mlm_loss")}


def _round(x: float | None, digits: int) -> float | None:
    return None if x is None else round(x, digits)


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{x:.1f} %"


def verdicts(tables: dict) -> dict:
    """The issue's targets, each as measured: True, False (with the figures in the tables)."""
    t1 = {r["model"]: r for r in tables["table1"]}
    t4 = {r["model"]: r for r in tables["table4"]}
    d = t1["distilled"]
    margin = max(d["seed_spread"], *(t1[k]["seed_spread"] for k in ("mlm_only", UNTRAINED)))
    hurts = sorted(("no_ce", "no_cos", "no_mlm", "random_init"), key=lambda k: t4[k]["delta_macro"])
    return {
        "retention_ge_95": None if d["retention_pct"] is None else d["retention_pct"] >= 95.0,
        "beats_controls_by_more_than_spread": all(d["macro"] - t1[k]["macro"] > margin for k in ("mlm_only", UNTRAINED)),
        "ablation_order_worst_first": hurts,
        "random_init_and_no_ce_hurt_most": set(hurts[:2]) == {"random_init", "no_ce"},
        "no_mlm_hurts_least": hurts[-1] == "no_mlm",
    }


def markdown(result: dict) -> str:
    """The three tables beside the paper's numbers."""
    tb, tasks = result["tables"], result["tables"]["tasks"]
    lines = [f"Run: `{result['command']}`, {result['wall_s'] / 60:.1f} min wall on {result['cpus']} CPU cores "
             f"({result['settings_line']}).", "",
             f"Teacher: {result['teacher']['what']}; held-out masked-token accuracy "
             + ", ".join(f"{100 * p['val_mlm_acc']:.1f} % at step {p['step']}" for p in result["teacher"]["curve"]) + ".", "",
             "**Table 1 (retention)**, dev score ×100, median of " + f"{result['settings']['evaluate.seeds']} seeds"
             + f" (paper, GLUE macro: BERT-base {PAPER['table1']['BERT-base']}, DistilBERT {PAPER['table1']['DistilBERT']}"
             + f" = {PAPER['table1']['retention_pct']:.0f} %)", "",
             "| model | " + " | ".join(tasks) + " | macro | retention | seed spread |", "|---" * (len(tasks) + 4) + "|"]
    for r in tb["table1"]:
        what = f"{result['teacher']['what']}, {result['teacher']['steps']} MLM steps" if r["model"] == "teacher" else r["what"]
        lines.append(f"| {r['model']}: {what} | " + " | ".join(f"{r[t]:.1f}" for t in tasks)
                     + f" | {r['macro']:.1f} | {_pct(r['retention_pct'])} | {r['seed_spread']:.1f} |")
    t3 = tb["table3"]
    lines += ["", f"**Table 3 (size and speed)**: CPU, batch size 1, {t3['examples']} {t3['task']} dev examples, "
              f"{t3['threads']} threads (paper: 110 M → 66 M parameters, 668 s → 410 s on STS-B)", "",
              "| model | parameters (M) | dev pass (s) | params ratio | time ratio |", "|---|---|---|---|---|"]
    for r in t3["rows"]:
        # The evaluate stage times its best student by macro-score; every student here has the same architecture.
        name = "teacher" if r["is_teacher"] else f"student ({r['model']}; every student has this shape)"
        lines.append(f"| {name} | {r['params_m']:.2f} | {r['seconds']:.2f} | {r.get('params_ratio', 1.0):.2f} | "
                     f"{r.get('time_ratio', 1.0):.2f} |")
    lines += ["", "**Table 4 (ablation)**: change in macro-score ×100 against the distilled student, at the same budget, "
              "with the held-out MLM loss (paper: GLUE macro)", "",
              "| student | macro | Δ macro | paper Δ | val MLM loss | val MLM acc | seed spread |", "|---|---|---|---|---|---|---|"]
    for r in tb["table4"]:
        paper = "—" if r["paper_delta"] is None else f"{r['paper_delta']:+.2f}"
        lines.append(f"| {r['model']}: {r['what']} | {r['macro']:.1f} | {r['delta_macro']:+.2f} | {paper} | "
                     f"{r['val_mlm_loss']:.3f} | {100 * r['val_mlm_acc']:.1f} % | {r['seed_spread']:.1f} |")
    v = result["verdicts"]
    retention = {True: "met", False: "not met", None: "not judged (the teacher scores at chance)"}[v["retention_ge_95"]]
    lines += ["", f"Targets: retention ≥ 95 %: {retention}; beats both student "
              f"controls by more than the seed spread: {'met' if v['beats_controls_by_more_than_spread'] else 'not met'}; "
              f"ablation, worst first: {', '.join(v['ablation_order_worst_first'])} (paper: random_init, no_ce, "
              f"no_cos, no_mlm)."]
    return "\n".join(lines)


BEGIN, END = "<!-- paper-tables:begin -->", "<!-- paper-tables:end -->"


def missing_markers(paths: list[str]) -> list[str]:
    """The files of ``paths`` that do not exist or lack the BEGIN and END markers (the tables are measured
    figures: they go only where a block already waits for them, such as benchmarks/RESULTS.md)."""
    out = []
    for path in paths:
        text = Path(path).read_text() if os.path.isfile(path) else ""
        if BEGIN not in text or END not in text:
            out.append(path)
    return out


def replace_block(path: str, block: str) -> None:
    """Put ``block`` between the BEGIN and END markers of ``path``; ValueError if it has none."""
    if missing_markers([path]):
        raise ValueError(f"{path} has no {BEGIN} … {END} block")
    with open(path) as f:
        text = f.read()
    text = text[: text.index(BEGIN)] + f"{BEGIN}\n{block}\n{END}" + text[text.index(END) + len(END):]
    with open(path, "w") as f:
        f.write(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/teacher-minilm.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--smoke", action="store_true", help="tiny models and a handful of steps: the code path only")
    ap.add_argument("--out", default="benchmarks/paper-tables.json")
    ap.add_argument("--markdown", default="benchmarks/paper-tables.md")
    ap.add_argument("--docs", nargs="*", default=[],
                    help="files whose paper-tables block to replace: benchmarks/RESULTS.md (each must hold the markers)")
    ap.add_argument("--render", action="store_true", help="only write --markdown and --docs again from the --out JSON")
    args = ap.parse_args(argv)
    if unmarked := missing_markers(args.docs):
        print(f"error: --docs {' '.join(unmarked)}: no {BEGIN} … {END} block there; the tables go to "
              "benchmarks/RESULTS.md", file=sys.stderr)
        return 2
    if args.render:
        return render(args)
    t_start = time.perf_counter()
    try:
        if args.smoke:  # configs/tiny.yaml's models and the smoke budget; the files go to the run's folder
            cfg = config_lib.load_config("configs/tiny.yaml", args.overrides).with_overrides(SMOKE)
            args.out = os.path.join(cfg.run_dir, "paper-tables.json")
            args.markdown = os.path.join(cfg.run_dir, "paper-tables.md")
        else:
            cfg = config_lib.load_config(args.config, args.overrides)
        for key in STUDENTS:
            student_config(cfg, key, "placeholder")  # every student's config valid before any work
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return run(cfg, args, t_start)


def render(args) -> int:
    """--render: the markdown and the docs' blocks from a recorded run's JSON, without running anything."""
    result = storage.read_json(args.out)
    if result is None:
        print(f"error: {args.out} does not exist: run the benchmark first", file=sys.stderr)
        return 2
    write_tables(result, args)
    return 0


def write_tables(result: dict, args) -> None:
    """The tables as markdown: to --markdown, into the --docs files' blocks, and to stdout."""
    md = markdown(result)
    with open(args.markdown, "w") as f:
        f.write(md + "\n")
    for path in args.docs:
        replace_block(path, md)
    print(md)


def run(cfg, args, t_start: float) -> int:
    """Steps 1–4 of the module docstring, then the files."""
    def body():
        cli.start(cfg, with_ray=False, check_teacher=True)
        evaluate.check_tasks(cfg)
        cpus = cli.start_ray(cfg)
        times = {}

        def timed(name, fn):
            t = time.perf_counter()
            print(f"== {name} ==", flush=True)
            out = fn()
            times[name] = round(time.perf_counter() - t, 1)
            return out

        timed("prepare", lambda: prepare.run(cfg))
        teacher = timed("teacher", lambda: teacher_stage.run(cfg, cluster_cpus=cpus))
        trained = {}
        for key in STUDENTS:
            scfg = student_config(cfg, key, teacher.teacher_uri)
            cli.hold(scfg)  # its own run folder: one job at a time there too
            timed(f"prepare {key}", lambda: prepare.run(scfg))
            timed(f"teacher {key}", lambda: teacher_stage.run(scfg, cluster_cpus=cpus))
            trained[key] = timed(f"distill {key}", lambda: distill.run(scfg, cluster_cpus=cpus))
        from pipeline.evaluate.units import Model

        chosen = [Model(key=k, source=f"distill {k}", uri=_model_uri(r.candidates[0]), checkpoint=r.candidates[0].checkpoint)
                  for k, r in trained.items()]
        chosen.append(Model(key=UNTRAINED, source="random initialisation", uri=untrained_student(cfg, teacher.teacher_uri)))
        plan = evaluate.make_plan(cfg, model=chosen)
        evaluated = timed("evaluate", lambda: evaluate.run(cfg, cluster_cpus=cpus, plan=plan))
        tfidf = timed("tfidf", lambda: tfidf_scores(plan.data or evaluate.load_tasks(cfg)))
        tables = build_tables(evaluated, trained, teacher, tfidf)
        result = {
            "benchmark": "paper_tables", "command": " ".join(["python benchmarks/paper_tables.py", *sys.argv[1:]]),
            "config": args.config, "smoke": args.smoke, "cpus": os.cpu_count(), "wall_s": round(time.perf_counter() - t_start, 1),
            "stage_s": times, "settings": _settings(cfg), "settings_line": _settings_line(cfg),
            "teacher": {"what": cfg.teacher.init_from or "pre-trained from scratch", "uri": teacher.teacher_uri,
                        "steps": cfg.teacher_optim.max_steps, "seconds": round(teacher.seconds, 1),
                        "curve": teacher_curve(teacher)},
            "tables": tables, "paper": PAPER,
        }
        result["verdicts"] = verdicts(tables)
        storage.write_json(args.out, result)
        write_tables(result, args)
        print(json.dumps({"benchmark": "paper_tables", "wall_s": result["wall_s"], **result["verdicts"]}))

    return cli.main_guard(body, cfg, job="paper_tables")


def _model_uri(candidate) -> str:
    from pipeline.train import driver

    return candidate.model_dir or driver.model_uri(candidate.checkpoint)


def _settings(cfg) -> dict:
    keys = ["data.sources", "data.max_seq_len", "teacher.init_from", "teacher_optim.max_steps", "teacher_optim.micro_batch_size",
            "teacher_optim.lr", "student.layer_map", "optim.max_steps", "optim.micro_batch_size", "optim.lr",
            "scaling.num_workers", "loss.temperature", "loss.alpha_ce", "loss.alpha_mlm", "loss.alpha_cos",
            "evaluate.mode", "evaluate.tasks", "evaluate.seeds", "evaluate.max_train_examples", "evaluate.max_dev_examples",
            "evaluate.max_seq_len", "evaluate.batch_size", "evaluate.lr", "evaluate.epochs"]
    flat = config_lib.flatten(cfg.to_dict())
    return {k: flat[k] for k in keys}


def _settings_line(cfg) -> str:
    w = cfg.scaling.num_workers
    return (f"teacher {cfg.teacher_optim.max_steps} steps × {w * cfg.teacher_optim.micro_batch_size} rows, students "
            f"{cfg.optim.max_steps} steps × {w * cfg.optim.micro_batch_size} rows of {cfg.data.max_seq_len} tokens; "
            f"fine-tuning {cfg.evaluate.max_train_examples or 'all'} train / {cfg.evaluate.max_dev_examples or 'all'} dev "
            f"examples per task, {cfg.evaluate.epochs:g} epochs, batch {cfg.evaluate.batch_size}, lr {cfg.evaluate.lr:g}, "
            f"{cfg.evaluate.seeds} seeds")


if __name__ == "__main__":
    sys.exit(main())
