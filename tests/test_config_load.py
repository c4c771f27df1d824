from pathlib import Path

import pytest

from pipeline import engine
from pipeline.config import RunConfig, load_config
from pipeline.config.build import parse_overrides

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("**/*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_builds_its_deepspeed_config(path):
    cfg = load_config(path)
    ds = engine.build_ds_config(cfg.deepspeed, cfg.optim, world_size=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu)
    assert ds["train_batch_size"] == cfg.scaling.num_workers * cfg.optim.micro_batch_size * cfg.optim.grad_accum
    assert ds["zero_optimization"]["stage"] == cfg.deepspeed.zero_stage
    assert Path(cfg.run.root).is_absolute()


def test_distilbert_base_is_the_papers_recipe():
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "distilbert-base.yaml")
    assert cfg.teacher.source == "bert-base-uncased"
    assert (cfg.loss.temperature, cfg.loss.alpha_ce, cfg.loss.alpha_mlm, cfg.loss.alpha_cos) == (2.0, 5.0, 2.0, 1.0)
    assert cfg.scaling.use_gpu and cfg.deepspeed.precision == "bf16"
    ds = engine.build_ds_config(cfg.deepspeed, cfg.optim, world_size=cfg.scaling.num_workers, use_gpu=True)
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]


def test_cli_override_wins_over_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("run: {name: t}\nloss: {temperature: 3.0}\noptim: {max_steps: 7}\n")
    cfg = load_config(p, ["loss.temperature=4", "student.layer_map=[0, 3]"])
    assert cfg.loss.temperature == 4.0 and isinstance(cfg.loss.temperature, float)
    assert cfg.optim.max_steps == 7
    assert cfg.student.layer_map == [0, 3]


def test_unknown_key_is_an_error_that_lists_the_allowed_keys(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("run: {name: t}\nloss: {temprature: 2.0}\n")
    with pytest.raises(ValueError, match=r"temprature.*allowed.*temperature"):
        load_config(p)


def test_wrong_type_is_an_error_naming_the_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("run: {name: t}\noptim: {max_steps: many}\n")
    with pytest.raises(ValueError, match=r"optim.max_steps: expected an integer"):
        load_config(p)


def test_unknown_override_key_is_an_error():
    with pytest.raises(ValueError, match="loss.temp"):
        RunConfig().with_overrides({"loss.temp": 3})
    with pytest.raises(ValueError, match="section.key=value"):
        parse_overrides(["loss.temperature"])


def test_validation_collects_every_problem(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("run: {name: t}\nloss: {temperature: 0.0, alpha_ce: -1.0}\ndeepspeed: {zero_stage: 5}\nsweep: {space: {loss.nope: {type: choice, values: [1]}}}\n"
                 "data: {read_chunk_mb: 0}\n")
    with pytest.raises(ValueError) as e:
        load_config(p)
    msg = str(e.value)
    for fragment in ("loss.temperature", "alphas", "zero_stage", "sweep.space.loss.nope", "data.read_chunk_mb=0"):
        assert fragment in msg


def test_missing_config_file_says_what_to_pass(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_fp16_on_cpu_is_refused_before_anything_starts(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("run: {name: t}\ndeepspeed: {precision: fp16}\n")
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        load_config(p)


def test_derived_paths_sit_under_the_resolved_run_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = tmp_path / "c.yaml"
    p.write_text("run: {name: t, root: runs/x}\n")
    cfg = load_config(p)
    root = str(tmp_path / "runs" / "x")  # a relative root is made absolute, so workers see the same folders
    assert cfg.cache_dir == f"{root}/cache"
    assert (cfg.run_dir, cfg.storage_path, cfg.data_dir) == (f"{root}/t", f"{root}/t/ray", f"{root}/t/data")
    s3 = cfg.with_overrides({"run.root": "s3://bucket/runs", "data.output": "s3://bucket/data"})
    assert (s3.cache_dir, s3.data_dir) == ("s3://bucket/runs/cache", "s3://bucket/data")
