"""Pure batch transforms for the prepare stage: clean, split, pack. No Ray here.

A batch is ``dict[str, np.ndarray]``. Packing concatenates the token ids of consecutive documents, separated
by [SEP], and cuts the stream into rows of exactly ``max_seq_len`` tokens: [CLS] + body + [SEP] (RoBERTa's
<s> + body + </s>). A causal LM's tokenizer has no [CLS] (GPT-2): documents are separated by its end-of-text
token and a row is ``max_seq_len`` tokens of the stream, unframed, as GPT-2 was trained. A long
document is therefore split across rows, and short documents share a row, so there is no padding except in
the last row of a batch. Rows with too few real tokens, or with too many [UNK], are dropped and counted.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import numpy as np

_WS = re.compile(r"\s+")
_LINE = re.compile(r"\r\n?|\n")


@dataclass(frozen=True, kw_only=True)
class SpecialIds:
    """The tokenizer's ids of [CLS], [SEP], [PAD], [UNK] and [MASK] (packing frames rows with [CLS]/[SEP], pads
    with [PAD] and counts [UNK]). A causal LM's: ``cls`` and ``mask`` None, ``sep`` and ``pad`` its end-of-text
    token, ``unk`` None (byte-level BPE has no unknown token)."""

    cls: int | None
    sep: int
    pad: int
    unk: int | None
    mask: int | None


def clean_text(text: str) -> str:
    """Normalise whitespace; the empty string means 'drop this document'."""
    return _WS.sub(" ", text).strip()


def cap_lines(text: str, max_line_chars: int) -> tuple[str, int]:
    """Cut lines (ended by LF, CRLF or CR) longer than ``max_line_chars`` characters. Returns (text, lines cut)."""
    if len(text) <= max_line_chars:  # only then can a line be too long
        return text, 0
    lines = _LINE.split(text)
    capped = sum(1 for line in lines if len(line) > max_line_chars)
    if not capped:
        return text, 0
    return "\n".join(line[:max_line_chars] for line in lines), capped


def clean_document(text: str, max_line_chars: int) -> tuple[str, int]:
    """Cut lines longer than ``max_line_chars``, then normalise whitespace. Returns (text, lines cut)."""
    text, capped = cap_lines(text, max_line_chars)
    return clean_text(text), capped


def is_validation(text: str, val_fraction: float) -> bool:
    """A deterministic split by document hash: the same document always lands on the same side."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % 1_000_000 < val_fraction * 1_000_000


def pack_documents(
    token_ids: list[list[int]],
    *,
    max_seq_len: int,
    special: SpecialIds,
    min_seq_tokens: int,
    max_unk_fraction: float,
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Pack tokenised documents into fixed-length rows. Returns (rows, counts of dropped rows by reason)."""
    frame = 0 if special.cls is None else 2
    body = max_seq_len - frame
    stream: list[int] = []
    for ids in token_ids:
        if ids:
            if stream:
                stream.append(special.sep)
            stream.extend(ids)
    rows, dropped = [], {"short_sequence": 0, "unk_heavy": 0}
    for start in range(0, len(stream), body):
        chunk = stream[start : start + body]
        if len(chunk) + frame < min_seq_tokens:
            dropped["short_sequence"] += 1
            continue
        if chunk.count(special.unk) >= max_unk_fraction * len(chunk):
            dropped["unk_heavy"] += 1
            continue
        rows.append([special.cls, *chunk, special.sep] if frame else chunk)
    input_ids = np.full((len(rows), max_seq_len), special.pad, dtype=np.int32)
    attention_mask = np.zeros((len(rows), max_seq_len), dtype=np.int8)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = row
        attention_mask[i, : len(row)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}, dropped
