"""The sweep space's checks: each ``sweep.space`` entry on its own (:func:`space_entry_problems`), and the probe
values and samples that stand for everything the space can produce (:func:`probe_values`, :func:`probe_samples`).

pipeline/config/checks.py reports the entries' problems with the sweep section and judges each probe sample
as a whole trial config (``sweep_problems``); the sweep stage probes the data with the same samples.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

from pipeline.config.build import set_dotted
from pipeline.config.tree import RunConfig

# Sweeps may vary how the student trains; the corpus, the teacher and the run's plumbing are shared by every
# trial, so a sampled value there would be silently ignored or would break the shared prepared data.
SWEEPABLE_SECTIONS = ("loss", "optim", "masking", "student", "deepspeed", "eval", "checkpoint")
MAX_SWEEP_COMBINATIONS = 512


def space_entry_problems(key: Any, spec: Any, *, where: str = "sweep.space") -> list[str]:
    """The problems of one ``sweep.space`` entry (``key``: a dotted config name, ``spec``: {type, values|low|high}),
    one fix-it line each; [] when it is valid. pipeline/config/checks.py reports them with the sweep section.
    ``where``: the setting the entry belongs to, for the messages; another than sweep.space checks the entry's
    form only (its keys are the caller's to judge)."""
    if not isinstance(key, str):
        return [f"{where} key {key!r}: name a config setting, e.g. loss.temperature"]
    kinds = {"choice": ("values",), "grid": ("values",), "uniform": ("low", "high"), "loguniform": ("low", "high")}
    if not isinstance(spec, dict) or spec.get("type") not in kinds:
        return [f"{where}.{key}: give a mapping with type one of {sorted(kinds)}, e.g. {{type: choice, values: [1, 2]}}"]
    extra = sorted(set(spec) - {"type", *kinds[spec["type"]]})
    problems = [f"{where}.{key}: type {spec['type']} needs {k}" for k in kinds[spec["type"]] if k not in spec]
    if extra:
        problems.append(f"{where}.{key}: unknown field(s) {extra} for type {spec['type']}")
    if where != "sweep.space":
        return problems or _range_problems(key, spec, where)
    try:
        set_dotted(RunConfig().to_dict(), key, None)
    except ValueError as e:
        return [*problems, f"sweep.space.{key}: {e}"]
    section = key.split(".")[0]
    if section in ("compute", "scaling"):
        problems.append(f"sweep.space.{key}: {section}.* sets how fast a trial runs, not what it learns: set it for the "
                        f"whole sweep; sweep keys of {', '.join(SWEEPABLE_SECTIONS)}")
    elif section not in SWEEPABLE_SECTIONS:
        problems.append(f"sweep.space.{key}: the {section} section is shared by every trial (the prepared "
                        f"corpus, the teacher, the run's plumbing); sweep keys of {', '.join(SWEEPABLE_SECTIONS)}")
    return problems or _range_problems(key, spec, where)


def _range_problems(key: str, spec: dict, where: str) -> list[str]:
    if spec["type"] in ("choice", "grid"):
        if not isinstance(spec["values"], list) or not spec["values"]:
            return [f"{where}.{key}: values must be a non-empty list, e.g. [1.0, 2.0]"]
        return []
    low, high = spec["low"], spec["high"]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (low, high)):
        return [f"{where}.{key}: low and high must be finite numbers, got {low!r} and {high!r}"]
    if not low < high:
        return [f"{where}.{key}: low={low} must be < high={high}"]
    if spec["type"] == "loguniform" and low <= 0:
        return [f"{where}.{key}: loguniform needs low > 0, got {low}"]
    return []


def probe_values(spec: dict) -> list:
    """Values that stand for everything a space entry can produce: every choice, or both ends and the middle of
    a range (the middle catches a range over an integer setting, which Tune would sample as a float)."""
    if spec["type"] in ("choice", "grid"):
        return list(spec["values"])
    low, high = spec["low"], spec["high"]
    mid = math.sqrt(low * high) if spec["type"] == "loguniform" else (low + high) / 2
    return [float(low), mid, float(high)]


def probe_samples(cfg: RunConfig, space: dict | None = None):
    """Sampled overrides that stand for the space (``sweep.space``, or the ``space`` given): each key's probe values
    alone (the others at the config's values), then every combination of them up to MAX_SWEEP_COMBINATIONS."""
    space = cfg.sweep.space if space is None else space
    keys = list(space)
    for key in keys:
        for value in probe_values(space[key]):
            yield {key: value}
    if len(keys) > 1:
        combos = itertools.product(*(probe_values(space[k]) for k in keys))
        for combo in itertools.islice(combos, MAX_SWEEP_COMBINATIONS):
            yield dict(zip(keys, combo))
