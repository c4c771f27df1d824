"""DeepSpeed, and only here: the config dict generated from the typed config, and the engine.

DeepSpeed owns precision, gradient accumulation, clipping, the optimizer step and the LR schedule. Ray owns
the process group: ``deepspeed.initialize`` finds the one Ray Train already set up (gloo on CPU, nccl on GPU).
"""

from __future__ import annotations

import torch

from pipeline.config import DeepSpeedSection, OptimSection

NO_DECAY = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")


def resolve_precision(ds: DeepSpeedSection, *, use_gpu: bool) -> str:
    """``deepspeed.precision`` with "auto" decided: "bf16" on a GPU, "fp32" on CPU; "fp32", "bf16" and "fp16"
    are returned as given (config_checks rejects other values and fp16 without a GPU)."""
    if ds.precision == "auto":
        return "bf16" if use_gpu else "fp32"
    return ds.precision


def build_ds_config(ds: DeepSpeedSection, optim: OptimSection, *, world_size: int, use_gpu: bool) -> dict:
    """The DeepSpeed JSON config. global batch = world_size × micro-batch × accumulation."""
    precision = resolve_precision(ds, use_gpu=use_gpu)
    zero: dict = {"stage": ds.zero_stage}
    if ds.zero_stage > 0 and ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": use_gpu}
    return {
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
                # DeepSpeed refuses 0 ("must be a positive integer"): no warmup is its minimum, one step
                "warmup_num_steps": max(1, min(optim.warmup_steps, optim.max_steps - 1)),
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


def initialize(model: torch.nn.Module, ds_config: dict, optim: OptimSection, *, use_gpu: bool):
    """Wrap the model in a DeepSpeed engine with AdamW (torch's on CPU, fused on GPU)."""
    import deepspeed

    if not use_gpu:
        # The shared-memory comm op JIT-compiles for about a minute on first use; gloo does the same job.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    optimizer = torch.optim.AdamW(
        param_groups(model, optim.weight_decay), lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, fused=use_gpu
    )
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine


def gathered_module(engine):
    """A context in which ``engine.module`` holds full parameters on every rank (ZeRO-3 partitions them).

    Collective under ZeRO-3: every rank must enter it.
    """
    import contextlib

    import deepspeed

    if engine.zero_optimization_stage() == 3:
        return deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None)
    return contextlib.nullcontext()
