"""The prepare stage on Ray Data: read → clean → tokenise → split → pack → parquet shards + manifest.

Ray Data only wires the pure batch functions of pipeline/packing.py. The output folder is named by a cache key
over the sources, the tokenizer's vocabulary and the packing settings, and the manifest is written last: a
folder with a manifest is complete, and re-running with the same inputs is a no-op.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil

import numpy as np

from pipeline import packing, sources, storage
from pipeline.config import DataSection

MANIFEST = "manifest.json"
SPLITS = ("train", "val")


# ---- sources ----------------------------------------------------------------------------------------
def _fingerprint(groups: list[sources.Group]) -> list:
    """What identifies the input: every file's path, size and modification time (local or S3)."""
    out = []
    for g in groups:
        for p in g.paths:
            if storage.is_s3(p):
                info = storage.pyarrow_filesystem(p).get_file_info(storage.fs_path(p))
                out.append([g.format, p, info.size, info.mtime_ns])
            else:
                st = os.stat(p)
                out.append([g.format, os.path.abspath(p), st.st_size, int(st.st_mtime)])
    return out


KEY_FIELDS = ("text_field", "text_separator", "split", "hub_config", "decode_errors", "max_line_chars", "max_seq_len",
              "min_seq_tokens", "max_unk_fraction", "val_fraction", "max_docs")


def cache_key(cfg: DataSection, groups: list[sources.Group], vocab_hash: str) -> str:
    payload = {"sources": _fingerprint(groups), "vocab": vocab_hash, "version": 2,
               **{k: getattr(cfg, k) for k in KEY_FIELDS}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def vocab_hash(tokenizer) -> str:
    items = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]


# ---- readers: every source becomes rows {"text", "event", "n"} ----------------------------------------
# A document is a row with event "". A counted skip is a row with no text, the reason in "event" and how many
# in "n"; the batch function sums them into the manifest's counts.
def _rows(docs: list[str], counts: dict[str, int]) -> dict[str, np.ndarray]:
    events = list(counts.items())
    return {
        "text": np.array(docs + [""] * len(events), dtype=object),
        "event": np.array([""] * len(docs) + [k for k, _ in events], dtype=object),
        "n": np.array([0] * len(docs) + [v for _, v in events], dtype=np.int64),
    }


def decode_files(batch: dict[str, np.ndarray], *, fmt: str, cfg: DataSection) -> dict[str, np.ndarray]:
    docs, counts = [], {}
    for raw in batch["bytes"]:
        d, c = sources.decode_file(bytes(raw), fmt=fmt, separator=cfg.text_separator, text_field=cfg.text_field,
                                   errors=cfg.decode_errors)
        docs.extend(d)
        for k, v in c.items():
            counts[k] = counts.get(k, 0) + v
    return _rows(docs, counts)


def decode_column(batch: dict[str, np.ndarray], *, cfg: DataSection) -> dict[str, np.ndarray]:
    docs, counts = [], {}
    for value in batch[cfg.text_field]:
        text, event = sources.decode_value(value, cfg.decode_errors)
        if event:
            counts[event] = counts.get(event, 0) + 1
        if text is not None:
            docs.append(text)
    return _rows(docs, counts)


def read_arrow_files(batch: dict[str, np.ndarray], *, cfg: DataSection):
    """Stream the text column out of Arrow IPC files (save_to_disk folders and the datasets cache)."""
    import pyarrow as pa

    for path in batch["path"]:
        with pa.memory_map(str(path)) as f:
            reader = pa.ipc.open_stream(f)
            for record_batch in reader:
                yield decode_column({cfg.text_field: record_batch.column(cfg.text_field).to_numpy(zero_copy_only=False)}, cfg=cfg)


def _read(group: sources.Group, cfg: DataSection):
    import ray.data

    fs = storage.pyarrow_filesystem(group.paths[0])
    paths = [storage.fs_path(p) if fs else p for p in group.paths]
    if group.format in ("text", "jsonl"):
        # Raw bytes, decoded by our own code: a bad byte, a binary file or a bad JSON line is a counted skip
        # instead of a reader exception deep inside a Ray task.
        raw = ray.data.read_binary_files(paths, filesystem=fs)
        return raw.map_batches(decode_files, batch_size=1, fn_kwargs={"fmt": group.format, "cfg": cfg})
    if group.format == "parquet":
        ds = ray.data.read_parquet(paths, columns=[cfg.text_field], filesystem=fs)
        return ds.map_batches(decode_column, batch_format="numpy", fn_kwargs={"cfg": cfg})
    files = ray.data.from_items([{"path": p} for p in paths])
    return files.map_batches(read_arrow_files, batch_size=1, fn_kwargs={"cfg": cfg})


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
    counts: dict[str, int] = {}
    texts = []
    for text, event, n in zip(batch["text"], batch["event"], batch["n"]):
        if event:
            counts[event] = counts.get(event, 0) + int(n)
            continue
        clean, capped = packing.clean_document(str(text), cfg.max_line_chars)
        counts["lines_capped"] = counts.get("lines_capped", 0) + capped
        texts.append(clean)
    counts["docs_in"] = len(texts)
    counts["docs_empty"] = sum(1 for t in texts if not t)
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


# Every count the manifest reports, by reason. Documents: read, empty after cleaning, lines cut to
# data.max_line_chars. Skips: empty and binary files, documents with undecodable bytes (replaced or skipped),
# bad JSON lines, records without the text field. Packed rows dropped: too short, too many [UNK].
STAT_KEYS = ("docs_in", "docs_empty", "lines_capped", "files_empty", "files_binary", "docs_undecodable_replaced",
             "docs_undecodable_skipped", "lines_bad_json", "records_missing_field",
             "seq_dropped_short_sequence", "seq_dropped_unk_heavy")


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


def _block_token_counts(batch: dict[str, np.ndarray], *, vocab_size: int) -> dict[str, np.ndarray]:
    """One block's token counts (real tokens only), as one row; the driver adds the rows up."""
    ids = np.asarray(batch["input_ids"]).reshape(len(batch["input_ids"]), -1)
    real = np.asarray(batch["attention_mask"]).reshape(ids.shape).astype(bool)
    return {"counts": np.bincount(ids[real], minlength=vocab_size).astype(np.int64)[None]}


def token_counts(rows, vocab_size: int) -> np.ndarray:
    """Token counts over the packed training rows: per-block bincounts in Ray Data tasks, summed here."""
    total = np.zeros(vocab_size, np.int64)
    for row in rows.map_batches(_block_token_counts, batch_size=None, batch_format="numpy",
                                fn_kwargs={"vocab_size": vocab_size}).iter_rows():
        total += np.asarray(row["counts"])
    return total


# ---- the stage -------------------------------------------------------------------------------------
def prepare(cfg: DataSection, *, data_dir: str, run_root: str, tokenizer_path: str, tokenizer_name: str) -> dict:
    """Run the prepare stage (or return the cached manifest). Returns the manifest."""
    import ray.data

    groups = sources.resolve(cfg, os.path.join(run_root, "corpora"))
    tokenizer = _tokenizer(tokenizer_path)
    vhash = vocab_hash(tokenizer)
    key = cache_key(cfg, groups, vhash)
    out = storage.join(data_dir, key)
    cached = storage.read_json(storage.join(out, MANIFEST))
    if cached:
        return {**cached, "cached": True}
    if not storage.is_s3(out) and os.path.exists(out):
        shutil.rmtree(out)  # a folder without a manifest is an interrupted attempt

    ray.data.DataContext.get_current().enable_progress_bars = False
    parts = [_read(g, cfg) for g in groups]
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    if cfg.max_docs:
        ds = ds.limit(cfg.max_docs)
    packed = ds.map_batches(
        tokenize_and_pack, batch_format="numpy", batch_size=512,
        fn_kwargs={"tokenizer_path": tokenizer_path, "cfg": cfg},
    ).materialize()

    stats = packed.filter(expr="split == 'stats'").sum(list(STAT_KEYS))
    counts = {k: int(stats[f"sum({k})"]) for k in STAT_KEYS}
    manifest = {"key": key, "path": out, "sources": [{"format": g.format, "names": g.names, "files": g.paths} for g in groups],
                "tokenizer": tokenizer_name, "vocab_hash": vhash, "vocab_size": len(tokenizer),
                "max_seq_len": cfg.max_seq_len, "counts": counts, "splits": {}}
    for split in SPLITS:
        rows = packed.filter(expr=f"split == '{split}'").select_columns(["input_ids", "attention_mask"])
        path = storage.join(out, split)
        # Few large files: every file is a read task, and a read task's worker process costs seconds to start.
        rows.write_parquet(path, filesystem=storage.pyarrow_filesystem(path), min_rows_per_file=cfg.rows_per_file)
        num_seqs = rows.count()
        num_tokens = int(rows.map_batches(_row_tokens, batch_format="numpy").sum("tokens") or 0) if num_seqs else 0
        manifest["splits"][split] = {"path": path, "num_sequences": num_seqs, "num_tokens": num_tokens}
        if split == "train":
            # For frequency-smoothed masking (HF's recipe, count^-0.7): counts of the training tokens.
            manifest["token_counts"] = token_counts(rows, len(tokenizer)).tolist() if num_seqs else [0] * len(tokenizer)
    if manifest["splits"]["train"]["num_sequences"] == 0:
        raise ValueError(f"the corpus yielded no training sequences (counts: {counts}): add text or lower data.min_seq_tokens")
    storage.write_json(storage.join(out, MANIFEST), manifest)
    return {**manifest, "cached": False}


def _row_tokens(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"tokens": np.asarray(batch["attention_mask"]).reshape(len(batch["attention_mask"]), -1).sum(1)}


def fits_in_memory(manifest: dict, split: str, max_gib: float) -> bool:
    num_bytes = manifest["splits"][split]["num_sequences"] * manifest["max_seq_len"] * 5  # int32 ids + int8 mask
    return num_bytes <= max_gib * 2**30


def load_splits(manifest: dict, *, materialize_max_gib: float, val_rows: int | None = None):
    """The train and validation datasets for Ray Train.

    A corpus whose packed rows fit in ``materialize_max_gib`` is read once by the driver into the object
    store (no read tasks, whose worker processes cost seconds each to start), so every trainer and sweep
    trial of this driver iterates it at once; a larger one streams from the parquet shards. A validation split
    too large to hold is cut to its first ``val_rows`` rows (what the evaluation reads), read by the driver:
    otherwise every rank would start its own read of the whole split for a few batches.
    """
    import pyarrow.dataset as pads
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    out = {}
    for split in SPLITS:
        path = manifest["splits"][split]["path"]
        fs = storage.pyarrow_filesystem(path)
        local = path[len("s3://") :] if fs else path
        if fits_in_memory(manifest, split, materialize_max_gib):
            table = pads.dataset(local, format="parquet", filesystem=fs).to_table()
        elif split == "val" and val_rows:
            table = pads.dataset(local, format="parquet", filesystem=fs).head(val_rows)
        else:
            out[split] = ray.data.read_parquet(path, filesystem=fs)
            continue
        rows_per_block = max(1024, -(-table.num_rows // 16))
        out[split] = ray.data.from_arrow([table.slice(i, rows_per_block) for i in range(0, max(table.num_rows, 1), rows_per_block)])
    return out
