"""The training engines: DeepSpeed ZeRO (the only DeepSpeed import), or plain PyTorch, chosen by
``scaling.strategy``.

Either engine owns precision, gradient accumulation, clipping, the optimizer step and the LR schedule, all set
from one DeepSpeed config dict (:func:`build_ds_config`), and offers the interface the loop and checkpoint.py
use: ``engine(...)``, ``engine.module``, ``backward(loss)``, ``step()`` after every micro-batch, ``train()``,
``eval()``, ``get_lr()``, ``skipped_steps``, ``zero_optimization_stage()``, ``save_checkpoint`` and
``load_checkpoint``. Ray owns the process group: both find the one Ray Train already set up (gloo on CPU,
nccl on GPU).
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist

from pipeline import storage
from pipeline.config import DeepSpeedSection, OptimSection

NO_DECAY = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")
STRATEGIES = ("deepspeed", "ddp")


def resolve_precision(ds: DeepSpeedSection, *, use_gpu: bool) -> str:
    """``deepspeed.precision`` with "auto" decided: "bf16" on a GPU, "fp32" on CPU; "fp32", "bf16" and "fp16"
    are returned as given (pipeline/config/checks.py rejects other values and fp16 without a GPU)."""
    if ds.precision == "auto":
        return "bf16" if use_gpu else "fp32"
    return ds.precision


def build_ds_config(ds: DeepSpeedSection, optim: OptimSection, *, world_size: int, use_gpu: bool) -> dict:
    """The DeepSpeed JSON config. global batch = world_size × micro-batch × accumulation.

    ZeRO-Offload keeps the optimizer given to :func:`initialize` (torch's AdamW) rather than DeepSpeed's
    compiled CPU Adam, which DeepSpeed would otherwise demand with a ZeRORuntimeException in every worker:
    ``zero_force_ds_cpu_optimizer`` is off."""
    precision = resolve_precision(ds, use_gpu=use_gpu)
    zero: dict = {"stage": ds.zero_stage}
    offload = ds.zero_stage > 0 and ds.offload_optimizer
    if offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": use_gpu}
    return {
        **({"zero_force_ds_cpu_optimizer": False} if offload else {}),
        "train_batch_size": world_size * optim.micro_batch_size * optim.grad_accum,
        "train_micro_batch_size_per_gpu": optim.micro_batch_size,
        "gradient_accumulation_steps": optim.grad_accum,
        "gradient_clipping": optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "scheduler": {
            "type": "WarmupDecayLR",
            "params": {
                "total_num_steps": optim.max_steps,
                "warmup_min_lr": 0.0,
                "warmup_max_lr": optim.lr,
                # DeepSpeed refuses 0 ("must be a positive integer"): no warmup is its minimum, one step (which it
                # stretches to 2, WarmupDecay). A warmup as long as the run is refused by the config's checks.
                "warmup_num_steps": max(1, optim.warmup_steps),
                "warmup_type": "linear",
            },
        },
        "steps_per_print": 10**9,  # our own metrics interface reports; keep DeepSpeed quiet
        "wall_clock_breakdown": False,
    }


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases and LayerNorm weights (BERT's recipe)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name.endswith(NO_DECAY) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def initialize(model: torch.nn.Module, ds_config: dict, optim: OptimSection, *, use_gpu: bool,
               strategy: str = "deepspeed"):
    """The engine of ``strategy`` (``scaling.strategy``) around ``model``, with AdamW (torch's on CPU, fused on
    GPU): a DeepSpeed engine, or a :class:`TorchEngine` (``ddp``) set from the same ``ds_config``."""
    optimizer = torch.optim.AdamW(
        param_groups(model, optim.weight_decay), lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, fused=use_gpu
    )
    if strategy == "ddp":
        return TorchEngine.from_ds_config(model, optimizer, ds_config, use_gpu=use_gpu)
    if strategy != "deepspeed":
        raise ValueError(f"scaling.strategy={strategy!r}: use one of {list(STRATEGIES)}")
    import deepspeed

    if not use_gpu:
        # The shared-memory comm op JIT-compiles for about a minute on first use; gloo does the same job.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine


def gathered_module(engine):
    """A context in which ``engine.module`` holds full parameters on every rank (ZeRO-3 partitions them).

    Collective under ZeRO-3: every rank must enter it.
    """
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None)
    return contextlib.nullcontext()


class WarmupDecay:
    """DeepSpeed's ``WarmupDecayLR`` with linear warmup and ``warmup_min_lr`` 0, as a ``LambdaLR`` factor of the
    peak LR after ``num_steps_done`` optimizer steps: 0 before the first step and for the first, i/W for the
    (i+1)-th while i < W, then (total − i)/(total − W) down to 0. DeepSpeed's own quirks are kept, so the two
    schedules agree step by step (tests/test_engine_torch.py): its counter starts at −1 (the first step runs at
    ``warmup_min_lr``) and it warms up over at least 2 steps."""

    def __init__(self, warmup_num_steps: int, total_num_steps: int):
        self.warmup_num_steps, self.total_num_steps = max(2, warmup_num_steps), total_num_steps

    def __call__(self, num_steps_done: int) -> float:
        i, warmup, total = num_steps_done - 1, self.warmup_num_steps, self.total_num_steps  # i: DeepSpeed's counter
        if i < 0:
            return 0.0
        if i < warmup:
            return i / warmup
        return max(0.0, float(total - i) / float(max(1.0, total - warmup)))


class TorchEngine:
    """Plain PyTorch behind the DeepSpeed engine's interface (``scaling.strategy: ddp``): fp32 master weights,
    optional bf16 autocast around the forward, AdamW, global-norm clipping, :class:`WarmupDecay`, and
    DistributedDataParallel across ranks (none on one rank).

    The loss contract is DeepSpeed's (pipeline/losses.py): ``backward`` divides by the accumulation steps A,
    and gradients are averaged over the W ranks: by DDP's hooks when the accumulation's last forward went
    through ``engine(...)``, otherwise (a task that calls ``engine.module`` directly, as ``step.mlm_step``
    does, which DDP cannot see) by one all-reduce at the boundary. ``step()`` follows every micro-batch; the
    optimizer steps at the accumulation boundary only. The state is replicated, so rank 0 alone writes it:
    one file holding weights, optimizer, schedule and counters.
    """

    STATE_FILE = "torch_engine_states.pt"

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, lr_scheduler, *, grad_accum: int,
                 grad_clip: float, autocast_dtype: torch.dtype | None, device: torch.device, rank: int = 0,
                 world_size: int = 1):
        self.module, self.device = model.to(device), device
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        self.grad_accum, self.grad_clip, self.autocast_dtype = grad_accum, grad_clip, autocast_dtype
        self.rank, self.world_size = rank, world_size
        self.ddp = None
        if world_size > 1:  # buffers are constants here (position ids): no broadcast, a collective per forward
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                self.module, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
        self.micro_steps = self.global_steps = self.skipped_steps = 0
        self._reduced_by_ddp = False  # whether this accumulation's gradients are averaged by DDP's hooks

    @classmethod
    def from_ds_config(cls, model, optimizer, ds_config: dict, *, use_gpu: bool) -> "TorchEngine":
        """The engine ``ds_config`` describes: its accumulation, clipping, precision and WarmupDecayLR."""
        if ds_config["fp16"]["enabled"]:
            raise ValueError("deepspeed.precision=fp16 with scaling.strategy=ddp: ddp has no loss scaler; use bf16 "
                             "(fp32's range) or scaling.strategy=deepspeed")
        sched = ds_config["scheduler"]["params"]
        assert ds_config["scheduler"]["type"] == "WarmupDecayLR" and sched["warmup_min_lr"] == 0.0, sched
        for group in optimizer.param_groups:
            group["lr"] = sched["warmup_max_lr"]  # the peak, as DeepSpeed's scheduler sets it
        lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, WarmupDecay(sched["warmup_num_steps"], sched["total_num_steps"]))
        device = torch.device("cuda", torch.cuda.current_device()) if use_gpu else torch.device("cpu")
        distributed = dist.is_available() and dist.is_initialized()
        return cls(model, optimizer, lr_scheduler, grad_accum=ds_config["gradient_accumulation_steps"],
                   grad_clip=ds_config["gradient_clipping"],
                   autocast_dtype=torch.bfloat16 if ds_config["bf16"]["enabled"] else None, device=device,
                   rank=dist.get_rank() if distributed else 0, world_size=dist.get_world_size() if distributed else 1)

    # ---- the loop's interface ---------------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        """The model's forward: through DDP when training with gradients on several ranks (gradient sync only
        at the accumulation boundary), under bf16 autocast when the precision is bf16."""
        through_ddp = self.ddp is not None and self.module.training and torch.is_grad_enabled()
        boundary = self.is_gradient_accumulation_boundary()
        if through_ddp:
            self._reduced_by_ddp = boundary
        no_sync = self.ddp.no_sync() if through_ddp and not boundary else contextlib.nullcontext()
        autocast = (torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype
                    else contextlib.nullcontext())
        with no_sync, autocast:
            return (self.ddp if through_ddp else self.module)(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> torch.Tensor:
        """Backward of ``loss / grad_accum`` (DeepSpeed's scaling); returns the scaled loss."""
        scaled = loss / self.grad_accum if self.grad_accum > 1 else loss
        scaled.backward()
        return scaled

    def step(self) -> None:
        """Called after every micro-batch; at the accumulation boundary: average gradients over ranks (when
        DDP has not), clip, step the optimizer and the schedule, zero the gradients."""
        if self.is_gradient_accumulation_boundary():
            if self.ddp is not None and not self._reduced_by_ddp:
                self._all_reduce_gradients()
            if self.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.lr_scheduler.step()
            self.global_steps += 1
            self._reduced_by_ddp = False
        self.micro_steps += 1

    def is_gradient_accumulation_boundary(self) -> bool:
        """Whether the current micro-batch is the last of its optimizer step."""
        return (self.micro_steps + 1) % self.grad_accum == 0

    def train(self, mode: bool = True) -> None:
        """Training mode (dropout on)."""
        self.module.train(mode)

    def eval(self) -> None:
        """Evaluation mode (dropout off); forwards skip DDP, so ranks may run different numbers of them."""
        self.module.train(False)

    def get_lr(self) -> list[float]:
        """The learning rate of each parameter group, for the next optimizer step."""
        return [group["lr"] for group in self.optimizer.param_groups]

    def zero_optimization_stage(self) -> int:
        """0: nothing is sharded (``gathered_module`` has nothing to gather)."""
        return 0

    # ---- checkpoints ------------------------------------------------------------------------------------
    def save_checkpoint(self, save_dir: str, tag: str | None = None) -> None:
        """Rank 0 writes ``<save_dir>/<tag>/torch_engine_states.pt`` and ``<save_dir>/latest`` (the tag);
        the other ranks hold the same state and write nothing."""
        tag = tag or f"global_step{self.global_steps}"
        if self.rank != 0:
            return
        state = {"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "lr_scheduler": self.lr_scheduler.state_dict(), "global_steps": self.global_steps,
                 "micro_steps": self.micro_steps, "skipped_steps": self.skipped_steps}
        path = os.path.join(save_dir, tag, self.STATE_FILE)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with storage.replacing(path) as tmp:
            torch.save(state, tmp)
        storage.write_bytes(os.path.join(save_dir, "latest"), tag.encode())

    def load_checkpoint(self, load_dir: str, tag: str | None = None) -> tuple[str | None, dict | None]:
        """Every rank reads rank 0's file; returns (its path, {}) as DeepSpeed returns (path, client state),
        or (None, None) when there is none (a DeepSpeed checkpoint, say)."""
        if tag is None:
            latest = os.path.join(load_dir, "latest")
            if not os.path.isfile(latest):
                return None, None
            with open(latest) as f:
                tag = f.read().strip()
        path = os.path.join(load_dir, tag, self.STATE_FILE)
        if not os.path.isfile(path):
            return None, None
        state = torch.load(path, map_location=self.device, weights_only=True)
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.global_steps, self.micro_steps = state["global_steps"], state["micro_steps"]
        self.skipped_steps = state["skipped_steps"]
        return path, {}

    def _all_reduce_gradients(self) -> None:
        """Average every gradient over the ranks in one flat all-reduce (a missing gradient counts as 0, so
        that every rank sends the same shapes)."""
        params = [p for p in self.module.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params]
        flat = torch._utils._flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        flat /= self.world_size
        for g, reduced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
            g.copy_(reduced)
