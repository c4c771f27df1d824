"""What marks a config field as a path setting: read by pipeline/config/load.py, which expands ``$VAR``, ``${VAR}``
and ``~`` in such fields, and used by the sections of pipeline/config/tree.py and pipeline/config/downstream.py."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PathSetting:
    """Marks a field that names files or folders (local paths, globs, s3://, hub ids): ``$VAR``, ``${VAR}`` and a
    leading ``~`` in it are expanded when the config loads (pipeline/config/load.py ``resolve_paths``), YAML and
    ``--set`` alike. ``keys``: in a list of mappings, the keys that hold paths."""

    keys: tuple[str, ...] = ()


PATH = PathSetting()
