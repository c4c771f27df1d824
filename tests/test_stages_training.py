"""Run names stay what earlier versions made: a Ray Train run (or a sweep, or an evaluation) started before an
upgrade that changes no setting resumes after it, because it finds its checkpoints under the same name."""

import pytest

from pipeline.config import load_config
from pipeline.evaluate import units
from pipeline.stages import evaluate, training

# The names since the teacher section gained `family` (model families: BERT, RoBERTa, GPT-2).
PINNED = {
    "configs/tiny.yaml": ("tiny-teacher-b1b9550d", "tiny-distill-6df154ca", "tiny-sweep-1363e2d9"),
    "configs/distilbert-base.yaml": ("distilbert-base-teacher-cbaffb6d", "distilbert-base-distill-d96977a7",
                                     "distilbert-base-sweep-6882a0e2"),
    "configs/teacher-minilm.yaml": ("minilm-teacher-6bcbc2cb", "minilm-distill-542ad2bf", "minilm-sweep-e13dd3bd"),
    "configs/tiny-roberta.yaml": ("tiny-roberta-teacher-b7094a39", "tiny-roberta-distill-cd178651",
                                  "tiny-roberta-sweep-117ebebc"),
    "configs/tiny-gpt2.yaml": ("tiny-gpt2-teacher-2c125bd7", "tiny-gpt2-distill-bc8a72ae", "tiny-gpt2-sweep-e9205046"),
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
