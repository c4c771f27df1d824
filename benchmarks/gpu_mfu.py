"""P4: model FLOPs utilisation of the distillation step on one GPU, lever by lever, against HF's ``Distiller.step``.

A BERT-base-shaped teacher (12 layers, 768 wide, 30,522 vocabulary; random weights, as no hub is reachable)
distils into a 6-layer student initialised from it, in bf16, at sequence lengths 128 and 512 with packed
(pad-free) rows. Our step is the pipeline's own: pipeline.step.distill_step inside the engine of
pipeline/engine.py, with masking re-drawn per step on the device. Each variant switches levers of the step:

    strategy   deepspeed (ZeRO-2) | ddp (plain torch: fused AdamW, bf16 autocast; scaling.strategy)
    compile    none | default | reduce-overhead (CUDA graphs)          (compute.compile)
    pad_vocab  0 | 64: both vocabularies padded to 30,528 rows         (compute.pad_vocab_multiple)
    fused      the fused KD + MLM loss (default) or the separate chunked terms (before lever 2)

and ``hf`` is HF's ``Distiller.step`` (benchmarks/distill_step.py's faithful re-write: full-vocabulary logits,
``masked_select``, ``KLDivLoss``, ``CosineEmbeddingLoss``) under bf16 autocast with fused AdamW, at the same shapes.

    MFU = model FLOPs per token (pipeline/flops.py) × tokens/s ÷ the bf16 matmul peak measured on the same
          GPU in the same run (8192³ products); ``mfu_spec`` divides by the card's data-sheet dense bf16 peak.

Before the MFU runs, two cheap decisive checks: ``sync_check`` runs our step under
``torch.cuda.set_sync_debug_mode("error")`` (a host sync anywhere in forward, loss or backward raises), and
``vocab_matmul`` times the vocabulary projection's forward and backward at 30,522 against 30,528 columns.

    python benchmarks/gpu_mfu.py [--steps 20] [--variants ours_ds,ours_ddp,...] [--profile FILE]

Prints one JSON line. Without CUDA it prints {"skipped": true, ...} and exits 0. ``--smoke`` runs tiny shapes on
CPU (fp32, gloo) so that CI exercises every code path; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
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
# Data-sheet dense bf16 peaks (TFLOP/s, no sparsity), by a substring of torch.cuda.get_device_name.
SPEC_BF16_TFLOPS = {"H200": 989.4, "H100 SXM": 989.4, "H100 PCIe": 756.0, "H100": 989.4, "A100": 312.0, "L40S": 362.1}


@dataclasses.dataclass(frozen=True)
class Variant:
    """One configuration of the step (see the module docstring)."""

    name: str
    strategy: str = "deepspeed"
    compile: str = "none"
    pad_vocab: int = 0
    fused: bool = True
    hf: bool = False


VARIANTS = {v.name: v for v in (
    Variant("hf", strategy="ddp", hf=True),
    Variant("ours_ds_unfused", fused=False),
    Variant("ours_ds"),
    Variant("ours_ddp", strategy="ddp"),
    Variant("ours_ddp_pad64", strategy="ddp", pad_vocab=64),
    Variant("ours_ddp_compile", strategy="ddp", compile="default", pad_vocab=64),
    Variant("ours_ddp_graphs", strategy="ddp", compile="reduce-overhead", pad_vocab=64),
)}
DEFAULT_VARIANTS = ",".join(VARIANTS)


def _hf_step_fn():
    """HF's Distiller.step as benchmarks/distill_step.py re-writes it (one file, one definition)."""
    spec = importlib.util.spec_from_file_location("distill_step_bench", os.path.join(os.path.dirname(__file__), "distill_step.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.hf_step


def _init_single_process_group(backend: str) -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    dist.init_process_group(backend, rank=0, world_size=1)


def _build(variant: Variant, shape: TeacherSection, vocab: int, device, precision: str, optim: OptimSection):
    """(teacher, engine or (student, optimizer) for HF's step, real vocabulary size)."""
    use_gpu = device.type == "cuda"
    teacher = models.build_teacher_for_pretraining(shape, vocab_size=vocab, pad_token_id=0, seed=0)
    real_vocab = models.pad_vocab(teacher, variant.pad_vocab)
    student = models.build_student(StudentSection(layer_map="alternate", init="teacher"), teacher, seed=0)
    models.mask_padded_logits(student, real_vocab)
    teacher = teacher.to(device=device, dtype=torch.bfloat16 if precision == "bf16" else torch.float32).eval()
    teacher.requires_grad_(False)
    if variant.compile != "none":
        for module in (teacher.bert, teacher.cls, student):
            module.compile(mode=variant.compile)
    if variant.hf:
        student = student.to(device).train()
        return teacher, (student, torch.optim.AdamW(student.parameters(), lr=1e-4, fused=use_gpu)), real_vocab
    ds = DeepSpeedSection(zero_stage=2 if variant.strategy == "deepspeed" else 0, precision=precision)
    ds_config = engine_lib.build_ds_config(ds, optim, world_size=1, use_gpu=use_gpu)
    engine = engine_lib.initialize(student, ds_config, optim, use_gpu=use_gpu, strategy=variant.strategy)
    engine.train()
    return teacher, engine, real_vocab


def _batch(i: int, batch: int, seq_len: int, vocab: int, device, gen) -> Batch:
    special = torch.tensor([0, 100, 101, 102, 103], device=device)
    gen.manual_seed(i)
    ids = torch.randint(min(1000, vocab // 2), vocab, (batch, seq_len), device=device, generator=gen)
    ids[:, 0], ids[:, -1] = 101, 102  # [CLS] … [SEP], packed: no padding
    attn = torch.ones_like(ids)
    masked, labels = masking.mask_tokens(ids, attn, special_ids=special, mask_id=103, vocab_size=vocab, generator=gen)
    return Batch(input_ids_BT=masked, attention_mask_BT=attn, labels_BT=labels, packed=True)


def _step_fn(variant: Variant, teacher, trained, loss_cfg: LossSection, precision: str, device):
    """One optimizer step on a batch, as the variant takes it."""
    if variant.hf:
        hf_step, (student, optimizer) = _hf_step_fn(), trained
        autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext)

        def run(b: Batch) -> None:
            with autocast():
                hf_step(student, teacher, b.input_ids_BT, b.attention_mask_BT, b.labels_BT, optimizer, loss_cfg)
        return run

    def run(b: Batch) -> None:
        n_ce, n_mlm = count_supervised(b, loss_cfg.kd_positions).unbind()
        loss, _ = distill_step(trained, teacher, b, loss_cfg=loss_cfg, norm_ce=n_ce, norm_mlm=n_mlm, fused=variant.fused)
        trained.backward(loss)
        trained.step()
    return run


def measure(variant: Variant, seq_len: int, batch: int, *, steps: int, warmup: int, device: torch.device,
            shape: TeacherSection, precision: str, vocab: int, profile: str = "") -> dict:
    """tokens/s, model TFLOP/s, peak memory and CUDA kernels per step of one variant at one shape."""
    use_gpu = device.type == "cuda"
    optim = OptimSection(max_steps=warmup + steps + 3, micro_batch_size=batch, lr=1e-4, warmup_steps=1)
    teacher, trained, real_vocab = _build(variant, shape, vocab, device, precision, optim)
    run = _step_fn(variant, teacher, trained, LossSection(), precision, device)
    module = trained[0] if variant.hf else trained.module
    before = [p.detach().to("cpu", copy=True) for p in module.parameters() if p.requires_grad]  # did it train?
    gen = torch.Generator(device=device)
    sync = torch.cuda.synchronize if use_gpu else (lambda: None)
    for i in range(warmup):
        run(_batch(i, batch, seq_len, real_vocab, device, gen))
    sync()
    t0 = time.perf_counter()
    for i in range(warmup, warmup + steps):
        run(_batch(i, batch, seq_len, real_vocab, device, gen))
    sync()
    seconds = time.perf_counter() - t0
    kernels, table = _kernels_per_step(run, lambda i: _batch(i, batch, seq_len, real_vocab, device, gen), use_gpu,
                                       start=warmup + steps)
    if profile:
        with open(profile, "a") as f:
            f.write(f"# {variant.name}: seq_len {seq_len}, batch {batch}, 3 steps\n{table}\n")
    tokens_per_s = batch * seq_len * steps / seconds
    trainable = [p.detach().cpu() for p in module.parameters() if p.requires_grad]
    moved = sum(not torch.equal(b, a) for b, a in zip(before, trainable, strict=True))
    # Model FLOPs of the real vocabulary: padding columns are work, not model FLOPs.
    per_token = flops.step_flops_per_token(_with_vocab(module.config, real_vocab), _with_vocab(teacher.config, real_vocab),
                                           seq_len=seq_len, mask_prob=0.15)
    out = {"variant": variant.name, "seq_len": seq_len, "batch": batch, "tokens_per_s": round(tokens_per_s, 1),
           "model_tflops_per_s": round(tokens_per_s * per_token / 1e12, 6), "kernels_per_step": kernels,
           "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if use_gpu else None,
           "trainable_tensors": len(before), "tensors_moved": moved}
    del trained, teacher, run, module, before, trainable
    if use_gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    torch._dynamo.reset()
    return out


def _with_vocab(config, vocab: int):
    import copy

    config = copy.copy(config)
    config.vocab_size = vocab
    return config


def _kernels_per_step(run, make_batch, use_gpu: bool, *, start: int, steps: int = 3) -> tuple[float | None, str]:
    """Device kernels (and copies) launched per step over ``steps`` profiled steps, and the profiler's table."""
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if use_gpu else [])
    with torch.profiler.profile(activities=acts) as prof:
        for i in range(start, start + steps):
            run(make_batch(i))
        if use_gpu:
            torch.cuda.synchronize()
    sort = "cuda_time_total" if use_gpu else "cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=25)
    if not use_gpu:
        return None, table
    device_events = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    return round(device_events / steps, 1), table


def sync_check(variant: Variant, device, shape: TeacherSection, precision: str, vocab: int, batch: int, seq_len: int) -> dict:
    """Our step's forward, loss and backward under ``set_sync_debug_mode("error")``: "ok" or the first sync's error.
    The optimizer step is outside (DeepSpeed's own checks are not ours)."""
    optim = OptimSection(max_steps=10, micro_batch_size=batch, lr=1e-4, warmup_steps=1)
    teacher, engine, real_vocab = _build(variant, shape, vocab, device, precision, optim)
    gen = torch.Generator(device=device)
    loss_cfg = LossSection()
    result = "ok"
    for i in range(3):  # the first step warms caches and compiles; the last two are checked
        b = _batch(i, batch, seq_len, real_vocab, device, gen)
        torch.cuda.synchronize()
        try:
            if i:
                torch.cuda.set_sync_debug_mode("error")
            n_ce, n_mlm = count_supervised(b, loss_cfg.kd_positions).unbind()
            loss, _ = distill_step(engine, teacher, b, loss_cfg=loss_cfg, norm_ce=n_ce, norm_mlm=n_mlm)
            engine.backward(loss)
        except RuntimeError as e:
            result = f"sync at step {i}: {str(e).splitlines()[0][:300]}"
            break
        finally:
            torch.cuda.set_sync_debug_mode(0)
        engine.step()
    del engine, teacher
    torch.cuda.empty_cache()
    return {"variant": variant.name, "seq_len": seq_len, "result": result}


def vocab_matmul(device, tokens: int, hidden: int = 768, reps: int = 50) -> dict:
    """Forward + backward of the vocabulary projection (tokens × hidden @ hidden × V) at V = 30,522 and 30,528, bf16."""
    out = {}
    for v in (30522, 30528):
        x = torch.randn(tokens, hidden, device=device, dtype=torch.bfloat16, requires_grad=True)
        w = torch.randn(v, hidden, device=device, dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn(tokens, v, device=device, dtype=torch.bfloat16)
        for _ in range(5):
            (x @ w.t()).backward(g)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            (x @ w.t()).backward(g)
        torch.cuda.synchronize()
        seconds = (time.perf_counter() - t0) / reps
        out[f"v{v}_ms"] = round(seconds * 1e3, 3)
        out[f"v{v}_tflops"] = round(3 * 2 * tokens * hidden * v / seconds / 1e12, 1)
    out["speedup_padded"] = round(out["v30522_ms"] / out["v30528_ms"], 3)
    out["tokens"] = tokens
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch-128", type=int, default=128, help="micro-batch (sequences) at seq 128")
    parser.add_argument("--batch-512", type=int, default=32, help="micro-batch (sequences) at seq 512")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma-separated, from {DEFAULT_VARIANTS}")
    parser.add_argument("--seq-lens", default="128,512")
    parser.add_argument("--checks-only", action="store_true", help="the sync check and the vocabulary matmul only")
    parser.add_argument("--skip-checks", action="store_true", help="the MFU runs only")
    parser.add_argument("--profile", default="", help="append torch.profiler tables of 3 steps per run to this file")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU: exercises the code, measures nothing")
    args = parser.parse_args(argv)
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}: use some of {DEFAULT_VARIANTS}")
    variants = [VARIANTS[v] for v in args.variants.split(",")]

    if args.smoke:
        _init_single_process_group("gloo")
        smoke = [v for v in variants if v.compile == "none" or args.variants != DEFAULT_VARIANTS]  # compiling costs minutes
        runs = [measure(v, 32, 4, steps=2, warmup=1, device=torch.device("cpu"), shape=TINY, precision="fp32",
                        vocab=1000, profile=args.profile) for v in smoke]
        print(json.dumps({"benchmark": "gpu_mfu", "smoke": True, "results": runs}))
        return 0
    if not torch.cuda.is_available():
        print(json.dumps({"benchmark": "gpu_mfu", "skipped": True, "reason": "no CUDA device: P4 needs one GPU"}))
        return 0

    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    _init_single_process_group("nccl")
    name = torch.cuda.get_device_name(device)
    spec = next((v for k, v in SPEC_BF16_TFLOPS.items() if k in name), None)
    report = {"benchmark": "gpu_mfu", "device": name, "precision": "bf16", "torch": torch.__version__,
              "spec_bf16_tflops": spec, "target_mfu": TARGET_MFU}
    if not args.skip_checks:
        report["vocab_matmul"] = vocab_matmul(device, tokens=args.batch_128 * 128)
        report["sync_check"] = [sync_check(VARIANTS[v], device, BERT_BASE, "bf16", 30522, args.batch_128, 128)
                                for v in ("ours_ddp", "ours_ds")]
        print(json.dumps(report), flush=True)  # the checks survive a later failure or timeout
    if args.checks_only:
        return 0
    peak = flops.measure_peak_tflops(device)
    report["peak_bf16_tflops_measured"] = round(peak, 1)
    runs = []
    for seq_len in (int(s) for s in args.seq_lens.split(",")):
        batch = args.batch_128 if seq_len <= 128 else args.batch_512
        for v in variants:
            try:
                r = measure(v, seq_len, batch, steps=args.steps, warmup=args.warmup, device=device, shape=BERT_BASE,
                            precision="bf16", vocab=30522, profile=args.profile)
            except Exception as e:  # one lever failing on this GPU must not hide the others' figures
                r = {"variant": v.name, "seq_len": seq_len, "batch": batch, "error": f"{type(e).__name__}: {str(e)[:300]}"}
            else:
                r["mfu"] = round(r["model_tflops_per_s"] / peak, 4)
                r["mfu_spec"] = round(r["model_tflops_per_s"] / spec, 4) if spec else None
            runs.append(r)
            print(json.dumps({"partial": r}), flush=True)
        hf = next((r for r in runs if r["variant"] == "hf" and r["seq_len"] == seq_len and "error" not in r), None)
        for r in runs:
            if hf and r["seq_len"] == seq_len and "error" not in r:
                r["ratio_vs_hf"] = round(r["tokens_per_s"] / hf["tokens_per_s"], 3)
    report["results"] = runs
    best = {s: max((r.get("mfu", 0) for r in runs if r["seq_len"] == s), default=0) for s in {r["seq_len"] for r in runs}}
    report["best_mfu"] = best
    report["met"] = bool(best) and all(m >= TARGET_MFU for m in best.values())
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
