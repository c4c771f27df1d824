"""The task distillation loss's settings (``task_distill.space``: T, α_kd, α_ce, α_cos) searched per task in the
sweep stage's grammar (pipeline/train/sweep.py: the same space entries, checked by the same rules, turned into Ray
Tune's samplers by ``search_space``), drawn as Tune's basic variant generator does (grid points × ``num_samples``).

Each point is one task-distillation unit of the stage (pipeline/evaluate/units.py) on the task's first seed: the
evaluate stage's unit runner runs them as many at once as fit, each with its own result file, so a search cut
short reruns only its unfinished points. (Ray Tune's own trial runner is not used here: a Tune trial that drives a
TorchTrainer after the sweep stage's Tuner ran in the same job never got its workers.) The students of Table 2
then train with the best point by dev score. The choice is made on the dev set that Table 2 reports, as the
paper's grid searches on GLUE's dev sets are (Sanh et al. 2019 §4.1): the first seed's score of the chosen point is
the best of the tries, not a held-out estimate. The search's outcome is a small JSON file, so a resubmitted stage
does not search again.
"""

from __future__ import annotations

import dataclasses
import itertools
import os

from pipeline import storage
from pipeline.config import RunConfig
from pipeline.evaluate import units
from pipeline.train import sweep

PREFIX = "task_distill."


def search(cfg: RunConfig, unit: units.Unit, tables: dict, data: dict, *, cluster_cpus: float, out_dir: str) -> dict:
    """Search ``task_distill.space`` for ``unit`` (a task-distillation unit; its seed, table and extra settings are
    the trials'): the points :func:`points` draws, each one unit of ``units.run_finetune``, as many at once as fit.
    Returns {"task", "seed", "trials": [{"settings", "score", "trial"}] best first, "best": the best trial's
    settings ({"temperature": …})}. A search finished earlier (its result file in ``out_dir``) is read, not rerun;
    one cut short reruns only its unfinished trials (their own result files)."""
    path = os.path.join(out_dir, f"{unit.name}.json")
    if (found := _read(path)) is not None:
        return found
    chosen = points(cfg.task_distill.space, cfg.task_distill.num_samples, seed=unit.seed)
    trials = [dataclasses.replace(unit, name=f"{unit.name}-{i}", extra={**unit.extra, **point, "keep": False})
              for i, point in enumerate(chosen)]
    print(f"[distil] task_distill: searching the loss settings on {unit.task}: {len(trials)} points", flush=True)
    results = units.run_finetune(cfg, trials, tables, data, cluster_cpus=cluster_cpus, out_dir=out_dir,
                                 stage="task_distill search")
    out = [{"settings": point, "score": float(r["scores"].get("score", float("nan"))), "trial": i}
           for i, (point, r) in enumerate(zip(chosen, results))]
    out.sort(key=lambda t: -t["score"] if t["score"] == t["score"] else float("inf"))  # NaN last
    found = {"task": unit.task, "seed": unit.seed, "trials": out, "best": out[0]["settings"]}
    storage.write_json(path, found)
    return found


def points(space: dict, num_samples: int, *, seed: int) -> list[dict]:
    """The settings to try, as Ray Tune's basic variant generator draws them from the sweep grammar
    (pipeline/train/sweep.py ``search_space``): every combination of the grid entries, ``num_samples`` times, the
    other entries sampled each time by Tune's samplers with a generator seeded by ``seed``. [{"temperature": …}]."""
    import numpy as np

    tune_space = sweep.search_space(space)
    keys = list(tune_space)
    grid = [k for k in keys if isinstance(tune_space[k], dict) and "grid_search" in tune_space[k]]
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(num_samples):
        for combo in itertools.product(*(tune_space[k]["grid_search"] for k in grid)):
            point = dict(zip(grid, combo))
            for k in keys:
                if k not in point:
                    point[k] = tune_space[k].sample(random_state=rng)
            out.append({k.replace(sweep.KEY_SEP, ".").removeprefix(PREFIX): _plain(point[k]) for k in keys})
    return out


def _plain(value):
    """A sampled value as a plain Python number (Tune's samplers answer numpy scalars)."""
    return value.item() if hasattr(value, "item") else value


def settings(sample: dict) -> dict:
    """A trial's sampled point as the loss settings it sets (``{"temperature": 4.0}``)."""
    return {k.removeprefix(PREFIX): v for k, v in sweep.overrides_from_sample(sample).items()}


def markdown(task: str, found: dict) -> str:
    """The search's trials as a markdown table, best first."""
    keys = sorted({k for t in found["trials"] for k in t["settings"]})
    lines = [f"Loss settings searched on {task} (seed {found['seed']}, {len(found['trials'])} points, by dev score; "
             "the students above use the best):", "", "| " + " | ".join(keys) + " | dev score |",
             "|" + "---|" * (len(keys) + 1)]
    lines += ["| " + " | ".join(f"{t['settings'][k]:g}" for k in keys) + f" | {t['score']:.4f} |" for t in found["trials"]]
    return "\n".join(lines) + "\n"


def _read(path: str) -> dict | None:
    """A finished search's result file, or None (none yet, or a damaged one: the search runs again)."""
    try:
        return storage.read_json(path)
    except storage.DamagedFile:
        return None
