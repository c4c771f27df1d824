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
    p.write_text("run: {name: t}\nloss: {temperature: 3.0}\noptim: {max_steps: 7, warmup_steps: 1}\n")
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


# ---- $VAR, ${VAR} and ~ in path settings --------------------------------------------------------------------
def _path_fields() -> dict[str, tuple[str, ...] | None]:
    """Every field tree.py marks as a path setting: dotted name -> its mapping keys (None for a text or a list)."""
    import dataclasses
    import typing

    from pipeline.config.paths import PathSetting

    out = {}
    for section in dataclasses.fields(RunConfig):
        for name, hint in typing.get_type_hints(section.default_factory, include_extras=True).items():
            for marker in getattr(hint, "__metadata__", ()):
                if isinstance(marker, PathSetting):
                    out[f"{section.name}.{name}"] = marker.keys or None
    return out


def test_every_path_setting_expands_environment_variables_and_home(tmp_path, monkeypatch):
    """run.root: $SCRATCH/runs is the folder under $SCRATCH, not a folder named '$SCRATCH' in the working directory;
    likewise ${VAR} and ~ in every path setting, from the YAML file and from --set."""
    from pipeline.config.load import resolve_paths

    monkeypatch.chdir(tmp_path)
    home, scratch, corpus = tmp_path / "home", tmp_path / "scratch", tmp_path / "corpus"
    for folder in (home / "glue", corpus):
        folder.mkdir(parents=True)
    (corpus / "t.csv").write_text("text,label\na,0\n")
    (home / "d.csv").write_text("text,label\nb,1\n")
    monkeypatch.setenv("SCRATCH", str(scratch))
    monkeypatch.setenv("CORPUS", str(corpus))
    monkeypatch.setenv("HOME", str(home))
    fields = _path_fields()
    assert {"run.root", "run.storage", "data.sources", "data.output", "data.tokenizer", "teacher.source",
            "teacher.init_from", "evaluate.glue_dir", "evaluate.tasks"} <= set(fields)
    p = tmp_path / "c.yaml"
    p.write_text("run: {name: t, root: $SCRATCH/runs, storage: '${SCRATCH}/ray'}\n"
                 "data: {sources: [$CORPUS/a.txt, '~/b/*.jsonl', 's3://bucket/${USER_PREFIX}x', package:pydoc_topics],\n"
                 "       output: ~/prepared, tokenizer: ~/tok}\n"
                 "evaluate: {glue_dir: ~/glue, tasks: [glue:rte, {name: mine, train_file: $CORPUS/t.csv, dev_file: ~/d.csv,"
                 " text_field: $CORPUS}]}\n")
    monkeypatch.setenv("USER_PREFIX", "team/")
    cfg = load_config(p, ["teacher.source=${SCRATCH}/bert"])
    assert (cfg.run.root, cfg.run.storage) == (f"{scratch}/runs", f"{scratch}/ray")
    assert cfg.data.sources == [f"{corpus}/a.txt", f"{home}/b/*.jsonl", "s3://bucket/team/x", "package:pydoc_topics"]
    assert (cfg.data.output, cfg.data.tokenizer, cfg.teacher.source) == (f"{home}/prepared", f"{home}/tok", f"{scratch}/bert")
    assert cfg.evaluate.glue_dir == f"{home}/glue"
    assert cfg.evaluate.tasks == ["glue:rte", {"name": "mine", "train_file": f"{corpus}/t.csv", "dev_file": f"{home}/d.csv",
                                               "text_field": "$CORPUS"}]  # text_field names a column, not a path
    assert not list(tmp_path.glob("$*")), "no folder named after the variable"
    # Every marked setting, through --set: a list setting takes a list, the task list a mapping with each path key.
    for key, keys in fields.items():
        values = [f"[{{name: x, {k}: $SCRATCH/v}}]" for k in keys] if keys else ["$SCRATCH/v", "[$SCRATCH/v]"]
        for value in values:
            try:
                got = resolve_paths(RunConfig().with_overrides(parse_overrides([f"{key}={value}"])))
            except ValueError:
                continue  # a list for a text setting, or a text for a list one
            section, name = key.split(".")
            shown = str(getattr(getattr(got, section), name))
            assert str(scratch / "v") in shown and "$" not in shown, (key, shown)
            break
        else:
            raise AssertionError(f"{key}: no value of its type was accepted")


def test_an_unset_variable_in_a_path_is_one_line_naming_it_and_the_key(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SCRATCH", raising=False)
    monkeypatch.delenv("NOPE", raising=False)
    monkeypatch.setenv("EMPTY", "")
    p = tmp_path / "c.yaml"
    p.write_text("run: {name: t, root: $SCRATCH/runs}\n")
    with pytest.raises(ValueError) as e:
        load_config(p)
    assert str(e.value) == ("run.root: the environment variable SCRATCH in '$SCRATCH/runs' is not set: export "
                            "SCRATCH=… before the job starts, or write the path out ($$ for a literal $)")
    with pytest.raises(ValueError) as e:
        load_config(p, ["run.root=/tmp/r", "data.sources=[a.txt, '${NOPE}/b.txt']", "data.output=$EMPTY/out",
                        "evaluate.glue_dir=${NOPE:-/glue}", "teacher.source=~no-such-user-here/bert"])
    lines = str(e.value).splitlines()
    assert len(lines) == 4, lines
    assert lines[0].startswith("data.sources[1]: the environment variable NOPE in '${NOPE}/b.txt' is not set")
    assert lines[1].startswith("data.output: the environment variable EMPTY in '$EMPTY/out' is empty")
    assert lines[2].startswith("teacher.source: '~no-such-user-here/bert' starts with ~no-such-user-here, and this "
                               "machine has no user")
    assert lines[3].startswith("evaluate.glue_dir: '${NOPE:-/glue}' is not a variable: write ${NAME}")
    assert not list(tmp_path.glob("$*")) and not (tmp_path / "runs").exists()
    cfg = load_config(p, ["run.root=/tmp/a$$b/price$.txt"])  # $$ is a literal $; a $ before no name stays
    assert cfg.run.root == "/tmp/a$b/price$.txt"
