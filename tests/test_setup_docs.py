"""What a new user meets first: .ci/setup (which torch build it installed), the
README (model syntax, registry names, its own workloads page, the torchvision
shim) and CI running the README's test command."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def _stub_torch(tmp_path: Path, version: str, cuda: str | None) -> Path:
    """A directory with a stand-in ``torch`` package reporting a version and build."""
    pkg = tmp_path / "stub" / "torch"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(
        f"__version__ = {version!r}\nclass version:\n    cuda = {cuda!r}\n"
    )
    return pkg.parent


def _check_torch(tmp_path: Path, version: str, cuda: str | None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(_stub_torch(tmp_path, version, cuda))}
    return subprocess.run(
        [sys.executable, str(ROOT / ".ci" / "check_torch.py")],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip


def test_setup_check_names_the_build(tmp_path):
    ok = _check_torch(tmp_path / "cpu", "2.13.0+cpu", None)
    assert ok.returncode == 0 and "torch 2.13.0+cpu (CPU build)" in ok.stdout
    # PyPI's Linux wheel reports the same version string: only torch.version.cuda tells
    cuda = _check_torch(tmp_path / "cuda", "2.13.0", "13.0")
    assert cuda.returncode == 1
    assert "CUDA 13.0 build" in cuda.stderr and f"TORCH_INDEX_URL={CPU_INDEX}" in cuda.stderr
    old = _check_torch(tmp_path / "old", "2.11.0+cpu", None)
    assert old.returncode == 1 and "expected 2.13.0" in old.stderr


def _run_setup(tmp_path: Path, cuda: str | None, index: str | None) -> tuple[int, list[str]]:
    """Run .ci/setup with a ``python`` on PATH whose pip only logs its arguments and
    whose torch is a stand-in; returns the exit status and the pip calls."""
    stub = _stub_torch(tmp_path, "2.13.0" if cuda else "2.13.0+cpu", cuda)
    log = tmp_path / "pip.log"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(
        "#!/usr/bin/env bash\n"
        'if [[ "$1" == "-m" && "$2" == "pip" ]]; then shift 2; echo "$*" >> ' + f"'{log}'\n"
        "  exit 0\nfi\n"
        f"PYTHONPATH='{stub}' exec '{sys.executable}' \"$@\"\n"
    )
    (bin_dir / "python").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    env.pop("TORCH_INDEX_URL", None)
    if index:
        env["TORCH_INDEX_URL"] = index
    out = subprocess.run(["bash", str(ROOT / ".ci" / "setup")], capture_output=True, text=True,
                         env=env, timeout=120)  # fmt: skip
    calls = log.read_text().splitlines() if log.exists() else []
    return out.returncode, calls


def test_setup_takes_torch_from_the_cpu_index_when_asked(tmp_path):
    code, calls = _run_setup(tmp_path / "plain", None, None)
    assert code == 0 and calls[0].endswith("torch==2.13.0") and "--index-url" not in calls[0]
    code, calls = _run_setup(tmp_path / "index", None, CPU_INDEX)
    assert code == 0 and f"--index-url {CPU_INDEX} torch==2.13.0" in calls[0]
    assert all("--index-url" not in c for c in calls[1:])  # only torch comes from there


def test_setup_stops_right_after_a_cuda_torch(tmp_path):
    code, calls = _run_setup(tmp_path, "13.0", None)
    assert code != 0 and len(calls) == 1  # nothing installed on top of the wrong torch


# ----------------------------------------------------------------------------
# README


def test_readme_lists_the_model_syntax_and_every_registry_name():
    from vitkernels.models import list_models

    from vitkernels.compare import VIT_PYTORCH_MODULES

    missing = [name for name in list_models() if f"`{name}`" not in README]
    assert not missing, f"README.md does not list {missing}"
    assert "`timm:NAME`" in README and "`vit-pytorch:CLASS`" in README
    assert "vit-pytorch:module.Class" in README
    assert all(f"`{cls}`" in README for cls in VIT_PYTORCH_MODULES)


def test_readme_carries_its_own_workloads_page_and_the_cpu_index():
    assert "../shared" not in README
    cited = re.findall(r"[\w./-]*WORKLOADS\.md", README)
    assert cited and set(cited) == {"bench/WORKLOADS.md"}, cited
    assert CPU_INDEX in README and "TORCH_INDEX_URL" in README
    assert "ensure_torchvision_importable()" in README


def _readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    return [line.strip() for b in blocks for line in b.splitlines() if line.startswith("bash .ci/setup")]


def test_ci_runs_the_readme_test_command():
    commands = _readme_commands()
    assert len(commands) == 2, commands
    test_cmd = next(c for c in commands if "pytest" in c).split("&&", 1)[1].strip()
    run_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_cmd in run_lines and "bash .ci/setup" in run_lines


def test_torchvision_shim_lets_timm_import():
    if importlib.util.find_spec("timm") is None:
        pytest.skip("timm is not installed")
    code = (
        "from vitkernels.compare import ensure_torchvision_importable\n"
        "ensure_torchvision_importable()\n"
        "import timm, vit_pytorch\n"
        "ensure_torchvision_importable()\n"  # a second call leaves it as it is
        "print('imported', timm.__version__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "imported" in out.stdout, out.stderr[-2000:]

