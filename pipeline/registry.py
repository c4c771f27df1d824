"""The MLflow Model Registry: the chosen student becomes a version of ``<model_name>`` in the transformers flavor.

- The best candidate is chosen by ``tracking.select_metric`` (``select_mode`` min or max; auto: by the metric's
  family, pipeline/config/metrics.py metric_mode).
- The alias ``champion`` moves only when the new version beats the current champion on that metric;
  otherwise the new version gets ``challenger``.
- A score that is not a finite number (NaN, ±inf: a diverged run, an overflow) never wins: not in the choice,
  not against a champion, not as the first champion. A finite score beats a champion whose score is not.
- Registration is idempotent: a checkpoint that is already a version is not registered again, whatever the
  timing. On one machine registrations of a model take turns (a file lock); registrars on several machines that
  both create a version of one checkpoint each look again after creating theirs, and the lowest version number
  wins: the other registrar deletes its own version before it touches an alias (:func:`keep_first`).
- A registered model has exactly its tokenizer's vocabulary rows (:func:`load_student`): a folder exported with
  more (padded to a multiple, or by an older distil) is registered cut to them, so the served fill-mask model
  cannot predict an id its tokenizer cannot decode; one with fewer is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import numbers
import os
import tempfile

from pipeline import assets, families, models, storage
from pipeline.config import TrackingSection
from pipeline.config.metrics import metric_mode
from pipeline.records import Candidate

CHECKPOINT_TAG = "distil.checkpoint"
METRIC_TAG_PREFIX = "distil.metric."


def choose(candidates: list[Candidate], cfg: TrackingSection) -> Candidate:
    """The best candidate by ``cfg.select_metric``, among finite scores.

    Raises ValueError when no candidate reports the metric, or when none has a finite value of it.
    """
    scored = [c for c in candidates if cfg.select_metric in c.metrics]
    if not scored:
        raise ValueError(
            f"no candidate reports {cfg.select_metric!r} (candidates: {[c.source for c in candidates]}): "
            "set tracking.select_metric to a metric the runs report, e.g. val/mlm_loss"
        )
    finite = [c for c in scored if finite_score(c.metrics[cfg.select_metric]) is not None]
    if not finite:
        values = ", ".join(f"{c.source}: {c.metrics[cfg.select_metric]}" for c in scored)
        raise ValueError(
            f"no candidate has a finite {cfg.select_metric} ({values}): every run diverged or overflowed; lower "
            "optim.lr or use deepspeed.precision=bf16, then run distill or sweep again"
        )
    best = ranked(finite, cfg.select_metric, metric_mode(cfg.select_metric, cfg.select_mode))
    tied = [c.source for c in best[1:] if c.metrics[cfg.select_metric] == best[0].metrics[cfg.select_metric]]
    if tied:  # the sort is stable: the first in the given order (distill, then the sweep's best first) wins
        print(f"[distil] register: {best[0].source} and {', '.join(tied)} tie on {cfg.select_metric} = "
              f"{best[0].metrics[cfg.select_metric]:.6g}; chose the first in candidate order (distill, then the sweep's "
              "trials best first)", flush=True)
    return best[0]


def finite_score(value) -> float | None:
    """``value`` as a float when it is a finite number; None for NaN, ±inf, bools and anything not a number."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value) if math.isfinite(value) else None


def ranked(candidates: list[Candidate], metric: str, mode: str) -> list[Candidate]:
    """Best first by ``metric`` (``mode`` min or max); candidates without a finite score come last, in order."""
    def key(c: Candidate):
        score = finite_score(c.metrics.get(metric))
        return (score is None, 0.0 if score is None else (score if mode == "min" else -score))

    return sorted(candidates, key=key)  # stable: ties keep their order


def local_model_dir(model_uri: str, cache_root: str) -> str:
    """A local folder holding the exported HF model at ``model_uri``: an s3:// prefix is downloaded once into
    ``cache_root`` (:func:`pipeline.storage.download_dir`), a local folder is returned as given. Raises
    ValueError for a local folder without ``config.json`` or an s3:// prefix that holds no files."""
    if storage.is_s3(model_uri):
        os.makedirs(cache_root, exist_ok=True)
        return storage.download_dir(model_uri, cache_root)
    if not os.path.exists(os.path.join(model_uri, "config.json")):
        raise ValueError(f"{model_uri} is not an exported HF model directory (no config.json)")
    return model_uri


def download_model(uri: str, cache_root: str, *, flag: str = "--model") -> str:
    """A registered model (``models:/name@alias`` or ``models:/name/version``) downloaded under ``cache_root``; the
    folder of its Hugging Face files. ValueError (naming ``flag``) when MLflow does not know it."""
    import mlflow

    if not uri.startswith("models:/"):
        raise ValueError(f"{flag} {uri}: give a registry URI, models:/<name>@<alias> or models:/<name>/<version>")
    dst = os.path.join(cache_root, "registry", uri.removeprefix("models:/").replace("/", "_").replace("@", "_"))
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=dst)
    except Exception as e:  # noqa: BLE001 -- MLflow's errors for an unknown name, alias or version
        raise ValueError(f"{flag} {uri}: MLflow cannot find it ({str(e).splitlines()[0][:200]}): check the name and "
                         "alias (mlflow ui lists the registered models)") from None
    for folder, _, files in sorted(os.walk(local)):
        if "config.json" in files and any(f.endswith((".safetensors", ".bin")) for f in files):
            return folder
    raise ValueError(f"{flag} {uri}: no Hugging Face model files (config.json and weights) in what MLflow stored")


def model_version(uri: str, *, flag: str = "--model"):
    """The MLflow ``ModelVersion`` of ``models:/name@alias`` or ``models:/name/version``. ValueError (one line,
    naming ``flag``) for another kind of URI, or a name, alias or version the registry does not hold."""
    from mlflow.tracking import MlflowClient

    body = uri.removeprefix("models:/") if uri.startswith("models:/") else None
    if not body or ("@" not in body and "/" not in body):
        raise ValueError(f"{flag} {uri}: give a registry URI, models:/<name>@<alias> or models:/<name>/<version>")
    client = MlflowClient()
    name, alias = body.split("@", 1) if "@" in body else (body.rsplit("/", 1)[0], None)
    try:
        if alias is not None:
            return client.get_model_version_by_alias(name, alias)
        return client.get_model_version(name, body.rsplit("/", 1)[1])
    except Exception as e:  # noqa: BLE001 -- MLflow raises a generic MlflowException for each of these
        known = [m.name for m in client.search_registered_models(max_results=20)]
        raise ValueError(f"{flag} {uri}: the registry has no such model version ({str(e).splitlines()[0][:160]}); "
                         f"registered models: {known or 'none'}. Register one first (python -m jobs.register) or "
                         "give --model-dir") from None


def _better(new, old, mode: str) -> bool:
    """Whether score ``new`` beats ``old`` (None when there is none). A non-finite new score beats nothing; a
    finite one beats a missing or non-finite old score."""
    new, old = finite_score(new), finite_score(old)
    if new is None:
        return False
    if old is None:
        return True
    return new < old if mode == "min" else new > old


def cpu_latency_ms(model, *, seq_len: int = 128, runs: int = 20) -> float:
    """Median wall time of one forward pass, batch 1 × ``seq_len`` tokens, on CPU, in milliseconds."""
    import statistics
    import time

    import torch

    seq_len = min(seq_len, families.of(model).max_tokens(model.config))
    ids = torch.randint(1000, model.config.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(0))
    model = model.eval()
    times = []
    with torch.inference_mode():
        for i in range(runs + 3):
            t0 = time.perf_counter()
            model(input_ids=ids)
            if i >= 3:
                times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


# What the card shows of a student's metrics: how good it is; every metric stays in the register run.
CARD_METRICS = ("eval/macro", "eval/retention_pct", "val/mlm_loss", "val/mlm_acc", "val/clm_loss", "val/clm_acc",
                "val/teacher_agreement", "val/perplexity")
CONFIG_ARTIFACT = "config.json"  # the resolved config the student was trained with, in the register run


def model_card(*, name: str, model, teacher=None, metrics: dict, lineage: dict, config: dict | None,
               evaluation: str | None = None) -> str:
    """A markdown model card a person reads: what the student is and how to load it, how good (the selection
    metrics and the downstream evaluation's tables, ``evaluation``, markdown), how fast and small against the
    teacher, the settings that made it, and its lineage. The whole config is not pasted: it is the register run's
    ``config.json`` artifact (:data:`CONFIG_ARTIFACT`)."""
    s_params, s_ms = models.count_parameters(model), cpu_latency_ms(model)
    shape = families.of(model).shape(model.config)
    lines = [f"# {name}", "",
             f"A {model.config.model_type} {families.of(model).pipeline_task} student ({shape['layers']} layers, width "
             f"{shape['d']}) distilled by "
             f"distil (Sanh et al. 2019). Load it with "
             f"`mlflow.transformers.load_model(\"models:/{name}@champion\")`.", "", "## How good", ""]
    shown = [(k, metrics[k]) for k in CARD_METRICS if isinstance(metrics.get(k), (int, float))]
    shown += sorted((k, v) for k, v in metrics.items() if k.startswith("eval/") and k.endswith("/score"))
    lines += ["| metric | value |", "|---|---|", *(f"| {k} | {v:.4g} |" for k, v in shown), "",
              "Every metric of the run: the register run in MLflow."]
    if evaluation:
        lines += ["", "### Downstream evaluation", "", evaluation]
    lines += ["", "## How fast and how small", "", "| | student | teacher | student / teacher |", "|---|---|---|---|"]
    if teacher is not None:
        t_params, t_ms = models.count_parameters(teacher), cpu_latency_ms(teacher)
        lines += [f"| parameters | {s_params:,} | {t_params:,} | {s_params / t_params:.2f} |",
                  f"| CPU latency, batch 1 × 128 tokens (median of 20) | {s_ms:.1f} ms | {t_ms:.1f} ms | {s_ms / t_ms:.2f} |"]
    else:
        lines += [f"| parameters | {s_params:,} | | |", f"| CPU latency, batch 1 × 128 tokens (median of 20) | {s_ms:.1f} ms | | |"]
    if evaluation:
        lines += ["", "The latency here is at 128 tokens; Table 3 above times the dev set at each example's own length, "
                  "so their ratios differ where most examples are short."]
    if config:
        lines += ["", "## Settings", "", *_settings_lines(config), "",
                  f"The whole resolved config: `{CONFIG_ARTIFACT}` in the register run's artifacts."]
    lines += ["", "## Lineage", ""] + [f"- {k}: `{v}`" for k, v in sorted(lineage.items())]
    return "\n".join(lines) + "\n"


def _settings_lines(config: dict) -> list[str]:
    """The settings that shape a student, one line each, from a resolved config dict."""
    loss, student, optim = config.get("loss", {}), config.get("student", {}), config.get("optim", {})
    return [f"- loss: T={loss.get('temperature')}, α_ce={loss.get('alpha_ce')}, α_mlm={loss.get('alpha_mlm')}, "
            f"α_cos={loss.get('alpha_cos')}",
            f"- student: layers {student.get('layer_map')}, init {student.get('init')}",
            f"- training: {optim.get('max_steps')} steps, lr {optim.get('lr')}, micro-batch {optim.get('micro_batch_size')}"
            f" × {optim.get('grad_accum')} accumulation, data.max_seq_len {config.get('data', {}).get('max_seq_len')}"]


def load_student(model_dir: str):
    """(model, tokenizer) of an exported student folder (a masked LM, or a causal LM for GPT-2: its family's
    ``objective``), the model with exactly the tokenizer's vocabulary rows (:func:`pipeline.assets.fit_vocab`). The
    tokenizer is the folder's own, or, in a model downloaded from the registry, the transformers flavor's
    ``components/tokenizer`` beside it. Raises ValueError naming the folder when it has fewer rows, or when no
    tokenizer with a vocabulary (and, for a masked LM, a mask token) is found."""
    import transformers

    family = families.of(transformers.AutoConfig.from_pretrained(model_dir))
    auto = transformers.AutoModelForCausalLM if family.objective == "clm" else transformers.AutoModelForMaskedLM
    model = auto.from_pretrained(model_dir)
    tokenizer_dir = model_dir
    sibling = os.path.join(os.path.dirname(os.path.abspath(model_dir)), "components", "tokenizer")
    if not any(os.path.exists(os.path.join(model_dir, f)) for f in TOKENIZER_FILES) and os.path.isdir(sibling):
        tokenizer_dir = sibling  # mlflow.transformers stores the model in model/ and its tokenizer in components/
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    if len(tokenizer) == 0 or (family.objective == "mlm" and tokenizer.mask_token_id is None):
        raise ValueError(f"{model_dir}: no tokenizer with a vocabulary and a mask token beside the model (looked in "
                         f"{tokenizer_dir}): save the tokenizer into the folder (tokenizer.save_pretrained)")
    return assets.fit_vocab(model, tokenizer, what=f"the model in {model_dir}"), tokenizer


TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json")  # any one: the folder has its tokenizer


def register(cfg: TrackingSection, *, model_dir: str, checkpoint: str, metrics: dict, tags: dict,
             description: str | None = None, task: str = "fill-mask") -> dict:
    """Log the model in the transformers flavor, with exactly its tokenizer's vocabulary rows (:func:`load_student`,
    or :func:`pipeline.assets.load_classifier` for ``task="text-classification"``), and register it; returns name, version, alias
    and URI. ValueError for a model with fewer rows than its tokenizer, or without ``cfg.select_metric``."""
    import mlflow
    import torch
    import transformers
    from mlflow.tracking import MlflowClient

    if cfg.select_metric not in metrics:
        raise ValueError(f"the model to register has no {cfg.select_metric!r} metric, which tracking.select_metric "
                         f"ranks by: pass it (--metric {cfg.select_metric}=<value>) or register a checkpoint that carries it")
    client = MlflowClient()
    with _registration_lock(cfg.model_name):
        existing = _version_for_checkpoint(client, cfg.model_name, checkpoint)
        if existing is not None:
            return _reused(cfg.model_name, existing)

        model, tokenizer = assets.load_classifier(model_dir) if task == "text-classification" else load_student(model_dir)
        info = mlflow.transformers.log_model(
            transformers_model={"model": model, "tokenizer": tokenizer},
            name="student",
            task=task,
            # pyfunc predict (and `mlflow models serve`) passes these to every pipeline call: a long fill-mask input is
            # cut to the model's window (the exported tokenizer's model_max_length), not a crash (Family.pipeline_kwargs)
            model_config=families.of(model).pipeline_kwargs if task != "text-classification" else
            {"tokenizer_kwargs": {"truncation": True}},
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"transformers=={transformers.__version__}"],
        )
        score = metrics[cfg.select_metric]
        version_tags = {CHECKPOINT_TAG: checkpoint, METRIC_TAG_PREFIX + cfg.select_metric: score, **tags}
        # The tags go in with the version, in one transaction: a registrar elsewhere that looks after creating its
        # own version sees this one with its checkpoint, never a version without it (keep_first relies on it).
        version = str(mlflow.register_model(info.model_uri, cfg.model_name,
                                            tags={k: str(v) for k, v in version_tags.items()}).version)
        first = keep_first(client, cfg.model_name, version, checkpoint)
        if first is not None:
            return _reused(cfg.model_name, first)
        if description:
            client.update_model_version(cfg.model_name, version, description=description)
            mlflow.log_text(description, "model_card.md")
        alias = _move_alias(client, cfg, version, score)
    return {"name": cfg.model_name, "version": version, "aliases": [alias], "new": True,
            "uri": f"models:/{cfg.model_name}@{alias}", "version_uri": f"models:/{cfg.model_name}/{version}"}


def registered_version(name: str, key: str):
    """The version of ``name`` registered for ``key`` (a checkpoint, or an export's checkpoint#format), or None."""
    from mlflow.tracking import MlflowClient

    return _version_for_checkpoint(MlflowClient(), name, key)


def register_served(*, name: str, key: str, model_code: str, artifacts: dict[str, str], input_example,
                    pip_requirements: list[str], tags: dict, description: str, aliases: list[str]) -> dict:
    """Log a text-in MLflow pyfunc (``model_code``: a models-from-code file; ``artifacts``: name → local path) and
    register it as a version of ``name`` keyed by ``key`` (tag :data:`CHECKPOINT_TAG`), with ``tags``, the model
    card ``description`` and every alias in ``aliases`` moved to it. Idempotent like :func:`register`: a key
    registered before returns that version, and simultaneous registrations keep one version.

    Returns {name, version, aliases, uri, new}."""
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    with _registration_lock(name):
        existing = _version_for_checkpoint(client, name, key)
        if existing is not None:
            return _reused(name, existing)
        info = mlflow.pyfunc.log_model(name="served", python_model=model_code, artifacts=artifacts,
                                       input_example=input_example, pip_requirements=pip_requirements)
        version = str(mlflow.register_model(info.model_uri, name,
                                            tags={k: str(v) for k, v in {CHECKPOINT_TAG: key, **tags}.items()}).version)
        first = keep_first(client, name, version, key)
        if first is not None:
            return _reused(name, first)
        client.update_model_version(name, version, description=description)
        for alias in aliases:
            client.set_registered_model_alias(name, alias, version)
    return {"name": name, "version": version, "aliases": list(aliases), "new": True,
            "uri": f"models:/{name}/{version}"}


def keep_first(client, name: str, version: str, checkpoint: str):
    """After creating ``version`` of ``checkpoint``: None when it is the checkpoint's first (lowest-numbered) live
    version, which keeps it; otherwise another registration of the same checkpoint got there first, so this
    version is deleted and the first one is returned (an MLflow ``ModelVersion``). Every registrar of one checkpoint
    decides the same way, whatever the timing: a version's number is assigned after every lower one is stored,
    with its tags, so the later of two sees the earlier."""
    first = _version_for_checkpoint(client, name, checkpoint)
    if first is None or str(first.version) == str(version):
        return None
    client.delete_model_version(name, version)
    print(f"[distil] register: {checkpoint} became version {first.version} of {name} in another registration at the "
          f"same time; removed the duplicate version {version} and kept {first.version}", flush=True)
    return first


def _reused(name: str, existing) -> dict:
    return {"name": name, "version": str(existing.version), "aliases": list(existing.aliases), "new": False,
            "uri": f"models:/{name}/{existing.version}"}


@contextlib.contextmanager
def _registration_lock(name: str, timeout_s: float = 3600.0):
    """One registration of ``name`` at a time on this machine, per registry: a file lock in the temporary folder
    named by the registry URI and the model name. Across machines :func:`keep_first` keeps one version per
    checkpoint instead."""
    import filelock
    import mlflow

    digest = hashlib.sha256(f"{mlflow.get_registry_uri()}\n{name}".encode()).hexdigest()[:16]
    path = os.path.join(tempfile.gettempdir(), f"distil-register-{digest}.lock")
    try:
        with filelock.FileLock(path, timeout=timeout_s):
            yield
    except filelock.Timeout:
        raise ValueError(f"another registration of {name} on this machine held {path} for {timeout_s:.0f} s: check "
                         "for a hung jobs.register or jobs.pipeline, then register again") from None


def _move_alias(client, cfg: TrackingSection, version: str, score: float) -> str:
    try:
        current = client.get_model_version_by_alias(cfg.model_name, cfg.alias)
    except Exception:  # noqa: BLE001 -- MLflow raises a generic error when the alias does not exist
        current = None
    old = current.tags.get(METRIC_TAG_PREFIX + cfg.select_metric) if current is not None else None
    if _better(score, _tag_score(old), metric_mode(cfg.select_metric, cfg.select_mode)):
        client.set_registered_model_alias(cfg.model_name, cfg.alias, version)
        return cfg.alias
    client.set_registered_model_alias(cfg.model_name, "challenger", version)
    return "challenger"


def _tag_score(tag: str | None) -> float | None:
    """A champion's score tag as a number: None when absent or not a number (a hand-edited tag)."""
    try:
        return float(tag) if tag is not None else None
    except ValueError:
        return None


def _version_for_checkpoint(client, name: str, checkpoint: str):
    """The lowest-numbered live version of ``name`` tagged with ``checkpoint`` (with its aliases), or None."""
    found, token = [], None
    while True:
        try:
            page = client.search_model_versions(f"name = '{name}'", page_token=token)
        except Exception:  # noqa: BLE001 -- no such registered model yet
            return None
        found += [v for v in page if v.tags.get(CHECKPOINT_TAG) == checkpoint]
        token = page.token
        if not token:
            break
    if not found:
        return None
    return client.get_model_version(name, str(min(int(v.version) for v in found)))
