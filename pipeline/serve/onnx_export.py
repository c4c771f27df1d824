"""ONNX export, int8 quantisation and ONNX Runtime sessions of a fill-mask or sequence-classification model.

Shape legend: B batch, T sequence length, V vocabulary, C classes. Every graph takes ``input_ids`` and
``attention_mask`` (B×T int64, both axes dynamic) and answers ``logits`` (B×T×V for fill-mask, B×C for
classification), as the PyTorch model does.

- :func:`export` uses PyTorch's dynamo exporter (``torch.onnx.export(dynamo=True)``, which needs onnxscript),
  with its graph optimisation; ONNX Runtime applies its own fusions when it opens the file
  (``ORT_ENABLE_ALL``).
- :func:`quantize_int8` is ONNX Runtime's dynamic quantisation (int8 weights of MatMul/Gemm, activations
  quantised per batch at run time; no calibration data), the recipe of ORT's BERT examples.
- :func:`open_session` refuses, in one line, a file ONNX Runtime cannot load or run.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import warnings

import numpy as np

FILL_MASK, CLASSIFICATION = "fill-mask", "text-classification"
SERVING_FILE = "serving.json"  # the head and its settings, read by pipeline/serve/text_model.py
FORMATS = ("onnx", "onnx-int8")  # export.formats: ONNX fp32, and the same graph with int8 weights


def head_of(model) -> str:
    """The pipeline task of ``model``: fill-mask (``*ForMaskedLM``) or text-classification
    (``*ForSequenceClassification``). ValueError for any other head (a bare encoder, a QA or token head)."""
    name = type(model).__name__
    if name.endswith("ForMaskedLM"):
        return FILL_MASK
    if name.endswith("ForSequenceClassification"):
        return CLASSIFICATION
    raise ValueError(f"a {name} has neither a fill-mask nor a sequence-classification head: export a *ForMaskedLM "
                     "or *ForSequenceClassification model")


def export(model, tokenizer, out_dir: str, *, max_length: int, threads: int = 1) -> str:
    """Write ``model.onnx`` (fp32), the tokenizer and ``serving.json`` under ``out_dir``; returns the ONNX path.

    ``max_length``: the tokens the served model cuts each text to (the model's window at most). Raises
    ValueError (one line) when the exporter cannot trace the model or ONNX Runtime cannot run the result.
    """
    import torch

    head = head_of(model)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "model.onnx")
    model = model.eval()
    example = tokenizer(["an example to trace", "a second, longer example to trace the shapes with"], padding=True,
                        return_tensors="pt")
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    try:
        with _quiet():
            program = torch.onnx.export(
                model, (), kwargs={"input_ids": example["input_ids"], "attention_mask": example["attention_mask"]},
                dynamo=True, optimize=True, verbose=False, input_names=["input_ids", "attention_mask"],
                output_names=["logits"],
                dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}})
            program.save(path)
    except Exception as e:  # noqa: BLE001 -- the exporter's errors are many and long
        raise ValueError(f"torch.onnx.export cannot export this {type(model).__name__}: {_first_line(e)}") from None
    tokenizer.save_pretrained(os.path.join(out_dir, "tokenizer"))
    info = {"head": head, "max_length": int(max_length), "threads": int(threads), "top_k": 5,
            "labels": _labels(model) if head == CLASSIFICATION else None}
    with open(os.path.join(out_dir, SERVING_FILE), "w") as f:
        json.dump(info, f, indent=1)
    open_session(path)  # refuses here what ONNX Runtime cannot run
    return path


def quantize_int8(src: str, dst: str) -> str:
    """``src`` with int8 weights (ONNX Runtime's ``quantize_dynamic``, signed int8 weights) at ``dst``; returns it."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # The quantiser re-runs ONNX shape inference over the graph's own shape annotations; the dynamo exporter's
    # annotations of a classifier head disagree with it (768 vs 2 on the pooler/classifier reshape) and abort it.
    # Without them, inference starts from the inputs and the initializers only.
    model = onnx.load(src)
    del model.graph.value_info[:]
    bare = dst + ".bare.onnx"
    onnx.save(model, bare)
    try:
        with _quiet():
            quantize_dynamic(bare, dst, weight_type=QuantType.QInt8)
    finally:
        os.remove(bare)
    open_session(dst)
    return dst


def open_session(path: str, *, threads: int = 0):
    """An ONNX Runtime CPU session of ``path`` with every graph optimisation, checked by one tiny run.

    ``threads``: intra-op threads (0: ONNX Runtime's default, one per core). Raises ValueError (one line, with
    ONNX Runtime's reason) when the file cannot be loaded or run.
    """
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    try:
        session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        names = {i.name for i in session.get_inputs()}
        if names != {"input_ids", "attention_mask"}:
            raise ValueError(f"its inputs are {sorted(names)}, not input_ids and attention_mask")
        logits(session, np.full((1, 4), 1, dtype=np.int64), np.ones((1, 4), dtype=np.int64))
    except Exception as e:  # noqa: BLE001 -- ONNX Runtime raises its own exception types
        raise ValueError(f"ONNX Runtime cannot run {path}: {_first_line(e)}") from None
    return session


def logits(session, input_ids_BT: np.ndarray, attention_mask_BT: np.ndarray) -> np.ndarray:
    """The session's logits (float32 B×T×V or B×C) for int token ids and mask, B×T."""
    return session.run(["logits"], {"input_ids": input_ids_BT.astype(np.int64),
                                    "attention_mask": attention_mask_BT.astype(np.int64)})[0]


def weights_mb(folder: str) -> float:
    """Size of a Hugging Face folder's weight files (``*.safetensors``, ``*.bin``), in MB (10^6 bytes)."""
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)
               if f.endswith((".safetensors", ".bin"))) / 1e6


def file_mb(path: str) -> float:
    """Size of a file or a folder's files, in MB (10^6 bytes)."""
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files) / 1e6
    return os.path.getsize(path) / 1e6


def _labels(model) -> list[str]:
    """The label names of a classifier, by id (``config.id2label``)."""
    id2label = model.config.id2label or {}
    return [str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(model.config.num_labels)]


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return (lines[0] if lines else type(e).__name__)[:300]


@contextlib.contextmanager
def _quiet():
    """The exporter's and quantiser's progress prints and warnings, kept off the job's console."""
    loggers = [logging.getLogger(name) for name in ("", "torch.onnx", "torch.export", "onnxscript", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
