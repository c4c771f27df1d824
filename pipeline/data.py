"""The prepare stage on Ray Data: read → clean → tokenise → split → pack → parquet shards + manifest.

Ray Data only wires the pure batch functions of pipeline/packing.py. The output folder is named by a cache key
over the sources, the tokenizer's vocabulary and the packing settings, and the manifest is written last: a
folder with a manifest is complete, and re-running with the same inputs is a no-op.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil
import uuid

import numpy as np
from ray.data import Datasink

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
              "min_seq_tokens", "max_unk_fraction", "val_fraction", "max_docs", "read_chunk_mb")


def cache_key(cfg: DataSection, groups: list[sources.Group], vocab_hash: str) -> str:
    payload = {"sources": _fingerprint(groups), "vocab": vocab_hash, "version": 3,
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


def read_ranges(batch: dict[str, np.ndarray], *, fmt: str, cfg: DataSection, fs) -> dict[str, np.ndarray]:
    """Byte ranges of text or jsonl files → documents (see sources.read_range)."""
    docs, counts = [], {}
    for path, start, end, size in zip(batch["path"], batch["start"], batch["end"], batch["size"]):
        d, c = sources.read_range(str(path), int(start), int(end), int(size), fs=fs, fmt=fmt, separator=cfg.text_separator,
                                  text_field=cfg.text_field, errors=cfg.decode_errors)
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


def _sizes(paths: list[str], fs) -> list[int]:
    if fs is None:
        return [os.path.getsize(p) for p in paths]
    return [info.size for info in fs.get_file_info([storage.fs_path(p) for p in paths])]


def _read(group: sources.Group, cfg: DataSection):
    import ray.data

    fs = storage.pyarrow_filesystem(group.paths[0])
    paths = [storage.fs_path(p) if fs else p for p in group.paths]
    if group.format in ("text", "jsonl"):
        # Raw bytes, decoded by our own code: a bad byte, a binary file or a bad JSON line is a counted skip
        # instead of a reader exception deep inside a Ray task. A file of one record per line larger than
        # data.read_chunk_mb is cut into byte ranges, each read by its own task.
        chunk = max(1, int(cfg.read_chunk_mb * 2**20))
        split = sources.splittable(group.format, cfg.text_separator)
        items = [{"path": p, "start": a, "end": b, "size": size}
                 for p, size in zip(group.paths, _sizes(group.paths, fs))
                 for a, b in (sources.byte_ranges(size, chunk) if split else [(0, size)])]
        ranges = ray.data.from_items(items, override_num_blocks=len(items))  # one range per block, so per task
        return ranges.map_batches(read_ranges, batch_size=1, fn_kwargs={"fmt": group.format, "cfg": cfg, "fs": fs})
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


@dataclasses.dataclass(frozen=True)
class WorkerTokenizer:
    """What a Ray Data task needs of the tokenizer: the fast tokenizer's own JSON and the special ids.

    The tasks load it with the `tokenizers` library alone: importing transformers (and torch with it) costs a
    fresh worker process seconds, which on a small cluster is a large share of the prepare stage.
    """

    json: str
    special: packing.SpecialIds
    vocab_size: int

    @classmethod
    def of(cls, tok) -> "WorkerTokenizer":
        if not getattr(tok, "is_fast", False):
            raise ValueError(f"{type(tok).__name__} is not a fast tokenizer: the prepare stage needs one (tokenizer.json)")
        special = packing.SpecialIds(cls=tok.cls_token_id, sep=tok.sep_token_id, pad=tok.pad_token_id,
                                     unk=tok.unk_token_id, mask=tok.mask_token_id)
        return cls(json=tok.backend_tokenizer.to_str(), special=special, vocab_size=len(tok))

    def encode(self, docs: list[str]) -> list[list[int]]:
        return [e.ids for e in _backend(self.json).encode_batch(docs, add_special_tokens=False)] if docs else []


@functools.lru_cache(maxsize=4)
def _backend(tokenizer_json: str):
    import tokenizers

    backend = tokenizers.Tokenizer.from_str(tokenizer_json)
    backend.no_truncation()  # a saved tokenizer.json may carry a model window's truncation and padding
    backend.no_padding()
    return backend


DOCS_PER_CALL = 512  # documents per tokenizer call: bounds the memory of one call's token lists


def tokenize_and_pack(batch: dict[str, np.ndarray], *, tokenizer: WorkerTokenizer, cfg: DataSection):
    """Clean, split by document hash, tokenise and pack one block, DOCS_PER_CALL documents at a time.

    Yields the packed rows, then one 'stats' row with the block's counts: the manifest's counts by reason, the
    rows and real tokens per split, and the training split's token counts. The driver adds up the stats rows,
    so the manifest needs no further pass over the packed data.
    """
    counts: dict[str, int] = {}
    train_counts = np.zeros(tokenizer.vocab_size, np.int64)
    for start in range(0, len(batch["text"]), DOCS_PER_CALL):
        part = {k: batch[k][start:start + DOCS_PER_CALL] for k in ("text", "event", "n")}
        rows = _tokenize_and_pack(part, tokenizer, cfg, counts, train_counts)
        if len(rows["split"]):
            yield rows
    nz = np.flatnonzero(train_counts)
    yield _stats_row(counts, nz, train_counts[nz], cfg.max_seq_len)


def _tokenize_and_pack(batch, tokenizer: WorkerTokenizer, cfg: DataSection, counts: dict[str, int], train_counts: np.ndarray):
    """One tokenizer call's worth: add its counts to ``counts`` and ``train_counts``; return its packed rows."""
    def add(key, n):
        counts[key] = counts.get(key, 0) + int(n)

    texts = []
    for text, event, n in zip(batch["text"], batch["event"], batch["n"]):
        if event:
            add(event, n)
            continue
        clean, capped = packing.clean_document(str(text), cfg.max_line_chars)
        add("lines_capped", capped)
        texts.append(clean)
    add("docs_in", len(texts))
    add("docs_empty", sum(1 for t in texts if not t))
    by_split = {s: [] for s in SPLITS}
    for t in texts:
        if t:
            by_split["val" if packing.is_validation(t, cfg.val_fraction) else "train"].append(t)
    ids_parts, mask_parts, split_parts = [], [], []
    for split, docs in by_split.items():
        rows, dropped = packing.pack_documents(
            tokenizer.encode(docs), max_seq_len=cfg.max_seq_len, special=tokenizer.special,
            min_seq_tokens=cfg.min_seq_tokens, max_unk_fraction=cfg.max_unk_fraction,
        )
        for reason, n in dropped.items():
            add(f"seq_dropped_{reason}", n)
        real = rows["attention_mask"].astype(bool)
        add(f"rows_{split}", len(real))
        add(f"tokens_{split}", real.sum())
        if split == "train":
            # For frequency-smoothed masking (HF's recipe, count^-0.7): counts of the training tokens.
            train_counts += np.bincount(rows["input_ids"][real], minlength=len(train_counts))
        ids_parts.append(rows["input_ids"])
        mask_parts.append(rows["attention_mask"])
        split_parts.append(np.full(len(rows["input_ids"]), split))
    n = sum(len(p) for p in ids_parts)
    return {"input_ids": np.concatenate(ids_parts), "attention_mask": np.concatenate(mask_parts),
            "split": np.concatenate(split_parts).astype(object), "stats": np.full(n, b"", dtype=object)}


# Every count the manifest reports, by reason. Documents: read, empty after cleaning, lines cut to
# data.max_line_chars. Skips: empty and binary files, documents with undecodable bytes (replaced or skipped),
# bad JSON lines, records without the text field. Packed rows dropped: too short, too many [UNK].
STAT_KEYS = ("docs_in", "docs_empty", "lines_capped", "files_empty", "files_binary", "docs_undecodable_replaced",
             "docs_undecodable_skipped", "lines_bad_json", "records_missing_field",
             "seq_dropped_short_sequence", "seq_dropped_unk_heavy")


def _stats_row(counts: dict[str, int], token_ids: np.ndarray, token_counts: np.ndarray, max_seq_len: int) -> dict[str, np.ndarray]:
    """A block's counts as one row: JSON counts, then the training token counts as sparse (id, count) pairs."""
    head = json.dumps(counts).encode()
    payload = len(head).to_bytes(8, "little") + head + token_ids.astype(np.int64).tobytes() + token_counts.astype(np.int64).tobytes()
    return {"input_ids": np.zeros((1, max_seq_len), np.int32), "attention_mask": np.zeros((1, max_seq_len), np.int8),
            "split": np.array(["stats"], dtype=object), "stats": np.array([payload], dtype=object)}


def sum_stats(payloads, vocab_size: int) -> tuple[dict[str, int], np.ndarray]:
    """Add up stats rows: (counts by key, training token counts)."""
    counts: dict[str, int] = {}
    total = np.zeros(vocab_size, np.int64)
    for payload in payloads:
        payload = bytes(payload)
        n = int.from_bytes(payload[:8], "little")
        for k, v in json.loads(payload[8:8 + n]).items():
            counts[k] = counts.get(k, 0) + v
        pairs = np.frombuffer(payload[8 + n:], np.int64).reshape(2, -1)
        np.add.at(total, pairs[0], pairs[1])
    return counts, total


# ---- the writer (Ray Data write tasks) -------------------------------------------------------------------
ROWS_PER_GROUP = 16_384  # parquet row group, in packed rows


class PackedSink(Datasink):
    """A Ray Data datasink for the packed rows: each write task writes its train and validation rows as parquet
    shards under ``<out>/<split>/`` and returns its stats rows, which the driver adds up into the manifest.

    So the stage is one streaming pass: the packed corpus never waits in the object store. Shard names are the
    attempt's id, the write task's index and a part number: a retried task overwrites its own shards, and
    ``data.rows_per_file`` caps a shard's rows.
    """

    def __init__(self, out: str, rows_per_file: int):
        self.out, self.rows_per_file = out, rows_per_file
        self.fs = storage.pyarrow_filesystem(out)  # built here: the tasks get the S3 endpoint and region with it
        self.attempt = uuid.uuid4().hex[:12]
        self.result: dict | None = None

    def get_name(self) -> str:
        return "WritePackedParquet"

    def write(self, blocks, ctx) -> dict:
        import pyarrow.compute as pc
        from ray.data.block import BlockAccessor

        shards = {split: _Shards(storage.join(self.out, split), f"{self.attempt}_{ctx.task_idx:06d}", self.rows_per_file, self.fs)
                  for split in SPLITS}
        payloads, schema = [], None
        for block in blocks:
            table = BlockAccessor.for_block(block).to_arrow()
            payloads += table.filter(pc.equal(table["split"], "stats"))["stats"].to_pylist()
            for split, shard in shards.items():
                rows = table.filter(pc.equal(table["split"], split)).select(["input_ids", "attention_mask"])
                if rows.num_rows:
                    shard.add(rows)
                    schema = rows.schema
        return {"stats": payloads, "rows": {split: shard.close() for split, shard in shards.items()}, "schema": schema}

    def on_write_complete(self, write_result) -> None:
        returns = write_result.write_returns
        self.result = {"stats": [p for r in returns for p in r["stats"]],
                       "rows": {split: sum(r["rows"][split] for r in returns) for split in SPLITS}}
        schema = next((r["schema"] for r in returns if r["schema"] is not None), None)
        for split in SPLITS:  # an empty split still gets a (schema-only) shard, so that readers find one
            if self.result["rows"][split] == 0 and schema is not None:
                with _Shards(storage.join(self.out, split), f"{self.attempt}_empty", 1, self.fs) as shard:
                    shard.add(schema.empty_table(), force=True)


class _Shards:
    """Parquet shards ``<directory>/<prefix>_<part>.parquet`` of at most ``rows_per_file`` rows each, local or S3.
    A local shard is written under a dot-name and renamed when complete (readers skip dot-names)."""

    def __init__(self, directory: str, prefix: str, rows_per_file: int, fs):
        self.directory, self.prefix, self.rows_per_file, self.fs = directory, prefix, rows_per_file, fs
        self.part, self.rows, self.in_file, self.pending = 0, 0, 0, []
        self.writer = self.sink = self.path = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def add(self, table, force: bool = False) -> None:
        while table.num_rows or force:
            force = False
            if self.writer is None:
                self._open(table.schema)
            take = min(table.num_rows, self.rows_per_file - self.in_file)
            self.pending.append(table.slice(0, take))
            self.in_file += take
            self.rows += take
            table = table.slice(take)
            if sum(t.num_rows for t in self.pending) >= ROWS_PER_GROUP or self.in_file >= self.rows_per_file:
                self._flush()
            if self.in_file >= self.rows_per_file:
                self._finish()

    def close(self) -> int:
        if self.writer is not None:
            self._flush()
            self._finish()
        return self.rows

    def _open(self, schema) -> None:
        import pyarrow.parquet as pq

        name = f"{self.prefix}_{self.part:03d}.parquet"
        self.part += 1
        if self.fs is None:
            os.makedirs(self.directory, exist_ok=True)
            self.path = os.path.join(self.directory, name)
            self.sink = os.path.join(self.directory, f".{name}.tmp")
            self.writer = pq.ParquetWriter(self.sink, schema)
        else:
            self.path = None
            self.sink = self.fs.open_output_stream(storage.fs_path(storage.join(self.directory, name)))
            self.writer = pq.ParquetWriter(self.sink, schema)

    def _flush(self) -> None:
        import pyarrow as pa

        if self.pending:
            self.writer.write_table(pa.concat_tables(self.pending), row_group_size=ROWS_PER_GROUP)
            self.pending = []

    def _finish(self) -> None:
        self.writer.close()
        if self.path is None:
            self.sink.close()
        else:
            os.replace(self.sink, self.path)
        self.writer, self.in_file = None, 0


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
    # A folder without a manifest is an interrupted attempt: clear it, or its shards would join this attempt's.
    if storage.is_s3(out):
        storage.pyarrow_filesystem(out).delete_dir_contents(storage.fs_path(out), missing_dir_ok=True)
    elif os.path.exists(out):
        shutil.rmtree(out)

    ray.data.DataContext.get_current().enable_progress_bars = False
    parts = [_read(g, cfg) for g in groups]
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    if cfg.max_docs:
        ds = ds.limit(cfg.max_docs)
    # One block per call (the function tokenises DOCS_PER_CALL documents at a time): a batch size here would
    # make Ray Data bundle the one-row-per-file blocks of the readers into a single task.
    packed = ds.map_batches(
        tokenize_and_pack, batch_format="numpy", batch_size=None,
        fn_kwargs={"tokenizer": WorkerTokenizer.of(tokenizer), "cfg": cfg},
    )
    sink = PackedSink(out, cfg.rows_per_file)
    packed.write_datasink(sink)

    totals, train_counts = sum_stats(sink.result["stats"], len(tokenizer))
    counts = {k: totals.get(k, 0) for k in STAT_KEYS}
    for split in SPLITS:
        if sink.result["rows"][split] != totals.get(f"rows_{split}", 0):  # a broken invariant, not bad input
            raise RuntimeError(f"prepare wrote {sink.result['rows'][split]} {split} rows but packed {totals.get(f'rows_{split}', 0)}")
    if totals.get("rows_train", 0) == 0:
        raise ValueError(f"the corpus yielded no training sequences (counts: {counts}): add text or lower data.min_seq_tokens")
    manifest = {"key": key, "path": out, "sources": [{"format": g.format, "names": g.names, "files": g.paths} for g in groups],
                "tokenizer": tokenizer_name, "vocab_hash": vhash, "vocab_size": len(tokenizer),
                "max_seq_len": cfg.max_seq_len, "counts": counts, "token_counts": train_counts.tolist(),
                "splits": {split: {"path": storage.join(out, split), "num_sequences": totals.get(f"rows_{split}", 0),
                                   "num_tokens": totals.get(f"tokens_{split}", 0)} for split in SPLITS}}
    storage.write_json(storage.join(out, MANIFEST), manifest)
    return {**manifest, "cached": False}


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
