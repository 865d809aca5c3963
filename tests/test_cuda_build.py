"""Building and loading the CUDA extension where it cannot be built (CI: CPU torch).

* ``python -m vitkernels build`` and ``VITKERNELS_BUILD_CUDA=1 pip install ...``
  stop with one sentence and a non-zero status on a CPU torch or without a CUDA
  toolkit; without the flag the plain package builds (setup.py never imports torch).
* ``vitkernels.cuda`` says why the extension is not there (CPU torch, not built,
  stale or broken JIT build) and the ops' dispatch reports it when "cuda" is forced.
* The torch-facing launchers (csrc/ops/*.cu) and the bindings compile against the
  installed torch's headers (needs nvcc; no GPU, no linking).
"""

from __future__ import annotations

import os
import re
import runpy
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import vitkernels
from vitkernels import cuda
from vitkernels.ops._dispatch import BackendNotSupportedError

ROOT = Path(__file__).resolve().parent.parent
cpu_torch = pytest.mark.skipif(torch.version.cuda is not None, reason="needs a CPU build of torch")


@pytest.fixture
def fresh_load():
    """Forget the loader's cached answer before and after the test."""
    cuda._load.cache_clear()
    yield
    cuda._load.cache_clear()


@pytest.fixture
def cuda_torch(monkeypatch, tmp_path, fresh_load):
    """Pretend torch is a CUDA build; JIT builds live in an empty temp directory."""
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setenv("VITKERNELS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    return tmp_path / "cache"


def _one_sentence(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line, got:\n{text}"
    return lines[0]


# ----------------------------------------------------------------------------
# python -m vitkernels build


@cpu_torch
def test_build_command_on_cpu_torch_says_so_and_fails():
    proc = subprocess.run(
        [sys.executable, "-m", "vitkernels", "build"], capture_output=True, text=True, cwd=ROOT
    )
    assert proc.returncode != 0
    line = _one_sentence(proc.stderr)
    assert "CPU build" in line and torch.__version__ in line, line


def test_build_without_cuda_toolkit_says_so(cuda_torch, monkeypatch, capsys):
    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)
    assert cuda.build_main([]) == 1
    line = _one_sentence(capsys.readouterr().err)
    assert "no CUDA toolkit found" in line and "12.4" in line, line


def test_build_without_ninja_says_so(cuda_torch, monkeypatch, capsys):
    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "CUDA_HOME", "/usr/local/cuda")
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: False)
    assert cuda.build_main([]) == 1
    assert "ninja is not installed" in _one_sentence(capsys.readouterr().err)


def test_progress_lines_name_the_source():
    nvcc = (
        "/usr/local/cuda/bin/nvcc --generate-dependencies-with-compile --dependency-output "
        "relpos.cuda.o.d -DTORCH_EXTENSION_NAME=vitkernels_C -c {src} -o relpos.cuda.o -O3"
    )
    assert (
        cuda._describe(nvcc.format(src=f"{cuda.CSRC}/ops/relpos.cu")) == "compiling ops/relpos.cu"
    )
    cxx = f"c++ -MMD -MF bindings.o.d -c {cuda.CSRC}/bindings.cpp -o bindings.o -O3"
    assert cuda._describe(cxx) == "compiling bindings.cpp"
    link = (
        "c++ relpos.cuda.o bindings.o -shared -L/usr/local/cuda/lib64 -lcudart -o vitkernels_C.so"
    )
    assert cuda._describe(link) == "linking vitkernels_C.so"


def test_cache_dir_names_torch_cuda_and_archs(cuda_torch, monkeypatch):
    version = torch.__version__.split("+")[0]
    assert cuda.cache_dir() == cuda_torch / f"{version}-cu124-sm80_90"
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0a")
    assert cuda.arch_list() == "9.0a"
    assert cuda.cache_dir().name == f"{version}-cu124-sm90a"


# ----------------------------------------------------------------------------
# setup.py


def _run_setup(monkeypatch, env: dict[str, str], block_torch: bool = False) -> dict:
    """Execute setup.py with setuptools.setup captured; returns its keyword arguments."""
    import setuptools

    captured: dict = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kw: captured.update(kw))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    if block_torch:
        for name in [m for m in sys.modules if m == "torch" or m.startswith("torch.")]:
            monkeypatch.delitem(sys.modules, name)
        monkeypatch.setitem(sys.modules, "torch", None)  # any `import torch` raises ImportError
    runpy.run_path(str(ROOT / "setup.py"), run_name="__main__")
    return captured


def test_setup_without_flag_adds_nothing_and_never_imports_torch(monkeypatch):
    monkeypatch.delenv("VITKERNELS_BUILD_CUDA", raising=False)
    assert _run_setup(monkeypatch, {}, block_torch=True) == {}
    assert _run_setup(monkeypatch, {"VITKERNELS_BUILD_CUDA": "0"}, block_torch=True) == {}


def test_setup_with_flag_but_no_torch_says_so(monkeypatch):
    with pytest.raises(SystemExit) as info:
        _run_setup(monkeypatch, {"VITKERNELS_BUILD_CUDA": "1"}, block_torch=True)
    assert "torch is not importable" in _one_sentence(str(info.value))


@cpu_torch
def test_setup_with_flag_on_cpu_torch_says_so(monkeypatch):
    with pytest.raises(SystemExit) as info:
        _run_setup(monkeypatch, {"VITKERNELS_BUILD_CUDA": "1"})
    line = _one_sentence(str(info.value))
    assert line.startswith("VITKERNELS_BUILD_CUDA=1: the installed torch") and "CPU build" in line


def _project_copy(tmp_path: Path) -> Path:
    """The files a build of the package reads, copied so the build leaves the tree alone."""
    dst = tmp_path / "project"
    dst.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, dst / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info")
    for name in ("vitkernels", "models", "csrc"):
        shutil.copytree(ROOT / name, dst / name, ignore=ignore)
    return dst


def _pip_wheel(project: Path, out: Path, flag: str | None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("VITKERNELS_BUILD_CUDA", None)
    if flag is not None:
        env["VITKERNELS_BUILD_CUDA"] = flag
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q"]
    return subprocess.run(
        [*cmd, "-w", str(out), str(project)], capture_output=True, text=True, env=env, timeout=600
    )


@cpu_torch
@pytest.mark.slow
def test_pip_build_with_flag_fails_with_the_sentence_and_plain_build_works(tmp_path):
    project = _project_copy(tmp_path)
    failed = _pip_wheel(project, tmp_path / "w1", "1")
    assert failed.returncode != 0
    assert re.search(
        r"VITKERNELS_BUILD_CUDA=1: the installed torch \(\S+\) is a CPU build",
        failed.stderr + failed.stdout,
    )
    plain = _pip_wheel(project, tmp_path / "w2", None)
    assert plain.returncode == 0, plain.stdout + plain.stderr
    wheels = list((tmp_path / "w2").glob("vitkernels-*.whl"))
    assert len(wheels) == 1
    import zipfile

    names = zipfile.ZipFile(wheels[0]).namelist()
    assert "vitkernels/cuda.py" in names and not [
        n for n in names if "_C" in n and n.endswith(".so")
    ]


# ----------------------------------------------------------------------------
# vitkernels.cuda: why the extension is not there


@cpu_torch
def test_cpu_torch_reports_why(fresh_load):
    reason = cuda.unavailable_reason()
    assert reason is not None and "CPU build" in reason
    assert not cuda.is_built()
    assert not cuda.has_op("relpos_attention_fwd")
    with pytest.raises(RuntimeError, match="CPU build"):
        cuda.op("relpos_attention_fwd")


def test_not_built_is_reported_with_how_to_build(cuda_torch):
    reason = cuda.unavailable_reason()
    assert "not built" in reason and "python -m vitkernels build" in reason
    assert "VITKERNELS_BUILD_CUDA=1 pip install --no-build-isolation -e ." in reason
    assert not cuda.is_built() and not cuda.has_op("patch_embed_fwd")


def test_stale_or_broken_jit_build_is_reported(cuda_torch):
    directory = cuda.cache_dir()
    directory.mkdir(parents=True)
    (directory / "vitkernels_C.so").write_bytes(b"not a library")
    (directory / "sources.sha256").write_text("0" * 64 + "\n")
    assert "out of date" in cuda.unavailable_reason()
    cuda._load.cache_clear()
    (directory / "sources.sha256").write_text(cuda._sources_hash() + "\n")
    assert "does not load" in cuda.unavailable_reason()


def test_sources_hash_follows_the_sources(cuda_torch, monkeypatch, tmp_path):
    before = cuda._sources_hash()
    fake = tmp_path / "csrc"
    shutil.copytree(cuda.CSRC, fake, ignore=shutil.ignore_patterns("*.o", "*.so"))
    monkeypatch.setattr(cuda, "CSRC", fake)
    assert cuda._sources_hash() == before
    header = fake / "kernels" / "relpos.cuh"
    header.write_text(header.read_text() + "\n// changed\n")
    assert cuda._sources_hash() != before


# ----------------------------------------------------------------------------
# dispatch when the extension is missing


def _relpos_inputs():
    q = torch.randn(1, 2, 9, 16)
    k, v = torch.randn(1, 2, 9, 16), torch.randn(1, 2, 9, 32)
    return (q, k, v, torch.randn(2, 9)), {"fmap_size": 3}


@pytest.mark.parametrize("not_built", [False, True], ids=["as_installed", "cuda_torch_not_built"])
def test_forced_cuda_backend_names_the_reason(not_built, request):
    if not_built:
        request.getfixturevalue("cuda_torch")
    reason = cuda.unavailable_reason()
    assert reason is not None
    (q, k, v, table), kw = _relpos_inputs()
    calls = [
        lambda: vitkernels.relpos_attention(q, k, v, table, backend="cuda", **kw),
        lambda: vitkernels.performer_attention(
            q[0], k[0], k[0], torch.randn(8, 16), backend="cuda"
        ),
        lambda: vitkernels.patch_embed(
            torch.randn(1, 3, 8, 8), torch.randn(4, 12), kernel_size=2, backend="cuda"
        ),
    ]
    for call in calls:
        with pytest.raises(BackendNotSupportedError, match="backend 'cuda'") as info:
            call()
        assert reason in str(info.value)
    with vitkernels.use_backend(None):  # automatic dispatch on CPU never needs the extension
        out = vitkernels.relpos_attention(q, k, v, table, **kw)
    assert out.shape == (1, 2, 9, 32) and bool(out.isfinite().all())


# ----------------------------------------------------------------------------
# the torch-facing layer compiles against the installed torch's headers


def _nvcc() -> str | None:
    cand = shutil.which("nvcc") or os.path.join(
        os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"
    )
    return cand if cand and os.path.exists(cand) else None


def _compile_unit(src: Path, out: Path) -> tuple[str, int, str]:
    import sysconfig

    from torch.utils.cpp_extension import include_paths

    incs = [f"-I{p}" for p in include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
    # a CPU torch ships c10/cuda headers without the generated cuda_cmake_macros.h
    defs = [
        "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
        "-DTORCH_EXTENSION_NAME=vitkernels_C",
        "-DTORCH_API_INCLUDE_EXTENSION_H",
    ]
    if src.suffix == ".cu":
        cmd = [_nvcc(), "-std=c++17", "-c", "-gencode", "arch=compute_80,code=sm_80", *defs, *incs]
    else:
        cmd = ["g++", "-std=c++17", "-c", "-fPIC", *defs, *incs]
    proc = subprocess.run([*cmd, str(src), "-o", str(out)], capture_output=True, text=True)
    return src.name, proc.returncode, proc.stdout + proc.stderr


@pytest.mark.slow
@pytest.mark.skipif(_nvcc() is None or shutil.which("g++") is None, reason="needs nvcc and g++")
def test_torch_launchers_and_bindings_compile(request, tmp_path):
    units = [*sorted((ROOT / "csrc" / "ops").glob("*.cu")), ROOT / "csrc" / "bindings.cpp"]
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda u: _compile_unit(u, tmp_path / (u.name + ".o")), units))
    failed = [f"{name}:\n{log[-4000:]}" for name, rc, log in results if rc != 0]
    assert not failed, "\n\n".join(failed)
