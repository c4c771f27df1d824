"""The served model: text in, a transformers-pipeline-shaped answer out, computed by ONNX Runtime.

This file is logged with every exported model (MLflow's "models from code"): it imports nothing from distil, so
``mlflow.pyfunc.load_model`` and ``mlflow models serve`` need only onnxruntime, transformers (for the tokenizer)
and numpy. Artifacts: ``onnx`` (the model file), ``tokenizer`` (a saved tokenizer folder) and ``serving``
(``serving.json``: the head and its settings, written by pipeline/serve/onnx_export.py).

Answers, one per input text, as the transformers pipeline the model replaces:

- fill-mask: the ``top_k`` fills of the text's mask token, best first, each ``{"score", "token", "token_str",
  "sequence"}``; a text with several mask tokens gets one such list per mask, in order.
- text-classification: ``{"label", "score"}`` with the task's own label names; a regression head (one output)
  answers ``{"label": None, "score": <value>}``.

A text is cut to the model's window (``max_length`` tokens), as the pipeline's ``truncation=True`` does. A text
without a mask token (fill-mask) or whose mask lies beyond the window, or input that is not text, raises
ValueError naming the input.
"""

from __future__ import annotations

import json

import mlflow.pyfunc
import numpy as np
from mlflow.models import set_model


def as_texts(model_input) -> list[str]:
    """The input texts of a pyfunc call: a string, a list of strings, a 1-D array, or a DataFrame (its ``text``
    column, or its only column), as ``mlflow models serve`` passes them."""
    if hasattr(model_input, "columns"):  # a pandas DataFrame: dataframe_split / dataframe_records, or a list turned into one
        column = "text" if "text" in model_input.columns else model_input.columns[0]
        if "text" not in model_input.columns and len(model_input.columns) != 1:
            raise ValueError(f"give the texts in a column named 'text' (columns: {list(model_input.columns)})")
        model_input = model_input[column].tolist()
    elif isinstance(model_input, np.ndarray):
        model_input = model_input.reshape(-1).tolist()
    if isinstance(model_input, str):
        model_input = [model_input]
    texts = list(model_input)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"input {i} is {type(text).__name__} {text!r:.60}: give text (a string per example)")
    return texts


def softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis (any shape ...×K → the same shape, rows summing to 1), stable for large logits."""
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


class OnnxTextModel(mlflow.pyfunc.PythonModel):
    """A fill-mask or text-classification model run by ONNX Runtime, text in and out (see the module docstring)."""

    # predict takes several input shapes on purpose (a list, a DataFrame, an array); without this MLflow warns at
    # every load that predict has no type hints (mlflow.pyfunc.PythonModel.__init_subclass__ reads it).
    _skip_type_hint_validation = True

    def load_context(self, context):
        """Read ``serving.json``, load the tokenizer and open an ONNX Runtime CPU session with every graph
        optimisation (intra-op threads from ``serving.json``, else one per core)."""
        import onnxruntime
        import transformers

        with open(context.artifacts["serving"]) as f:
            self.info = json.load(f)
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(context.artifacts["tokenizer"])
        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.info.get("threads"):
            options.intra_op_num_threads = int(self.info["threads"])
        self.session = onnxruntime.InferenceSession(context.artifacts["onnx"], options,
                                                    providers=["CPUExecutionProvider"])

    def predict(self, context, model_input, params=None):
        """One answer per input text (see the module docstring); ``params={"top_k": k}`` sets the fills per mask.
        Raises ValueError naming an input that is not text, or (fill-mask) has no mask token in the window."""
        texts = as_texts(model_input)
        if not texts:
            return []
        params = params or {}
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=int(self.info["max_length"]),
                             return_tensors="np")
        feeds = {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)}
        logits = self.session.run(["logits"], feeds)[0]
        if self.info["head"] == "fill-mask":
            return self._fill_mask(texts, feeds["input_ids"], logits, int(params.get("top_k", self.info.get("top_k", 5))))
        return self._classify(logits)

    def _fill_mask(self, texts, ids, logits, top_k):
        mask_id = self.tokenizer.mask_token_id
        answers = []
        for i, text in enumerate(texts):
            positions = np.flatnonzero(ids[i] == mask_id)
            if positions.size == 0 and self.tokenizer.mask_token in text:
                raise ValueError(f"input {i} {text!r:.80}: its {self.tokenizer.mask_token} lies beyond the first "
                                 f"{self.info['max_length']} tokens, which is all the model reads: shorten the text")
            if positions.size == 0:
                raise ValueError(f"input {i} {text!r:.80} has no {self.tokenizer.mask_token}: put one where a word "
                                 "should be filled in")
            per_mask = []
            for pos in positions:
                probs = softmax(logits[i, pos].astype(np.float64))
                best = np.argsort(-probs)[:top_k]
                fills = []
                for token in best:
                    filled = ids[i].copy()
                    filled[pos] = token
                    fills.append({"score": float(probs[token]), "token": int(token),
                                  "token_str": self.tokenizer.decode([int(token)]).strip(),
                                  "sequence": self.tokenizer.decode(filled[ids[i] != self.tokenizer.pad_token_id],
                                                                    skip_special_tokens=True)})
                per_mask.append(fills)
            answers.append(per_mask[0] if len(per_mask) == 1 else per_mask)
        return answers

    def _classify(self, logits):
        if logits.shape[-1] == 1:  # regression: the value itself
            return [{"label": None, "score": float(row[0])} for row in logits]
        labels = self.info.get("labels") or [f"LABEL_{i}" for i in range(logits.shape[-1])]
        probs = softmax(logits.astype(np.float64))
        return [{"label": labels[int(p.argmax())], "score": float(p.max())} for p in probs]


set_model(OnnxTextModel())
