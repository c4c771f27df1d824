"""Train-time loading of a prepared corpus (driver): the manifest's splits as Ray Data datasets for Ray Train.

A corpus small enough (``data.materialize_max_gib``) is read once into the object store and replicated to every
rank; a larger one streams from its parquet shards (see :func:`load_splits`).
"""

from __future__ import annotations

from pipeline import storage
from pipeline.corpus import data_context
from pipeline.corpus.sink import SPLITS
from pipeline.records import Manifest


def fits_in_memory(manifest: Manifest, split: str, max_gib: float) -> bool:
    """Whether a split's packed rows (int32 ids + int8 mask: 5 bytes a token) take at most ``max_gib`` GiB."""
    num_bytes = manifest.rows(split) * manifest.max_seq_len * 5
    return num_bytes <= max_gib * 2**30


def load_splits(manifest: Manifest, *, materialize_max_gib: float, val_rows: int | None = None):
    """The train and validation datasets for Ray Train.

    A corpus whose packed rows fit in ``materialize_max_gib`` is read once by the driver into the object
    store (no read tasks, whose worker processes cost seconds each to start), so every trainer and sweep
    trial of this driver iterates it at once; a larger one streams from the parquet shards. A validation split
    too large to hold is cut to its first ``val_rows`` rows (what the evaluation reads), read by the driver:
    otherwise every rank would start its own read of the whole split for a few batches.
    """
    # No progress bars: the datasets keep the option after the block (data_context.py).
    with data_context.scoped(enable_progress_bars=False):
        return {split: _load_split(manifest, split, materialize_max_gib, val_rows) for split in SPLITS}


def _load_split(manifest: Manifest, split: str, materialize_max_gib: float, val_rows: int | None):
    """One split as a dataset: held in memory (a large validation split: its first ``val_rows`` rows) or streamed."""
    import pyarrow.dataset as pads
    import ray.data

    path = manifest.splits[split].path
    fs = storage.pyarrow_filesystem(path)
    local = path[len("s3://") :] if fs else path
    if fits_in_memory(manifest, split, materialize_max_gib):
        table = pads.dataset(local, format="parquet", filesystem=fs).to_table()
    elif split == "val" and val_rows:
        table = pads.dataset(local, format="parquet", filesystem=fs).head(val_rows)
    else:
        return ray.data.read_parquet(path, filesystem=fs)
    rows_per_block = max(1024, -(-table.num_rows // 16))
    return ray.data.from_arrow([table.slice(i, rows_per_block) for i in range(0, max(table.num_rows, 1), rows_per_block)])
