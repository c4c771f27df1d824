"""The prepare stage: Ray Data reads, cleans, splits, tokenises and packs the corpus (pipeline/corpus/), or
finds it prepared; its counts go to MLflow. Run by ``jobs.prepare``."""

from __future__ import annotations

import dataclasses
import time

from pipeline import assets, tracking
from pipeline.config import RunConfig, flatten
from pipeline.corpus import prepare as prepare_lib
from pipeline.records import Manifest, PrepareRecord
from pipeline.stages.store import load_record, write_record
from pipeline.stages.training import manifest_tags


def prepare_data(cfg: RunConfig) -> Manifest:
    """The prepared corpus's manifest: prepared now, or the cached one (no MLflow run)."""
    tokenizer_path = assets.resolve_local(cfg.data.tokenizer, cfg.cache_dir)
    return prepare_lib.prepare(cfg.data, data_dir=cfg.data_dir, run_root=cfg.run.root,
                               tokenizer_path=tokenizer_path, tokenizer_name=cfg.data.tokenizer)


def run(cfg: RunConfig) -> PrepareRecord:
    """Prepare the corpus (pipeline/corpus/prepare.py), or find it prepared; log its counts to MLflow."""
    t0 = time.perf_counter()
    manifest = prepare_data(cfg)
    if manifest.rows("val") < 1:  # the corpus stays cached: a rerun with more val is cheap
        raise ValueError(f"the prepared corpus has {manifest.rows('train')} training rows and no "
                         f"validation rows (data.val_fraction={cfg.data.val_fraction} put no document there), so no "
                         "val/* metric could be measured: raise data.val_fraction or add documents")
    try:
        earlier = load_record(cfg, "prepare")
    except ValueError:
        earlier = None
    if manifest.cached and earlier and earlier.manifest.key == manifest.key:
        print(f"[distil] prepare: the corpus is prepared already (cache key {manifest.key}); skipped", flush=True)
        return dataclasses.replace(earlier, skipped=True)
    with tracking.stage_run("prepare", params=flatten({"data": cfg.to_dict()["data"]})):
        import mlflow

        mlflow.log_metrics({
            **{f"data/{k}": v for k, v in manifest.counts.items()},
            **{f"data/{s}_sequences": v.num_sequences for s, v in manifest.splits.items()},
            **{f"data/{s}_tokens": v.num_tokens for s, v in manifest.splits.items()},
            "time/stage_s": time.perf_counter() - t0,
        })
        mlflow.set_tags(manifest_tags(manifest))
    return write_record(cfg, "prepare", PrepareRecord(manifest=manifest, seconds=time.perf_counter() - t0))
