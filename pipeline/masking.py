"""Dynamic BERT masking, re-drawn for every batch in the workers (Devlin et al. 2019, Sanh et al. 2019 §3).

Shape legend: B batch, T sequence length.

Each eligible token (not special, not padding) is chosen with probability ``mask_prob``. A chosen token
becomes [MASK] with probability ``mask_token_frac``, a uniformly random non-special token with probability
``random_token_frac``, and stays unchanged otherwise. ``labels`` hold the original id at chosen positions and
-100 everywhere else, so the MLM loss sees only chosen tokens. The draw is a pure function of the generator,
which the training loop seeds from (run seed, rank, step): the same seed gives the same masks.
"""

from __future__ import annotations

import math

import numpy as np
import torch

IGNORE_INDEX = -100


def mask_tokens(
    input_ids_BT: torch.Tensor,
    attention_mask_BT: torch.Tensor,
    *,
    special_ids: torch.Tensor,
    mask_id: int,
    vocab_size: int,
    generator: torch.Generator,
    mask_prob: float = 0.15,
    mask_token_frac: float = 0.8,
    random_token_frac: float = 0.1,
    token_weights_V: torch.Tensor | None = None,
    continuation_V: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (masked input ids, labels). Inputs are not modified.

    ``token_weights_V`` (HF's frequency smoothing): choose exactly ceil(mask_prob × eligible) tokens per batch,
    without replacement, with probability ∝ the token's weight. ``continuation_V`` (whole-word masking): a
    continuation (WordPiece's "##…", :func:`continuation_table`) is chosen together with the token that starts its word.
    """
    eligible_BT = attention_mask_BT.bool() & ~torch.isin(input_ids_BT, special_ids)
    draw_BT = torch.rand(input_ids_BT.shape, generator=generator, device=input_ids_BT.device)
    if token_weights_V is not None:
        chosen_BT = _choose_weighted(input_ids_BT, eligible_BT, token_weights_V, mask_prob, draw_BT)
    elif continuation_V is not None:
        chosen_BT = _choose_words(input_ids_BT, eligible_BT, continuation_V, mask_prob, draw_BT)
    else:
        chosen_BT = eligible_BT & (draw_BT < mask_prob)
    labels_BT = torch.where(chosen_BT, input_ids_BT, torch.full_like(input_ids_BT, IGNORE_INDEX))

    action_BT = torch.rand(input_ids_BT.shape, generator=generator, device=input_ids_BT.device)
    to_mask_BT = chosen_BT & (action_BT < mask_token_frac)
    to_random_BT = chosen_BT & (action_BT >= mask_token_frac) & (action_BT < mask_token_frac + random_token_frac)

    random_ids_BT = _random_regular_tokens(input_ids_BT.shape, special_ids, vocab_size, generator, input_ids_BT.device)
    out_BT = torch.where(to_mask_BT, torch.full_like(input_ids_BT, mask_id), input_ids_BT)
    out_BT = torch.where(to_random_BT, random_ids_BT.to(input_ids_BT.dtype), out_BT)
    return out_BT, labels_BT


def next_token_labels(input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor) -> torch.Tensor:
    """The causal-LM labels (GPT-2, Radford et al. 2019), B×T int64: position t's label is token t + 1 where both
    are real, −100 elsewhere (the last position, padding). Aligned with the logits, so that L_clm is the
    cross-entropy of logits and labels position by position — the shift HF's ``GPT2LMHeadModel`` makes inside its
    loss — and the KD term compares teacher and student at the same positions."""
    labels_BT = torch.full_like(input_ids_BT, IGNORE_INDEX)
    both_BT = attention_mask_BT[:, :-1].bool() & attention_mask_BT[:, 1:].bool()
    labels_BT[:, :-1] = torch.where(both_BT, input_ids_BT[:, 1:], torch.full_like(input_ids_BT[:, 1:], IGNORE_INDEX))
    return labels_BT


def _choose_weighted(ids_BT, eligible_BT, weights_V, mask_prob, draw_BT) -> torch.Tensor:
    """Weighted sampling without replacement by the Gumbel top-k trick: the k largest log w − log(−log u)."""
    w_BT = torch.where(eligible_BT, weights_V[ids_BT], torch.zeros((), dtype=weights_V.dtype, device=ids_BT.device))
    k = math.ceil(mask_prob * int(eligible_BT.sum()))  # one host sync per batch, as in HF's recipe
    keys_BT = torch.log(w_BT) - torch.log(-torch.log(draw_BT.clamp(min=1e-12)))
    keys_BT = torch.where(w_BT > 0, keys_BT, torch.full_like(keys_BT, -math.inf))
    chosen = torch.zeros(ids_BT.numel(), dtype=torch.bool, device=ids_BT.device)
    if k:
        chosen[torch.topk(keys_BT.flatten(), k).indices] = True
    return chosen.view_as(ids_BT) & eligible_BT


def _choose_words(ids_BT, eligible_BT, continuation_V, mask_prob, draw_BT) -> torch.Tensor:
    """Whole words: every position takes the draw of the position that starts its word."""
    starts_BT = ~continuation_V[ids_BT] | ~eligible_BT
    pos_BT = torch.arange(ids_BT.shape[1], device=ids_BT.device).expand_as(ids_BT)
    start_idx_BT = torch.cummax(torch.where(starts_BT, pos_BT, torch.zeros_like(pos_BT)), dim=1).values
    return eligible_BT & (draw_BT.gather(1, start_idx_BT) < mask_prob)


def smoothing_weights(counts_V, special_ids: list[int], exponent: float) -> torch.Tensor:
    """HF's recipe: a token's selection weight is max(count, 1)^-exponent; special tokens weigh 0."""
    w_V = torch.as_tensor(np.maximum(np.asarray(counts_V, dtype=np.float64), 1.0) ** -exponent, dtype=torch.float32)
    w_V[list(special_ids)] = 0.0
    return w_V


def continuation_table(tokenizer, starts_word) -> torch.Tensor:
    """True for the vocabulary entries that continue a word (WordPiece's "##ing", a byte-level BPE entry without
    its leading "Ġ"): they belong to the word before them. ``starts_word``: entry → bool, the family's rule."""
    vocab = tokenizer.get_vocab()
    table = torch.zeros(max(len(tokenizer), max(vocab.values()) + 1), dtype=torch.bool)
    for token, i in vocab.items():
        table[i] = not starts_word(token)
    return table


def _random_regular_tokens(shape, special_ids, vocab_size, generator, device) -> torch.Tensor:
    """Uniform draws over the vocabulary without the special ids (a random token is never [CLS] or [PAD])."""
    is_special = torch.zeros(vocab_size, dtype=torch.bool, device=device)
    is_special[special_ids] = True
    regular = torch.nonzero(~is_special).squeeze(1)
    idx = torch.randint(0, regular.numel(), shape, generator=generator, device=device)
    return regular[idx]


def step_generator(seed: int, rank: int, step: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator whose state depends only on (seed, rank, step), so a resumed run re-draws the same masks."""
    state = np.random.SeedSequence([seed, rank, step]).generate_state(1, dtype=np.uint64)[0]
    g = torch.Generator(device=device)
    g.manual_seed(int(state) & (2**63 - 1))
    return g
