"""The whole pipeline in one job: prepare → teacher → distill → sweep → evaluate → register → task_distill → export,
then a summary.

Resubmitting the same command after a crash skips the stages that finished (same settings, checkpoints in
place), resumes the one that was running (a Ray Train run from its latest checkpoint, a sweep through
Tuner.restore) and goes on from there.
"""

import sys
import time

from pipeline import cli
from pipeline.stages import ORDER, distill, evaluate, export, prepare, register, sweep, task_distill, teacher


def _stage_names(parser):
    parser.add_argument("--skip-sweep", action="store_true", help="register the distill run's student only")


def main(argv=None) -> int:
    cfg, args = cli.parse(__doc__, argv, extra=_stage_names, job="pipeline")

    def run():
        cli.start(cfg, with_ray=False, check_teacher=True)
        if cfg.evaluate.tasks:  # the downstream tasks' data, checked before hours of training
            evaluate.check_tasks(cfg)
        if cfg.task_distill.tasks:  # the same for task distillation's tasks and the teachers it names
            task_distill.check(cfg)
        if not args.skip_sweep:  # a space and a grace period the sweep can run with, before the stages ahead of it
            sweep.check(cfg)
        cpus = cli.start_ray(cfg)
        cli.check_cluster(cfg, cpus, sweep=not args.skip_sweep, evaluate=bool(cfg.evaluate.tasks or cfg.task_distill.tasks))
        # None: not run (no sweep with --skip-sweep; without evaluate.tasks the registry selects by a held-out MLM metric)
        runs = {"prepare": lambda: prepare.run(cfg),
                "teacher": lambda: teacher.run(cfg, cluster_cpus=cpus),
                "distill": lambda: distill.run(cfg, cluster_cpus=cpus),
                "sweep": None if args.skip_sweep else lambda: sweep.run(cfg, cluster_cpus=cpus),
                "evaluate": (lambda: evaluate.run(cfg, cluster_cpus=cpus)) if cfg.evaluate.tasks else None,
                "register": lambda: register.run(cfg),
                "task_distill": (lambda: task_distill.run(cfg, cluster_cpus=cpus)) if cfg.task_distill.tasks else None,
                "export": (lambda: export.run(cfg)) if cfg.export.formats else None}
        times, t0 = {}, time.perf_counter()
        for name in ORDER:
            if runs[name] is None:
                continue
            t = time.perf_counter()
            print(f"== {name} ==", flush=True)
            record = runs[name]()
            times[name] = (time.perf_counter() - t, record.skipped)
        print(cli.summary(cfg, times, time.perf_counter() - t0))

    return cli.main_guard(run, cfg, job="pipeline")


if __name__ == "__main__":
    sys.exit(main())
