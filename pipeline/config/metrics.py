"""Metric names and their better direction: what the training loop and the evaluate stage report, and
:func:`metric_mode`. The config checks (pipeline/config/checks.py) accept a selection or sweep metric by these
tables; the registry (pipeline/registry.py) ranks students by :func:`metric_mode`."""

from __future__ import annotations

# What the loop reports, and which way is better: selection and ASHA may use these (pipeline/train/worker.py, pipeline/train/tasks/).
# A causal family (GPT-2) reports val/clm_loss, val/clm_acc and loss/clm where a masked LM reports the mlm ones.
VAL_METRICS = {"val/mlm_loss": "min", "val/perplexity": "min", "val/mlm_acc": "max", "val/teacher_agreement": "max",
               "val/clm_loss": "min", "val/clm_acc": "max"}
LOSS_METRICS = {"loss/total": "min", "loss/ce": "min", "loss/mlm": "min", "loss/clm": "min", "loss/cos": "min",
                "loss/mse": "min"}
# The evaluate stage's downstream metrics (pipeline/evaluate/): every one is better when higher.
EVAL_METRICS = {"eval/macro": "max"}
# The metrics a downstream task may be scored by (pipeline/glue_metrics.py computes them; GLUE's choices).
TASK_METRICS = ("accuracy", "f1", "mcc", "pearson", "spearman")


def metric_mode(metric: str, mode: str = "auto") -> str:
    """The better direction of ``metric``: ``mode`` when it is min or max, else by its family (val/ and loss/ as
    listed above; eval/*, accuracies and correlations: max; anything else: min)."""
    if mode in ("min", "max"):
        return mode
    known = {**VAL_METRICS, **LOSS_METRICS, **EVAL_METRICS}
    return known.get(metric, "max" if metric.startswith("eval/") else "min")
