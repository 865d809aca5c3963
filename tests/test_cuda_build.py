"""Building and loading the CUDA extension, without a GPU (CI: CPU torch).

* ``python -m vitkernels build`` and ``VITKERNELS_BUILD_CUDA=1 pip install ...``
  stop with one sentence and a non-zero status on a CPU torch, without a CUDA
  toolkit or without libcudart (the sentence names CUDA_HOME); without the flag
  the plain package builds (setup.py never imports torch).
* The toolkit is CUDA_HOME, else the one the nvcc on PATH runs from, wrapper
  scripts followed (vitkernels/_toolkit.py), and both builds use it.
* The extension is Python-agnostic: csrc/ uses no Python header, setup.py builds
  it with py_limited_api (no libtorch_python), the JIT build makes a plain library.
* ``vitkernels.cuda`` says why the extension is not there (CPU torch, not built,
  stale or broken JIT or prebuilt library) and the ops' dispatch reports it when
  "cuda" is forced. Absence is simulated (``no_extension``), so these tests hold
  on a machine where the extension is installed or loaded as well.
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
from vitkernels import _toolkit, cuda
from vitkernels.ops._dispatch import BackendNotSupportedError

ROOT = Path(__file__).resolve().parent.parent
INSTALLED_LIBRARY = cuda._installed_library  # the real lookup, before any test patches it
cpu_torch = pytest.mark.skipif(torch.version.cuda is not None, reason="needs a CPU build of torch")


@pytest.fixture
def fresh_load():
    """Forget the loader's cached answer before and after the test."""
    cuda._load.cache_clear()
    yield
    cuda._load.cache_clear()


@pytest.fixture
def no_extension(monkeypatch, fresh_load):
    """The loader sees no extension: none registered in this process, none installed in
    the package, no VITKERNELS_CUDA_LIBRARY (whatever this machine really has)."""
    monkeypatch.setattr(cuda, "_registered", lambda: False)
    monkeypatch.setattr(cuda, "_installed_library", lambda: None)
    monkeypatch.delenv(cuda.LIBRARY_ENV, raising=False)


@pytest.fixture
def nothing_built(monkeypatch, tmp_path, no_extension):
    """No extension anywhere: JIT builds live in an empty temp directory."""
    monkeypatch.setenv("VITKERNELS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    return tmp_path / "cache"


@pytest.fixture
def cuda_torch(monkeypatch, nothing_built):
    """Pretend torch is a CUDA build with no extension built."""
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    return nothing_built


def _fake_toolkit(root: Path, *, cudart: bool = True) -> Path:
    """A folder laid out like a CUDA toolkit: bin/nvcc (a script that answers --dryrun
    as nvcc does) and, with cudart, lib64/libcudart.so."""
    (root / "bin").mkdir(parents=True)
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text(f'#!/bin/sh\necho "#$ _HERE_={root}/bin"\necho "#$ TOP={root}/bin/.."\n')
    nvcc.chmod(0o755)
    if cudart:
        (root / "lib64").mkdir()
        (root / "lib64" / "libcudart.so").write_bytes(b"")
    return root


def _unset_cuda_home(monkeypatch) -> None:
    """Unset CUDA_HOME and CUDA_PATH, restored after the test even where code under
    test sets them (setup.py does): setenv first records the original state."""
    for name in ("CUDA_HOME", "CUDA_PATH"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


@pytest.fixture
def no_toolkit_env(monkeypatch, tmp_path):
    """No CUDA_HOME, no nvcc on PATH, no /usr/local/cuda."""
    _unset_cuda_home(monkeypatch)
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setattr(_toolkit, "DEFAULT_HOME", str(tmp_path / "no-such-cuda"))


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


def test_build_without_cuda_toolkit_says_so(cuda_torch, no_toolkit_env, capsys):
    assert cuda.build_main([]) == 1
    line = _one_sentence(capsys.readouterr().err)
    assert "no CUDA toolkit found" in line and "12.4" in line and "CUDA_HOME" in line, line


def test_build_without_libcudart_names_cuda_home(cuda_torch, monkeypatch, tmp_path, capsys):
    home = _fake_toolkit(tmp_path / "cuda", cudart=False)
    monkeypatch.setenv("CUDA_HOME", str(home))
    assert cuda.build_main([]) == 1
    line = _one_sentence(capsys.readouterr().err)
    assert "libcudart was not found" in line and str(home) in line, line
    assert "set CUDA_HOME to the root of the CUDA 12.4 toolkit" in line, line


def test_build_without_ninja_says_so(cuda_torch, monkeypatch, tmp_path, capsys):
    from torch.utils import cpp_extension

    monkeypatch.setenv("CUDA_HOME", str(_fake_toolkit(tmp_path / "cuda")))
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: False)
    assert cuda.build_main([]) == 1
    assert "ninja is not installed" in _one_sentence(capsys.readouterr().err)


# ----------------------------------------------------------------------------
# the CUDA toolkit


def test_toolkit_is_cuda_home_when_set(monkeypatch, tmp_path):
    home = _fake_toolkit(tmp_path / "cuda")
    monkeypatch.setenv("CUDA_HOME", str(home))
    assert _toolkit.cuda_home() == str(home)
    assert _toolkit.cudart_dir(str(home)) == str(home / "lib64")


def test_toolkit_follows_an_nvcc_wrapper_script(monkeypatch, tmp_path):
    """/usr/local/bin/nvcc may be a script that execs the toolkit's nvcc: the folder
    above the script (torch's guess) has no libcudart; the toolkit nvcc runs from does."""
    home = _fake_toolkit(tmp_path / "toolkit" / "cuda-13.0")
    wrapper_bin = tmp_path / "local" / "bin"
    wrapper_bin.mkdir(parents=True)
    wrapper = wrapper_bin / "nvcc"
    wrapper.write_text(f'#!/bin/sh\nexec {home}/bin/nvcc "$@"\n')
    wrapper.chmod(0o755)
    _unset_cuda_home(monkeypatch)
    monkeypatch.setenv("PATH", str(wrapper_bin))
    torch_guess = wrapper.parent.parent  # what torch.utils.cpp_extension takes
    assert _toolkit.cudart_dir(str(torch_guess)) is None
    assert _toolkit.cuda_home() == str(home.resolve())


def test_toolkit_follows_a_linked_nvcc_that_cannot_run(monkeypatch, tmp_path):
    home = tmp_path / "cuda"
    (home / "bin").mkdir(parents=True)
    (home / "bin" / "nvcc").write_text("not a program")
    (home / "lib").mkdir()
    (home / "lib" / "libcudart.so.13").write_bytes(b"")
    link_bin = tmp_path / "bin"
    link_bin.mkdir()
    (link_bin / "nvcc").symlink_to(home / "bin" / "nvcc")
    (home / "bin" / "nvcc").chmod(0o755)
    assert _toolkit.nvcc_toolkit(str(link_bin / "nvcc")) == str(home.resolve())
    monkeypatch.setenv("CUDA_HOME", str(home))
    assert _toolkit.cudart_dir(str(home)) == str(home / "lib")


def test_no_toolkit_is_one_sentence_naming_cuda_home(no_toolkit_env):
    with pytest.raises(_toolkit.ToolkitError) as info:
        _toolkit.cuda_home("13.0")
    line = _one_sentence(str(info.value))
    assert line.startswith("no CUDA toolkit found") and "CUDA_HOME" in line and "13.0" in line


def test_cuda_home_that_is_not_a_folder_says_so(monkeypatch, tmp_path):
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "nowhere"))
    with pytest.raises(
        _toolkit.ToolkitError, match="CUDA_HOME is .*nowhere, which is not a folder"
    ):
        _toolkit.cuda_home()


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc on PATH")
def test_this_machines_nvcc_gives_a_toolkit_with_libcudart(monkeypatch):
    """The real nvcc on PATH (a wrapper script on the CI machine) leads to a toolkit
    the linker can use."""
    _unset_cuda_home(monkeypatch)
    home = _toolkit.cuda_home()
    assert _toolkit.cudart_dir(home) is not None
    assert os.path.exists(os.path.join(home, "bin", "nvcc"))


def test_jit_build_runs_with_the_toolkit_found(cuda_torch, monkeypatch, tmp_path):
    """build() hands the toolkit to the child as CUDA_HOME (torch's cpp_extension reads
    only that, at import); the child builds a plain library, not a Python module."""
    from torch.utils import cpp_extension

    home = _fake_toolkit(tmp_path / "cuda")
    monkeypatch.setenv("CUDA_HOME", str(home))
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: True)
    seen: dict = {}

    class Child:
        def __init__(self, cmd, **kw):
            seen.update(kw["env"])
            self.stdout = iter(["[1/1] c++ x.o -shared -o vitkernels_C.so\n", "boom\n"])

        def wait(self):
            return 1

    monkeypatch.setattr(cuda.subprocess, "Popen", Child)
    with pytest.raises(cuda.BuildError, match="failed to compile"):
        cuda.build(out=open(os.devnull, "w"))  # noqa: SIM115
    assert seen["CUDA_HOME"] == str(home)
    assert str(cuda.PACKAGE.parent) in seen["PYTHONPATH"].split(os.pathsep)

    calls: dict = {}
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: calls.update(kw))
    cuda._child_build(str(tmp_path / "out"))
    assert calls["is_python_module"] is False and calls["name"] == cuda.JIT_NAME
    assert "-Wl,--as-needed" in calls["extra_ldflags"]
    assert f"-L{home / 'lib64'}" in calls["extra_ldflags"]


# ----------------------------------------------------------------------------
# Python-agnostic sources

PYTHON_API = re.compile(r"Python\.h|pybind11|torch/extension\.h|PYBIND11_MODULE|\bPyObject\b|\bPy_")


def test_csrc_uses_no_python_api():
    """The extension links no Python: one build serves every Python of a torch+CUDA
    (torch/extension.h pulls in pybind11 and the Python C API; ATen and
    torch/library.h do not)."""
    files = [
        f for f in sorted((ROOT / "csrc").rglob("*")) if f.suffix in (".cu", ".cuh", ".cpp", ".h")
    ]
    assert len(files) >= 8, files
    offenders = [
        f"{f.relative_to(ROOT)}:{n}: {line.strip()}"
        for f in files
        for n, line in enumerate(f.read_text().splitlines(), 1)
        if PYTHON_API.search(line.split("//")[0])  # code, not the comments that explain it
    ]
    assert not offenders, "\n".join(offenders)
    bindings = (ROOT / "csrc" / "bindings.cpp").read_text()
    assert "#include <torch/library.h>" in bindings and "TORCH_LIBRARY(vitkernels_C, m)" in bindings


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


def test_setup_with_flag_and_no_libcudart_names_cuda_home(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    home = _fake_toolkit(tmp_path / "cuda", cudart=False)
    with pytest.raises(SystemExit) as info:
        _run_setup(monkeypatch, {"VITKERNELS_BUILD_CUDA": "1", "CUDA_HOME": str(home)})
    line = _one_sentence(str(info.value))
    assert line.startswith("VITKERNELS_BUILD_CUDA=1: libcudart was not found in"), line
    assert "set CUDA_HOME to the root of the CUDA 12.4 toolkit" in line, line


def test_setup_builds_a_python_agnostic_extension_with_the_toolkit_found(monkeypatch, tmp_path):
    """setup.py hands torch's cpp_extension the toolkit nvcc runs from (a wrapper on
    PATH here) and builds with py_limited_api, which leaves libtorch_python out."""
    from torch.utils import cpp_extension

    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", cpp_extension.CUDA_HOME)  # restored after
    home = _fake_toolkit(tmp_path / "toolkit")
    wrapper_bin = tmp_path / "bin"
    wrapper_bin.mkdir()
    (wrapper_bin / "nvcc").write_text(f'#!/bin/sh\nexec {home}/bin/nvcc "$@"\n')
    (wrapper_bin / "nvcc").chmod(0o755)
    _unset_cuda_home(monkeypatch)
    monkeypatch.setenv("PATH", f"{wrapper_bin}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0a")
    kw = _run_setup(monkeypatch, {"VITKERNELS_BUILD_CUDA": "1"})
    (ext,) = kw["ext_modules"]
    assert os.environ["CUDA_HOME"] == str(home.resolve()) == cpp_extension.CUDA_HOME
    assert ext.name == "vitkernels._C" and ext.py_limited_api
    assert "torch_python" not in ext.libraries
    assert str(home.resolve() / "lib64") in ext.library_dirs


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
    # the speed evidence automatic dispatch reads travels as package data
    assert "vitkernels/speed_evidence.json" in names
    # every package of the source tree (python -m vitkernels estimate needs vitkernels.estimate)
    root = Path(__file__).resolve().parent.parent
    packages = sorted(
        str(p.parent.relative_to(root)) for p in (root / "vitkernels").rglob("__init__.py")
    )
    assert packages and [p for p in packages if f"{p}/__init__.py" not in names] == []
    assert "vitkernels/estimate/cuda_record.h" in names
    assert "vitkernels/models/__init__.py" in names
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


def _library_dir(tmp_path: Path, stamp: str | None) -> Path:
    folder = tmp_path / "prebuilt"
    folder.mkdir(parents=True)
    (folder / f"{cuda.JIT_NAME}.so").write_bytes(b"not a library")
    if stamp is not None:
        (folder / cuda.STAMP).write_text(stamp + "\n")
    return folder


def test_prebuilt_library_is_checked_against_the_sources(cuda_torch, monkeypatch, tmp_path):
    """VITKERNELS_CUDA_LIBRARY (bench/prebuild_cuda.sh's .prebuilt/) names a library
    built elsewhere: it is used only when its stamp matches this checkout's csrc/ and
    torch, and it wins over an installed or JIT-built one."""
    monkeypatch.setenv(cuda.LIBRARY_ENV, str(tmp_path / "missing.so"))
    assert "is not a file" in cuda.unavailable_reason()
    for stamp in (None, "0" * 64):
        cuda._load.cache_clear()
        folder = _library_dir(tmp_path / str(stamp), stamp)
        monkeypatch.setenv(cuda.LIBRARY_ENV, str(folder / f"{cuda.JIT_NAME}.so"))
        reason = cuda.unavailable_reason()
        assert "was built from other csrc/ sources or for another torch" in reason, reason
        assert "bench/prebuild_cuda.sh" in reason
    cuda._load.cache_clear()
    folder = _library_dir(tmp_path / "fresh", cuda._sources_hash())
    monkeypatch.setenv(cuda.LIBRARY_ENV, str(folder))  # a folder names the library in it
    reason = cuda.unavailable_reason()
    assert reason.startswith("the prebuilt CUDA extension") and "does not load" in reason, reason
    assert not cuda.is_built() and cuda.library_path() is None


def test_installed_library_that_does_not_load_is_reported(cuda_torch, monkeypatch, tmp_path):
    (tmp_path / "_C.abi3.so").write_bytes(b"not a library")
    monkeypatch.setattr(cuda, "PACKAGE", tmp_path)
    monkeypatch.setattr(cuda, "_installed_library", INSTALLED_LIBRARY)
    reason = cuda.unavailable_reason()
    assert (
        reason.startswith("the installed CUDA extension") and "_C.abi3.so does not load" in reason
    )


def test_ops_registered_earlier_are_used_without_loading_again(cuda_torch, monkeypatch):
    """A second load of the same library under another path would register the
    namespace twice; ops already registered in this process are taken as they are."""

    def refuse(path):
        raise AssertionError(f"loaded {path} again")

    monkeypatch.setattr(cuda, "_registered", lambda: True)
    monkeypatch.setattr(torch.ops, "load_library", refuse)
    monkeypatch.setenv(cuda.LIBRARY_ENV, "/nowhere/vitkernels_C.so")
    assert cuda.unavailable_reason() is None
    assert cuda.library_path() == "torch.ops.vitkernels_C"


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


@pytest.mark.parametrize("torch_build", ["this_torch", "cuda_torch"])
def test_forced_cuda_backend_names_the_reason(torch_build, request):
    """With the extension absent (simulated), forcing "cuda" names why: a CPU torch,
    or a CUDA torch with nothing built ("cuda_torch" pretends torch is one)."""
    request.getfixturevalue("cuda_torch" if torch_build == "cuda_torch" else "nothing_built")
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
@pytest.mark.skipif(
    os.environ.get("VITKERNELS_AOT_FULL", "") in ("", "0"),
    reason="part of the whole compile matrix (VITKERNELS_AOT_FULL=1, a CI step of its own): "
    "over two minutes of nvcc on 2 cores",
)
def test_torch_launchers_and_bindings_compile(request, tmp_path):
    units = [*sorted((ROOT / "csrc" / "ops").glob("*.cu")), ROOT / "csrc" / "bindings.cpp"]
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda u: _compile_unit(u, tmp_path / (u.name + ".o")), units))
    failed = [f"{name}:\n{log[-4000:]}" for name, rc, log in results if rc != 0]
    assert not failed, "\n\n".join(failed)
