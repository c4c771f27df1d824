"""One lock installs on CPU and GPU machines alike (issue 14, item 12).

requirements.lock pins `torch==2.13.0` with no build label (`+cpu`, `+cu128`); `make install TORCH=...` chooses the
build (see the Makefile). The resolution tests run the uv line that `make -n install` prints, with `--dry-run`, into a
throwaway venv: uv reads metadata only and downloads no wheel (from a cold cache about 85 MB of index pages, 2-3 s;
warm, 2-5 s a resolve). Like `make install`, they need https://pypi.org.
"""

import os
import platform
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"
CPU_WHEELS = Path("/opt/wheels")  # the Makefile's TORCH_WHEELS default: where this project's machines keep torch+cpu
CPU_WHEEL_GLOB = "torch-2.13.0+cpu-*.whl"
# Packages that only a CUDA build of torch pulls in: never in the lock, which is resolved against the CPU build.
CUDA_RUNTIME = re.compile(r"^(nvidia-.*|cuda-.*|triton)$")
NO_CPU_WHEEL = f"no {CPU_WHEEL_GLOB} in {CPU_WHEELS} (only this project's machines keep one; elsewhere make install " \
    "takes the CPU build from PyTorch's CPU index, which this test does not reach)"


def _require_cpu_wheel() -> None:
    """Skip without the local CPU wheel, except under CI (CI=true), where its absence is a failure saying so."""
    if not list(CPU_WHEELS.glob(CPU_WHEEL_GLOB)):
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail(f"CI is set and there is {NO_CPU_WHEEL}")
        pytest.skip(NO_CPU_WHEEL)


def _lock_pins(text: str) -> dict[str, str]:
    """`name==version` lines of a requirements file -> {canonical name: version string}."""
    pins = {}
    for line in text.splitlines():
        if m := re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)$", line.strip()):
            pins[canonicalize_name(m[1])] = m[2]
    return pins


def _clean_env() -> dict[str, str]:
    """This process's env without what would steer make or uv: a parent make's MAKEFLAGS carry its command-line
    variables (`make test TORCH=cu128`), and UV_* settings (UV_TORCH_BACKEND, UV_FIND_LINKS, ...) change sources."""
    drop = {"MAKEFLAGS", "MFLAGS", "MAKELEVEL", "TORCH", "TORCH_WHEELS", "TORCH_SOURCE", "TORCH_CPU_SOURCE",
            "TORCH_CPU_WHEEL"}
    return {k: v for k, v in os.environ.items() if k not in drop and not (k.startswith("UV_") and k != "UV_CACHE_DIR")}


def _make_install_lines(venv: Path, *make_vars: str) -> list[list[str]]:
    """The `uv pip install` commands `make install` would run for `venv` with `make_vars`, as argv lists."""
    out = subprocess.run(["make", "-n", "install", f"VENV={venv}", *make_vars], cwd=ROOT, env=_clean_env(),
                         capture_output=True, text=True, check=True).stdout
    lines = [shlex.split(line) for line in out.splitlines() if line.startswith(f"{venv}/bin/uv pip install")]
    assert len(lines) == 2, f"expected the lock and the asset install lines in `make -n install`, got:\n{out}"
    return lines


def _options(argv: list[str]) -> list[str]:
    """A `uv pip install` argv's options, less `uv pip install` and the interpreter's and the lock's paths."""
    skip = {i + 1 for i, a in enumerate(argv) if a in ("--python", "-r")}
    return [a for i, a in enumerate(argv) if i >= 3 and i not in skip and a not in ("--python", "-r")]


def _dry_run(tmp_path: Path, *make_vars: str) -> dict[str, str]:
    """Resolve the lock as `make install` would with `make_vars`, into a fresh venv -> {package: version} planned."""
    import uv

    uv_bin = uv.find_uv_bin()
    venv = tmp_path / "venv"
    subprocess.run([uv_bin, "venv", "--quiet", "--python", sys.executable, str(venv)], check=True, env=_clean_env())
    argv = _make_install_lines(venv, *make_vars)[0]
    proc = subprocess.run([uv_bin, *argv[1:], "--dry-run"], cwd=ROOT, env=_clean_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, (
        f"`{shlex.join(argv)}` does not resolve (uv says why below; like make install, this needs https://pypi.org):\n"
        f"{proc.stderr[-3000:]}")
    plan = {canonicalize_name(m[1]): m[2] for m in re.finditer(r"^ \+ (\S+)==(\S+)$", proc.stderr, re.M)}
    assert plan, f"no ` + name==version` lines in uv's dry-run output:\n{proc.stderr[-3000:]}"
    return plan


def _assert_plan_keeps_the_lock(plan: dict[str, str], torch_version: str) -> set[str]:
    """Every lock pin is planned at its version (torch at `torch_version`); returns the packages beyond the lock."""
    lock = _lock_pins(LOCK.read_text())
    assert plan.get("torch") == torch_version, f"torch resolved to {plan.get('torch')}, expected {torch_version}"
    changed = {n: (v, plan.get(n)) for n, v in lock.items() if n != "torch" and plan.get(n) != v}
    assert not changed, f"the install does not keep the lock's pins ({{name: (lock, planned)}}): {changed}"
    return set(plan) - set(lock)


@pytest.mark.parametrize("source", ["requirements.in", "pyproject.toml"])
def test_every_top_level_pin_is_in_the_lock_at_its_version(source):
    if source == "requirements.in":
        lines = [ln.split("#")[0].strip() for ln in (ROOT / source).read_text().splitlines()]
        reqs = [Requirement(ln) for ln in lines if ln]
    else:
        project = tomllib.loads((ROOT / source).read_text())["project"]
        deps = project["dependencies"] + [d for ds in project["optional-dependencies"].values() for d in ds]
        reqs = [Requirement(d) for d in deps]
    lock = _lock_pins(LOCK.read_text())
    assert len(reqs) >= 9 and len(lock) >= 100, (len(reqs), len(lock))
    missing = [str(r) for r in reqs if canonicalize_name(r.name) not in lock]
    assert not missing, f"{source} asks for {missing}, absent from requirements.lock: run `make lock`"
    wrong = {str(r): lock[canonicalize_name(r.name)] for r in reqs
             if not r.specifier.contains(lock[canonicalize_name(r.name)], prereleases=True)}
    assert not wrong, f"requirements.lock disagrees with {source} ({{pin: locked version}}): {wrong}; run `make lock`"


def test_the_lock_names_no_build_and_no_cuda_package():
    lock = _lock_pins(LOCK.read_text())
    labelled = {n: v for n, v in lock.items() if Version(v).local is not None}
    assert not labelled, f"pins with a build label tie the lock to one machine kind: {labelled}"
    assert lock["torch"] == "2.13.0"
    cuda = sorted(n for n in lock if CUDA_RUNTIME.match(n))
    assert not cuda, f"CUDA runtime packages in the lock would be installed on CPU machines too: {cuda}"


def test_make_lock_reproduces_the_committed_lock(tmp_path):
    """`make lock` on the committed files changes nothing: the lock is current and the target is idempotent."""
    _require_cpu_wheel()
    for name in ("Makefile", "requirements.in", "requirements.lock"):
        (tmp_path / name).write_bytes((ROOT / name).read_bytes())
    proc = subprocess.run(["make", "-s", "lock", f"VENV={Path(sys.prefix)}"], cwd=tmp_path, env=_clean_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"make lock failed (it needs https://pypi.org):\n{proc.stderr[-3000:]}"
    assert (tmp_path / "requirements.lock").read_text() == LOCK.read_text(), \
        "requirements.lock is not what `make lock` writes from requirements.in: run `make lock`"


@pytest.mark.parametrize(("make_vars", "expected"), [
    ((), ["--find-links", "{wheels}"]),
    (("TORCH=cpu", "TORCH_WHEELS={empty}"), ["--torch-backend", "cpu"]),
    (("TORCH=cu128",), ["--torch-backend", "cu128"]),
    (("TORCH=cu130",), ["--torch-backend", "cu130"]),
    (("TORCH=pypi",), []),
])
def test_make_install_chooses_the_torch_build_and_compiles_bytecode(tmp_path, make_vars, expected):
    wheels, empty = tmp_path / "wheels", tmp_path / "empty"
    wheels.mkdir()
    empty.mkdir()
    (wheels / "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl").touch()  # make only checks that it exists
    fill = {"wheels": wheels, "empty": empty}
    make_vars = [v.format(**fill) for v in make_vars]
    if not any(v.startswith("TORCH_WHEELS=") for v in make_vars):
        make_vars.append(f"TORCH_WHEELS={wheels}")
    lock_line, asset_line = _make_install_lines(tmp_path / "venv", *make_vars)
    assert lock_line[-2:] == ["-r", "requirements.lock"], lock_line
    assert _options(lock_line) == ["--compile-bytecode", *[e.format(**fill) for e in expected]], lock_line
    assert _options(asset_line)[:2] == ["--compile-bytecode", "--no-deps"], asset_line


def test_the_cluster_installs_the_lock_as_make_install_torch_cu128_does(tmp_path):
    import yaml

    setup = yaml.safe_load((ROOT / "cluster" / "aws-gpu.yaml").read_text())["setup_commands"]
    lines = [shlex.split(c) for c in setup if "requirements.lock" in c and "uv pip install" in c]
    assert len(lines) == 1, f"expected one setup command installing the lock, got {setup}"
    make_line = _make_install_lines(tmp_path / "venv", "TORCH=cu128")[0]
    assert sorted(_options(lines[0])) == sorted(_options(make_line)), (lines[0], make_line)


def test_the_lock_resolves_from_pypi_alone_to_the_cuda_build(tmp_path):
    """What a GPU machine resolves without the CPU wheel: PyPI's torch 2.13.0 (CUDA on Linux x86_64), every other
    pin kept, and only torch's CUDA runtime packages added."""
    extra = _assert_plan_keeps_the_lock(_dry_run(tmp_path, "TORCH=pypi"), torch_version="2.13.0")
    assert all(CUDA_RUNTIME.match(n) for n in extra), f"beyond the lock: {sorted(extra)}"
    if (sys.platform, platform.machine()) == ("linux", "x86_64"):  # elsewhere PyPI's torch is a CPU build
        assert "nvidia-cuda-runtime" in extra, f"PyPI's torch here is its CUDA build, yet adds only {sorted(extra)}"


def test_make_install_resolves_the_lock_to_the_cpu_wheel_here(tmp_path):
    _require_cpu_wheel()
    extra = _assert_plan_keeps_the_lock(_dry_run(tmp_path), torch_version="2.13.0+cpu")
    assert not extra, f"a CPU install adds nothing to the lock, got {sorted(extra)}"
