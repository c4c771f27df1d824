"""The paper's tables from the units' results (Sanh et al. 2019): Table 1 (downstream scores and retention) and
Table 3 (size and CPU inference time), as data, markdown and matplotlib plots.

Table 1: per task, each model's dev score as the median over seeds (min–max beside it), the macro-score (mean of
the task medians), and retention = student macro / teacher macro in %. Table 3: parameters in millions and the
time of a full pass over one task's dev set on CPU at batch size 1 (the paper's protocol, STS-B: 668 s for
BERT-base, 410 s for DistilBERT), teacher and student, with the ratios.
"""

from __future__ import annotations

import math
import statistics
import time

from pipeline import glue_metrics as metrics


def chance_level(baseline: float, dev_size: int) -> float:
    """The score below which a model is indistinguishable from always answering the majority class: the baseline
    plus two binomial standard errors of a share measured on ``dev_size`` examples, 2·sqrt(b(1−b)/n) (for 400
    examples and b = 0.58, about +0.05). A heuristic for accuracy-like scores in [0, 1]; ``baseline`` as
    majority_baseline returns it."""
    b = min(max(baseline, 0.0), 1.0)
    return baseline + 2 * math.sqrt(b * (1 - b) / max(dev_size, 1))


def table1(results: list[dict], models: list, tasks: list[str], chance: dict[str, float] | None = None) -> dict:
    """{"tasks": [...], "rows": [{model, source, is_teacher, tasks: {task: {median, min, max, seeds, at_chance}},
    macro, retention, at_chance}], "teacher_at_chance"}; retention (in %) against the teacher's macro, None without
    a teacher row and None when the teacher scores at chance on every task (``chance``: {task: chance_level},
    None: not judged), since a ratio of two chance scores says nothing."""
    chance = chance or {}
    rows = []
    for m in models:
        per_task = {}
        for t in tasks:
            values = [r["scores"]["score"] for r in results if r["model"] == m.key and r["task"] == t and "score" in r["scores"]]
            if values:
                med, lo, hi = metrics.median_and_range(values)
                per_task[t] = {"median": med, "min": lo, "max": hi, "seeds": len(values),
                               "at_chance": t in chance and med <= chance[t]}
        macro = metrics.macro({t: v["median"] for t, v in per_task.items()}) if len(per_task) == len(tasks) else None
        at_chance = bool(per_task) and all(v["at_chance"] for v in per_task.values())
        rows.append({"model": m.key, "source": m.source, "is_teacher": m.is_teacher, "tasks": per_task, "macro": macro,
                     "at_chance": at_chance})
    teacher = next((r for r in rows if r["is_teacher"] and r["macro"]), None)
    teacher_at_chance = bool(teacher and teacher["at_chance"])
    for r in rows:
        r["retention"] = (100 * r["macro"] / teacher["macro"] if teacher and not teacher_at_chance and r["macro"] is not None
                          else None)
    return {"tasks": tasks, "rows": rows, "teacher_at_chance": teacher_at_chance}


def table1_markdown(t1: dict) -> str:
    """Table 1 as a markdown table (scores ×100, as the paper prints them)."""
    head = "| model | " + " | ".join(t1["tasks"]) + " | macro | retention |"
    seeds = max((v["seeds"] for r in t1["rows"] for v in r["tasks"].values()), default=1)
    what = "median over seeds (min–max)" if seeds > 1 else "one seed"
    lines = [f"Table 1: dev scores ×100, {what}", "", head,
             "|---" * (len(t1["tasks"]) + 3) + "|"]
    for r in t1["rows"]:
        cells = []
        for t in t1["tasks"]:
            v = r["tasks"].get(t)
            cell = ("—" if v is None else f"{100 * v['median']:.1f} ({100 * v['min']:.1f}–{100 * v['max']:.1f})"
                    if v["seeds"] > 1 else f"{100 * v['median']:.1f}")
            cells.append(cell + (" ≈ chance" if v and v.get("at_chance") else ""))
        macro = "—" if r["macro"] is None else f"{100 * r['macro']:.1f}"
        ret = "—" if r["retention"] is None else f"{r['retention']:.1f} %"
        name = _label(r)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {macro} | {ret} |")
    if any(v.get("at_chance") for r in t1["rows"] for v in r["tasks"].values()):
        lines += ["", "≈ chance: within two standard errors of always answering the majority class on this dev set."]
    if t1.get("teacher_at_chance"):
        lines.append("The teacher scores at chance on every task, so no retention is claimed: train the teacher "
                     "longer, or give evaluate.mode: finetune more examples.")
    return "\n".join(lines)


def _label(row: dict) -> str:
    """A row's model, marked when it is the teacher under another name (a teacher named teacher needs no mark)."""
    return f"{row['model']} (teacher)" if row["is_teacher"] and row["model"] != "teacher" else row["model"]


def dev_pass_seconds(model, rows: list[list[int]]) -> float:
    """Wall seconds of one forward pass per example at batch size 1 (each example at its own length), on CPU."""
    import torch

    with torch.no_grad():
        model(input_ids=torch.tensor([rows[0]]))  # warm-up
        t0 = time.perf_counter()
        for ids in rows:
            model(input_ids=torch.tensor([ids]))
    return time.perf_counter() - t0


def table3(measured: list[dict], task: str, examples: int) -> dict:
    """``measured``: [{model, is_teacher, params, seconds}] → the table with student/teacher ratios."""
    import torch

    teacher = next((m for m in measured if m["is_teacher"]), None)
    rows = []
    for m in measured:
        row = {**m, "params_m": m["params"] / 1e6}
        if teacher and not m["is_teacher"]:
            row["params_ratio"] = m["params"] / teacher["params"]
            row["time_ratio"] = m["seconds"] / teacher["seconds"]
        rows.append(row)
    return {"task": task, "examples": examples, "threads": torch.get_num_threads(), "rows": rows}


def table3_markdown(t3: dict) -> str:
    """Table 3 as markdown: parameters (millions) and the CPU batch-1 dev pass, with ratios to the teacher."""
    lines = [f"Table 3: size and CPU inference time (batch 1, {t3['examples']} dev examples of {t3['task']}, "
             f"{t3['threads']} threads)", "", "| model | parameters (M) | dev pass (s) | params / teacher | time / teacher |",
             "|---|---|---|---|---|"]
    for r in t3["rows"]:
        ratios = (f"{r['params_ratio']:.2f} | {r['time_ratio']:.2f}" if "params_ratio" in r
                  else "1.00 | 1.00" if r["is_teacher"] else "— | —")  # no teacher evaluated: no ratio
        name = _label(r)
        lines.append(f"| {name} | {r['params_m']:.2f} | {r['seconds']:.2f} | {ratios} |")
    return "\n".join(lines)


def serving_markdown(serving: dict) -> str:
    """Table 3's serving rows as markdown: each model fine-tuned on the task (the first seed), as served: runtime,
    parameters, size on disk, batch-1 CPU latency at the task's length and its ratio to the teacher's, dev score."""
    teacher = next((r for r in serving["rows"] if r["is_teacher"]), None)
    lines = [f"Table 3, as served: fine-tuned on {serving['task']} (first seed), batch 1 × {serving['seq_len']} tokens on "
             f"CPU, {serving['threads']} thread(s), median latency", "",
             "| model | runtime | parameters (M) | size (MB) | latency (ms) | latency / teacher | dev score |",
             "|---|---|---|---|---|---|---|"]
    for r in serving["rows"]:
        ratio = f"{r['latency_ms'] / teacher['latency_ms']:.2f}" if teacher else "—"
        score = f"{r['score']:.4f}" + (f" ({-r['drop'] + 0.0:+.2f})" if "drop" in r else "")
        name = _label(r) if r["runtime"] == "PyTorch fp32" else r["model"]
        lines.append(f"| {name} | {r['runtime']} | {r['parameters'] / 1e6:.2f} | {r['size_mb']:.1f} | "
                     f"{r['latency_ms']:.2f} | {ratio} | {score} |")
    if any(r.get("reason") for r in serving["rows"]):
        lines += ["", *(f"- {r['model']}, {r['runtime']}: {r['reason']}" for r in serving["rows"] if r.get("reason"))]
    return "\n".join(lines)


def majority_baseline(data) -> float:
    """The task score (pipeline/glue_metrics.py) of always answering the training set's most common class, or its
    mean for regression, on the dev set of ``data`` (a loaders.TaskData): what a model that learned nothing scores."""
    train, dev = data.train.labels, data.dev.labels
    guess = sum(train) / len(train) if data.spec.regression else max(set(train), key=train.count)
    return metrics.scores(data.spec.metrics, [guess] * len(dev), dev)["score"]


def scores_figure(t1: dict, baselines: dict[str, float] | None = None):
    """Grouped bars: per task (and the macro-score when there are several tasks), each model's median dev score,
    its value on the bar; ``baselines`` ({task: score}), e.g. the majority class's share of the dev set, drawn as
    a dashed line across the task's bars. The y-range starts near the lowest value shown, so that differences of
    a few points are visible; the legend sits beside the plot, not over the bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks, baselines = list(t1["tasks"]), baselines or {}
    groups = [*tasks, "macro"] if len(tasks) > 1 else tasks
    fig, ax = plt.subplots(figsize=(max(4, 1.6 * len(groups) + 3), 3.2))
    width = 0.8 / max(len(t1["rows"]), 1)
    shown = []
    for i, r in enumerate(t1["rows"]):
        values = [r["tasks"].get(t, {}).get("median", 0.0) for t in tasks] + ([r["macro"] or 0.0] if len(groups) > len(tasks) else [])
        bars = ax.bar([g + i * width for g in range(len(groups))], values, width, label=r["model"])
        ax.bar_label(bars, labels=[f"{100 * v:.1f}" for v in values], fontsize=7)
        shown += values
    label = "majority class"  # named once in the legend
    for g, task in enumerate(tasks):
        if task in baselines:
            ax.hlines(baselines[task], g - width / 2, g + 0.8 - width / 2, colors="gray", linestyles="dashed", label=label)
            shown.append(baselines[task])
            label = None
    if shown:
        low, high = min(shown), max(shown)
        ax.set_ylim(max(0.0, low - 0.1 * max(high - low, 0.1)), min(1.0, high + 0.15 * max(high - low, 0.1)) + 0.02)
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], groups)
    ax.set_ylabel("dev score (median over seeds)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return fig


def loss_figure(history: dict[str, list[tuple[int, float]]]):
    """The distill run's loss curves, {metric: [(step, value), …]}: one panel per term, each on its own scale, so
    that a small term (L_ce at T=2, L_cos) is as visible as the total."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    terms = [(name, points) for name, points in sorted(history.items()) if points]
    fig, axes = plt.subplots(max(len(terms), 1), 1, figsize=(5, 1.6 * max(len(terms), 1) + 0.6), sharex=True,
                             squeeze=False)
    for ax, (name, points) in zip(axes[:, 0], terms):
        steps, values = zip(*sorted(points))
        ax.plot(steps, values)
        ax.set_ylabel(name, fontsize=8)
    axes[-1, 0].set_xlabel("optimizer step")
    fig.tight_layout()
    return fig


def seconds_per_unit(results: list[dict]) -> float | None:
    """The median wall time of a fine-tuning unit, for RESULTS.md's budget line."""
    values = [r["seconds"] for r in results if r.get("steps")]
    return statistics.median(values) if values else None
