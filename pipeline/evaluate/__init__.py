"""The evaluate stage: the teacher and the students on downstream tasks, the paper's Tables 1 and 3.

The stage itself is pipeline/stages/evaluate.py, and what ``evaluate.tasks`` names is parsed by
pipeline/config/tasks.py. Here: ``loaders`` (train/dev examples from GLUE, packages, any dataset), ``delimited``
(TSV and CSV files row by row, rows that cannot be read whole set aside), ``report`` (Tables 1 and 3, plots; the
scores are pipeline/glue_metrics.py's), and, on Ray, ``units`` (one fine-tuning Ray Train run, or one probe task,
per unit; the fine-tuning itself is the loop's ``finetune`` task, pipeline/train/tasks/finetune.py).
"""
