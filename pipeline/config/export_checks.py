"""The export section's checks (pipeline/stages/export.py, pipeline/serve/): formats, the gate's settings, and the
registered name the export adds to (``<tracking.model_name>-onnx``)."""

from __future__ import annotations

import math

from pipeline.config.tree import RunConfig


def export_problems(cfg: RunConfig) -> list[str]:
    """Every problem of the export section, one fix-it line each; [] when valid (pipeline/config/checks.py
    reports them with the rest)."""
    e, p = cfg.export, []
    allowed = ("onnx", "onnx-int8")  # pipeline/serve/onnx_export.py FORMATS (not imported: it imports numpy)
    unknown = [f for f in e.formats if f not in allowed]
    if unknown:
        p.append(f"export.formats={list(e.formats)!r}: {', '.join(map(repr, unknown))} is not a format; use any of "
                 f"{list(allowed)} (onnx: ONNX Runtime fp32; onnx-int8: int8 weights), or [] for no export stage")
    if len(set(e.formats)) != len(e.formats):
        p.append(f"export.formats={list(e.formats)!r}: a format is listed twice; list each once")
    if not math.isfinite(e.max_drop) or e.max_drop < 0:
        p.append(f"export.max_drop={e.max_drop}: the points of masked-token accuracy a variant may lose, a number >= 0 "
                 "(default 1.0)")
    if not math.isfinite(e.parity_atol) or e.parity_atol <= 0:
        p.append(f"export.parity_atol={e.parity_atol}: the largest |logit difference| allowed, a number > 0 (default 1e-3)")
    for key, value, low in (("eval_rows", e.eval_rows, 1), ("latency_seq_len", e.latency_seq_len, 1),
                            ("latency_runs", e.latency_runs, 1), ("threads", e.threads, 0)):
        if value < low:
            p.append(f"export.{key}={value}: must be >= {low}")
    if e.formats:
        from mlflow.exceptions import MlflowException  # deferred: importing pipeline.config must not import MLflow
        from mlflow.utils import validation  # deferred: the same

        try:
            validation._validate_model_name(cfg.tracking.model_name + "-onnx")
        except MlflowException as err:
            p.append(f"tracking.model_name={cfg.tracking.model_name!r}: the export registers <name>-onnx, which MLflow "
                     f"refuses ({err.message}); pick a shorter name")
    return p
