"""The prepare stage's tokenizer, on both sides of the Ray boundary.

The driver loads the transformers tokenizer once (:func:`load_tokenizer`: for the vocabulary hash in the cache key
and the manifest's vocabulary size) and hands the Ray Data tasks a :class:`WorkerTokenizer`, a small frozen value
(the fast tokenizer's JSON and the special ids) that each task process turns into a `tokenizers` backend once
(:func:`_backend`, cached per process) to encode its documents.
"""

from __future__ import annotations

import dataclasses
import functools

from pipeline.corpus import packing


# Text is text: a document that spells "[MASK]" or "[SEP]" is tokenised as "[", "mask", "]", never as the
# special id. Only the packer places [CLS] and [SEP]; a [PAD] or [MASK] id inside a row would be a control token
# the model trains on (and, for [PAD], one the attention mask says is real).
@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str):
    """The fast (Rust) transformers tokenizer of a local folder, cached per path; special-token text in a document
    is split as text. Raises OSError for a folder without tokenizer files."""
    from transformers import AutoTokenizer

    # Documents are longer than the model's window before packing cuts them: silence that length warning.
    # split_special_tokens: special-token text in a document is tokenised as text, as the workers do.
    return AutoTokenizer.from_pretrained(path, use_fast=True, model_max_length=10**9, split_special_tokens=True)


@dataclasses.dataclass(frozen=True)
class WorkerTokenizer:
    """What a Ray Data task needs of the tokenizer: the fast tokenizer's own JSON and the special ids.

    The tasks load it with the `tokenizers` library alone: importing transformers (and torch with it) costs a
    fresh worker process seconds, which on a small cluster is a large share of the prepare stage.
    ``control``: every special id but [UNK] (the special tokens and the added tokens marked special). No
    document's encoding holds one: special-token text is split as text (``encode_special_tokens``), and a
    tokenizer whose pre-tokenizer would still look such a word up in its vocabulary gets [UNK] for it.
    """

    json: str
    special: packing.SpecialIds
    vocab_size: int
    control: tuple[int, ...] = ()

    @classmethod
    def of(cls, tok) -> "WorkerTokenizer":
        """From a transformers fast tokenizer; ValueError for a slow one (the prepare stage needs tokenizer.json)."""
        if not getattr(tok, "is_fast", False):
            raise ValueError(f"{type(tok).__name__} is not a fast tokenizer: the prepare stage needs one (tokenizer.json)")
        eos = tok.eos_token_id
        if tok.cls_token_id is None:  # a causal LM's (GPT-2's): its end-of-text token separates and pads
            special = packing.SpecialIds(cls=None, sep=eos, pad=eos if tok.pad_token_id is None else tok.pad_token_id,
                                         unk=None if tok.unk_token_id == eos else tok.unk_token_id, mask=None)
        else:
            special = packing.SpecialIds(cls=tok.cls_token_id, sep=tok.sep_token_id, pad=tok.pad_token_id,
                                         unk=tok.unk_token_id, mask=tok.mask_token_id)
        ids = set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items() if t.special}
        ids |= {special.cls, special.sep, special.pad, special.mask}
        control = tuple(sorted(i for i in ids if i is not None and i != special.unk))
        return cls(json=tok.backend_tokenizer.to_str(), special=special, vocab_size=len(tok), control=control)

    def encode(self, docs: list[str]) -> list[list[int]]:
        """Token ids of each document, without special tokens added; none of them is a ``control`` id."""
        if not docs:
            return []
        control = frozenset(self.control)
        ids = [e.ids for e in _backend(self.json).encode_batch(docs, add_special_tokens=False)]
        unk = self.special.unk  # None (byte-level BPE): a control id is dropped rather than replaced
        return [i if control.isdisjoint(i) else [unk if t in control else t for t in i if unk is not None or t not in control]
                for i in ids]


@functools.lru_cache(maxsize=4)
def _backend(tokenizer_json: str):
    import tokenizers

    backend = tokenizers.Tokenizer.from_str(tokenizer_json)
    backend.no_truncation()  # a saved tokenizer.json may carry a model window's truncation and padding
    backend.no_padding()
    backend.encode_special_tokens = True  # "[MASK]" in a document is text (not serialised in the JSON: set here)
    return backend
