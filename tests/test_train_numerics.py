"""The NaN/Inf guard names the step and the term; fp16 overflow steps are skipped, counted and logged."""

import math

import pytest
import torch

from pipeline.train.numerics import Numerics


def _terms(kd=1.0, mlm=2.0):
    return {"loss/ce": torch.tensor(kd), "loss/mlm": torch.tensor(mlm)}


def test_first_non_finite_step_and_term_are_named_even_when_checked_later():
    n = Numerics(fp16=False, skipped_steps=0, is_rank0=True)
    for step in range(1, 4):
        assert n.after_step(step, _terms(), skipped_steps=0, loss_scale=None)
    n.check()  # all finite so far
    n.after_step(4, _terms(kd=math.nan), skipped_steps=0, loss_scale=None)
    n.after_step(5, _terms(kd=math.inf, mlm=math.inf), skipped_steps=0, loss_scale=None)
    n.after_step(6, _terms(), skipped_steps=0, loss_scale=None)
    with pytest.raises(FloatingPointError, match=r"loss/ce was nan at step 4"):
        n.check()


def test_inf_is_reported_with_its_sign():
    n = Numerics(fp16=False, skipped_steps=0, is_rank0=True)
    n.after_step(7, _terms(mlm=-math.inf), skipped_steps=0, loss_scale=None)
    with pytest.raises(FloatingPointError, match=r"loss/mlm was -inf at step 7"):
        n.check()


def test_fp16_overflow_step_is_skipped_logged_and_left_out_of_the_means(capsys):
    n = Numerics(fp16=True, skipped_steps=3, is_rank0=True)  # a resumed run: DeepSpeed's counter starts at 3
    assert n.after_step(1, _terms(), skipped_steps=3, loss_scale=65536.0)
    # DeepSpeed's scaler skipped step 2: its (inf) loss is not an error and not part of the means.
    assert not n.after_step(2, _terms(kd=math.inf), skipped_steps=4, loss_scale=32768.0)
    n.check()
    assert "step 2: fp16 gradient overflow, step skipped" in capsys.readouterr().out
    assert n.pop_metrics() == {"optim/skipped_steps": 4.0, "optim/skipped_steps_since_log": 1.0, "optim/loss_scale": 32768.0}
    assert n.pop_metrics()["optim/skipped_steps_since_log"] == 0.0


def test_fp16_scale_collapse_is_an_error():
    n = Numerics(fp16=True, skipped_steps=0, is_rank0=False)
    with pytest.raises(FloatingPointError, match="use deepspeed.precision=bf16"):
        for step in range(1, Numerics.MAX_CONSECUTIVE_SKIPS + 3):
            n.after_step(step, _terms(kd=math.inf), skipped_steps=step, loss_scale=1.0)


def test_bf16_and_fp32_log_no_overflow_metrics():
    n = Numerics(fp16=False, skipped_steps=0, is_rank0=True)
    n.after_step(1, _terms(), skipped_steps=0, loss_scale=1.0)
    assert n.pop_metrics() == {}
