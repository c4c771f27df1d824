"""Corpus sources: resolved and checked at the edge (the driver), decoded in Ray Data tasks.

A source in ``data.sources`` is one of:

- a local path, glob or folder (a folder means every file under it, or a ``datasets.save_to_disk`` folder);
- an ``s3://bucket/prefix`` URI, glob or prefix (the AWS credential chain; ``AWS_ENDPOINT_URL`` for an
  S3-compatible store);
- ``hub:NAME``: a Hub dataset, loaded with ``datasets.load_dataset(NAME, data.hub_config, split=data.split)``;
- ``package:NAME``: a corpus shipped inside an installed package (pipeline/corpora.py).

Everything that can be checked before Ray starts is checked here, with one clear error per problem: a missing
path, a glob that matches nothing, an unreadable bucket, a file type we cannot read, a missing field or column.
Problems inside the files (empty or binary files, undecodable bytes, bad JSON lines) are counted skips, decided
per file in :func:`decode_file`, so that one bad file never fails a long run.
"""

from __future__ import annotations

import fnmatch
import glob
import json
import os
import re
from dataclasses import dataclass, field

from pipeline import corpora, storage
from pipeline.config import DataSection

EXTENSIONS = {".txt": "text", ".text": "text", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
_GLOB_CHARS = re.compile(r"[*?\[]")
_BLANK_LINE = re.compile(rb"\n(?:[ \t\r\f\v]*\n)+")
BINARY_PROBE = 8192  # a NUL byte in a file's first 8 KiB marks it binary


@dataclass
class Group:
    """Sources of one format, read with one Ray Data reader."""

    format: str  # text | jsonl | parquet | arrow (save_to_disk and Hub caches)
    paths: list[str] = field(default_factory=list)
    names: list[str] = field(default_factory=list)  # what the user wrote, for the manifest


# ---- resolution (driver) ----------------------------------------------------------------------------
def resolve(cfg: DataSection, corpora_dir: str) -> list[Group]:
    """Expand every source into files grouped by format; raise one ValueError listing every problem."""
    groups: dict[str, Group] = {}
    problems: list[str] = []

    def add(fmt: str, paths: list[str], name: str) -> None:
        g = groups.setdefault(fmt, Group(fmt))
        g.paths.extend(p for p in paths if p not in g.paths)
        g.names.append(name)

    for src in cfg.sources:
        try:
            if src.startswith("package:"):
                add("jsonl", [corpora.export(src[len("package:"):], corpora_dir)], src)
            elif src.startswith("hub:"):
                add("arrow", hub_arrow_files(src[len("hub:"):], cfg), src)
            elif storage.is_s3(src):
                for fmt, paths in _by_format(_s3_files(src), cfg, src).items():
                    add(fmt, paths, src)
            else:
                local = os.path.expanduser(src)
                if os.path.isdir(local) and is_saved_dataset(local):
                    add("arrow", saved_dataset_arrow_files(local, cfg), src)
                else:
                    for fmt, paths in _by_format(_local_files(local, src), cfg, src).items():
                        add(fmt, paths, src)
        except ValueError as e:
            problems.append(str(e))
    if problems:
        raise ValueError("\n".join(problems))
    out = [g for g in groups.values() if g.paths]
    for g in out:
        if g.format in ("jsonl", "parquet", "arrow"):
            check_field(g, cfg.text_field)
    return out


def _local_files(path: str, src: str) -> list[str]:
    if _GLOB_CHARS.search(path):
        matches = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
        if not matches:
            raise ValueError(f"data.sources: the glob {src!r} matches no file: check the pattern and the folder")
        return [os.path.abspath(p) for p in matches]
    if os.path.isdir(path):
        files = sorted(
            os.path.join(d, f) for d, _, names in os.walk(path) for f in names if not f.startswith((".", "_"))
        )
        if not files:
            raise ValueError(f"data.sources: the folder {src!r} holds no files")
        return [os.path.abspath(p) for p in files]
    if not os.path.exists(path):
        raise ValueError(f"data.sources: {src!r} does not exist: check the path (relative paths are from the job's working directory)")
    if not os.access(path, os.R_OK):
        raise ValueError(f"data.sources: {src!r} is not readable: check its permissions")
    return [os.path.abspath(path)]


def _s3_files(uri: str) -> list[str]:
    """Files behind an s3:// URI, glob or prefix. An unreadable bucket is one clear error here, not in a task."""
    from pyarrow import fs as pafs

    filesystem = storage.pyarrow_filesystem(uri)
    path = storage.fs_path(uri)
    base = path if not _GLOB_CHARS.search(path) else path[: _GLOB_CHARS.search(path).start()].rsplit("/", 1)[0]
    bucket = path.split("/", 1)[0]
    try:
        if filesystem.get_file_info(bucket).type == pafs.FileType.NotFound:
            raise OSError(f"the bucket {bucket!r} does not exist or is not visible to these credentials")
        info = filesystem.get_file_info(base)
        if info.type == pafs.FileType.File and base == path:
            return [f"s3://{path}"]
        infos = filesystem.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    except OSError as e:
        reason = str(e).splitlines()[0]
        raise ValueError(
            f"data.sources: cannot read {uri}: {reason}. Check the bucket name, your AWS credentials "
            "(AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY) and, for an S3-compatible store, AWS_ENDPOINT_URL"
        ) from None
    files = sorted(i.path for i in infos if i.type == pafs.FileType.File)
    if base != path:
        files = [f for f in files if fnmatch.fnmatchcase(f, path)]
    files = [f for f in files if not os.path.basename(f).startswith((".", "_"))]
    if not files:
        raise ValueError(f"data.sources: {uri} matches no file: check the prefix or the glob")
    return [f"s3://{f}" for f in files]


def _by_format(paths: list[str], cfg: DataSection, src: str) -> dict[str, list[str]]:
    if cfg.format not in ("auto", "hf_disk"):
        return {cfg.format: paths}
    out: dict[str, list[str]] = {}
    unknown = []
    for p in paths:
        fmt = EXTENSIONS.get(os.path.splitext(p)[1].lower())
        if fmt is None:
            unknown.append(p)
        else:
            out.setdefault(fmt, []).append(p)
    if unknown:
        raise ValueError(
            f"data.sources: {src!r} holds files of unknown type ({', '.join(os.path.basename(u) for u in unknown[:3])}"
            f"{'…' if len(unknown) > 3 else ''}): name them .txt/.jsonl/.parquet, narrow the glob, or set data.format"
        )
    return out


def check_field(group: Group, text_field: str) -> None:
    """The text field must exist: checked on the first readable file, before any task starts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = group.paths[0]
    if group.format == "parquet":
        with storage.open_input(path) as f:
            names = pq.ParquetFile(f).schema_arrow.names
    elif group.format == "arrow":
        with pa.memory_map(path) as f:
            names = pa.ipc.open_stream(f).schema.names
    else:  # jsonl: the first record that parses
        names = None
        for p in group.paths[:20]:
            with storage.open_input(p) as f:
                for line in f.read(1 << 20).splitlines()[:100]:
                    try:
                        record = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(record, dict):
                        names = list(record)
                        break
            if names is not None:
                break
        if names is None:
            return  # no parsable record in the first files: the tasks count them as bad lines
    if text_field not in names:
        raise ValueError(f"{path}: no field {text_field!r}; its fields are {names}: set data.text_field")


# ---- datasets: save_to_disk folders and Hub datasets -------------------------------------------------
def is_saved_dataset(path: str) -> bool:
    return os.path.exists(os.path.join(path, "dataset_dict.json")) or os.path.exists(os.path.join(path, "state.json"))


def saved_dataset_arrow_files(path: str, cfg: DataSection) -> list[str]:
    """The Arrow files of a save_to_disk folder (a Dataset, or a DatasetDict's ``data.split``)."""
    dict_file = os.path.join(path, "dataset_dict.json")
    if os.path.exists(dict_file):
        splits = json.loads(open(dict_file).read())["splits"]
        if cfg.split not in splits:
            raise ValueError(f"data.sources: {path} holds the splits {splits}, not {cfg.split!r}: set data.split")
        path = os.path.join(path, cfg.split)
    state = json.loads(open(os.path.join(path, "state.json")).read())
    return [os.path.join(path, f["filename"]) for f in state["_data_files"]]


def hub_arrow_files(name: str, cfg: DataSection) -> list[str]:
    """Load a Hub dataset (or a local dataset folder) with datasets.load_dataset; return its cached Arrow files."""
    import datasets

    try:
        ds = datasets.load_dataset(name, cfg.hub_config or None, split=cfg.split)
    except Exception as e:  # noqa: BLE001 -- datasets raises many kinds; every one becomes the same clear error
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"data.sources: hub:{name} could not be loaded ({type(e).__name__}: {reason}). On a machine without "
            "access to huggingface.co, load it elsewhere, save it with Dataset.save_to_disk and list that folder"
        ) from None
    files = [f["filename"] for f in ds.cache_files]
    if not files:  # an in-memory dataset (rare): write it once next to the datasets cache
        raise ValueError(f"data.sources: hub:{name} has no cache files to read in parallel: save it with save_to_disk")
    return files


# ---- decoding (Ray Data tasks) -----------------------------------------------------------------------
def decode_file(data: bytes, *, fmt: str, separator: str, text_field: str, errors: str) -> tuple[list[str], dict[str, int]]:
    """One raw text or jsonl file → (documents, counts). Never raises on bad content: it counts it.

    Counts: ``files_empty``, ``files_binary`` (a NUL byte near the start), ``docs_undecodable_replaced`` or
    ``docs_undecodable_skipped`` (per ``errors``), ``lines_bad_json``, ``records_missing_field``.
    """
    if not data.strip():
        return [], {"files_empty": 1}
    if b"\x00" in data[:BINARY_PROBE]:
        return [], {"files_binary": 1}
    if data.startswith(_BOM):
        data = data[3:]
    return decode_records(data, fmt=fmt, separator=separator, text_field=text_field, errors=errors)


def decode_records(data: bytes, *, fmt: str, separator: str, text_field: str, errors: str) -> tuple[list[str], dict[str, int]]:
    """The documents in whole records (lines or blocks) of a text or jsonl file, and the counts of bad ones."""
    counts: dict[str, int] = {}
    if fmt == "jsonl" or separator == "line":
        chunks = data.split(b"\n")
    else:
        chunks = _BLANK_LINE.split(data)
    try:
        # The common case: the whole file decodes, so decode it once instead of chunk by chunk.
        data.decode("utf-8")
        texts = [c.decode("utf-8") for c in chunks]
    except UnicodeDecodeError:
        texts = []
        for c in chunks:
            try:
                texts.append(c.decode("utf-8"))
            except UnicodeDecodeError:
                if errors == "skip":
                    counts["docs_undecodable_skipped"] = counts.get("docs_undecodable_skipped", 0) + 1
                    continue
                counts["docs_undecodable_replaced"] = counts.get("docs_undecodable_replaced", 0) + 1
                texts.append(c.decode("utf-8", errors="replace"))
    texts = [t for t in texts if t.strip()]  # blank lines and blocks separate documents; they are not ones
    if fmt != "jsonl":
        return texts, counts
    docs = []
    for line in texts:
        try:
            record = json.loads(line)
        except ValueError:
            counts["lines_bad_json"] = counts.get("lines_bad_json", 0) + 1
            continue
        value = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(value, str):
            counts["records_missing_field"] = counts.get("records_missing_field", 0) + 1
            continue
        docs.append(value)
    return docs, counts


# ---- byte ranges: a large line-separated file is read by several tasks ---------------------------------
def splittable(fmt: str, separator: str) -> bool:
    """Files of one record per line can be cut at any newline; blank-line blocks are read whole."""
    return fmt == "jsonl" or separator == "line"


def byte_ranges(size: int, chunk: int) -> list[tuple[int, int]]:
    """[start, end) ranges that cover a file of ``size`` bytes, ``chunk`` bytes each (one for an empty file)."""
    return [(s, min(s + chunk, size)) for s in range(0, size, chunk)] or [(0, 0)]


def read_range(path: str, start: int, end: int, size: int, *, fs, fmt: str, separator: str, text_field: str,
               errors: str) -> tuple[list[str], dict[str, int]]:
    """The documents of the lines that *start* in bytes [start, end) of a file, and their counts.

    A line belongs to the range in which it starts (it may run past ``end``), so the ranges of a file together
    read every line exactly once, whatever the cut points. A range of the whole file is :func:`decode_file`.
    A binary file is skipped by every range and counted by the first; the first range strips a UTF-8 BOM.
    ``fs`` is the pyarrow filesystem built on the driver (None for local paths).
    """
    with _open(path, fs) as f:
        if start == 0 and end >= size:
            return decode_file(f.read(), fmt=fmt, separator=separator, text_field=text_field, errors=errors)
        if b"\x00" in f.read(BINARY_PROBE):
            return [], ({"files_binary": 1} if start == 0 else {})
        begin = 0 if start == 0 else _next_newline(f, start - 1, size) + 1
        if begin >= end:
            return [], {}
        stop = _next_newline(f, end - 1, size) + 1
        f.seek(begin)
        data = f.read(stop - begin)
    if start == 0 and data.startswith(_BOM):
        data = data[3:]
    return decode_records(data, fmt=fmt, separator=separator, text_field=text_field, errors=errors)


_BOM = b"\xef\xbb\xbf"
_SCAN = 1 << 20


def _open(path: str, fs):
    return fs.open_input_file(storage.fs_path(path)) if fs is not None else open(path, "rb")


def _next_newline(f, offset: int, size: int) -> int:
    """The position of the first newline at or after ``offset`` (``size`` - 1 when there is none)."""
    while offset < size:
        f.seek(offset)
        buf = f.read(min(_SCAN, size - offset))
        i = buf.find(b"\n")
        if i >= 0:
            return offset + i
        offset += len(buf)
    return size - 1


def decode_value(value, errors: str) -> tuple[str | None, str | None]:
    """A parquet or Arrow cell → (text or None, the count it adds or None)."""
    if value is None:
        return None, "records_missing_field"
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8"), None
        except UnicodeDecodeError:
            if errors == "skip":
                return None, "docs_undecodable_skipped"
            return value.decode("utf-8", errors="replace"), "docs_undecodable_replaced"
    return str(value), None
