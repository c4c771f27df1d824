"""From a YAML file to a validated :class:`~pipeline.config.tree.RunConfig`: :func:`load_config` and
:func:`resolve_paths`.

The order is the precedence (dataclass defaults < YAML file < ``--set a.b=v``; a Tune sample comes later, in the
sweep's trial): the file is read by pipeline/config/yaml_reader.py, built strictly by pipeline/config/build.py,
the overrides applied, ``$VAR``, ``${VAR}`` and ``~`` expanded in every path setting and local folders made
absolute (:func:`resolve_paths`), and every semantic problem collected by pipeline/config/checks.py
(:func:`~pipeline.config.checks.validate`).
"""

from __future__ import annotations

import dataclasses
import os
import re
import typing
from pathlib import Path

from pipeline.config import checks, yaml_reader
from pipeline.config.build import parse_overrides, shown
from pipeline.config.paths import PathSetting
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
    """Expand ``$VAR``, ``${VAR}`` and a leading ``~`` in every path setting (the fields tree.py marks with
    :class:`~pipeline.config.tree.PathSetting`), then make the local run folders absolute, so that Ray workers,
    other nodes and `ray job submit` see the same folders.

    Raises one ValueError with a line per problem, each naming the key and the variable: an unset or empty
    variable, a ``${…}`` that is not a plain name, a ``~user`` this machine does not know.
    """
    raw, problems = cfg.to_dict(), []
    for section in dataclasses.fields(RunConfig):
        hints = typing.get_type_hints(type(getattr(cfg, section.name)), include_extras=True)
        for name, hint in hints.items():
            marker = next((m for m in getattr(hint, "__metadata__", ()) if isinstance(m, PathSetting)), None)
            if marker is not None:
                values = raw[section.name]
                values[name] = _expand_all(values[name], f"{section.name}.{name}", marker.keys, problems)
    if problems:
        raise ValueError("\n".join(problems))
    cfg = RunConfig.from_dict(raw)
    folders = {"run.root": cfg.run.root, "run.storage": cfg.run.storage, "data.output": cfg.data.output,
               "evaluate.glue_dir": cfg.evaluate.glue_dir}
    local = {k: os.path.abspath(v) for k, v in folders.items() if v and not _is_remote(v)}
    return cfg.with_overrides(local)


def _expand_all(value, key: str, keys: tuple[str, ...], problems: list[str]):
    """A path setting's value expanded: a text, each text of a list, and in a list's mappings the ``keys`` (a text or
    a list of texts)."""
    if isinstance(value, str):
        return _expand(value, key, problems)
    if not isinstance(value, list):
        return value
    out = []
    for i, item in enumerate(value):
        if isinstance(item, str):
            item = _expand(item, f"{key}[{i}]", problems)
        elif isinstance(item, dict):
            item = {k: _expand_all(v, f"{key}[{i}].{k}", (), problems) if k in keys else v for k, v in item.items()}
        out.append(item)
    return out


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_VARIABLE = re.compile(r"\$(?:\$|\{(?P<braced>[^}]*)\}?|(?P<name>[A-Za-z_][A-Za-z0-9_]*))")


def _expand(text: str, key: str, problems: list[str]) -> str:
    """``text`` with a leading ``~`` or ``~user`` (the home folder) and ``$NAME`` or ``${NAME}`` (environment
    variables) expanded; ``$$`` is a literal ``$``, and a ``$`` before anything else stays as it is. Each
    problem (an unset or empty variable, a ``${…}`` that is not a name, an unknown user) is appended to
    ``problems`` as one line naming ``key``; the text is then returned as far as it could be expanded."""
    written = text
    if text.startswith("~"):
        text = os.path.expanduser(text)
        if text.startswith("~"):
            user = text[1:].split("/", 1)[0]
            problems.append(f"{key}: {written!r} starts with ~{user}, and this machine has no user {user!r}: write the "
                            "folder out")

    def variable(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        braced = m.group("braced")
        name = m.group("name") if braced is None else braced
        if braced is not None and not (m.group(0).endswith("}") and _NAME.fullmatch(braced)):
            where = f" in {written!r}" if m.group(0) != written else ""
            problems.append(f"{key}: {m.group(0)!r}{where} is not a variable: write ${{NAME}} or $NAME "
                            "(letters, digits and _; no defaults such as ${NAME:-x}), or $$ for a literal $")
            return m.group(0)
        value = os.environ.get(name)
        if not value:
            state = "is empty" if value == "" else "is not set"
            problems.append(f"{key}: the environment variable {name} in {written!r} {state}: export {name}=… before "
                            "the job starts, or write the path out ($$ for a literal $)")
            return m.group(0)
        return value

    return _VARIABLE.sub(variable, text)


def _is_remote(path: str) -> bool:
    return "://" in path
