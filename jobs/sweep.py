"""Stage 4: sweep the temperature and the α weights with Ray Tune (each trial fits its own TorchTrainer)."""

import json
import sys

from pipeline import cli
from pipeline.stages import sweep, store


def main(argv=None) -> int:
    cfg, _ = cli.parse(__doc__, argv, job="sweep")

    def run():
        sweep.check(cfg)  # before Ray starts: a space and a grace period the sweep can run with
        store.require_inputs(cfg, "sweep")
        record = sweep.run(cfg, cluster_cpus=cli.start(cfg))
        print(json.dumps({"stage": "sweep", "trials": [{"overrides": c.overrides, "metrics": c.metrics}
                                                        for c in record.candidates]}))

    return cli.main_guard(run, cfg, job="sweep")


if __name__ == "__main__":
    sys.exit(main())
