"""The prepare stage on Ray Data, driver side: read → clean → tokenise → split → pack → parquet shards + manifest.

Ray Data only wires the pure batch functions of packing.py. The output folder is named by a cache key over the
sources, the tokenizer's vocabulary and the packing settings, and the manifest is written last: a folder with a
manifest is complete, and re-running with the same inputs is a no-op.

The driver resolves the sources (sources.py) and adds up the tasks' stats into the manifest. In Ray Data tasks:
the readers decode files with decoding.py and the batch function encodes with worker_tokenizer.py (both in
readers.py), and sink.py's datasink writes the parquet shards.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil

from pipeline import storage
from pipeline.config import DataSection
from pipeline.corpus import compression, data_context, formats, sources
from pipeline.records import Manifest, SplitInfo
from pipeline.corpus.readers import STAT_KEYS, file_warnings, read_group, sum_stats, tokenize_and_pack
from pipeline.corpus.sink import SPLITS, PackedSink
from pipeline.corpus.worker_tokenizer import WorkerTokenizer, load_tokenizer

MANIFEST = "manifest.json"


# ---- the cache key ----------------------------------------------------------------------------------
def file_stats(groups: list[formats.Group]) -> dict[str, tuple[int, int]]:
    """(size in bytes, modification time) of every input file, by path: one lookup per file (an ``os.stat``, or an
    S3 HEAD, all S3 files in one ``get_file_info`` call), which feeds both the cache key and the readers' byte
    ranges. The time is whole seconds for a local file and nanoseconds for S3, as the cache keys have always held it.
    """
    paths = [p for g in groups for p in g.paths]
    remote = [p for p in paths if storage.is_s3(p)]
    out = {}
    if remote:
        infos = storage.pyarrow_filesystem(remote[0]).get_file_info([storage.fs_path(p) for p in remote])
        out.update({p: (info.size, info.mtime_ns) for p, info in zip(remote, infos)})
    for p in paths:
        if not storage.is_s3(p):
            st = os.stat(p)
            out[p] = (st.st_size, int(st.st_mtime))
    return out


def _fingerprint(groups: list[formats.Group], stats: dict[str, tuple[int, int]]) -> list:
    """What identifies the input: every file's path, size and modification time (local or S3)."""
    return [[g.format, p if storage.is_s3(p) else os.path.abspath(p), *stats[p]] for g in groups for p in g.paths]


KEY_FIELDS = ("text_field", "text_separator", "split", "hub_config", "decode_errors", "max_line_chars", "max_seq_len",
              "min_seq_tokens", "max_unk_fraction", "val_fraction", "max_docs", "read_chunk_mb")


def cache_key(cfg: DataSection, groups: list[formats.Group], vocab_hash: str, stats: dict[str, tuple[int, int]]) -> str:
    """16 hex digits over the input files (``stats``: :func:`file_stats`), the vocabulary and the KEY_FIELDS."""
    payload = {"sources": _fingerprint(groups, stats), "vocab": vocab_hash, "version": 4,
               **{k: getattr(cfg, k) for k in KEY_FIELDS}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def vocab_hash(tokenizer) -> str:
    """16 hex digits of SHA-256 over the vocabulary's (token, id) pairs: part of the corpus's cache key."""
    items = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]


# ---- the stage -------------------------------------------------------------------------------------
def prepare(cfg: DataSection, *, data_dir: str, run_root: str, tokenizer_path: str, tokenizer_name: str) -> Manifest:
    """Run the prepare stage, or find the corpus prepared already (``cached``); returns its manifest, also
    written as ``<data_dir>/<cache key>/manifest.json``, last. Raises ValueError when the corpus yields no
    training sequence; a manifest that is damaged or of another record version counts as not prepared."""
    groups = sources.resolve(cfg, os.path.join(run_root, "corpora"))
    stats = file_stats(groups)
    tokenizer = load_tokenizer(tokenizer_path)
    vhash = vocab_hash(tokenizer)
    key = cache_key(cfg, groups, vhash, stats)
    out = storage.join(data_dir, key)
    try:
        raw = storage.read_json(storage.join(out, MANIFEST))
        cached = Manifest.from_dict(raw, where=storage.join(out, MANIFEST)) if raw is not None else None
    except ValueError as e:  # damaged (written last: the shards beside it are from an interrupted attempt) or old
        print(f"[distil] prepare: {e}; preparing again", flush=True)
        cached = None
    if cached and (unread := compressed_skips(cached)):
        print(f"[distil] prepare: note: {unread[0]}{f' and {len(unread) - 1} more' if len(unread) > 1 else ''} "
              "were skipped as binary when this corpus was prepared, and are compressed files, which are read now: "
              "preparing again", flush=True)
        cached = None
    if cached:
        for line in file_warnings(cached.file_counts, cfg):  # the data is still missing: say so again
            print(f"[distil] prepare: {line}", flush=True)
        return dataclasses.replace(cached, cached=True)
    # A folder without a manifest is an interrupted attempt: clear it, or its shards would join this attempt's.
    if storage.is_s3(out):
        storage.pyarrow_filesystem(out).delete_dir_contents(storage.fs_path(out), missing_dir_ok=True)
    elif os.path.exists(out):
        shutil.rmtree(out)

    written = _write_shards(cfg, groups, stats, tokenizer, out)
    totals, train_counts, by_file = sum_stats(written["stats"], len(tokenizer))
    for g in groups:  # 0-byte files the driver left out (a reader cannot open an empty parquet file)
        for p in g.empty:
            by_file.setdefault(p, {})["files_empty"] = 1
            totals["files_empty"] = totals.get("files_empty", 0) + 1
    counts = {k: totals.get(k, 0) for k in STAT_KEYS}
    for line in file_warnings(by_file, cfg):  # data that was lost or changed, named by file, not only counted
        print(f"[distil] prepare: {line}", flush=True)
    for split in SPLITS:
        if written["rows"][split] != totals.get(f"rows_{split}", 0):  # a broken invariant, not bad input
            raise RuntimeError(f"prepare wrote {written['rows'][split]} {split} rows but packed {totals.get(f'rows_{split}', 0)}")
    if totals.get("rows_train", 0) == 0:
        raise ValueError(f"the corpus yielded no training sequences (counts: {counts}): add text or lower data.min_seq_tokens")
    splits = {split: SplitInfo(path=storage.join(out, split), num_sequences=totals.get(f"rows_{split}", 0),
                               num_tokens=totals.get(f"tokens_{split}", 0)) for split in SPLITS}
    manifest = Manifest(key=key, path=out, sources=[{"format": g.format, "names": g.names, "files": g.paths} for g in groups],
                        tokenizer=tokenizer_name, vocab_hash=vhash, vocab_size=len(tokenizer), max_seq_len=cfg.max_seq_len,
                        counts=counts, file_counts=by_file, token_counts=train_counts.tolist(), splits=splits)
    storage.write_json(storage.join(out, MANIFEST), manifest.to_dict())
    return manifest


def compressed_skips(manifest: Manifest) -> list[str]:
    """The files a manifest counts as binary that are compressed (gzip, bz2, xz, zstd magic bytes), when it was
    written before compressed files were read (its counts lack ``files_compressed_damaged``): the same cache key
    would otherwise keep a corpus prepared without them. A file that cannot be opened is left to the readers."""
    if "files_compressed_damaged" in manifest.counts:
        return []
    out = []
    for file, counts in sorted(manifest.file_counts.items()):
        if counts.get("files_binary"):
            try:
                with storage.open_input(file) as f:
                    head = f.read(compression.MAGIC_BYTES)
            except OSError:
                continue
            if compression.codec(head):
                out.append(file)
    return out


def _write_shards(cfg: DataSection, groups: list[formats.Group], stats: dict[str, tuple[int, int]], tokenizer,
                  out: str) -> dict:
    """The Ray Data pass: read every group, tokenise and pack, write the parquet shards under ``out``. Returns the
    sink's result: the tasks' stats rows ("stats") and the rows written per split ("rows")."""
    # No progress bars, for this pass only: one bar per operator floods a job's log.
    with data_context.scoped(enable_progress_bars=False):
        # resolve() leaves at least one group with files
        parts = [read_group(g, cfg, [stats[p][0] for p in g.paths]) for g in groups if g.paths]
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
    return sink.result
