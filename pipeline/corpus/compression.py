"""Compressed corpus files: gzip, bz2, xz and zstd, told by their magic bytes whatever the file is called.

Public corpora ship compressed (``reviews.txt.gz``, ``part-0.jsonl.gz``, ``dump.jsonl.zst``). A file whose first
bytes are a codec's magic number is decompressed wherever it is read: by the tasks (ranges.py) and by the
driver's checks (:func:`read_head`). Its name says only what is inside, once the compression suffix is dropped
(:func:`inner_name`: ``part-0.jsonl.gz`` is JSON Lines), and that it cannot be cut into byte ranges: one task
reads it, as a stream (:class:`Stream`).

gzip, bz2 and xz are decompressed by the standard library (``gzip``, ``bz2``, ``lzma``), zstd by pyarrow's
``CompressedInputStream`` (pyarrow comes with Ray); concatenated members, streams and frames (``pigz``, ``pbzip2``,
``pzstd``) are read through. Data cut short or corrupt raises :class:`Damaged` where the decompressor finds it, so
that the reader keeps what came before it (all but at most STEP_BYTES of it) and counts the file; an error of the
file underneath (a lost connection) is raised as it is.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import zlib

from pipeline import storage

STEP_BYTES = 1 << 16  # decompressed bytes asked of the decompressor at a time: what damage can cost before it
MAGIC_BYTES = 10  # bytes a file's start needs for :func:`codec` (bz2's header and first block marker)
# Names that promise a compressed file: the suffix is dropped to find the format inside.
SUFFIXES = {".gz": "gzip", ".gzip": "gzip", ".bz2": "bz2", ".xz": "xz", ".zst": "zstd", ".zstd": "zstd"}
_BZ2_BLOCKS = (b"\x31\x41\x59\x26\x53\x59", b"\x17\x72\x45\x38\x50\x90")  # a block, or the end of an empty stream


def codec(head: bytes) -> str | None:
    """The codec whose magic number starts ``head`` (a file's first :data:`MAGIC_BYTES` bytes or more): "gzip",
    "bz2", "xz" or "zstd" (a zstd frame or a skippable frame, as pzstd writes first), else None."""
    if head.startswith(b"\x1f\x8b\x08"):
        return "gzip"
    if head.startswith(b"\xfd7zXZ\x00"):
        return "xz"
    skippable = len(head) >= 4 and head[0] & 0xF0 == 0x50 and head[1:4] == b"\x2a\x4d\x18"
    if head.startswith(b"\x28\xb5\x2f\xfd") or skippable:
        return "zstd"
    if head.startswith(b"BZh") and head[3:4].isdigit() and head[3:4] != b"0" and head[4:10] in _BZ2_BLOCKS:
        return "bz2"
    return None


def inner_name(path: str) -> str:
    """``path`` without a compression suffix (:data:`SUFFIXES`): ``a/part-0.jsonl.gz`` → ``a/part-0.jsonl``."""
    stem, ext = os.path.splitext(path)
    return stem if ext.lower() in SUFFIXES else path


def named_compressed(path: str) -> bool:
    """Whether ``path``'s name ends in a compression suffix (the driver then gives the file one reader, not byte
    ranges; a compressed file by another name is found by its magic bytes in the tasks)."""
    return inner_name(path) != path


class Damaged(Exception):
    """Compressed data that is cut short or does not decompress (the codec's reason in the message)."""


_STDLIB = {"gzip": lambda f: gzip.GzipFile(fileobj=f, mode="rb"), "bz2": bz2.BZ2File, "xz": lzma.LZMAFile}


class _Tracked:
    """A binary file whose own read errors are remembered, to tell them apart from the decompressor's."""

    def __init__(self, f):
        self.f, self.error = f, None
        self.closed = False

    def read(self, n: int = -1) -> bytes:
        try:
            return self.f.read(n)
        except Exception as e:
            self.error = e
            raise

    def close(self) -> None:
        self.closed = True  # the caller closes the file itself


class Stream:
    """The decompressed bytes of an open binary file ``f`` (local or pyarrow's) compressed with ``codec``.

    :meth:`read` returns what decompressed before damage, and raises :class:`Damaged` at the next call; an error of
    ``f`` itself is re-raised unchanged (an I/O error is a retry, not damage).
    """

    def __init__(self, f, codec: str):
        self._file, self._damage = _Tracked(f), None
        if codec == "zstd":
            import pyarrow as pa

            stream = pa.CompressedInputStream(self._file, codec)
            self._step = stream.read
        else:
            self._step = _STDLIB[codec](self._file).read1  # one decompressor step: data before damage comes first

    def read(self, n: int) -> bytes:
        """Up to ``n`` decompressed bytes; b"" at the end of the data."""
        if self._damage is not None:
            raise self._damage
        out, size = [], 0
        while size < n:
            try:
                block = bytes(self._step(min(n - size, STEP_BYTES)))
            except Exception as e:
                if self._file.error is not None:
                    raise self._file.error from None
                if not isinstance(e, (OSError, EOFError, ValueError, zlib.error, lzma.LZMAError)):
                    raise
                self._damage = Damaged(" ".join(str(e).split()) or type(e).__name__)
                if not out:
                    raise self._damage from None
                break
            if not block:
                break
            out.append(block)
            size += len(block)
        return b"".join(out)


def read_head(path: str, n: int) -> bytes:
    """The first ``n`` bytes of a local or S3 file's content: decompressed when its magic bytes name a codec (as
    many as decompress before any damage). For the driver's checks of what a file holds."""
    with storage.open_input(path) as f:
        head = f.read(max(n, MAGIC_BYTES))
        found = codec(head)
        if found is None:
            return head[:n]
        f.seek(0)
        stream, parts, size = Stream(f, found), [], 0
        try:
            while size < n and (block := stream.read(min(n - size, 1 << 20))):
                parts.append(block)
                size += len(block)
        except Damaged:
            pass
        return b"".join(parts)[:n]
