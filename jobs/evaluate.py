"""Stage 5: fine-tune the teacher and the students on downstream tasks (evaluate.tasks); the paper's Tables 1 and 3.

Without flags: the teacher and the candidates of the distill and sweep stages. One model by hand (the teacher too,
when the teacher stage ran):
  --model models:/NAME@ALIAS   a registered model (or models:/NAME/VERSION)
  --checkpoint URI             a run's final checkpoint (local or s3://): its hf_model/
  --model-dir DIR              an exported Hugging Face folder
"""

import json
import sys

from pipeline import cli
from pipeline.stages import evaluate


def _flags(parser):
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="a registered model, models:/<name>@<alias>")
    source.add_argument("--checkpoint", help="a run's final checkpoint, local or s3://")
    source.add_argument("--model-dir", help="an exported Hugging Face model folder")


def main(argv=None) -> int:
    cfg, args = cli.parse(__doc__, argv, extra=_flags, job="evaluate")

    def run():
        cli.start(cfg, with_ray=False)  # the models and the tasks' data are checked before Ray starts
        given = cli.given_model(cfg, model=args.model, checkpoint=args.checkpoint, model_dir=args.model_dir)
        plan = evaluate.make_plan(cfg, model=given)
        record = evaluate.run(cfg, cluster_cpus=cli.start_ray(cfg), plan=plan)
        print(record.markdown)
        print(json.dumps({"stage": "evaluate", "models": [m["key"] for m in record.models],
                          "macro": {r["model"]: r["macro"] for r in record.table1["rows"]}}))

    return cli.main_guard(run, cfg, job="evaluate")


if __name__ == "__main__":
    sys.exit(main())
