"""Training on Ray Train: the driver side and the worker side kept apart.

- ``driver.py`` runs on the driver (a stage or a sweep trial): checks, the WorkerConfig, build and fit a
  TorchTrainer.
- ``worker.py`` runs in every Ray Train worker: the one loop (engine, data position, RNG, checkpoints, numerics,
  timing, progress, reports).
- ``tasks.py`` says what is trained: teacher MLM pre-training, distillation (the method's math is in
  pipeline/step.py and pipeline/losses.py).
- ``numerics.py`` and ``timing.py`` are the loop's NaN/overflow guard and its timers.
"""
