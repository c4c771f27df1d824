"""The progress a training stage reports at each log step: one line per log step, or a live bar on a terminal.

Rank 0 of each training run (the teacher's pre-training, the distillation, each sweep trial) reports; other
ranks get a no-op (:func:`make`). A line reads

    [distil] distill  step 20/60 (33%) | loss 14.39 (ce 0.0235, mlm 7.111, cos 0.047) | val 7.192 | 2.10k tok/s | ETA 40s

Ray forwards a worker's stdout to the driver, prefixed with the process, e.g. ``(RayTrainWorker pid=7678)``.
Where the driver's stdout is a terminal, the driver asks for a bar instead (``DISTIL_PROGRESS=bar``, set by
pipeline/runtime.py): Ray's ``tqdm_ray`` draws it on the driver from the worker's state updates, and a line per
log step would only scroll the bar away. ``DISTIL_PROGRESS=lines`` forces lines on a terminal too.

Everything here but :func:`make` is pure: the formatting, the ETA and the choice of line or bar are tested
without Ray (tests/test_progress.py).
"""

from __future__ import annotations

import re
import time
from typing import Callable

PROGRESS_ENV = "DISTIL_PROGRESS"  # "lines" (default) | "bar"
MODES = ("lines", "bar")

# pipeline.stages.training.run_name: "<run.name>-<stage>-<8 hex>", and a sweep trial's TorchTrainer adds "-<Tune trial id>".
_RUN_NAME = re.compile(r"-(teacher|distill|sweep)-[0-9a-f]{8}(?:-(?P<trial>.+))?$")
# pipeline/stages/evaluate.py stage_name + "-<model>-<task>-s<seed>": one fine-tuning unit of the evaluate stage.
_UNIT_NAME = re.compile(r"-eval-[0-9a-f]{8}-[0-9a-f]{6}-(?P<unit>.+)$")


def stage_label(role: str, run_name: str) -> str:
    """What a person calls the run: "teacher", "distill", "sweep trial <id>" or "finetune <model>-<task>-s<seed>".

    ``role`` is the task's role ("teacher" | "student" | "finetune"); ``run_name`` the Ray Train run (experiment)
    name. A name the stages did not make (a test, a hand-built trainer) falls back to the role.
    """
    if unit := _UNIT_NAME.search(run_name):
        return f"finetune {unit.group('unit')}"
    m = _RUN_NAME.search(run_name)
    if m is None:
        return {"teacher": "teacher", "finetune": "finetune"}.get(role, "distill")
    if m.group(1) == "sweep":
        return f"sweep trial {m.group('trial')}" if m.group("trial") else "sweep"
    return m.group(1)


def eta_s(*, step: int, total: int, start_step: int, elapsed_s: float) -> float | None:
    """Seconds left at the mean pace since this process started at ``start_step`` (a resumed run counts from
    where it resumed); evaluation and checkpoint time are part of that pace. None before any step was timed."""
    done = step - start_step
    if done <= 0 or elapsed_s <= 0:
        return None
    return max(total - step, 0) * elapsed_s / done


def format_duration(seconds: float | None) -> str:
    """``42s``, ``3m05s``, ``2h07m``; ``?`` when unknown."""
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def format_rate(tokens_per_s: float) -> str:
    """``850 tok/s``, ``2.10k tok/s``, ``1.25M tok/s``."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if tokens_per_s >= scale:
            return f"{tokens_per_s / scale:.2f}{suffix} tok/s"
    return f"{tokens_per_s:.0f} tok/s"


def format_losses(metrics: dict[str, float]) -> str:
    """``loss 14.39 (ce 0.0235, mlm 7.111, cos 0.047)`` from the ``loss/*`` metrics; the total leads."""
    terms = {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("loss/")}
    if not terms:
        return "loss ?"
    total = terms.pop("total", None)
    parts = ", ".join(f"{k} {v:.4g}" for k, v in terms.items())
    if total is None:
        return f"loss ({parts})"
    return f"loss {total:.4g}" + (f" ({parts})" if parts else "")


VAL_LOSSES = ("val/mlm_loss", "val/clm_loss")  # the held-out loss of a masked or a causal LM


def format_line(*, stage: str, step: int, total: int, metrics: dict[str, float], eta: float | None) -> str:
    """One progress line; ``metrics`` are a log step's (``loss/*``, ``throughput/tokens_per_s``, and at an
    evaluation step ``val/mlm_loss``, or a causal LM's ``val/clm_loss``)."""
    width = len(str(total))
    pct = 100 * step // max(total, 1)
    fields = [f"[distil] {stage}  step {step:>{width}}/{total} ({pct:>2}%)", format_losses(metrics)]
    fields += [f"val {metrics[k]:.4g}" for k in VAL_LOSSES if k in metrics]
    if "throughput/tokens_per_s" in metrics:
        fields.append(format_rate(metrics["throughput/tokens_per_s"]))
    fields.append(f"ETA {format_duration(eta)}")
    return " | ".join(fields)


def bar_description(stage: str, metrics: dict[str, float]) -> str:
    """The text beside the bar (the bar itself shows step/total, the pace and the ETA)."""
    fields = [f"[distil] {stage}", format_losses(metrics)]
    fields += [f"val {metrics[k]:.4g}" for k in VAL_LOSSES if k in metrics]
    if "throughput/tokens_per_s" in metrics:
        fields.append(format_rate(metrics["throughput/tokens_per_s"]))
    return " | ".join(fields)


def format_trial_end(*, trial_id: str, step: int | None, total: int, metric: str, value) -> str:
    """The line a sweep trial ends with: finished, or stopped early by the scheduler (ASHA), and its score."""
    how = "finished" if step is not None and step >= total else "stopped early by the scheduler"
    score = f"{metric} {value:.4g}" if isinstance(value, (int, float)) else f"{metric} not reported"
    return f"[distil] sweep trial {trial_id} {how} at step {'?' if step is None else step}/{total} | {score}"


def trial_end_lines(*, metric: str, total: int):
    """A Ray Tune callback that prints :func:`format_trial_end` as each trial ends (Tune's own tables are off
    unless verbose, and an early stop would otherwise go unsaid). A trial's error is Tune's to print."""
    from ray import tune

    class TrialEndLines(tune.Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            result = trial.last_result or {}
            sample = (getattr(trial, "config", None) or {}).get("sample") or {}
            steps = sample.get("optim__max_steps", total)  # a sweep may vary the budget
            print(format_trial_end(trial_id=trial.trial_id, step=result.get("step"), total=steps, metric=metric,
                                   value=result.get(metric)), flush=True)

    return TrialEndLines()


class Progress:
    """Reports one run's progress: a line per call (``bar`` None), or updates ``bar`` (a tqdm-like object:
    ``update(n)``, ``set_description(s)``, ``close()``) to the step and sets its description."""

    def __init__(self, *, stage: str, total: int, start_step: int, bar=None,
                 out: Callable[[str], None] = print, clock: Callable[[], float] = time.perf_counter):
        self.stage, self.total, self.start_step = stage, total, start_step
        self.bar, self.out, self.clock = bar, out, clock
        self.t0 = clock()
        self._bar_step = start_step
        if bar is not None:
            if start_step:
                bar.update(start_step)  # a resumed run's bar starts where the run is
            bar.refresh()  # show it now: the driver times the bar (pace, ETA) from when it first hears of it

    def update(self, step: int, metrics: dict[str, float]) -> None:
        """Report optimizer step ``step`` (absolute, not since start) with a log step's ``metrics``: print
        :func:`format_line`, or advance the bar to ``step`` and describe it with :func:`bar_description`."""
        if self.bar is None:
            eta = eta_s(step=step, total=self.total, start_step=self.start_step, elapsed_s=self.clock() - self.t0)
            self.out(format_line(stage=self.stage, step=step, total=self.total, metrics=metrics, eta=eta))
            return
        self.bar.set_description(bar_description(self.stage, metrics))
        self.bar.update(step - self._bar_step)
        self._bar_step = step

    def close(self) -> None:
        """Close the bar, if there is one."""
        if self.bar is not None:
            self.bar.close()


class NoProgress:
    """What ranks other than 0 report: nothing."""

    def update(self, step: int, metrics: dict[str, float]) -> None:
        """Nothing: :meth:`Progress.update` on rank 0 reports."""
        pass

    def close(self) -> None:
        """Nothing to close."""
        pass


def mode_from(environ) -> str:
    """The progress mode the driver chose (``DISTIL_PROGRESS``); a value that is not a mode is an error."""
    mode = environ.get(PROGRESS_ENV, "lines") or "lines"
    if mode not in MODES:
        raise ValueError(f"{PROGRESS_ENV}={mode!r}: use one of {', '.join(MODES)}")
    return mode


def make(*, role: str, run_name: str, total: int, start_step: int, is_rank0: bool, mode: str):
    """Rank 0's progress for a Ray Train worker (``mode``: "lines" or "bar"); a no-op on other ranks."""
    if not is_rank0:
        return NoProgress()
    stage = stage_label(role, run_name)
    bar = None
    if mode == "bar":
        from ray.experimental import tqdm_ray

        # flush_interval_s=0: we update only at log steps, and every update must reach the driver.
        bar = tqdm_ray.tqdm(desc=f"[distil] {stage}", total=total, unit="step", flush_interval_s=0.0)
    return Progress(stage=stage, total=total, start_step=start_step, bar=bar,
                    out=lambda line: print(line, flush=True))
