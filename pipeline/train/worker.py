"""The Ray Train worker function: one loop for every task (pipeline/train/tasks/).

Each worker rebuilds its RunConfig from the :class:`~pipeline.records.WorkerConfig` it is passed; nothing
crosses the Ray boundary as a global. Per optimizer step a worker draws ``grad_accum`` micro-batches, lets the
task prepare them (masks seeded by run seed and step, and by rank where each rank holds its own stream), all-reduces the task's supervised counts so that
every unit weighs the same (pipeline/losses.py), then runs ``engine.backward(loss)`` on each and
``engine.step()``. The loop owns the engine, the data position and RNG, checkpoints and resume, the numerics
guard, timing, the progress line and reporting; the task owns the models and the math.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
import time
from dataclasses import dataclass

import pyarrow.fs
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from pipeline import assets, batches as batches_lib, checkpoint, engine as engine_lib, masking, progress as progress_lib, runtime, storage, tracking
from pipeline.config import RunConfig
from pipeline.flops import measure_peak_tflops
from pipeline.records import WorkerConfig
from pipeline.step import Batch
from pipeline.train import tasks as tasks_lib
from pipeline.train.numerics import Numerics, loss_scale
from pipeline.train.timing import Phases, Throughput


@dataclass(frozen=True)
class Resume:
    """How this attempt started: from a checkpoint (``from_step``) or not, and how many checkpoints it skipped."""

    resumed: bool = False
    from_step: int = 0
    ignored_checkpoints: int = 0

    def metrics(self) -> dict[str, float]:
        """``resume/from_step`` (0 for a fresh start) and ``resume/ignored_checkpoints`` (checkpoints skipped as
        damaged or never registered)."""
        return {"resume/from_step": self.from_step, "resume/ignored_checkpoints": self.ignored_checkpoints}


def train_loop_per_worker(config: dict) -> None:
    """Ray Train's ``train_loop_per_worker``: ``config`` is a :class:`WorkerConfig` as a dict."""
    t_start = time.perf_counter()
    runtime.quiet_worker_logs()  # DISTIL_VERBOSE, from the job's runtime_env: before DeepSpeed is imported
    runtime.worker_tracking_settings()
    work = WorkerConfig.from_dict(config, where="train_loop_config")
    ctx = _context(work)
    task = tasks_lib.build(work.task, ctx)
    cfg = ctx.cfg
    ds_config = engine_lib.build_ds_config(cfg.deepspeed, task.optim, world_size=ctx.world_size, use_gpu=cfg.scaling.use_gpu)
    engine = engine_lib.initialize(task.build(), ds_config, task.optim, use_gpu=cfg.scaling.use_gpu,
                                   strategy=cfg.scaling.strategy)
    state, resume = _resume(ctx, engine)
    with _observed(ctx) as logger:
        logger.log({"time/worker_setup_s": time.perf_counter() - t_start}, state.step)
        Loop(ctx, task, engine, state, resume, logger).run()


def _context(work: WorkerConfig) -> tasks_lib.WorkerContext:
    cfg = RunConfig.from_dict(work.cfg)
    train_ctx = ray.train.get_context()
    return tasks_lib.WorkerContext(cfg=cfg, work=work, rank=train_ctx.get_world_rank(), world_size=train_ctx.get_world_size(),
                                   device=ray.train.torch.get_device(), tokenizer=assets.load_tokenizer(cfg.data.tokenizer, cfg.cache_dir))


@contextlib.contextmanager
def _observed(ctx: tasks_lib.WorkerContext):
    """Rank 0's metric logger, and MLflow's system metrics once per node, closed however the loop ends."""
    work, train_ctx = ctx.work, ray.train.get_context()
    logger = tracking.make_logger(work.tracking_uri, work.run_id, is_rank0=ctx.is_rank0)
    system = None
    if train_ctx.get_local_rank() == 0:
        system = tracking.start_system_metrics(work.tracking_uri, work.run_id, f"node{train_ctx.get_node_rank()}")
    try:
        yield logger
    finally:
        logger.close()
        if system is not None:
            system.finish()


def _resume(ctx: tasks_lib.WorkerContext, engine) -> tuple[checkpoint.TrainState, Resume]:
    """Restore from the newest complete checkpoint Ray Train hands back; report the ones skipped."""
    state = checkpoint.TrainState(seed=ctx.cfg.run.seed, world_size=ctx.world_size)
    handed = ray.train.get_checkpoint()
    fs = storage.pyarrow_filesystem(ctx.cfg.storage_path) or pyarrow.fs.LocalFileSystem()
    run_path = storage.fs_path(storage.join(ctx.cfg.storage_path, ray.train.get_context().get_experiment_name()))
    loaded, path, skipped = checkpoint.restore(engine, run_path, handed.path if handed else None, fs,
                                               lambda p: ray.train.Checkpoint(p, filesystem=fs).as_directory())
    for line in skipped:
        print(f"[distil] rank {ctx.rank}: ignoring checkpoint {line}", flush=True)
    if handed is None:
        return state, Resume(ignored_checkpoints=len(skipped))
    if loaded is None:
        print(f"[distil] rank {ctx.rank}: no complete checkpoint to resume from: starting at step 0", flush=True)
    else:
        state = loaded
        print(f"[distil] rank {ctx.rank} resumed from {path} at step {state.step} "
              f"(epoch {state.epoch}, batch {state.batch_in_epoch})", flush=True)
    state.world_size = ctx.world_size
    return state, Resume(resumed=True, from_step=state.step, ignored_checkpoints=len(skipped))


class Loop:
    """The training loop of one worker: steps, logging, held-out validation and checkpoints until ``optim.max_steps``."""

    def __init__(self, ctx: tasks_lib.WorkerContext, task: tasks_lib.Task, engine, state: checkpoint.TrainState,
                 resume: Resume, logger):
        self.ctx, self.task, self.engine, self.state, self.resume, self.logger = ctx, task, engine, state, resume, logger
        self.cfg, self.optim, self.replicated = ctx.cfg, task.optim, ctx.work.replicated_data
        self.phases = Phases(ctx.device)
        fp16 = engine_lib.resolve_precision(self.cfg.deepspeed, use_gpu=self.cfg.scaling.use_gpu) == "fp16"
        self.numerics = Numerics(fp16=fp16, skipped_steps=engine.skipped_steps, is_rank0=ctx.is_rank0)
        self.sums: dict[str, torch.Tensor] = {}
        self.step_last = state.step
        self.warnings_seen: set = set()  # preemption warnings already answered with a checkpoint

    def run(self) -> None:
        """Train to ``optim.max_steps``: log every ``tracking.log_every_steps``, validate and report every
        ``eval.every_steps``, and checkpoint (with held-out metrics) every ``checkpoint.every_steps`` and at the end."""
        batches, val_batches = self._micro_batches(), self._validation_batches()
        self.engine.train()
        meter = Throughput(tokens_seen=self.state.tokens_seen, world_size=self.ctx.world_size,
                           flops_per_token=self.task.flops_per_token(self.engine.module), peak_tflops=self._peak_tflops())
        self.logger.log(self.resume.metrics(), self.state.step)
        progress = self._progress()
        every, train = self.cfg.tracking.log_every_steps, {}
        while self.state.step < self.optim.max_steps:
            micro = self._draw(batches)
            self._train_step(micro)
            meter.add([b.attention_mask_BT for b in micro])
            step, is_last = self.state.step, self.state.step == self.optim.max_steps
            do_ckpt = is_last or step % self.cfg.checkpoint.every_steps == 0
            do_eval = do_ckpt or step % self.cfg.eval.every_steps == 0  # every checkpoint carries held-out metrics
            if step % every == 0 or do_eval:
                self.state.tokens_seen = meter.tokens_seen()
                train = {**self._train_metrics(), **meter.metrics(self.state.tokens_seen)}
                self.logger.log(train, step)
            if do_eval:
                train = self._validate_and_report(val_batches, train, checkpoint_now=do_ckpt, final=is_last)
            if self._preemption_warned(checkpointed=do_ckpt):  # a spot node goes soon: lose no step
                train = self._validate_and_report(val_batches, train, checkpoint_now=True, final=False)
            if step % every == 0 or do_eval:
                progress.update(step, train)
                meter.restart(self.state.tokens_seen)  # throughput excludes eval and checkpoint time
        progress.close()

    # ---- one step ---------------------------------------------------------------------------------------
    def _draw(self, batches) -> list[Batch]:
        """This step's ``grad_accum`` micro-batches, prepared by the task with masks seeded by (seed, rank, step)."""
        cfg, state = self.cfg, self.state
        # Dropout draws from torch's global RNG: seed it from (seed, rank, step) so a resumed run is exact.
        torch.manual_seed(int(masking.step_generator(cfg.run.seed, self.ctx.rank + 1_000, state.step).initial_seed()))
        micro = []
        for i in range(self.optim.grad_accum):
            # Replicated data: one mask draw per global batch (rank-independent), then this rank's slice.
            seed_rank = 0 if self.replicated else self.ctx.rank
            gen = masking.step_generator(cfg.run.seed, seed_rank, state.step * self.optim.grad_accum + i, self.ctx.device)
            batch = self.task.train_batch(next(batches), gen)
            micro.append(_rank_slice(batch, self.ctx.rank, self.optim.micro_batch_size) if self.replicated else batch)
        if state.step == 0 and self.ctx.is_rank0:
            # The data fingerprint: equal digests mean the same tokens and masks (compare runs, trials, previews).
            print(f"[distil] rank 0 first micro-batch digest {self.task.digest(micro[0])}", flush=True)
        self.phases.mark("data")
        return micro

    def _train_step(self, micro: list[Batch]) -> None:
        counts_K = sum(self.task.count(b) for b in micro)
        if self.ctx.world_size > 1:
            dist.all_reduce(counts_K)
        # DeepSpeed divides by accumulation steps and averages over ranks: undo both (pipeline/losses.py).
        norms_K = counts_K.clamp(min=1) / (self.ctx.world_size * len(micro))
        metrics: dict[str, torch.Tensor] = {}
        for batch in micro:
            loss, terms = self.task.loss(self.engine, batch, norms_K)
            self.phases.mark("forward")
            self.engine.backward(loss)
            self.phases.mark("backward")
            self.engine.step()
            self.phases.mark("optimizer")
            for k, v in terms.items():
                # loss_m = W·A·(this micro-batch's share of the global sum), so Σ_m loss_m / A estimates the global mean
                metrics[k] = metrics.get(k, 0) + v / len(micro)
        self.state.step += 1
        if self.state.step == self.cfg.faults.fail_at_step and self.ctx.is_rank0 and not self.resume.resumed:
            _inject_fault(self.cfg, self.state.step)
        if self.numerics.after_step(self.state.step, metrics, self.engine.skipped_steps, loss_scale(self.engine)):
            for k, v in metrics.items():
                self.sums[k] = self.sums.get(k, 0) + v

    def _train_metrics(self) -> dict[str, float]:
        """Means of the loss terms over the applied steps since the last log, numerics, timing and the LR."""
        self.numerics.check()
        applied = max(self.state.step - self.step_last - self.numerics.skipped_since_log, 1)
        out = {k: float(v) / applied for k, v in self.sums.items()}
        out.update(self.numerics.pop_metrics())
        out.update(self.phases.pop(self.state.step - self.step_last))
        out["optim/lr"] = self.engine.get_lr()[0]
        self.sums, self.step_last = {}, self.state.step
        return out

    # ---- validation, reports and checkpoints --------------------------------------------------------------
    def _preemption_warned(self, *, checkpointed: bool) -> bool:
        """True once per spot-preemption warning not already answered by this step's checkpoint.

        Every ``checkpoint.preemption_check_steps`` steps, every rank asks Ray Train whether a node of the worker
        group is being drained for preemption (``ray.train.get_preemption_info``, a barrier: each rank calls it at
        the same steps). Ray Train then restarts the group from the newest checkpoint once the node goes (or its
        deadline passes), counted against ``scaling.max_preemptions``, not ``max_failures``."""
        every = self.cfg.checkpoint.preemption_check_steps
        if not every or self.state.step % every or self.state.step == self.optim.max_steps:
            return False
        info = ray.train.get_preemption_info()
        if info is None:
            return False
        key = (info.deadline_ms, tuple(info.preempted_node_ids))
        if key in self.warnings_seen:
            return False
        self.warnings_seen.add(key)
        if self.ctx.is_rank0:
            left = "" if info.deadline_ms is None else f", {info.deadline_ms / 1000 - time.time():.0f} s before it goes"
            print(f"[distil] preemption warning: node {', '.join(n[:12] for n in info.preempted_node_ids)} (ranks "
                  f"{info.preempted_ranks}) is being reclaimed{left}; checkpoint at step {self.state.step}", flush=True)
        return not checkpointed

    def _validate_and_report(self, val_batches: list[Batch], train: dict, *, checkpoint_now: bool, final: bool) -> dict:
        held_out = self.validate(val_batches)
        self.phases.mark("eval")
        self.logger.log(held_out, self.state.step)
        self.engine.train()
        report = {**train, "step": self.state.step, "tokens_seen": self.state.tokens_seen, "epoch": self.state.epoch,
                  **self.resume.metrics(), **held_out}
        self._report(report, checkpoint_now=checkpoint_now, final=final)
        self.phases.mark("checkpoint")
        return report

    def validate(self, batches: list[Batch]) -> dict[str, float]:
        """The task's held-out metrics, its sums added over every rank's validation batches."""
        self.engine.eval()
        sums = torch.zeros(self.task.num_eval_sums, device=self.ctx.device)  # a rank may hold no batch: still reduce
        for batch in batches:
            sums += self.task.eval_sums(self.engine, batch)
        if self.ctx.world_size > 1:
            dist.all_reduce(sums)
        return self.task.eval_metrics(sums.tolist())

    def _report(self, metrics: dict, *, checkpoint_now: bool, final: bool) -> None:
        if not checkpoint_now:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as d:
            if final:  # before save: the rank's file list (written last) covers the exported model too
                with engine_lib.gathered_module(self.engine):  # every rank enters: collective under ZeRO-3
                    if self.ctx.is_rank0:
                        self.task.export(self.engine.module, os.path.join(d, checkpoint.HF_DIR))
            checkpoint.save(self.engine, d, self.state, config=self.ctx.work.cfg, git_sha=self.ctx.work.git_sha,
                            rank=self.ctx.rank, metrics=metrics)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))

    # ---- data --------------------------------------------------------------------------------------------
    def _micro_batches(self):
        """Endless micro-batches over epochs, starting at the saved data position.

        ``replicated``: every rank iterates the whole (small, in-memory) dataset in the same seeded order and
        yields each *global* batch (the loop prepares it, then takes this rank's slice), so the order is
        deterministic, every rank takes the same number of steps, a resumed run skips exactly the batches it has
        seen, and 1 or N workers see the same global batches and masks. Otherwise each rank yields micro-batches
        of its streaming_split shard (equal rows per rank) in batches of exactly ``micro_batch_size`` rows
        (pipeline/batches.py), so every rank takes the same number of steps per epoch.
        """
        state, shard = self.state, ray.train.get_dataset_shard("train")
        per_iter = self.optim.micro_batch_size * (self.ctx.world_size if self.replicated else 1)
        while True:
            n = 0
            for batch in batches_lib.epoch_batches(shard, per_iter, shuffle_rows=self.cfg.data.shuffle_buffer_rows,
                                                   shuffle_seed=self.cfg.run.seed * 10_007 + state.epoch):
                if n >= state.batch_in_epoch:
                    state.batch_in_epoch = n + 1
                    yield batches_lib.to_torch(batch, self.ctx.device, self.task.columns)
                n += 1
            if n == 0:
                raise RuntimeError("the training data holds no full global batch: lower optim.micro_batch_size or add data")
            state.epoch += 1
            state.batch_in_epoch = 0

    def _validation_batches(self) -> list[Batch]:
        """This rank's validation batches, read once and prepared once with a fixed seed (the same in every run)."""
        t0, out, world = time.perf_counter(), [], self.ctx.world_size
        val = ray.train.get_dataset_shard("val")
        raws = val.iter_torch_batches(batch_size=self.cfg.optim.micro_batch_size, dtypes=self.task.columns, device=self.ctx.device)
        for i, raw in enumerate(raws):
            if i >= self.cfg.eval.max_batches * world:
                break
            if i % world == self.ctx.rank:
                out.append(self.task.val_batch(raw, i))
        self.logger.log({"time/val_load_s": time.perf_counter() - t0}, self.state.step)
        return out

    def _progress(self):
        return progress_lib.make(role=self.task.role, run_name=ray.train.get_context().get_experiment_name(),
                                 total=self.optim.max_steps, start_step=self.state.step, is_rank0=self.ctx.is_rank0,
                                 mode=progress_lib.mode_from(os.environ))

    def _peak_tflops(self) -> float | None:
        """The configured peak, or a measured bf16 matmul peak on GPU; None on CPU (no MFU reported)."""
        if self.cfg.scaling.peak_tflops_per_worker > 0:
            return self.cfg.scaling.peak_tflops_per_worker
        return measure_peak_tflops(self.ctx.device) if self.ctx.device.type == "cuda" else None


def _rank_slice(batch, rank: int, size: int):
    """This rank's rows of a global batch (any task's batch dataclass: every field has the batch dimension first)."""
    mine = slice(rank * size, (rank + 1) * size)
    return dataclasses.replace(batch, **{f.name: getattr(batch, f.name)[mine] for f in dataclasses.fields(batch)
                                         if isinstance(getattr(batch, f.name), torch.Tensor)})


def _inject_fault(cfg: RunConfig, step: int) -> None:
    """Rehearse a worker failure: leave a note in the run folder (for people and tests), then die."""
    note = os.path.join(cfg.run_dir, "faults", f"fired-at-step-{step}-{int(time.time())}")
    os.makedirs(os.path.dirname(note), exist_ok=True)
    open(note, "w").close()
    raise RuntimeError(f"faults.fail_at_step={step}: injected failure after step {step}")
