"""What each entry of ``evaluate.tasks`` names (the downstream tasks), parsed and checked at load time.

An entry of ``evaluate.tasks`` is one of
- ``glue:<task>``: one of the nine GLUE tasks (Wang et al. 2019), read from the Hub (``nyu-mll/glue``) or, when
  ``evaluate.glue_dir`` is set, from a folder in GLUE's original layout (``<glue_dir>/MRPC/train.tsv``, …);
  ``glue:mnli`` is MNLI matched, ``glue:mnli-mm`` mismatched (the same training set);
- ``package:rotten_tomatoes`` (fresh/rotten reviews, the SST-2 family) or ``package:bbc_news`` (5 topics),
  offline from installed packages;
- a mapping ``{name, source | train_file + dev_file, text_field, text_pair_field, label_field, train_split,
  dev_split, kind, metrics, epochs, lr, batch_size, max_seq_len}``: any ``datasets.load_dataset`` name, a
  ``save_to_disk`` folder, or csv, jsonl or parquet files;
- a named task with its own recipe: ``{task: glue:rte, epochs: 5, lr: 3e-5}`` (keys: epochs, lr, batch_size,
  max_seq_len).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

from pipeline.config.metrics import TASK_METRICS


@dataclass(frozen=True, kw_only=True)
class TaskSpec:
    """One downstream task: where its examples are and how it is scored."""

    name: str  # the task's name in metrics: eval/<name>/score
    source: str = ""  # "glue", "package:<name>", a load_dataset name, a save_to_disk folder ("" with files)
    glue: str = ""  # the GLUE config (nyu-mll/glue) for source "glue"
    train_file: str = ""  # csv, jsonl/json or parquet (with dev_file, instead of source)
    dev_file: str = ""
    text_field: str = "text"
    text_pair_field: str = ""  # "" for a single-sentence task
    label_field: str = "label"
    train_split: str = "train"
    dev_split: str = "validation"
    kind: str = "classification"  # classification | regression (num_labels=1, MSE; STS-B)
    metrics: tuple[str, ...] = ("accuracy",)
    epochs: float = 0.0  # 0: evaluate.epochs (HF's run_glue: 3; 5 for MRPC and WNLI)
    lr: float = 0.0  # 0: evaluate.lr
    batch_size: float = 0.0  # examples per micro-batch; 0: evaluate.batch_size
    max_seq_len: float = 0.0  # tokens per example; 0: evaluate.max_seq_len
    label_names: tuple[str, ...] = ()  # class names in id order, for text labels (GLUE's TSVs)

    @property
    def regression(self) -> bool:
        """Whether the label is a number to predict (``num_labels=1``, MSE), as STS-B's similarity."""
        return self.kind == "regression"


def _glue(name, glue, text, pair, metrics=("accuracy",), *, labels=(), dev="validation", kind="classification", epochs=0.0):
    return TaskSpec(name=name, source="glue", glue=glue, text_field=text, text_pair_field=pair, metrics=metrics,
                    label_names=labels, dev_split=dev, kind=kind, epochs=epochs)


NLI = ("entailment", "not_entailment")
MNLI = ("entailment", "neutral", "contradiction")
GLUE: dict[str, TaskSpec] = {s.name: s for s in [
    _glue("cola", "cola", "sentence", "", ("mcc",)),
    _glue("sst2", "sst2", "sentence", ""),
    _glue("mrpc", "mrpc", "sentence1", "sentence2", ("f1", "accuracy"), epochs=5.0),
    _glue("stsb", "stsb", "sentence1", "sentence2", ("pearson", "spearman"), kind="regression"),
    _glue("qqp", "qqp", "question1", "question2", ("f1", "accuracy")),
    _glue("mnli", "mnli", "premise", "hypothesis", labels=MNLI, dev="validation_matched"),
    _glue("mnli-mm", "mnli", "premise", "hypothesis", labels=MNLI, dev="validation_mismatched"),
    _glue("qnli", "qnli", "question", "sentence", labels=NLI),
    _glue("rte", "rte", "sentence1", "sentence2", labels=NLI),
    _glue("wnli", "wnli", "sentence1", "sentence2", epochs=5.0),
]}
ALIASES = {"sst-2": "sst2", "sts-b": "stsb", "mnli-m": "mnli", "mnli_matched": "mnli", "mnli_mismatched": "mnli-mm"}
PACKAGED: dict[str, TaskSpec] = {
    "rotten_tomatoes": TaskSpec(name="rotten_tomatoes", source="package:rotten_tomatoes", label_names=("rotten", "fresh")),
    "bbc_news": TaskSpec(name="bbc_news", source="package:bbc_news",
                         label_names=("business", "entertainment", "politics", "sports", "tech")),  # the folders
}
KINDS = ("classification", "regression")
# evaluate.skip_bad_rows: the splits whose rows that cannot be read whole (pipeline/evaluate/loaders.py) are left
# out, counted; in the other splits such rows are refused
SKIP_BAD_ROWS: dict[str, tuple[str, ...]] = {"none": (), "train": ("train",), "all": ("train", "dev")}
FIELDS = {f.name for f in dataclasses.fields(TaskSpec)}
USER_FIELDS = FIELDS - {"glue"}  # what a mapping may set (the GLUE config comes with glue:<task>)
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
DEFAULTS = {f.name: f.default for f in dataclasses.fields(TaskSpec)}  # name: MISSING (text, required)


def parse(entry: Any) -> TaskSpec:
    """The TaskSpec of one ``evaluate.tasks`` entry; ValueError naming the entry and the fix otherwise."""
    if isinstance(entry, str):
        return _named(entry.strip())
    if not isinstance(entry, dict):
        raise ValueError(f"evaluate.tasks: {entry!r} is neither a task name (glue:mrpc, package:bbc_news) nor a mapping")
    if "task" in entry:
        return _recipe(entry)
    if len(entry) == 1 and next(iter(entry)) in ("glue", "package"):  # `- glue: mrpc` is YAML for {glue: mrpc}
        key, value = next(iter(entry.items()))
        raise ValueError(f"evaluate.tasks: {entry!r}: write {key}:{value or '<task>'} with no space after the colon")
    unknown = sorted(set(entry) - USER_FIELDS)
    if unknown:
        raise ValueError(f"evaluate.tasks: unknown key(s) {unknown} in {entry!r}; allowed: {sorted(USER_FIELDS)}")
    if not str(entry.get("name", "")).strip():
        raise ValueError(f"evaluate.tasks: {entry!r} needs a name (it names the task's metrics, eval/<name>/score)")
    spec = TaskSpec(**_typed(entry))
    if spec.regression and "metrics" not in entry:
        spec = dataclasses.replace(spec, metrics=("pearson", "spearman"))  # a regression's own default
    if not NAME.match(spec.name):
        raise ValueError(f"evaluate.tasks: task name {spec.name!r}: letters, digits, '.', '_' and '-' only (it names "
                         "metrics and files)")
    if spec.source in ("glue", "package") or spec.source.startswith(("glue:", "package:")):
        raise ValueError(f"evaluate.tasks: task {spec.name!r}: source {spec.source!r} is a named task: list it as "
                         "glue:<task> or package:<name>, or {task: glue:rte, epochs: 5} for its own settings")
    if spec.source and (spec.train_file or spec.dev_file):
        raise ValueError(f"evaluate.tasks: task {spec.name!r}: give either source or train_file + dev_file, not both")
    if not spec.source and not (spec.train_file and spec.dev_file):
        raise ValueError(f"evaluate.tasks: task {spec.name!r} needs a source (a load_dataset name or a save_to_disk "
                         "folder) or both train_file and dev_file (csv, tsv, jsonl or parquet)")
    return _checked(spec)


def _typed(entry: dict) -> dict:
    """The mapping's values as TaskSpec's types (lists as tuples, epochs as float); a value of another type (YAML's
    numbers and nulls where text belongs, a bare string where a list belongs) is a ValueError naming its key."""
    out = {}
    for key, value in entry.items():
        default = DEFAULTS[key]
        if isinstance(default, tuple):
            ok = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
            want = "a list of names, e.g. [f1, accuracy]"
        elif isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            want = "a finite number"
        else:
            ok, want = isinstance(value, str), "text"
        if not ok:
            raise ValueError(f"evaluate.tasks: task {entry.get('name')!r}: {key}={value!r} must be {want}")
        out[key] = tuple(value) if isinstance(default, tuple) else float(value) if isinstance(default, float) else value
    return out


RECIPE = ("epochs", "lr", "batch_size", "max_seq_len")


def _recipe(entry: dict) -> TaskSpec:
    """``{task: glue:rte, epochs: 5, lr: 3e-5}``: a named task with its own fine-tuning settings."""
    if not isinstance(entry["task"], str):
        raise ValueError(f"evaluate.tasks: task={entry['task']!r} must be a task name such as glue:rte")
    base = _named(entry["task"].strip())
    unknown = sorted(set(entry) - {"task", *RECIPE})
    if unknown:
        raise ValueError(f"evaluate.tasks: {entry['task']}: unknown key(s) {unknown}; a named task takes {list(RECIPE)}")
    values = _typed({"name": base.name, **{k: v for k, v in entry.items() if k != "task"}})
    return _checked(dataclasses.replace(base, **{k: v for k, v in values.items() if k != "name"}))


def _named(text: str) -> TaskSpec:
    kind, _, name = text.partition(":")
    if kind == "glue":
        key = ALIASES.get(name.lower(), name.lower())
        if key not in GLUE:
            raise ValueError(f"evaluate.tasks: unknown GLUE task {text!r}; known: "
                             f"{', '.join('glue:' + k for k in GLUE)}")
        return GLUE[key]
    if kind == "package":
        if name not in PACKAGED:
            raise ValueError(f"evaluate.tasks: unknown packaged task {text!r}; known: "
                             f"{', '.join('package:' + k for k in PACKAGED)}")
        return PACKAGED[name]
    raise ValueError(f"evaluate.tasks: {text!r} is not a task name: write glue:<task> (glue:mrpc, glue:sst2, …), "
                     "package:rotten_tomatoes, package:bbc_news, or a mapping with name and source")


def _checked(spec: TaskSpec) -> TaskSpec:
    if spec.kind not in KINDS:
        raise ValueError(f"evaluate.tasks: task {spec.name!r}: kind must be one of {KINDS}, got {spec.kind!r}")
    bad = [m for m in spec.metrics if m not in TASK_METRICS]
    if bad or not spec.metrics:
        raise ValueError(f"evaluate.tasks: task {spec.name!r}: metrics {list(spec.metrics)} must be a non-empty list of "
                         f"{', '.join(TASK_METRICS)}")
    fitting = ("pearson", "spearman") if spec.regression else ("accuracy", "f1", "mcc")
    if unfit := [m for m in spec.metrics if m not in fitting]:
        raise ValueError(f"evaluate.tasks: task {spec.name!r}: {unfit} do not score a {spec.kind} task; use "
                         f"{', '.join(fitting)}")
    for key in RECIPE:
        if getattr(spec, key) < 0:
            raise ValueError(f"evaluate.tasks: task {spec.name!r}: {key} must be positive (0 means evaluate.{key})")
    if spec.batch_size != int(spec.batch_size) or spec.max_seq_len != int(spec.max_seq_len):
        raise ValueError(f"evaluate.tasks: task {spec.name!r}: batch_size and max_seq_len are whole numbers")
    return spec


def parse_all(entries: list) -> list[TaskSpec]:
    """Every entry parsed; ValueError for the first bad one, or for two tasks of the same name."""
    specs = [parse(e) for e in entries]
    names = [s.name for s in specs]
    if dup := sorted({n for n in names if names.count(n) > 1}):
        raise ValueError(f"evaluate.tasks: task name(s) {dup} given twice: each task's metrics are eval/<name>/…")
    return specs
