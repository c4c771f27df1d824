"""The prepare stage's writer: a Ray Data datasink for the packed rows.

Runs in Ray Data write tasks: each one writes its train and validation rows as parquet shards under
``<out>/<split>/`` (local or S3) and returns its blocks' stats rows; the driver (prepare.py) adds those up
into the manifest, which it writes last.
"""

from __future__ import annotations

import os
import uuid

from ray.data import Datasink

from pipeline import storage

SPLITS = ("train", "val")  # the packed corpus's splits, one folder each (readers.tokenize_and_pack packs rows into them)
ROWS_PER_GROUP = 16_384  # parquet row group, in packed rows


class PackedSink(Datasink):
    """A Ray Data datasink for the packed rows: each write task writes its train and validation rows as parquet
    shards under ``<out>/<split>/`` and returns its stats rows, which the driver adds up into the manifest.

    So the stage is one streaming pass: the packed corpus never waits in the object store. Shard names are the
    attempt's id, the write task's index and a part number: a retried task overwrites its own shards, and
    ``data.rows_per_file`` caps a shard's rows.
    """

    def __init__(self, out: str, rows_per_file: int):
        self.out, self.rows_per_file = out, rows_per_file
        self.fs = storage.pyarrow_filesystem(out)  # built here: the tasks get the S3 endpoint and region with it
        self.attempt = uuid.uuid4().hex[:12]
        self.result: dict | None = None

    def get_name(self) -> str:
        """The operator's name in Ray Data's stats and logs."""
        return "WritePackedParquet"

    def write(self, blocks, ctx) -> dict:
        """In a Ray Data task: write this task's train/val rows as parquet shards (``rows_per_file`` rows each) and
        return {"stats": the blocks' stats payloads, "rows": rows written per split, "schema"}."""
        import pyarrow.compute as pc
        from ray.data.block import BlockAccessor

        shards = {split: _Shards(storage.join(self.out, split), f"{self.attempt}_{ctx.task_idx:06d}", self.rows_per_file, self.fs)
                  for split in SPLITS}
        payloads, schema = [], None
        for block in blocks:
            table = BlockAccessor.for_block(block).to_arrow()
            payloads += table.filter(pc.equal(table["split"], "stats"))["stats"].to_pylist()
            for split, shard in shards.items():
                rows = table.filter(pc.equal(table["split"], split)).select(["input_ids", "attention_mask"])
                if rows.num_rows:
                    shard.add(rows)
                    schema = rows.schema
        return {"stats": payloads, "rows": {split: shard.close() for split, shard in shards.items()}, "schema": schema}

    def on_write_complete(self, write_result) -> None:
        """On the driver, once every task wrote: sum the tasks' stats and row counts into ``self.result``."""
        returns = write_result.write_returns
        self.result = {"stats": [p for r in returns for p in r["stats"]],
                       "rows": {split: sum(r["rows"][split] for r in returns) for split in SPLITS}}
        schema = next((r["schema"] for r in returns if r["schema"] is not None), None)
        for split in SPLITS:  # an empty split still gets a (schema-only) shard, so that readers find one
            if self.result["rows"][split] == 0 and schema is not None:
                with _Shards(storage.join(self.out, split), f"{self.attempt}_empty", 1, self.fs) as shard:
                    shard.add(schema.empty_table(), force=True)


class _Shards:
    """Parquet shards ``<directory>/<prefix>_<part>.parquet`` of at most ``rows_per_file`` rows each, local or S3.
    A local shard is written under a dot-name and renamed when complete (readers skip dot-names)."""

    def __init__(self, directory: str, prefix: str, rows_per_file: int, fs):
        self.directory, self.prefix, self.rows_per_file, self.fs = directory, prefix, rows_per_file, fs
        self.part, self.rows, self.in_file, self.pending = 0, 0, 0, []
        self.writer = self.sink = self.path = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def add(self, table, force: bool = False) -> None:
        while table.num_rows or force:
            force = False
            if self.writer is None:
                self._open(table.schema)
            take = min(table.num_rows, self.rows_per_file - self.in_file)
            self.pending.append(table.slice(0, take))
            self.in_file += take
            self.rows += take
            table = table.slice(take)
            if sum(t.num_rows for t in self.pending) >= ROWS_PER_GROUP or self.in_file >= self.rows_per_file:
                self._flush()
            if self.in_file >= self.rows_per_file:
                self._finish()

    def close(self) -> int:
        if self.writer is not None:
            self._flush()
            self._finish()
        return self.rows

    def _open(self, schema) -> None:
        import pyarrow.parquet as pq

        name = f"{self.prefix}_{self.part:03d}.parquet"
        self.part += 1
        if self.fs is None:
            os.makedirs(self.directory, exist_ok=True)
            self.path = os.path.join(self.directory, name)
            self.sink = os.path.join(self.directory, f".{name}.tmp")
            self.writer = pq.ParquetWriter(self.sink, schema)
        else:
            self.path = None
            self.sink = self.fs.open_output_stream(storage.fs_path(storage.join(self.directory, name)))
            self.writer = pq.ParquetWriter(self.sink, schema)

    def _flush(self) -> None:
        import pyarrow as pa

        if self.pending:
            self.writer.write_table(pa.concat_tables(self.pending), row_group_size=ROWS_PER_GROUP)
            self.pending = []

    def _finish(self) -> None:
        self.writer.close()
        if self.path is None:
            self.sink.close()
        else:
            os.replace(self.sink, self.path)
        self.writer, self.in_file = None, 0
