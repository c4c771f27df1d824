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

from pipeline import batches, cli, models, stages


def _flags(parser):
    parser.add_argument("--num-batches", type=int, default=2)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--out", help="a .parquet file to write the batches to")


def main(argv=None) -> int:
    cfg, args = cli.parse(__doc__, argv, extra=_flags)
    if args.num_batches < 1:
        print("error: --num-batches must be at least 1", file=sys.stderr)
        return 2
    if args.out and not args.out.endswith(".parquet"):
        print(f"error: --out {args.out}: give a path ending in .parquet", file=sys.stderr)
        return 2

    def run():
        cli.start(cfg, with_tracking=False)  # a read-only look: no MLflow run
        manifest = stages.prepare_data(cfg)
        tokenizer = models.load_tokenizer(cfg.data.tokenizer, os.path.join(cfg.run.root, "cache"))
        train = stages.datasets(cfg, manifest)["train"]
        shown = list(batches.preview(cfg, manifest, train, tokenizer, args.num_batches))
        for i, b in enumerate(shown):
            print(f"--- micro-batch {i} (rank 0, step {i // cfg.optim.grad_accum}), digest {batches.digest(b['input_ids'], b['labels'])} ---")
            print(batches.render(b, tokenizer, args.rows))
        if args.out:
            import numpy as np
            import pyarrow as pa
            import pyarrow.parquet as pq

            cols = {k: np.concatenate([b[k] for b in shown]) for k in ("input_ids", "attention_mask", "labels")}
            table = pa.table({k: pa.array(list(v)) for k, v in cols.items()})
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            pq.write_table(table, args.out)
            print(json.dumps({"out": args.out, "rows": table.num_rows, "columns": table.column_names}))

    return cli.main_guard(run)


if __name__ == "__main__":
    sys.exit(main())
