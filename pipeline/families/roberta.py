"""RoBERTa → a half-depth RoBERTa (Liu et al. 2019; HF's DistilRoBERTa): byte-level BPE with ``<s> … </s>``,
``<pad>`` and ``<mask>``; the student is ``RobertaForMaskedLM`` itself with half the layers.

RoBERTa numbers positions from ``padding_idx + 1`` (fairseq's convention): a model of 512 tokens has 514 rows in
its position table. It keeps a one-row token-type table, which the student copies as it is. Every tensor but the
encoder layers is copied whole (embeddings, the LM head: dense, LayerNorm, bias; the decoder is tied to the word
embeddings), and student layer i takes teacher layer ``layers[i]``, as HF's ``extract.py`` does for RoBERTa.
"""

from __future__ import annotations

import re

from transformers import RobertaConfig, RobertaForMaskedLM

from pipeline.families.base import SameClassFamily


class Roberta(SameClassFamily):
    """RoBERTa teachers and students (``RobertaForMaskedLM``), byte-level BPE, positions offset by pad id + 1."""

    name = "roberta"
    teacher_type = "roberta"
    student_type = "roberta"
    head_prefix = "lm_head."
    tokenizer_model = "BPE"
    example_tokenizer = "package:roberta-bpe"
    example_teacher = "roberta-base"
    layer_pattern = re.compile(r"^roberta\.encoder\.layer\.(\d+)\.")

    def teacher_config(self, *, num_layers, hidden_size, num_heads, intermediate_size, max_tokens, vocab_size,
                       pad_token_id) -> RobertaConfig:
        return RobertaConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                             num_attention_heads=num_heads, intermediate_size=intermediate_size,
                             max_position_embeddings=max_tokens + pad_token_id + 1, type_vocab_size=1,
                             pad_token_id=pad_token_id)

    def max_tokens(self, config) -> int:
        pad = 1 if config.pad_token_id is None else config.pad_token_id  # RoBERTa's padding_idx, 1 unless set
        return config.max_position_embeddings - pad - 1

    def teacher_class(self):
        return RobertaForMaskedLM

    def student_config(self, teacher_config: RobertaConfig, num_layers: int) -> RobertaConfig:
        config = RobertaConfig.from_dict(teacher_config.to_dict())
        config.num_hidden_layers = num_layers
        return config

    def lm_logits(self, model, hidden_NxD):
        return model.lm_head(hidden_NxD)

    def output_bias(self, model):
        return model.lm_head.bias

    def head_modules(self, model):
        return [model.lm_head]

    def starts_word(self, token: str) -> bool:
        return token.startswith("Ġ")  # byte-level BPE marks a preceding space: "Ġplay", "ing"

    def tokenizer_problem(self, tokenizer, source):
        problem = super().tokenizer_problem(tokenizer, source)
        if problem is None and tokenizer.mask_token_id is None:
            return (f"data.tokenizer {source!r} has no <mask> token (a GPT-2 tokenizer?): a RoBERTa teacher "
                    f"needs one; use {self.example_tokenizer}")
        return problem


ROBERTA = Roberta()
