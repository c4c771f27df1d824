"""Training on Ray Train: the driver side and the worker side kept apart.

- ``driver.py`` runs on the driver (a stage, a sweep trial or an evaluate unit): checks, the WorkerConfig, build
  and fit a TorchTrainer.
- ``sweep.py`` runs a sweep on the driver: Ray Tune over ``sweep.space`` with ASHA, one TorchTrainer per trial.
- ``worker.py`` runs in every Ray Train worker: the one loop (engine, data position, RNG, checkpoints, numerics,
  timing, progress, reports, held-out validation).
- ``tasks/`` says what is trained: teacher MLM pre-training, distillation, downstream fine-tuning (the method's
  math is in pipeline/step.py and pipeline/losses.py).
- ``numerics.py`` and ``timing.py`` are the loop's NaN/overflow guard and its timers.
"""
