"""From a YAML file to a validated :class:`~pipeline.config.tree.RunConfig`: :func:`load_config` and
:func:`resolve_paths`.

The order is the precedence (dataclass defaults < YAML file < ``--set a.b=v``; a Tune sample comes later, in the
sweep's trial): the file is read by pipeline/config/yaml_reader.py, built strictly by pipeline/config/build.py,
the overrides applied, local paths made absolute, and every semantic problem collected by
pipeline/config/checks.py (:func:`~pipeline.config.checks.validate`).
"""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.config import checks, yaml_reader
from pipeline.config.build import parse_overrides, shown
from pipeline.config.tree import RunConfig


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML run config, apply ``a.b=value`` overrides, resolve paths, and validate.

    Raises one ValueError naming the file for: a missing or empty file, a YAML syntax error (with its line), a
    key given twice, an unknown key, a value of the wrong type, and every semantic problem of
    :func:`pipeline.config.checks.validate`.
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
    raw = yaml_reader.load(text, source=str(path))
    if not isinstance(raw, (dict, list)):
        raw = yaml_reader.resolve(raw)  # "---" alone is an empty document too
    if raw is None:
        raise ValueError(f"{path} is empty: a config names its run and the settings it changes, e.g. copy "
                         "configs/tiny.yaml and edit it (an empty file would silently run every default)")
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: the top level must be a mapping of sections (run:, data:, …), got {shown(raw)}")
    sets = parse_overrides(overrides or [])
    if not (isinstance(raw.get("run"), dict) and "name" in raw["run"]) and "run.name" not in sets:
        raise ValueError(f"{path} does not set run.name: give every config its own run name (run: {{name: my-run}}, "
                         "or --set run.name=my-run), so its records and checkpoints don't land in another run's folder")
    try:
        cfg = RunConfig.from_dict(raw)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    cfg = resolve_paths(cfg.with_overrides(sets))
    checks.validate(cfg)
    return cfg


def resolve_paths(cfg: RunConfig) -> RunConfig:
    """Make local paths absolute, so that Ray workers and `ray job submit` see the same folders."""
    paths = {"run.root": cfg.run.root, "run.storage": cfg.run.storage, "data.output": cfg.data.output,
             "evaluate.glue_dir": cfg.evaluate.glue_dir}
    local = {k: os.path.abspath(os.path.expanduser(v)) for k, v in paths.items() if v and not _is_remote(v)}
    return cfg.with_overrides(local)


def _is_remote(path: str) -> bool:
    return "://" in path
