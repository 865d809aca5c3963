"""Finds the CUDA toolkit that builds the extension; imports nothing but the standard library.

setup.py loads this file by path before torch is imported (torch's cpp_extension
reads CUDA_HOME once, at import), and vitkernels.cuda uses it for the JIT build.

The toolkit is, in this order:

1. ``$CUDA_HOME`` (or ``$CUDA_PATH``), when set;
2. the toolkit the ``nvcc`` on PATH runs from: nvcc's own dry run names its
   install (``#$ TOP=...``), which follows wrapper scripts and links that live
   outside the toolkit (torch instead takes the folder above nvcc's, which for
   /usr/local/bin/nvcc is /usr/local, and the link then fails with
   "cannot find -lcudart");
3. /usr/local/cuda, when it exists.

A toolkit without libcudart (lib64/, lib/ or targets/<arch>-linux/lib/) is
refused with one sentence that names CUDA_HOME.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from collections.abc import Mapping

__all__ = ["DEFAULT_HOME", "ToolkitError", "cuda_home", "cudart_dir", "nvcc_toolkit"]

DEFAULT_HOME = "/usr/local/cuda"

_TOP = re.compile(r"^#\$\s*TOP=(?P<top>.+?)\s*$")


class ToolkitError(RuntimeError):
    """No usable CUDA toolkit; the message is one sentence that says what to set."""


def nvcc_toolkit(nvcc: str) -> str | None:
    """The root of the toolkit that the program ``nvcc`` runs from, or None.

    Asks nvcc itself (``nvcc --dryrun``, which compiles nothing and prints the
    install it runs from as ``TOP=``), so a wrapper script is followed; when nvcc
    cannot be run, falls back to the folder above the real file (links resolved).
    """
    try:
        proc = subprocess.run(
            [nvcc, "--dryrun", "-x", "cu", "-E", os.devnull],
            capture_output=True,
            text=True,
            timeout=60,
        )
        output = proc.stdout + proc.stderr
    except (OSError, subprocess.SubprocessError):
        output = ""
    for line in output.splitlines():
        m = _TOP.match(line.strip())
        if m:
            return os.path.realpath(m.group("top"))
    real = os.path.realpath(nvcc)
    if os.path.basename(os.path.dirname(real)) == "bin":
        return os.path.dirname(os.path.dirname(real))
    return None


def cudart_dir(home: str) -> str | None:
    """The folder of ``home`` that holds libcudart (as the linker needs it), or None."""
    target = f"targets/{platform.machine()}-linux/lib"
    for sub in ("lib64", "lib", target):
        folder = os.path.join(home, sub)
        if not os.path.isdir(folder):
            continue
        names = os.listdir(folder)
        if any(n == "libcudart.so" or n.startswith("libcudart.so.") for n in names):
            return folder
    return None


def cuda_home(cuda_version: str | None = None, environ: Mapping[str, str] | None = None) -> str:
    """The CUDA toolkit root to build with; raises ToolkitError with one sentence.

    cuda_version (torch.version.cuda) only words the message when nothing is found.
    """
    env = os.environ if environ is None else environ
    want = f"the CUDA {cuda_version} toolkit" if cuda_version else "a CUDA toolkit"
    explicit = (env.get("CUDA_HOME") or env.get("CUDA_PATH") or "").strip()
    if explicit:
        home, how = explicit, f"CUDA_HOME={explicit}"
        if not os.path.isdir(home):
            raise ToolkitError(
                f"CUDA_HOME is {explicit}, which is not a folder: set CUDA_HOME to the root of "
                f"{want} (the folder with bin/nvcc and lib64/libcudart.so)"
            )
    else:
        nvcc = shutil.which("nvcc", path=env.get("PATH"))
        home = nvcc_toolkit(nvcc) if nvcc else None
        how = f"the toolkit that {nvcc} runs from"
        if home is None and os.path.isdir(DEFAULT_HOME):
            home, how = DEFAULT_HOME, f"the default {DEFAULT_HOME}"
        if home is None:
            raise ToolkitError(
                "no CUDA toolkit found (CUDA_HOME is unset and there is no nvcc on PATH): "
                f"install {want} and set CUDA_HOME to its root"
            )
    if cudart_dir(home) is None:
        raise ToolkitError(
            f"libcudart was not found in {home} ({how}; looked in lib64, lib and "
            f"targets/*/lib): set CUDA_HOME to the root of {want}, the folder with bin/nvcc "
            "and lib64/libcudart.so"
        )
    return home
