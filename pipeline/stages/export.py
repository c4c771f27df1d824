"""The export stage: ONNX Runtime variants of the registered student, each proven before it is registered.

For the registered student (by default the version the register stage chose; or ``--model models:/…``, or a model
folder), for each of ``export.formats``:

1. export it to ONNX (fp32) and check parity with PyTorch on the prepared validation split: the largest
   |Δ logit| must stay within ``export.parity_atol`` (else the export is refused, with the numbers);
2. ``onnx-int8``: quantise the fp32 graph's weights to int8 (ONNX Runtime's dynamic quantisation);
3. score each variant where it will be used: masked-token accuracy on the same masked validation rows, and top-1
   agreement with PyTorch. A variant that loses more than ``export.max_drop`` points is not registered, and the
   stage says by how much it failed;
4. time every model at batch 1 on CPU (threads pinned to ``export.threads``): the serving rows of Table 3;
5. register each variant that passed as a version of ``<tracking.model_name>-onnx``: a text-in MLflow pyfunc
   (pipeline/serve/text_model.py) holding the ONNX file and the tokenizer, tagged with its source, its figures
   in the model card. The fastest variant that passed takes the source's alias (``champion``) when the source
   holds it, else ``challenger``.

Then, without a source given by hand, the same for every task model the task_distill stage registered
(pipeline/stages/export_tasks.py: gated on its task's dev score, registered as ``<model_name>-<task>-onnx``).

Resubmitting skips a source whose variants are registered already. Run by ``jobs.export`` and, when
``export.formats`` is set, by ``jobs.pipeline`` after register.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import shutil
import time

from pipeline import assets, families, registry, teachers, tracking
from pipeline.config import RunConfig
from pipeline.records import ExportRecord
from pipeline.serve import gate, onnx_export
from pipeline.stages import export_tasks
from pipeline.stages.store import load_record, optional, write_record

FP32, INT8 = onnx_export.FORMATS


def run(cfg: RunConfig, *, model: str | None = None, model_dir: str | None = None) -> ExportRecord:
    """Export, gate, time and register the student at ``model`` (a registry URI) or ``model_dir`` (a folder);
    default: the register stage's version. Raises ValueError (one line) for a source that cannot be found, a head
    other than fill-mask, a prepared corpus that is missing, or an fp32 export that does not match PyTorch."""
    t0 = time.perf_counter()
    if not cfg.export.formats:
        raise ValueError("export.formats is empty: set it, e.g. --set 'export.formats=[onnx, onnx-int8]'")
    source = _source(cfg, model=model, model_dir=model_dir)
    previous = load_record(cfg, "export")
    if previous is not None and _still_registered(cfg, previous, source["key"]):
        print(f"[distil] export: {source['uri']} was exported before (versions of {served_name(cfg)} in place): skipped",
              flush=True)
        tasks = previous.tasks
        if _task_models(cfg, model, model_dir) is not None:
            with tracking.stage_run("export", params={"source": "task models"}), _threads(cfg.export.threads):
                tasks = _tasks(cfg, previous, model=model, model_dir=model_dir)
        return write_record(cfg, "export", dataclasses.replace(previous, skipped=True, tasks=tasks))

    student, tokenizer = _load(source["folder"])
    prepared = optional(cfg, "prepare")
    if prepared is None:
        raise ValueError("the export's quality gate scores on the prepared validation split, and this run folder has "
                         "none: run `python -m jobs.prepare` with this config first")
    batches = gate.validation_batches(prepared.manifest, tokenizer, cfg.masking, rows=cfg.export.eval_rows,
                                      seed=cfg.run.seed)
    work = os.path.join(cfg.run_dir, "export", hashlib.sha256(source["key"].encode()).hexdigest()[:12])
    shutil.rmtree(work, ignore_errors=True)  # a half-written export of an interrupted job is redone whole
    e = cfg.export
    window = families.of(student).max_tokens(student.config)  # tokens, not position rows (RoBERTa's 514 take 512)
    seq_len = min(e.latency_seq_len, window)

    with _threads(e.threads):
        pt = gate.torch_logits(student)
        fp32_dir = os.path.join(work, FP32)
        fp32_path = onnx_export.export(student, tokenizer, fp32_dir, max_length=window,
                                       threads=e.threads)
        session = onnx_export.open_session(fp32_path, threads=e.threads)
        parity = gate.parity(pt, gate.ort_logits(session), batches)
        if parity["max_abs_diff"] > e.parity_atol:
            raise ValueError(
                f"the ONNX export of {source['uri']} differs from PyTorch by up to {parity['max_abs_diff']:.3g} in a "
                f"logit (export.parity_atol={e.parity_atol:g}); top-1 agrees on {parity['top1_agreement_pct']:.1f} % "
                "of masked tokens: refused. Report it with the model's config; raising export.parity_atol accepts it")
        ref, ref_preds = parity["reference"], parity["reference_predictions"]
        reference = {"student": {**ref, "latency_ms": gate.latency_ms(pt, vocab_size=len(tokenizer), seq_len=seq_len,
                                                                      runs=e.latency_runs),
                                 "parameters": _parameters(student), "size_mb": onnx_export.weights_mb(source["folder"])}}
        teacher = _teacher(cfg, tokenizer)
        if teacher is not None:
            t_run = gate.torch_logits(teacher)
            t_scores, _ = gate.masked_lm_scores(t_run, batches)
            reference["teacher"] = {**t_scores, "latency_ms": gate.latency_ms(t_run, vocab_size=len(tokenizer),
                                                                              seq_len=seq_len, runs=e.latency_runs),
                                    "parameters": _parameters(teacher), "size_mb": _parameters(teacher) * 4 / 1e6}
            del teacher

        variants = []
        for fmt in e.formats:
            folder = fp32_dir
            if fmt == INT8:
                folder = os.path.join(work, INT8)
                shutil.copytree(fp32_dir, folder, ignore=shutil.ignore_patterns("model.onnx*"))
                onnx_export.quantize_int8(fp32_path, os.path.join(folder, "model.onnx"))
            sess = session if fmt == FP32 else onnx_export.open_session(os.path.join(folder, "model.onnx"), threads=e.threads)
            run_v = gate.ort_logits(sess)
            scores = parity["candidate"] if fmt == FP32 else gate.masked_lm_scores(run_v, batches, ref_preds)[0]
            drop = ref["mlm_acc_pct"] - scores["mlm_acc_pct"]
            passed = drop <= e.max_drop
            variants.append({
                "format": fmt, "folder": folder, "passed": passed, **scores, "drop": drop,
                "max_abs_diff": parity["max_abs_diff"] if fmt == FP32 else None,
                "latency_ms": gate.latency_ms(run_v, vocab_size=len(tokenizer), seq_len=seq_len, runs=e.latency_runs),
                "size_mb": onnx_export.file_mb(os.path.join(folder, "model.onnx")),
                "reason": None if passed else (
                    f"{fmt} loses {drop:.2f} points of masked-token accuracy ({scores['mlm_acc_pct']:.2f} % against "
                    f"PyTorch's {ref['mlm_acc_pct']:.2f} %), more than export.max_drop={e.max_drop:g}: not registered"),
                "registered": None})
    for v in variants:
        if not v["passed"]:
            print(f"[distil] export: {v['reason']}", flush=True)

    markdown = serving_table(reference, variants, seq_len=seq_len, threads=e.threads)
    passing = sorted((v for v in variants if v["passed"]), key=lambda v: v["latency_ms"])
    lead_alias = cfg.tracking.alias if source["champion"] else "challenger"
    lineage = {"distil.source": source["uri"], "distil.source_key": source["key"], "git_sha": tracking.git_sha()}
    with tracking.stage_run("export", params={"source": source["uri"], **{f"export.{k}": v for k, v in dataclasses.asdict(e).items()}},
                            tags=lineage):
        import mlflow

        mlflow.log_text(markdown, "serving_table.md")
        mlflow.log_metrics({f"export/{v['format']}/{k}": v[k] for v in variants
                            for k in ("mlm_acc_pct", "drop", "agreement_pct", "latency_ms", "size_mb")})
        for v in passing:
            v["registered"] = registry.register_served(
                name=served_name(cfg), key=f"{source['key']}#{v['format']}", model_code=_text_model_file(),
                artifacts={"onnx": os.path.join(v["folder"], "model.onnx"),
                           "tokenizer": os.path.join(v["folder"], "tokenizer"),
                           "serving": os.path.join(v["folder"], onnx_export.SERVING_FILE)},
                input_example=[f"the movie was {tokenizer.mask_token} ."], pip_requirements=_requirements(),
                tags={**lineage, "distil.format": v["format"], "distil.mlm_acc_pct": f"{v['mlm_acc_pct']:.4f}",
                      "distil.drop_points": f"{v['drop']:.4f}", "distil.latency_ms": f"{v['latency_ms']:.3f}"},
                description=model_card(cfg, source, v, markdown, mask_token=tokenizer.mask_token),
                aliases=[lead_alias] if v is passing[0] else [])
        with _threads(e.threads):
            tasks = _tasks(cfg, previous, model=model, model_dir=model_dir)
    markdown = serving_table(reference, variants, seq_len=seq_len, threads=e.threads)  # now with the versions
    record = ExportRecord(source=source["uri"], key=source["key"], variants=variants, reference=reference, tasks=tasks,
                          markdown=markdown, seconds=time.perf_counter() - t0)
    return write_record(cfg, "export", record)


def served_name(cfg: RunConfig) -> str:
    """The registered model the served variants become versions of: ``<tracking.model_name>-onnx``."""
    return f"{cfg.tracking.model_name}-onnx"


def serving_table(reference: dict, variants: list[dict], *, seq_len: int, threads: int) -> str:
    """Table 3's serving rows as markdown: parameters, size on disk, batch-1 CPU latency and masked-token accuracy
    of the teacher and the student in PyTorch fp32 and of each ONNX Runtime variant, with the latency ratios."""
    student = reference["student"]
    base = reference.get("teacher", student)
    lines = [f"### Serving: batch 1 × {seq_len} tokens on CPU, {threads} thread(s), median of each model's timed runs",
             "", "| model | runtime | parameters | size (MB) | latency (ms) | × teacher latency | masked-token acc (%) | "
             "agreement with PyTorch (%) | registered |", "|---|---|---|---|---|---|---|---|---|"]

    def row(name, runtime, params, fig, agreement="", registered=""):
        return (f"| {name} | {runtime} | {params:,} | {fig['size_mb']:.1f} | {fig['latency_ms']:.2f} | "
                f"{fig['latency_ms'] / base['latency_ms']:.2f} | {fig['mlm_acc_pct']:.2f} | {agreement} | {registered} |")

    if "teacher" in reference:
        lines.append(row("teacher", "PyTorch fp32", reference["teacher"]["parameters"], reference["teacher"]))
    lines.append(row("student", "PyTorch fp32", student["parameters"], student, "100.00"))
    for v in variants:
        runtime = "ONNX Runtime fp32" if v["format"] == FP32 else "ONNX Runtime int8"
        reg = v["registered"]["uri"] if v.get("registered") else ("refused: " + f"−{v['drop']:.2f} points" if not v["passed"] else "")
        lines.append(row("student", runtime, student["parameters"], v, f"{v['agreement_pct']:.2f}", reg))
    lines += ["", f"Masked-token accuracy over {student['masked_tokens']:,} masked tokens of the prepared validation "
              "split, masked as the training stages validate; the PyTorch student is the reference of the gate."]
    return "\n".join(lines) + "\n"


def model_card(cfg: RunConfig, source: dict, variant: dict, table: str, *, mask_token: str = "[MASK]") -> str:
    """The served version's card: what it is, how to load and serve it (an example with the tokenizer's
    ``mask_token``), how good and fast, its lineage."""
    name = served_name(cfg)
    kind = "fp32" if variant["format"] == FP32 else "int8 weights (ONNX Runtime dynamic quantisation)"
    return "\n".join([
        f"# {name}: {variant['format']}", "",
        f"The student {source['uri']} in ONNX Runtime, {kind}: a fill-mask model that takes text.", "",
        "```python", "import mlflow", f'model = mlflow.pyfunc.load_model("models:/{name}@champion")',
        f'model.predict(["the movie was {mask_token} ."])  # per text: [{{"score", "token", "token_str", "sequence"}}, ...]',
        "```", "",
        f"Serve it: `mlflow models serve -m models:/{name}@champion --env-manager local -p 5001`, then POST "
        f'`{{"inputs": ["the movie was {mask_token} ."]}}` to `http://127.0.0.1:5001/invocations`.', "",
        "## How good", "",
        f"- masked-token accuracy {variant['mlm_acc_pct']:.2f} % ({variant['drop']:+.2f} points below PyTorch; "
        f"export.max_drop {cfg.export.max_drop:g})",
        f"- top-1 agreement with the PyTorch student {variant['agreement_pct']:.2f} %", "",
        "## How fast and how small", "", table,
        "## Lineage", "", f"- source: `{source['uri']}`", f"- checkpoint: `{source['key']}`", ""])


def _source(cfg: RunConfig, *, model: str | None, model_dir: str | None) -> dict:
    """{uri, key, folder, champion} of the model to export. ValueError (one line) when it cannot be found."""
    if model_dir is not None:
        path = os.path.abspath(os.path.expanduser(model_dir))
        assets.check_model_folder(path, flag="--model-dir", family=cfg.teacher.family, tokenizer=cfg.data.tokenizer,
                                  cache_root=cfg.cache_dir)
        return {"uri": path, "key": path, "folder": path, "champion": False}
    if model is None:
        reg = optional(cfg, "register")
        model = (reg.version_uri or reg.uri) if reg else f"models:/{cfg.tracking.model_name}@{cfg.tracking.alias}"
    version = registry.model_version(model)
    exact = f"models:/{version.name}/{version.version}"
    return {"uri": exact, "key": version.tags.get(registry.CHECKPOINT_TAG) or exact,
            "folder": registry.download_model(exact, cfg.cache_dir), "champion": cfg.tracking.alias in version.aliases}


def _load(folder: str):
    """(model, tokenizer) of a fill-mask folder. ValueError for another head (pipeline/serve/onnx_export.py)."""
    from transformers import AutoConfig

    architectures = AutoConfig.from_pretrained(folder).architectures or []
    if not any(a.endswith("ForMaskedLM") for a in architectures):
        raise ValueError(f"{folder} holds a {', '.join(architectures) or 'model without a head'}: the export stage "
                         "exports fill-mask students (*ForMaskedLM), which the register stage registers")
    return registry.load_student(folder)


def _task_models(cfg: RunConfig, model, model_dir):
    """The task_distill stage's record when its task models are to be exported too (no source given by hand)."""
    if model is not None or model_dir is not None or not cfg.task_distill.tasks:
        return None
    return optional(cfg, "task_distill")


def _tasks(cfg: RunConfig, previous: ExportRecord | None, *, model, model_dir) -> dict:
    """Every registered task model's variants (pipeline/stages/export_tasks.py), or {} without task models."""
    rec = _task_models(cfg, model, model_dir)
    if rec is None:
        return {}
    return export_tasks.run(cfg, rec, previous=previous.tasks if previous else {}, text_model=_text_model_file(),
                            requirements=_requirements())


def _teacher(cfg: RunConfig, tokenizer):
    """The run's teacher (for Table 3's reference row), or None when this run folder has no teacher stage."""
    rec = optional(cfg, "teacher")
    if rec is None:
        return None
    return teachers.load_teacher(rec.teacher_uri, cache_root=cfg.cache_dir, num_tokens=assets.tokenizer_rows(tokenizer))


def _still_registered(cfg: RunConfig, previous: ExportRecord, key: str) -> bool:
    """Whether ``previous`` exported this source with today's formats, and its registered variants still exist."""
    if previous.key != key or [v["format"] for v in previous.variants] != list(cfg.export.formats):
        return False
    return all(registry.registered_version(served_name(cfg), f"{key}#{v['format']}") is not None
               for v in previous.variants if v["passed"])


def _parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _text_model_file() -> str:
    """The served model's code (logged with each version; not imported here: importing it sets MLflow's model)."""
    return os.path.join(os.path.dirname(onnx_export.__file__), "text_model.py")


def _requirements() -> list[str]:
    """What a served variant needs, pinned to this environment's versions."""
    from importlib.metadata import version

    return [f"{p}=={version(p)}" for p in ("onnxruntime", "transformers", "tokenizers", "numpy")]


@contextlib.contextmanager
def _threads(n: int):
    """PyTorch's intra-op threads pinned to ``n`` (0: unchanged) for the timings, then restored."""
    import torch

    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
