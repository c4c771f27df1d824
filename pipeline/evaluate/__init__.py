"""The evaluate stage: the teacher and the students on downstream tasks, the paper's Tables 1 and 3.

Driver side: ``specs`` (what ``evaluate.tasks`` names), ``loaders`` (train/dev examples from GLUE, packages, any
dataset), ``stage`` (load, run the units, build and log the tables), ``report`` (Tables 1 and 3, plots),
``metrics`` (GLUE's metrics). On Ray: ``units`` (one fine-tuning Ray Train run, or one probe task, per unit; the
fine-tuning itself is the loop's ``finetune`` task, pipeline/train/tasks/finetune.py).
"""
