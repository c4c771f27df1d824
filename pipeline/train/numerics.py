"""The numerics guard of the training loop: NaN/Inf in any loss term, fp16 loss-scale overflow accounting.

No host sync per step: the first bad step of each term is recorded on the device and read at log steps.
"""

from __future__ import annotations

import torch


class Numerics:
    """NaN/Inf guard and fp16 overflow accounting, without a host sync per step.

    After each step, ``after_step`` records on the device the first step at which each loss term was not
    finite; ``check`` (at log steps, and so before every checkpoint) raises naming that step and term.
    Under fp16, DeepSpeed's loss scaler skips a step whose gradients overflowed: that step is logged, left out
    of the means, and is not an error unless the scaler keeps skipping (the scale has collapsed).
    """

    MAX_CONSECUTIVE_SKIPS = 50

    def __init__(self, *, fp16: bool, skipped_steps: int, is_rank0: bool):
        self.fp16, self.is_rank0 = fp16, is_rank0
        self.skipped_total = skipped_steps
        self.skipped_since_log = 0
        self.consecutive = 0
        self.loss_scale: float | None = None
        self._first: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # term → (step or -1, value then)

    def after_step(self, step: int, metrics: dict[str, torch.Tensor], skipped_steps: int, loss_scale) -> bool:
        """Returns whether the step was applied (and so belongs in the means)."""
        self.loss_scale = loss_scale
        if skipped_steps > self.skipped_total:
            self.skipped_total = skipped_steps
            self.skipped_since_log += 1
            self.consecutive += 1
            if self.is_rank0:
                print(f"[distil] step {step}: fp16 gradient overflow, step skipped by the loss scaler "
                      f"(loss scale now {loss_scale})", flush=True)
            if self.consecutive > self.MAX_CONSECUTIVE_SKIPS:
                raise FloatingPointError(
                    f"fp16: {self.consecutive} steps in a row overflowed up to step {step} (loss scale {loss_scale}): "
                    "the model does not fit fp16's range; use deepspeed.precision=bf16 or lower optim.lr"
                )
            return False
        self.consecutive = 0
        for k, v in metrics.items():
            v = v.detach()
            first_step, first_value = self._first.get(k) or (torch.full((), -1, dtype=torch.long, device=v.device), v)
            new_bad = (first_step < 0) & ~torch.isfinite(v)
            self._first[k] = (torch.where(new_bad, step, first_step), torch.where(new_bad, v, first_value))
        return True

    def check(self) -> None:
        """Raise FloatingPointError naming the first step at which a loss term was NaN or Inf, and its value;
        reads the device (one host sync), so the loop calls it at log steps only."""
        for k, (first_step, value) in self._first.items():
            step = int(first_step)
            if step >= 0:
                raise FloatingPointError(
                    f"{k} was {float(value)} at step {step}: lower optim.lr, check the data, or use fp32/bf16 "
                    "(deepspeed.precision) if it is fp16"
                )

    def pop_metrics(self) -> dict[str, float]:
        """Under fp16, ``optim/skipped_steps`` (since the run began), ``optim/skipped_steps_since_log`` and
        ``optim/loss_scale`` (DeepSpeed's dynamic loss scale); {} otherwise. Resets the since-log count."""
        out = {}
        if self.fp16:
            out = {"optim/skipped_steps": float(self.skipped_total), "optim/skipped_steps_since_log": float(self.skipped_since_log)}
            if self.loss_scale is not None:
                out["optim/loss_scale"] = float(self.loss_scale)
        self.skipped_since_log = 0
        return out


def loss_scale(engine) -> float | None:
    """DeepSpeed's current fp16 loss scale, when there is one."""
    optimizer = getattr(engine, "optimizer", None)
    scale = getattr(optimizer, "cur_scale", None)
    return float(scale) if scale is not None else None
