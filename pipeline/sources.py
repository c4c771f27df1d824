"""Corpus sources: resolved and checked at the edge (the driver); decoded in Ray Data tasks (pipeline/decoding.py).

A source in ``data.sources`` is one of:

- a local path, glob or folder (a folder means every file under it, or a ``datasets.save_to_disk`` folder);
- an ``s3://bucket/prefix`` URI, glob or prefix (the AWS credential chain; ``AWS_ENDPOINT_URL`` for an
  S3-compatible store);
- ``hub:NAME``: a Hub dataset, loaded with ``datasets.load_dataset(NAME, data.hub_config, split=data.split)``;
- ``package:NAME``: a corpus shipped inside an installed package (pipeline/corpora.py).

A path that exists as named is read as that path, whatever characters it holds (``corpus [v2]/a.txt``); it is
a glob only when nothing has that exact name (:func:`plan_path`).

Everything that can be checked before Ray starts is checked here, with one clear error per problem: a missing
path, a glob that matches nothing, an unreadable bucket, a file type we cannot read, a missing field or column
(or a parquet/Arrow text column that is not a string), a ``.json`` file that is one JSON document but not an
array of records, a FIFO, socket or device (:func:`_regular`), a ``save_to_disk`` folder with a broken marker
file. Folders: see :func:`walk_folder` (symlinks followed once, ``.``/``_`` names skipped). Problems inside the files (empty or
binary files, undecodable bytes, bad JSON) are counted skips, decided per file in Ray Data tasks by
pipeline/decoding.py (which also holds the encodings and line ends we read), so that one bad file never fails a
long run; the driver names each such file in one warning (pipeline/data.py).
"""

from __future__ import annotations

import fnmatch
import glob
import json
import os
import re
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from pipeline import corpora, decoding, storage
from pipeline.config import DataSection

# A .json file is JSON Lines unless it is one JSON array ("json", read whole by one task): see json_layout.
EXTENSIONS = {".txt": "text", ".text": "text", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
_GLOB_CHARS = re.compile(r"[*?\[]")
JSON_PROBE = 1 << 16  # bytes of a .json file the driver reads to tell JSON Lines from one JSON document


@dataclass
class Group:
    """Sources of one format, read with one Ray Data reader."""

    format: str  # text | jsonl | json (one JSON array per file) | parquet | arrow (save_to_disk and Hub caches)
    paths: list[str] = field(default_factory=list)
    names: list[str] = field(default_factory=list)  # what the user wrote, for the manifest
    empty: list[str] = field(default_factory=list)  # 0-byte files left out (parquet): counted as files_empty


# ---- resolution (driver) ----------------------------------------------------------------------------
def resolve(cfg: DataSection, corpora_dir: str) -> list[Group]:
    """Expand every source into files grouped by format; raise one ValueError listing every problem."""
    groups: dict[str, Group] = {}
    problems: list[str] = []

    seen: set[str] = set()  # every file once, however many sources or symlinks reach it

    def add(fmt: str, paths: list[str], name: str) -> None:
        g = groups.setdefault(fmt, Group(fmt))
        for p in paths:
            key = p if storage.is_s3(p) else os.path.realpath(p)
            if key not in seen:
                seen.add(key)
                g.paths.append(p)
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
    if "parquet" in groups:
        _drop_empty_parquet(groups["parquet"])
    out = [g for g in groups.values() if g.paths or g.empty]
    if not any(g.paths for g in out):
        raise ValueError(f"data.sources: every file is empty ({', '.join(sum((g.empty for g in out), [])[:3])}): "
                         "add text to the corpus")
    for g in out:
        if g.format in ("jsonl", "parquet", "arrow") and g.paths:
            check_field(g, cfg.text_field)
    return out


def plan_path(path: str, kind) -> tuple[str, str, str]:
    """How to read a source path: as named when it exists, else as a glob. Returns (how, base, target).

    ``kind(p)`` says what the path ``p`` names, taken literally: "file", "dir" or "missing". A path that exists
    is ``("file" | "dir", path, path)`` whatever characters it holds. A missing one without glob characters
    (``* ? [``) is ``("missing", path, path)``. Otherwise it is ``("glob", base, pattern)``: ``base`` is the
    longest leading folder that contains no glob characters or exists as named, and ``pattern`` escapes it, so
    ``corpus [v2]/*.txt`` matches the .txt files of the folder "corpus [v2]", never those of "corpus v".
    """
    found = kind(path)
    if found != "missing":
        return found, path, path
    if not _GLOB_CHARS.search(path):
        return "missing", path, path
    parts = path.split("/")
    for i in range(len(parts) - 1, 0, -1):
        base = "/".join(parts[:i])
        if not _GLOB_CHARS.search(base) or kind(base) == "dir":
            return "glob", base, glob.escape(base) + "/" + "/".join(parts[i:])
    return "glob", "", path


def _note_glob(src: str, pattern: str, matches: list[str]) -> None:
    """A missing path read as a pattern because of ``[…]`` (a character class, easily a literal name) is said,
    with what it matched, so that another file is never read silently in place of the one named."""
    if "[" not in pattern.replace("[[]", ""):
        return
    shown = ", ".join(matches[:3]) + (f", and {len(matches) - 3} more" if len(matches) > 3 else "")
    print(f"[distil] prepare: note: {src!r} does not exist as named, so it is read as a glob ('[…]' is a character "
          f"class) matching {len(matches)} file(s): {shown}", flush=True)


def _local_kind(path: str) -> str:
    return "dir" if os.path.isdir(path) else "file" if os.path.exists(path) else "missing"


HIDDEN = (".", "_")  # names a folder source skips (files and folders), as Hadoop and Spark do: .git, _SUCCESS


def _local_files(path: str, src: str) -> list[str]:
    how, _, target = plan_path(path, _local_kind)
    if how == "glob":
        matches = sorted(p for p in glob.glob(target, recursive=True) if not os.path.isdir(p))
        if not matches:
            raise ValueError(f"data.sources: the glob {src!r} matches no file, and no file or folder has that exact "
                             "name: check the pattern and the folder")
        _note_glob(src, target, matches)
        return _regular(matches, src)
    if how == "dir":
        files, hidden = walk_folder(path)
        if hidden:
            shown = ", ".join(os.path.relpath(h, path) for h in hidden[:3]) + (", …" if len(hidden) > 3 else "")
            print(f"[distil] prepare: note: {src}: skipped {len(hidden)} hidden file{'s' if len(hidden) > 1 else ''} "
                  f"or folder{'s' if len(hidden) > 1 else ''} (names starting with . or _: {shown})", flush=True)
        if not files:
            raise ValueError(f"data.sources: the folder {src!r} holds no files"
                             + (" (only names starting with . or _, which are skipped)" if hidden else ""))
        return _regular(files, src)
    if how == "missing":
        raise ValueError(f"data.sources: {src!r} does not exist: check the path (relative paths are from the job's working directory)")
    if not os.access(path, os.R_OK):
        raise ValueError(f"data.sources: {src!r} is not readable: check its permissions")
    return _regular([path], src)


def walk_folder(path: str) -> tuple[list[str], list[str]]:
    """(the files under a folder, sorted; the hidden names skipped). Symlinked folders are followed, each real
    folder walked once (no cycles); a file reached by two paths (a symlink) is listed once; files and folders
    whose names start with ``.`` or ``_`` are skipped, with everything under them."""
    files, hidden, real_files, real_dirs = [], [], set(), set()
    for d, dirs, names in os.walk(path, followlinks=True):
        real = os.path.realpath(d)
        if real in real_dirs:
            dirs[:] = []
            continue
        real_dirs.add(real)
        hidden += [os.path.join(d, n) for n in dirs + names if n.startswith(HIDDEN)]
        dirs[:] = sorted(n for n in dirs if not n.startswith(HIDDEN))
        for n in sorted(names):
            p = os.path.join(d, n)
            if not n.startswith(HIDDEN) and os.path.realpath(p) not in real_files:
                real_files.add(os.path.realpath(p))
                files.append(p)
    return sorted(files), sorted(hidden)


def _regular(paths: list[str], src: str) -> list[str]:
    """Absolute paths of regular files (a symlink to one is one); one ValueError naming the FIFOs, sockets,
    devices and broken links among them, which would block or fail a reader."""
    bad = []
    for p in paths:
        try:
            mode = os.stat(p).st_mode
        except OSError as e:
            bad.append(f"{p} ({e.strerror.lower() if e.strerror else 'cannot stat'})")
            continue
        if not stat.S_ISREG(mode):
            kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
                    else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")
            bad.append(f"{p} ({kind})")
    if bad:
        raise ValueError(f"data.sources: {src!r} holds what is not a regular file: {', '.join(bad[:3])}"
                         f"{'…' if len(bad) > 3 else ''}: list only files (a pipe or device cannot be read in parallel)")
    return [os.path.abspath(p) for p in paths]


def _s3_files(uri: str) -> list[str]:
    """Files behind an s3:// URI, glob or prefix. An unreadable bucket is one clear error here, not in a task."""
    from pyarrow import fs as pafs

    filesystem = storage.pyarrow_filesystem(uri)
    path = storage.fs_path(uri)
    bucket = path.split("/", 1)[0]
    kinds = {pafs.FileType.File: "file", pafs.FileType.Directory: "dir"}
    try:
        if filesystem.get_file_info(bucket).type == pafs.FileType.NotFound:
            raise OSError(f"the bucket {bucket!r} does not exist or is not visible to these credentials")
        how, base, target = plan_path(path, lambda p: kinds.get(filesystem.get_file_info(p).type, "missing"))
        if how == "file":
            return [f"s3://{path}"]
        infos = filesystem.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    except OSError as e:
        reason = str(e).splitlines()[0]
        raise ValueError(
            f"data.sources: cannot read {uri}: {reason}. Check the bucket name, your AWS credentials "
            "(AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY) and, for an S3-compatible store, AWS_ENDPOINT_URL"
        ) from None
    files = sorted(i.path for i in infos if i.type == pafs.FileType.File)
    if how == "glob":
        files = [f for f in files if fnmatch.fnmatchcase(f, target)]
    files = [f for f in files if not os.path.basename(f).startswith((".", "_"))]
    if not files:
        raise ValueError(f"data.sources: {uri} matches no file: check the prefix or the glob")
    if how == "glob":
        _note_glob(uri, target, [f"s3://{f}" for f in files])
    return [f"s3://{f}" for f in files]


def _by_format(paths: list[str], cfg: DataSection, src: str) -> dict[str, list[str]]:
    if cfg.format not in ("auto", "hf_disk"):
        out = {cfg.format: paths}
    else:
        out, unknown = {}, []
        for p in paths:
            fmt = EXTENSIONS.get(os.path.splitext(p)[1].lower())
            if fmt is None:
                unknown.append(p)
            else:
                out.setdefault(fmt, []).append(p)
        if unknown:
            raise ValueError(
                f"data.sources: {src!r} holds files of unknown type ({', '.join(os.path.basename(u) for u in unknown[:3])}"
                f"{'…' if len(unknown) > 3 else ''}): name them .txt/.jsonl/.json/.parquet, narrow the glob, or set data.format"
            )
    arrays = _json_arrays(out.get("jsonl", []), cfg.text_field)
    if arrays:
        out["jsonl"] = [p for p in out["jsonl"] if p not in arrays]
        out["json"] = arrays
    return {fmt: ps for fmt, ps in out.items() if ps}


def _json_arrays(paths: list[str], text_field: str) -> list[str]:
    """The .json files among ``paths`` that are one JSON array; raise one ValueError naming every .json file that
    is a single JSON document of another shape. Reads the first JSON_PROBE bytes of each (in parallel, for S3)."""
    named = [p for p in paths if p.lower().endswith(".json")]
    if not named:
        return []

    def head(path: str) -> bytes:
        with storage.open_input(path) as f:
            return f.read(JSON_PROBE + 1)

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
            with storage.open_input(p) as f:
                for line in decoding.head_text(f.read(1 << 20)).splitlines()[:100]:
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


def _drop_empty_parquet(group: Group) -> None:
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
        raise ValueError(f"data.sources: not parquet files (no PAR1 magic bytes): {', '.join(bad[:3])}"
                         f"{'…' if len(bad) > 3 else ''}: check the files, or data.format if they are not parquet")


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
