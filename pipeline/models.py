"""The method's models: the student built from the teacher, the teacher built for pre-training, an aligned
vocabulary. No Ray, DeepSpeed or MLflow here.

What differs between families (BERT's DistilBERT student with token types folded into positions, RoBERTa's
half-depth RoBERTa) is asked of the family (pipeline/families/): this module picks the layers and the seed.
Where models come from is pipeline/assets.py; a pretrained teacher's loading and checks, pipeline/teachers.py.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from pipeline import families
from pipeline.config import StudentSection, TeacherSection

HF_LAYER_MAP_12 = [0, 2, 4, 7, 9, 11]  # the layers HF's extract_distilbert.py keeps from BERT-base


def build_teacher_for_pretraining(cfg: TeacherSection, *, vocab_size: int, pad_token_id: int, seed: int) -> PreTrainedModel:
    """A fresh masked LM of ``cfg.family`` with the configured shape (the offline teacher, before its
    pre-training); ``cfg.max_position_embeddings`` is in tokens (a RoBERTa's table gets its offset rows too)."""
    torch.manual_seed(seed)
    family = families.get(cfg.family)
    config = family.teacher_config(num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, num_heads=cfg.num_heads,
                                   intermediate_size=cfg.intermediate_size, max_tokens=cfg.max_position_embeddings,
                                   vocab_size=vocab_size, pad_token_id=pad_token_id)
    return family.teacher_class()(config)


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


def build_student(cfg: StudentSection, teacher: PreTrainedModel, *, seed: int) -> PreTrainedModel:
    """The teacher family's student (a DistilBERT for BERT, a RoBERTa for RoBERTa) with half the teacher's layers
    (or the layer map's length), initialised from the teacher (:meth:`~pipeline.families.base.Family.init_student`)
    or at random."""
    family = families.of(teacher)
    layers = resolve_layer_map(cfg.layer_map, teacher.config.num_hidden_layers)
    torch.manual_seed(seed)
    student = family.student_class()(family.student_config(teacher.config, len(layers)))
    if cfg.init == "teacher":
        family.init_student(student, teacher, layers)
    return student


def pad_vocab(model: torch.nn.Module, multiple: int) -> int:
    """Pad the vocabulary of a language model in place to a multiple of ``multiple`` rows (word
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
    """Set the LM head's output bias to −inf past ``real_vocab`` (the family's
    :meth:`~pipeline.families.base.Family.padding_bias`: its own bias, or for a head without one, GPT-2's, a
    frozen zero bias added for the padded rows and dropped again at export); nothing to do for an unpadded model."""
    if model.get_input_embeddings().num_embeddings <= real_vocab:
        return
    families.of(model).padding_bias(model)[real_vocab:] = float("-inf")


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
    """Cut a masked LM's vocabulary to its first ``num_rows`` rows in place: the word
    embeddings, the tied MLM decoder's weight and its bias, and ``config.vocab_size`` (transformers'
    ``resize_token_embeddings``). The logits of the rows cut are gone, so no id past ``num_rows - 1`` can be
    predicted. Raises ValueError when the model has fewer rows (growing the table would add untrained rows)."""
    rows = model.get_input_embeddings().num_embeddings
    if rows < num_rows:
        raise ValueError(f"cannot cut a vocabulary of {rows:,} rows to {num_rows:,}: it has fewer")
    if rows > num_rows:
        model.resize_token_embeddings(num_rows, mean_resizing=False)
        families.of(model).drop_padding_bias(model)


def count_parameters(model: torch.nn.Module) -> int:
    """Every parameter of ``model`` (tied weights once: ``parameters()`` yields a shared tensor once)."""
    return sum(p.numel() for p in model.parameters())
