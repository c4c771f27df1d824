"""Checks that need the file system or a model, run by every job before Ray or MLflow start.

pipeline/config/checks.py judges the config on its own; here the config meets the world: the run folders
must be creatable and writable, ``data.tokenizer`` must be of ``teacher.family``, and a pretrained teacher must be
a masked LM of that family with a trained head, enough
positions for ``data.max_seq_len`` and the vocabulary of ``data.tokenizer``. Every problem is collected and
raised as one ValueError, which the job prints as one ``error:`` line per problem.
"""

from __future__ import annotations

import dataclasses
import os
import uuid

from pipeline import assets, families, models, storage, teachers
from pipeline.config import MaskingSection, RunConfig


MIN_VOCAB = 1000  # a WordPiece vocabulary smaller than this is a folder without its vocabulary file


def check(cfg: RunConfig, *, teacher: bool = True) -> None:
    """Check, before Ray or MLflow start, what needs files: the run's local folders are writable
    (:func:`run_folder_problems`) and, with ``teacher``, that the tokenizer loads and has a real vocabulary
    (≥ MIN_VOCAB tokens) and a pretrained teacher fits it (:func:`pipeline.teachers.check_teacher`). Raises one
    ValueError ("cannot start:" and a line per problem)."""
    problems = run_folder_problems(cfg)
    if teacher and not problems:
        cache = cfg.cache_dir
        try:
            tokenizer = assets.load_tokenizer(cfg.data.tokenizer, cache)
        except ValueError as e:
            raise ValueError(f"cannot start:\n  - data.tokenizer: {e}") from None
        family = families.get(cfg.teacher.family)
        problems += family_problems(cfg, family)
        if len(tokenizer) < MIN_VOCAB:
            problems.append(f"data.tokenizer={cfg.data.tokenizer!r} has only {len(tokenizer)} tokens: its folder holds no "
                            f"vocabulary (vocab.txt or tokenizer.json); point at a tokenizer like {family.example_tokenizer}")
        elif mismatch := _teacher_family_problem(cfg, family):
            problems.append(mismatch)  # before the tokenizer's: the fix is teacher.family, not another tokenizer
        elif family.tokenizer_problem(tokenizer, cfg.data.tokenizer):
            problems.append(family.tokenizer_problem(tokenizer, cfg.data.tokenizer))
        elif cfg.teacher.init_from:
            try:
                start, _ = teachers.teacher_from_encoder(cfg.teacher.init_from, cache_root=cache, vocab_size=len(tokenizer),
                                                       max_seq_len=cfg.data.max_seq_len, seed=cfg.run.seed,
                                                       family=family.name)
                problems += _layer_map_problems(cfg, start.config.num_hidden_layers, f"teacher.init_from={cfg.teacher.init_from!r}")
            except ValueError as e:
                problems.append(str(e).splitlines()[0])
            except Exception as e:  # noqa: BLE001 -- transformers', safetensors' and OS errors of a damaged folder
                problems.append(f"teacher.init_from {cfg.teacher.init_from!r} cannot be loaded ({type(e).__name__}: "
                                f"{' '.join(str(e).split())[:160]})")
        elif cfg.teacher.source != "pretrain":
            found = teachers.check_teacher(cfg.teacher.source, cache_root=cache, tokenizer=tokenizer,
                                         max_seq_len=cfg.data.max_seq_len, family=family.name)
            problems += found or _layer_map_problems(cfg, teachers.teacher_num_layers(cfg.teacher.source, cache),
                                                     f"teacher.source={cfg.teacher.source!r}")
    if problems:
        raise ValueError("cannot start:\n  - " + "\n  - ".join(problems))


def family_problems(cfg: RunConfig, family) -> list[str]:
    """Settings the family cannot honour: masking for a causal LM (it predicts every next token, nothing is
    masked), a held-out metric of the other objective (val/mlm_* for GPT-2, val/clm_* for BERT), an export of a
    student the export stage does not serve. One message each."""
    problems = []
    other = "clm" if family.objective == "mlm" else "mlm"
    if family.objective == "clm" and cfg.masking != MaskingSection():
        changed = [f"masking.{f.name}" for f in dataclasses.fields(MaskingSection)
                   if getattr(cfg.masking, f.name) != getattr(MaskingSection(), f.name)]
        problems.append(f"{', '.join(changed)}: a {family.name} teacher is a causal LM (every position predicts the next "
                        "token, nothing is masked): remove the masking section")
    for key, metric in (("sweep.metric", cfg.sweep.metric), ("tracking.select_metric", cfg.tracking.select_metric)):
        if metric.startswith((f"val/{other}_", f"loss/{other}")):
            fixed = metric.replace(other, family.objective)
            problems.append(f"{key}={metric}: a {family.name} run reports {family.objective} metrics, not {other}: "
                            f"set {key}: {fixed}")
    if cfg.export.formats and family.pipeline_task != "fill-mask":
        problems.append(f"export.formats={cfg.export.formats}: the export stage serves fill-mask students (and their "
                        f"task classifiers); a {family.name} student is {family.pipeline_task}: set export.formats: []")
    return problems


def _teacher_family_problem(cfg: RunConfig, family) -> str | None:
    """A pretrained teacher (or ``teacher.init_from``) whose config says another family than ``teacher.family``;
    None when it agrees or cannot be read yet (the teacher's own checks then say why)."""
    from transformers import AutoConfig

    key, source = ("teacher.init_from", cfg.teacher.init_from) if cfg.teacher.init_from else ("teacher", cfg.teacher.source)
    if source == "pretrain":
        return None
    try:
        path = assets.local_or_error(source, cfg.cache_dir, what=key)
        if not os.path.isdir(path):  # a hub id: its config is fetched once, by the teacher's own checks
            return None
        found = families.of(AutoConfig.from_pretrained(path))
    except Exception:  # noqa: BLE001 -- unreadable, unreachable or of no family: the teacher's own checks say so
        return None
    if found.name == family.name:
        return None
    return f"{key} {source!r} is a {found.name} model but teacher.family is {family.name}: set teacher.family: {found.name}"


def _layer_map_problems(cfg: RunConfig, num_layers: int, teacher: str) -> list[str]:
    """student.layer_map against the depth of the teacher it will copy from (known once the teacher is found)."""
    try:
        models.resolve_layer_map(cfg.student.layer_map, num_layers)
    except ValueError as e:
        return [f"{e} ({teacher} has {num_layers} layers)"]
    return []


def run_folder_problems(cfg: RunConfig) -> list[str]:
    """Each local folder the run writes (run.root/run.name, run.storage, data.output) can be created and
    written; S3 locations are checked when first used."""
    folders = {"run.root": cfg.run_dir, "run.storage": cfg.run.storage, "data.output": cfg.data.output}
    problems = []
    for key, folder in folders.items():
        if folder and not storage.is_s3(folder):
            reason = _unwritable(os.path.abspath(os.path.expanduser(folder)))
            if reason:
                problems.append(f"{key}: cannot write {folder} ({reason}): pick a writable folder, e.g. --set {key}=$HOME/distil-runs")
    if storage.is_s3(cfg.run.root) and not os.environ.get("MLFLOW_TRACKING_URI"):
        problems.append(f"run.root={cfg.run.root}: the embedded MLflow store is a sqlite file, which cannot live on S3: "
                        "set MLFLOW_TRACKING_URI to a tracking server (docs/scaling.md), or keep run.root local and put "
                        "checkpoints on S3 with run.storage=s3://...")
    return problems


def _unwritable(folder: str) -> str | None:
    parent = folder
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"{parent} is a file, not a folder"
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".write-probe-{uuid.uuid4().hex}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        return e.strerror or str(e)
    return None
