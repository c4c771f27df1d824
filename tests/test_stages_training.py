"""Run names stay what earlier versions made: a Ray Train run (or a sweep, or an evaluation) started before an
upgrade that changes no setting resumes after it, because it finds its checkpoints under the same name."""

import pytest

from pipeline.config import load_config
from pipeline.evaluate import units
from pipeline.stages import evaluate, training

# Made by the code before the stages became a package (the same names since the `compute` section was added;
# tiny.yaml's since its teacher took 512 positions).
PINNED = {
    "configs/tiny.yaml": ("tiny-teacher-5b2a8c4a", "tiny-distill-27337f4b", "tiny-sweep-1fedba32"),
    "configs/distilbert-base.yaml": ("distilbert-base-teacher-5cb5112d", "distilbert-base-distill-48b9f021",
                                     "distilbert-base-sweep-f5985edb"),
    "configs/teacher-minilm.yaml": ("minilm-teacher-29a532b7", "minilm-distill-fcf11d09", "minilm-sweep-ee4d5758"),
}
PINNED_EVALUATION = {"configs/tiny.yaml": "tiny-eval-401faef7-98813e",
                     "configs/teacher-minilm.yaml": "minilm-eval-f36b4b5d-98813e"}


@pytest.mark.parametrize("config", sorted(PINNED))
def test_training_run_names_are_the_ones_earlier_versions_made(config):
    """A changed name would start every resubmitted run from step 0. When a new setting must change them, say so
    in the commit and update the pinned names."""
    cfg = load_config(config, ["run.root=/tmp/pinned-root"])
    names = (training.run_name(cfg, "teacher", training.TEACHER_SECTIONS),
             training.run_name(cfg, "distill", training.TRAIN_SECTIONS, extra="teacher-uri"),
             training.run_name(cfg, "sweep", training.TRAIN_SECTIONS + ("sweep",), extra="teacher-uri"))
    assert names == PINNED[config]


@pytest.mark.parametrize("config", sorted(PINNED_EVALUATION))
def test_an_evaluation_keeps_its_name(config):
    cfg = load_config(config, ["run.root=/tmp/pinned-root"])
    model = units.Model(key="distill", source="distill", uri="/m")
    assert evaluate.stage_name(cfg, [model]) == PINNED_EVALUATION[config]


def test_a_setting_that_shapes_training_changes_the_name():
    cfg = load_config("configs/tiny.yaml", ["run.root=/tmp/pinned-root"])
    changed = cfg.with_overrides({"loss.temperature": 4.0})
    assert training.run_name(changed, "distill", training.TRAIN_SECTIONS) != \
        training.run_name(cfg, "distill", training.TRAIN_SECTIONS)
