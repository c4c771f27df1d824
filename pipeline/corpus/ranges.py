"""How a file's bytes reach decoding.py, in Ray Data tasks: byte ranges of a large file, one stream of a compressed one.

A file of one record per line (jsonl, or text with ``data.text_separator: line``) larger than ``data.read_chunk_mb``
is cut into byte ranges (:func:`byte_ranges`), each read by its own task (:func:`read_parts`): a line belongs to
the range it starts in, so every line is read exactly once wherever the cuts fall. Blank-line blocks, JSON arrays
and UTF-16/32 files are read whole by the first range.

A compressed file (gzip, bz2, xz, zstd: compression.py, by its magic bytes, whatever its name) cannot be cut at a
byte offset: the first range reads it whole, as a stream, decoding about PART_BYTES of decompressed lines at a time
so that a large dump never sits whole in one task's memory; data cut short or corrupt ends the file there and is
counted (``files_compressed_damaged``), after the complete records before the damage.
"""

from __future__ import annotations

from collections.abc import Iterator

from pipeline import storage
from pipeline.corpus import compression
from pipeline.corpus.decoding import (BINARY_PROBE, BOM, complete_records, decode_file, decode_records,
                                      wide_encoding)

Part = tuple[list[str], dict[str, int]]  # documents, and the counts of what was skipped or changed
PART_BYTES = 16 << 20  # decompressed bytes of a compressed line-per-record file decoded at a time
READ_BYTES = 1 << 20  # decompressed bytes read at a time from a compressed file
_SCAN = 1 << 20


def splittable(fmt: str, separator: str) -> bool:
    """Files of one record per line can be cut at any newline; blank-line blocks and JSON arrays are read whole."""
    return fmt == "jsonl" or (fmt == "text" and separator == "line")


def byte_ranges(size: int, chunk: int) -> list[tuple[int, int]]:
    """[start, end) ranges that cover a file of ``size`` bytes, ``chunk`` bytes each (one for an empty file)."""
    return [(s, min(s + chunk, size)) for s in range(0, size, chunk)] or [(0, 0)]


def read_range(path: str, start: int, end: int, size: int, *, fs, fmt: str, separator: str, text_field: str,
               errors: str) -> Part:
    """Every part of :func:`read_parts` together: the documents of bytes [start, end) of a file, and their counts."""
    docs, counts = [], {}
    for d, c in read_parts(path, start, end, size, fs=fs, fmt=fmt, separator=separator, text_field=text_field,
                           errors=errors):
        docs += d
        for k, v in c.items():
            counts[k] = counts.get(k, 0) + v
    return docs, counts


def read_parts(path: str, start: int, end: int, size: int, *, fs, fmt: str, separator: str, text_field: str,
               errors: str) -> Iterator[Part]:
    """(documents, counts) of the lines that *start* in bytes [start, end) of a file, in one part or more.

    A line belongs to the range in which it starts (it may run past ``end``), so the ranges of a file together
    read every line exactly once, whatever the cut points. A range of the whole file is decoding.decode_file.
    A binary file is skipped by every range and counted by the first; the first range strips a UTF-8 BOM, and
    reads a UTF-16/32 file (a byte-order mark) whole while the others read nothing. Lines end in LF, CRLF or CR;
    a range is cut after an LF, so a file of CR-only line ends is read by its first range. A compressed file is
    read whole by the first range, in parts (:func:`_read_compressed`), and the others read nothing.
    ``fs`` is the pyarrow filesystem built on the driver (None for local paths).
    """
    kw = {"fmt": fmt, "separator": separator, "text_field": text_field, "errors": errors}
    with _open(path, fs) as f:
        head = f.read(BINARY_PROBE)
        found = compression.codec(head)
        if found:
            if start == 0:
                f.seek(0)
                yield from _read_compressed(compression.Stream(f, found), **kw)
            return
        yield _read_plain(f, head, start, end, size, **kw)


def _read_plain(f, head: bytes, start: int, end: int, size: int, **kw) -> Part:
    """:func:`read_parts` of a file that is not compressed, open just after its first bytes ``head``."""
    if start == 0 and end >= size:
        return decode_file(head + f.read(), **kw)
    if wide_encoding(head)[0]:  # UTF-16/32 cannot be cut at a byte offset: the first range reads it whole
        return ([], {}) if start else decode_file(head + f.read(), **kw)
    if b"\x00" in head:
        return [], ({"files_binary": 1} if start == 0 else {})
    begin = 0 if start == 0 else _next_newline(f, start - 1, size) + 1
    if begin >= end:
        return [], {}
    stop = _next_newline(f, end - 1, size) + 1
    f.seek(begin)
    data = f.read(stop - begin)
    if start == 0:
        data = data.removeprefix(BOM)
    return decode_records(data, **kw)


class _Blocks:
    """A decompressed stream, READ_BYTES at a time: b"" at its end, and at damage, which sets ``damaged``."""

    def __init__(self, stream: compression.Stream):
        self.stream, self.damaged = stream, False

    def next(self) -> bytes:
        if self.damaged:
            return b""
        try:
            return self.stream.read(READ_BYTES)
        except compression.Damaged:
            self.damaged = True
            return b""


def _read_compressed(stream: compression.Stream, **kw) -> Iterator[Part]:
    """The parts of a compressed file: a file of one record per line in parts of about PART_BYTES decompressed
    bytes, each cut after a line end; the others whole, as an uncompressed file. The counts are decode_file's, and
    ``files_compressed_damaged`` for data cut short or corrupt: the complete records before the damage are read,
    the one it cuts and everything after it are lost."""
    src, blocks, size = _Blocks(stream), [], 0
    while size < BINARY_PROBE and (block := src.next()):
        blocks.append(block)
        size += len(block)
    first = b"".join(blocks)
    wide = wide_encoding(first)[0] is not None
    if b"\x00" in first[:BINARY_PROBE] and not wide:
        yield [], {"files_binary": 1}
    elif wide or not splittable(kw["fmt"], kw["separator"]):
        while block := src.next():
            blocks.append(block)
        data = b"".join(blocks)
        if src.damaged:
            data = complete_records(data, fmt=kw["fmt"], separator=kw["separator"])
        if data.strip() or not src.damaged:
            yield decode_file(data, **kw)
    else:
        yield from _line_parts(first.removeprefix(BOM), src, **kw)
    if src.damaged:
        yield [], {"files_compressed_damaged": 1}


def _line_parts(data: bytes, src: _Blocks, **kw) -> Iterator[Part]:
    """Decoded parts of a stream of lines that starts with ``data`` and goes on in ``src``, each cut after the last
    line end of about PART_BYTES; ``files_empty`` when no line holds text. Without damage the last part is all
    that is left; with it, the partial line at the damage is dropped."""
    blocks, size, any_text = [data], len(data), False
    while True:
        block = src.next()
        blocks.append(block)
        size += len(block)
        if block and size < PART_BYTES:
            continue
        data = b"".join(blocks)
        cut = len(data) if not block and not src.damaged else max(data.rfind(b"\n"), data.rfind(b"\r")) + 1
        part, data = data[:cut], data[cut:]
        if part.strip():
            any_text = True
            yield decode_records(part, **kw)
        if not block:
            break
        blocks, size = [data], len(data)
    if not any_text and not src.damaged:
        yield [], {"files_empty": 1}


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
