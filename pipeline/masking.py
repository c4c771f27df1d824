"""Dynamic BERT masking, re-drawn for every batch in the workers (Devlin et al. 2019, Sanh et al. 2019 §3).

Shape legend: B batch, T sequence length.

Each eligible token (not special, not padding) is chosen with probability ``mask_prob``. A chosen token
becomes [MASK] with probability ``mask_token_frac``, a uniformly random non-special token with probability
``random_token_frac``, and stays unchanged otherwise. ``labels`` hold the original id at chosen positions and
-100 everywhere else, so the MLM loss sees only chosen tokens. The draw is a pure function of the generator,
which the training loop seeds from (run seed, rank, step): the same seed gives the same masks.
"""

from __future__ import annotations

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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (masked input ids, labels). Inputs are not modified."""
    eligible_BT = attention_mask_BT.bool() & ~torch.isin(input_ids_BT, special_ids)
    draw_BT = torch.rand(input_ids_BT.shape, generator=generator, device=input_ids_BT.device)
    chosen_BT = eligible_BT & (draw_BT < mask_prob)
    labels_BT = torch.where(chosen_BT, input_ids_BT, torch.full_like(input_ids_BT, IGNORE_INDEX))

    action_BT = torch.rand(input_ids_BT.shape, generator=generator, device=input_ids_BT.device)
    to_mask_BT = chosen_BT & (action_BT < mask_token_frac)
    to_random_BT = chosen_BT & (action_BT >= mask_token_frac) & (action_BT < mask_token_frac + random_token_frac)

    random_ids_BT = _random_regular_tokens(input_ids_BT.shape, special_ids, vocab_size, generator, input_ids_BT.device)
    out_BT = torch.where(to_mask_BT, torch.full_like(input_ids_BT, mask_id), input_ids_BT)
    out_BT = torch.where(to_random_BT, random_ids_BT.to(input_ids_BT.dtype), out_BT)
    return out_BT, labels_BT


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
