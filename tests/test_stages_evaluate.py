"""The evaluate stage's checks before training: the tasks load once at the job's start, said in one line."""

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
