"""The evaluate stage's checks before training: the tasks load once at the job's start, said in one line; rows of a
task's files left out are counted in its output and its MLflow run."""

import pytest

from pipeline.config import load_config
from pipeline.stages import evaluate


def test_checking_the_tasks_before_training_says_so_once_and_loading_them_names_each(tmp_path, capsys):
    cfg = load_config("configs/tiny.yaml", [f"run.root={tmp_path}"])
    evaluate.check_tasks(cfg)
    checked = capsys.readouterr().out.splitlines()
    assert checked == ["[distil] evaluate: 1 task(s) checked before training: rotten_tomatoes"]
    data = evaluate.load_tasks(cfg)
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith("[distil] evaluate: task rotten_tomatoes: ") and f"{len(data['rotten_tomatoes'].dev)} dev" in line


QQP_HEADER = "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate"


def _qqp_folder(root, train_rows, dev_rows):
    (root / "QQP").mkdir(parents=True)
    for name, rows in (("train.tsv", train_rows), ("dev.tsv", dev_rows)):
        (root / "QQP" / name).write_text("\n".join([QQP_HEADER, *rows]) + "\n", encoding="utf-8")


def test_rows_left_out_are_counted_per_file_in_the_output_and_the_stages_run(tmp_path, capsys, monkeypatch):
    """A GLUE folder whose train.tsv has a short row and a wide one: the stage's line counts them per file, and its
    MLflow run holds the counts as metrics and each row (file, line, why) as an artifact."""
    import mlflow

    from pipeline import tracking

    glue = tmp_path / "glue"
    _qqp_folder(glue, ["0\t1\t2\tWhat is AI?\tWhat's AI?\t1", "1\t3\t4\tHow to cook rice\t0",
                       "2\t5\t6\tIs it hot?\tIs it cold?\t0", "3\t7\t8\tA?\tB\tC?\t1"],
                ["4\t9\t10\tCan cats swim?\tDo cats swim?\t1", "5\t11\t12\tIs tea hot?\tIs ice cold?\t0"])
    cfg = load_config("configs/tiny.yaml", [f"run.root={tmp_path}", "evaluate.tasks=[glue:qqp]",
                                            f"evaluate.glue_dir={glue}"])
    data = evaluate.load_tasks(cfg)
    (line,) = capsys.readouterr().out.splitlines()
    assert line == ("[distil] evaluate: task qqp: 2 train, 2 dev examples, 2 classes; rows left out: train.tsv 2 "
                    "(line 3: 5 fields, the header has 6; line 5: 7 fields, the header has 6), dev.tsv 0")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    tracking.setup(str(tmp_path), "rows", uri=uri)
    with mlflow.start_run() as run:
        evaluate.log_task_data(data)
    logged = mlflow.get_run(run.info.run_id).data.metrics
    assert {k: v for k, v in logged.items() if k.startswith("data/")} == {
        "data/qqp/num_train_examples": 2.0, "data/qqp/num_train_rows_left_out": 2.0,
        "data/qqp/num_dev_examples": 2.0, "data/qqp/num_dev_rows_left_out": 0.0}
    rows = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/evaluation/rows_left_out.json")
    assert rows == {"qqp": {"train": {"file": str(glue / "QQP" / "train.tsv"),
                                      "rows": ["line 3: 5 fields, the header has 6", "line 5: 7 fields, the header has 6"]}}}


def test_a_dev_file_that_loses_rows_stops_the_pipeline_before_training(tmp_path):
    glue = tmp_path / "glue"
    _qqp_folder(glue, ["0\t1\t2\tWhat is AI?\tWhat's AI?\t1", "1\t3\t4\tIs it hot?\tIs it cold?\t0"],
                ["4\t9\t10\tCan cats swim?\t1", "5\t11\t12\tIs tea hot?\tIs ice cold?\t0"])
    cfg = load_config("configs/tiny.yaml", [f"run.root={tmp_path}", "evaluate.tasks=[glue:qqp]",
                                            f"evaluate.glue_dir={glue}"])
    with pytest.raises(ValueError, match=r"dev.tsv has 1 row\(s\) that cannot be read whole \(line 2: 5 fields"):
        evaluate.check_tasks(cfg)
    skipping = load_config("configs/tiny.yaml", [f"run.root={tmp_path}", "evaluate.tasks=[glue:qqp]",
                                                 f"evaluate.glue_dir={glue}", "evaluate.skip_bad_rows=all"])
    assert evaluate.task_data_metrics(evaluate.load_tasks(skipping, announce=False))["data/qqp/num_dev_rows_left_out"] == 1
