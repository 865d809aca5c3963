"""Finds, JIT-builds and loads the optional CUDA extension.

The extension (sources in ``csrc/``) registers its kernels as torch ops in the
``vitkernels_C`` namespace (``torch.ops.vitkernels_C.<name>``); each op module's
``cuda`` backend calls them with the positional arguments of the Triton
launchers. Without the extension the package works on its other backends.

The library is Python-agnostic: ATen and torch/library.h only, no pybind11 and
no Python C API, loaded with ``torch.ops.load_library``. One build serves every
Python of the same torch and CUDA.

Ways to get it (see csrc/README.md):

* ``VITKERNELS_BUILD_CUDA=1 pip install --no-build-isolation -e .`` (setup.py,
  torch's CUDAExtension and ninja) puts ``vitkernels/_C*.so`` in the package;
* ``python -m vitkernels build`` (``build_main`` here) compiles just in time with
  ``torch.utils.cpp_extension.load`` into a cache directory,
  ``~/.cache/vitkernels/<torch>-cu<cuda>-sm<archs>`` (``VITKERNELS_CACHE_DIR``
  overrides the root), reused until ``csrc/`` changes;
* a library built elsewhere for the same torch (``bash bench/prebuild_cuda.sh``
  leaves one in ``.prebuilt/``), named by ``VITKERNELS_CUDA_LIBRARY``; the
  ``sources.sha256`` stamp beside it must match this checkout's csrc/ and torch.

Builds compile for the architectures in ``TORCH_CUDA_ARCH_LIST`` (default
"8.0;9.0") with the toolkit vitkernels._toolkit finds (CUDA_HOME, else the one
the nvcc on PATH runs from). Loading never compiles: ``_load`` takes, in order,
ops some earlier load registered, the library ``VITKERNELS_CUDA_LIBRARY`` names,
the installed ``vitkernels/_C*.so``, an up-to-date JIT build from the cache, and
else reports why there is none.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from vitkernels import _toolkit

__all__ = [
    "DEFAULT_ARCH_LIST",
    "OPS",
    "BuildError",
    "arch_list",
    "build",
    "build_main",
    "cache_dir",
    "has_op",
    "is_built",
    "library_path",
    "op",
    "unavailable_reason",
]

# the ops bindings.cpp registers (there is no patch_embed_bwd: that backward runs elsewhere)
OPS = (
    "relpos_attention_fwd",
    "relpos_attention_bwd",
    "performer_attention_fwd",
    "performer_attention_bwd",
    "patch_embed_fwd",
    "patch_embed_fwd_saving",
)
DEFAULT_ARCH_LIST = "8.0;9.0"
JIT_NAME = "vitkernels_C"
PACKAGE = Path(__file__).resolve().parent
CSRC = PACKAGE.parent / "csrc"
STAMP = "sources.sha256"  # beside a JIT or prebuilt library: _sources_hash() when it was built
LIBRARY_ENV = "VITKERNELS_CUDA_LIBRARY"
# compiled translation units, relative to csrc/, in build order
SOURCES = ("ops/relpos.cu", "ops/performer.cu", "ops/patch_embed.cu", "bindings.cpp")

_BUILD_HINT = (
    "build it with `python -m vitkernels build` or "
    "`VITKERNELS_BUILD_CUDA=1 pip install --no-build-isolation -e .`"
)


class BuildError(RuntimeError):
    """The extension cannot be built here; the message says why in one sentence."""


# ----------------------------------------------------------------------------
# where things are


def arch_list() -> str:
    """TORCH_CUDA_ARCH_LIST, or the default "8.0;9.0"."""
    return os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip() or DEFAULT_ARCH_LIST


def _arch_tag(archs: str) -> str:
    """ "8.0;9.0" -> "80_90" (for directory names)."""
    parts = [re.sub(r"[^0-9a-zA-Z]", "", a) for a in re.split(r"[;\s,]+", archs) if a]
    return "_".join(parts) or "none"


def cache_dir() -> Path:
    """The JIT build directory for this torch, CUDA version and architecture list."""
    root = os.environ.get("VITKERNELS_CACHE_DIR", "").strip()
    base = Path(root) if root else Path.home() / ".cache" / "vitkernels"
    torch_version = torch.__version__.split("+")[0]
    cuda = (torch.version.cuda or "cpu").replace(".", "")
    return base / f"{torch_version}-cu{cuda}-sm{_arch_tag(arch_list())}"


def _source_files() -> list[Path]:
    """Every file the build depends on: the compiled sources and their headers."""
    files = [CSRC / s for s in SOURCES]
    files += sorted((CSRC / "kernels").glob("*.cuh")) + sorted((CSRC / "ops").glob("*.h"))
    return files


def _sources_hash() -> str:
    """Hash of csrc/'s build inputs and torch's and CUDA's versions.

    The architecture list is not in it: a build for other GPUs is still these
    sources (the JIT cache keeps one directory per list).
    """
    h = hashlib.sha256(f"{torch.__version__}|{torch.version.cuda}".encode())
    for f in _source_files():
        h.update(f.relative_to(CSRC).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def _jit_library(directory: Path) -> Path | None:
    libs = sorted(directory.glob(f"{JIT_NAME}*.so")) + sorted(directory.glob(f"{JIT_NAME}*.pyd"))
    return libs[0] if libs else None


# ----------------------------------------------------------------------------
# loading


def _registered() -> bool:
    """Whether some library loaded earlier in this process registered the ops."""
    return hasattr(torch.ops.vitkernels_C, OPS[0])


def _installed_library() -> Path | None:
    """``vitkernels/_C*.so``, as setup.py's build puts it in the package, or None."""
    libs = sorted(PACKAGE.glob("_C*.so")) + sorted(PACKAGE.glob("_C*.pyd"))
    return libs[0] if libs else None


def _named_library() -> Path | None:
    """The library VITKERNELS_CUDA_LIBRARY names (a file, or a folder holding one), or None."""
    value = os.environ.get(LIBRARY_ENV, "").strip()
    if not value:
        return None
    path = Path(value)
    if path.is_dir():
        return _jit_library(path) or path / f"{JIT_NAME}.so"
    return path


def _stale(lib: Path) -> bool:
    stamp = lib.parent / STAMP
    return not stamp.exists() or stamp.read_text().strip() != _sources_hash()


def _load_library(lib: Path, what: str) -> str | None:
    """torch.ops.load_library(lib): None, or why it does not load."""
    try:
        torch.ops.load_library(str(lib))
    except (OSError, RuntimeError) as exc:
        return f"{what} {lib} does not load ({exc})"
    if not _registered():
        return f"{what} {lib} loads but registers no torch.ops.vitkernels_C ops"
    return None


@functools.cache
def _load() -> tuple[Path | str | None, str | None]:
    if torch.version.cuda is None:
        return None, (
            f"the installed torch ({torch.__version__}) is a CPU build, "
            "so the CUDA extension cannot be built or loaded"
        )
    if _registered():
        return "torch.ops.vitkernels_C", None
    named = _named_library()
    if named is not None:
        if not named.is_file():
            return None, f"{LIBRARY_ENV}={named} is not a file (expected a built {JIT_NAME}.so)"
        if not CSRC.is_dir() or _stale(named):
            return None, (
                f"the CUDA extension {named} ({LIBRARY_ENV}) was built from other csrc/ sources "
                f"or for another torch than {torch.__version__} ({STAMP} beside it differs; "
                "rebuild it with `bash bench/prebuild_cuda.sh`)"
            )
        reason = _load_library(named, "the prebuilt CUDA extension")
        return (None, reason) if reason else (named, None)
    installed = _installed_library()
    if installed is not None:
        reason = _load_library(installed, "the installed CUDA extension")
        return (None, reason) if reason else (installed, None)
    directory = cache_dir()
    lib = _jit_library(directory)
    if lib is None:
        return None, f"the CUDA extension vitkernels._C is not built ({_BUILD_HINT})"
    if not CSRC.is_dir() or _stale(lib):
        return None, (
            f"the JIT build of the CUDA extension in {directory} is out of date with csrc/ "
            "(rebuild it with `python -m vitkernels build`)"
        )
    reason = _load_library(lib, "the JIT build of the CUDA extension")
    return (None, reason) if reason else (lib, None)


def library_path() -> str | None:
    """Where the loaded extension came from (a path), or None when it is not loaded."""
    lib = _load()[0]
    return None if lib is None else str(lib)


def unavailable_reason() -> str | None:
    """None when the extension is loaded, else one sentence saying why not."""
    return _load()[1]


def is_built() -> bool:
    return _load()[0] is not None


def has_op(name: str) -> bool:
    """Whether the loaded extension registered ``torch.ops.vitkernels_C.<name>``."""
    if not is_built():
        return False
    return hasattr(torch.ops.vitkernels_C, name)


def op(name: str):
    """The extension's op ``name``; raises if the extension or the op is missing."""
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(reason)
    if not hasattr(torch.ops.vitkernels_C, name):
        raise RuntimeError(f"the CUDA extension has no op {name!r}; it registers {', '.join(OPS)}")
    return getattr(torch.ops.vitkernels_C, name)


# ----------------------------------------------------------------------------
# building


def _toolchain() -> str:
    """The CUDA toolkit root a JIT build uses; raises BuildError with one sentence."""
    if torch.version.cuda is None:
        raise BuildError(
            f"the installed torch ({torch.__version__}) is a CPU build, so the CUDA extension "
            "cannot be built; install a CUDA build of torch"
        )
    try:
        home = _toolkit.cuda_home(torch.version.cuda)
    except _toolkit.ToolkitError as exc:
        raise BuildError(str(exc)) from None
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        raise BuildError("ninja is not installed; `pip install ninja` to build the CUDA extension")
    missing = [str(f) for f in _source_files() if not f.exists()]
    if not CSRC.is_dir() or missing:
        raise BuildError(
            f"the CUDA sources are missing ({CSRC}); build from a source checkout of vitkernels"
        )
    return home


def _child_build(directory: str) -> None:
    """Runs in a child process (CUDA_HOME set by build()): cpp_extension.load into directory.

    A plain shared library, not a Python module (is_python_module=False: torch
    loads it with torch.ops.load_library); --as-needed drops the libtorch_python
    that torch links by default, since nothing in csrc/ uses it.
    """
    from torch.utils import cpp_extension

    os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list()
    cudart = _toolkit.cudart_dir(os.environ["CUDA_HOME"])
    cpp_extension.load(
        name=JIT_NAME,
        sources=[str(CSRC / s) for s in SOURCES],
        extra_cflags=["-O3"],
        extra_cuda_cflags=["-O3", "-lineinfo"],
        extra_ldflags=["-Wl,--as-needed", f"-L{cudart}"],
        build_directory=directory,
        verbose=True,
        with_cuda=True,
        is_python_module=False,
    )


_STEP = re.compile(r"^\[(\d+)/(\d+)\]\s+(.*)$")


def _describe(step: str) -> str:
    """A ninja command line -> "compiling ops/relpos.cu" or "linking vitkernels_C.so"."""
    for src in SOURCES:
        if re.search(rf"(^|[\s/]){re.escape(src)}(\s|$)", step) or step.rstrip().endswith(src):
            return f"compiling {src}"
    m = re.search(r"-o\s+(\S+\.(so|pyd))", step)
    if m:
        return f"linking {os.path.basename(m.group(1))}"
    m = re.search(r"\s-c\s+(\S+)", step)
    return f"compiling {os.path.basename(m.group(1))}" if m else step[:80]


def build(*, verbose: bool = False, force: bool = False, out=None) -> Path:
    """JIT-build the extension into cache_dir() and return the library's path.

    Prints "[i/n] compiling ops/relpos.cu" progress lines (every line of the
    compiler output with verbose=True). force=True rebuilds from scratch.
    Raises BuildError with one sentence when it cannot build here.
    """
    out = out or sys.stdout
    home = _toolchain()
    directory = cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    stamp = directory / STAMP
    if force:
        for f in directory.iterdir():
            if f.is_file():
                f.unlink()
    digest = _sources_hash()
    print(
        f"vitkernels: building the CUDA extension for TORCH_CUDA_ARCH_LIST={arch_list()} "
        f"with the CUDA toolkit {home} in {directory}",
        file=out,
        flush=True,
    )
    code = f"from vitkernels.cuda import _child_build; _child_build({str(directory)!r})"
    # the child imports this package from this checkout even where it is not installed
    path = os.pathsep.join(p for p in (str(PACKAGE.parent), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, TORCH_CUDA_ARCH_LIST=arch_list(), CUDA_HOME=home, PYTHONPATH=path)
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    log: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        log.append(line)
        if verbose:
            print(line, end="", file=out, flush=True)
            continue
        m = _STEP.match(line.strip())
        if m:
            print(f"[{m.group(1)}/{m.group(2)}] {_describe(m.group(3))}", file=out, flush=True)
    if proc.wait() != 0:
        if not verbose:
            print("".join(log[-200:]), end="", file=out, flush=True)
        raise BuildError(
            f"the CUDA extension failed to compile (the compiler output is above; {directory})"
        )
    lib = _jit_library(directory)
    if lib is None:
        raise BuildError(f"the build finished but left no {JIT_NAME} library in {directory}")
    stamp.write_text(digest + "\n")
    _load.cache_clear()
    return lib


def build_main(argv: list[str] | None = None) -> int:
    """``python -m vitkernels build [--verbose] [--force]``: JIT-build the extension."""
    parser = argparse.ArgumentParser(
        prog="python -m vitkernels build",
        description=(
            "Compile the CUDA extension just in time (torch.utils.cpp_extension.load) into "
            "a cache directory; TORCH_CUDA_ARCH_LIST picks the architectures "
            f"(default {DEFAULT_ARCH_LIST})."
        ),
    )
    parser.add_argument("--verbose", action="store_true", help="show every compiler line")
    parser.add_argument("--force", action="store_true", help="rebuild from scratch")
    args = parser.parse_args(argv)
    try:
        lib = build(verbose=args.verbose, force=args.force)
    except BuildError as exc:
        print(f"vitkernels build: {exc}", file=sys.stderr)
        return 1
    reason = unavailable_reason()
    if reason is not None:
        print(f"vitkernels build: built {lib} but it does not load: {reason}", file=sys.stderr)
        return 1
    missing = [name for name in OPS if not has_op(name)]
    if missing:
        print(f"vitkernels build: {lib} lacks the ops {', '.join(missing)}", file=sys.stderr)
        return 1
    print(f"vitkernels: CUDA extension ready: {lib} ({len(OPS)} ops)")
    return 0
