"""Compressed corpus files (pipeline/corpus/compression.py, read by pipeline/corpus/ranges.py), without Ray: gzip,
bz2, xz and zstd told by their magic bytes whatever the name, read as their uncompressed selves in parts, damage
counted after the records before it, and the driver's checks and errors looking inside them."""

import bz2
import gzip
import json
import lzma
import os

import numpy as np
import pytest

from pipeline.config import DataSection
from pipeline.corpus import compression, decoding, formats, prepare, ranges, readers, sources

CODECS = ("gzip", "bz2", "xz", "zstd")


def compress(data: bytes, codec: str) -> bytes:
    """``data`` as the usual tools write it: gzip, bzip2 and xz by the standard library, zstd by pyarrow."""
    if codec == "gzip":
        return gzip.compress(data)
    if codec == "bz2":
        return bz2.compress(data)
    if codec == "xz":
        return lzma.compress(data)
    import pyarrow as pa

    sink = pa.BufferOutputStream()
    with pa.CompressedOutputStream(sink, "zstd") as out:
        out.write(data)
    return sink.getvalue().to_pybytes()


def _lines(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    words = ["the", "student", "keeps", "most", "of", "what", "teacher", "knows", "ünïcödé", "日本語", "🙂"]
    return [" ".join(rng.choice(words, 1 + i % 23)) for i in range(n)]


def _corpus(fmt: str) -> bytes:
    """BOM, CRLF then LF, a blank line, a long line, a Latin-1 line, no final newline."""
    lines = _lines(400)
    lines[5], lines[9], lines[77] = "", "y" * 3000, "caf\xe9"
    raw = [json.dumps({"text": t}).encode() if fmt == "jsonl" and t else t.encode() for t in lines]
    raw[77] = b'{"text": "caf\xe9"}' if fmt == "jsonl" else b"caf\xe9"
    return b"\xef\xbb\xbf" + b"\r\n".join(raw[:20]) + b"\r\n" + b"\n".join(raw[20:])


def _read_all(path, size: int, chunk: int, **kw):
    """Every byte range of a file read as the tasks do; (documents, counts, parts yielded)."""
    docs, counts, parts = [], {}, 0
    for a, b in ranges.byte_ranges(size, chunk):
        for d, c in ranges.read_parts(str(path), a, b, size, fs=None, **{"separator": "line", "text_field": "text",
                                                                         "errors": "replace", **kw}):
            parts += 1
            docs += d
            for k, v in c.items():
                counts[k] = counts.get(k, 0) + v
    return docs, counts, parts


# ---- magic bytes ------------------------------------------------------------------------------------------
def test_each_codec_is_told_by_its_magic_bytes_and_text_that_looks_alike_is_not():
    for codec in CODECS:
        assert compression.codec(compress(b"some text\n", codec)[:compression.MAGIC_BYTES]) == codec
        assert compression.codec(compress(b"", codec)) == codec
    skippable = (0x184D2A50).to_bytes(4, "little") + (4).to_bytes(4, "little") + b"meta"  # pzstd writes one first
    assert compression.codec(skippable + compress(b"x", "zstd")) == "zstd"
    for text in (b"BZh9 is how bzip2 files start\n", b"BZh0 1AY&SY", b"(\xb5/ nearly zstd", b"\x1f\x8b", b"plain text\n", b""):
        assert compression.codec(text) is None, text
    assert compression.inner_name("a/part-0.JSONL.GZ") == "a/part-0.JSONL" and compression.inner_name("a.txt") == "a.txt"
    assert compression.named_compressed("dump.jsonl.zst") and not compression.named_compressed("dump.jsonl")


# ---- reading: the same documents as the uncompressed file, in parts -----------------------------------------
@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("fmt", ["text", "jsonl"])
def test_a_compressed_file_reads_as_its_uncompressed_self_in_parts_whatever_its_name(tmp_path, monkeypatch, codec, fmt):
    monkeypatch.setattr(ranges, "READ_BYTES", 997)  # small reads and parts: lines and CRLFs cross every boundary
    monkeypatch.setattr(ranges, "PART_BYTES", 4099)
    data = _corpus(fmt)
    whole = decoding.decode_file(data, fmt=fmt, separator="line", text_field="text", errors="replace")
    assert len(whole[0]) == 399 and whole[1] == {"docs_undecodable_replaced": 1}
    packed = compress(data, codec)
    path = tmp_path / "misnamed.txt"  # the name says nothing about the compression
    path.write_bytes(packed)
    for chunk in (1000, len(packed) // 3, len(packed), 10**6):  # byte ranges only the first of which reads it
        docs, counts, parts = _read_all(path, len(packed), chunk, fmt=fmt)
        assert (docs, counts) == whole, chunk
        assert parts >= len(data) // (2 * 4099), "decoded part by part, never whole"
    # Concatenated members, streams and frames (pigz, pbzip2, pzstd) are one file: both halves are read.
    path.write_bytes(compress(data, codec) + compress(b"\nlast line\n", codec))
    docs, counts, _ = _read_all(path, os.path.getsize(path), 10**6, fmt="text")
    assert docs[-1] == "last line" and len(docs) == 399 + 1


@pytest.mark.parametrize("codec", CODECS)
def test_files_read_whole_are_read_whole_compressed_too(tmp_path, codec):
    cases = [  # (fmt, separator, bytes)
        ("json", "line", json.dumps([{"text": t} for t in _lines(50)], indent=2).encode()),
        ("text", "blank_line", "\n\n".join(f"{a}\n{b}" for a, b in zip(_lines(30), _lines(30, 1))).encode()),
        ("text", "line", b"\xff\xfe" + "\r\n".join(_lines(40)).encode("utf-16-le")),  # UTF-16 inside
        ("text", "line", b" \n\n  \n"),  # empty once decompressed
        ("text", "line", b"\x89PNG\r\n\x1a\n\x00\x00" + bytes(range(256)) * 40),  # binary once decompressed
    ]
    for fmt, separator, data in cases:
        path = tmp_path / "f.bin"
        path.write_bytes(compress(data, codec))
        expected = decoding.decode_file(data, fmt=fmt, separator=separator, text_field="text", errors="replace")
        got = _read_all(path, os.path.getsize(path), 100, fmt=fmt, separator=separator)
        assert got[:2] == expected, (fmt, separator, data[:20])
    assert expected == ([], {"files_binary": 1})


# ---- damage: counted, after the complete records before it ----------------------------------------------------
@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_a_damaged_compressed_file_keeps_the_records_before_the_damage_and_is_counted(tmp_path, monkeypatch, codec, damage):
    """A download cut short (the common case) keeps every whole record before the cut and nothing else."""
    monkeypatch.setattr(ranges, "READ_BYTES", 4096)
    lines = [f"line {i:05d} " + t for i, t in enumerate(_lines(20000))]
    packed = bytearray(compress("\n".join(lines).encode() + b"\n", codec))
    if damage == "truncated":
        packed = packed[: len(packed) * 2 // 3]
    else:
        middle = len(packed) * 2 // 3
        packed[middle:middle + 64] = bytes(64)
    path = tmp_path / "dump.txt.gz"
    path.write_bytes(bytes(packed))
    docs, counts, _ = _read_all(path, len(packed), 10**6, fmt="text")
    assert counts.pop("files_compressed_damaged") == 1
    same = next(i for i, (d, line) in enumerate(zip(docs + [None], lines)) if d != line)
    assert len(docs) < len(lines) and same < len(lines)
    if damage == "truncated":
        assert 1000 < same == len(docs) and counts == {}, "whole lines before the cut, in order, and nothing else"
    else:
        # A corrupt stretch may decode to garbled lines until the codec notices (gzip checks a checksum at the end
        # of a member): they are kept with U+FFFD or counted as undecodable, and the file is counted as damaged.
        assert same > 1000
    # Read whole: a blank-line text keeps its complete blocks, a JSON array nothing; both are counted.
    blocks = [f"block {i}\n" + t for i, t in enumerate(_lines(3000))]
    for fmt, separator, data, kept in (("text", "blank_line", "\n\n".join(blocks).encode(), blocks),
                                       ("json", "line", json.dumps(lines[:3000]).encode(), [])):
        path.write_bytes(compress(data, codec)[:-40])
        docs, counts, _ = _read_all(path, os.path.getsize(path), 10**6, fmt=fmt, separator=separator)
        assert counts == {"files_compressed_damaged": 1} and docs == kept[: len(docs)], fmt
        if codec != "bz2":  # bzip2 decompresses in blocks of up to 900 kB: a cut block is lost whole
            assert len(docs) > (len(kept) // 2 if kept else -1), fmt


def test_an_error_of_the_file_underneath_is_raised_not_counted_as_damage():
    class Flaky:
        def __init__(self, data):
            self.data, self.calls = data, 0

        def read(self, n=-1):
            self.calls += 1
            if self.calls > 1:
                raise ConnectionResetError("the connection dropped")
            out, self.data = self.data[:n], self.data[n:]
            return out

    for codec in CODECS:
        stream = compression.Stream(Flaky(compress(os.urandom(1 << 20), codec)), codec)
        with pytest.raises(ConnectionResetError):
            while stream.read(1 << 16):
                pass


# ---- the driver: formats by the name inside, checks and errors that look inside ------------------------------
def test_resolve_reads_compressed_files_by_their_inner_names_and_looks_inside_them(tmp_path):
    records = [{"text": t} for t in _lines(20)]
    files = {
        "reviews.txt.gz": compress("\n".join(_lines(10)).encode(), "gzip"),
        "part-0.jsonl.gz": compress("".join(json.dumps(r) + "\n" for r in records).encode(), "gzip"),
        "dump.jsonl.zst": compress("".join(json.dumps(r) + "\n" for r in records).encode(), "zstd"),
        "array.json.bz2": compress(json.dumps(records).encode(), "bz2"),  # one JSON array, found inside
        "lines.json.xz": compress("".join(json.dumps(r) + "\n" for r in records).encode(), "xz"),
        "plain.txt": b"a plain line\n",
    }
    for name, body in files.items():
        (tmp_path / name).write_bytes(body)
    groups = {g.format: sorted(os.path.basename(p) for p in g.paths)
              for g in sources.resolve(DataSection(sources=[str(tmp_path)]), "")}
    assert groups == {"text": ["plain.txt", "reviews.txt.gz"], "jsonl": ["dump.jsonl.zst", "lines.json.xz", "part-0.jsonl.gz"],
                      "json": ["array.json.bz2"]}
    assert formats.content_kind(str(tmp_path / "dump.jsonl.zst")) == "text"
    # The text field is checked inside a compressed file too.
    with pytest.raises(ValueError, match=r"no field 'body'; its fields are \['text'\]: set data.text_field"):
        sources.resolve(DataSection(sources=[str(tmp_path / "part-0.jsonl.gz")], text_field="body"), "")


def test_unknown_files_get_advice_that_reads_them_and_following_it_loses_nothing(tmp_path):
    """A .gz of text beside a plain file: the error advises naming it or data.format, and data.format: text then
    reads both files' documents (it used to skip the .gz as binary and succeed with half)."""
    (tmp_path / "reviews.gz").write_bytes(compress("\n".join(_lines(30)).encode(), "gzip"))
    (tmp_path / "more.txt").write_text("\n".join(_lines(30, 1)) + "\n")
    with pytest.raises(ValueError) as e:
        sources.resolve(DataSection(sources=[str(tmp_path)]), "")
    assert str(e.value).startswith(f"data.sources: '{tmp_path}' holds files of unknown type (reviews.gz): name them")
    assert "data.format" in str(e.value) and len(str(e.value).splitlines()) == 1
    cfg = DataSection(sources=[str(tmp_path)], format="text")
    (group,) = sources.resolve(cfg, "")
    docs = [t for p in group.paths for block in readers.read_ranges(
        {"path": [p], "start": [0], "end": [os.path.getsize(p)], "size": [os.path.getsize(p)]}, fmt="text", cfg=cfg, fs=None)
        for t, event in zip(block["text"], block["event"]) if not event]
    assert docs == _lines(30, 1) + _lines(30)
    # Files no data.format reads get no such advice; a compressed parquet file is told to be decompressed.
    (tmp_path / "scan.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00" + bytes(range(256)))
    (tmp_path / "old.tar.gz").write_bytes(compress(b"README\x00\x00\x00" + bytes(500), "gzip"))
    (tmp_path / "table.parquet.gz").write_bytes(compress(b"PAR1" + bytes(100) + b"PAR1", "gzip"))
    with pytest.raises(ValueError) as e:
        sources.resolve(DataSection(sources=[str(tmp_path)]), "")
    lines = str(e.value).splitlines()
    assert len(lines) == 3, lines
    assert "files of unknown type (reviews.gz)" in lines[0]
    assert "neither text nor parquet (old.tar.gz, scan.png): leave them out" in lines[1] and "data.format" not in lines[1]
    assert "compressed parquet files (table.parquet.gz): decompress them" in lines[2]
    (tmp_path / "data.parquet").write_bytes(compress(b"a line of text\n", "xz"))  # compressed text named .parquet
    with pytest.raises(ValueError, match=r"not parquet files .*data.parquet: they hold text: name them"):
        sources.resolve(DataSection(sources=[str(tmp_path / "data.parquet")]), "")


def test_a_corpus_prepared_before_compressed_files_were_read_is_prepared_again(tmp_path):
    """Under the same cache key, a manifest written when a .gz was skipped as binary would keep the corpus without
    it: such a manifest (no files_compressed_damaged count) is not taken as prepared when those files are compressed."""
    from pipeline.records import Manifest

    gz, png = tmp_path / "reviews.gz", tmp_path / "scan.png"
    gz.write_bytes(compress(b"text\n", "gzip"))
    png.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    old = Manifest(key="k", path=str(tmp_path), sources=[], tokenizer="t", vocab_hash="v", vocab_size=1, max_seq_len=8,
                   counts={"files_binary": 2}, file_counts={str(gz): {"files_binary": 1}, str(png): {"files_binary": 1},
                                                           str(tmp_path / "gone.gz"): {"files_binary": 1}},
                   token_counts=[0], splits={})
    assert prepare.compressed_skips(old) == [str(gz)]
    new = Manifest(**{**old.__dict__, "counts": {"files_binary": 1, "files_compressed_damaged": 0}})
    assert prepare.compressed_skips(new) == []
