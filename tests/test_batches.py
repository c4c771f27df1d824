"""Equal steps per rank: exact batch sizes over Train's equal-row shards (ray-project/ray#66085)."""

import numpy as np

from pipeline.batches import epoch_batches, exact_batches


def _rows(start, n, t=4):
    ids = np.arange(start, start + n, dtype=np.int32)[:, None].repeat(t, 1)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids, dtype=np.int8)}


def test_exact_batches_rechunks_short_batches_without_losing_or_reordering_rows():
    sizes = [8, 6, 8, 2, 5, 8, 8, 3]
    starts = np.cumsum([0] + sizes[:-1])
    out = list(exact_batches((_rows(s, n) for s, n in zip(starts, sizes)), 8))
    assert [len(b["input_ids"]) for b in out] == [8] * (sum(sizes) // 8)
    flat = np.concatenate([b["input_ids"][:, 0] for b in out])
    assert flat.tolist() == list(range(len(flat))), "rows keep their order; only the final remainder is dropped"


class _Recording:
    """A DataIterator that remembers the batch sizes Ray Data handed out."""

    def __init__(self, it):
        self.it, self.sizes = it, []

    def iter_batches(self, **kw):
        for b in self.it.iter_batches(**kw):
            self.sizes.append(len(b["input_ids"]))
            yield b


def test_two_ranks_on_uneven_shards_take_the_same_number_of_steps(ray_session):
    """Blocks of very different sizes, split as Ray Train splits them, iterated through a local shuffle buffer."""
    import threading

    import ray.data

    sizes = [300, 7, 61, 1, 150, 33, 9, 97]
    starts = np.cumsum([0] + sizes[:-1])
    ds = ray.data.from_numpy([_rows(s, n)["input_ids"] for s, n in zip(starts, sizes)]).rename_columns({"data": "input_ids"})
    ds = ds.map_batches(lambda b: {**b, "attention_mask": np.ones_like(b["input_ids"], dtype=np.int8)}, batch_size=None)
    shards = ds.streaming_split(2, equal=True)
    recorders = [_Recording(s) for s in shards]
    steps = {}

    def consume(rank):
        steps[rank] = sum(1 for _ in epoch_batches(recorders[rank], 16, shuffle_rows=40, shuffle_seed=0))

    threads = [threading.Thread(target=consume, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    rows = [sum(r.sizes) for r in recorders]
    assert rows[0] == rows[1] == sum(sizes) // 2, "Train's split gives every rank the same number of rows"
    assert steps[0] == steps[1] == rows[0] // 16, ([r.sizes for r in recorders], steps)


def test_a_streamed_corpus_needs_a_cpu_for_its_read_tasks():
    """Train workers holding every CPU would starve Ray Data's read tasks: a hang, caught at the edge instead."""
    import pytest

    from pipeline.config import RunConfig
    from pipeline.train.driver import check_fits

    cfg = RunConfig.from_dict({"scaling": {"num_workers": 2, "cpus_per_worker": 1.0}})
    check_fits(cfg, 2.0)  # in-memory corpus: no read tasks during training
    check_fits(cfg, 3.0, streamed=True)
    with pytest.raises(ValueError, match="streams from parquet, and Ray Data's read tasks need a CPU"):
        check_fits(cfg, 2.0, streamed=True)
    with pytest.raises(ValueError, match="the run needs 2 CPUs"):
        check_fits(cfg, 1.0, streamed=True)
