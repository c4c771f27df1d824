"""The transfer set of task distillation: unlabelled in-domain text (``task_distill.transfer``, any corpus source)
that the teacher labels for the student with its soft targets, beside the task's labelled examples (Hinton et al.
2015 §2 call it the transfer set).

The sources are read as the prepare stage reads a corpus (pipeline/corpus/: local or s3://, any format, compressed
or not, ``data.text_separator`` for text files) through Ray Data; each document is one text, its whitespace
folded. Texts equal to a dev example of the task (after whitespace and case folding) are left out, so that the
student never sees the dev set, and counted.
"""

from __future__ import annotations

import dataclasses
import os

from pipeline.corpus import packing, prepare, readers, sources


def texts(cfg, data, tokenizer, transfer_sources: list[str]) -> tuple[list[str], str]:
    """(texts, a one-line report): up to ``task_distill.transfer_examples`` documents of ``transfer_sources`` (as
    data.sources), in order, none equal to a dev example of ``data``'s task. ValueError (one line) when they give
    none."""
    want = cfg.task_distill.transfer_examples
    data_cfg = dataclasses.replace(cfg.data, sources=list(transfer_sources))
    groups = sources.resolve(data_cfg, os.path.join(cfg.run.root, "corpora"))
    stats = prepare.file_stats(groups)
    parts = [readers.read_group(g, data_cfg, [stats[p][0] for p in g.paths]) for g in groups if g.paths]
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    dev = {_key(t) for t in data.dev.texts}  # folded as each document is below
    out, dropped = [], 0
    for batch in ds.iter_batches(batch_size=256, batch_format="numpy"):
        for text, event in zip(batch["text"], batch["event"]):
            clean, _ = packing.clean_document(str(text), cfg.data.max_line_chars)  # as the task loaders clean
            doc = " ".join(clean.split())
            if event or not doc:
                continue
            if doc.lower() in dev:
                dropped += 1
                continue
            out.append(doc)
            if len(out) >= want:
                break
        if len(out) >= want:
            break
    if not out:
        raise ValueError(f"task_distill: the transfer set {list(transfer_sources)} of {data.spec.name}: no text read (every document empty "
                         "or a dev example): give sources with in-domain text")
    return out, f"{len(out):,} texts from {', '.join(transfer_sources)} ({dropped:,} dev examples left out)"


def extended(data, tables: dict, extra_texts: list[str], tokenizer, max_seq_len: int):
    """(task data, tables) with ``extra_texts`` appended to the training split as unlabelled rows (``labelled``
    False, label 0, index −1); the dev split unchanged."""
    import numpy as np
    import pyarrow as pa
    from ray.data.extensions import ArrowTensorArray  # Ray Data's fixed-shape tensor column: N×T numpy batches

    enc = tokenizer(extra_texts, truncation=True, max_length=max_seq_len, padding="max_length", return_token_type_ids=True)
    train = tables["train"]
    labels = np.zeros(len(extra_texts), dtype=np.float32 if data.spec.regression else np.int64)
    cols = {k: ArrowTensorArray.from_numpy(np.asarray(enc[k], dtype=np.int32))
            for k in ("input_ids", "attention_mask", "token_type_ids")}
    extra = pa.table({**cols, "labels": labels, "index": np.full(len(extra_texts), -1, dtype=np.int64),
                      "labelled": np.zeros(len(extra_texts), dtype=bool)}).cast(train.schema)
    examples = dataclasses.replace(data.train, texts=list(data.train.texts) + list(extra_texts),
                                   labels=list(data.train.labels) + labels.tolist(),
                                   pairs=(list(data.train.pairs) + [""] * len(extra_texts)) if data.train.pairs else None)
    return dataclasses.replace(data, train=examples), {"train": pa.concat_tables([train, extra]), "dev": tables["dev"]}


def _key(text: str) -> str:
    return " ".join(str(text).split()).lower()
