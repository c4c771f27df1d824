"""Corpus sources, resolved on the driver into files grouped by format; decoded later in Ray Data tasks (decoding.py).

A source in ``data.sources`` is one of:

- a local path, glob or folder (a folder means every file under it, or a ``datasets.save_to_disk`` folder);
- an ``s3://bucket/prefix`` URI, glob or prefix (the AWS credential chain; ``AWS_ENDPOINT_URL`` for an
  S3-compatible store);
- ``hub:NAME``: a Hub dataset, loaded with ``datasets.load_dataset(NAME, data.hub_config, split=data.split)``;
- ``package:NAME``: a corpus shipped inside an installed package (corpora.py).

A file's format is its extension, after a compression suffix (``part-0.jsonl.gz`` is JSON Lines); a compressed
file is read by its magic bytes whatever its name (compression.py). A path that exists as named is read as that
path, whatever characters it holds (``corpus [v2]/a.txt``); it is a glob only when nothing has that exact name
(:func:`plan_path`).

Everything that can be checked before Ray starts is checked here or in formats.py, with one clear error per
problem: a missing path, a glob that matches nothing, an unreadable bucket, a file type we cannot read (the
advice depends on what it holds: :func:`_unknown_files`), a compressed parquet file, a missing
field or column (or a parquet/Arrow text column that is not a string), a ``.json`` file that is one JSON document
but not an array of records, a FIFO, socket or device (:func:`_regular`), a ``save_to_disk`` folder with a broken
marker file. Folders: see :func:`walk_folder` (symlinks followed once, ``.``/``_`` names skipped). Problems inside
the files (empty or binary files, undecodable bytes, bad JSON) are counted skips, decided per file in Ray Data
tasks by decoding.py (which also holds the encodings and line ends we read), so that one bad file never fails a
long run; the driver names each such file in one warning (readers.file_warnings).
"""

from __future__ import annotations

import fnmatch
import glob
import os
import re
import stat
from concurrent.futures import ThreadPoolExecutor

from pipeline import storage
from pipeline.config import DataSection
from pipeline.corpus import compression, corpora, formats
from pipeline.corpus.formats import Group

# A .json file is JSON Lines unless it is one JSON array ("json", read whole by one task): see formats.json_layout.
EXTENSIONS = {".txt": "text", ".text": "text", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
_GLOB_CHARS = re.compile(r"[*?\[]")


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
                add("arrow", formats.hub_arrow_files(src[len("hub:"):], cfg), src)
            elif storage.is_s3(src):
                for fmt, paths in _by_format(_s3_files(src), cfg, src).items():
                    add(fmt, paths, src)
            else:
                local = os.path.expanduser(src)
                if os.path.isdir(local) and formats.is_saved_dataset(local):
                    add("arrow", formats.saved_dataset_arrow_files(local, cfg), src)
                else:
                    for fmt, paths in _by_format(_local_files(local, src), cfg, src).items():
                        add(fmt, paths, src)
        except ValueError as e:
            problems.append(str(e))
    if problems:
        raise ValueError("\n".join(problems))
    if "parquet" in groups:
        formats.drop_empty_parquet(groups["parquet"])
    out = [g for g in groups.values() if g.paths or g.empty]
    if not any(g.paths for g in out):
        raise ValueError(f"data.sources: every file is empty ({', '.join(sum((g.empty for g in out), [])[:3])}): "
                         "add text to the corpus")
    for g in out:
        if g.format in ("jsonl", "parquet", "arrow") and g.paths:
            formats.check_field(g, cfg.text_field)
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
        out, unknown, packed = {}, [], []
        for p in paths:
            inner = compression.inner_name(p)
            fmt = EXTENSIONS.get(os.path.splitext(inner)[1].lower())
            if fmt is None:
                unknown.append(p)
            elif fmt == "parquet" and inner != p:
                packed.append(p)
            else:
                out.setdefault(fmt, []).append(p)
        problems = [_unknown_files(unknown, src)] if unknown else []
        if packed:
            problems.append(f"data.sources: {src!r} holds compressed parquet files ({_names(packed)}): decompress them "
                            "(parquet compresses inside the file, and its reader needs the file as it is)")
        if problems:
            raise ValueError("\n".join(problems))
    arrays = formats.json_arrays(out.get("jsonl", []), cfg.text_field)
    if arrays:
        out["jsonl"] = [p for p in out["jsonl"] if p not in arrays]
        out["json"] = arrays
    return {fmt: ps for fmt, ps in out.items() if ps}


LOOKED_INTO = 100  # files of unknown type whose content an error looks into (S3: one request each)


def _unknown_files(unknown: list[str], src: str) -> str:
    """The error for files of no known extension, advising what reads them: a name, or ``data.format``, for files
    that hold text or parquet; for the others (images, archives), leaving them out, since data.format would read
    them as binary and skip them."""
    looked = unknown[:LOOKED_INTO]
    with ThreadPoolExecutor(min(16, len(looked))) as pool:
        kinds = list(pool.map(formats.content_kind, looked))
    readable = [p for p, k in zip(looked, kinds) if k != "binary"] + unknown[LOOKED_INTO:]
    binary = [p for p, k in zip(looked, kinds) if k == "binary"]
    lines = []
    if readable:
        lines.append(f"data.sources: {src!r} holds files of unknown type ({_names(readable)}): name them for what "
                     "they hold (.txt, .jsonl, .json, .parquet; compressed too, .jsonl.gz, .txt.zst, …), narrow the "
                     "glob, or set data.format to read every file of the source as that format")
    if binary:
        lines.append(f"data.sources: {src!r} holds files that are neither text nor parquet ({_names(binary)}): leave "
                     "them out (move them, or narrow the glob); compressed text is read, gzip, bz2, xz or zstd")
    return "\n".join(lines)


def _names(paths: list[str]) -> str:
    more = f", and {len(paths) - 3} more" if len(paths) > 3 else ""
    return ", ".join(os.path.basename(p) for p in paths[:3]) + more
