"""What is inside the corpus files, checked on the driver before Ray starts (sources.py calls these).

- :class:`Group`: the files of one format, read with one Ray Data reader (sources.py resolves ``data.sources``
  into groups; readers.py and prepare.py read them).
- The layout of a ``.json`` file: JSON Lines, one JSON array, or (an error naming the file) one JSON object or
  several values one after another (:func:`json_layout`, from each file's first JSON_PROBE bytes).
- The text field or column (:func:`check_field`: present, and a string column in parquet and Arrow files), and
  parquet's magic bytes (:func:`drop_empty_parquet`, which also sets 0-byte parquet files aside).
- What a file of no known format holds (:func:`content_kind`: text, parquet or neither), so that an error advises
  only a fix that reads it.
- The Arrow files of a ``datasets`` ``save_to_disk`` folder (:func:`is_saved_dataset`,
  :func:`saved_dataset_arrow_files`) and of a Hub dataset's cache (:func:`hub_arrow_files`).

Compressed files (compression.py) are looked into decompressed, whatever their names.

Each problem is one ValueError that names the file and the fix; decoding.py judges the rest inside the tasks.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from pipeline import storage
from pipeline.config import DataSection
from pipeline.corpus import compression, decoding

JSON_PROBE = 1 << 16  # bytes of a .json file the driver reads to tell JSON Lines from one JSON document


@dataclass
class Group:
    """Files of one format, read with one Ray Data reader: what sources.resolve makes of ``data.sources``."""

    format: str  # text | jsonl | json (one JSON array per file) | parquet | arrow (save_to_disk and Hub caches)
    paths: list[str] = field(default_factory=list)
    names: list[str] = field(default_factory=list)  # what the user wrote, for the manifest
    empty: list[str] = field(default_factory=list)  # 0-byte files left out (parquet): counted as files_empty


# ---- JSON layout (driver) ---------------------------------------------------------------------------
def json_arrays(paths: list[str], text_field: str) -> list[str]:
    """The .json files among ``paths`` that are one JSON array; raise one ValueError naming every .json file that
    is a single JSON document of another shape. Reads the first JSON_PROBE bytes of each (in parallel, for S3)."""
    named = [p for p in paths if compression.inner_name(p).lower().endswith(".json")]
    if not named:
        return []

    def head(path: str) -> bytes:
        return compression.read_head(path, JSON_PROBE + 1)

    with ThreadPoolExecutor(min(16, len(named))) as pool:
        heads = list(pool.map(head, named))
    arrays, problems = [], []
    for path, data in zip(named, heads):
        try:
            if json_layout(data[:JSON_PROBE], whole=len(data) <= JSON_PROBE, text_field=text_field) == "json":
                arrays.append(path)
        except ValueError as e:
            problems.append(f"data.sources: {path} {e}")
    if problems:
        more = f"\n… and {len(problems) - 5} more .json files like these" if len(problems) > 5 else ""
        raise ValueError("\n".join(problems[:5]) + more)
    return arrays


def json_layout(head: bytes, *, whole: bool, text_field: str) -> str:
    """How a .json file holds its records, from its first bytes (``whole``: they are the whole file).

    Returns "json" for one JSON array (of records or strings: read whole by one task) and "jsonl" for JSON
    Lines (one record per line; also what a first line too long to judge is taken for, leaving the tasks to
    count what does not parse). Raises ValueError saying what was found for a single JSON object (on one line
    or spread over several), and for an array whose first item is not a record with ``text_field`` or a string.
    """
    text = decoding.head_text(head).lstrip()
    fix = (f"write its records as one JSON array ([{{\"{text_field}\": \"…\"}}, …]) or as JSON Lines (one object per "
           "line, .jsonl)")
    if text.startswith("["):
        if _several_values(text):
            return "jsonl"  # JSON Lines of arrays (["doc a"]\n["doc b"]): each line's items are records
        _check_first_item(text, text_field)
        return "json"
    if not text.startswith("{"):
        return "jsonl"
    line, newline, rest = text.partition("\n")
    if not newline and not whole:
        return "jsonl"
    try:
        first = decoding.loads(line)
    except ValueError:
        first = None
    if isinstance(first, dict):
        if text_field in first or rest.strip() or not whole:
            return "jsonl"
        raise ValueError(f"is one JSON object ({_describe_object(first)}), not a list of records: {fix}")
    if line.strip() == "{":  # no JSON Lines record is a lone brace: one object, pretty-printed
        try:
            found = f" ({_describe_object(decoding.loads(text))})" if whole else ""
        except ValueError:
            found = ""
        raise ValueError(f"is one JSON object spread over several lines{found}, not a list of records: {fix}")
    return "jsonl"


def _several_values(text: str) -> bool:
    """Whether ``text`` (stripped, starting with ``[``) holds a first JSON value that ends on its first line and
    more after it: JSON Lines, not one array. A first value cut by the probe is taken for one array."""
    try:
        _, end = decoding.raw_decode(text)
    except ValueError:
        return False
    rest = text[end:].lstrip(" \t\r")
    if not rest.strip():
        return False
    if "\n" not in text[:end] and rest.startswith("\n"):
        return True
    raise ValueError("holds several JSON values one after another, not one array nor one per line: write one JSON "
                     "array, or JSON Lines (one value per line, .jsonl)")


def _check_first_item(text: str, text_field: str) -> None:
    start = len(text) - len(text[1:].lstrip())
    if text[start:start + 1] in ("]", ""):
        return
    try:
        item, _ = decoding.raw_decode(text, start)
    except ValueError:
        return  # cut by the probe: the tasks count what does not parse
    if isinstance(item, dict) and text_field not in item:
        raise ValueError(f"is a JSON array of records without the field {text_field!r} (the first has {list(item)[:8]}): "
                         "set data.text_field")
    if not isinstance(item, (dict, str)):
        raise ValueError(f"is a JSON array of {_JSON_TYPES.get(type(item), type(item).__name__)}, not of records or "
                         "strings: write one record or string per document")


_JSON_TYPES = {list: "arrays", int: "numbers", float: "numbers", bool: "booleans", type(None): "nulls"}


def _describe_object(value: dict) -> str:
    keys = ", ".join(repr(k) for k in list(value)[:6]) + (", …" if len(value) > 6 else "")
    lists = [k for k, v in value.items() if isinstance(v, list)]
    return f"keys {keys}" + (f"; a list of {len(value[lists[0]])} items under {lists[0]!r}" if lists else "")


# ---- fields and columns (driver) -------------------------------------------------------------------
def check_field(group: Group, text_field: str) -> None:
    """The text field must exist: checked on the first readable file, before any task starts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = group.paths[0]
    if group.format in ("parquet", "arrow"):
        try:
            if group.format == "parquet":
                with storage.open_input(path) as f:
                    schema = pq.ParquetFile(f).schema_arrow
            else:
                with pa.memory_map(path) as f:
                    schema = pa.ipc.open_stream(f).schema
        except (pa.ArrowException, OSError) as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"{path}: not a readable {group.format} file ({reason}): check the file, or data.format "
                             "if it is not parquet") from None
        names = schema.names
        if text_field in names:
            kind = schema.field(text_field).type
            if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind)
                    or pa.types.is_large_binary(kind) or str(kind) == "string_view"):
                raise ValueError(f"{path}: the column {text_field!r} is of type {kind}, not text (string): set "
                                 "data.text_field to a string column")
    else:  # jsonl: the first record that parses
        names = None
        for p in group.paths[:20]:
            for line in decoding.head_text(compression.read_head(p, 1 << 20)).splitlines()[:100]:
                try:
                    record = decoding.loads(line)
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


def drop_empty_parquet(group: Group) -> None:
    """Move the 0-byte files of a parquet group to ``group.empty`` (a reader would fail on them); one ValueError
    naming every other local file without parquet's magic bytes (PAR1 at both ends)."""
    bad = []
    for p in list(group.paths):
        if storage.is_s3(p):
            continue
        size = os.path.getsize(p)
        if size == 0:
            group.paths.remove(p)
            group.empty.append(p)
            continue
        with open(p, "rb") as f:
            head = f.read(4)
            f.seek(max(0, size - 4))
            tail = f.read(4)
        if head != b"PAR1" or tail != b"PAR1":
            bad.append(p)
    if bad:
        kinds = {content_kind(p) for p in bad[:20]}
        fix = ("they hold text: name them for what they hold (.txt, .jsonl, .jsonl.gz, …) or set data.format"
               if kinds == {"text"} else "they are compressed parquet: decompress them (parquet compresses inside "
               "the file)" if kinds == {"parquet"} else "check the files: they hold neither parquet nor text")
        raise ValueError(f"data.sources: not parquet files (no PAR1 magic bytes): {', '.join(bad[:3])}"
                         f"{'…' if len(bad) > 3 else ''}: {fix}")


def content_kind(path: str) -> str:
    """What a local or S3 file holds, from its first bytes (decompressed: compression.read_head): "parquet" (PAR1),
    "text" (no NUL byte in the first 8 KiB, or a UTF-16/32 byte-order mark; an empty file too), else "binary"
    (an image, an archive, a document format): what data.format cannot read. A file that cannot be read is
    taken for text: the readers will say what is wrong with it."""
    try:
        head = compression.read_head(path, decoding.BINARY_PROBE)
    except OSError:
        return "text"
    if head.startswith(b"PAR1"):
        return "parquet"
    return "text" if decoding.wide_encoding(head)[0] or b"\x00" not in head else "binary"


# ---- datasets: save_to_disk folders and Hub datasets -------------------------------------------------
def _read_marker(path: str):
    """A save_to_disk marker file's JSON (None if absent); one ValueError naming it if it does not parse."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return decoding.loads(f.read())
    except (OSError, ValueError) as e:
        raise ValueError(f"data.sources: {path} cannot be read as a datasets.save_to_disk file ({e}): fix or remove it") from None


def is_saved_dataset(path: str) -> bool:
    """Whether a folder was written by ``datasets`` ``save_to_disk``: a ``dataset_dict.json`` (a DatasetDict; it
    must hold a list of ``splits``, or it is one ValueError naming it), or a ``state.json`` with ``_data_files``
    (a Dataset; any other state.json is an ordinary file of the corpus)."""
    dict_file = os.path.join(path, "dataset_dict.json")
    info = _read_marker(dict_file)
    if info is not None:
        if not isinstance(info, dict) or not isinstance(info.get("splits"), list):
            raise ValueError(f"data.sources: {dict_file} is not a datasets.save_to_disk dataset_dict.json (it needs "
                             '"splits": a list of split names): fix or remove it')
        return True
    state_file = os.path.join(path, "state.json")
    if not os.path.isfile(state_file):
        return False
    try:
        state = _read_marker(state_file)
    except ValueError:
        return False  # not JSON: not datasets' state.json, so an ordinary file
    return isinstance(state, dict) and "_data_files" in state


def saved_dataset_arrow_files(path: str, cfg: DataSection) -> list[str]:
    """The Arrow files of a save_to_disk folder (a Dataset, or a DatasetDict's ``data.split``). Raises one
    ValueError naming the file for a split or Arrow file that is missing or malformed."""
    dict_file = os.path.join(path, "dataset_dict.json")
    if os.path.exists(dict_file):
        splits = _read_marker(dict_file)["splits"]
        if cfg.split not in splits:
            raise ValueError(f"data.sources: {path} holds the splits {splits}, not {cfg.split!r}: set data.split")
        path = os.path.join(path, cfg.split)
    state_file = os.path.join(path, "state.json")
    state = _read_marker(state_file)
    files = state.get("_data_files") if isinstance(state, dict) else None
    if not isinstance(files, list) or not all(isinstance(f, dict) and isinstance(f.get("filename"), str) for f in files):
        raise ValueError(f"data.sources: {state_file} is {'missing' if state is None else 'not a datasets state.json'} "
                         '(it needs "_data_files": [{"filename": ...}]): save the dataset again with save_to_disk')
    out = [os.path.join(path, f["filename"]) for f in files]
    missing = [p for p in out if not os.path.isfile(p)]
    if missing:
        raise ValueError(f"data.sources: {state_file} lists Arrow files that do not exist ({', '.join(missing[:3])}): "
                         "save the dataset again with save_to_disk")
    return out


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
