"""Stage 7: a small, fast model for each of the user's own tasks (task_distill.tasks): the student fine-tuned with a
second distillation step from a fine-tuned teacher classifier (Sanh et al. 2019, Table 2), beside the same student
fine-tuned alone; Table 2 per task; the best task-distilled student registered as <tracking.model_name>-<task>.

Without flags: each task's teacher as its entry names it (teacher: …), else the pipeline's teacher fine-tuned on
the task here; the student starts from the registered general student (task_distill.student).
  --teacher URI   a fine-tuned classifier (folder, hub id, s3://, models:/…) as the teacher of every task
  --student URI   the general student to start from (folder, hub id, s3://, models:/…, or teacher-layers)
"""

import json
import sys

from pipeline import cli
from pipeline.stages import task_distill


def _flags(parser):
    parser.add_argument("--teacher", help="a fine-tuned classifier: the teacher of every task")
    parser.add_argument("--student", help="the general student every task's student starts from")


def with_flags(cfg, teacher: str | None, student: str | None):
    """The config with --teacher set on every task entry and --student as task_distill.student."""
    for flag, value in (("--teacher", teacher), ("--student", student)):
        if value is not None and not value.strip():
            raise ValueError(f"{flag} is empty: give a value, or leave the flag out")
    overrides = {}
    if teacher is not None:
        overrides["task_distill.tasks"] = [{**(e if isinstance(e, dict) else {"task": e}), "teacher": teacher.strip()}
                                           for e in cfg.task_distill.tasks]
    if student is not None:
        overrides["task_distill.student"] = student.strip()
    return cfg.with_overrides(overrides) if overrides else cfg


def main(argv=None) -> int:
    cfg, args = cli.parse(__doc__, argv, extra=_flags, job="distill_task")

    def run():
        run_cfg = with_flags(cfg, args.teacher, args.student)
        cli.start(run_cfg, with_ray=False)  # the tasks, the student and the teachers are checked before Ray starts
        plan = task_distill.make_plan(run_cfg)
        record = task_distill.run(run_cfg, cluster_cpus=cli.start_ray(run_cfg), plan=plan)
        print(record.markdown)
        print(json.dumps({"stage": "task_distill", "skipped": record.skipped,
                          "registered": {t: ((v.get("registered") or {}).get("student") or {}).get("uri")
                                         for t, v in record.tasks.items()}}))

    return cli.main_guard(run, cfg, job="distill_task")


if __name__ == "__main__":
    sys.exit(main())
