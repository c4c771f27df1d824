"""configs/tiny-gpt2.yaml end to end, shortened as the demo's e2e run is: a GPT-2 teacher pre-trained with the
causal-LM objective, a half-depth GPT-2 student distilled with L_clm in L_mlm's place, the sweep ranked by
val/clm_loss, the probe and task distillation with GPT2ForSequenceClassification, and the champion registered as a
text-generation pipeline (pipeline/families/gpt2.py)."""

import pytest
from conftest import run_family_pipeline

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gpt2_run(tmp_path_factory):
    """`python -m jobs.pipeline --config configs/tiny-gpt2.yaml`, as a user runs it, on the embedded default."""
    return run_family_pipeline(tmp_path_factory.mktemp("gpt2"), "configs/tiny-gpt2.yaml", "tiny-gpt2", [])


def test_every_stage_but_export_ran_with_causal_metrics(gpt2_run):
    recs = gpt2_run["records"]
    assert set(recs) == {"prepare", "teacher", "distill", "sweep", "evaluate", "register", "task_distill"}
    teacher = recs["teacher"]["metrics"]
    assert {"val/clm_loss", "val/clm_acc", "val/perplexity"} <= set(teacher) and "val/mlm_loss" not in teacher
    assert teacher["val/clm_loss"] < 10.8, "below ln(50,257): the teacher learned next tokens"
    student = recs["distill"]["candidates"][0]["metrics"]
    assert {"val/clm_loss", "val/teacher_agreement", "loss/clm", "loss/ce", "loss/cos"} <= set(student)
    assert "teacher val/clm_loss" in gpt2_run["stdout"] and "student val/clm_loss" in gpt2_run["stdout"]


def test_the_registered_gpt2_champion_generates_text(gpt2_run):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{gpt2_run['root']}/mlflow.db")
    generate = mlflow.transformers.load_model("models:/distil-tiny-gpt2-student@champion")
    assert type(generate.model).__name__ == "GPT2LMHeadModel" and generate.model.config.n_layer == 2
    (answer,) = generate("the movie was", max_new_tokens=5, do_sample=False)
    assert answer["generated_text"].startswith("the movie was") and len(answer["generated_text"]) > len("the movie was")
    version = mlflow.MlflowClient().get_model_version_by_alias("distil-tiny-gpt2-student", "champion")
    assert "text-generation student" in version.description
    # as `mlflow models serve` calls it: the pyfunc with the registered model_config (no fill-mask tokenizer_kwargs)
    (served,) = mlflow.pyfunc.load_model("models:/distil-tiny-gpt2-student@champion").predict(["the movie was"])
    assert served.startswith("the movie was")
    assert "load it: mlflow.transformers.load_model('models:/distil-tiny-gpt2-student@champion')" in gpt2_run["stdout"]


def test_evaluate_and_task_distillation_score_gpt2_classifiers(gpt2_run):
    rec = gpt2_run["records"]["evaluate"]
    rows = {r["model"]: r for r in rec["table1"]["rows"]}
    assert "teacher" in rows and "distill" in rows
    assert all(0.5 <= r["tasks"]["rotten_tomatoes"]["median"] <= 1.0 for r in rows.values())
    task = gpt2_run["records"]["task_distill"]["tasks"]["rotten_tomatoes"]
    assert task["registered"]["student"]["name"] == "distil-tiny-gpt2-student-rotten_tomatoes"
    assert all(0.5 <= row["median"] <= 1.0 for row in task["rows"])
    assert "GPT2ForSequenceClassification" in (gpt2_run["root"] / "pipeline.log").read_text()
