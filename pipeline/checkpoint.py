"""Full-state checkpoints: DeepSpeed engine state from every rank, plus what the loop needs to continue.

Layout of one checkpoint directory (merged by Ray Train from every rank's upload):
    engine/               DeepSpeed: weights, optimizer, scheduler, ZeRO shards (one file per rank)
    ranks/<r>.json        what rank r wrote (path → bytes): the proof that its part is complete  (every rank)
    train_state.json      step, tokens seen, epoch, batch within the epoch, seed, world size   (rank 0)
    config.json           the resolved RunConfig, and the git SHA                              (rank 0)
    metrics.json          the metrics reported with it, held-out ones included                 (rank 0)
    hf_model/             the exported HF model, in the final checkpoint only                  (rank 0)

Atomicity. Ray Train registers a checkpoint only after every rank's upload returned, so a run that dies
mid-upload never hands that checkpoint back. A registered one can still be damaged later (a shard deleted
by hand, a lifecycle rule on the bucket): ``find_resumable`` checks every file against the ranks' lists and
falls back to the newest complete checkpoint, naming each one it skips.
"""

from __future__ import annotations

import json
import os
import posixpath
from dataclasses import asdict, dataclass

ENGINE_DIR = "engine"
ENGINE_TAG = "state"
RANKS_DIR = "ranks"
STATE_FILE = "train_state.json"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
HF_DIR = "hf_model"


@dataclass
class TrainState:
    step: int = 0
    tokens_seen: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    seed: int = 0
    world_size: int = 1


def save(engine, directory: str, state: TrainState, *, config: dict, git_sha: str, rank: int,
         metrics: dict | None = None) -> None:
    """Every rank calls this (DeepSpeed's save is collective); rank 0 adds the small JSON files."""
    engine.save_checkpoint(os.path.join(directory, ENGINE_DIR), tag=ENGINE_TAG)
    if rank == 0:
        _write(os.path.join(directory, STATE_FILE), asdict(state))
        _write(os.path.join(directory, CONFIG_FILE), {"config": config, "git_sha": git_sha})
        _write(os.path.join(directory, METRICS_FILE), metrics or {})
    written = {}
    for dirpath, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(dirpath, name)
            written[os.path.relpath(path, directory)] = os.path.getsize(path)
    _write(os.path.join(directory, RANKS_DIR, f"{rank}.json"), written)


def load(engine, directory: str) -> TrainState:
    """Restore the engine in place and return the loop state. A checkpoint without its state is refused."""
    problem = incomplete_reason(_local_listing(directory), lambda rel: _read_local(directory, rel))
    if problem:
        raise RuntimeError(f"checkpoint {directory} is incomplete ({problem}) and cannot be resumed")
    load_path, _ = engine.load_checkpoint(os.path.join(directory, ENGINE_DIR), tag=ENGINE_TAG)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed found no engine state under {directory}/{ENGINE_DIR}")
    with open(os.path.join(directory, STATE_FILE)) as f:
        return TrainState(**json.load(f))


def incomplete_reason(listing: dict[str, int], read) -> str | None:
    """Why a checkpoint is not complete, or None when it is.

    ``listing`` maps each relative path present to its size; ``read(rel)`` returns a small file's text.
    Complete means: the train state is there, and every file each of its ``world_size`` ranks listed is
    there with the listed size.
    """
    if STATE_FILE not in listing:
        return f"no {STATE_FILE}"
    world_size = json.loads(read(STATE_FILE)).get("world_size", 1)
    for r in range(world_size):
        rank_file = posixpath.join(RANKS_DIR, f"{r}.json")
        if rank_file not in listing:
            return f"rank {r}'s part is missing ({rank_file})"
        for rel, size in json.loads(read(rank_file)).items():
            if rel not in listing:
                return f"{rel} is missing"
            if listing[rel] != size:
                return f"{rel} has {listing[rel]} bytes, {size} were written"
    return None


def find_resumable(run_path: str, registered: str | None, filesystem) -> tuple[str | None, list[str]]:
    """The newest complete checkpoint of a run at or before the one Ray Train registered, and what was skipped.

    ``run_path`` is the run's folder on ``filesystem``, holding its ``checkpoint_<timestamp>`` siblings;
    ``registered`` is the path Ray Train handed back, or None when it registered none. Any checkpoint newer
    than that was never registered (its upload or report was cut short) and is skipped too.
    Returns (path or None, ["path: reason", ...]).
    """
    import pyarrow.fs as pafs

    run_path = run_path.rstrip("/")
    chosen = posixpath.basename(registered.rstrip("/")) if registered else ""
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
        if name > chosen:
            skipped.append(f"{path}: never registered by Ray Train (cut short while being written or reported)")
            continue
        listing = _fs_listing(filesystem, path)

        def read(rel, path=path):
            with filesystem.open_input_stream(posixpath.join(path, rel)) as f:
                return f.read().decode()

        reason = incomplete_reason(listing, read)
        if reason is None:
            return path, skipped
        skipped.append(f"{path}: {reason}")
    return None, skipped


def _fs_listing(filesystem, path: str) -> dict[str, int]:
    import pyarrow.fs as pafs

    infos = filesystem.get_file_info(pafs.FileSelector(path, recursive=True))
    return {posixpath.relpath(i.path, path): i.size for i in infos if i.type == pafs.FileType.File}


def _local_listing(directory: str) -> dict[str, int]:
    import pyarrow.fs as pafs

    return _fs_listing(pafs.LocalFileSystem(), os.path.abspath(directory))


def _read_local(directory: str, rel: str) -> str:
    with open(os.path.join(directory, rel)) as f:
        return f.read()


def _write(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True, default=str)
