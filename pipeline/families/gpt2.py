"""GPT-2 → a half-depth GPT-2 (Radford et al. 2019; HF's DistilGPT2): byte-level BPE with ``<|endoftext|>`` between
documents and as padding (GPT-2 has no pad or mask token), a causal-LM objective, ``GPT2LMHeadModel`` as teacher
and, with half the layers, as student.

Objective: L_clm, the next-token cross-entropy (position t predicts token t + 1), in place of L_mlm; the KD term
compares teacher and student at the same positions (each position's next-token distribution; nothing is shifted
between them), the cosine term the last hidden states (HF's distiller with ``--mlm false``, α_ce 5, α_clm 2, α_cos
1, T 2). Every tensor but the blocks is copied whole (token and position embeddings, the final LayerNorm; the LM
head is tied to the token embeddings and has no bias), and student block i takes teacher block ``layers[i]``.
"""

from __future__ import annotations

import re

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from pipeline.families.base import SameClassFamily


class Gpt2(SameClassFamily):
    """GPT-2 teachers and students (``GPT2LMHeadModel``), byte-level BPE, a causal-LM objective."""

    name = "gpt2"
    teacher_type = "gpt2"
    student_type = "gpt2"
    head_prefix = None  # the LM head is the token embedding table: every GPT2Model checkpoint carries it
    tokenizer_model = "BPE"
    example_tokenizer = "package:gpt2-bpe"
    example_teacher = "gpt2"
    layer_pattern = re.compile(r"^transformer\.h\.(\d+)\.")
    pipeline_task = "text-generation"
    objective = "clm"
    token_types = False  # GPT2Model adds wte(token_type_ids): segment ids 0 would add the embedding of token 0

    def teacher_config(self, *, num_layers, hidden_size, num_heads, intermediate_size, max_tokens, vocab_size,
                       pad_token_id) -> GPT2Config:
        # pad_token_id is the tokenizer's end-of-text id: bos and eos, as GPT-2's; no pad id while it trains as an LM
        # (:meth:`for_lm`), the exported folder carries it for downstream classifiers (pipeline/assets.py)
        return GPT2Config(vocab_size=vocab_size, n_embd=hidden_size, n_layer=num_layers, n_head=num_heads,
                          n_inner=intermediate_size, n_positions=max_tokens, bos_token_id=pad_token_id,
                          eos_token_id=pad_token_id, pad_token_id=None)

    def for_lm(self, model):
        """Without a pad id, as the hub's gpt2: packed rows hold <|endoftext|> between documents, and with a pad id
        set, every unmasked forward would compare the rows' ends with it on the host (transformers'
        ``warn_if_padding_and_no_attention_mask``: a device sync per step on GPU, and a warning)."""
        model.config.pad_token_id = None
        return model

    def teacher_class(self):
        return GPT2LMHeadModel

    def student_config(self, teacher_config: GPT2Config, num_layers: int) -> GPT2Config:
        config = GPT2Config.from_dict(teacher_config.to_dict())
        config.n_layer = num_layers
        return config

    def lm_logits(self, model, hidden_NxD):
        return model.lm_head(hidden_NxD)

    def output_bias(self, model):
        return model.lm_head.bias  # None: GPT-2's head has no bias (:meth:`padding_bias` adds one for padded rows)

    def padding_bias(self, model):
        """A bias for the padded rows' −inf logits: GPT-2's head has none, so a zero buffer (frozen: not a parameter,
        so no optimizer moves it; in the state dict, so checkpoints keep it) is added, once."""
        head = model.lm_head
        if head.bias is None:
            rows = head.weight.shape[0]
            del head.bias
            head.register_buffer("bias", torch.zeros(rows, dtype=head.weight.dtype, device=head.weight.device))
        return head.bias

    def drop_padding_bias(self, model):
        """Back to GPT-2's head without a bias, once the padded rows are cut: the real rows' bias is 0."""
        head = model.lm_head
        if head.bias is not None:
            del head.bias
            head.register_parameter("bias", None)

    def head_modules(self, model):
        return [model.lm_head]

    def shape(self, config):
        return {"layers": config.n_layer, "d": config.n_embd, "f": config.n_inner or 4 * config.n_embd,
                "vocab": config.vocab_size}

    def starts_word(self, token: str) -> bool:
        return token.startswith("Ġ")

    def tokenizer_problem(self, tokenizer, source):
        model = type(tokenizer.backend_tokenizer.model).__name__ if getattr(tokenizer, "is_fast", False) else "slow"
        if model != self.tokenizer_model:
            return (f"data.tokenizer {source!r} is a {model} tokenizer, but a gpt2 teacher reads BPE tokens: use the "
                    f"teacher's own tokenizer (e.g. {self.example_tokenizer})")
        if tokenizer.mask_token_id is not None or tokenizer.eos_token_id is None:
            return (f"data.tokenizer {source!r} is a masked LM's tokenizer (it has a mask token) or has no "
                    f"end-of-text token, but a gpt2 teacher reads GPT-2's own: use {self.example_tokenizer}")
        return None


GPT2 = Gpt2()
