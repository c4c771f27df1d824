"""Reading config YAML without YAML 1.1's surprises: text stays text, numbers are numbers, no key is lost.

PyYAML implements YAML 1.1, whose implicit typing bites ML configs: ``1e-4`` is a string (1.1 wants a dot),
``off``/``no``/``yes``/``on`` are booleans, ``2024-01-01`` is a date, ``010`` is the octal 8, and a key that
appears twice silently keeps the second value. Here:

- every *plain* (unquoted) scalar is kept as :class:`Plain`, the text exactly as typed; the config builder
  decides what it means from the field's type (pipeline/config/build.py ``_coerce``): a text field takes the
  text, a number field parses it (``1e-4``, ``1_000``, ``2.0e-3``), a bool field takes true/false (and
  yes/no/on/off, which cannot mean anything else there);
- where no type is declared (``sweep.space``, ``student.layer_map``), :func:`resolve` applies the YAML 1.2
  core schema: true/false, null, decimal/0o/0x integers, floats with or without a dot, else text;
- a key repeated in one mapping is an error naming both lines;
- a syntax error becomes one line naming the file, line and column, with the usual fix.
"""

from __future__ import annotations

import math
import re
from typing import Any

import yaml


class Plain(str):
    """An unquoted YAML scalar, kept as the text typed; its meaning depends on the field that receives it."""


class ConfigYAMLError(ValueError):
    """Config YAML that cannot be read (a syntax error, a repeated key), as one line naming the file, line and
    column, with the usual fix; a ValueError, so a job prints it as ``error: ...``."""

    pass


_NULL = re.compile(r"^(?:~|null|Null|NULL|)$")
_BOOL = {"true": True, "false": False}
_BOOL_WORDS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}
_INT = re.compile(r"^[-+]?(?:[0-9](?:_?[0-9])*|0o[0-7](?:_?[0-7])*|0x[0-9a-fA-F](?:_?[0-9a-fA-F])*)$")
_FLOAT = re.compile(r"^[-+]?(?:(?:[0-9](?:_?[0-9])*)?\.[0-9](?:_?[0-9])*|[0-9](?:_?[0-9])*\.?)(?:[eE][-+]?[0-9]+)?$")
_SPECIAL_FLOAT = {".inf": math.inf, "+.inf": math.inf, "-.inf": -math.inf, ".nan": math.nan}


class _Loader(yaml.SafeLoader):
    """SafeLoader with no implicit typing (every plain scalar is a :class:`Plain`) and no duplicate keys."""

    yaml_implicit_resolvers: dict = {}

    def construct_yaml_str(self, node):
        value = super().construct_scalar(node)
        return Plain(value) if node.style is None else str(value)

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<:` merges; a key of its own may override it
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, (str, int, float, bool, type(None))):
                raise yaml.constructor.ConstructorError(
                    None, None, "a key must be a plain name, not a list or a mapping", key_node.start_mark)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {str(key)!r} appears twice in one mapping (first at line "
                    f"{seen[key].line + 1}), so one of its values would be silently lost: merge them into one",
                    key_node.start_mark)
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


_Loader.add_constructor("tag:yaml.org,2002:str", _Loader.construct_yaml_str)
_Loader.add_implicit_resolver("tag:yaml.org,2002:merge", re.compile(r"^(?:<<)$"), ["<"])  # `<<: *defaults` still merges


def load(text: str, *, source: str) -> Any:
    """Parse one YAML document; raise :class:`ConfigYAMLError` (a ValueError) in one line naming ``source``."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{source}, line {mark.line + 1}, column {mark.column + 1}" if mark else source
        problem = " ".join(str(e.problem or e.context or e).split())
        raise ConfigYAMLError(f"{where}: {problem}{_fix(problem)}") from None
    except yaml.YAMLError as e:
        raise ConfigYAMLError(f"{source}: {' '.join(str(e).split())}") from None


def _fix(problem: str) -> str:
    if "'\\t'" in problem or "\\t" in problem:
        return ": YAML allows no tab there: indent (and separate comments) with spaces, or quote a value holding a tab"
    if problem.startswith("the key"):
        return ""
    if "mapping values are not allowed" in problem:
        return ": a value that contains ': ' must be quoted, and nested keys need consistent indentation"
    if "found character" in problem and "cannot start any token" in problem:
        return ": quote the value that starts with that character"
    return ": check the indentation and quoting on that line (YAML)"


def has_comment(text: str) -> bool:
    """Whether YAML reads part of ``text`` as a comment and drops it: a ``#`` outside every token YAML scans (one
    after a space or at the start, outside quotes). False for text YAML cannot scan."""
    try:
        spans = [(t.start_mark.index, t.end_mark.index) for t in yaml.scan(text, Loader=_Loader)]
    except yaml.YAMLError:
        return False
    return any(c == "#" and not any(a <= i < b for a, b in spans) for i, c in enumerate(text))


def resolve(value: Any) -> Any:
    """YAML 1.2 core typing for values with no declared type; recurses into lists and mappings."""
    if isinstance(value, dict):
        return {resolve(k): resolve(v) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve(v) for v in value]
    if not isinstance(value, Plain):
        return value
    text = str(value)
    if _NULL.match(text):
        return None
    if text in ("true", "True", "TRUE", "false", "False", "FALSE"):
        return _BOOL[text.lower()]
    number = parse_number(text)
    return text if number is None else number


def parse_number(text: str) -> int | float | None:
    """An int or float written as YAML 1.2 or Python would (``1e-4``, ``2.0e-3``, ``1_000``, ``0x10``,
    ``.inf``); None if ``text`` is not a number."""
    t = text.strip()
    if _INT.match(t):
        return int(t.replace("_", ""), 0) if t.lstrip("+-")[:2] in ("0o", "0x") else int(t.replace("_", ""))
    if _FLOAT.match(t) and any(c.isdigit() for c in t):
        value = float(t.replace("_", ""))
        mantissa = re.split(r"[eE]", t)[0]
        if value == 0.0 and any(c in "123456789" for c in mantissa):
            return None  # 1e-400 underflows to 0.0: not the number typed
        return value
    return _SPECIAL_FLOAT.get(t.lower())


def underflows(text: str) -> bool:
    """A float literal with a non-zero mantissa that rounds to 0.0 (``1e-400``)."""
    t = text.strip()
    return bool(_FLOAT.match(t)) and float(t.replace("_", "")) == 0.0 and any(c in "123456789" for c in re.split(r"[eE]", t)[0])


def parse_bool(text: str) -> bool | None:
    """true/false, and yes/no/on/off, for a field declared bool; None if ``text`` is none of them."""
    return _BOOL_WORDS.get(text.strip().lower())
