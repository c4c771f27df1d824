import numpy as np
from conftest import validation_sides_elsewhere

from pipeline.corpus.packing import SpecialIds, clean_text, is_validation, pack_documents

SP = SpecialIds(cls=101, sep=102, pad=0, unk=100, mask=103)


def test_packing_makes_full_rows_with_cls_and_sep_and_splits_long_documents():
    docs = [list(range(1000, 1030)), list(range(2000, 2005)), list(range(3000, 3040))]
    rows, dropped = pack_documents(docs, max_seq_len=16, special=SP, min_seq_tokens=3, max_unk_fraction=0.5)
    ids, am = rows["input_ids"], rows["attention_mask"]
    assert ids.shape[1] == 16 and ids.dtype == np.int32
    real = [r[m.astype(bool)] for r, m in zip(ids, am)]
    assert all(r[0] == 101 and r[-1] == 102 for r in real)
    assert all(len(r) == 16 for r in real[:-1]), "only the last row may be short"
    body = np.concatenate([r[1:-1] for r in real])
    stream = docs[0] + [102] + docs[1] + [102] + docs[2]
    assert body.tolist() == stream, "no token is lost or reordered; documents are joined by [SEP]"
    assert (ids[am == 0] == 0).all()
    assert dropped == {"short_sequence": 0, "unk_heavy": 0}


def test_short_and_unk_heavy_rows_are_dropped_and_counted():
    docs = [[100] * 10 + [5] * 4, [7, 8]]
    rows, dropped = pack_documents(docs, max_seq_len=16, special=SP, min_seq_tokens=12, max_unk_fraction=0.5)
    assert len(rows["input_ids"]) == 0
    assert dropped == {"short_sequence": 1, "unk_heavy": 1}


def test_clean_text_and_a_split_that_every_process_makes_alike():
    """The prepare stage splits in its Ray workers and the evaluate stage in its driver: each document must land on
    the same side in every process, or dev documents leak into distillation."""
    assert clean_text("  a\t b \n\n c  ") == "a b c"
    assert clean_text(" \n ") == ""
    docs = [f"document number {i}" for i in range(4000)]
    flags = [is_validation(d, 0.1) for d in docs]
    assert flags == validation_sides_elsewhere(docs, 0.1), "this process and two others split differently"
    assert 0.07 < sum(flags) / len(docs) < 0.13
