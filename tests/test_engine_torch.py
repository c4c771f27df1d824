"""The plain-PyTorch engine (``scaling.strategy: ddp``) keeps DeepSpeed's contract, without Ray: the LR schedule
step by step, accumulation, exact resume through checkpoint.py, bf16 autocast, the config checks, and on 2 gloo
ranks DDP ≡ one big batch ≡ DeepSpeed ZeRO-2 (tests/test_engine.py runs it under Ray Train); and
``deepspeed.offload_optimizer`` training the same weights as ZeRO without it."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline import checkpoint, engine as engine_lib
from pipeline.config import DeepSpeedSection, OptimSection, RunConfig
from pipeline.config.checks import problems

OPTIM = OptimSection(max_steps=6, micro_batch_size=4, grad_accum=2, lr=1e-2, warmup_steps=2, grad_clip=0.5)
NUM_ROWS, DIM = 16, 6  # the global batch of one optimizer step, and the toy model's width


class Toy(torch.nn.Module):
    """Weights, biases and a LayerNorm: both parameter groups (decay and none)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin1, self.norm, self.lin2 = torch.nn.Linear(DIM, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 1)

    def forward(self, x_BD):
        return self.lin2(torch.tanh(self.norm(self.lin1(x_BD)))).squeeze(-1)


def _data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(NUM_ROWS, DIM, generator=g), torch.randn(NUM_ROWS, generator=g)


def _engine(optim=OPTIM, strategy="ddp", precision="fp32", world_size=1):
    ds = engine_lib.build_ds_config(DeepSpeedSection(zero_stage=0 if strategy == "ddp" else 2, precision=precision),
                                    optim, world_size=world_size, use_gpu=False)
    return engine_lib.initialize(Toy(), ds, optim, use_gpu=False, strategy=strategy)


def _train(engine, steps, *, first=0, rank=0, world_size=1, through_module=False) -> list[float]:
    """``steps`` optimizer steps on this rank's rows of each global batch, split into ``grad_accum`` micro-batches;
    the loss is a sum divided by N_global / (W·A), as the loop does. Returns the LR after each step."""
    accum, lrs = engine.grad_accum if hasattr(engine, "grad_accum") else engine.gradient_accumulation_steps(), []
    for step in range(first, first + steps):
        x, y = _data(step)
        mine = slice(rank * NUM_ROWS // world_size, (rank + 1) * NUM_ROWS // world_size)
        for x_BD, y_B in zip(x[mine].chunk(accum), y[mine].chunk(accum)):
            pred_B = (engine.module if through_module else engine)(x_BD)
            engine.backward((pred_B.float() - y_B).square().sum() / (NUM_ROWS / (world_size * accum)))
            engine.step()
        lrs.append(engine.get_lr()[0])
    return lrs


def _params(engine) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}


@pytest.mark.parametrize("warmup,total", [(0, 8), (1, 8), (2, 8), (3, 10), (7, 8), (12, 8), (0, 1)])
def test_the_schedule_is_deepspeeds_warmup_decay_lr_step_by_step(warmup, total):
    from deepspeed.runtime.lr_schedules import WarmupDecayLR

    optim = OptimSection(max_steps=total, warmup_steps=warmup, lr=3e-4)
    params = engine_lib.build_ds_config(DeepSpeedSection(), optim, world_size=1, use_gpu=False)["scheduler"]["params"]
    ours_opt, theirs_opt = (torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=optim.lr) for _ in range(2))
    ours = torch.optim.lr_scheduler.LambdaLR(ours_opt, engine_lib.WarmupDecay(params["warmup_num_steps"], total))
    theirs = WarmupDecayLR(theirs_opt, **params)
    for _ in range(total + 3):
        assert ours_opt.param_groups[0]["lr"] == theirs_opt.param_groups[0]["lr"]
        for opt, sched in ((ours_opt, ours), (theirs_opt, theirs)):
            opt.step()  # no gradient: nothing moves, but the order torch expects holds
            sched.step()


def test_accumulating_micro_batches_equals_one_big_batch():
    accumulated, big = _engine(), _engine(OptimSection(**{**vars(OPTIM), "grad_accum": 1, "micro_batch_size": 8}))
    assert accumulated.grad_accum == 2 and big.grad_accum == 1
    assert _train(accumulated, 4) == _train(big, 4)
    for k, v in _params(accumulated).items():
        torch.testing.assert_close(v, _params(big)[k], atol=1e-6, rtol=0)


def test_the_optimizer_steps_only_at_the_accumulation_boundary():
    engine = _engine()
    before = _params(engine)
    x, y = _data(0)
    engine.backward((engine(x[:4]) - y[:4]).square().sum())
    engine.step()
    assert all(torch.equal(v, _params(engine)[k]) for k, v in before.items())
    assert engine.global_steps == 0 and engine.micro_steps == 1
    engine.backward((engine(x[4:8]) - y[4:8]).square().sum())
    engine.step()
    assert engine.global_steps == 1 and engine.micro_steps == 2
    assert int(engine.optimizer.state_dict()["state"][0]["step"]) == 1  # at LR 0: DeepSpeed's first step


def test_resume_is_exact(tmp_path):
    """6 steps straight against 2 steps, checkpoint.save, a fresh engine, checkpoint.load, 4 steps."""
    straight = _engine()
    lrs_straight = _train(straight, 6)
    first = _engine()
    _train(first, 2)
    state = checkpoint.TrainState(step=2, world_size=2)
    for rank in (1, 0):  # as 2 ranks of a group: the state is replicated, rank 0 alone writes it
        first.rank = rank
        checkpoint.save(first, str(tmp_path), state, config={}, git_sha="abc", rank=rank)
    assert checkpoint._parse_rank_list("r", (tmp_path / "ranks" / "1.json").read_text()) == {}
    resumed = _engine()
    assert checkpoint.load(resumed, str(tmp_path)) == state
    assert (resumed.global_steps, resumed.micro_steps) == (2, 4)
    assert _train(resumed, 4, first=2) == lrs_straight[2:]
    for k, v in _params(straight).items():
        assert torch.equal(v, _params(resumed)[k]), k
    moments = [e.optimizer.state_dict()["state"][0]["exp_avg"] for e in (straight, resumed)]
    assert torch.equal(*moments)


def test_a_ddp_engine_refuses_a_deepspeed_checkpoint_with_a_clear_error(tmp_path):
    (tmp_path / "engine" / "state").mkdir(parents=True)
    (tmp_path / "engine" / "state" / "mp_rank_00_model_states.pt").write_bytes(b"x")
    checkpoint._write(str(tmp_path / "ranks" / "0.json"), {})
    checkpoint._write(str(tmp_path / checkpoint.STATE_FILE), vars(checkpoint.TrainState()))
    with pytest.raises(RuntimeError, match="the other scaling.strategy"):
        checkpoint.load(_engine(), str(tmp_path))


def test_bf16_is_autocast_around_fp32_master_weights():
    engine = _engine(precision="bf16")
    assert engine.autocast_dtype == torch.bfloat16
    assert engine(torch.randn(2, DIM)).dtype == torch.bfloat16
    _train(engine, 2)
    assert all(p.dtype == torch.float32 for p in engine.module.parameters())
    assert engine.optimizer.state_dict()["state"][0]["exp_avg"].dtype == torch.float32


def test_the_interface_the_loop_and_checkpoints_use():
    engine = _engine()
    assert engine.zero_optimization_stage() == 0 and engine.skipped_steps == 0
    assert engine.get_lr() == [0.0, 0.0]  # DeepSpeed's first step runs at warmup_min_lr
    engine.eval()
    assert not engine.module.training
    engine.train()
    assert engine.module.training
    with engine_lib.gathered_module(engine):
        pass
    from pipeline.train.numerics import loss_scale

    assert loss_scale(engine) is None


def _cfg(**scaling_and_ds) -> RunConfig:
    return RunConfig().with_overrides(scaling_and_ds)


def test_config_checks_for_the_ddp_strategy():
    assert not problems(_cfg(**{"scaling.strategy": "ddp", "deepspeed.zero_stage": 0}))
    assert not problems(_cfg(**{"scaling.strategy": "ddp", "deepspeed.zero_stage": 0, "deepspeed.precision": "bf16"}))
    assert problems(_cfg(**{"scaling.strategy": "ddp"})) == [
        "deepspeed.zero_stage=2 with scaling.strategy=ddp, which shards nothing: set deepspeed.zero_stage=0 and "
        "deepspeed.offload_optimizer=false, or use scaling.strategy=deepspeed for ZeRO"]
    (p,) = problems(_cfg(**{"scaling.strategy": "ddp", "deepspeed.zero_stage": 0, "deepspeed.offload_optimizer": True}))
    assert p.startswith("deepspeed.offload_optimizer=true with scaling.strategy=ddp")
    (p,) = problems(_cfg(**{"scaling.strategy": "ddp", "deepspeed.zero_stage": 3, "deepspeed.offload_optimizer": True}))
    assert p.startswith("deepspeed.zero_stage=3 and deepspeed.offload_optimizer=true with scaling.strategy=ddp")
    fp16 = problems(_cfg(**{"scaling.strategy": "ddp", "deepspeed.zero_stage": 0, "deepspeed.precision": "fp16",
                            "scaling.use_gpu": True}))
    assert fp16 == ["deepspeed.precision=fp16 with scaling.strategy=ddp: ddp has no loss scaler; use bf16 (fp32's "
                    "range, no scaler needed) or scaling.strategy=deepspeed"]
    assert problems(_cfg(**{"scaling.strategy": "fsdp"})) == [
        "scaling.strategy='fsdp': use one of ['ddp', 'deepspeed']"]
    with pytest.raises(ValueError, match="fp16 with scaling.strategy=ddp"):
        _engine(precision="fp16")


def _two_ranks(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    """One rank of the 2-rank comparison: ZeRO-2, DDP through engine(...), and the all-reduce fallback through
    engine.module, each 3 steps of 2 micro-batches; rank 0 saves the weights and LRs."""
    os.environ["LOCAL_RANK"] = str(rank)  # DeepSpeed reads it; Ray Train sets it in the real workers
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    out = {}
    for name, strategy, through_module in (("zero2", "deepspeed", False), ("ddp", "ddp", False),
                                           ("ddp_module", "ddp", True)):
        engine = _engine(strategy=strategy, world_size=world_size)
        lrs = _train(engine, 3, rank=rank, world_size=world_size, through_module=through_module)
        out[name] = (_params(engine), lrs)
    if rank == 0:
        torch.save(out, os.path.join(out_dir, "two_ranks.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_under_ddp_match_one_big_batch_and_zero2(tmp_path):
    mp.spawn(_two_ranks, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    out = torch.load(tmp_path / "two_ranks.pt", weights_only=True)
    one = _engine(OptimSection(**{**vars(OPTIM), "grad_accum": 1, "micro_batch_size": 16}))
    lrs_one, params_one = _train(one, 3), _params(one)
    for name, atol in (("ddp", 1e-6), ("ddp_module", 1e-6), ("zero2", 1e-5)):
        params, lrs = out[name]
        assert lrs == lrs_one, name
        for k, v in params.items():
            torch.testing.assert_close(v, params_one[k], atol=atol, rtol=0, msg=f"{name} {k}")


def _offloaded(rank: int, init_file: str, out_dir: str) -> None:
    """One rank: 3 steps of ZeRO-2, then with the optimizer state offloaded to CPU memory."""
    os.environ["LOCAL_RANK"] = "0"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=0, world_size=1)
    import deepspeed

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # as engine.initialize does on CPU
    out = {}
    for stage, offload in ((2, False), (2, True)):
        ds = engine_lib.build_ds_config(DeepSpeedSection(zero_stage=stage, offload_optimizer=offload), OPTIM,
                                        world_size=1, use_gpu=False)
        engine = engine_lib.initialize(Toy(), ds, OPTIM, use_gpu=False)
        lrs = _train(engine, 3)
        with engine_lib.gathered_module(engine):
            out[(stage, offload)] = (_params(engine), lrs)
    torch.save(out, os.path.join(out_dir, "offloaded.pt"))
    dist.destroy_process_group()


def test_an_offloaded_optimizer_trains_the_same_weights_as_zero_without_it(tmp_path):
    """DeepSpeed refused ZeRO-Offload with our optimizer (a ZeRORuntimeException asking for its compiled CPU Adam)
    in every worker, after the earlier stages had run: the setting the config accepts must train."""
    mp.spawn(_offloaded, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=1, join=True)
    out = torch.load(tmp_path / "offloaded.pt", weights_only=True)
    params, lrs = out[(2, False)]
    for key in ((2, True),):
        assert out[key][1] == lrs, key
        for k, v in out[key][0].items():
            torch.testing.assert_close(v, params[k], atol=1e-6, rtol=0, msg=f"{key} {k}")
        assert any(not torch.equal(v, Toy().state_dict()[k]) for k, v in out[key][0].items())  # it trained
