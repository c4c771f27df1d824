"""P4: model FLOPs utilisation of the distillation step on one GPU.

A BERT-base-shaped teacher (12 layers, 768 wide, 30,522 vocabulary; random weights, as no hub is reachable)
distils into a 6-layer student initialised from it, in bf16 under DeepSpeed ZeRO-2, at sequence lengths 128
and 512 with packed (pad-free) rows. The step is the pipeline's own: pipeline.step.distill_step inside the
engine of pipeline/engine.py, with masking re-drawn per step on the GPU.

    MFU = model FLOPs per token (pipeline/flops.py) × tokens/s ÷ the bf16 matmul peak measured on the same
          GPU in the same run (an 8192³ matmul loop).

Run unchanged on any single-GPU machine: python benchmarks/gpu_mfu.py [--steps 30]. Prints one JSON line.
Without CUDA it prints {"skipped": true, ...} and exits 0. ``--smoke`` runs tiny shapes on CPU (fp32, gloo)
so that CI exercises the code path; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from pipeline import engine as engine_lib, flops, masking, models  # noqa: E402
from pipeline.config import DeepSpeedSection, LossSection, OptimSection, StudentSection, TeacherSection  # noqa: E402
from pipeline.step import Batch, count_supervised, distill_step  # noqa: E402

TARGET_MFU = 0.5
BERT_BASE = TeacherSection(num_layers=12, hidden_size=768, num_heads=12, intermediate_size=3072, max_position_embeddings=512)
TINY = TeacherSection(num_layers=2, hidden_size=32, num_heads=2, intermediate_size=64, max_position_embeddings=128)


def _init_single_process_group(backend: str) -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    dist.init_process_group(backend, rank=0, world_size=1)


def measure(seq_len: int, batch: int, *, steps: int, warmup: int, device: torch.device, shape: TeacherSection,
            precision: str, vocab: int, zero_stage: int = 2, profile: str = "") -> dict:
    use_gpu = device.type == "cuda"
    teacher = models.build_teacher_for_pretraining(shape, vocab_size=vocab, pad_token_id=0, seed=0)
    student = models.build_student(StudentSection(layer_map="alternate", init="teacher"), teacher, seed=0)
    teacher = teacher.to(device=device, dtype=torch.bfloat16 if precision == "bf16" else torch.float32).eval()
    teacher.requires_grad_(False)
    optim = OptimSection(max_steps=warmup + steps, micro_batch_size=batch, lr=1e-4, warmup_steps=1)
    ds_config = engine_lib.build_ds_config(DeepSpeedSection(zero_stage=zero_stage, precision=precision), optim,
                                           world_size=1, use_gpu=use_gpu)
    engine = engine_lib.initialize(student, ds_config, optim, use_gpu=use_gpu)
    engine.train()
    loss_cfg = LossSection()
    special = torch.tensor([0, 100, 101, 102, 103], device=device)
    gen = torch.Generator(device=device)
    sync = torch.cuda.synchronize if use_gpu else (lambda: None)
    t0 = None
    profiler = None
    for i in range(warmup + steps):
        if i == warmup:
            sync()
            t0 = time.perf_counter()
            if profile:  # the timed steps under torch.profiler: its table, not the timing, is the point
                acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if use_gpu else [])
                profiler = torch.profiler.profile(activities=acts)
                profiler.__enter__()
        gen.manual_seed(i)
        ids = torch.randint(min(1000, vocab // 2), vocab, (batch, seq_len), device=device, generator=gen)
        ids[:, 0], ids[:, -1] = 101, 102  # [CLS] … [SEP], packed: no padding
        attn = torch.ones_like(ids)
        masked, labels = masking.mask_tokens(ids, attn, special_ids=special, mask_id=103, vocab_size=vocab, generator=gen)
        b = Batch(input_ids_BT=masked, attention_mask_BT=attn, labels_BT=labels)
        n_ce, n_mlm = count_supervised(b, loss_cfg.kd_positions).unbind()
        loss, _ = distill_step(engine, teacher, b, loss_cfg=loss_cfg, norm_ce=n_ce, norm_mlm=n_mlm)
        engine.backward(loss)
        engine.step()
    sync()
    seconds = time.perf_counter() - t0
    if profiler is not None:
        profiler.__exit__(None, None, None)
        sort = "cuda_time_total" if use_gpu else "cpu_time_total"
        with open(profile, "a") as f:
            f.write(f"# seq_len {seq_len}, batch {batch}, ZeRO-{zero_stage}, {steps} steps\n")
            f.write(profiler.key_averages().table(sort_by=sort, row_limit=30) + "\n")
    tokens_per_s = batch * seq_len * steps / seconds
    per_token = flops.step_flops_per_token(engine.module.config, teacher.config, seq_len=seq_len, mask_prob=0.15)
    out = {"seq_len": seq_len, "batch": batch, "tokens_per_s": round(tokens_per_s, 1),
           "model_tflops_per_s": round(tokens_per_s * per_token / 1e12, 6),
           "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if use_gpu else None}
    del engine, teacher, student
    if use_gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch-128", type=int, default=128, help="micro-batch (sequences) at seq 128")
    parser.add_argument("--batch-512", type=int, default=32, help="micro-batch (sequences) at seq 512")
    parser.add_argument("--zero-stage", type=int, default=2, choices=(0, 1, 2, 3))
    parser.add_argument("--profile", default="", help="append torch.profiler tables of the timed steps to this file")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU: exercises the code, measures nothing")
    args = parser.parse_args(argv)

    if args.smoke:
        _init_single_process_group("gloo")
        runs = [measure(32, 4, steps=2, warmup=1, device=torch.device("cpu"), shape=TINY, precision="fp32", vocab=1000,
                        profile=args.profile)]
        print(json.dumps({"benchmark": "gpu_mfu", "smoke": True, "results": runs}))
        return 0
    if not torch.cuda.is_available():
        print(json.dumps({"benchmark": "gpu_mfu", "skipped": True, "reason": "no CUDA device: P4 needs one GPU"}))
        return 0

    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    _init_single_process_group("nccl")
    peak = flops.measure_peak_tflops(device)
    runs = []
    for seq_len, batch in ((128, args.batch_128), (512, args.batch_512)):
        r = measure(seq_len, batch, steps=args.steps, warmup=args.warmup, device=device, shape=BERT_BASE,
                    precision="bf16", vocab=30522, zero_stage=args.zero_stage, profile=args.profile)
        r["mfu"] = round(r["model_tflops_per_s"] / peak, 4)
        runs.append(r)
    print(json.dumps({
        "benchmark": "gpu_mfu", "device": torch.cuda.get_device_name(device), "precision": "bf16", "zero_stage": args.zero_stage,
        "peak_bf16_tflops_measured": round(peak, 1), "results": runs, "target_mfu": TARGET_MFU,
        "met": all(r["mfu"] >= TARGET_MFU for r in runs),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
