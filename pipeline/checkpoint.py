"""Full-state checkpoints: the engine's state from every rank, plus what the loop needs to continue.

Layout of one checkpoint directory (merged by Ray Train from every rank's upload):
    engine/               weights, optimizer, scheduler: DeepSpeed's ZeRO shards (one file per rank), or the
                          replicated state of scaling.strategy=ddp (one file, rank 0's; the other ranks' lists
                          name no engine file)
    ranks/<r>.json        what rank r wrote (path → bytes): the proof that its part is complete  (every rank)
    train_state.json      step, tokens seen, epoch, batch within the epoch, seed, world size   (rank 0)
    config.json           the resolved RunConfig, and the git SHA                              (rank 0)
    metrics.json          the metrics reported with it, held-out ones included                 (rank 0)
    hf_model/             the exported HF model, in the final checkpoint only                  (rank 0)

Atomicity. Ray Train registers a checkpoint only after every rank's upload returned, so a run that dies
mid-upload never hands that checkpoint back. The small JSON files are written to a temporary name and
renamed, so a crash mid-write leaves no half file; each rank writes its list last, with every file's size and
SHA-256. A registered checkpoint can still be damaged later (a shard deleted or cut short by hand, a lifecycle
rule on the bucket, a file overwritten): ``find_resumable`` checks every listed file's presence and size and
every JSON file's content (cheap, on the storage), ``load`` checks every file's SHA-256 before DeepSpeed
reads it, and ``restore`` falls back to the newest checkpoint that passes both, naming each one it skips
and why. Whatever the damage (a missing, empty, cut-off or overwritten file, JSON of the wrong shape,
bytes that are not text, a directory where a file belongs) it is a reason, never an exception.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import posixpath
from dataclasses import asdict, dataclass

from pipeline import storage

ENGINE_DIR = "engine"
ENGINE_TAG = "state"
RANKS_DIR = "ranks"
STATE_FILE = "train_state.json"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
HF_DIR = "hf_model"


@dataclass
class TrainState:
    """The loop's position, saved as ``train_state.json``: optimizer steps done, global real (non-pad) tokens
    seen, the epoch and the number of batches already read in it (where the data resumes), the run's seed and
    the world size (the number of rank lists a complete checkpoint holds). Every field is a count ≥ 0;
    world_size ≥ 1."""

    step: int = 0
    tokens_seen: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    seed: int = 0
    world_size: int = 1


class DamagedCheckpointError(RuntimeError):
    """A checkpoint whose files are not the ones its ranks wrote; ``reason`` says which and how."""

    def __init__(self, directory: str, reason: str):
        super().__init__(f"checkpoint {directory} is incomplete ({reason}) and cannot be resumed")
        self.reason = reason


def save(engine, directory: str, state: TrainState, *, config: dict, git_sha: str, rank: int,
         metrics: dict | None = None) -> None:
    """Every rank calls this (DeepSpeed's save is collective); rank 0 adds the small JSON files.

    Call it after everything else this rank puts in ``directory`` (the exported ``hf_model/``): the rank's
    list, written last, names every file below ``directory`` with its size in bytes and its SHA-256.
    """
    engine.save_checkpoint(os.path.join(directory, ENGINE_DIR), tag=ENGINE_TAG)
    if rank == 0:
        _write(os.path.join(directory, STATE_FILE), asdict(state))
        _write(os.path.join(directory, CONFIG_FILE), {"config": config, "git_sha": git_sha})
        _write(os.path.join(directory, METRICS_FILE), metrics or {})
    written = {}
    for dirpath, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, directory).replace(os.sep, "/")
            written[rel] = {"bytes": os.path.getsize(path), "sha256": _sha256_local(path)}
    _write(os.path.join(directory, RANKS_DIR, f"{rank}.json"), written)


def load(engine, directory: str) -> TrainState:
    """Restore the engine in place from a local checkpoint directory and return the loop state.

    Every file is checked first, SHA-256 included; a damaged checkpoint raises DamagedCheckpointError
    before DeepSpeed reads anything (``restore`` then falls back to an older one).
    """
    problem = incomplete_reason(_local_listing(directory), lambda rel: _read_local(directory, rel),
                                digest=lambda rel: _sha256_local(os.path.join(directory, rel)))
    if problem:
        raise DamagedCheckpointError(directory, problem)
    load_path, _ = engine.load_checkpoint(os.path.join(directory, ENGINE_DIR), tag=ENGINE_TAG)
    if load_path is None:
        raise RuntimeError(f"the engine found no state of its own under {directory}/{ENGINE_DIR}: a checkpoint "
                           "of the other scaling.strategy? Resume with the strategy that wrote it")
    state, _ = _parse_state(_read_local(directory, STATE_FILE))
    return state


def restore(engine, run_path: str, registered: str | None, filesystem,
            open_dir) -> tuple[TrainState | None, str | None, list[str]]:
    """Load the newest undamaged checkpoint at or before ``registered`` into ``engine``.

    ``open_dir(path)`` is a context manager that yields a local directory holding that checkpoint's files
    (``ray.train.Checkpoint(path, filesystem=...).as_directory``). Every rank reaches the same choice: it
    depends only on the stored files. Returns (state or None, path or None, ["path: reason", ...]).
    """
    skipped: list[str] = []
    below = None
    while True:
        path, more = find_resumable(run_path, registered, filesystem, below=below)
        skipped += more
        if path is None:
            return None, None, skipped
        with open_dir(path) as local:
            try:
                return load(engine, local), path, skipped
            except DamagedCheckpointError as e:
                skipped.append(f"{path}: {e.reason}")
        below = path


def incomplete_reason(listing: dict[str, int], read, *, digest=None) -> str | None:
    """Why a checkpoint is not complete, or None when it is. Never raises for damaged content.

    ``listing`` maps each relative path present (files only) to its size; ``read(rel)`` returns a file's
    bytes or text; ``digest(rel)``, when given, its SHA-256 hex digest (reads every file: ``load`` passes it).
    Complete means: ``train_state.json`` is a valid state; each of its ``world_size`` ranks' lists is valid,
    and every file it names is there with the listed size (and SHA-256); every listed JSON file is a JSON
    object, ``config.json`` and ``metrics.json`` of the shape ``save`` writes.
    """
    if STATE_FILE not in listing:
        return f"no {STATE_FILE}"
    try:
        _, world_size = _parse_state(_text(read, STATE_FILE))
        expected: dict[str, dict] = {}
        for r in range(world_size):
            rank_file = posixpath.join(RANKS_DIR, f"{r}.json")
            if rank_file not in listing:
                return f"rank {r}'s part is missing ({rank_file})"
            for rel, entry in _parse_rank_list(rank_file, _text(read, rank_file)).items():
                if rel not in listing:
                    return f"{rel} is missing"
                if listing[rel] != entry["bytes"]:
                    return f"{rel} has {listing[rel]} bytes, {entry['bytes']} were written"
                expected[rel] = entry
        for rel in sorted(expected):
            if rel.endswith(".json") and rel != STATE_FILE and not rel.startswith(RANKS_DIR + "/"):
                _check_json_file(rel, _text(read, rel))
        if digest is not None:
            for rel, entry in sorted(expected.items()):
                if entry.get("sha256") is not None and digest(rel) != entry["sha256"]:
                    return f"{rel} is not the file that was written (its SHA-256 differs)"
    except _Damage as e:
        return str(e)
    except OSError as e:  # unreadable: a directory where a file belongs, permissions, a vanished object
        return f"a file cannot be read ({type(e).__name__}: {' '.join(str(e).split())[:200]})"
    return None


def find_resumable(run_path: str, registered: str | None, filesystem, *,
                   below: str | None = None) -> tuple[str | None, list[str]]:
    """The newest complete checkpoint of a run at or before the one Ray Train registered, and what was skipped.

    ``run_path`` is the run's folder on ``filesystem``, holding its ``checkpoint_<timestamp>`` siblings;
    ``registered`` is the path Ray Train handed back, or None when it registered none. Any checkpoint newer
    than that was never registered (its upload or report was cut short) and is skipped too. With ``below``
    (a checkpoint path), only checkpoints older than it are considered, and newer ones are not reported again.
    The checks are those of ``incomplete_reason`` without SHA-256 (they read only the JSON files).
    Returns (path or None, ["path: reason", ...]).
    """
    import pyarrow.fs as pafs

    run_path = run_path.rstrip("/")
    chosen = posixpath.basename(registered.rstrip("/")) if registered else ""
    floor = posixpath.basename(below.rstrip("/")) if below else None
    try:
        infos = filesystem.get_file_info(pafs.FileSelector(run_path))
    except FileNotFoundError:
        infos = []
    siblings = sorted((posixpath.basename(i.path) for i in infos
                       if i.type == pafs.FileType.Directory and posixpath.basename(i.path).startswith("checkpoint_")),
                      reverse=True)
    skipped = []
    for name in siblings:
        path = posixpath.join(run_path, name)
        if floor is not None and name >= floor:
            continue
        if name > chosen:
            skipped.append(f"{path}: never registered by Ray Train (cut short while being written or reported)")
            continue
        reason = stored_reason(filesystem, path)
        if reason is None:
            return path, skipped
        skipped.append(f"{path}: {reason}")
    return None, skipped


def stored_reason(filesystem, path: str) -> str | None:
    """``incomplete_reason`` of the checkpoint at ``path`` on a pyarrow ``filesystem``, without SHA-256 (it
    reads only the JSON files)."""
    import pyarrow.fs as pafs

    if filesystem.get_file_info(path).type != pafs.FileType.Directory:
        return "not a directory"

    def read(rel):
        with filesystem.open_input_stream(posixpath.join(path, rel)) as f:
            return f.read()

    return incomplete_reason(_fs_listing(filesystem, path), read)


class _Damage(ValueError):
    """One damaged file: the message is the reason ``incomplete_reason`` returns."""


def _text(read, rel: str) -> str:
    try:
        data = read(rel)
        return data.decode("utf-8") if isinstance(data, bytes) else data
    except UnicodeDecodeError:
        raise _Damage(f"{rel} is not text (binary garbage where JSON belongs)") from None


def _json_object(rel: str, text: str) -> dict:
    if not text.strip():
        raise _Damage(f"{rel} is empty")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise _Damage(f"{rel} is not valid JSON, cut off or overwritten ({e.msg} at char {e.pos})") from None
    except (ValueError, RecursionError) as e:  # an integer too long to convert, nesting too deep
        raise _Damage(f"{rel} is not valid JSON ({type(e).__name__}: {str(e)[:100]})") from None
    if not isinstance(value, dict):
        raise _Damage(f"{rel} holds a JSON {type(value).__name__}, not an object")
    return value


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _parse_state(text: str) -> tuple[TrainState, int]:
    """``train_state.json`` as a TrainState, and its world size; _Damage when it is not one."""
    raw = _json_object(STATE_FILE, text)
    fields = [f.name for f in dataclasses.fields(TrainState)]
    missing, unknown = [k for k in fields if k not in raw], sorted(set(raw) - set(fields))
    if missing or unknown:
        what = ([f"lacks {', '.join(missing)}"] if missing else []) + ([f"unknown keys {', '.join(unknown)}"] if unknown else [])
        raise _Damage(f"{STATE_FILE} is not a train state ({'; '.join(what)})")
    bad = [f"{k}={raw[k]!r}" for k in fields if not _is_count(raw[k])]
    if bad or raw["world_size"] < 1:
        raise _Damage(f"{STATE_FILE} holds values that are not counts ({', '.join(bad) or 'world_size=0'})")
    return TrainState(**raw), raw["world_size"]


def _parse_rank_list(rel: str, text: str) -> dict[str, dict]:
    """A rank's list as {path: {"bytes": n, "sha256": hex or None}} (older lists hold only the size)."""
    out = {}
    for path, entry in _json_object(rel, text).items():
        if _is_count(entry):
            entry = {"bytes": entry, "sha256": None}
        if (not isinstance(entry, dict) or not _is_count(entry.get("bytes"))
                or not isinstance(entry.get("sha256"), (str, type(None)))):
            raise _Damage(f"{rel} is not a list of written files (the entry for {path!r} is {entry!r})")
        out[path] = entry
    return out


def _check_json_file(rel: str, text: str) -> None:
    value = _json_object(rel, text)
    if rel == CONFIG_FILE and not (isinstance(value.get("config"), dict) and isinstance(value.get("git_sha"), str)):
        raise _Damage(f"{rel} lacks the resolved config or the git SHA (keys: {sorted(value)[:5]})")


def _fs_listing(filesystem, path: str) -> dict[str, int]:
    import pyarrow.fs as pafs

    infos = filesystem.get_file_info(pafs.FileSelector(path, recursive=True))
    return {posixpath.relpath(i.path, path): i.size for i in infos if i.type == pafs.FileType.File}


def _local_listing(directory: str) -> dict[str, int]:
    import pyarrow.fs as pafs

    return _fs_listing(pafs.LocalFileSystem(), os.path.abspath(directory))


def _read_local(directory: str, rel: str) -> bytes:
    with open(os.path.join(directory, rel), "rb") as f:
        return f.read()


def _sha256_local(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _write(path: str, payload: dict) -> None:
    """Write JSON atomically (pipeline/storage.py write_json: a temporary name of its own, then a rename; a crash
    or a second writer leaves no half file)."""
    storage.write_json(path, payload)
