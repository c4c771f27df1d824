"""The prepare stage on Ray Data: read → clean → tokenise → split → pack → parquet shards + manifest.

Ray Data only wires the pure batch functions of pipeline/packing.py. The output folder is named by a cache key
over the sources, the tokenizer's vocabulary and the packing settings, and the manifest is written last: a
folder with a manifest is complete, and re-running with the same inputs is a no-op.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import os
import shutil

import numpy as np

from pipeline import corpora, packing, storage
from pipeline.config import DataSection

MANIFEST = "manifest.json"
SPLITS = ("train", "val")


# ---- sources ----------------------------------------------------------------------------------------
def resolve_sources(cfg: DataSection, corpora_dir: str) -> list[tuple[str, list[str]]]:
    """[(format, paths)], with packaged corpora exported to jsonl and local globs expanded and checked."""
    problems, packaged, user = [], [], []
    for src in cfg.sources:
        if src.startswith("package:"):
            packaged.append(corpora.export(src[len("package:") :], corpora_dir))
        elif storage.is_s3(src):
            user.append(src)
        else:
            matches = sorted(glob.glob(os.path.expanduser(src)))
            if not matches:
                problems.append(f"data.sources: {src!r} matches no file: check the path or glob")
            user.extend(matches)
    if problems:
        raise ValueError("\n".join(problems))
    groups = [("jsonl", packaged)] if packaged else []
    return groups + ([(cfg.format, user)] if user else [])


def _fingerprint(paths: list[str]) -> list:
    out = []
    for p in paths:
        if storage.is_s3(p):
            out.append(p)
        else:
            st = os.stat(p)
            out.append([os.path.abspath(p), st.st_size, int(st.st_mtime)])
    return out


def cache_key(cfg: DataSection, groups, vocab_hash: str) -> str:
    payload = {
        "sources": [[fmt, _fingerprint(paths)] for fmt, paths in groups],
        "text_field": cfg.text_field, "vocab": vocab_hash, "max_seq_len": cfg.max_seq_len,
        "min_seq_tokens": cfg.min_seq_tokens, "max_unk_fraction": cfg.max_unk_fraction,
        "val_fraction": cfg.val_fraction, "max_docs": cfg.max_docs, "version": 1,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def vocab_hash(tokenizer) -> str:
    items = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]


# ---- the batch function (runs in Ray Data tasks) ------------------------------------------------------
@functools.lru_cache(maxsize=4)
def _tokenizer(path: str):
    from transformers import AutoTokenizer

    # Documents are longer than the model's window before packing cuts them: silence that length warning.
    return AutoTokenizer.from_pretrained(path, use_fast=True, model_max_length=10**9)


def tokenize_and_pack(batch: dict[str, np.ndarray], *, tokenizer_path: str, cfg: DataSection) -> dict[str, np.ndarray]:
    """Clean, split by document hash, tokenise and pack one batch; a last row carries the batch's counts."""
    tok = _tokenizer(tokenizer_path)
    special = packing.SpecialIds(cls=tok.cls_token_id, sep=tok.sep_token_id, pad=tok.pad_token_id, unk=tok.unk_token_id, mask=tok.mask_token_id)
    texts = [packing.clean_text(str(t)) for t in batch["text"]]
    counts = {"docs_in": len(texts), "docs_empty": sum(1 for t in texts if not t)}
    texts = [t for t in texts if t]
    by_split = {s: [] for s in SPLITS}
    for t in texts:
        by_split["val" if packing.is_validation(t, cfg.val_fraction) else "train"].append(t)
    ids_parts, mask_parts, split_parts = [], [], []
    for split, docs in by_split.items():
        token_ids = tok(docs, add_special_tokens=False)["input_ids"] if docs else []
        rows, dropped = packing.pack_documents(
            token_ids, max_seq_len=cfg.max_seq_len, special=special,
            min_seq_tokens=cfg.min_seq_tokens, max_unk_fraction=cfg.max_unk_fraction,
        )
        for reason, n in dropped.items():
            counts[f"seq_dropped_{reason}"] = counts.get(f"seq_dropped_{reason}", 0) + n
        ids_parts.append(rows["input_ids"])
        mask_parts.append(rows["attention_mask"])
        split_parts.append(np.full(len(rows["input_ids"]), split))
    return _with_stats_row(ids_parts, mask_parts, split_parts, counts, cfg.max_seq_len)


STAT_KEYS = ("docs_in", "docs_empty", "seq_dropped_short_sequence", "seq_dropped_unk_heavy")


def _with_stats_row(ids_parts, mask_parts, split_parts, counts, max_seq_len) -> dict[str, np.ndarray]:
    """Append one 'stats' row: Ray Data then sums the counts over all batches with one aggregation."""
    input_ids = np.concatenate([*ids_parts, np.zeros((1, max_seq_len), np.int32)])
    out = {
        "input_ids": input_ids,
        "attention_mask": np.concatenate([*mask_parts, np.zeros((1, max_seq_len), np.int8)]),
        "split": np.concatenate([*split_parts, np.array(["stats"])]),
    }
    for key in STAT_KEYS:
        col = np.zeros(len(input_ids), np.int64)
        col[-1] = counts.get(key, 0)
        out[key] = col
    return out


# ---- the stage -------------------------------------------------------------------------------------
def _read(fmt: str, paths: list[str], text_field: str):
    import ray.data

    fs = storage.pyarrow_filesystem(paths[0])
    if fmt == "text":
        return ray.data.read_text(paths, filesystem=fs)
    if fmt == "jsonl":
        ds = ray.data.read_json(paths, lines=True, filesystem=fs)
    else:
        ds = ray.data.read_parquet(paths, columns=[text_field], filesystem=fs)
    if text_field not in ds.columns():
        raise ValueError(f"{paths[0]}: no field {text_field!r}; its fields are {ds.columns()}: set data.text_field")
    return ds.select_columns([text_field]).rename_columns({text_field: "text"})


def prepare(cfg: DataSection, *, data_dir: str, run_root: str, tokenizer_path: str, tokenizer_name: str) -> dict:
    """Run the prepare stage (or return the cached manifest). Returns the manifest."""
    import ray.data

    groups = resolve_sources(cfg, os.path.join(run_root, "corpora"))
    vhash = vocab_hash(_tokenizer(tokenizer_path))
    key = cache_key(cfg, groups, vhash)
    out = storage.join(data_dir, key)
    cached = storage.read_json(storage.join(out, MANIFEST))
    if cached:
        return {**cached, "cached": True}
    if not storage.is_s3(out) and os.path.exists(out):
        shutil.rmtree(out)  # a folder without a manifest is an interrupted attempt

    ray.data.DataContext.get_current().enable_progress_bars = False
    parts = [_read(fmt, paths, cfg.text_field) for fmt, paths in groups]
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    if cfg.max_docs:
        ds = ds.limit(cfg.max_docs)
    packed = ds.map_batches(
        tokenize_and_pack, batch_format="numpy", batch_size=512,
        fn_kwargs={"tokenizer_path": tokenizer_path, "cfg": cfg},
    ).materialize()

    stats = packed.filter(expr="split == 'stats'").sum(list(STAT_KEYS))
    counts = {k: int(stats[f"sum({k})"]) for k in STAT_KEYS}
    manifest = {"key": key, "path": out, "sources": [[f, p] for f, p in groups], "tokenizer": tokenizer_name,
                "vocab_hash": vhash, "max_seq_len": cfg.max_seq_len, "counts": counts, "splits": {}}
    for split in SPLITS:
        rows = packed.filter(expr=f"split == '{split}'").select_columns(["input_ids", "attention_mask"])
        path = storage.join(out, split)
        # Few large files: every file is a read task, and a read task's worker process costs seconds to start.
        rows.write_parquet(path, filesystem=storage.pyarrow_filesystem(path), min_rows_per_file=cfg.rows_per_file)
        num_seqs = rows.count()
        num_tokens = int(rows.map_batches(_row_tokens, batch_format="numpy").sum("tokens") or 0) if num_seqs else 0
        manifest["splits"][split] = {"path": path, "num_sequences": num_seqs, "num_tokens": num_tokens}
    if manifest["splits"]["train"]["num_sequences"] == 0:
        raise ValueError(f"the corpus yielded no training sequences (counts: {counts}): add text or lower data.min_seq_tokens")
    storage.write_json(storage.join(out, MANIFEST), manifest)
    return {**manifest, "cached": False}


def _row_tokens(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"tokens": np.asarray(batch["attention_mask"]).reshape(len(batch["attention_mask"]), -1).sum(1)}


def fits_in_memory(manifest: dict, split: str, max_gib: float) -> bool:
    num_bytes = manifest["splits"][split]["num_sequences"] * manifest["max_seq_len"] * 5  # int32 ids + int8 mask
    return num_bytes <= max_gib * 2**30


def load_splits(manifest: dict, *, materialize_max_gib: float):
    """The train and validation datasets for Ray Train.

    A corpus whose packed rows fit in ``materialize_max_gib`` is read once by the driver into the object
    store (no read tasks, whose worker processes cost seconds each to start), so every trainer and sweep
    trial of this driver iterates it at once; a larger one streams from the parquet shards.
    """
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    out = {}
    for split in SPLITS:
        path = manifest["splits"][split]["path"]
        fs = storage.pyarrow_filesystem(path)
        if not fits_in_memory(manifest, split, materialize_max_gib):
            out[split] = ray.data.read_parquet(path, filesystem=fs)
            continue
        import pyarrow.parquet as pq

        table = pq.read_table(path[len("s3://") :] if fs else path, filesystem=fs)
        rows_per_block = max(1024, -(-table.num_rows // 16))
        out[split] = ray.data.from_arrow([table.slice(i, rows_per_block) for i in range(0, max(table.num_rows, 1), rows_per_block)])
    return out
