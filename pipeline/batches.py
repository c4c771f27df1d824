"""From a Ray Data iterator to masked training batches, the same way in the workers and in preview_batches.

Two guarantees live here:

- **Exact batch sizes.** Ray Data can yield short batches in the middle of an epoch when a local shuffle buffer
  meets block boundaries (ray-project/ray#66085), so two ranks holding the same number of rows (Train's
  ``streaming_split(equal=True)``) could still take different numbers of steps and hang in a collective.
  :func:`exact_batches` re-chunks the stream into batches of exactly ``size`` rows and drops only the final
  remainder: equal rows per rank then mean equal steps per rank.
- **Masks that depend only on (seed, rank, step).** :class:`Masker` holds what a worker needs to mask a batch
  (special ids, and the optional frequency weights or whole-word table) and draws from
  :func:`pipeline.masking.step_generator`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import torch

from pipeline import families, masking
from pipeline.config import MaskingSection
from pipeline.corpus import data_context, loading

COLUMNS = ("input_ids", "attention_mask")


def exact_batches(batches: Iterable[dict[str, np.ndarray]], size: int) -> Iterator[dict[str, np.ndarray]]:
    """Re-chunk numpy batches into batches of exactly ``size`` rows; the last partial batch is dropped."""
    pending: list[dict[str, np.ndarray]] = []
    have = 0
    for batch in batches:
        batch = {k: np.asarray(v) for k, v in batch.items()}
        rows = len(next(iter(batch.values())))
        if rows == size and not pending:
            yield batch
            continue
        pending.append(batch)
        have += rows
        while have >= size:
            merged = {k: np.concatenate([p[k] for p in pending]) for k in pending[0]}
            yield {k: v[:size] for k, v in merged.items()}
            have -= size
            pending = [{k: v[size:] for k, v in merged.items()}] if have else []


def epoch_batches(iterator, size: int, *, shuffle_rows: int, shuffle_seed: int) -> Iterator[dict[str, np.ndarray]]:
    """One epoch of a Ray DataIterator (or Dataset) in batches of exactly ``size`` rows."""
    shuffle = {"local_shuffle_buffer_size": shuffle_rows, "local_shuffle_seed": shuffle_seed} if shuffle_rows else {}
    raw = iterator.iter_batches(batch_size=size, batch_format="numpy", **shuffle)
    return exact_batches(raw, size)


def to_torch(batch: dict[str, np.ndarray], device, columns: dict | None = None) -> dict[str, torch.Tensor | bool]:
    """The ``columns`` of a numpy batch ({name: torch dtype}; default ``input_ids`` and ``attention_mask``, B×T
    int64) as tensors on ``device``; other columns are dropped. Raises KeyError when a column is missing.

    Adds ``packed`` (a host bool): the batch has an attention mask and every entry is 1 (packed rows, no padding).
    Read here from the numpy array, it costs no device sync; the models then run without a mask.
    """
    columns = columns or {k: torch.long for k in COLUMNS}
    out: dict[str, torch.Tensor | bool] = {k: torch.as_tensor(batch[k]).to(device=device, dtype=dtype)
                                           for k, dtype in columns.items()}
    out["packed"] = "attention_mask" in batch and bool(np.all(batch["attention_mask"]))
    return out


@dataclass
class Masker:
    """A worker's MLM masking: called as ``masker(input_ids_BT, attention_mask_BT, generator)`` it returns
    (masked input ids, labels), both B×T int64, labels -100 where nothing was chosen
    (:func:`pipeline.masking.mask_tokens`; BERT's [MASK]/random/kept split, 80/10/10 by default, Devlin et al.
    2019 §3.1).

    ``token_weights_V`` (V float, HF's frequency smoothing) and ``continuation_V`` (V bool, whole-word masking)
    are None unless the config turns them on.
    """

    cfg: MaskingSection
    special_ids: torch.Tensor
    mask_id: int
    vocab_size: int
    token_weights_V: torch.Tensor | None = None
    continuation_V: torch.Tensor | None = None

    @classmethod
    def build(cls, cfg: MaskingSection, tokenizer, *, token_counts=None, device="cpu", starts_word=None) -> "Masker":
        """The masker for ``tokenizer``, its tables on ``device``. Never chooses the tokenizer's special ids.

        ``token_counts`` (V counts over the training split, the manifest's ``token_counts``) is needed only
        when ``cfg.smoothing`` is on; without it that raises ValueError (re-run prepare). ``starts_word`` (a
        vocabulary entry → whether it begins a word: the family's
        :meth:`~pipeline.families.base.Family.starts_word`) is needed only when ``cfg.whole_word`` is on.
        """
        special = sorted(set(tokenizer.all_special_ids))
        weights = continuation = None
        if cfg.smoothing:
            if token_counts is None:
                raise ValueError("masking.smoothing needs the token counts of the prepare stage's manifest: re-run prepare")
            weights = masking.smoothing_weights(token_counts, special, cfg.smoothing).to(device)
        if cfg.whole_word:
            if starts_word is None:
                raise ValueError("masking.whole_word needs the family's word boundaries: pass starts_word")
            continuation = masking.continuation_table(tokenizer, starts_word).to(device)
        return cls(cfg=cfg, special_ids=torch.tensor(special, device=device), mask_id=tokenizer.mask_token_id,
                   vocab_size=len(tokenizer), token_weights_V=weights, continuation_V=continuation)

    def __call__(self, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor, generator: torch.Generator):
        return masking.mask_tokens(
            input_ids_BT, attention_mask_BT, special_ids=self.special_ids, mask_id=self.mask_id,
            vocab_size=self.vocab_size, generator=generator, mask_prob=self.cfg.mask_prob,
            mask_token_frac=self.cfg.mask_token_frac, random_token_frac=self.cfg.random_token_frac,
            token_weights_V=self.token_weights_V, continuation_V=self.continuation_V,
        )


@dataclass
class NextToken:
    """A causal LM's labels, as a :class:`Masker` is called: ``labeler(input_ids_BT, attention_mask_BT, generator)``
    returns (the input ids unchanged, :func:`pipeline.masking.next_token_labels`); nothing is drawn."""

    def __call__(self, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor, generator: torch.Generator):
        return input_ids_BT, masking.next_token_labels(input_ids_BT, attention_mask_BT)


def labeler(objective: str, cfg: MaskingSection, tokenizer, *, token_counts=None, device="cpu", starts_word=None):
    """What turns a packed batch into (inputs, labels) for a family's objective: a :class:`Masker` for "mlm", a
    :class:`NextToken` for "clm" (the family's ``objective``)."""
    if objective == "clm":
        return NextToken()
    return Masker.build(cfg, tokenizer, token_counts=token_counts, device=device, starts_word=starts_word)


def digest(input_ids, labels) -> str:
    """A short fingerprint of a masked batch: equal digests mean the same tokens and the same masks."""
    import hashlib

    h = hashlib.sha256()
    for a in (input_ids, labels):
        a = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
        h.update(np.ascontiguousarray(a, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


# ---- a human view: what rank 0 sees ------------------------------------------------------------------
def preview(cfg, manifest, dataset, tokenizer, num_batches: int):
    """Rank 0's first ``num_batches`` micro-batches of distillation, masked as the worker masks them.

    An in-memory corpus (the replicated path) gives exactly rank 0's batches: the same seeded order, the same
    global batch, the same mask draw, then rank 0's slice. A streamed corpus is split by Ray Train at run time;
    here it is read unsplit, with rank 0's masks.
    ``manifest`` is the prepared corpus's :class:`~pipeline.records.Manifest`. Yields dicts of numpy arrays:
    input_ids (masked), attention_mask, labels (B×T int64).
    """
    replicated = loading.fits_in_memory(manifest, "train", cfg.data.materialize_max_gib)
    micro, world = cfg.optim.micro_batch_size, cfg.scaling.num_workers
    per_iter = micro * world if replicated else micro
    family = families.get(cfg.teacher.family)
    masker = labeler(family.objective, cfg.masking, tokenizer, token_counts=manifest.token_counts,
                     starts_word=family.starts_word)
    with data_context.scoped(preserve_order=True):  # as driver.fit runs training
        raws = epoch_batches(dataset, per_iter, shuffle_rows=cfg.data.shuffle_buffer_rows, shuffle_seed=cfg.run.seed * 10_007)
        for i, raw in zip(range(num_batches), raws):
            t = to_torch(raw, "cpu")
            # The loop draws step_generator(seed, rank, step × grad_accum + micro index): micro-batch i is that index.
            ids_BT, labels_BT = masker(t["input_ids"], t["attention_mask"], masking.step_generator(cfg.run.seed, 0, i))
            mine = slice(0, micro)
            yield {"input_ids": ids_BT[mine].numpy(), "attention_mask": t["attention_mask"][mine].numpy(),
                   "labels": labels_BT[mine].numpy()}


def render(batch: dict[str, np.ndarray], tokenizer, max_rows: int) -> str:
    """Decoded rows with the chosen positions marked: [MASK:orig], {orig→random}, <orig> (kept unchanged); a
    causal LM's rows (no mask token: every position predicts the next) as their tokens."""
    if tokenizer.mask_token_id is None:
        return "\n".join(f"row {row} ({int(batch['attention_mask'][row].sum())} tokens, each predicting the next): " +
                         " ".join(tokenizer.convert_ids_to_tokens(batch["input_ids"][row][batch["attention_mask"][row].astype(bool)].tolist()))
                         for row in range(min(max_rows, len(batch["input_ids"]))))
    lines = []
    for row in range(min(max_rows, len(batch["input_ids"]))):
        ids, am, labels = batch["input_ids"][row], batch["attention_mask"][row], batch["labels"][row]
        out, real = [], am.astype(bool)
        for tid, lab in zip(ids[real], labels[real]):
            tok = tokenizer.convert_ids_to_tokens(int(tid))
            if lab == masking.IGNORE_INDEX:
                out.append(tok)
            else:
                orig = tokenizer.convert_ids_to_tokens(int(lab))
                out.append(f"[MASK:{orig}]" if tid == tokenizer.mask_token_id else f"<{orig}>" if tid == lab else f"{{{orig}→{tok}}}")
        chosen = int((labels[real] != masking.IGNORE_INDEX).sum())
        lines.append(f"row {row} ({int(am.sum())} tokens, {chosen} chosen): " + " ".join(out))
    return "\n".join(lines)
