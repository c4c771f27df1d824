"""Semantic checks of a RunConfig, run at the edge before any Ray or MLflow work starts.

:func:`validate` collects every problem and raises one ``ValueError`` with a fix for each (litgpt's
``validate_args`` pattern). It covers single values (ranges, choices), combinations that can yield no data or
no result (a row length below the minimum row, no validation split, a sweep of no trial), lengths against the
position table of the model that will see them, the names MLflow's registry accepts, and every configuration
a sweep can produce. What needs files or a model (the teacher's vocabulary, its MLM head, a writable run
folder) is checked by pipeline/preflight.py.

The per-section checks and :func:`problems` are here, with :func:`sweep_problems` (each probe sample of the
space judged as a whole trial config) and :func:`sweep_stage_problems` (what only a sweep's run meets, checked by
the jobs that run one); each space entry on its own and the probe samples are checked in
pipeline/config/sweep_checks.py, and the metric tables come from pipeline/config/metrics.py.
"""

from __future__ import annotations

import os
import re

from pipeline.config.metrics import EVAL_METRICS, LOSS_METRICS, VAL_METRICS
from pipeline.config.export_checks import export_problems
from pipeline.config.task_distill_checks import task_distill_problems
from pipeline.config.sweep_checks import probe_samples, space_entry_problems
from pipeline.config.tree import FAMILY_NAMES, RunConfig
from pipeline.config import tasks as task_specs

_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def validate(cfg: RunConfig, *, check_sweep: bool = True) -> None:
    """Raise one ValueError listing every problem of ``cfg`` (and, with ``check_sweep``, of every trial config
    its sweep space can produce)."""
    p = problems(cfg)
    if check_sweep and not p:
        p = sweep_problems(cfg)
    if p:
        raise ValueError("invalid config:\n  - " + "\n  - ".join(p))


def problems(cfg: RunConfig) -> list[str]:
    """Every problem of ``cfg`` itself (not of its sweep's trial configs), one fix-it line each; [] when valid.
    :func:`validate` raises them as one ValueError."""
    return [*_choices(cfg), *_run(cfg), *_data(cfg), *_masking(cfg), *_models(cfg), *_loss(cfg), *_optim(cfg),
            *_scaling(cfg), *_sweep(cfg), *_tracking(cfg), *_evaluate(cfg), *task_distill_problems(cfg),
            *export_problems(cfg)]


def _choices(cfg: RunConfig) -> list[str]:
    choose = {
        "data.format": (cfg.data.format, {"auto", "text", "jsonl", "parquet", "hf_disk"}),
        "data.text_separator": (cfg.data.text_separator, {"line", "blank_line"}),
        "data.decode_errors": (cfg.data.decode_errors, {"replace", "skip"}),
        "deepspeed.precision": (cfg.deepspeed.precision, {"auto", "fp32", "bf16", "fp16"}),
        "scaling.strategy": (cfg.scaling.strategy, {"deepspeed", "ddp"}),
        "teacher.dtype": (cfg.teacher.dtype, {"fp32", "bf16"}),
        "teacher.family": (cfg.teacher.family, set(FAMILY_NAMES)),
        "student.init": (cfg.student.init, {"teacher", "random"}),
        "loss.kd_positions": (cfg.loss.kd_positions, {"all", "masked"}),
        "sweep.mode": (cfg.sweep.mode, {"min", "max"}),
        "tracking.select_mode": (cfg.tracking.select_mode, {"auto", "min", "max"}),
        "evaluate.mode": (cfg.evaluate.mode, {"finetune", "probe"}),
        "evaluate.skip_bad_rows": (cfg.evaluate.skip_bad_rows, set(task_specs.SKIP_BAD_ROWS)),
        "compute.compile": (cfg.compute.compile, {"none", "default", "reduce-overhead", "max-autotune"}),
    }
    return [f"{key}={value!r}: use one of {sorted(allowed)}" for key, (value, allowed) in choose.items() if value not in allowed]


def _run(cfg: RunConfig) -> list[str]:
    p = []
    if not _RUN_NAME.match(cfg.run.name):
        p.append(f"run.name={cfg.run.name!r}: it names a folder under run.root, so use letters, digits, '.', '_' "
                 "and '-' only, starting with a letter or digit (e.g. tiny-lr3e-4)")
    if not 0 <= cfg.run.seed < 2**63:
        p.append(f"run.seed={cfg.run.seed}: use an integer in [0, 2**63) (numpy and torch seeds)")
    for key, value in (("run.root", cfg.run.root), ("run.storage", cfg.run.storage), ("data.output", cfg.data.output)):
        if key == "run.root" and not value.strip():
            p.append("run.root is empty: give the folder (or s3:// prefix) that holds the run, e.g. runs")
        elif "://" in value and not value.startswith("s3://"):
            p.append(f"{key}={value!r}: only local paths and s3:// are supported (for file:// write the path itself)")
    return p


def _data(cfg: RunConfig) -> list[str]:
    d, p = cfg.data, []
    if not d.sources:
        p.append("data.sources is empty: list at least one path, glob, s3:// URI or package:rotten_tomatoes")
    if d.max_seq_len < 8:
        p.append(f"data.max_seq_len={d.max_seq_len}: use at least 8")
    if d.min_seq_tokens > d.max_seq_len:
        p.append(f"data.min_seq_tokens={d.min_seq_tokens} > data.max_seq_len={d.max_seq_len}: a packed row holds at "
                 "most max_seq_len tokens, so every row would be dropped; lower data.min_seq_tokens or raise "
                 "data.max_seq_len")
    if not 0.0 < d.max_unk_fraction <= 1.0:
        p.append(f"data.max_unk_fraction={d.max_unk_fraction}: rows with at least this share of [UNK] are dropped, so "
                 "<= 0 drops every row; use a value in (0, 1] (HF's recipe: 0.5; 1 drops only all-[UNK] rows)")
    if not 0.0 < d.val_fraction < 0.5:
        p.append(f"data.val_fraction={d.val_fraction}: use a value in (0, 0.5), e.g. 0.05; with no validation split "
                 "there is no val/* metric, which the sweep, ASHA and the registry choose by")
    if d.max_docs < 0:
        p.append(f"data.max_docs={d.max_docs}: use 0 (every document) or a positive cap")
    if d.read_chunk_mb <= 0 or d.rows_per_file < 1:
        p.append(f"data.read_chunk_mb={d.read_chunk_mb}, data.rows_per_file={d.rows_per_file}: "
                 "both must be > 0 (defaults 128 MB and 50,000 rows)")
    if d.max_line_chars < 100:
        p.append(f"data.max_line_chars={d.max_line_chars}: use at least 100")
    if d.materialize_max_gib < 0 or d.shuffle_buffer_rows < 0:
        p.append("data.materialize_max_gib and data.shuffle_buffer_rows must be >= 0")
    return p


def _masking(cfg: RunConfig) -> list[str]:
    m, p = cfg.masking, []
    if not 0.0 < m.mask_prob < 1.0:
        p.append(f"masking.mask_prob={m.mask_prob}: use a value in (0, 1), the paper uses 0.15")
    if m.mask_token_frac < 0 or m.random_token_frac < 0 or m.mask_token_frac + m.random_token_frac > 1.0:
        p.append("masking.mask_token_frac + masking.random_token_frac must lie in [0, 1] (the paper: 0.8 + 0.1)")
    if m.smoothing < 0:
        p.append(f"masking.smoothing={m.smoothing}: use 0 (uniform) or a positive exponent (HF's recipe: 0.7)")
    if m.smoothing and m.whole_word:
        p.append("masking.smoothing and masking.whole_word are exclusive: choose words or frequency-weighted tokens")
    return p


def _models(cfg: RunConfig) -> list[str]:
    t, p = cfg.teacher, []
    if t.init_from and t.source != "pretrain":
        p.append(f"teacher.init_from={t.init_from!r} starts a teacher the teacher stage pre-trains: it needs "
                 f"teacher.source=pretrain (teacher.source={t.source!r} is used as it is)")
    if t.source == "pretrain" and not t.init_from:  # with init_from the pretrained model's shape is the teacher's
        if t.hidden_size % t.num_heads:
            p.append(f"teacher.hidden_size={t.hidden_size} is not divisible by teacher.num_heads={t.num_heads}")
        if t.num_layers < 2:
            p.append(f"teacher.num_layers={t.num_layers}: a teacher needs at least 2 layers for a half-depth student")
        if cfg.data.max_seq_len > t.max_position_embeddings:
            p.append(f"data.max_seq_len={cfg.data.max_seq_len} > teacher.max_position_embeddings="
                     f"{t.max_position_embeddings}: the teacher and its student have that many positions; lower "
                     "data.max_seq_len or raise teacher.max_position_embeddings")
    if not t.source.strip():
        p.append("teacher.source is empty: use pretrain, a hub id, a local HF folder or s3://")
    elif t.source != "pretrain" and t.source.strip().lower() == "pretrain":
        p.append(f"teacher.source={t.source!r}: write pretrain (lower case) to pre-train the offline teacher; any "
                 "other value is read as a model to download")
    lm = cfg.student.layer_map
    if not (lm in ("alternate", "hf") or (isinstance(lm, list) and lm and all(type(i) is int for i in lm))):
        p.append(f"student.layer_map={lm!r}: use 'alternate', 'hf' or a non-empty list of teacher layer indices")
    elif t.source == "pretrain" and t.init_from:
        pass  # the pretrained encoder's depth is the teacher's: preflight checks the map against it
    elif t.source == "pretrain" and isinstance(lm, list) and not all(0 <= i < t.num_layers for i in lm):
        p.append(f"student.layer_map={lm}: indices must lie in [0, {t.num_layers - 1}] (teacher.num_layers={t.num_layers})")
    elif t.source == "pretrain" and lm == "hf" and t.num_layers != 12:
        p.append(f"student.layer_map=hf is defined for 12-layer teachers, teacher.num_layers={t.num_layers}: use "
                 "'alternate' or a list")
    return p


def _loss(cfg: RunConfig) -> list[str]:
    p = []
    if cfg.loss.temperature <= 0:
        p.append(f"loss.temperature={cfg.loss.temperature}: must be > 0 (the paper uses 2)")
    alphas = (cfg.loss.alpha_ce, cfg.loss.alpha_mlm, cfg.loss.alpha_cos, cfg.loss.alpha_mse)
    if min(alphas) < 0 or sum(alphas) <= 0:
        p.append(f"loss alphas {alphas}: each must be >= 0 and at least one > 0 (the paper: 5/2/1)")
    return p


def _optim(cfg: RunConfig) -> list[str]:
    p = []
    for name, o in (("optim", cfg.optim), ("teacher_optim", cfg.teacher_optim)):
        for key in ("max_steps", "micro_batch_size", "grad_accum"):
            if getattr(o, key) < 1:
                p.append(f"{name}.{key}={getattr(o, key)}: must be >= 1")
        if o.lr <= 0 or o.warmup_steps < 0 or o.weight_decay < 0 or o.eps <= 0 or o.grad_clip < 0:
            p.append(f"{name}: lr and eps must be > 0, warmup_steps, weight_decay and grad_clip >= 0 (got lr={o.lr}, "
                     f"eps={o.eps}, warmup_steps={o.warmup_steps}, weight_decay={o.weight_decay}, grad_clip={o.grad_clip})")
        if o.warmup_steps >= o.max_steps >= 1 and o.warmup_steps:  # else the schedule would cut it short silently
            p.append(f"{name}.warmup_steps={o.warmup_steps} >= {name}.max_steps={o.max_steps}: the learning rate "
                     f"warms up over at most max_steps − 1 = {o.max_steps - 1} steps and then decays to 0 by the "
                     f"last; lower {name}.warmup_steps (e.g. {o.max_steps // 10}) or raise {name}.max_steps")
        if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
            p.append(f"{name}.betas={o.betas}: give two values in [0, 1), e.g. [0.9, 0.98]")
        w = cfg.scaling.num_workers
        if o.global_batch_size and o.global_batch_size != w * o.micro_batch_size * o.grad_accum:
            p.append(
                f"{name}.global_batch_size={o.global_batch_size} but scaling.num_workers × {name}.micro_batch_size × "
                f"{name}.grad_accum = {w} × {o.micro_batch_size} × {o.grad_accum} = {w * o.micro_batch_size * o.grad_accum}: "
                f"set {name}.grad_accum={max(1, o.global_batch_size // max(w * o.micro_batch_size, 1))} or adjust the others"
            )
    if cfg.deepspeed.zero_stage not in (0, 1, 2, 3):
        p.append(f"deepspeed.zero_stage={cfg.deepspeed.zero_stage}: use 0, 1, 2 or 3")
    if cfg.deepspeed.precision == "fp16" and not cfg.scaling.use_gpu:
        p.append("deepspeed.precision=fp16 needs a GPU (DeepSpeed refuses fp16 on CPU): use fp32 or bf16")
    pad = cfg.compute.pad_vocab_multiple
    if pad and not (0 < pad <= 1024 and pad & (pad - 1) == 0):  # a power of two: what aligns a matmul
        p.append(f"compute.pad_vocab_multiple={pad}: use 0 (no padding) or a power of two up to 1024, e.g. 64 "
                 "(30,522 → 30,528 rows)")
    if cfg.compute.compile == "reduce-overhead" and not cfg.scaling.use_gpu:
        p.append("compute.compile=reduce-overhead needs a GPU (it captures CUDA graphs): use default on CPU, or none")
    fail, longest = cfg.faults.fail_at_step, max(cfg.optim.max_steps, cfg.teacher_optim.max_steps)
    if fail > longest >= 1:
        p.append(f"faults.fail_at_step={fail} comes after the last step of every training run (optim.max_steps="
                 f"{cfg.optim.max_steps}, teacher_optim.max_steps={cfg.teacher_optim.max_steps}), so no failure "
                 "would be rehearsed: use a step within a run, or 0 for none")
    elif fail < 0:
        p.append(f"faults.fail_at_step={fail}: use 0 (never) or a step of the run")
    if cfg.checkpoint.every_steps < 1 or cfg.eval.every_steps < 1:
        p.append("checkpoint.every_steps and eval.every_steps must be >= 1")
    if cfg.checkpoint.keep < 1 or cfg.eval.max_batches < 1:
        p.append(f"checkpoint.keep={cfg.checkpoint.keep}, eval.max_batches={cfg.eval.max_batches}: both must be >= 1")
    return p


def _scaling(cfg: RunConfig) -> list[str]:
    s, p = cfg.scaling, []
    if s.num_workers < 1:
        p.append(f"scaling.num_workers={s.num_workers}: must be >= 1")
    if s.max_preemptions < -1:
        p.append(f"scaling.max_preemptions={s.max_preemptions}: use -1 (retry after every preemption), 0 (fail on the "
                 "first) or a positive count")
    if cfg.checkpoint.preemption_check_steps < 0:
        p.append(f"checkpoint.preemption_check_steps={cfg.checkpoint.preemption_check_steps}: use 0 (never check) or "
                 "a positive number of optimizer steps")
    if s.cpus_per_worker <= 0 or s.max_failures < -1 or s.peak_tflops_per_worker < 0:
        p.append("scaling.cpus_per_worker must be > 0, scaling.max_failures >= -1 (-1: retry forever), "
                 "scaling.peak_tflops_per_worker >= 0")
    ds = cfg.deepspeed
    zero = ([f"deepspeed.zero_stage={ds.zero_stage}"] * (ds.zero_stage != 0)
            + ["deepspeed.offload_optimizer=true"] * ds.offload_optimizer)
    if s.strategy == "deepspeed" and ds.offload_optimizer and ds.zero_stage == 0:  # refused, not silently dropped
        p.append("deepspeed.offload_optimizer=true with deepspeed.zero_stage=0: offloading needs ZeRO stage 1, 2 or 3")
    if s.strategy == "ddp" and zero and ds.zero_stage in (0, 1, 2, 3):  # refused, not ignored: ddp shards nothing
        p.append(f"{' and '.join(zero)} with scaling.strategy=ddp, which shards nothing: set deepspeed.zero_stage=0 "
                 "and deepspeed.offload_optimizer=false, or use scaling.strategy=deepspeed for ZeRO")
    if s.strategy == "ddp" and ds.precision == "fp16":
        p.append("deepspeed.precision=fp16 with scaling.strategy=ddp: ddp has no loss scaler; use bf16 (fp32's "
                 "range, no scaler needed) or scaling.strategy=deepspeed")
    if cfg.run.ray_num_cpus < 0:
        p.append(f"run.ray_num_cpus={cfg.run.ray_num_cpus}: use 0 (the machine's count) or a positive number")
    return p


def _sweep(cfg: RunConfig) -> list[str]:
    sw, p = cfg.sweep, []
    if sw.num_samples < 1:
        p.append(f"sweep.num_samples={sw.num_samples}: a sweep needs at least one trial (skip the stage with "
                 "jobs.pipeline --skip-sweep instead)")
    if sw.grace_period < 1 or sw.max_concurrent < 0:
        p.append(f"sweep.grace_period={sw.grace_period} must be >= 1 and sweep.max_concurrent={sw.max_concurrent} >= 0")
    if sw.trial_driver_cpus <= 0:
        p.append("sweep.trial_driver_cpus must be > 0: Ray refuses a trial that asks for 0 CPU (use 0.01)")
    for key, spec in sw.space.items():
        p.extend(space_entry_problems(key, spec))
    return p


def sweep_problems(cfg: RunConfig) -> list[str]:
    """Validate the trial configs the sweep space can produce (every combination of the probe values, up to
    MAX_SWEEP_COMBINATIONS of them, pipeline/config/sweep_checks.py), before the first trial starts."""
    return _per_sample(cfg, problems)


def sweep_stage_problems(cfg: RunConfig) -> list[str]:
    """What only a run of the sweep stage meets, one fix-it line each; [] when it can run. The jobs that run the
    stage check it before anything starts (pipeline/stages/sweep.py ``check``), so that a sweep that cannot run
    does not fail after prepare, teacher and distill: an empty ``sweep.space``, and a ``sweep.grace_period``
    above ``optim.max_steps`` or above any ``optim.max_steps`` the space can sample (Ray's ASHA asserts
    ``grace_period <= max_t`` only when the stage builds it, and a trial shorter than the grace period could
    never be stopped early). Jobs that do not sweep are not held to it: a distill run may be shorter than the
    sweep's grace period."""
    if not cfg.sweep.space:
        return ["sweep.space is empty: declare at least one parameter, e.g. loss.temperature: {type: choice, values: "
                "[1, 2, 4]}, or skip the sweep (jobs.pipeline --skip-sweep)"]
    return _grace(cfg) or _per_sample(cfg, _grace)


def _grace(cfg: RunConfig) -> list[str]:
    grace, steps = cfg.sweep.grace_period, cfg.optim.max_steps
    if grace <= steps or steps < 1:
        return []
    return [f"sweep.grace_period={grace} > optim.max_steps={steps}: ASHA lets a trial run grace_period steps before "
            "it may stop it, so no trial could be stopped early (and Ray refuses a grace period beyond the longest "
            f"trial); lower sweep.grace_period, e.g. to {max(steps // 4, 1)}, or raise optim.max_steps"]


def _per_sample(cfg: RunConfig, judge) -> list[str]:
    """``judge``'s problems of each probe sample's trial config (at most 5 distinct ones, each with a sample)."""
    found: dict[str, str] = {}
    for sample in probe_samples(cfg):
        try:
            trial = cfg.with_overrides(sample)
            message = "; ".join(judge(trial))
        except ValueError as e:
            message = str(e)
        if message and message not in found:
            found[message] = ", ".join(f"{k}={v!r}" for k, v in sample.items())
    return [f"sweep.space can produce a trial with {sample}: {message}" for message, sample in list(found.items())[:5]]


def _tracking(cfg: RunConfig) -> list[str]:
    """Registry names and aliases against MLflow's own rules (its validators), plus ours."""
    from mlflow.exceptions import MlflowException  # deferred: importing pipeline.config must not import MLflow
    from mlflow.utils import validation  # deferred: the same (the math imports pipeline.config, test_layering.py)

    t, p = cfg.tracking, []
    checks = [
        ("tracking.experiment", t.experiment, [validation._validate_experiment_name]),
        ("tracking.model_name", t.model_name, [validation._validate_model_name]),
        ("tracking.alias", t.alias, [validation._validate_model_alias_name, validation._validate_model_alias_name_reserved]),
    ]
    for key, value, validators in checks:
        for check in validators:
            try:
                check(value)
            except MlflowException as e:
                p.append(f"{key}={value!r}: MLflow refuses it ({e.message}); pick another")
                break
    if "@" in t.model_name or t.model_name != t.model_name.strip():
        p.append(f"tracking.model_name={t.model_name!r}: no '@' and no leading or trailing spaces, so that "
                 "models:/<name>@<alias> stays unambiguous")
    if t.alias == "challenger":
        p.append("tracking.alias='challenger' is the alias the registry gives a version that did not beat the "
                 "champion: pick another alias (default champion)")
    for key, metric, mode in (("tracking.select_metric", t.select_metric, t.select_mode),
                              ("sweep.metric", cfg.sweep.metric, cfg.sweep.mode)):
        allowed = VAL_METRICS if key == "sweep.metric" else {**VAL_METRICS, **LOSS_METRICS, **_eval_metrics(cfg)}
        if key == "tracking.select_metric" and metric.startswith("eval/") and not cfg.evaluate.tasks:
            p.append(f"{key}={metric!r}: no evaluate stage reports it: list the downstream tasks in evaluate.tasks "
                     "(e.g. [package:rotten_tomatoes]) or select by val/mlm_loss")
        elif metric not in allowed:
            p.append(f"{key}={metric!r}: not a metric the training loop reports; use one of {sorted(allowed)}")
        elif mode in ("min", "max") and allowed[metric] != mode:
            p.append(f"{key}={metric!r} is better when {'lower' if allowed[metric] == 'min' else 'higher'}: set its "
                     f"mode to {allowed[metric]}")
    if len(t.model_name) > 256 or any(c in t.model_name for c in "?#%"):
        shown = repr(t.model_name) if len(t.model_name) <= 40 else repr(t.model_name[:40]) + "…"
        p.append(f"tracking.model_name={shown}: at most 256 characters and no '?', '#' or '%' (they break models:/ "
                 "URIs and database columns)")
    if t.experiment != t.experiment.strip():
        p.append(f"tracking.experiment={t.experiment!r}: no leading or trailing spaces")
    if t.log_every_steps < 1:
        p.append(f"tracking.log_every_steps={t.log_every_steps}: must be >= 1")
    return p


def _eval_metrics(cfg: RunConfig) -> dict[str, str]:
    """eval/macro and each configured task's eval/<task>/score and metrics (every one better when higher)."""
    try:
        tasks = task_specs.parse_all(cfg.evaluate.tasks)
    except ValueError:
        return dict(EVAL_METRICS)  # reported by _evaluate
    return {**EVAL_METRICS, **{f"eval/{t.name}/score": "max" for t in tasks}}  # what the stage reports per student


def _evaluate(cfg: RunConfig) -> list[str]:
    e, p = cfg.evaluate, []
    try:
        tasks = task_specs.parse_all(e.tasks)
    except ValueError as err:
        return [str(err)]
    if not (e.candidates == "all" or (isinstance(e.candidates, int) and not isinstance(e.candidates, bool) and e.candidates >= 1)):
        p.append(f"evaluate.candidates={e.candidates!r}: use all, or an integer k >= 1 (the k best students by val/mlm_loss)")
    for key, value, low in (("seeds", e.seeds, 1), ("batch_size", e.batch_size, 1), ("workers_per_unit", e.workers_per_unit, 1),
                            ("max_train_examples", e.max_train_examples, 0), ("max_dev_examples", e.max_dev_examples, 0),
                            ("speed_examples", e.speed_examples, 0)):
        if value < low:
            p.append(f"evaluate.{key}={value}: must be >= {low}")
    if not e.lr > 0 or not e.epochs > 0:
        p.append(f"evaluate.lr={e.lr:g}, evaluate.epochs={e.epochs:g}: both must be > 0")
    if not 0 < e.dev_fraction <= 0.5:
        p.append(f"evaluate.dev_fraction={e.dev_fraction:g}: must be in (0, 0.5]")
    if not 8 <= e.max_seq_len <= cfg.teacher.max_position_embeddings:
        p.append(f"evaluate.max_seq_len={e.max_seq_len}: must be in [8, teacher.max_position_embeddings="
                 f"{cfg.teacher.max_position_embeddings}]")
    if e.mode == "probe" and e.seeds > 1:
        p.append(f"evaluate.seeds={e.seeds} with evaluate.mode=probe: the probe's solvers are deterministic, every seed "
                 "scores the same; use seeds: 1 (or mode: finetune)")
    for t in tasks:
        if t.max_seq_len and not 8 <= t.max_seq_len <= cfg.teacher.max_position_embeddings:
            p.append(f"evaluate.tasks: task {t.name!r}: max_seq_len={t.max_seq_len:g} must be in [8, "
                     f"teacher.max_position_embeddings={cfg.teacher.max_position_embeddings}]")
        for key in ("train_file", "dev_file"):
            path = getattr(t, key)
            if path and "://" not in path and not os.path.isfile(path):
                p.append(f"evaluate.tasks: task {t.name!r}: {key}={path!r} is not a file")
            elif path and not path.lower().endswith((".csv", ".tsv", ".jsonl", ".json", ".parquet")):
                p.append(f"evaluate.tasks: task {t.name!r}: {key}={path!r}: use a .csv, .tsv, .jsonl/.json or .parquet file")
    if e.glue_dir and any(t.source == "glue" for t in tasks) and not os.path.isdir(e.glue_dir):
        p.append(f"evaluate.glue_dir={e.glue_dir!r} is not a folder: give the folder that holds GLUE's task folders "
                 "(MRPC/, SST-2/, …), or leave it empty to read nyu-mll/glue from the Hub")
    return p
