"""Corpus decoding: the bytes of one file (or one part of it) → documents and the counts of what was skipped.

What runs where: everything here but :func:`head_text` runs inside Ray Data tasks (ranges.py reads a file's bytes,
a byte range or a decompressed part, and hands them to :func:`decode_file` or :func:`decode_records`; readers.py
calls :func:`decode_value`); the driver resolves and checks the sources first (sources.py and formats.py, which
read the first bytes of a file with :func:`head_text`). Nothing here raises on bad content: empty or binary
files, undecodable bytes and bad JSON are counted skips, decided per file in :func:`decode_file`, so that one bad
file never fails a long run.

Encodings: UTF-8 (with or without a byte-order mark), and UTF-16/UTF-32 with a byte-order mark, which are
transcoded to UTF-8 and read whole by one task. Line ends: ``\n``, ``\r\n`` and old-Mac ``\r``.
"""

from __future__ import annotations

import codecs
import json
import re

_BLANK_LINE = re.compile(rb"\n(?:[ \t\f\v]*\n)+")
_LINE_END = re.compile(rb"\r\n?")  # CRLF and old-Mac CR, normalised to LF before splitting
_SURROGATE = re.compile("[\ud800-\udfff]")  # undecodable bytes (surrogateescape) or a lone \\uD800 escape in JSON
BINARY_PROBE = 8192  # a NUL byte in a file's first 8 KiB marks it binary (unless a UTF-16/32 byte-order mark leads)
BOM = b"\xef\xbb\xbf"  # UTF-8's byte-order mark, dropped from the start of a file


# ---- decoding (Ray Data tasks) -----------------------------------------------------------------------
def decode_file(data: bytes, *, fmt: str, separator: str, text_field: str, errors: str) -> tuple[list[str], dict[str, int]]:
    """One raw text, jsonl or json (one JSON array) file → (documents, counts). Never raises on bad content: it
    counts it.

    Counts: ``files_empty``, ``files_binary`` (a NUL byte in the first 8 KiB, no UTF-16/32 byte-order mark),
    ``docs_undecodable_replaced`` or ``docs_undecodable_skipped`` (per ``errors``), ``lines_bad_json``,
    ``files_bad_json`` (a json file that does not parse as one array nor as JSON Lines), ``records_missing_field``.
    A record that parses but nests deeper than Python's recursion limit allows is a bad JSON line (in a JSON
    array too); integers of more than 4300 digits are read as floats (:func:`loads`), so their record is kept.
    """
    encoding, bom = wide_encoding(data)
    if encoding:
        data = to_utf8(data[bom:], encoding)
    elif b"\x00" in data[:BINARY_PROBE]:
        return [], {"files_binary": 1}
    if data.startswith(BOM):
        data = data[3:]
    if not data.strip():
        return [], {"files_empty": 1}
    if fmt == "json":
        return decode_array(data, text_field=text_field, errors=errors)
    return decode_records(data, fmt=fmt, separator=separator, text_field=text_field, errors=errors)


def decode_records(data: bytes, *, fmt: str, separator: str, text_field: str, errors: str) -> tuple[list[str], dict[str, int]]:
    """The documents in whole records (lines or blocks) of a text or jsonl file, and the counts of bad ones.
    Lines end in LF, CRLF or CR alike."""
    counts: dict[str, int] = {}
    if b"\r" in data:
        data = _LINE_END.sub(b"\n", data)
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
                    _add(counts, "docs_undecodable_skipped")
                    continue
                _add(counts, "docs_undecodable_replaced")
                texts.append(c.decode("utf-8", errors="replace"))
    if fmt != "jsonl" and (b"\xe2\x80\xa8" in data or b"\xe2\x80\xa9" in data):  # U+2028, U+2029
        texts = _split_unicode_breaks(texts, separator)
    texts = [t for t in texts if t.strip()]  # blank lines and blocks separate documents; they are not ones
    if fmt != "jsonl":
        return texts, counts
    records = []
    for line in texts:
        try:
            record = loads(line)
        except ValueError:
            _add(counts, "lines_bad_json")
            continue
        records.extend(record if isinstance(record, list) else [record])  # a one-line array holds records
    return record_texts(records, text_field=text_field, errors=errors, counts=counts), counts


def decode_array(data: bytes, *, text_field: str, errors: str) -> tuple[list[str], dict[str, int]]:
    """The documents of a file that is one JSON array of records (objects with ``text_field``) or strings.
    Bytes that are not UTF-8 are decided per document, as in text files."""
    counts: dict[str, int] = {}
    text = data.decode("utf-8", errors="surrogateescape")
    try:
        value = loads(text)
    except TooDeep:
        value = _array_items(text, counts)  # one record nests too deep: parse the others one by one
        if value is None:
            return [], {"files_bad_json": 1}
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # several JSON values one after another: JSON Lines the driver could not tell
            return decode_records(data, fmt="jsonl", separator="line", text_field=text_field, errors=errors)
        return [], {"files_bad_json": 1}
    except ValueError:
        return [], {"files_bad_json": 1}
    if not isinstance(value, list):
        return [], {"files_bad_json": 1}
    if not value:
        return [], {"files_empty": 1}
    return record_texts(value, text_field=text_field, errors=errors, counts=counts), counts


class TooDeep(ValueError):
    """A JSON value nested deeper than Python's recursion limit lets ``json`` parse."""


def _lenient_int(digits: str):
    # int() refuses more than sys.get_int_max_str_digits() (4300) digits; such a number is never the text.
    return int(digits) if len(digits) <= 4000 else float(digits)


_DECODER = json.JSONDecoder(parse_int=_lenient_int)


def loads(text: str):
    """``json.loads`` that raises only ValueError: :class:`TooDeep` for a value nested too deep (Python raises
    RecursionError), and that reads an integer of more than 4000 digits as a float instead of raising."""
    try:
        return json.loads(text, parse_int=_lenient_int)
    except RecursionError:
        raise TooDeep("nested too deeply for Python's JSON parser") from None


def raw_decode(text: str, start: int = 0):
    """``json.JSONDecoder.raw_decode`` with the guarantees of :func:`loads`: (value, index after it)."""
    try:
        return _DECODER.raw_decode(text, start)
    except RecursionError:
        raise TooDeep("nested too deeply for Python's JSON parser") from None


def _array_items(text: str, counts: dict[str, int]) -> list | None:
    """The items of a JSON array parsed one by one, an item nested too deep skipped (counted in
    ``lines_bad_json``); None when the text is not one array."""
    ws = " \t\r\n"
    i = len(text) - len(text.lstrip(ws))
    if text[i:i + 1] != "[":
        return None
    items, i = [], i + 1
    while True:
        while i < len(text) and text[i] in ws:
            i += 1
        if text[i:i + 1] == "]" and not items and not counts.get("lines_bad_json"):
            break
        try:
            item, i = raw_decode(text, i)
            items.append(item)
        except TooDeep:
            _add(counts, "lines_bad_json")
            i = _skip_value(text, i)
        except ValueError:
            return None
        while i < len(text) and text[i] in ws:
            i += 1
        if text[i:i + 1] == ",":
            i += 1
        elif text[i:i + 1] == "]":
            break
        else:
            return None
    return items if not text[i + 1:].strip(ws) else None


def _skip_value(text: str, i: int) -> int:
    """The index just after the JSON array or object that starts at ``text[i]`` (brackets counted outside
    strings); len(text) when it does not end."""
    depth, in_string, escaped = 0, False, False
    for j in range(i, len(text)):
        c = text[j]
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "[{":
            depth += 1
        elif c in "]}":
            depth -= 1
            if depth == 0:
                return j + 1
    return len(text)


_UNICODE_BREAK = re.compile("[\u2028\u2029]")


def _split_unicode_breaks(texts: list[str], separator: str) -> list[str]:
    """U+2028 (line separator) and U+2029 (paragraph separator) in text files: with ``line``, each ends a line
    (as in ``str.splitlines``); with ``blank_line``, U+2029 ends a block and U+2028 becomes a newline."""
    out = []
    for t in texts:
        if separator == "line":
            out.extend(_UNICODE_BREAK.split(t))
        else:
            out.extend(p.replace("\u2028", "\n") for p in t.split("\u2029"))
    return out


def complete_records(data: bytes, *, fmt: str, separator: str) -> bytes:
    """The start of a file cut at damage, down to the records that end before the cut: the lines before the last
    line end, the blocks before the last blank line (``blank_line`` text), nothing of a JSON array. UTF-16/32 (a
    byte-order mark) is transcoded to UTF-8 first, and line ends become LF."""
    encoding, bom = wide_encoding(data)
    if encoding:
        data = to_utf8(data[bom:], encoding)
    if fmt == "json":
        return b""
    data = _LINE_END.sub(b"\n", data)
    if fmt == "text" and separator == "blank_line":
        last = None
        for last in _BLANK_LINE.finditer(data):
            pass
        return data[:last.start()] if last else b""
    return data[:data.rfind(b"\n") + 1]


def record_texts(records: list, *, text_field: str, errors: str, counts: dict[str, int]) -> list[str]:
    """The texts of parsed JSON records (an object's ``text_field``, or a string); adds the bad ones to ``counts``.

    A lone surrogate (undecodable bytes, or a ``\\ud800`` escape in the JSON) cannot reach the tokenizer: its
    document is kept with U+FFFD or skipped, per ``errors``.
    """
    docs = []
    for record in records:
        value = record if isinstance(record, str) else record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(value, str):
            _add(counts, "records_missing_field")
            continue
        if _SURROGATE.search(value):
            if errors == "skip":
                _add(counts, "docs_undecodable_skipped")
                continue
            _add(counts, "docs_undecodable_replaced")
            value = _SURROGATE.sub("\ufffd", value)
        docs.append(value)
    return docs


def _add(counts: dict[str, int], key: str, n: int = 1) -> None:
    counts[key] = counts.get(key, 0) + n


# ---- encodings: UTF-8, and UTF-16/32 with a byte-order mark ---------------------------------------------
_WIDE_BOMS = ((b"\xff\xfe\x00\x00", "utf-32-le"), (b"\x00\x00\xfe\xff", "utf-32-be"), (b"\xff\xfe", "utf-16-le"),
              (b"\xfe\xff", "utf-16-be"))  # UTF-32 LE first: its mark starts like UTF-16 LE's
_INVALID_UNIT = "pipeline.corpus.decoding.invalid_unit"


def wide_encoding(head: bytes) -> tuple[str | None, int]:
    """(the UTF-16/32 codec a byte-order mark at the start of ``head`` names, the mark's length), or (None, 0)."""
    for bom, encoding in _WIDE_BOMS:
        if head.startswith(bom):
            return encoding, len(bom)
    return None, 0


def to_utf8(data: bytes, encoding: str) -> bytes:
    """UTF-16/32 bytes (without their mark) → UTF-8 bytes. A code unit that does not decode becomes the byte
    0xFF, never valid in UTF-8, so that its document is replaced or skipped like any other undecodable bytes."""
    try:
        codecs.lookup_error(_INVALID_UNIT)
    except LookupError:
        codecs.register_error(_INVALID_UNIT, lambda e: ("\udcff", e.end))
    return data.decode(encoding, errors=_INVALID_UNIT).encode("utf-8", errors="surrogateescape")


def head_text(head: bytes) -> str:
    """The first bytes of a file as text (UTF-8, or UTF-16/32 by its mark), for the driver's checks."""
    encoding, bom = wide_encoding(head)
    if encoding:
        return head[bom:].decode(encoding, errors="replace")
    return head.removeprefix(BOM).decode("utf-8", errors="replace")


def decode_value(value, errors: str) -> tuple[str | None, str | None]:
    """A parquet or Arrow cell → (text or None, the count it adds or None). A value that is neither text nor
    bytes (a number, a list) is a record without the text field, never its ``str()``."""
    if value is None or not isinstance(value, (str, bytes)):
        return None, "records_missing_field"
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8"), None
        except UnicodeDecodeError:
            if errors == "skip":
                return None, "docs_undecodable_skipped"
            return value.decode("utf-8", errors="replace"), "docs_undecodable_replaced"
    return value, None
