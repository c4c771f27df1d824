"""Print masked training batches decoded, as rank 0 of the distill stage sees them; optionally write them out.

Chosen positions are marked [MASK:orig] (replaced by [MASK]), {orig→random} (a random token) and <orig>
(left unchanged but still predicted). Runs the prepare stage first if needed (a no-op when cached).

  --num-batches N     micro-batches to show (default 2)
  --rows R            rows of each batch to print (default 4)
  --out FILE.parquet  write input_ids, attention_mask and labels of every row, exactly as the worker gets them
"""

import json
import os
import sys

from pipeline import cli


def _flags(parser):
    parser.add_argument("--num-batches", type=int, default=2)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--out", help="a .parquet file to write the batches to")


def main(argv=None) -> int:
    cfg, args = cli.parse(__doc__, argv, extra=_flags, job="preview_batches")
    if args.num_batches < 1:
        print("error: --num-batches must be at least 1", file=sys.stderr)
        return 2
    if args.out and not args.out.endswith(".parquet"):
        print(f"error: --out {args.out}: give a path ending in .parquet", file=sys.stderr)
        return 2

    def run():
        cli.start(cfg, with_tracking=False)  # a read-only look: no MLflow run
        shown = cli.preview_batches(cfg, args.num_batches, args.rows)
        for b in shown:
            print(b["title"])
            print(b["text"])
        if args.out:
            import numpy as np
            import pyarrow as pa
            import pyarrow.parquet as pq

            cols = {k: np.concatenate([b["arrays"][k] for b in shown]) for k in ("input_ids", "attention_mask", "labels")}
            table = pa.table({k: pa.array(list(v)) for k, v in cols.items()})
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            pq.write_table(table, args.out)
            print(json.dumps({"out": args.out, "rows": table.num_rows, "columns": table.column_names}))

    return cli.main_guard(run, cfg, job="preview_batches")


if __name__ == "__main__":
    sys.exit(main())
