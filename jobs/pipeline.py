"""The whole pipeline in one job: prepare → teacher → distill → sweep → register, then a summary.

Resubmitting the same command after a crash skips the stages that finished (same settings, checkpoints in
place), resumes the one that was running (a Ray Train run from its latest checkpoint, a sweep through
Tuner.restore) and goes on from there.
"""

import sys
import time

from pipeline import cli, runtime, stages, tracking


def _stage_names(parser):
    parser.add_argument("--skip-sweep", action="store_true", help="register the distill run's student only")


def main(argv=None) -> int:
    cfg, args = cli.parse(__doc__, argv, extra=_stage_names)

    def run():
        cpus = cli.start(cfg)
        times, t0 = {}, time.perf_counter()
        for name, fn in [("prepare", lambda: stages.prepare(cfg)),
                         ("teacher", lambda: stages.teacher(cfg, cluster_cpus=cpus)),
                         ("distill", lambda: stages.distill(cfg, cluster_cpus=cpus)),
                         ("sweep", None if args.skip_sweep else lambda: stages.sweep(cfg, cluster_cpus=cpus)),
                         ("register", lambda: stages.register(cfg))]:
            if fn is None:
                continue
            t = time.perf_counter()
            print(f"== {name} ==", flush=True)
            record = fn()
            times[name] = (time.perf_counter() - t, bool(record.get("skipped")))
        print(summary(cfg, times, time.perf_counter() - t0))

    return cli.main_guard(run)


def summary(cfg, times: dict, total_s: float) -> str:
    reg = stages.read_record(cfg, "register", needed_by="summary")
    teacher = stages.read_record(cfg, "teacher", needed_by="summary")
    lines = ["", "distil: pipeline finished", "  stage times:"]
    lines += [f"    {k:<9} {s:7.1f} s" + ("  (finished earlier: skipped)" if skipped else "") for k, (s, skipped) in times.items()]
    lines.append(f"    {'total':<9} {total_s:7.1f} s")
    lines.append(f"  teacher:  {teacher['teacher_uri']}")
    for k in ("val/mlm_loss", "val/mlm_acc", "val/perplexity"):
        if k in teacher["metrics"]:
            lines.append(f"    teacher {k} = {teacher['metrics'][k]:.4f}")
    chosen = reg["chosen"]
    lines.append(f"  chosen student: {chosen['source']}")
    for k in ("val/mlm_loss", "val/mlm_acc", "val/teacher_agreement", "val/perplexity", "loss/total"):
        if k in chosen["metrics"]:
            lines.append(f"    student {k} = {chosen['metrics'][k]:.4f}")
    uri = tracking.tracking_uri(cfg.run.root)
    lines += [
        f"  registered model: {reg['uri']}  (version {reg['version']})",
        f"    load it: mlflow.transformers.load_model('{reg['uri']}')  with MLFLOW_TRACKING_URI={uri}",
        f"  MLflow UI:      .venv/bin/mlflow ui --backend-store-uri {uri} --port 5000   → http://127.0.0.1:5000",
        f"  Ray dashboard:  {runtime.dashboard_url()} (while this Ray runs; `ray start --head` keeps one up)",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
