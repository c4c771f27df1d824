"""The export stage's second half: ONNX Runtime variants of every registered task model (the task_distill stage's
``<tracking.model_name>-<task>``), each checked against PyTorch and re-scored on its task's dev set before it is
registered as ``<tracking.model_name>-<task>-onnx``, a text-in MLflow pyfunc answering ``{"label", "score"}`` with
the task's label names (pipeline/serve/text_model.py).

Per task and format: the largest |Δ logit| of ONNX Runtime fp32 against PyTorch over the dev set must stay within
``export.parity_atol``; a variant whose dev score (the task's GLUE metrics, pipeline/glue_metrics.py) falls more
than ``export.max_drop`` points (score × 100) below PyTorch's is not registered. Batch-1 CPU latency at the task's
length, threads pinned to ``export.threads``.
"""

from __future__ import annotations

import os

from pipeline import assets, registry, tracking
from pipeline.config import RunConfig
from pipeline.config.task_distill_checks import parse_tasks
from pipeline.evaluate import serving, units
from pipeline.serve import onnx_export
from pipeline.stages import evaluate

FP32, INT8 = onnx_export.FORMATS


def run(cfg: RunConfig, task_record, *, previous: dict, text_model: str, requirements: list[str]) -> dict:
    """{task: {source, key, variants, reference, markdown}} for every task model ``task_record`` (a
    TaskDistillRecord) registered; a task whose variants are all registered already keeps its ``previous`` entry."""
    specs = {e.spec.name: e.spec for e in parse_tasks(cfg.task_distill.tasks, cfg.task_distill.transfer)}
    out = {}
    for task, table in task_record.tasks.items():
        reg = (table.get("registered") or {}).get("student")
        if not reg or task not in specs:
            continue
        key = table["best_kd"]["model_dir"]
        name = served_name(cfg, task)
        if previous.get(task, {}).get("key") == key and all(
                registry.registered_version(name, f"{key}#{v['format']}") is not None
                for v in previous[task]["variants"] if v["passed"]) and \
                [v["format"] for v in previous[task]["variants"]] == list(cfg.export.formats):
            print(f"[distil] export: {name} was exported before: skipped", flush=True)
            out[task] = previous[task]
            continue
        out[task] = _export_one(cfg, task, specs[task], key, reg, text_model=text_model, requirements=requirements)
    return out


def served_name(cfg: RunConfig, task: str) -> str:
    """``<tracking.model_name>-<task>-onnx``."""
    return f"{cfg.tracking.model_name}-{task}-onnx"


def _export_one(cfg: RunConfig, task: str, spec, key: str, reg: dict, *, text_model: str, requirements: list[str]) -> dict:
    e = cfg.export
    data = evaluate.load_tasks(cfg, specs=[spec], announce=False)[task]
    seq_len = units.max_seq_len(cfg, spec)
    measured = serving.measure(cfg, assets.resolve_local(key, cfg.cache_dir), data, formats=e.formats,
                               work=os.path.join(cfg.run_dir, "export", f"task-{task}"))
    reference, variants = measured["reference"], measured["variants"]
    for v in variants:
        if v["format"] == FP32 and v["max_abs_diff"] > e.parity_atol:
            raise ValueError(f"the ONNX export of the {task} model {reg['uri']}: {v['reason']}: refused")
        v["registered"] = None
        if v["reason"]:
            v["reason"] = f"the {task} model: {v['reason']}: not registered"
    passing = sorted((v for v in variants if v["passed"]), key=lambda v: v["latency_ms"])
    name = served_name(cfg, task)
    lineage = {"distil.source": reg.get("version_uri") or reg["uri"], "distil.source_key": key, "distil.task": task,
               "git_sha": tracking.git_sha()}
    for v in variants:
        if not v["passed"]:
            print(f"[distil] export: {v['reason']}", flush=True)
    table = markdown(task, reference, variants, seq_len=seq_len, threads=e.threads)
    for v in passing:
        v["registered"] = registry.register_served(
            name=name, key=f"{key}#{v['format']}", model_code=text_model,
            artifacts={"onnx": os.path.join(v["folder"], "model.onnx"), "tokenizer": os.path.join(v["folder"], "tokenizer"),
                       "serving": os.path.join(v["folder"], onnx_export.SERVING_FILE)},
            input_example=["a text to classify"], pip_requirements=requirements,
            tags={**lineage, "distil.format": v["format"], "distil.dev_score": f"{v['score']:.4f}",
                  "distil.drop_points": f"{v['drop']:.4f}", "distil.latency_ms": f"{v['latency_ms']:.3f}"},
            description=_card(name, task, v, table), aliases=[cfg.tracking.alias] if v is passing[0] else [])
    table = markdown(task, reference, variants, seq_len=seq_len, threads=e.threads)  # now with the versions
    import mlflow

    mlflow.log_text(table, f"serving_table_{task}.md")
    return {"source": lineage["distil.source"], "key": key, "reference": reference, "variants": variants, "markdown": table}


def markdown(task: str, reference: dict, variants: list[dict], *, seq_len: int, threads: int) -> str:
    """The task model's serving rows: PyTorch fp32 and each ONNX Runtime variant, dev score, size, batch-1 latency."""
    lines = [f"### Serving the {task} model: batch 1 × {seq_len} tokens on CPU, {threads} thread(s)", "",
             "| runtime | dev score | Δ points | size (MB) | latency (ms) | × PyTorch latency | registered |",
             "|---|---|---|---|---|---|---|",
             f"| PyTorch fp32 | {reference['score']:.4f} | | {reference['size_mb']:.1f} | {reference['latency_ms']:.2f} | 1.00 | |"]
    for v in variants:
        runtime = "ONNX Runtime fp32" if v["format"] == FP32 else "ONNX Runtime int8"
        reg = v["registered"]["uri"] if v.get("registered") else ("refused" if not v["passed"] else "")
        lines.append(f"| {runtime} | {v['score']:.4f} | {-v['drop'] + 0.0:+.2f} | {v['size_mb']:.1f} | {v['latency_ms']:.2f} | "
                     f"{v['latency_ms'] / reference['latency_ms']:.2f} | {reg} |")
    return "\n".join(lines) + "\n"


def _card(name: str, task: str, variant: dict, table: str) -> str:
    return "\n".join([
        f"# {name}: {variant['format']}", "", f"The {task} task model in ONNX Runtime: text in, `{{label, score}}` out.", "",
        "```python", "import mlflow", f'model = mlflow.pyfunc.load_model("models:/{name}@champion")',
        'model.predict(["a text to classify"])  # [{"label": …, "score": …}]', "```", "", table])
