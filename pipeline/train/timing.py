"""Where a training step's time goes (``time/*_s``) and what it achieves (``throughput/*``, ``perf/*``)."""

from __future__ import annotations

import time

import torch


class Phases:
    """Time per phase of a step (data wait, forward, backward, optimizer, eval, checkpoint), without a host sync.

    On CPU each :meth:`mark` reads the wall clock. On a GPU it records a CUDA event on the current stream instead
    (``torch.cuda.synchronize`` at every phase would stall the host and serialise it with the device); the events
    are read at :meth:`pop`, once per log step: a phase's time is then the device timeline between its events,
    which is wall time whenever the GPU has caught up with the host (it includes the GPU's idle wait for a slow
    host phase such as data or a checkpoint).
    """

    def __init__(self, device: torch.device):
        self._cuda = device.type == "cuda"
        self.seconds: dict[str, float] = {}
        self._events: list[tuple[str, object]] = []  # (phase, CUDA event recorded at the end of that phase)
        self._t = time.perf_counter()
        self._start = self._record() if self._cuda else None

    def _record(self):
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def mark(self, phase: str) -> None:
        """Charge the time since the last mark to ``phase``."""
        if self._cuda:
            self._events.append((phase, self._record()))
            return
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self._t
        self._t = now

    def _read_events(self) -> None:
        if not self._events:
            return
        self._events[-1][1].synchronize()  # the one wait, at a log step
        previous = self._start
        for phase, event in self._events:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + previous.elapsed_time(event) / 1000.0
            previous = event
        self._start, self._events = previous, []

    def pop(self, num_steps: int) -> dict[str, float]:
        """``time/<phase>_s``: each phase's seconds since the last pop divided by ``num_steps`` (the steps in
        that window; at least 1), so seconds per step; then starts over."""
        self._read_events()
        out = {f"time/{k}_s": v / max(num_steps, 1) for k, v in self.seconds.items()}
        self.seconds = {}
        return out


class Throughput:
    """Global tokens seen, and tokens/s, model TFLOP/s per worker and MFU between log steps.

    Tokens are real (non-pad) tokens summed on the device each step and read only at log steps (no host sync
    per step); every rank holds the same number of rows, so the global count is the local one × world size.
    ``flops_per_token`` comes from the task (pipeline/flops.py); ``peak_tflops`` None reports no MFU.
    """

    def __init__(self, *, tokens_seen: int, world_size: int, flops_per_token: float, peak_tflops: float | None):
        self.base, self.world_size = tokens_seen, world_size
        self.flops_per_token, self.peak_tflops = flops_per_token, peak_tflops
        self.local: torch.Tensor | int = 0
        self.restart(tokens_seen)

    def add(self, attention_masks: list[torch.Tensor]) -> None:
        """Count one step's micro-batches (their B×T attention masks)."""
        self.local = self.local + sum(m.sum() for m in attention_masks)

    def tokens_seen(self) -> int:
        """Global tokens since the run began (a resumed run continues its checkpoint's count)."""
        return self.base + int(self.local) * self.world_size

    def metrics(self, tokens_seen: int) -> dict[str, float]:
        """Rates since :meth:`restart` (eval and checkpoint time excluded by restarting after them)."""
        tokens_per_s = (tokens_seen - self.last_tokens) / (time.perf_counter() - self.t_last)
        tflops = tokens_per_s * self.flops_per_token / self.world_size / 1e12
        out = {"throughput/tokens_per_s": tokens_per_s, "perf/model_tflops_per_s_per_worker": tflops}
        if self.peak_tflops:
            out["perf/mfu"] = tflops / self.peak_tflops
        return out

    def restart(self, tokens_seen: int) -> None:
        """Start the next rate window now, at ``tokens_seen`` global tokens."""
        self.t_last, self.last_tokens = time.perf_counter(), tokens_seen
