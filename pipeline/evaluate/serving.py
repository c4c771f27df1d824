"""A fine-tuned classifier as it would be served: PyTorch fp32 and its ONNX Runtime variants (fp32, int8), each
re-scored on the task's dev set and timed at batch 1 on CPU. The evaluate stage's serving rows of Table 3 and the
export stage's task models (pipeline/stages/export_tasks.py) both measure through :func:`measure`.

Per variant: the largest |Δ logit| against PyTorch over the dev set, the share of dev examples whose predicted
class agrees, the dev score (the task's GLUE metrics, pipeline/glue_metrics.py) and its drop in points (score ×
100) from PyTorch's, the file size, and the batch-1 latency at the task's length with ``export.threads`` threads
(median of ``export.latency_runs`` calls in this process, the same ids each call; pipeline/serve/gate.py).
"""

from __future__ import annotations

import os
import shutil

import numpy as np

from pipeline import assets
from pipeline import glue_metrics as metrics
from pipeline.config import RunConfig
from pipeline.evaluate import units
from pipeline.serve import gate, onnx_export

FP32, INT8 = onnx_export.FORMATS


def measure(cfg: RunConfig, folder: str, data, *, formats, work: str) -> dict:
    """``folder``: a local fine-tuned classifier (HF folder) of ``data``'s task (a loaders.TaskData). Returns
    {"reference": {score, latency_ms, size_mb, parameters}: PyTorch fp32, "variants": [{format, folder, score,
    drop, max_abs_diff, agreement_pct, latency_ms, size_mb, passed, reason}] per format of ``formats`` (onnx,
    onnx-int8), exported under ``work`` (emptied first)}. ``passed``: the drop is at most ``export.max_drop``
    points and, for fp32, the logits are within ``export.parity_atol`` of PyTorch's; ``reason`` says why not."""
    e, spec = cfg.export, data.spec
    model, tokenizer = assets.load_classifier(folder)
    model.eval()
    seq_len = units.max_seq_len(cfg, spec)
    dev = units.tokenize(data, tokenizer, seq_len)["dev"]
    ids = dev["input_ids"].combine_chunks().to_numpy_ndarray().astype(np.int64)
    mask = dev["attention_mask"].combine_chunks().to_numpy_ndarray().astype(np.int64)
    labels = dev["labels"].to_pylist()
    shutil.rmtree(work, ignore_errors=True)
    pt = gate.torch_logits(model)
    ref_logits = _all_logits(pt, ids, mask)
    reference = {"score": score(spec, ref_logits, labels), "latency_ms": gate.latency_ms(
        pt, vocab_size=len(tokenizer), seq_len=seq_len, runs=e.latency_runs), "size_mb": onnx_export.weights_mb(folder),
        "parameters": sum(p.numel() for p in model.parameters())}
    variants = []
    if not formats:
        return {"reference": reference, "variants": variants}
    fp32_dir = os.path.join(work, FP32)
    fp32_path = onnx_export.export(model, tokenizer, fp32_dir, max_length=seq_len, threads=e.threads)
    for fmt in formats:
        path = fp32_path
        if fmt == INT8:
            shutil.copytree(fp32_dir, os.path.join(work, INT8), ignore=shutil.ignore_patterns("model.onnx*"))
            path = onnx_export.quantize_int8(fp32_path, os.path.join(work, INT8, "model.onnx"))
        run_v = gate.ort_logits(onnx_export.open_session(path, threads=e.threads))
        logits = _all_logits(run_v, ids, mask)
        diff = float(np.abs(logits - ref_logits).max())
        got = score(spec, logits, labels)
        drop = 100.0 * (reference["score"] - got)
        reason = None
        if fmt == FP32 and diff > e.parity_atol:
            reason = (f"its ONNX export differs from PyTorch by up to {diff:.3g} in a logit (export.parity_atol="
                      f"{e.parity_atol:g}); raising export.parity_atol accepts it")
        elif drop > e.max_drop:
            reason = (f"{fmt} loses {drop:.2f} points of dev score ({100 * got:.2f} against PyTorch's "
                      f"{100 * reference['score']:.2f}), more than export.max_drop={e.max_drop:g}")
        variants.append({"format": fmt, "folder": os.path.dirname(path), "passed": reason is None, "score": got,
                         "drop": drop, "max_abs_diff": diff,
                         "agreement_pct": 100.0 * float(np.mean(logits.argmax(-1) == ref_logits.argmax(-1))),
                         "latency_ms": gate.latency_ms(run_v, vocab_size=len(tokenizer), seq_len=seq_len, runs=e.latency_runs),
                         "size_mb": onnx_export.file_mb(path), "reason": reason})
    return {"reference": reference, "variants": variants}


def score(spec, logits: np.ndarray, labels: list) -> float:
    """The task's score (pipeline/glue_metrics.py) of ``logits`` (N × labels; regression: N × 1) against ``labels``."""
    preds = logits[:, 0].tolist() if spec.regression else logits.argmax(-1).tolist()
    return metrics.scores(spec.metrics, preds, labels)["score"]


def _all_logits(run, ids: np.ndarray, mask: np.ndarray, batch: int = 64) -> np.ndarray:
    return np.concatenate([run(ids[i:i + batch], mask[i:i + batch]) for i in range(0, len(ids), batch)])
