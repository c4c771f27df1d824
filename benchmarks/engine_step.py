"""Step time of the two training engines (``scaling.strategy``): DeepSpeed ZeRO-2 against plain PyTorch (ddp),
one process, CPU, fp32, the same distillation step. Prints one JSON line.

One rank, so what differs is the engine's own per-step work: ZeRO's gradient hooks, flat buffers and partitioned
optimizer against ``backward()``, clipping and ``AdamW.step()``. The GPU comparison is ``benchmarks/gpu_mfu.py``'s.

    python benchmarks/engine_step.py [--steps 30] [--seq-len 128] [--batch 16] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from pipeline import engine as engine_lib, masking, models  # noqa: E402
from pipeline.config import DeepSpeedSection, LossSection, OptimSection, StudentSection, TeacherSection  # noqa: E402
from pipeline.step import Batch, distill_step  # noqa: E402


def build(strategy: str, teacher, args):
    """A fresh student in the engine of ``strategy`` (ZeRO-2 for deepspeed), fp32, training mode."""
    optim = OptimSection(max_steps=args.steps + 3, micro_batch_size=args.batch, warmup_steps=1)
    ds = DeepSpeedSection(zero_stage=2 if strategy == "deepspeed" else 0, precision="fp32")
    ds_config = engine_lib.build_ds_config(ds, optim, world_size=1, use_gpu=False)
    engine = engine_lib.initialize(models.build_student(StudentSection(), teacher, seed=0), ds_config, optim,
                                   use_gpu=False, strategy=strategy)
    engine.train()
    return engine


def step_s(engine, teacher, batch: Batch) -> float:
    """Seconds of one optimizer step: forward, backward, step."""
    t0 = time.perf_counter()
    loss, _ = distill_step(engine, teacher, batch, loss_cfg=LossSection())
    engine.backward(loss)
    engine.step()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed reads it; Ray Train sets it in the workers
    dist.init_process_group("gloo", init_method=f"file://{tempfile.mkdtemp()}/init", rank=0, world_size=1)
    vocab = 30522
    shape = TeacherSection(num_layers=4, hidden_size=128, num_heads=2, intermediate_size=512,
                           max_position_embeddings=512)
    teacher = models.build_teacher_for_pretraining(shape, vocab_size=vocab, pad_token_id=0, seed=0)
    teacher.requires_grad_(False).eval()
    engines = {strategy: build(strategy, teacher, args) for strategy in ("deepspeed", "ddp")}
    times: dict[str, list[float]] = {strategy: [] for strategy in engines}
    g = torch.Generator().manual_seed(0)
    for i in range(args.steps + 3):  # the engines alternate step by step: the machine's load hits both alike
        ids = torch.randint(1000, vocab, (args.batch, args.seq_len), generator=g)
        am = torch.ones_like(ids)
        m_ids, labels = masking.mask_tokens(ids, am, special_ids=torch.tensor([0]), mask_id=103, vocab_size=vocab,
                                            generator=masking.step_generator(0, 0, i))
        batch = Batch(input_ids_BT=m_ids, attention_mask_BT=am, labels_BT=labels)
        for strategy, engine in engines.items():
            times[strategy].append(step_s(engine, teacher, batch))
    results = {k: 1000 * statistics.median(v[3:]) for k, v in times.items()}  # 3 warm-up steps left out
    print(json.dumps({
        "benchmark": "engine_step", "device": "cpu", "threads": args.threads, "seq_len": args.seq_len,
        "batch": args.batch,
        "teacher": "4x128 BERT", "student": "2x128 DistilBERT", "precision": "fp32",
        "zero2_ms_per_step": round(results["deepspeed"], 1), "ddp_ms_per_step": round(results["ddp"], 1),
        "ddp_over_zero2_time": round(results["ddp"] / results["deepspeed"], 3),
    }))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
