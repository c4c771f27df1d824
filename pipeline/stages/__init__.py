"""The stages, one module each, in the order ``jobs.pipeline`` runs them (:data:`ORDER`).

Each stage module has ``run(cfg, ...)``: it opens its own MLflow run, does its work (on Ray where it trains or
evaluates) and writes a small typed record (pipeline/records.py) under ``<run.root>/<run.name>/stages/``; the
next stage reads the records it depends on. What they share:

- ``store.py``: the records on disk (where, read, required inputs) and the resubmit skip: a stage that already
  finished with the same settings on the same prepared corpus, its checkpoints still in place, is skipped, so a
  job resubmitted after a crash redoes only the unfinished work and opens no second MLflow run for the rest.
- ``training.py``: what the training stages share: a Ray Train run's name carries a hash of the settings that
  shape it (the same config resumes that run from its latest checkpoint, a changed one starts a new run), the
  loaded corpus, one TorchTrainer fit inside the stage's MLflow run, and the lineage tags.

A new stage is a new module here with ``run(cfg, ...)``, a job in jobs/, its record in pipeline/records.py and
:data:`store.RECORDS`, and its place in :data:`ORDER`.
"""

# The stages jobs.pipeline runs, in order (sweep, evaluate, task_distill and export only when configured).
ORDER = ("prepare", "teacher", "distill", "sweep", "evaluate", "register", "task_distill", "export")
