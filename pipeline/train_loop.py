"""The Ray Train worker function: one loop for the teacher's MLM pre-training and for distillation.

Each worker rebuilds its RunConfig from the dict it is passed; nothing crosses the Ray boundary as a global.
Per optimizer step a worker draws ``grad_accum`` micro-batches, masks them (seeded by run seed, rank, step),
all-reduces the supervised-token counts so that every token weighs the same (see pipeline/losses.py), then
runs ``engine.backward(loss)`` on each and ``engine.step()``.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import dataclass

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from pipeline import checkpoint, engine as engine_lib, masking, models, step as step_lib, tracking
from pipeline.config import RunConfig


@dataclass
class WorkerSetup:
    cfg: RunConfig
    role: str  # "teacher" (MLM pre-training) | "student" (distillation)
    rank: int
    world_size: int
    device: torch.device
    special_ids: torch.Tensor
    mask_id: int
    vocab_size: int


def train_loop_per_worker(config: dict) -> None:
    t_start = time.perf_counter()
    cfg = RunConfig.from_dict(config["cfg"])
    role = config["role"]
    ctx = ray.train.get_context()
    device = ray.train.torch.get_device()
    cache = os.path.join(cfg.run.root, "cache")
    tokenizer = models.load_tokenizer(cfg.data.tokenizer, cache)
    setup = WorkerSetup(
        cfg=cfg, role=role, rank=ctx.get_world_rank(), world_size=ctx.get_world_size(), device=device,
        special_ids=torch.tensor(sorted(set(tokenizer.all_special_ids)), device=device),
        mask_id=tokenizer.mask_token_id, vocab_size=len(tokenizer),
    )
    optim = cfg.teacher_optim if role == "teacher" else cfg.optim
    model, teacher = _build_models(setup, config.get("teacher_uri"), tokenizer, cache)
    ds_config = engine_lib.build_ds_config(cfg.deepspeed, optim, world_size=setup.world_size, use_gpu=cfg.scaling.use_gpu)
    engine = engine_lib.initialize(model, ds_config, optim, use_gpu=cfg.scaling.use_gpu)

    state = checkpoint.TrainState(seed=cfg.run.seed)
    resumed = ray.train.get_checkpoint()
    if resumed:
        with resumed.as_directory() as d:
            state = checkpoint.load(engine, d)

    logger = tracking.make_logger(config.get("tracking_uri"), config.get("run_id"), is_rank0=setup.rank == 0)
    logger.log({"time/worker_setup_s": time.perf_counter() - t_start}, state.step)
    _run(setup, engine, teacher, state, optim, logger, tokenizer, config)


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


def _micro_batches(setup: WorkerSetup, state: checkpoint.TrainState, batch_size: int):
    """Endless micro-batches over epochs, starting at the saved data position."""
    shard = ray.train.get_dataset_shard("train")
    while True:
        n = 0
        for batch in shard.iter_torch_batches(batch_size=batch_size, drop_last=True, dtypes=torch.long, device=setup.device):
            if n >= state.batch_in_epoch:
                state.batch_in_epoch = n + 1
                yield batch
            n += 1
        if n == 0:
            raise RuntimeError("this worker's data shard holds no full micro-batch: lower optim.micro_batch_size or add data")
        state.epoch += 1
        state.batch_in_epoch = 0


def _mask(setup: WorkerSetup, raw: dict, generator: torch.Generator) -> step_lib.Batch:
    m = setup.cfg.masking
    ids_BT, labels_BT = masking.mask_tokens(
        raw["input_ids"], raw["attention_mask"], special_ids=setup.special_ids, mask_id=setup.mask_id,
        vocab_size=setup.vocab_size, generator=generator, mask_prob=m.mask_prob,
        mask_token_frac=m.mask_token_frac, random_token_frac=m.random_token_frac,
    )
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
    batches = _micro_batches(setup, state, optim.micro_batch_size)
    t0 = time.perf_counter()
    val_batches = _validation_batches(setup)
    logger.log({"time/val_load_s": time.perf_counter() - t0}, state.step)
    engine.train()
    phases = Phases(setup.device)
    t_last, step_last, sums = time.perf_counter(), state.step, {}
    base_tokens, tokens_local, tokens_last = state.tokens_seen, 0, state.tokens_seen
    every = cfg.tracking.log_every_steps
    while state.step < optim.max_steps:
        micro = []
        for i in range(optim.grad_accum):
            gen = masking.step_generator(cfg.run.seed, setup.rank, state.step * optim.grad_accum + i, setup.device)
            micro.append(_mask(setup, next(batches), gen))
        phases.mark("data")
        metrics = _train_step(setup, engine, teacher, micro, phases)
        state.step += 1
        tokens_local = tokens_local + sum(b.attention_mask_BT.sum() for b in micro)  # a tensor: no sync per step
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0) + v
        is_last = state.step == optim.max_steps
        do_ckpt = is_last or state.step % cfg.checkpoint.every_steps == 0
        # Every checkpoint carries held-out metrics: the registry and Tune's scheduler both rank by them.
        do_eval = do_ckpt or state.step % cfg.eval.every_steps == 0
        if state.step % every == 0 or do_eval:
            now = time.perf_counter()
            state.tokens_seen = base_tokens + int(tokens_local) * setup.world_size  # global (equal shards)
            train = _finite_means(sums, state.step - step_last, state.step)
            train.update(phases.pop(state.step - step_last))
            train["throughput/tokens_per_s"] = (state.tokens_seen - tokens_last) / (now - t_last)
            train["optim/lr"] = engine.get_lr()[0]
            logger.log(train, state.step)
            sums, step_last = {}, state.step
        if do_eval:
            report = {**train, "step": state.step, "tokens_seen": state.tokens_seen, "epoch": state.epoch}
            held_out = evaluate(setup, engine, teacher, val_batches)
            phases.mark("eval")
            report.update(held_out)
            logger.log(held_out, state.step)
            engine.train()
            _report(setup, engine, state, report, config, tokenizer, checkpoint_now=do_ckpt, final=is_last)
            phases.mark("checkpoint")
        if state.step % every == 0 or do_eval:
            t_last, tokens_last = time.perf_counter(), state.tokens_seen  # throughput excludes eval/checkpoint


def _finite_means(sums: dict[str, torch.Tensor], n_steps: int, step: int) -> dict[str, float]:
    out = {}
    for k, v in sums.items():
        value = float(v) / n_steps
        if not math.isfinite(value):
            raise FloatingPointError(f"{k} is {value} at step {step}: lower optim.lr or check the data and precision")
        out[k] = value
    return out


def _validation_batches(setup: WorkerSetup) -> list[step_lib.Batch]:
    """This rank's validation batches, read once and masked once with a fixed seed (the same in every run)."""
    cfg = setup.cfg
    out = []
    val = ray.train.get_dataset_shard("val")
    for i, raw in enumerate(val.iter_torch_batches(batch_size=cfg.optim.micro_batch_size, dtypes=torch.long, device=setup.device)):
        if i >= cfg.eval.max_batches * setup.world_size:
            break
        if i % setup.world_size == setup.rank:
            out.append(_mask(setup, raw, masking.step_generator(cfg.run.seed, 0, 10**9 + i, setup.device)))
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
    count = max(count, 1.0)
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
        checkpoint.save(engine, d, state, config=config["cfg"], git_sha=config.get("git_sha", "unknown"), is_rank0=is_rank0)
        if final and is_rank0:
            models.export_model(engine.module, tokenizer, os.path.join(d, checkpoint.HF_DIR))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
