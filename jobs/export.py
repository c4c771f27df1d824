"""Stage 8: ONNX Runtime variants of the registered student (export.formats: onnx, onnx-int8), each checked
against PyTorch and on the prepared validation split, then registered as <tracking.model_name>-onnx, a text-in
MLflow pyfunc that `mlflow models serve` serves; without flags, the same for every registered task model
(<tracking.model_name>-<task>-onnx, gated on its task's dev score).

Without flags: the version the register stage chose (else models:/<tracking.model_name>@<tracking.alias>).
  --model URI       a registered version, models:/<name>@<alias> or models:/<name>/<version>
  --model-dir DIR   an exported fill-mask folder
"""

import json
import sys

from pipeline import cli
from pipeline.stages import export


def _flags(parser):
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="a registered version: models:/<name>@<alias> or models:/<name>/<version>")
    source.add_argument("--model-dir", help="an exported fill-mask model folder")


def main(argv=None) -> int:
    cfg, args = cli.parse(__doc__, argv, extra=_flags, job="export")

    def run():
        for flag, value in (("--model", args.model), ("--model-dir", args.model_dir)):
            if value is not None and not value.strip():
                raise ValueError(f"{flag} is empty: give a value, or leave the flag out to export the registered student")
        if not cfg.export.formats:
            raise ValueError("export.formats is empty, so there is nothing to export: set it in the config or with "
                             "--set 'export.formats=[onnx, onnx-int8]'")
        cli.start(cfg, with_ray=False)
        record = export.run(cfg, model=args.model, model_dir=args.model_dir)
        print(json.dumps({"stage": "export", "source": record.source, "skipped": record.skipped,
                          "variants": [{k: v[k] for k in ("format", "passed", "mlm_acc_pct", "drop", "latency_ms")}
                                       | {"uri": (v["registered"] or {}).get("uri")} for v in record.variants],
                          "tasks": {t: [{"format": v["format"], "passed": v["passed"], "score": v["score"], "drop": v["drop"],
                                         "uri": (v["registered"] or {}).get("uri")} for v in x["variants"]]
                                    for t, x in record.tasks.items()}}))
        print(record.markdown)
        for x in record.tasks.values():
            print(x["markdown"])

    return cli.main_guard(run, cfg, job="export")


if __name__ == "__main__":
    sys.exit(main())
