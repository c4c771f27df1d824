"""Stage 5: register a student in the MLflow Model Registry (transformers flavor, alias champion or challenger).

Without flags: the best candidate of the distill and sweep stages. By hand:
  --checkpoint URI   a run's final checkpoint (local or s3://): its hf_model/ and the metrics saved with it
  --model-dir DIR    an exported HF student directory (give its score with --metric)
  --metric K=V       a metric for the card and the champion comparison (repeatable; overrides the checkpoint's)
"""

import json
import os
import sys

from pipeline import checkpoint, cli, stages, storage


def _flags(parser):
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", help="a run's final checkpoint, local or s3://")
    source.add_argument("--model-dir", help="an exported HF student directory")
    parser.add_argument("--metric", action="append", default=[], metavar="K=V", help="e.g. --metric val/mlm_loss=6.2")


def _metrics(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        try:
            out[key] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise ValueError(f"--metric {pair!r}: write it as name=number, e.g. --metric val/mlm_loss=6.2")
    return out


def hand_candidate(args) -> dict | None:
    if args.checkpoint:
        if not storage.is_s3(args.checkpoint) and not os.path.isdir(args.checkpoint):
            raise ValueError(f"--checkpoint {args.checkpoint}: no such directory")
        import pyarrow.fs

        fs = storage.pyarrow_filesystem(args.checkpoint) or pyarrow.fs.LocalFileSystem()
        reason = checkpoint.stored_reason(fs, storage.fs_path(args.checkpoint))
        if reason:
            raise ValueError(f"--checkpoint {args.checkpoint} is damaged or incomplete ({reason}): register an earlier one")
        saved = storage.read_json(storage.join(args.checkpoint, checkpoint.METRICS_FILE))
        return {"source": "hand:checkpoint", "checkpoint": args.checkpoint,
                "metrics": {**(saved or {}), **_metrics(args.metric)}}
    if args.model_dir:
        if not os.path.exists(os.path.join(args.model_dir, "config.json")):
            raise ValueError(f"--model-dir {args.model_dir}: not an exported HF model directory (no config.json)")
        path = os.path.abspath(args.model_dir)
        return {"source": "hand:model_dir", "checkpoint": path, "model_dir": path, "metrics": _metrics(args.metric)}
    if args.metric:
        raise ValueError("--metric goes with --checkpoint or --model-dir")
    return None


def main(argv=None) -> int:
    cfg, args = cli.parse(__doc__, argv, extra=_flags)

    def run():
        candidate = hand_candidate(args)
        cli.start(cfg, with_ray=False)
        record = stages.register(cfg, candidate=candidate)
        print(json.dumps({"stage": "register", "uri": record["uri"], "version": record["version"], "new": record["new"],
                          "aliases": record["aliases"]}))

    return cli.main_guard(run)


if __name__ == "__main__":
    sys.exit(main())
