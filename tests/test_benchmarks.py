"""The GPU benchmark runs unchanged anywhere: it skips cleanly without CUDA, and its code path runs on CPU."""

import json
import os
import subprocess
import sys

from conftest import ROOT


def _run(*args: str) -> dict:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "benchmarks/gpu_mfu.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_gpu_mfu_skips_cleanly_without_a_gpu(capsys, monkeypatch):
    import importlib.util

    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # this machine has none either way
    spec = importlib.util.spec_from_file_location("gpu_mfu", ROOT / "benchmarks" / "gpu_mfu.py")
    gpu_mfu = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_mfu", gpu_mfu)  # its dataclasses look their module up there
    spec.loader.exec_module(gpu_mfu)
    assert gpu_mfu.main([]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["skipped"] is True and "CUDA" in out["reason"]


def test_gpu_mfu_code_path_runs_on_cpu():
    """Every variant that compiles nothing (HF's step; ZeRO-2 with the separate and the fused loss; DDP, with and
    without the padded vocabulary) runs its steps; the compiled ones are tests/test_step_static.py's business."""
    out = _run("--smoke")
    got = {r["variant"]: r for r in out["results"]}
    assert set(got) == {"hf", "ours_ds_unfused", "ours_ds", "ours_ddp", "ours_ddp_pad64"}
    assert all(r["tokens_per_s"] > 0 and r["model_tflops_per_s"] > 0 for r in got.values())


def test_gpu_mfu_refuses_an_unknown_variant_by_name():
    proc = subprocess.run([sys.executable, "benchmarks/gpu_mfu.py", "--smoke", "--variants", "ours_ds,fastest"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "unknown variants ['fastest']" in proc.stderr


def test_gpu_mfu_compiled_variant_trains_through_the_ddp_engine_on_cpu():
    """compute.compile's path: teacher encoder, head and student compiled in place, the student then wrapped by the
    ddp engine, the vocabulary padded to 64; its steps train the student: every trainable tensor moved (their
    equality with eager is test_step_static's)."""
    out = _run("--smoke", "--variants", "ours_ddp_compile")
    (r,) = out["results"]
    assert r["variant"] == "ours_ddp_compile" and r["tokens_per_s"] > 0
    assert r["trainable_tensors"] > 0 and r["tensors_moved"] == r["trainable_tensors"], r


def _paper_tables(monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("paper_tables", ROOT / "benchmarks" / "paper_tables.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "paper_tables", module)
    spec.loader.exec_module(module)
    return module


def test_paper_tables_write_only_between_the_markers_of_the_files_named(tmp_path, monkeypatch, capsys):
    """The tables are measured figures: --docs replaces an existing marked block (benchmarks/RESULTS.md) and
    refuses a file without one before any work, rather than appending the tables to it (to README.md, say)."""
    paper_tables = _paper_tables(monkeypatch)
    begin, end = paper_tables.BEGIN, paper_tables.END
    marked = tmp_path / "RESULTS.md"
    marked.write_text(f"# Results\n\n{begin}\nold tables\n{end}\n\nafter\n")
    paper_tables.replace_block(str(marked), "new tables")
    assert marked.read_text() == f"# Results\n\n{begin}\nnew tables\n{end}\n\nafter\n"

    readme = tmp_path / "README.md"
    readme.write_text("# distil\n")
    args = ["--render", "--out", str(tmp_path / "none.json"), "--docs", str(marked), str(readme)]
    assert paper_tables.main(args) == 2
    assert "README.md: no <!-- paper-tables:begin -->" in capsys.readouterr().err
    assert readme.read_text() == "# distil\n"
