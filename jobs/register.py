"""Stage 5: register a student in the MLflow Model Registry (transformers flavor, alias champion or challenger).

Without flags: the best candidate of the distill and sweep stages. By hand:
  --checkpoint URI   a run's final checkpoint (local or s3://): its hf_model/ and the metrics saved with it
  --model-dir DIR    an exported HF student directory (give its score with --metric)
  --metric K=V       a metric for the card and the champion comparison (repeatable; overrides the checkpoint's)
"""

import json
import sys

from pipeline import cli
from pipeline.stages import register


def _flags(parser):
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", help="a run's final checkpoint, local or s3://")
    source.add_argument("--model-dir", help="an exported HF student directory")
    parser.add_argument("--metric", action="append", default=[], metavar="K=V", help="e.g. --metric val/mlm_loss=6.2")


def main(argv=None) -> int:
    cfg, args = cli.parse(__doc__, argv, extra=_flags, job="register")

    def run():
        candidate = cli.hand_candidate(checkpoint=args.checkpoint, model_dir=args.model_dir, metric_pairs=args.metric,
                                       cfg=cfg)
        cli.start(cfg, with_ray=False)
        record = register.run(cfg, candidate=candidate)
        print(json.dumps({"stage": "register", "uri": record.uri, "version": record.version, "new": record.new,
                          "aliases": record.aliases}))

    return cli.main_guard(run, cfg, job="register")


if __name__ == "__main__":
    sys.exit(main())
