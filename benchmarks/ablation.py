"""F1/F3: the DistilBERT ablation at small scale: six students, one teacher, one budget.

The teacher is configs/teacher-small.yaml's pre-trained 4-layer BERT (run its prepare and teacher stages
first). Every student is a 2-layer DistilBERT of the teacher's width, trained for the same number of steps
on the same batches and the same per-step masks, then evaluated on the whole held-out split with one fixed
set of masks:

    (a) triple loss, initialised from teacher layers [0, 2]     (b) no L_ce      (c) no L_cos
    (d) no L_mlm      (e) triple loss, random init      (f) MLM only, random init (no teacher at all)

The step is the pipeline's (pipeline.step.distill_step, normalised by the supervised-token counts), with the
engine's optimizer recipe (AdamW, betas 0.9/0.98, eps 1e-6, no decay on biases and LayerNorm, linear
warmup then decay, clipping at 5), in one process without Ray: at this size the work is the same and the
Ray Train start-up would cost more than the training. Prints one JSON line per student and a summary line.

    python -m jobs.prepare --config configs/teacher-small.yaml && python -m jobs.teacher --config configs/teacher-small.yaml
    python benchmarks/ablation.py [--steps 200] [--seeds 0 1] [--out benchmarks/ablation.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from pipeline import assets, engine as engine_lib, masking, models, storage, teachers  # noqa: E402
from pipeline.stages import store  # noqa: E402
from pipeline.config import LossSection, StudentSection, load_config  # noqa: E402
from pipeline.step import Batch, count_supervised, distill_step, eval_sums, mlm_step  # noqa: E402

STUDENTS = {
    "a_triple": ("triple loss", dict(), "teacher"),
    "b_no_ce": ("no L_ce", dict(alpha_ce=0.0), "teacher"),
    "c_no_cos": ("no L_cos", dict(alpha_cos=0.0), "teacher"),
    "d_no_mlm": ("no L_mlm", dict(alpha_mlm=0.0), "teacher"),
    "e_random_init": ("triple loss, random init", dict(), "random"),
    "f_mlm_scratch": ("MLM only, random init", None, "random"),
}


def load_rows(path: str) -> tuple[torch.Tensor, torch.Tensor]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    ids = torch.tensor(table.column("input_ids").to_pylist(), dtype=torch.long)
    return ids, torch.tensor(table.column("attention_mask").to_pylist(), dtype=torch.long)


def lr_at(step: int, *, lr: float, warmup: int, total: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * max(0.0, (total - step) / max(total - warmup, 1))


def train_student(name: str, seed: int, *, teacher, train, val_batches, tok, args) -> dict:
    label, alphas, init = STUDENTS[name]
    torch.manual_seed(seed)
    student = models.build_student(StudentSection(layer_map="alternate", init=init), teacher, seed=seed).train()
    optimizer = torch.optim.AdamW(engine_lib.param_groups(student, 0.01), lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    loss_cfg = dataclasses.replace(LossSection(), **(alphas or {}))
    special = torch.tensor(sorted(set(tok.all_special_ids)))
    ids_all, am_all = train
    # The same batch order and masks for every student of a seed: only the recipe differs.
    order = torch.randperm(len(ids_all), generator=torch.Generator().manual_seed(1000 + seed))
    t0 = time.perf_counter()
    for step in range(args.steps):
        rows = order[(step * args.batch) % (len(order) - args.batch + 1):][: args.batch]
        ids, am = ids_all[rows], am_all[rows]
        m_ids, labels = masking.mask_tokens(ids, am, special_ids=special, mask_id=tok.mask_token_id, vocab_size=len(tok),
                                            generator=masking.step_generator(seed, 0, step))
        batch = Batch(input_ids_BT=m_ids, attention_mask_BT=am, labels_BT=labels)
        n_ce, n_mlm = count_supervised(batch, loss_cfg.kd_positions).unbind()
        if alphas is None:
            loss, _ = mlm_step(student, batch, norm_mlm=n_mlm)
        else:
            loss, _ = distill_step(student, teacher, batch, loss_cfg=loss_cfg, norm_ce=n_ce, norm_mlm=n_mlm)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, lr=args.lr, warmup=args.warmup, total=args.steps)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 5.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    train_s = time.perf_counter() - t0
    student.eval()
    sums = sum(eval_sums(student, teacher, b) for b in val_batches)
    ce, correct, count, agree = sums.tolist()
    return {"student": name, "what": label, "seed": seed, "steps": args.steps, "train_s": round(train_s, 1),
            "val_mlm_loss": round(ce / count, 4), "val_mlm_acc": round(correct / count, 4),
            "teacher_agreement": round(agree / count, 4), "val_masked_tokens": int(count)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/teacher-small.yaml", help="the config whose teacher and data to use")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--students", nargs="+", default=list(STUDENTS), choices=list(STUDENTS))
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out", default="", help="also write every row and the summary to this JSON file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    cfg = load_config(args.config)
    try:
        manifest = store.read_record(cfg, "prepare", needed_by="ablation").manifest
        teacher_uri = store.read_record(cfg, "teacher", needed_by="ablation").teacher_uri
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cache = cfg.cache_dir
    tok = assets.load_tokenizer(cfg.data.tokenizer, cache)
    teacher = teachers.load_teacher(teacher_uri, cache_root=cache)
    train = load_rows(manifest.splits["train"].path)
    val_ids, val_am = load_rows(manifest.splits["val"].path)
    special = torch.tensor(sorted(set(tok.all_special_ids)))
    val_batches = []
    for i in range(0, len(val_ids), 64):
        m_ids, labels = masking.mask_tokens(val_ids[i:i + 64], val_am[i:i + 64], special_ids=special, mask_id=tok.mask_token_id,
                                            vocab_size=len(tok), generator=masking.step_generator(12345, 0, i))
        val_batches.append(Batch(input_ids_BT=m_ids, attention_mask_BT=val_am[i:i + 64], labels_BT=labels))
    teacher_sums = sum(eval_sums(teacher, None, b) for b in val_batches).tolist()

    rows, t0 = [], time.perf_counter()
    for seed in args.seeds:
        for name in args.students:
            row = train_student(name, seed, teacher=teacher, train=train, val_batches=val_batches, tok=tok, args=args)
            print(json.dumps(row), flush=True)
            rows.append(row)
    summary = {"benchmark": "ablation", "teacher": teacher_uri, "teacher_val_mlm_loss": round(teacher_sums[0] / teacher_sums[2], 4),
               "teacher_val_mlm_acc": round(teacher_sums[1] / teacher_sums[2], 4), "steps": args.steps, "batch": args.batch,
               "seq_len": int(train[0].shape[1]), "seeds": args.seeds, "total_s": round(time.perf_counter() - t0, 1),
               "students": {}}
    for name in args.students:
        mine = [r for r in rows if r["student"] == name]
        summary["students"][name] = {
            k: {"mean": round(statistics.mean(r[k] for r in mine), 4),
                "spread": round(max(r[k] for r in mine) - min(r[k] for r in mine), 4)}
            for k in ("val_mlm_loss", "val_mlm_acc", "teacher_agreement")
        }
    print(json.dumps(summary))
    if args.out:
        storage.write_json(args.out, {"rows": rows, "summary": summary})
    return 0


if __name__ == "__main__":
    sys.exit(main())
