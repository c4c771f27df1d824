"""The task distillation stage's checks and report: a named teacher checked against its task, dev scores, Table 2
(Sanh et al. 2019: the fine-tuned teacher, the student fine-tuned alone, the task-distilled student), its figure
and the task model's card."""

from __future__ import annotations

import os
import statistics

from pipeline import assets, families, models, registry
from pipeline import glue_metrics as metrics
from pipeline.evaluate import report, task_search

GENERIC = "LABEL_"  # transformers' default label names (LABEL_0, …): a head that says nothing of its classes
KINDS = {"ce": "student, fine-tuned alone (cross-entropy)", "kd": "student, task-distilled",
         "kd+transfer": "student, task-distilled + transfer set"}


def check_teacher(uri: str, data, tokenizer, cfg) -> str:
    """The local folder of the fine-tuned classifier ``uri`` (a folder, hub id, s3:// or models:/…) named as the
    teacher of ``data``'s task. ValueError, one line naming the task and the fix, when it is not a sequence
    classifier, when its task kind, label count or label names differ from the task's, or when its vocabulary is
    not the run's tokenizer's."""
    from transformers import AutoConfig, AutoTokenizer

    task, spec = data.spec.name, data.spec
    where = f"task_distill.tasks: the teacher of {task} ({uri})"
    folder = (registry.download_model(uri, cfg.cache_dir, flag=where) if uri.startswith("models:/")
              else assets.resolve_local(uri, cfg.cache_dir))
    if folder.startswith(("/", "./", "../", "~")) and not os.path.isdir(folder):
        raise ValueError(f"{where}: no such folder; give a fine-tuned classifier's folder (config.json, weights, "
                         "tokenizer), a hub id, s3:// or models:/…")
    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise ValueError(f"{where}: cannot be loaded ({str(e).splitlines()[0][:200]}); give a fine-tuned classifier's "
                         "folder (config.json, weights, tokenizer)") from None
    if not any(a.endswith("ForSequenceClassification") for a in (config.architectures or [])):
        raise ValueError(f"{where} is a {', '.join(config.architectures or ['model without a head'])}, not a fine-tuned "
                         "sequence classifier: name a classifier, or leave teacher out to fine-tune one here")
    regression = config.num_labels == 1 or config.problem_type == "regression"
    if regression != spec.regression:
        raise ValueError(f"{where} is a {'regression' if regression else 'classification'} head and {task} is a "
                         f"{spec.kind} task: name a teacher fine-tuned for this task")
    if config.num_labels != data.num_labels:
        raise ValueError(f"{where} has {config.num_labels} labels and {task} has {data.num_labels} "
                         f"({', '.join(data.label_names)}): name a teacher fine-tuned for this task")
    names = [str(config.id2label.get(i, f"{GENERIC}{i}")) for i in range(config.num_labels)]
    if not spec.regression and not all(n.startswith(GENERIC) for n in names) and names != list(data.label_names):
        raise ValueError(f"{where} has labels {names} (by id) and {task} has {list(data.label_names)}: the ids must mean "
                         "the same classes; name a teacher fine-tuned on this task's labels")
    try:
        family = families.of(config).name
    except ValueError:
        family = None  # a model type of no family (ELECTRA reads BERT's WordPiece): its vocabulary decides below
    if family is not None and family != cfg.teacher.family:
        raise ValueError(f"{where} is a {family} classifier and this run's teacher.family is {cfg.teacher.family}: the "
                         f"student reads the teacher's inputs, so both need one family's tokens; name a "
                         f"{cfg.teacher.family} classifier")
    if any(os.path.exists(os.path.join(folder, f)) for f in registry.TOKENIZER_FILES):
        if AutoTokenizer.from_pretrained(folder).get_vocab() != tokenizer.get_vocab():
            raise ValueError(f"{where} has another vocabulary than the run's tokenizer (data.tokenizer="
                             f"{cfg.data.tokenizer}): the student reads the teacher's inputs, so both need one vocabulary")
    elif config.vocab_size < assets.tokenizer_rows(tokenizer):
        raise ValueError(f"{where} has {config.vocab_size:,} vocabulary rows and the run's tokenizer "
                         f"{assets.tokenizer_rows(tokenizer):,}: it was not trained with this tokenizer")
    return folder


def with_labelled(tables: dict) -> dict:
    """The tokenised task tables (pipeline/evaluate/units.py tokenize) with a ``labelled`` column, True for all."""
    import pyarrow as pa

    return {split: t.append_column("labelled", pa.array([True] * t.num_rows)) for split, t in tables.items()}


def dev_score(folder: str, dev, spec, batch: int = 32) -> float:
    """The task score (pipeline/glue_metrics.py) of the classifier in ``folder`` on a tokenised dev table, on CPU."""
    import torch

    model, _ = assets.quiet_from_pretrained(_classifier(), folder)
    model.eval()
    ids, mask = (dev[k].combine_chunks().to_numpy_ndarray() for k in ("input_ids", "attention_mask"))
    preds = []
    with torch.inference_mode():
        for i in range(0, len(ids), batch):
            logits = model(input_ids=torch.as_tensor(ids[i:i + batch], dtype=torch.long),
                           attention_mask=torch.as_tensor(mask[i:i + batch], dtype=torch.long)).logits.float()
            preds += (logits.squeeze(-1) if spec.regression else logits.argmax(-1)).tolist()
    return metrics.scores(spec.metrics, preds, dev["labels"].to_pylist())["score"]


def task_table(cfg, task: str, data, teacher: dict, student, results: list[dict], *, seq_len: int) -> dict:
    """One task's Table 2: {"rows": [{model, what, median, min, max, seeds, retention, params, latency_ms}],
    "best_kd": {model_dir, score, seed, model}: the best task-distilled student (kd or kd+transfer), "teacher": teacher, "max_seq_len"}; retention in % of the teacher's score;
    latency: batch 1 × ``seq_len`` tokens (the task's length) on CPU (median of 20), the students' measured on the task-distilled one
    (the same architecture)."""
    teacher_model, _ = assets.quiet_from_pretrained(_classifier(), assets.resolve_local(teacher["model_dir"], cfg.cache_dir))
    kd = [r for r in results if r["model"] in ("kd", "kd+transfer")]  # the task-distilled students, with or without
    best = max(kd, key=lambda r: r["scores"].get("score", float("-inf")))  # a transfer set: the first best is kept
    student_model, _ = assets.quiet_from_pretrained(_classifier(), assets.resolve_local(best["model_dir"], cfg.cache_dir))
    t_fig = {"params": models.count_parameters(teacher_model), "latency_ms": registry.cpu_latency_ms(teacher_model, seq_len=seq_len)}
    s_fig = {"params": models.count_parameters(student_model), "latency_ms": registry.cpu_latency_ms(student_model, seq_len=seq_len)}
    baseline = report.majority_baseline(data)
    chance = report.chance_level(baseline, len(data.dev))
    teacher_at_chance = teacher["score"] <= chance
    rows = [{"model": "teacher", "what": f"teacher ({'fine-tuned here' if teacher['fine_tuned'] else 'given'})",
             "median": teacher["score"], "min": teacher["score"], "max": teacher["score"], "seeds": 1,
             "retention": None if teacher_at_chance else 100.0, "at_chance": teacher_at_chance, **t_fig}]
    for kind in KINDS:
        scores = [r["scores"]["score"] for r in results if r["model"] == kind and "score" in r["scores"]]
        if not scores:
            continue
        med = statistics.median(scores)
        retention = None if teacher_at_chance or not teacher["score"] else 100.0 * med / teacher["score"]
        rows.append({"model": kind, "what": KINDS[kind], "median": med, "min": min(scores), "max": max(scores),
                     "seeds": len(scores), "retention": retention, "at_chance": med <= chance, **s_fig})
    return {"rows": rows, "best_kd": {"model_dir": best["model_dir"], "score": best["scores"]["score"], "seed": best["seed"],
                                     "model": best["model"]},
            "teacher": teacher, "max_seq_len": seq_len, "student": student.source, "majority": baseline, "chance": chance}


def markdown(task: str, table: dict) -> str:
    """Table 2 of one task as markdown."""
    lines = [f"### Table 2, {task}: dev score (median over seeds, min–max), retention of the teacher's score, size and "
             f"CPU latency (batch 1 × {table['max_seq_len']} tokens)", "",
             "| model | score | min–max | seeds | retention (%) | parameters | latency (ms) |", "|---|---|---|---|---|---|---|"]
    for r in table["rows"]:
        retention = f"{r['retention']:.1f}" if r["retention"] is not None else "—"
        score = f"{r['median']:.4f}" + (" ≈ chance" if r.get("at_chance") else "")
        lines.append(f"| {r['what']} | {score} | {r['min']:.4f}–{r['max']:.4f} | {r['seeds']} | {retention} | "
                     f"{r['params']:,} | {r['latency_ms']:.2f} |")
    lines += ["", f"Always answering the training set's majority class scores {table['majority']:.4f}; a score up to "
              f"{table['chance']:.4f} (two standard errors above it) is marked ≈ chance"
              + ("; the teacher scores at chance, so no retention is claimed." if table["rows"][0].get("at_chance") else ".")]
    if table.get("settings"):
        lines += ["", "Task distillation's loss settings: " + ", ".join(f"{k} {v:g}" for k, v in table["settings"].items())
                  + (" (the best point of the search below)." if table.get("search") else " (the config's).")]
    if table.get("search"):
        lines += ["", task_search.markdown(task, table["search"]).rstrip()]
    reg = table.get("registered") or {}
    if reg.get("student"):
        lines += ["", f"Registered: {reg['student']['uri']} ({table['best_kd'].get('model', 'kd')}, seed {table['best_kd']['seed']}, dev score "
                  f"{table['best_kd']['score']:.4f}); the student started from {table['student']}."]
    return "\n".join(lines) + "\n"


def model_card(name: str, task: str, data, table: dict, lineage: dict) -> str:
    """The registered task model's card: what it answers, how to load it, Table 2, lineage."""
    labels = ", ".join(data.label_names) if not data.spec.regression else "a score (regression)"
    return "\n".join([
        f"# {name}", "", f"A task-distilled student for {task}: answers {labels}. Load it with", "", "```python",
        "import mlflow", f'clf = mlflow.transformers.load_model("models:/{name}@champion")',
        'clf("a text to classify")  # [{"label": …, "score": …}]', "```", "", markdown(task, table),
        "## Lineage", "", *(f"- {k}: `{v}`" for k, v in sorted(lineage.items())), ""])


def figure(per_task: dict):
    """Each task's models as bars (median dev score, min–max as error bars), the teacher's score as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(per_task), figsize=(4.5 * len(per_task), 3.6), squeeze=False)
    for ax, (task, table) in zip(axes[0], per_task.items()):
        rows = [r for r in table["rows"] if r["model"] != "teacher"]
        teacher = table["rows"][0]["median"]
        xs = range(len(rows))
        med = [r["median"] for r in rows]
        err = [[m - r["min"] for m, r in zip(med, rows)], [r["max"] - m for m, r in zip(med, rows)]]
        ax.bar(xs, med, yerr=err, capsize=4, color=["#9aa5b1", "#2f7ed8", "#1b4f8a"][: len(rows)])
        ax.axhline(teacher, color="black", linestyle="--", linewidth=1)
        ax.axhline(table["majority"], color="#c0392b", linestyle=":", linewidth=1)
        ax.text(-0.5, table["majority"], " majority class", va="bottom", ha="left", fontsize=8, color="#c0392b")
        ax.text(len(rows) - 0.5, teacher, f" teacher {teacher:.3f}", va="bottom", ha="right", fontsize=8)
        for x, m in zip(xs, med):
            ax.text(x, m, f"{m:.3f}", ha="center", va="bottom", fontsize=8)
        low = min([r["min"] for r in rows] + [teacher, table["majority"]])
        ax.set_ylim(max(0.0, low - 0.1 * (1 - low) - 0.02), min(1.0, max([r["max"] for r in rows] + [teacher]) + 0.05))
        ax.set_xticks(list(xs), [r["model"] for r in rows])
        ax.set_title(task)
        ax.set_ylabel("dev score")
    fig.tight_layout()
    return fig


def _classifier():
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification
