"""From YAML and ``--set`` values to typed config sections: strict, one error per problem.

pipeline/config/yaml_reader.py reads the text (an unquoted scalar stays a :class:`yaml_reader.Plain`); :func:`build`
turns the mapping into a frozen dataclass tree, reading each value by the type its field declares: a text
field takes the text (``run.name: off`` is the run "off"), a number field reads ``1e-4`` or ``1_000``, an
integer field takes ``1e3`` as 1000 and refuses ``2.5``, a boolean field reads true/false and yes/no/on/off.
An unknown key, a value of the wrong type, a non-finite number or one that underflows to 0 raises one
``ValueError`` that names the dotted key and says what it expects. :func:`parse_overrides` and
:func:`set_dotted` apply ``--set a.b=value`` overrides (and Tune samples) to a config's dict.

This module knows dataclasses and type hints, not the sections themselves (pipeline/config/tree.py).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any

from pipeline.config import yaml_reader

_EXAMPLE = {int: " (e.g. 1000 or 1e3)", float: " (e.g. 0.001 or 1e-3)"}
_KIND = {int: "an integer", float: "a number", bool: "true or false", str: "text"}


def build(cls, raw: Any, path: str = ""):
    """An instance of the dataclass ``cls`` from the mapping ``raw``; ``path`` is the dotted key of ``raw``
    ("" for the top level), used in messages. Keys left out keep their defaults.

    Raises ValueError for a ``raw`` that is not a mapping, an unknown key (listing the allowed ones), or a
    value that does not match its field's type.
    """
    if not isinstance(raw, dict):
        raise ValueError(f"{path or 'config'}: expected a mapping of its keys (indented under it, or {{key: value}}), "
                         f"got {shown(raw)}{': delete the empty section or give it keys' if _empty(raw) else ''}")
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
        return build(tp, value, path)
    if tp is Any:
        return yaml_reader.resolve(value)
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
            raise ValueError(f"{path}: expected a list, got {shown(value)}; write [a, b], or [] for none"
                             f"{_hash_hint(value)}")
        (arg,) = typing.get_args(tp)
        return [_coerce(arg, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{path}: expected a mapping, got {shown(value)}{_hash_hint(value)}")
        return yaml_reader.resolve(dict(value))
    if isinstance(value, yaml_reader.Plain):
        return _from_text(tp, str(value), path)
    if tp in (int, float, bool) and isinstance(value, str):
        return _from_text(tp, value, path)  # a quoted "3e-4" or "true"
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if tp in (int, float) and isinstance(value, bool):
        raise ValueError(f"{path}: expected {_KIND[tp]}, got a boolean {value!r}")
    if not isinstance(value, tp):
        raise ValueError(f"{path}: expected {_KIND.get(tp, tp.__name__)}{_EXAMPLE.get(tp, '')}, got {shown(value)}")
    if tp is float and not math.isfinite(value):
        raise ValueError(f"{path}: expected a finite number, got {value!r}")
    return value


def _hash_hint(value: Any) -> str:
    """For text that was meant as a list or mapping but holds a YAML comment: how to keep the ``#``."""
    if isinstance(value, str) and yaml_reader.has_comment(value):
        return (" (YAML reads ' #' as the start of a comment: quote an item that holds a '#', e.g. [a, \"b #2\"], and "
                "write nothing after the closing bracket)")
    return ""


def _from_text(tp, text: str, path: str):
    """A scalar typed as text (unquoted YAML, or a number in quotes) read as the field's type."""
    if tp is str:
        return text
    if tp is bool:
        value = yaml_reader.parse_bool(text)
    else:
        value = yaml_reader.parse_number(text)
        if tp is int and isinstance(value, float) and value.is_integer():
            value = int(value)  # max_steps: 1e4
        elif tp is float and isinstance(value, int):
            value = float(value)
    if not isinstance(value, tp):
        if tp is not bool and yaml_reader.underflows(text):
            raise ValueError(f"{path}: {text!r} underflows to 0.0 in double precision: write the value you mean")
        raise ValueError(f"{path}: expected {_KIND[tp]}{_EXAMPLE.get(tp, '')}, got {text!r}")
    if tp is float and not math.isfinite(value):
        raise ValueError(f"{path}: expected a finite number, got {text!r}")
    return value


def shown(value: Any) -> str:
    """How a message names a value: its kind and its repr ("an integer 3", "the text 'off'", "nothing (an
    empty value)" for a key given no value)."""
    if value is None or (isinstance(value, yaml_reader.Plain) and not value.strip()):
        return "nothing (an empty value)"
    if isinstance(value, str):
        return f"the text {str(value)!r}"
    kinds = ((bool, "a boolean"), (int, "an integer"), (float, "a number"), (list, "a list"), (dict, "a mapping"))
    kind = next((k for t, k in kinds if isinstance(value, t)), type(value).__name__)
    return f"{kind} {value!r}"


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["a.b=v", …]`` to ``{"a.b": v}``: everything after the first ``=`` is the value, read by the field that
    receives it (``optim.lr=1e-4`` is a number, ``run.name=off`` the text off). An unquoted value is the text as
    typed (its outer spaces aside): YAML's comments, anchors and line folding do not apply, so
    ``tracking.experiment=distil student #2`` keeps its ``#2``. A quoted value is YAML's string, and one written
    ``[…]`` or ``{…}`` a list or mapping; either followed by a comment, and any value YAML cannot read, is the text
    typed (so a list field refuses it, quoting it whole)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {item!r} must look like section.key=value, e.g. loss.temperature=4")
        out[key.strip()] = _override_value(value, item)
    return out


def _override_value(value: str, item: str) -> Any:
    try:
        parsed = yaml_reader.load(value, source=f"--set {item}")
    except ValueError:
        return yaml_reader.Plain(value.strip())
    typed_as_text = (
        isinstance(parsed, yaml_reader.Plain)  # plain text: as typed, not as YAML folds it
        or (parsed is None and value.strip())  # "#2": all comment
        or (isinstance(parsed, (dict, list)) and not value.lstrip().startswith(("{", "[")))  # `exp: v2` is text
        or yaml_reader.has_comment(value)  # `[a, b] #2`, `"x" #2`: YAML would drop the #2
    )
    return yaml_reader.Plain(value.strip()) if typed_as_text else parsed


def set_dotted(raw: dict, dotted: str, value: Any) -> None:
    """Set ``raw[a][b] = value`` for ``dotted`` "a.b", in place; the key must exist already (``raw`` is a full
    config's dict, so a misspelt key is an error, not a new key).

    Raises ValueError for an unknown key, and for a key under ``sweep.space`` (whose keys hold dots).
    """
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
        raise ValueError(f"unknown config key {dotted!r}; see the sections in pipeline/config/tree.py")
    node[parts[-1]] = value


def _empty(value: Any) -> bool:
    """A YAML value with nothing in it: null, or a bare ``key:`` line."""
    return value is None or (isinstance(value, str) and not value.strip())
