"""Stage 3: distil the teacher into a half-depth DistilBERT student (Ray Train + DeepSpeed ZeRO)."""

import json
import sys

from pipeline import cli
from pipeline.stages import distill, store


def main(argv=None) -> int:
    cfg, _ = cli.parse(__doc__, argv, job="distill")

    def run():
        store.require_inputs(cfg, "distill")  # before Ray starts
        record = distill.run(cfg, cluster_cpus=cli.start(cfg))
        (c,) = record.candidates
        print(json.dumps({"stage": "distill", "checkpoint": c.checkpoint, "metrics": c.metrics}))

    return cli.main_guard(run, cfg, job="distill")


if __name__ == "__main__":
    sys.exit(main())
