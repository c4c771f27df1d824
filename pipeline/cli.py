"""What the job entrypoints (jobs/) share: the arguments, the config, Ray, MLflow, a readable failure (one line,
the traceback in a log file: :func:`main_guard`), and what jobs print (the pipeline's summary, a hand-given
candidate, previewed batches).

Jobs import only this module and the stages (pipeline/stages/); tests/test_layering.py holds them to it.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import traceback

from pipeline import assets, batches, checkpoint as checkpoint_lib, families, hold as hold_lib, preflight, registry
from pipeline import runtime, storage, tracking
from pipeline.config import RunConfig, load_config
from pipeline.evaluate import units
from pipeline.evaluate.units import Model
from pipeline.records import Candidate
from pipeline.stages import store
from pipeline.stages.prepare import prepare_data
from pipeline.stages.training import datasets
from pipeline.train import driver, sweep as sweep_lib


def parse(description: str, argv: list[str] | None = None, extra=None, *,
          job: str = "job") -> tuple[RunConfig, argparse.Namespace]:
    """A job's arguments (``--config``, repeatable ``--set KEY=VALUE``, ``--verbose``, and what ``extra(parser)``
    adds) and its loaded config; ``job`` names the job in a failure's line. ``--verbose`` sets DISTIL_VERBOSE=1
    for this process. Bad arguments or a config that does not load (a ValueError from
    :func:`pipeline.config.load_config`) exit with status 2 and one ``error: ...`` line (SystemExit, argparse's
    convention); any other exception while loading exits with status 1 and :func:`report_failure`'s line."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="a YAML run config, e.g. configs/tiny.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted override, repeatable: --set loss.temperature=4")
    parser.add_argument("--verbose", action="store_true",
                        help="also show Ray's, DeepSpeed's and MLflow's own logs (the same as DISTIL_VERBOSE=1)")
    if extra:
        extra(parser)
    args = parser.parse_args(argv)
    if args.verbose:
        # One setting, one place: the driver reads it in start() and passes it to every Ray worker.
        os.environ[runtime.VERBOSE_ENV] = "1"
    try:
        cfg = load_config(args.config, args.overrides)
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")
    except Exception as e:  # noqa: BLE001 -- one line and a log (main_guard), not a traceback
        parser.exit(1, report_failure(job, e, None) + "\n")
    return cfg, args


def start(cfg: RunConfig, *, with_ray: bool = True, with_tracking: bool = True,
          check_teacher: bool | None = None) -> float:
    """Hold the run folder, connect to MLflow and Ray (unless told not to); returns the cluster's CPU count.
    ``check_teacher``: whether preflight checks the tokenizer, the teacher and the layer map (default: when Ray
    starts here; a job that trains but starts Ray later, after more checks, passes True). Raises ValueError (one
    line) when another live job holds the run folder (pipeline/hold.py).

    What the run prints is set up first (pipeline/runtime.py): quiet libraries unless ``--verbose`` or
    ``DISTIL_VERBOSE=1``, a progress bar or lines.
    """
    verbose = runtime.is_verbose()
    worker_env = runtime.configure_output(verbose=verbose)

    # Before Ray or MLflow: the run folders, the tokenizer, a pretrained or init_from teacher and the layer map.
    preflight.check(cfg, teacher=False)
    hold(cfg)  # before anything is written under the run folder; main_guard gives it back
    if with_ray if check_teacher is None else check_teacher:
        preflight.check(cfg, teacher=True)

    if with_tracking:
        tracking.setup(cfg.run.root, cfg.tracking.experiment)
    if not with_ray:
        return 0.0
    return float(runtime.init_ray(cfg.run, env=worker_env, verbose=verbose).get("CPU", 0))


def start_ray(cfg: RunConfig) -> float:
    """Connect to Ray after ``start(cfg, with_ray=False)`` (a job that checks its input first); returns the CPUs."""
    verbose = runtime.is_verbose()
    return float(runtime.init_ray(cfg.run, env=runtime.configure_output(verbose=verbose), verbose=verbose).get("CPU", 0))


def hold(cfg: RunConfig) -> None:
    """Hold ``cfg``'s run folder for this job until :func:`main_guard` ends it (:func:`start` does it for the job's
    own config; a job that also writes other runs' folders holds each). Raises pipeline/hold.py's one-line
    ValueError when another live job holds it."""
    hold_lib.take(cfg)


def check_cluster(cfg: RunConfig, cluster_cpus: float, *, sweep: bool, evaluate: bool) -> None:
    """Raise ValueError when a run of the stages ahead cannot be placed on the cluster of ``cluster_cpus`` CPUs: a
    training run's workers (teacher, distill), a sweep trial's (its workers and its driver, with ``sweep``), a
    fine-tuning unit's (with ``evaluate``). The stages check again when they start; the pipeline job calls this
    once Ray is up, so that a sweep trial that cannot fit does not fail after prepare, teacher and distill."""
    driver.check_fits(cfg, cluster_cpus)
    if sweep:
        sweep_lib.max_concurrent_trials(cfg, cluster_cpus)
    if evaluate and cfg.evaluate.mode == "finetune":
        units.units_at_once(cfg, cluster_cpus)


def main_guard(fn, cfg: RunConfig | None = None, *, job: str) -> int:
    """Run the body ``fn`` of the job ``job`` ("distill") and return its exit status; never a bare traceback.

    - 0 when ``fn`` returns.
    - 2 for a ValueError (bad input caught at the edge): one ``error: …`` line, the root cause's message when it
      came back from a Ray task.
    - 130 for KeyboardInterrupt (Ctrl-C): one line saying that the same command resumes the job.
    - 1 for any other exception: one line naming the root cause (through Ray's wrappers, :func:`root_cause`)
      and a log file that holds the whole traceback (:func:`failure_log`: under ``<run.root>/<run.name>/logs/``
      when ``cfg`` names a local run folder, else a temporary file); ``--verbose`` prints the traceback too.

    Whatever happens, the job's holds on run folders are given back when it ends.
    """
    try:
        fn()
    except KeyboardInterrupt:
        print(f"[distil] {job} stopped by an interrupt (Ctrl-C): run the same command again to resume it",
              file=sys.stderr)
        return 130
    except ValueError as e:
        print(f"error: {root_cause(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 -- the job's last word: one line and a log, whatever went wrong
        print(report_failure(job, e, cfg), file=sys.stderr)
        return 1
    finally:
        hold_lib.release_all()
    return 0


def root_cause(exc: BaseException) -> BaseException:
    """The exception behind Ray's wrappers: a ``RayTaskError``'s cause, a Ray Train ``WorkerGroupError``'s
    failure of the lowest rank, a ``ControllerError``'s failure, and the ``__cause__`` of any other exception of
    Ray's own (``ray.data.exceptions.UserCodeException``); ``exc`` itself when it wraps nothing."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        failures = getattr(exc, "worker_failures", None)
        if _from_ray(exc) and isinstance(failures, dict) and failures:
            inner = failures[min(failures)]
        elif _from_ray(exc) and isinstance(getattr(exc, "controller_failure", None), BaseException):
            inner = exc.controller_failure
        elif _from_ray(exc) and isinstance(getattr(exc, "cause", None), BaseException):
            inner = exc.cause
        elif _from_ray(exc) and exc.__cause__ is not None:
            inner = exc.__cause__
        else:
            return exc
        exc = inner
    return exc


def _from_ray(exc: BaseException) -> bool:
    return type(exc).__module__.split(".")[0] == "ray"


def report_failure(job: str, exc: BaseException, cfg: RunConfig | None) -> str:
    """The one line a job ends with after an unexpected exception: ``[distil] <job> failed: <Type>: <message>
    (full traceback in <log>; rerun with --verbose to print it)``. Writes the traceback to :func:`failure_log`
    first, and prints it to stderr too under ``--verbose``; when no log can be written, the traceback is printed
    so that it is never lost."""
    cause = root_cause(exc)
    lines = str(cause).strip().splitlines()
    shown = f"{type(cause).__name__}: {lines[0][:300]}" if lines else type(cause).__name__
    text = "".join(traceback.format_exception(exc))
    if cause is not exc:
        text += "\nThe root cause, behind Ray's wrappers:\n" + "".join(traceback.format_exception(cause))
    command = " ".join(getattr(sys, "orig_argv", sys.argv))
    log = failure_log(job, cfg, f"distil {job} failed at {_now()}\ncommand: {command}\n\n{text}")
    verbose = _verbose()
    if verbose or log is None:
        print(text, file=sys.stderr, end="")
    where = "above" if log is None else f"{'above and in' if verbose else 'in'} {log}"
    hint = "" if verbose or log is None else "; rerun with --verbose to print it"
    return f"[distil] {job} failed: {shown} (full traceback {where}{hint})"


def failure_log(job: str, cfg: RunConfig | None, text: str) -> str | None:
    """Write ``text`` to a new log file and return its path: ``<run.root>/<run.name>/logs/<job>-<UTC time>.log``
    when ``cfg`` names a local run folder that can be written, else a ``distil-<job>-*.log`` in the system's
    temporary folder (an s3:// run, a config that did not load); None when neither can be written."""
    name = f"{job}-{_now().replace(':', '').replace('-', '')}"
    if cfg is not None and not storage.is_s3(cfg.run_dir):
        try:
            folder = os.path.join(cfg.run_dir, "logs")
            os.makedirs(folder, exist_ok=True)
            path = os.path.join(folder, f"{name}.log")
            with open(path, "a", encoding="utf-8") as f:
                f.write(text)
            return path
        except OSError:
            pass  # an unwritable run folder: a temporary file
    try:
        fd, path = tempfile.mkstemp(prefix=f"distil-{name}-", suffix=".log")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        return path
    except OSError:
        return None


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _verbose() -> bool:
    try:
        return runtime.is_verbose()
    except ValueError:  # a DISTIL_VERBOSE that is no switch: start() reports it; here, show the traceback
        return True


# ---- what jobs print ------------------------------------------------------------------------------------
def summary(cfg: RunConfig, times: dict[str, tuple[float, bool]], total_s: float) -> str:
    """The pipeline job's closing summary: stage times (``times``: stage → (seconds, skipped)), the teacher, the
    chosen student's metrics, the registered model and where to look (MLflow UI, Ray dashboard)."""
    reg = store.read_record(cfg, "register", needed_by="summary")
    teacher = store.read_record(cfg, "teacher", needed_by="summary")
    lines = ["", "distil: pipeline finished", "  stage times:"]
    width = max([len("total"), *map(len, times)])
    lines += [f"    {k:<{width}} {s:7.1f} s" + ("  (finished earlier: skipped)" if skipped else "") for k, (s, skipped) in times.items()]
    lines.append(f"    {'total':<{width}} {total_s:7.1f} s")
    lines.append(f"  teacher:  {teacher.teacher_uri}")
    lines += [f"    teacher {k} = {teacher.metrics[k]:.4f}" for k in ("val/mlm_loss", "val/mlm_acc", "val/clm_loss",
                                                                           "val/clm_acc", "val/perplexity")
              if k in teacher.metrics]
    lines.append(f"  chosen student: {reg.chosen.source}")
    lines += [f"    student {k} = {reg.chosen.metrics[k]:.4f}"
              for k in ("eval/macro", "val/mlm_loss", "val/mlm_acc", "val/clm_loss", "val/clm_acc", "val/teacher_agreement",
                        "val/perplexity", "loss/total")
              if k in reg.chosen.metrics]
    evaluated = store.load_record(cfg, "evaluate") if cfg.evaluate.tasks else None
    if evaluated is not None:
        lines += ["", *("  " + line for line in evaluated.markdown.splitlines()), ""]
    uri = tracking.tracking_uri(cfg.run.root)
    lines += [
        f"  registered model: {reg.uri}  (version {reg.version})",
        f"    load it: mlflow.transformers.load_model('{reg.uri}'"
        + "".join(f", {k}={v!r}" for k, v in families.get(cfg.teacher.family).pipeline_kwargs.items())
        + f")  with MLFLOW_TRACKING_URI={uri}",
    ]
    distilled = store.load_record(cfg, "task_distill") if cfg.task_distill.tasks else None
    if distilled is not None:
        lines += ["", *("  " + line for line in distilled.markdown.splitlines()), ""]
        for task, t in distilled.tasks.items():
            reg = (t.get("registered") or {}).get("student")
            if reg:
                lines.append(f"  task model for {task}: {reg['uri']}  (version {reg['version']}; "
                             f"mlflow.transformers.load_model('{reg['uri']}') classifies text)")
    exported = store.load_record(cfg, "export") if cfg.export.formats else None
    if exported is not None:
        served = [v for v in exported.variants if v.get("registered")]
        lines += [f"  served model: {v['registered']['uri']} ({v['format']}, {v['latency_ms']:.1f} ms at batch 1, "
                  f"{v['drop']:+.2f} points of masked-token accuracy below PyTorch)" for v in served]
        lines += [f"  not served: {v['reason']}" for v in exported.variants if not v["passed"]]
        for task, t in exported.tasks.items():
            lines += [f"  served {task} model: {v['registered']['uri']} ({v['format']}, {v['latency_ms']:.1f} ms at batch 1, "
                      f"{v['drop']:+.2f} points of dev score below PyTorch)" for v in t["variants"] if v.get("registered")]
            lines += [f"  not served: {v['reason']}" for v in t["variants"] if not v["passed"]]
        lead = next((v["registered"] for v in served if v["registered"]["aliases"]), None)
        if lead:
            lines.append(f"    serve it: source .venv/bin/activate; MLFLOW_TRACKING_URI={uri} mlflow models serve "
                         f"-m models:/{lead['name']}@{lead['aliases'][0]} --env-manager local -p 5001")
    lines += [
        f"  MLflow UI:      .venv/bin/mlflow ui --backend-store-uri {uri} --port 5000   → http://127.0.0.1:5000",
        f"  Ray dashboard:  {runtime.dashboard_url()} (while this Ray runs; `ray start --head` keeps one up)",
    ]
    return "\n".join(lines)


def hand_candidate(*, checkpoint: str | None, model_dir: str | None, metric_pairs: list[str],
                   cfg: RunConfig | None = None) -> Candidate | None:
    """The candidate ``jobs.register`` was given by hand (``--checkpoint``, ``--model-dir``, ``--metric K=V``), or
    None. Raises ValueError for a missing, damaged or incomplete checkpoint, a folder without an exported model,
    or a malformed metric; with ``cfg``, a folder of another family than the run's (:func:`pipeline.assets.check_model_folder`)."""
    metrics = _metrics(metric_pairs)
    if checkpoint:
        if not storage.is_s3(checkpoint) and not os.path.isdir(checkpoint):
            raise ValueError(f"--checkpoint {checkpoint}: no such directory")
        import pyarrow.fs

        fs = storage.pyarrow_filesystem(checkpoint) or pyarrow.fs.LocalFileSystem()
        if reason := checkpoint_lib.stored_reason(fs, storage.fs_path(checkpoint)):
            raise ValueError(f"--checkpoint {checkpoint} is damaged or incomplete ({reason}): register an earlier one")
        saved = storage.read_json(storage.join(checkpoint, checkpoint_lib.METRICS_FILE))
        return Candidate(source="hand:checkpoint", checkpoint=checkpoint, metrics={**(saved or {}), **metrics})
    if model_dir:
        if not os.path.exists(os.path.join(model_dir, "config.json")):
            raise ValueError(f"--model-dir {model_dir}: not an exported HF model directory (no config.json)")
        path = os.path.abspath(model_dir)
        if cfg is not None:  # of the run's family, with its tokenizer's vocabulary
            assets.check_model_folder(path, flag="--model-dir", family=cfg.teacher.family, tokenizer=cfg.data.tokenizer,
                                      cache_root=cfg.cache_dir)
        return Candidate(source="hand:model_dir", checkpoint=path, model_dir=path, metrics=metrics)
    if metric_pairs:
        raise ValueError("--metric goes with --checkpoint or --model-dir")
    return None


def _metrics(pairs: list[str]) -> dict[str, float]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        try:
            out[key] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise ValueError(f"--metric {pair!r}: write it as name=number, e.g. --metric val/mlm_loss=6.2")
    return out


def given_model(cfg: RunConfig, *, model: str | None, checkpoint: str | None, model_dir: str | None):
    """The one model ``jobs.evaluate`` was given (``--model models:/name@alias``, ``--checkpoint URI``,
    ``--model-dir DIR``) as a pipeline.evaluate.units.Model, or None. ValueError when it cannot be found."""
    for flag, value in (("--model", model), ("--checkpoint", checkpoint), ("--model-dir", model_dir)):
        if value is not None and not value.strip():
            raise ValueError(f"{flag} is empty: give a value, or leave the flag out to evaluate every candidate")
    if checkpoint:
        candidate = hand_candidate(checkpoint=checkpoint, model_dir=None, metric_pairs=[])
        return Model(key="given", source=f"checkpoint {checkpoint}", uri=driver.model_uri(checkpoint), checkpoint=checkpoint) if candidate else None
    if model_dir:
        path = os.path.abspath(model_dir)
        _check_model_folder(cfg, path, flag="--model-dir")
        return Model(key="given", source=f"folder {path}", uri=path, checkpoint=path)
    if model:
        return Model(key="given", source=model, uri=registered_model_dir(cfg, model), checkpoint=model)
    return None


def _check_model_folder(cfg: RunConfig, path: str, *, flag: str) -> None:
    """:func:`pipeline.assets.check_model_folder` for the run's family and tokenizer, and the evaluate stage's
    ``evaluate.max_seq_len``."""
    assets.check_model_folder(path, flag=flag, family=cfg.teacher.family, tokenizer=cfg.data.tokenizer,
                              cache_root=cfg.cache_dir, max_seq_len=cfg.evaluate.max_seq_len)


def registered_model_dir(cfg: RunConfig, uri: str) -> str:
    """A registered model downloaded to the run's cache: the folder of its Hugging Face files
    (:func:`pipeline.registry.download_model`)."""
    return registry.download_model(uri, cfg.cache_dir, flag="--model")


def preview_batches(cfg: RunConfig, num_batches: int, rows: int) -> list[dict]:
    """Rank 0's first ``num_batches`` masked micro-batches of distillation (pipeline/batches.py preview), each as
    {"arrays": input_ids/attention_mask/labels numpy arrays, "title": its header line, "text": ``rows`` rows
    decoded with the chosen positions marked}. Prepares the corpus first if needed (a no-op when cached)."""
    manifest = prepare_data(cfg)
    tokenizer = assets.load_tokenizer(cfg.data.tokenizer, cfg.cache_dir)
    train = datasets(cfg, manifest)["train"]
    out = []
    for i, b in enumerate(batches.preview(cfg, manifest, train, tokenizer, num_batches)):
        title = (f"--- micro-batch {i} (rank 0, step {i // cfg.optim.grad_accum}), "
                 f"digest {batches.digest(b['input_ids'], b['labels'])} ---")
        out.append({"arrays": b, "title": title, "text": batches.render(b, tokenizer, rows)})
    return out
