"""What an export must prove before it is registered: parity with PyTorch, quality where it will be used, speed.

Shape legend: B batch, T sequence length, V vocabulary.

- :func:`parity`: ONNX Runtime fp32 against the PyTorch model on the same held-out inputs: the largest
  |Δ logit| and the share of masked positions where both predict the same token (a near-tie, top-2 gap within
  twice the largest difference, counts as agreeing).
- :func:`masked_lm_scores`: masked-token accuracy (%) on the prepared validation split, masked as the training
  stages validate (uniform 15 %, 80/10/10, the run's seed), and top-1 agreement (%) with the PyTorch model. The
  quality gate compares a variant's accuracy with PyTorch's, in points.
- :func:`latency_ms`: batch-1 CPU latency, median of many runs in one process, threads pinned, the same inputs.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import numpy as np

from pipeline import storage
from pipeline.batches import Masker
from pipeline.masking import IGNORE_INDEX, step_generator
from pipeline.serve.onnx_export import logits


@dataclasses.dataclass(frozen=True)
class MaskedBatch:
    """Held-out masked-LM inputs: masked ids, attention mask and labels (−100 where nothing was chosen), B×T int64."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    labels: np.ndarray


def validation_batches(manifest, tokenizer, masking_cfg, *, rows: int, seed: int, batch_size: int = 16) -> list[MaskedBatch]:
    """The first ``rows`` packed rows of the prepared validation split, masked as the training stages' validation
    masks them (pipeline/train/tasks/mlm.py: uniform, token by token). ValueError when the split is empty."""
    import pyarrow.dataset as pads
    import torch

    path = manifest.splits["val"].path
    fs = storage.pyarrow_filesystem(path)
    table = pads.dataset(path[len("s3://"):] if fs else path, format="parquet", filesystem=fs).head(rows)
    if table.num_rows == 0:
        raise ValueError(f"the prepared validation split {path} is empty: the quality gate scores on it; raise "
                         "data.val_fraction and run prepare again")
    ids = torch.tensor(np.stack(table["input_ids"].to_numpy(zero_copy_only=False)).astype(np.int64))
    mask = torch.tensor(np.stack(table["attention_mask"].to_numpy(zero_copy_only=False)).astype(np.int64))
    uniform = dataclasses.replace(masking_cfg, smoothing=0.0, whole_word=False)
    masker = Masker.build(uniform, tokenizer)
    out = []
    for index, start in enumerate(range(0, ids.shape[0], batch_size)):
        b_ids, b_mask = ids[start:start + batch_size], mask[start:start + batch_size]
        masked, labels = masker(b_ids, b_mask, step_generator(seed, 0, 10**9 + index))
        out.append(MaskedBatch(masked.numpy(), b_mask.numpy(), labels.numpy()))
    return out


def torch_logits(model):
    """A function (input_ids B×T, attention_mask B×T numpy) → float32 logits numpy, running ``model`` on CPU."""
    import torch

    model = model.eval()

    def run(input_ids, attention_mask):
        with torch.inference_mode():
            return model(input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(attention_mask)).logits.float().numpy()

    return run


def ort_logits(session):
    """The same for an ONNX Runtime session (pipeline/serve/onnx_export.py)."""
    return lambda input_ids, attention_mask: logits(session, input_ids, attention_mask)


def parity(reference, candidate, batches: list[MaskedBatch]) -> dict:
    """Compare two models on the same batches in one pass over each:

    {"max_abs_diff": largest |Δ logit| over every unpadded position, "top1_agreement_pct": % of masked positions
    where the top-1 tokens agree (or the reference's top two are within twice the largest difference),
    "reference": the reference's masked-LM scores, "candidate": the candidate's (with "agreement_pct" against the
    reference), "reference_predictions": the reference's top-1 ids at masked positions, one array per batch}.
    Scores as :func:`masked_lm_scores` gives them."""
    worst, agree, count = 0.0, 0, 0
    ref_correct = got_correct = same = 0
    predictions = []
    for b in batches:
        ref, got = reference(b.input_ids, b.attention_mask), candidate(b.input_ids, b.attention_mask)
        sel = b.labels != IGNORE_INDEX
        r, g = ref[sel], got[sel]
        r_pred, g_pred = r.argmax(-1), g.argmax(-1)
        predictions.append(r_pred)
        np.subtract(ref, got, out=got)  # in place: a batch of full-vocabulary logits is B×T×V floats
        np.abs(got, out=got)
        worst = max(worst, float(got.max(axis=-1)[b.attention_mask.astype(bool)].max()))
        top2 = np.partition(r, -2, axis=-1)[:, -2:]
        tie = np.abs(top2[:, 1] - top2[:, 0]) <= 2 * worst
        agree += int(((r_pred == g_pred) | tie).sum())
        ref_correct += int((r_pred == b.labels[sel]).sum())
        got_correct += int((g_pred == b.labels[sel]).sum())
        same += int((r_pred == g_pred).sum())
        count += int(sel.sum())
    if count == 0:
        raise ValueError("no masked token in the validation rows scored: raise export.eval_rows")
    return {"max_abs_diff": worst, "top1_agreement_pct": 100.0 * agree / count,
            "reference": {"mlm_acc_pct": 100.0 * ref_correct / count, "masked_tokens": count},
            "candidate": {"mlm_acc_pct": 100.0 * got_correct / count, "masked_tokens": count,
                          "agreement_pct": 100.0 * same / count},
            "reference_predictions": predictions}


def masked_lm_scores(candidate, batches: list[MaskedBatch], reference_predictions: list[np.ndarray] | None = None):
    """(scores, predictions): scores {"mlm_acc_pct", "masked_tokens"} and, with ``reference_predictions`` (the
    PyTorch model's, from an earlier call), "agreement_pct"; predictions are the top-1 ids at masked positions,
    one array per batch."""
    correct = agree = count = 0
    predictions = []
    for i, b in enumerate(batches):
        sel = b.labels != IGNORE_INDEX
        pred = candidate(b.input_ids, b.attention_mask)[sel].argmax(-1)
        predictions.append(pred)
        correct += int((pred == b.labels[sel]).sum())
        count += int(sel.sum())
        if reference_predictions is not None:
            agree += int((pred == reference_predictions[i]).sum())
    if count == 0:
        raise ValueError("no masked token in the validation rows scored: raise export.eval_rows")
    scores = {"mlm_acc_pct": 100.0 * correct / count, "masked_tokens": count}
    if reference_predictions is not None:
        scores["agreement_pct"] = 100.0 * agree / count
    return scores, predictions


def latency_ms(run, *, vocab_size: int, seq_len: int, runs: int, warmup: int = 3) -> float:
    """Median wall time (ms) of ``run(input_ids, attention_mask)`` at batch 1 × ``seq_len`` tokens, over ``runs``
    calls after ``warmup``; the same fixed random ids every call. The caller pins the thread counts."""
    ids = np.random.default_rng(0).integers(1000 if vocab_size > 2000 else 5, vocab_size, size=(1, seq_len), dtype=np.int64)
    mask = np.ones_like(ids)
    times = []
    for i in range(warmup + runs):
        t0 = time.perf_counter()
        run(ids, mask)
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)
