"""The prepare stage's Ray Data tasks: readers that turn files into documents, and the tokenize-and-pack batch
function with the stats rows it emits.

The readers (:func:`read_group` wires them on the driver) read bytes with ranges.py (byte ranges, compressed
streams) and decode them with decoding.py; :func:`tokenize_and_pack` cleans, splits, encodes (worker_tokenizer.py)
and packs (packing.py) one block at a time. Both count what they skip
or change, by reason and by file; the driver adds the counts up (:func:`sum_stats`) into the manifest and names each
file that lost data (:func:`file_warnings`).
"""

from __future__ import annotations

import json

import numpy as np

from pipeline import storage
from pipeline.config import DataSection
from pipeline.corpus import compression, decoding, formats, packing, ranges
from pipeline.corpus.sink import SPLITS
from pipeline.corpus.worker_tokenizer import WorkerTokenizer


# ---- readers: every source becomes rows {"text", "event", "n", "file"} ---------------------------------
# A document is a row with event "" (and file ""). A counted skip is a row with no text, the reason in "event",
# how many in "n" and the file it happened in "file"; the batch function sums them into the manifest's counts
# and the per-file counts the driver warns about. The readers also cut overlong lines (data.max_line_chars), so
# that a cut is counted against its file.
def _rows(docs: list[str], events: dict[tuple[str, str], int]) -> dict[str, np.ndarray]:
    keys = list(events)
    return {
        "text": np.array(docs + [""] * len(keys), dtype=object),
        "event": np.array([""] * len(docs) + [reason for reason, _ in keys], dtype=object),
        "n": np.array([0] * len(docs) + [events[k] for k in keys], dtype=np.int64),
        "file": np.array([""] * len(docs) + [file for _, file in keys], dtype=object),
    }


def _capped(docs: list[str], max_line_chars: int) -> tuple[list[str], int]:
    out, capped = [], 0
    for doc in docs:
        doc, n = packing.cap_lines(doc, max_line_chars)
        out.append(doc)
        capped += n
    return out, capped


def read_ranges(batch: dict[str, np.ndarray], *, fmt: str, cfg: DataSection, fs):
    """Byte ranges of text, jsonl or json files → blocks of document rows, one per part that ranges.read_parts
    reads (a compressed file yields several, so that it never sits whole in one block)."""
    for path, start, end, size in zip(batch["path"], batch["start"], batch["end"], batch["size"]):
        file = str(path)  # as the group lists it: a local path or an s3:// URI
        for d, c in ranges.read_parts(file, int(start), int(end), int(size), fs=fs, fmt=fmt,
                                      separator=cfg.text_separator, text_field=cfg.text_field, errors=cfg.decode_errors):
            d, c["lines_capped"] = _capped(d, cfg.max_line_chars)
            yield _rows(d, {(k, file): v for k, v in c.items() if v})


def decode_column(batch: dict[str, np.ndarray], *, cfg: DataSection, file: str = "", scheme: str = "") -> dict[str, np.ndarray]:
    """A text column → documents. A row's file is ``scheme`` + its ``batch["path"]`` (read_parquet's
    include_paths), or ``file``."""
    docs, events = [], {}

    def add(reason: str, path, n: int) -> None:
        key = (reason, f"{scheme}{path}")
        events[key] = events.get(key, 0) + n

    paths = batch["path"] if "path" in batch and cfg.text_field != "path" else [file] * len(batch[cfg.text_field])
    for value, path in zip(batch[cfg.text_field], paths):
        text, event = decoding.decode_value(value, cfg.decode_errors)
        if text is not None:
            text, capped = packing.cap_lines(text, cfg.max_line_chars)
            if capped:
                add("lines_capped", path, capped)
            docs.append(text)
        if event:
            add(event, path, 1)
    return _rows(docs, events)


def read_arrow_files(batch: dict[str, np.ndarray], *, cfg: DataSection):
    """Stream the text column out of Arrow IPC files (save_to_disk folders and the datasets cache)."""
    import pyarrow as pa

    for path in batch["path"]:
        with pa.memory_map(str(path)) as f:
            reader = pa.ipc.open_stream(f)
            for record_batch in reader:
                column = record_batch.column(cfg.text_field).to_numpy(zero_copy_only=False)
                yield decode_column({cfg.text_field: column}, cfg=cfg, file=str(path))


def read_group(group: formats.Group, cfg: DataSection, sizes: list[int]):
    """A Ray Data dataset of document rows (see above) over one group's files; ``sizes``: each file's size in bytes
    (prepare.file_stats), for the byte ranges."""
    import ray.data

    fs = storage.pyarrow_filesystem(group.paths[0])
    paths = [storage.fs_path(p) if fs else p for p in group.paths]
    if group.format in ("text", "jsonl", "json"):
        # Raw bytes, decoded by our own code: a bad byte, a binary file or a bad JSON line is a counted skip
        # instead of a reader exception deep inside a Ray task. A file of one record per line larger than
        # data.read_chunk_mb is cut into byte ranges, each read by its own task; a JSON array is read whole, and
        # so is a compressed file (one range when its name says so; by another name, its first range reads it).
        chunk = max(1, int(cfg.read_chunk_mb * 2**20))
        split = ranges.splittable(group.format, cfg.text_separator)
        items = [{"path": p, "start": a, "end": b, "size": size}
                 for p, size in zip(group.paths, sizes)
                 for a, b in (ranges.byte_ranges(size, chunk) if split and not compression.named_compressed(p)
                              else [(0, size)])]
        blocks = ray.data.from_items(items, override_num_blocks=len(items))  # one range per block, so per task
        return blocks.map_batches(read_ranges, batch_size=1, fn_kwargs={"fmt": group.format, "cfg": cfg, "fs": fs})
    if group.format == "parquet":
        # include_paths: a "path" column, so that a skip or a cut line is counted against its file.
        ds = ray.data.read_parquet(paths, columns=[cfg.text_field], filesystem=fs, include_paths=cfg.text_field != "path")
        return ds.map_batches(decode_column, batch_format="numpy", fn_kwargs={"cfg": cfg, "scheme": "s3://" if fs else ""})
    files = ray.data.from_items([{"path": p} for p in paths])
    return files.map_batches(read_arrow_files, batch_size=1, fn_kwargs={"cfg": cfg})


# ---- the batch function (runs in Ray Data tasks) ------------------------------------------------------
DOCS_PER_CALL = 512  # documents per tokenizer call: bounds the memory of one call's token lists


def tokenize_and_pack(batch: dict[str, np.ndarray], *, tokenizer: WorkerTokenizer, cfg: DataSection):
    """Clean, split by document hash, tokenise and pack one block, DOCS_PER_CALL documents at a time.

    Yields the packed rows, then one 'stats' row with the block's counts: the manifest's counts by reason, the
    skips and cut lines by file, the rows and real tokens per split, and the training split's token counts. The
    driver adds up the stats rows, so the manifest needs no further pass over the packed data.
    """
    counts: dict[str, int] = {}
    by_file: dict[str, dict[str, int]] = {}
    train_counts = np.zeros(tokenizer.vocab_size, np.int64)
    for start in range(0, len(batch["text"]), DOCS_PER_CALL):
        part = {k: batch[k][start:start + DOCS_PER_CALL] for k in ("text", "event", "n", "file")}
        rows = _tokenize_and_pack(part, tokenizer, cfg, counts, by_file, train_counts)
        if len(rows["split"]):
            yield rows
    nz = np.flatnonzero(train_counts)
    yield _stats_row(counts, by_file, nz, train_counts[nz], cfg.max_seq_len)


def _tokenize_and_pack(batch, tokenizer: WorkerTokenizer, cfg: DataSection, counts: dict[str, int],
                       by_file: dict[str, dict[str, int]], train_counts: np.ndarray):
    """One tokenizer call's worth: add its counts to ``counts``, ``by_file`` and ``train_counts``; return its
    packed rows. (The readers cut overlong lines: here each document only has its whitespace normalised.)"""
    def add(key, n, into=counts):
        into[key] = into.get(key, 0) + int(n)

    texts = []
    for text, event, n, file in zip(batch["text"], batch["event"], batch["n"], batch["file"]):
        if event:
            add(event, n)
            if file:
                add(event, n, by_file.setdefault(str(file), {}))
            continue
        texts.append(packing.clean_text(str(text)))
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
# data.max_line_chars. Skips: empty and binary files, compressed files cut short or damaged (what came before the
# damage is read), documents with undecodable bytes (replaced or skipped), bad JSON lines, JSON-array files that
# do not parse, records without the text field. Packed rows dropped: too short, too many [UNK].
STAT_KEYS = ("docs_in", "docs_empty", "lines_capped", "files_empty", "files_binary", "files_compressed_damaged",
             "docs_undecodable_replaced", "docs_undecodable_skipped", "lines_bad_json", "files_bad_json",
             "records_missing_field", "seq_dropped_short_sequence", "seq_dropped_unk_heavy")


def _stats_row(counts: dict[str, int], by_file: dict[str, dict[str, int]], token_ids: np.ndarray, token_counts: np.ndarray,
               max_seq_len: int) -> dict[str, np.ndarray]:
    """A block's counts as one row: JSON counts (by reason, and by file), then the training token counts as
    sparse (id, count) pairs."""
    head = json.dumps({"counts": counts, "files": by_file}).encode()
    payload = len(head).to_bytes(8, "little") + head + token_ids.astype(np.int64).tobytes() + token_counts.astype(np.int64).tobytes()
    return {"input_ids": np.zeros((1, max_seq_len), np.int32), "attention_mask": np.zeros((1, max_seq_len), np.int8),
            "split": np.array(["stats"], dtype=object), "stats": np.array([payload], dtype=object)}


def sum_stats(payloads, vocab_size: int) -> tuple[dict[str, int], np.ndarray, dict[str, dict[str, int]]]:
    """Add up stats rows: (counts by key, training token counts, counts by file and key)."""
    counts: dict[str, int] = {}
    by_file: dict[str, dict[str, int]] = {}
    total = np.zeros(vocab_size, np.int64)
    for payload in payloads:
        payload = bytes(payload)
        n = int.from_bytes(payload[:8], "little")
        head = json.loads(payload[8:8 + n])
        for k, v in head["counts"].items():
            counts[k] = counts.get(k, 0) + v
        for file, file_counts in head["files"].items():
            mine = by_file.setdefault(file, {})
            for k, v in file_counts.items():
                mine[k] = mine.get(k, 0) + v
        pairs = np.frombuffer(payload[8 + n:], np.int64).reshape(2, -1)
        np.add.at(total, pairs[0], pairs[1])
    return counts, total, by_file


# What each per-file count means, for the driver's warnings ({n} the count, {s} its plural; {field}, {chars}
# from the config).
_LOSSES = {
    "files_binary": "skipped as binary (a NUL byte in its first 8 KiB and no UTF-16/32 byte-order mark)",
    "files_empty": "empty: nothing read",
    "files_compressed_damaged": ("compressed data cut short or damaged: the complete records before the damage were "
                                 "read, the rest of the file is lost (download it again)"),
    "files_bad_json": "parses neither as one JSON array nor as JSON Lines: skipped",
    "lines_bad_json": "{n} JSON line{s} or array item{s} that did not parse (bad JSON, or nested too deep) skipped",
    "records_missing_field": "{n} record{s} without a string {field!r} (or null values) skipped",
    "docs_undecodable_skipped": "{n} document{s} with bytes that are not UTF-8 skipped (data.decode_errors: skip)",
    "docs_undecodable_replaced": "{n} document{s} with bytes that are not UTF-8 kept with U+FFFD in their place",
    "lines_capped": "{n} line{s} cut to data.max_line_chars ({chars:,} characters)",
}
MAX_FILE_WARNINGS = 20


def file_warnings(by_file: dict[str, dict[str, int]], cfg: DataSection) -> list[str]:
    """One line per file that lost or changed data (skips, cut lines), the first MAX_FILE_WARNINGS files, then
    one line for the rest."""
    lines = []
    for file in sorted(by_file):
        losses = [_LOSSES[k].format(n=n, s="" if n == 1 else "s", are="is" if n == 1 else "are", field=cfg.text_field,
                                    chars=cfg.max_line_chars)
                  for k, n in sorted(by_file[file].items()) if n and k in _LOSSES]
        if losses:
            lines.append(f"warning: {file}: {'; '.join(losses)}")
    if len(lines) > MAX_FILE_WARNINGS:
        rest = len(lines) - MAX_FILE_WARNINGS
        lines = lines[:MAX_FILE_WARNINGS] + [f"warning: and {rest} more files like these (each one is in the manifest's file_counts)"]
    return lines
