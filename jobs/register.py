"""Stage 5: register the best student in the MLflow Model Registry (transformers flavor, alias champion)."""

import json
import sys

from pipeline import cli, stages


def main(argv=None) -> int:
    cfg, _ = cli.parse(__doc__, argv)

    def run():
        cli.start(cfg, with_ray=False)
        record = stages.register(cfg)
        print(json.dumps({"stage": "register", "uri": record["uri"], "version": record["version"], "new": record["new"]}))

    return cli.main_guard(run)


if __name__ == "__main__":
    sys.exit(main())
