"""The engines under Ray Train on CPU (gloo): DeepSpeed ZeRO stages 0-3 and scaling.strategy=ddp, 1 vs 2 workers,
fault injection, resume.

Every run here distils the same tiny random teacher on the same tiny corpus, so final weights can be
compared exactly: the data order and the masks depend only on the seed and the global step.
"""

import glob
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from pipeline import assets, checkpoint, cli, models
from pipeline.config import TeacherSection, load_config
from pipeline.corpus import loading, prepare
from pipeline.train import driver

pytestmark = pytest.mark.slow

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.yaml")
STEPS = 4


@pytest.fixture(scope="module")
def setup(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    base = load_config(CONFIG, [f"run.root={root}", "run.name=engine", "data.max_docs=600", "data.max_seq_len=32"])
    cache = str(root / "cache")
    tok_path = assets.resolve_local(base.data.tokenizer, cache)
    manifest = prepare.prepare(base.data, data_dir=base.data_dir, run_root=base.run.root, tokenizer_path=tok_path,
                               tokenizer_name=base.data.tokenizer)
    tokenizer = assets.load_tokenizer(base.data.tokenizer, cache)
    teacher = models.build_teacher_for_pretraining(
        TeacherSection(num_layers=2, hidden_size=32, num_heads=2, intermediate_size=64, max_position_embeddings=64),
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, seed=1,
    )
    teacher_dir = assets.export_model(teacher, tokenizer, str(root / "teacher"))
    # Without dropout, for comparing 1 and 2 workers: a rank's dropout RNG cannot match another split of rows.
    teacher.config.hidden_dropout_prob = teacher.config.attention_probs_dropout_prob = 0.0
    nodrop_dir = assets.export_model(teacher, tokenizer, str(root / "teacher-nodrop"))
    datasets = loading.load_splits(manifest, materialize_max_gib=1.0)
    return {"root": root, "teacher": teacher_dir, "nodrop": nodrop_dir, "datasets": datasets}


def _fit(setup, name, *overrides, expect_failure=False, teacher="teacher"):
    cfg = load_config(CONFIG, [
        f"run.root={setup['root']}", "run.name=engine", "data.max_seq_len=32", f"optim.max_steps={STEPS}",
        "optim.micro_batch_size=4", "optim.warmup_steps=2", "checkpoint.every_steps=2", "eval.every_steps=2",
        "eval.max_batches=1", "data.shuffle_buffer_rows=64", f"teacher.source={setup[teacher]}", *overrides,
    ])
    work = driver.worker_config(cfg, task="distill", teacher_uri=setup[teacher], run_id=None, replicated_data=True)
    if expect_failure:  # the injected fault itself (pipeline/train/worker.py), not any other failure of the run
        import ray.train

        step = cfg.faults.fail_at_step
        with pytest.raises(ray.train.WorkerGroupError,
                           match=rf"faults\.fail_at_step={step}: injected failure after step {step}") as failed:
            driver.fit(cfg, name=name, datasets=setup["datasets"], work=work)
        # A job's last line names the worker's own exception behind Ray's wrapper, and the log holds the rest.
        line = cli.report_failure("distill", failed.value, cfg)
        assert line.startswith(f"[distil] distill failed: RuntimeError: faults.fail_at_step={step}: injected failure "
                               f"after step {step} (full traceback in {cfg.run_dir}/logs/distill-"), line
        return None
    result = driver.fit(cfg, name=name, datasets=setup["datasets"], work=work)
    assert result.metrics["step"] == STEPS
    return result


def _weights(result) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(result.checkpoint.path, "hf_model", "model.safetensors"))


def _assert_same(a, b, atol):
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=atol, rtol=0), f"{k}: max diff {(wa[k] - wb[k]).abs().max():.3g}"


@pytest.fixture(scope="module")
def reference(setup):
    """4 steps straight, 2 workers, ZeRO-2."""
    return _fit(setup, "ref")


def test_reference_run_trains_and_checkpoints_full_state(reference):
    ckpt = reference.checkpoint.path
    assert os.path.exists(os.path.join(ckpt, "train_state.json"))
    assert len(glob.glob(os.path.join(ckpt, "engine", "state", "*optim_states.pt"))) == 2
    assert reference.metrics["val/mlm_loss"] > 0


def test_resubmitting_a_failed_run_continues_from_its_checkpoint(setup, reference):
    """Under ZeRO-3: checkpoints at steps 1 and 2, a failure at 3, and the step-2 checkpoint damaged before
    resubmission: the resubmitted run reports it, resumes from step 1, and still ends on the straight run's weights."""
    before = set(glob.glob(str(setup["root"] / "engine" / "faults" / "*")))
    zero3 = ("checkpoint.every_steps=1", "deepspeed.zero_stage=3")
    _fit(setup, "resubmit", "faults.fail_at_step=3", *zero3, expect_failure=True)
    assert len(set(glob.glob(str(setup["root"] / "engine" / "faults" / "*"))) - before) == 1
    newest = _checkpoints_by_step(setup["root"] / "engine" / "ray" / "resubmit")
    assert sorted(newest) == [1, 2]
    os.remove(glob.glob(os.path.join(newest[2], "engine", "state", "*optim_states.pt"))[0])
    again = _fit(setup, "resubmit", "faults.fail_at_step=3", *zero3)  # same name and storage
    assert again.metrics["resume/from_step"] == 1
    assert again.metrics["resume/ignored_checkpoints"] == 1
    _assert_same(reference, again, atol=1e-5)


def test_ddp_resubmitted_after_a_failure_ends_on_the_zero2_weights(setup, reference):
    """scaling.strategy=ddp (plain PyTorch, DDP over the 2 gloo workers): the same fault and damage as above, the
    same resume, and the final weights of the ZeRO-2 reference (same data, masks, dropout, LR: fp32 to 1e-5)."""
    ddp = ("scaling.strategy=ddp", "deepspeed.zero_stage=0", "checkpoint.every_steps=1")
    _fit(setup, "resubmit-ddp", "faults.fail_at_step=3", *ddp, expect_failure=True)
    newest = _checkpoints_by_step(setup["root"] / "engine" / "ray" / "resubmit-ddp")
    assert sorted(newest) == [1, 2]
    with open(os.path.join(newest[2], "ranks", "1.json")) as f:
        assert not any(rel.startswith("engine/") for rel in json.load(f)), "rank 1 holds a replica: it writes none"
    os.remove(os.path.join(newest[2], "engine", "state", "torch_engine_states.pt"))
    again = _fit(setup, "resubmit-ddp", "faults.fail_at_step=3", *ddp)
    assert again.metrics["resume/from_step"] == 1
    assert again.metrics["resume/ignored_checkpoints"] == 1
    _assert_same(reference, again, atol=1e-5)


def _checkpoints_by_step(run_storage) -> dict[int, str]:
    out = {}
    for d in glob.glob(os.path.join(run_storage, "checkpoint_*", "")):
        with open(os.path.join(d, "train_state.json")) as f:
            out[json.load(f)["step"]] = d
    return out


def test_a_damaged_checkpoint_is_detected_file_by_file(reference, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(reference.checkpoint.path, ckpt)

    def reason():
        return checkpoint.incomplete_reason(checkpoint._local_listing(str(ckpt)), lambda rel: (ckpt / rel).read_text())

    assert reason() is None
    shard = sorted(glob.glob(str(ckpt / "engine" / "state" / "*optim_states.pt")))[1]
    with open(shard, "r+b") as f:
        f.truncate(100)  # an upload cut short
    assert reason().startswith(f"engine/state/{os.path.basename(shard)} has 100 bytes")
    os.remove(shard)
    assert reason() == f"engine/state/{os.path.basename(shard)} is missing"
    os.remove(ckpt / "ranks" / "1.json")
    assert reason() == "rank 1's part is missing (ranks/1.json)"
    os.remove(ckpt / "train_state.json")
    assert reason() == "no train_state.json"


def test_one_worker_matches_two_and_zero_0_matches_zero_1(setup):
    """Two equivalences, each a comparison that changes one thing (three fits, each ~40 s of CI), at the same global
    batch and without dropout: ZeRO-1 against ZeRO-0 on 2 workers, then 2 workers against 1 under ZeRO-0. With the
    reference (ZeRO-2) and the resubmitted run (ZeRO-3) above, every stage is checked."""
    zero1 = _fit(setup, "two-workers-nodrop-zero1", "deepspeed.zero_stage=1", teacher="nodrop")
    zero0 = _fit(setup, "two-workers-nodrop-zero0", "deepspeed.zero_stage=0", teacher="nodrop")
    _assert_same(zero1, zero0, atol=1e-5)  # the ZeRO stage alone differs
    one = _fit(setup, "one-worker-nodrop-zero0", "scaling.num_workers=1", "optim.micro_batch_size=8",
               "deepspeed.zero_stage=0", teacher="nodrop")
    _assert_same(zero0, one, atol=1e-5)  # the number of workers alone differs
