"""The Ray Train worker function: one loop for the teacher's MLM pre-training and for distillation.

Each worker rebuilds its RunConfig from the dict it is passed; nothing crosses the Ray boundary as a global.
Per optimizer step a worker draws ``grad_accum`` micro-batches, masks them (seeded by run seed, rank, step),
all-reduces the supervised-token counts so that every token weighs the same (see pipeline/losses.py), then
runs ``engine.backward(loss)`` on each and ``engine.step()``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
import time
from dataclasses import dataclass

import pyarrow.fs
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from pipeline import batches as batches_lib, checkpoint, engine as engine_lib, flops, masking, models, progress as progress_lib, runtime, step as step_lib, storage, tracking
from pipeline.flops import measure_peak_tflops
from pipeline.config import RunConfig


@dataclass
class WorkerSetup:
    cfg: RunConfig
    role: str  # "teacher" (MLM pre-training) | "student" (distillation)
    rank: int
    world_size: int
    device: torch.device
    vocab_size: int
    masker: batches_lib.Masker  # the training masks (uniform, frequency-smoothed or whole-word)
    val_masker: batches_lib.Masker  # validation always uses uniform BERT masking, comparable across runs


def train_loop_per_worker(config: dict) -> None:
    t_start = time.perf_counter()
    runtime.quiet_worker_logs()  # DISTIL_VERBOSE, from the job's runtime_env: before DeepSpeed is imported
    cfg = RunConfig.from_dict(config["cfg"])
    role = config["role"]
    ctx = ray.train.get_context()
    device = ray.train.torch.get_device()
    cache = os.path.join(cfg.run.root, "cache")
    tokenizer = models.load_tokenizer(cfg.data.tokenizer, cache)
    setup = WorkerSetup(
        cfg=cfg, role=role, rank=ctx.get_world_rank(), world_size=ctx.get_world_size(), device=device,
        vocab_size=len(tokenizer),
        # HF's frequency smoothing is a distillation recipe: the teacher's own pre-training masks as BERT does.
        masker=batches_lib.Masker.build(cfg.masking if role == "student" else dataclasses.replace(cfg.masking, smoothing=0.0),
                                        tokenizer, token_counts=_token_counts(cfg, config), device=device),
        val_masker=batches_lib.Masker.build(dataclasses.replace(cfg.masking, smoothing=0.0, whole_word=False), tokenizer, device=device),
    )
    optim = cfg.teacher_optim if role == "teacher" else cfg.optim
    model, teacher = _build_models(setup, config.get("teacher_uri"), tokenizer, cache)
    ds_config = engine_lib.build_ds_config(cfg.deepspeed, optim, world_size=setup.world_size, use_gpu=cfg.scaling.use_gpu)
    engine = engine_lib.initialize(model, ds_config, optim, use_gpu=cfg.scaling.use_gpu)

    state, resume = _resume(setup, engine)
    config = {**config, **resume}

    logger = tracking.make_logger(config.get("tracking_uri"), config.get("run_id"), is_rank0=setup.rank == 0)
    logger.log({"time/worker_setup_s": time.perf_counter() - t_start}, state.step)
    system = None
    if ctx.get_local_rank() == 0:  # one monitor per node
        system = tracking.start_system_metrics(config.get("tracking_uri"), config.get("run_id"), f"node{ctx.get_node_rank()}")
    try:
        _run(setup, engine, teacher, state, optim, logger, tokenizer, config)
    finally:
        logger.close()
        if system is not None:
            system.finish()


def _token_counts(cfg: RunConfig, config: dict):
    """The training corpus's token counts (for frequency-smoothed masking), from the prepare stage's manifest."""
    if not cfg.masking.smoothing:
        return None
    manifest = storage.read_json(config["manifest_path"]) if config.get("manifest_path") else None
    return manifest.get("token_counts") if manifest else None


def _resume(setup: WorkerSetup, engine) -> tuple[checkpoint.TrainState, dict]:
    """Restore from the newest complete checkpoint Ray Train hands back; report the ones skipped."""
    state = checkpoint.TrainState(seed=setup.cfg.run.seed, world_size=setup.world_size)
    handed = ray.train.get_checkpoint()
    fs = storage.pyarrow_filesystem(setup.cfg.storage_path) or pyarrow.fs.LocalFileSystem()
    run_path = storage.fs_path(storage.join(setup.cfg.storage_path, ray.train.get_context().get_experiment_name()))
    loaded, path, skipped = checkpoint.restore(engine, run_path, handed.path if handed else None, fs,
                                               lambda p: ray.train.Checkpoint(p, filesystem=fs).as_directory())
    info = {"resumed": handed is not None, "resume/from_step": 0, "resume/ignored_checkpoints": len(skipped)}
    for line in skipped:
        print(f"[distil] rank {setup.rank}: ignoring checkpoint {line}", flush=True)
    if handed is None:
        return state, info
    if loaded is None:
        print(f"[distil] rank {setup.rank}: no complete checkpoint to resume from: starting at step 0", flush=True)
    else:
        state = loaded
        print(f"[distil] rank {setup.rank} resumed from {path} at step {state.step} "
              f"(epoch {state.epoch}, batch {state.batch_in_epoch})", flush=True)
    state.world_size = setup.world_size
    return state, {**info, "resume/from_step": state.step, "resume/ignored_checkpoints": len(skipped)}


def _build_models(setup: WorkerSetup, teacher_uri: str | None, tokenizer, cache: str):
    cfg = setup.cfg
    if setup.role == "teacher":
        model = models.build_teacher_for_pretraining(
            cfg.teacher, vocab_size=setup.vocab_size, pad_token_id=tokenizer.pad_token_id, seed=cfg.run.seed
        )
        return model, None
    teacher = models.load_teacher(teacher_uri, cache_root=cache, dtype=cfg.teacher.dtype).to(setup.device)
    if teacher.config.vocab_size < setup.vocab_size:
        raise ValueError(f"teacher vocab ({teacher.config.vocab_size}) is smaller than the tokenizer's ({setup.vocab_size})")
    student = models.build_student(cfg.student, teacher, seed=cfg.run.seed)
    return student, teacher


def _micro_batches(setup: WorkerSetup, state: checkpoint.TrainState, batch_size: int, *, replicated: bool):
    """Endless micro-batches over epochs, starting at the saved data position.

    ``replicated``: every rank iterates the whole (small, in-memory) dataset in the same seeded order and
    yields each *global* batch (the loop masks it, then takes this rank's slice), so the order is
    deterministic, every rank takes the same number of steps, a resumed run skips exactly the batches it has
    seen, and 1 or N workers see the same global batches and masks. Otherwise each rank yields micro-batches
    of its streaming_split shard (equal rows per rank) in batches of exactly ``batch_size`` rows
    (pipeline/batches.py), so every rank takes the same number of steps per epoch.
    """
    cfg = setup.cfg
    shard = ray.train.get_dataset_shard("train")
    per_iter = batch_size * setup.world_size if replicated else batch_size
    while True:
        n = 0
        for batch in batches_lib.epoch_batches(shard, per_iter, shuffle_rows=cfg.data.shuffle_buffer_rows,
                                               shuffle_seed=cfg.run.seed * 10_007 + state.epoch):
            if n >= state.batch_in_epoch:
                state.batch_in_epoch = n + 1
                yield batches_lib.to_torch(batch, setup.device)
            n += 1
        if n == 0:
            raise RuntimeError("the training data holds no full global batch: lower optim.micro_batch_size or add data")
        state.epoch += 1
        state.batch_in_epoch = 0


def _mask(masker: batches_lib.Masker, raw: dict, generator: torch.Generator) -> step_lib.Batch:
    ids_BT, labels_BT = masker(raw["input_ids"], raw["attention_mask"], generator)
    return step_lib.Batch(input_ids_BT=ids_BT, attention_mask_BT=raw["attention_mask"], labels_BT=labels_BT)


class Phases:
    """Wall time per phase of a step (data wait, forward, backward, optimizer, eval, checkpoint)."""

    def __init__(self, device: torch.device):
        self._sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.seconds: dict[str, float] = {}
        self._t = time.perf_counter()

    def mark(self, phase: str) -> None:
        """Charge the time since the last mark to ``phase``."""
        self._sync()
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self._t
        self._t = now

    def pop(self, num_steps: int) -> dict[str, float]:
        out = {f"time/{k}_s": v / max(num_steps, 1) for k, v in self.seconds.items()}
        self.seconds = {}
        return out


def _slice(batch: step_lib.Batch, setup: WorkerSetup, size: int) -> step_lib.Batch:
    mine = slice(setup.rank * size, (setup.rank + 1) * size)
    return step_lib.Batch(input_ids_BT=batch.input_ids_BT[mine], attention_mask_BT=batch.attention_mask_BT[mine], labels_BT=batch.labels_BT[mine])


def _train_step(setup, engine, teacher, micro: list[step_lib.Batch], phases: Phases) -> dict[str, torch.Tensor]:
    cfg = setup.cfg
    counts = sum(step_lib.count_supervised(b, cfg.loss.kd_positions) for b in micro)
    if setup.world_size > 1:
        dist.all_reduce(counts)
    # DeepSpeed divides by accumulation steps and averages over ranks: undo both (pipeline/losses.py).
    norm_ce, norm_mlm = (counts.clamp(min=1) / (setup.world_size * len(micro))).unbind()
    sums: dict[str, torch.Tensor] = {}
    for batch in micro:
        if setup.role == "teacher":
            loss, metrics = step_lib.mlm_step(engine, batch, norm_mlm=norm_mlm)
        else:
            loss, metrics = step_lib.distill_step(engine, teacher, batch, loss_cfg=cfg.loss, norm_ce=norm_ce, norm_mlm=norm_mlm)
        phases.mark("forward")
        engine.backward(loss)
        phases.mark("backward")
        engine.step()
        phases.mark("optimizer")
        for k, v in metrics.items():
            # loss_m = W·A·(this micro-batch's share of the global sum), so Σ_m loss_m / A estimates the global mean
            sums[k] = sums.get(k, 0) + v / len(micro)
    return sums


def _run(setup, engine, teacher, state, optim, logger, tokenizer, config) -> None:
    cfg = setup.cfg
    replicated = config.get("replicated_data", False)
    batches = _micro_batches(setup, state, optim.micro_batch_size, replicated=replicated)
    t0 = time.perf_counter()
    val_batches = _validation_batches(setup)
    logger.log({"time/val_load_s": time.perf_counter() - t0}, state.step)
    engine.train()
    flops_per_token = flops.step_flops_per_token(
        engine.module.config, teacher.config if teacher is not None else None,
        seq_len=cfg.data.max_seq_len, mask_prob=cfg.masking.mask_prob,
    )
    peak_tflops = _peak_tflops(setup)
    phases = Phases(setup.device)
    numerics = Numerics(fp16=engine_lib.resolve_precision(cfg.deepspeed, use_gpu=cfg.scaling.use_gpu) == "fp16",
                        skipped_steps=engine.skipped_steps, is_rank0=setup.rank == 0)
    logger.log({"resume/from_step": config["resume/from_step"], "resume/ignored_checkpoints": config["resume/ignored_checkpoints"]}, state.step)
    t_last, step_last, sums = time.perf_counter(), state.step, {}
    base_tokens, tokens_local, tokens_last = state.tokens_seen, 0, state.tokens_seen
    every = cfg.tracking.log_every_steps
    progress = progress_lib.make(role=setup.role, run_name=ray.train.get_context().get_experiment_name(), total=optim.max_steps,
                                 start_step=state.step, is_rank0=setup.rank == 0, mode=progress_lib.mode_from(os.environ))
    while state.step < optim.max_steps:
        # Dropout draws from torch's global RNG: seed it from (seed, rank, step) so a resumed run is exact.
        torch.manual_seed(int(masking.step_generator(cfg.run.seed, setup.rank + 1_000, state.step).initial_seed()))
        micro = []
        for i in range(optim.grad_accum):
            # Replicated data: one mask draw per global batch (rank-independent), then this rank's slice.
            seed_rank = 0 if replicated else setup.rank
            gen = masking.step_generator(cfg.run.seed, seed_rank, state.step * optim.grad_accum + i, setup.device)
            batch = _mask(setup.masker, next(batches), gen)
            micro.append(_slice(batch, setup, optim.micro_batch_size) if replicated else batch)
        if state.step == 0 and setup.rank == 0:
            # The data fingerprint: equal digests mean the same tokens and masks (compare runs, trials, previews).
            print(f"[distil] rank 0 first micro-batch digest {batches_lib.digest(micro[0].input_ids_BT, micro[0].labels_BT)}", flush=True)
        phases.mark("data")
        metrics = _train_step(setup, engine, teacher, micro, phases)
        state.step += 1
        if state.step == cfg.faults.fail_at_step and setup.rank == 0 and not config.get("resumed"):
            _inject_fault(cfg, state.step)
        tokens_local = tokens_local + sum(b.attention_mask_BT.sum() for b in micro)  # a tensor: no sync per step
        if numerics.after_step(state.step, metrics, engine.skipped_steps, _loss_scale(engine)):
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0) + v
        is_last = state.step == optim.max_steps
        do_ckpt = is_last or state.step % cfg.checkpoint.every_steps == 0
        # Every checkpoint carries held-out metrics: the registry and Tune's scheduler both rank by them.
        do_eval = do_ckpt or state.step % cfg.eval.every_steps == 0
        if state.step % every == 0 or do_eval:
            now = time.perf_counter()
            state.tokens_seen = base_tokens + int(tokens_local) * setup.world_size  # global (equal shards)
            numerics.check()
            train = {k: float(v) / max(state.step - step_last - numerics.skipped_since_log, 1) for k, v in sums.items()}
            train.update(numerics.pop_metrics())
            train.update(phases.pop(state.step - step_last))
            train["throughput/tokens_per_s"] = (state.tokens_seen - tokens_last) / (now - t_last)
            train["perf/model_tflops_per_s_per_worker"] = train["throughput/tokens_per_s"] * flops_per_token / setup.world_size / 1e12
            if peak_tflops:
                train["perf/mfu"] = train["perf/model_tflops_per_s_per_worker"] / peak_tflops
            train["optim/lr"] = engine.get_lr()[0]
            logger.log(train, state.step)
            sums, step_last = {}, state.step
        if do_eval:
            report = {**train, "step": state.step, "tokens_seen": state.tokens_seen, "epoch": state.epoch,
                      "resume/from_step": config["resume/from_step"],
                      "resume/ignored_checkpoints": config["resume/ignored_checkpoints"]}
            held_out = evaluate(setup, engine, teacher, val_batches)
            phases.mark("eval")
            report.update(held_out)
            logger.log(held_out, state.step)
            engine.train()
            _report(setup, engine, state, report, config, tokenizer, checkpoint_now=do_ckpt, final=is_last)
            phases.mark("checkpoint")
        if state.step % every == 0 or do_eval:
            progress.update(state.step, report if do_eval else train)
            t_last, tokens_last = time.perf_counter(), state.tokens_seen  # throughput excludes eval/checkpoint
    progress.close()


def _inject_fault(cfg: RunConfig, step: int) -> None:
    """Rehearse a worker failure: leave a note in the run folder (for people and tests), then die."""
    note = os.path.join(cfg.run_dir, "faults", f"fired-at-step-{step}-{int(time.time())}")
    os.makedirs(os.path.dirname(note), exist_ok=True)
    open(note, "w").close()
    raise RuntimeError(f"faults.fail_at_step={step}: injected failure after step {step}")


def _peak_tflops(setup: WorkerSetup) -> float | None:
    """The configured peak, or a measured bf16 matmul peak on GPU; None on CPU (no MFU reported)."""
    if setup.cfg.scaling.peak_tflops_per_worker > 0:
        return setup.cfg.scaling.peak_tflops_per_worker
    if setup.device.type != "cuda":
        return None
    return measure_peak_tflops(setup.device)


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
        for k, (first_step, value) in self._first.items():
            step = int(first_step)
            if step >= 0:
                raise FloatingPointError(
                    f"{k} was {float(value)} at step {step}: lower optim.lr, check the data, or use fp32/bf16 "
                    "(deepspeed.precision) if it is fp16"
                )

    def pop_metrics(self) -> dict[str, float]:
        out = {}
        if self.fp16:
            out = {"optim/skipped_steps": float(self.skipped_total), "optim/skipped_steps_since_log": float(self.skipped_since_log)}
            if self.loss_scale is not None:
                out["optim/loss_scale"] = float(self.loss_scale)
        self.skipped_since_log = 0
        return out


def _loss_scale(engine) -> float | None:
    """DeepSpeed's current fp16 loss scale, when there is one."""
    optimizer = getattr(engine, "optimizer", None)
    scale = getattr(optimizer, "cur_scale", None)
    return float(scale) if scale is not None else None


def _validation_batches(setup: WorkerSetup) -> list[step_lib.Batch]:
    """This rank's validation batches, read once and masked once with a fixed seed (the same in every run)."""
    cfg = setup.cfg
    out = []
    val = ray.train.get_dataset_shard("val")
    for i, raw in enumerate(val.iter_torch_batches(batch_size=cfg.optim.micro_batch_size, dtypes=torch.long, device=setup.device)):
        if i >= cfg.eval.max_batches * setup.world_size:
            break
        if i % setup.world_size == setup.rank:
            out.append(_mask(setup.val_masker, raw, masking.step_generator(cfg.run.seed, 0, 10**9 + i, setup.device)))
    return out


def evaluate(setup: WorkerSetup, engine, teacher, batches: list[step_lib.Batch]) -> dict[str, float]:
    """Held-out masked-LM metrics, summed over every rank's validation batches."""
    engine.eval()
    sums = torch.zeros(4, device=setup.device)
    for batch in batches:
        sums += step_lib.eval_sums(engine, teacher, batch).to(setup.device)
    if setup.world_size > 1:
        dist.all_reduce(sums)
    ce, correct, count, agree = sums.tolist()
    if count == 0:  # no held-out masked token: no value, never a perfect-looking 0.0 loss
        return {}
    out = {"val/mlm_loss": ce / count, "val/mlm_acc": correct / count, "val/perplexity": math.exp(min(ce / count, 50.0))}
    if teacher is not None:
        out["val/teacher_agreement"] = agree / count
    return out


def _report(setup, engine, state, metrics, config, tokenizer, *, checkpoint_now: bool, final: bool) -> None:
    if not checkpoint_now:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        is_rank0 = setup.rank == 0
        if final:  # before save: the rank's file list (written last) covers the exported model too
            with engine_lib.gathered_module(engine):  # every rank enters: collective under ZeRO-3
                if is_rank0:
                    models.export_model(engine.module, tokenizer, os.path.join(d, checkpoint.HF_DIR))
        checkpoint.save(engine, d, state, config=config["cfg"], git_sha=config.get("git_sha", "unknown"), rank=setup.rank,
                        metrics=metrics)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
