"""Full-state checkpoints: DeepSpeed engine state from every rank, plus what the loop needs to continue.

Layout of one checkpoint directory (merged by Ray Train from every rank's upload):
    engine/               DeepSpeed: weights, optimizer, scheduler, ZeRO shards (one file per rank)
    train_state.json      step, tokens seen, epoch, batch within the epoch, seed      (rank 0)
    config.json           the resolved RunConfig, and the git SHA                    (rank 0)
    hf_model/             the exported HF model, in the final checkpoint only          (rank 0)
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

ENGINE_DIR = "engine"
ENGINE_TAG = "state"
STATE_FILE = "train_state.json"
CONFIG_FILE = "config.json"
HF_DIR = "hf_model"


@dataclass
class TrainState:
    step: int = 0
    tokens_seen: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    seed: int = 0


def save(engine, directory: str, state: TrainState, *, config: dict, git_sha: str, is_rank0: bool) -> None:
    """Every rank calls this (DeepSpeed's save is collective); rank 0 adds the small JSON files."""
    engine.save_checkpoint(os.path.join(directory, ENGINE_DIR), tag=ENGINE_TAG)
    if is_rank0:
        _write(os.path.join(directory, STATE_FILE), asdict(state))
        _write(os.path.join(directory, CONFIG_FILE), {"config": config, "git_sha": git_sha})


def load(engine, directory: str) -> TrainState:
    """Restore the engine in place and return the loop state. A checkpoint without its state is refused."""
    state_path = os.path.join(directory, STATE_FILE)
    if not os.path.exists(state_path):
        raise RuntimeError(f"checkpoint {directory} has no {STATE_FILE}: it is incomplete and cannot be resumed")
    load_path, _ = engine.load_checkpoint(os.path.join(directory, ENGINE_DIR), tag=ENGINE_TAG)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed found no engine state under {directory}/{ENGINE_DIR}")
    with open(state_path) as f:
        return TrainState(**json.load(f))


def _write(path: str, payload: dict) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True, default=str)
