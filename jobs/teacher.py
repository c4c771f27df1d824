"""Stage 2: pre-train the offline BERT teacher with MLM, or check a pretrained one (hub id, dir, s3://)."""

import json
import sys

from pipeline import cli
from pipeline.stages import teacher, store


def main(argv=None) -> int:
    cfg, _ = cli.parse(__doc__, argv, job="teacher")

    def run():
        store.require_inputs(cfg, "teacher")  # before Ray starts
        record = teacher.run(cfg, cluster_cpus=cli.start(cfg))
        print(json.dumps({"stage": "teacher", "teacher_uri": record.teacher_uri, "metrics": record.metrics}))

    return cli.main_guard(run, cfg, job="teacher")


if __name__ == "__main__":
    sys.exit(main())
