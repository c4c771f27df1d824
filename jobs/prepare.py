"""Stage 1: read the corpus with Ray Data, tokenise, pack, and write parquet shards plus a manifest."""

import json
import sys

from pipeline import cli
from pipeline.stages import prepare


def main(argv=None) -> int:
    cfg, _ = cli.parse(__doc__, argv, job="prepare")

    def run():
        cli.start(cfg)
        record = prepare.run(cfg)
        m = record.manifest
        print(json.dumps({"stage": "prepare", "cached": m.cached, "path": m.path, "counts": m.counts,
                          "splits": {k: v.num_sequences for k, v in m.splits.items()}}))

    return cli.main_guard(run, cfg, job="prepare")


if __name__ == "__main__":
    sys.exit(main())
