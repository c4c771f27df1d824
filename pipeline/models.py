"""The method's models: the student built from the teacher, the teacher built for pre-training, an aligned
vocabulary. No Ray, DeepSpeed or MLflow here.

The student is a ``DistilBertForMaskedLM``: the teacher's width, half its layers, no token-type embeddings,
no pooler. It is initialised from the teacher (Sanh et al. 2019, §3 "taking one layer out of two"):
embeddings, the mapped encoder layers and the MLM head are copied. BERT adds ``token_type_embeddings[0]`` to
every position of a single-segment input; the student has no token types, so that vector is folded into the
student's position embeddings and the student's embedding output equals the teacher's at initialisation.
Where models come from is pipeline/assets.py; a pretrained teacher's loading and checks, pipeline/teachers.py.
"""

from __future__ import annotations

import torch
from transformers import BertConfig, BertForMaskedLM, DistilBertConfig, DistilBertForMaskedLM

from pipeline.config import StudentSection, TeacherSection

HF_LAYER_MAP_12 = [0, 2, 4, 7, 9, 11]  # the layers HF's extract_distilbert.py keeps from BERT-base


def build_teacher_for_pretraining(cfg: TeacherSection, *, vocab_size: int, pad_token_id: int, seed: int) -> BertForMaskedLM:
    """A fresh BERT masked-LM with the configured shape (the offline teacher, before its pre-training)."""
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings,
        pad_token_id=pad_token_id,
    )
    return BertForMaskedLM(config)


def resolve_layer_map(layer_map, num_teacher_layers: int) -> list[int]:
    """The teacher layer indices the student's layers are copied from, in order: "alternate" is every other
    layer from 0 (Sanh et al. 2019 §3), "hf" is HF's ``extract_distilbert.py`` choice [0, 2, 4, 7, 9, 11] (12-layer
    teachers only), a list is taken as given. Raises ValueError for "hf" on another depth, an empty list or an
    index outside [0, ``num_teacher_layers``)."""
    if layer_map == "alternate":
        return list(range(0, num_teacher_layers, 2))
    if layer_map == "hf":
        if num_teacher_layers != 12:
            raise ValueError(f"student.layer_map=hf is defined for 12-layer teachers, this one has {num_teacher_layers}: use 'alternate' or a list")
        return list(HF_LAYER_MAP_12)
    bad = [i for i in layer_map if not 0 <= i < num_teacher_layers]
    if bad or not layer_map:
        raise ValueError(f"student.layer_map={layer_map}: indices must lie in [0, {num_teacher_layers - 1}]")
    return list(layer_map)


def student_config(teacher_config: BertConfig, num_layers: int) -> DistilBertConfig:
    """A DistilBERT config of ``num_layers`` layers with the teacher's vocabulary, positions, width (D), heads,
    FFN width, activation, dropouts, pad id and initializer range, so the teacher's weights fit it."""
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


def build_student(cfg: StudentSection, teacher: BertForMaskedLM, *, seed: int) -> DistilBertForMaskedLM:
    """Half the teacher's layers (or the layer map's length), initialised from the teacher or at random."""
    layers = resolve_layer_map(cfg.layer_map, teacher.config.num_hidden_layers)
    torch.manual_seed(seed)
    student = DistilBertForMaskedLM(student_config(teacher.config, len(layers)))
    if cfg.init == "teacher":
        init_from_teacher(student, teacher, layers)
    return student


@torch.no_grad()
def init_from_teacher(student: DistilBertForMaskedLM, teacher: BertForMaskedLM, layers: list[int]) -> None:
    """Copy the teacher's weights into ``student`` in place (Sanh et al. 2019 §3; HF ``extract_distilbert.py``):
    word embeddings, position embeddings with ``token_type_embeddings[0]`` folded in, the embedding LayerNorm,
    student layer i from teacher layer ``layers[i]``, and the MLM head (transform, LayerNorm, output bias; the
    output weight is tied to the word embeddings). Shapes must match (:func:`student_config`); a mismatch raises
    RuntimeError from torch."""
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


def pad_vocab(model: torch.nn.Module, multiple: int) -> int:
    """Pad the vocabulary of a BERT or DistilBERT masked LM in place to a multiple of ``multiple`` rows (word
    embeddings, the tied MLM decoder and its bias), so that the vocabulary matmuls run on aligned shapes (30,522 is
    not a multiple of 64; 30,528 is). The padded output logits are −inf (:func:`mask_padded_logits`): every loss
    gives them probability 0, value 0 and gradient 0 (pipeline/losses.py), and no input id reaches the new rows.
    Returns the vocabulary size before padding (what :func:`unpadded` restores); ``multiple`` ≤ 0 changes nothing.
    """
    real = model.get_input_embeddings().num_embeddings
    if multiple > 0 and real % multiple:
        model.resize_token_embeddings(None, pad_to_multiple_of=multiple, mean_resizing=False)
        mask_padded_logits(model, real)
    return real


@torch.no_grad()
def mask_padded_logits(model: torch.nn.Module, real_vocab: int) -> None:
    """Set the MLM output bias to −inf past ``real_vocab`` (a BERT's ``cls.predictions.bias``, a DistilBERT's
    ``vocab_projector.bias``); nothing to do for an unpadded model."""
    bias = model.vocab_projector.bias if hasattr(model, "vocab_projector") else model.cls.predictions.bias
    bias[real_vocab:] = float("-inf")


def unpadded(model: torch.nn.Module, real_vocab: int) -> torch.nn.Module:
    """``model`` itself when it has ``real_vocab`` rows, else a copy cut back to them (:func:`cut_vocab`; for
    export: a padded table is a training detail, not part of the model)."""
    import copy

    if model.get_input_embeddings().num_embeddings == real_vocab:
        return model
    out = copy.deepcopy(model)
    cut_vocab(out, real_vocab)
    return out


def cut_vocab(model: torch.nn.Module, num_rows: int) -> None:
    """Cut a BERT or DistilBERT masked LM's vocabulary to its first ``num_rows`` rows in place: the word
    embeddings, the tied MLM decoder's weight and its bias, and ``config.vocab_size`` (transformers'
    ``resize_token_embeddings``). The logits of the rows cut are gone, so no id past ``num_rows - 1`` can be
    predicted. Raises ValueError when the model has fewer rows (growing the table would add untrained rows)."""
    rows = model.get_input_embeddings().num_embeddings
    if rows < num_rows:
        raise ValueError(f"cannot cut a vocabulary of {rows:,} rows to {num_rows:,}: it has fewer")
    if rows > num_rows:
        model.resize_token_embeddings(num_rows, mean_resizing=False)


def count_parameters(model: torch.nn.Module) -> int:
    """Every parameter of ``model`` (tied weights once: ``parameters()`` yields a shared tensor once)."""
    return sum(p.numel() for p in model.parameters())
