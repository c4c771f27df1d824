"""configs/tiny-roberta.yaml end to end, shortened as the demo's e2e run is: every stage with a RoBERTa teacher,
a half-depth RoBERTa student, the registered fill-mask champion and its ONNX Runtime variants, all through the
family object (pipeline/families/roberta.py) and the packaged RoBERTa tokenizer."""

import pytest
from conftest import run_family_pipeline

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def roberta_run(tmp_path_factory):
    """`python -m jobs.pipeline --config configs/tiny-roberta.yaml`, as a user runs it, on the embedded default
    (local Ray, MLflow on sqlite under run.root)."""
    return run_family_pipeline(tmp_path_factory.mktemp("roberta"), "configs/tiny-roberta.yaml", "tiny-roberta",
                               ["export.eval_rows=64", "export.latency_runs=3"])


def _mlflow(run):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{run['root']}/mlflow.db")
    return mlflow


def test_every_stage_ran_with_a_roberta_teacher_and_student(roberta_run):
    assert set(roberta_run["records"]) == {"prepare", "teacher", "distill", "sweep", "evaluate", "register",
                                           "task_distill", "export"}
    from transformers import AutoConfig

    teacher = AutoConfig.from_pretrained(roberta_run["records"]["teacher"]["teacher_uri"])
    assert teacher.model_type == "roberta" and teacher.num_hidden_layers == 4 and teacher.max_position_embeddings == 514
    assert roberta_run["records"]["prepare"]["manifest"]["vocab_size"] == 50_261


def test_the_registered_roberta_champion_fills_its_mask(roberta_run):
    mlflow = _mlflow(roberta_run)
    fill = mlflow.transformers.load_model("models:/distil-tiny-roberta-student@champion")
    assert type(fill.model).__name__ == "RobertaForMaskedLM" and fill.model.config.num_hidden_layers == 2
    preds = fill("the movie was <mask> .")
    assert len(preds) == 5 and all(p["token"] < 50_261 for p in preds)
    assert fill.tokenizer.model_max_length == 512


def test_evaluate_scored_the_roberta_teacher_and_students(roberta_run):
    rec = roberta_run["records"]["evaluate"]
    rows = {r["model"]: r for r in rec["table1"]["rows"]}
    assert "teacher" in rows and "distill" in rows
    for row in rows.values():
        assert 0.5 <= row["tasks"]["rotten_tomatoes"]["median"] <= 1.0
    t3 = {r["model"]: r for r in rec["table3"]["rows"]}
    student = next(r for r in t3.values() if not r["is_teacher"])
    assert student["params"] < t3["teacher"]["params"]


def test_the_roberta_champion_is_exported_and_serves_text_with_its_mask(roberta_run):
    rec = roberta_run["records"]["export"]
    variants = {v["format"]: v for v in rec["variants"]}
    assert variants["onnx"]["max_abs_diff"] < 1e-3 and variants["onnx"]["passed"]
    served = _mlflow(roberta_run).pyfunc.load_model("models:/distil-tiny-roberta-student-onnx@champion")
    (fills,) = served.predict(["the movie was <mask> ."])
    assert len(fills) == 5 and all("<mask>" not in f["sequence"] for f in fills)
    # past the window: cut to the 512 tokens RoBERTa's 514 position rows take, as the PyTorch pipeline cuts it
    (long,) = served.predict(["the movie was <mask> ." + " great" * 600])
    assert len(long) == 5
