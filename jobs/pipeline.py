"""The whole pipeline in one job: prepare → teacher → distill → sweep → evaluate → register, then a summary.

Resubmitting the same command after a crash skips the stages that finished (same settings, checkpoints in
place), resumes the one that was running (a Ray Train run from its latest checkpoint, a sweep through
Tuner.restore) and goes on from there.
"""

import sys
import time

from pipeline import cli, stages


def _stage_names(parser):
    parser.add_argument("--skip-sweep", action="store_true", help="register the distill run's student only")


def main(argv=None) -> int:
    cfg, args = cli.parse(__doc__, argv, extra=_stage_names)

    def run():
        cli.start(cfg, with_ray=False, check_teacher=True)
        if cfg.evaluate.tasks:  # the downstream tasks' data, checked before hours of training
            stages.check_evaluation_tasks(cfg)
        cpus = cli.start_ray(cfg)
        times, t0 = {}, time.perf_counter()
        for name, fn in [("prepare", lambda: stages.prepare(cfg)),
                         ("teacher", lambda: stages.teacher(cfg, cluster_cpus=cpus)),
                         ("distill", lambda: stages.distill(cfg, cluster_cpus=cpus)),
                         ("sweep", None if args.skip_sweep else lambda: stages.sweep(cfg, cluster_cpus=cpus)),
                         # without evaluate.tasks the registry selects by a held-out MLM metric
                         ("evaluate", (lambda: stages.evaluate(cfg, cluster_cpus=cpus)) if cfg.evaluate.tasks else None),
                         ("register", lambda: stages.register(cfg))]:
            if fn is None:
                continue
            t = time.perf_counter()
            print(f"== {name} ==", flush=True)
            record = fn()
            times[name] = (time.perf_counter() - t, record.skipped)
        print(cli.summary(cfg, times, time.perf_counter() - t0))

    return cli.main_guard(run)


if __name__ == "__main__":
    sys.exit(main())
