"""A score that is not a finite number (NaN, ±inf) never wins: not in the registry's choice, not against the
champion, not in the sweep's ordering, and ASHA stops such a trial instead of ranking by it."""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from pipeline import registry
from pipeline.config import TrackingSection, load_config
from pipeline.records import Candidate

NAN, INF = math.nan, math.inf
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def _candidates(*scores, metric="val/mlm_loss"):
    return [Candidate(source=f"run {i}", checkpoint=f"ckpt{i}", metrics={metric: s, "val/mlm_acc": 0.1})
            for i, s in enumerate(scores)]


@pytest.mark.parametrize("mode,scores,winner", [
    ("min", [NAN, 6.0, 7.0], 1),
    ("min", [INF, 6.0, 7.0], 1),
    ("min", [-INF, 6.0, 7.0], 1),  # a loss of −inf is not a result
    ("min", [7.0, NAN, 6.0, -INF, INF], 2),
    ("max", [NAN, 6.0, 7.0], 2),
    ("max", [INF, 6.0, 7.0], 2),
    ("max", [-INF, 6.0, 7.0], 2),
    ("max", [6.0, 7.0, NAN], 1),
])
def test_choose_skips_scores_that_are_not_finite(mode, scores, winner):
    cfg = TrackingSection(select_mode=mode)
    assert registry.choose(_candidates(*scores), cfg).source == f"run {winner}"


def test_choose_counts_numpy_scores_and_skips_a_non_number():
    import numpy as np

    cands = _candidates(np.float32(NAN), np.float32(6.5), "7.0", True)
    assert registry.choose(cands, TrackingSection()).source == "run 1"


@pytest.mark.parametrize("scores", [[NAN, NAN, NAN], [NAN, INF, -INF]])
def test_choose_with_no_finite_score_is_one_clear_error(scores):
    with pytest.raises(ValueError, match=r"no candidate has a finite val/mlm_loss \(run 0: nan, run 1: .*lower optim.lr"):
        registry.choose(_candidates(*scores), TrackingSection())


def test_choose_without_the_metric_is_still_its_own_error():
    with pytest.raises(ValueError, match="no candidate reports 'val/mlm_loss'"):
        registry.choose([Candidate(source="a", checkpoint="c", metrics={"val/mlm_acc": 0.2})], TrackingSection())


@pytest.mark.parametrize("mode", ["min", "max"])
def test_champion_comparison_never_lets_a_non_finite_score_win(mode):
    better, worse = (5.0, 6.0) if mode == "min" else (6.0, 5.0)
    assert registry._better(better, worse, mode) and not registry._better(worse, better, mode)
    for bad in (NAN, INF, -INF):
        assert not registry._better(bad, worse, mode), bad  # beats no champion
        assert not registry._better(bad, None, mode), bad  # and does not become the first one
        assert registry._better(worse, bad, mode), bad  # any finite score beats a non-finite champion
    assert registry._better(worse, None, mode)  # no champion yet


def test_the_alias_moves_by_finite_scores_in_a_real_registry(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    cfg = TrackingSection(model_name="m")
    client.create_registered_model("m")

    def new_version(score):
        version = client.create_model_version("m", source=str(tmp_path)).version
        client.set_model_version_tag("m", version, registry.METRIC_TAG_PREFIX + cfg.select_metric, str(score))
        return registry._move_alias(client, cfg, version, score)

    assert new_version(NAN) == "challenger"  # no champion yet, and still not one
    assert new_version(7.0) == "champion"
    assert new_version(-INF) == "challenger"
    assert new_version(6.0) == "champion"
    assert str(client.get_model_version_by_alias("m", "champion").version) == "4"
    client.set_model_version_tag("m", "4", registry.METRIC_TAG_PREFIX + cfg.select_metric, "nan")
    assert new_version(9.0) == "champion", "a finite score beats a champion tagged nan"


def _trial_result(tmp_path, i, score):
    """What Tune hands back for a trial that ran to the end: its metrics and its final checkpoint (written by
    checkpoint.save, with an exported model's config)."""
    from test_checkpoint import ShardedEngine

    from pipeline import checkpoint

    ckpt = tmp_path / f"checkpoint_{i}"
    (ckpt / "hf_model").mkdir(parents=True)
    (ckpt / "hf_model" / "config.json").write_text(json.dumps({"model_type": "distilbert"}))
    checkpoint.save(ShardedEngine(0), str(ckpt), checkpoint.TrainState(step=8), config={}, git_sha="abc", rank=0,
                    metrics={"val/mlm_loss": score})
    metrics = {"val/mlm_loss": score, "checkpoint_path": str(ckpt), "trial_id": f"t{i}"}
    return SimpleNamespace(metrics=metrics, error=None, config={"sample": {"loss__temperature": float(i)}})


def test_sweep_candidates_come_best_first_with_non_finite_scores_last(tmp_path):
    from pipeline.train import sweep

    cfg = load_config(CONFIG, [f"run.root={tmp_path}", "tracking.select_metric=val/mlm_loss"])  # the sweep's metric
    scores = [NAN, 7.0, -INF, 6.0, INF]
    found = sweep.candidates([_trial_result(tmp_path, i, s) for i, s in enumerate(scores)], cfg)
    assert [c.metrics["val/mlm_loss"] for c in found][:2] == [6.0, 7.0]
    assert [c.source.split()[2] for c in found] == ["t3", "t1", "t0", "t2", "t4"]
    assert registry.choose(found, cfg.tracking).source.startswith("sweep trial t3 ")


def test_a_trial_whose_final_checkpoint_is_damaged_is_not_a_candidate(tmp_path, capsys):
    from pipeline.train import sweep

    cfg = load_config(CONFIG, [f"run.root={tmp_path}"])
    results = [_trial_result(tmp_path, 0, 6.0), _trial_result(tmp_path, 1, 7.0)]
    (tmp_path / "checkpoint_0" / "hf_model" / "config.json").write_text("[]" + " " * 30)
    found = sweep.candidates(results, cfg)
    assert [c.source.split()[2] for c in found] == ["t1"]
    assert "trial t0 is not a candidate" in capsys.readouterr().out


def _asha(mode):
    from pipeline.train import sweep

    metric = "val/mlm_loss" if mode == "min" else "val/mlm_acc"  # a loss is minimised, an accuracy maximised
    cfg = load_config(CONFIG, ["optim.max_steps=8", "sweep.grace_period=1", f"sweep.mode={mode}", f"sweep.metric={metric}"])
    scheduler = sweep.scheduler(cfg)
    scheduler.set_search_properties(cfg.sweep.metric, mode)
    return scheduler


def _report(scheduler, trial_id, step, score):
    trial = SimpleNamespace(trial_id=trial_id)
    if trial_id not in scheduler._trial_info:
        scheduler.on_trial_add(None, trial)
    return scheduler.on_trial_result(None, trial, {"step": step, scheduler._metric: score})


@pytest.mark.parametrize("mode", ["min", "max"])
@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_asha_stops_a_non_finite_trial_and_ranks_the_others_by_real_scores(mode, bad):
    from ray.tune.schedulers.trial_scheduler import TrialScheduler

    good, worse, best = (6.0, 7.0, 5.0) if mode == "min" else (6.0, 5.0, 7.0)
    asha = _asha(mode)
    assert _report(asha, "good", 1, good) == TrialScheduler.CONTINUE
    assert _report(asha, "bad", 1, bad) == TrialScheduler.STOP
    assert _report(asha, "worse", 1, worse) == TrialScheduler.STOP  # ranked against the good trial only
    assert _report(asha, "best", 1, best) == TrialScheduler.CONTINUE
    asha.on_trial_complete(None, SimpleNamespace(trial_id="bad"), {"step": 1, asha._metric: bad})
    assert "bad" not in asha._trial_info
    assert all(bad not in rung.values() for b in asha._brackets for _, rung in b._rungs)


def test_why_plain_asha_is_not_enough():
    """Ray 2.60's ASHA keeps NaN and −inf-loss trials running, and after a −inf loss its rung stops nothing."""
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.schedulers.trial_scheduler import TrialScheduler

    plain = ASHAScheduler(time_attr="step", max_t=8, grace_period=1, reduction_factor=2)
    plain.set_search_properties("val/mlm_loss", "min")
    ours = _asha("min")
    for asha in (plain, ours):
        assert _report(asha, "good", 1, 6.0) == TrialScheduler.CONTINUE
    for trial_id, score in [("nan", NAN), ("minus-inf", -INF)]:
        assert _report(plain, trial_id, 1, score) == TrialScheduler.CONTINUE
        assert _report(ours, trial_id, 1, score) == TrialScheduler.STOP
    assert _report(plain, "worse", 1, 7.0) == TrialScheduler.CONTINUE  # the rung's cutoff is now NaN
    assert _report(ours, "worse", 1, 7.0) == TrialScheduler.STOP


def test_sweep_candidates_keep_numpy_metrics_as_floats(tmp_path):
    import numpy as np

    from pipeline.train import sweep

    cfg = load_config(CONFIG, [f"run.root={tmp_path}"])
    result = _trial_result(tmp_path, 0, 6.0)
    result.metrics.update({"val/mlm_loss": np.float32(6.5), "val/mlm_acc": np.float64(0.25), "flag/ok": True})
    (found,) = sweep.candidates([result], cfg)
    assert found.metrics == {"val/mlm_loss": 6.5, "val/mlm_acc": 0.25}
    assert all(type(v) is float for v in found.metrics.values())


def test_asha_runs_to_the_longest_budget_a_sweep_samples(tmp_path):
    from pipeline.train import sweep

    cfg = load_config(CONFIG, [f"run.root={tmp_path}", "sweep.space={optim.max_steps: {type: choice, values: [60, 120]}}"])
    assert sweep.max_steps(cfg) == 120 and sweep.scheduler(cfg)._max_t == 120
    assert sweep.max_steps(load_config(CONFIG, [f"run.root={tmp_path}"])) == 60


def test_a_tie_picks_the_first_candidate_and_says_so(capsys):
    cfg = TrackingSection(select_metric="val/mlm_loss")
    tied = _candidates(6.0, 5.0, 5.0)
    assert registry.choose(tied, cfg).source == "run 1"
    out = capsys.readouterr().out
    assert "run 1 and run 2 tie on val/mlm_loss = 5; chose the first in candidate order" in out
    registry.choose(_candidates(6.0, 5.0, 4.0), cfg)
    assert "tie" not in capsys.readouterr().out


def test_the_model_card_is_a_page_a_person_reads():
    """What the student is and how to load it, how good, how fast, the settings in a few lines, lineage; the whole
    config is an artifact of the register run, not pasted into the card."""
    from transformers import DistilBertConfig, DistilBertForMaskedLM

    student = DistilBertForMaskedLM(DistilBertConfig(vocab_size=1100, dim=32, n_layers=1, n_heads=2, hidden_dim=64,
                                                     max_position_embeddings=128))
    config = {"loss": {"temperature": 2.0, "alpha_ce": 5.0, "alpha_mlm": 2.0, "alpha_cos": 1.0},
              "student": {"layer_map": "alternate", "init": "teacher"}, "optim": {"max_steps": 60, "lr": 5e-4,
              "micro_batch_size": 8, "grad_accum": 1}, "data": {"max_seq_len": 64}, "run": {"name": "x" * 5000}}
    metrics = {"val/mlm_loss": 7.25, "eval/macro": 0.61, "eval/rt/score": 0.61, "perf/mfu": 0.01, "resume/from_step": 0}
    card = registry.model_card(name="s", model=student, metrics=metrics, lineage={"git_sha": "abc"}, config=config)
    sections = [line for line in card.splitlines() if line.startswith("## ")]
    assert sections == ["## How good", "## How fast and how small", "## Settings", "## Lineage"]
    assert "| eval/macro | 0.61 |" in card and "| val/mlm_loss | 7.25 |" in card and "| eval/rt/score | 0.61 |" in card
    assert "perf/mfu" not in card and "xxxxx" not in card and "```" not in card
    assert "- loss: T=2.0, α_ce=5.0, α_mlm=2.0, α_cos=1.0" in card and f"`{registry.CONFIG_ARTIFACT}`" in card
    assert len(card.splitlines()) < 40
    with_tables = registry.model_card(name="s", model=student, metrics=metrics, lineage={}, config=None,
                                      evaluation="Table 1: dev scores ×100, one seed")
    assert "## How good" in with_tables and "\n### Downstream evaluation\n\nTable 1: dev scores" in with_tables
