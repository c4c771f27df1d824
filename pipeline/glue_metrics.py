"""GLUE's metrics, computed with scikit-learn and scipy (Wang et al. 2019, Table 1; the paper's Table 1 reports
them ×100): accuracy, F1 of the positive class, Matthews correlation, Pearson and Spearman correlation.

A task's *score* is the mean of its metrics (MRPC and QQP: F1 and accuracy; STS-B: Pearson and Spearman), and
the *macro-score* is the mean of the task scores, WNLI included, as the GLUE leaderboard and DistilBERT's
Table 1 count them. Every value is in [−1, 1] (correlations) or [0, 1]; none is ×100 here.
"""

from __future__ import annotations

import math

import numpy as np

from pipeline.config.metrics import TASK_METRICS as METRICS


def compute(metric: str, predictions, labels) -> float:
    """One metric over a dev set: ``predictions`` and ``labels`` are length-N sequences (class ids, or floats for
    pearson/spearman). Raises ValueError for an unknown metric or an empty dev set. A correlation of constant
    predictions is undefined in scipy (NaN); it is reported as 0.0, the value of predictions that carry no
    information."""
    from scipy import stats
    from sklearn import metrics as skm

    y_pred, y_true = np.asarray(predictions), np.asarray(labels)
    if len(y_true) == 0 or len(y_pred) != len(y_true):
        raise ValueError(f"{metric}: {len(y_pred)} predictions for {len(y_true)} labels; a dev set needs at least one example")
    if metric == "accuracy":
        return float(skm.accuracy_score(y_true, y_pred))
    if metric == "f1":
        return float(skm.f1_score(y_true, y_pred, pos_label=1, average="binary", zero_division=0.0))
    if metric == "mcc":
        return float(skm.matthews_corrcoef(y_true, y_pred))
    if metric in ("pearson", "spearman"):
        if np.ptp(y_pred) == 0 or np.ptp(y_true) == 0:
            return 0.0
        fn = stats.pearsonr if metric == "pearson" else stats.spearmanr
        value = float(fn(y_pred.astype(float), y_true.astype(float))[0])
        return 0.0 if math.isnan(value) else value
    raise ValueError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")


def scores(metrics: tuple[str, ...], predictions, labels) -> dict[str, float]:
    """Each of ``metrics`` plus ``score``, their mean (the task's GLUE score)."""
    out = {m: compute(m, predictions, labels) for m in metrics}
    out["score"] = float(np.mean([out[m] for m in metrics]))
    return out


def macro(task_scores: dict[str, float]) -> float:
    """The macro-score: the mean of the tasks' scores (each task counts once). ValueError when there is none."""
    if not task_scores:
        raise ValueError("a macro-score needs at least one task score")
    return float(np.mean(list(task_scores.values())))


def median_and_range(values: list[float]) -> tuple[float, float, float]:
    """(median, min, max) over seeds: the paper reports the median of 5 fine-tuning runs."""
    arr = np.asarray(values, dtype=float)
    return float(np.median(arr)), float(arr.min()), float(arr.max())
