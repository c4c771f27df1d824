"""The MLflow Model Registry: the chosen student becomes a version of ``<model_name>`` in the transformers flavor.

- The best candidate is chosen by ``tracking.select_metric`` (``select_mode`` min or max).
- The alias ``champion`` moves only when the new version beats the current champion on that metric;
  otherwise the new version gets ``challenger``.
- Registration is idempotent: a checkpoint that is already a version is not registered again.
"""

from __future__ import annotations

import os

from pipeline import storage
from pipeline.config import TrackingSection

CHECKPOINT_TAG = "distil.checkpoint"
METRIC_TAG_PREFIX = "distil.metric."


def choose(candidates: list[dict], cfg: TrackingSection) -> dict:
    scored = [c for c in candidates if cfg.select_metric in c["metrics"]]
    if not scored:
        raise ValueError(
            f"no candidate reports {cfg.select_metric!r} (candidates: {[c['source'] for c in candidates]}): "
            "set tracking.select_metric to a metric the runs report, e.g. val/mlm_loss"
        )
    key = lambda c: c["metrics"][cfg.select_metric]  # noqa: E731
    return min(scored, key=key) if cfg.select_mode == "min" else max(scored, key=key)


def local_model_dir(model_uri: str, cache_root: str) -> str:
    if storage.is_s3(model_uri):
        os.makedirs(cache_root, exist_ok=True)
        return storage.download_dir(model_uri, cache_root)
    if not os.path.exists(os.path.join(model_uri, "config.json")):
        raise ValueError(f"{model_uri} is not an exported HF model directory (no config.json)")
    return model_uri


def _better(new: float, old: float, mode: str) -> bool:
    return new < old if mode == "min" else new > old


def cpu_latency_ms(model, *, seq_len: int = 128, runs: int = 20) -> float:
    """Median wall time of one forward pass, batch 1 × ``seq_len`` tokens, on CPU, in milliseconds."""
    import statistics
    import time

    import torch

    seq_len = min(seq_len, model.config.max_position_embeddings)
    ids = torch.randint(1000, model.config.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(0))
    model = model.eval()
    times = []
    with torch.inference_mode():
        for i in range(runs + 3):
            t0 = time.perf_counter()
            model(input_ids=ids)
            if i >= 3:
                times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def num_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def model_card(*, name: str, model, teacher=None, metrics: dict, lineage: dict, config: dict | None) -> str:
    """A markdown model card: size and CPU latency (against the teacher's), metrics, lineage and config."""
    import json

    s_params, s_ms = num_params(model), cpu_latency_ms(model)
    lines = [f"# {name}", "",
             f"A {model.config.model_type} student ({getattr(model.config, 'n_layers', '?')} layers, width "
             f"{getattr(model.config, 'dim', '?')}) distilled by distil. Load it with "
             f"`mlflow.transformers.load_model(\"models:/{name}@champion\")`.", "",
             "| | student | teacher | student / teacher |", "|---|---|---|---|"]
    if teacher is not None:
        t_params, t_ms = num_params(teacher), cpu_latency_ms(teacher)
        lines += [f"| parameters | {s_params:,} | {t_params:,} | {s_params / t_params:.2f} |",
                  f"| CPU latency, batch 1 × 128 tokens (median of 20) | {s_ms:.1f} ms | {t_ms:.1f} ms | {s_ms / t_ms:.2f} |"]
    else:
        lines += [f"| parameters | {s_params:,} | | |", f"| CPU latency, batch 1 × 128 tokens (median of 20) | {s_ms:.1f} ms | | |"]
    lines += ["", "## Metrics", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4g} |" for k, v in sorted(metrics.items()) if isinstance(v, (int, float))]
    lines += ["", "## Lineage", ""] + [f"- {k}: `{v}`" for k, v in sorted(lineage.items())]
    if config:
        lines += ["", "## Config", "", "```json", json.dumps(config, indent=2, sort_keys=True, default=str), "```"]
    return "\n".join(lines) + "\n"


def register(cfg: TrackingSection, *, model_dir: str, checkpoint: str, metrics: dict, tags: dict,
             description: str | None = None) -> dict:
    """Log the model in the transformers flavor and register it; returns name, version, alias and URI."""
    import mlflow
    import torch
    import transformers
    from mlflow.tracking import MlflowClient

    if cfg.select_metric not in metrics:
        raise ValueError(f"the model to register has no {cfg.select_metric!r} metric, which tracking.select_metric "
                         f"ranks by: pass it (--metric {cfg.select_metric}=<value>) or register a checkpoint that carries it")
    client = MlflowClient()
    existing = _version_for_checkpoint(client, cfg.model_name, checkpoint)
    if existing is not None:
        aliases = list(existing.aliases)
        return {"name": cfg.model_name, "version": str(existing.version), "aliases": aliases, "new": False,
                "uri": f"models:/{cfg.model_name}/{existing.version}"}

    model = transformers.AutoModelForMaskedLM.from_pretrained(model_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    info = mlflow.transformers.log_model(
        transformers_model={"model": model, "tokenizer": tokenizer},
        name="student",
        task="fill-mask",
        registered_model_name=cfg.model_name,
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"transformers=={transformers.__version__}"],
    )
    version = str(info.registered_model_version)
    score = metrics[cfg.select_metric]
    version_tags = {CHECKPOINT_TAG: checkpoint, METRIC_TAG_PREFIX + cfg.select_metric: score, **tags}
    for k, v in version_tags.items():
        client.set_model_version_tag(cfg.model_name, version, k, str(v))
    if description:
        client.update_model_version(cfg.model_name, version, description=description)
        mlflow.log_text(description, "model_card.md")
    alias = _move_alias(client, cfg, version, score)
    return {"name": cfg.model_name, "version": version, "aliases": [alias], "new": True,
            "uri": f"models:/{cfg.model_name}@{alias}", "version_uri": f"models:/{cfg.model_name}/{version}"}


def _move_alias(client, cfg: TrackingSection, version: str, score: float) -> str:
    try:
        current = client.get_model_version_by_alias(cfg.model_name, cfg.alias)
    except Exception:  # noqa: BLE001 -- MLflow raises a generic error when the alias does not exist
        current = None
    old = current.tags.get(METRIC_TAG_PREFIX + cfg.select_metric) if current is not None else None
    if old is None or _better(score, float(old), cfg.select_mode):
        client.set_registered_model_alias(cfg.model_name, cfg.alias, version)
        return cfg.alias
    client.set_registered_model_alias(cfg.model_name, "challenger", version)
    return "challenger"


def _version_for_checkpoint(client, name: str, checkpoint: str):
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except Exception:  # noqa: BLE001 -- no such registered model yet
        return None
    for v in versions:
        if v.tags.get(CHECKPOINT_TAG) == checkpoint:
            return client.get_model_version(name, v.version)
    return None
