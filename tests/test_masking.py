import math

import torch

from pipeline.masking import IGNORE_INDEX, mask_tokens, step_generator

SPECIAL = torch.tensor([0, 100, 101, 102, 103])
VOCAB = 30522


def _batch(b=400, t=300):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, VOCAB, (b, t), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102
    am = torch.ones_like(ids)
    am[::3, 200:] = 0  # padding on a third of the rows
    ids[am == 0] = 0
    return ids, am


def _within(observed, n, p, sigmas=5.0):
    return abs(observed - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


def test_masking_statistics_on_over_100k_tokens():
    ids, am = _batch()
    out, labels = mask_tokens(ids, am, special_ids=SPECIAL, mask_id=103, vocab_size=VOCAB, generator=step_generator(0, 0, 0))
    eligible = (am == 1) & ~torch.isin(ids, SPECIAL)
    n = int(eligible.sum())
    assert n > 100_000
    chosen = labels != IGNORE_INDEX
    assert not (chosen & ~eligible).any(), "special tokens and padding are never chosen"
    assert (labels[chosen] == ids[chosen]).all() and (labels[~chosen] == IGNORE_INDEX).all()
    k = int(chosen.sum())
    assert _within(k, n, 0.15)
    n_mask = int((out[chosen] == 103).sum())
    n_same = int((out[chosen] == ids[chosen]).sum())
    n_random = k - n_mask - n_same
    assert _within(n_mask, k, 0.8) and _within(n_random, k, 0.1, 6) and _within(n_same, k, 0.1, 6)
    assert (out[~chosen] == ids[~chosen]).all(), "unchosen tokens are untouched"
    assert not torch.isin(out[chosen & (out != 103)], SPECIAL).any(), "a random replacement is never special"


def test_same_seed_same_masks_and_other_step_other_masks():
    ids, am = _batch(50, 100)
    a = mask_tokens(ids, am, special_ids=SPECIAL, mask_id=103, vocab_size=VOCAB, generator=step_generator(7, 1, 3))
    b = mask_tokens(ids, am, special_ids=SPECIAL, mask_id=103, vocab_size=VOCAB, generator=step_generator(7, 1, 3))
    c = mask_tokens(ids, am, special_ids=SPECIAL, mask_id=103, vocab_size=VOCAB, generator=step_generator(7, 1, 4))
    d = mask_tokens(ids, am, special_ids=SPECIAL, mask_id=103, vocab_size=VOCAB, generator=step_generator(7, 2, 3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1]) and not torch.equal(a[1], d[1])
