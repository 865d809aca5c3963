"""The CUDA extension's kernels for the estimate: their launches and machine code.

Launches come from the extension's own launch logic. ``csrc/emu/emu_kernels.cpp``
(the host build the emulator tests use) is compiled once more with
``cuda_record.h`` force-included: every launch then records its grid, block
and dynamic shared memory and the kernel it starts, and no kernel runs. The op
layer of csrc/ops/*.cu adds a few torch operations around the kernels (performer's
backward zeroes dw when w takes no gradient): ``_TORCH_OPS`` lists them.

Machine code: ``csrc/kernels/all_kernels.cu`` compiled by nvcc for sm_90a with
the flags the extension build uses (-O3 -lineinfo, torch's half/bfloat16
defines).

What the C++ cannot say by itself is written here, per kernel, from reading it:
the trip count of each runtime loop (``_trips``: a loop is named by its
variable, or by a piece of its ``for`` header where a kernel has several loops
over one variable) and the tensors each launch reads and writes (``_io``). A
change to a kernel's loops shows up as a warning of the estimate (a machine loop
without a trip count), and tests/test_estimate.py checks the kernel names.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import math
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import torch

from vitkernels.workloads import PatchEmbedShape, PerformerShape, RelposShape, Shape

CSRC = Path(__file__).resolve().parents[2] / "csrc"
NVCC_FLAGS = [
    "-std=c++17", "-O3", "-lineinfo", "--expt-relaxed-constexpr",
    "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
]  # fmt: skip
KIND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def unavailable_reason() -> str | None:
    """Why the CUDA kernels cannot be estimated here, or None."""
    if not (CSRC / "kernels" / "all_kernels.cu").exists():
        return f"no csrc/ beside the package ({CSRC}): run from a source checkout"
    if _nvcc() is None:
        return "nvcc not found (PATH, $CUDA_HOME/bin)"
    if shutil.which("g++") is None:
        return "g++ not found (it builds the launch recorder)"
    return None


def _nvcc() -> str | None:
    for cand in (shutil.which("nvcc"), os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")):
        if cand and os.path.exists(cand):
            return cand
    return None


def cache_dir() -> Path:
    root = Path(os.environ.get("VITKERNELS_CACHE_DIR", Path.home() / ".cache" / "vitkernels"))
    path = root / "estimate"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _digest(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else p.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _sources() -> list[Path]:
    return sorted([*(CSRC / "kernels").glob("*.cuh"), *(CSRC / "kernels").glob("*.cu"), *(CSRC / "emu").glob("*")])


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed ({' '.join(cmd)}):\n{(proc.stdout + proc.stderr)[-4000:]}")


@functools.cache
def cubin(arch: int = 90) -> bytes:
    """csrc/kernels/all_kernels.cu compiled for sm_<arch>(a), cached by source hash."""
    nvcc = _nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found (PATH, $CUDA_HOME/bin)")
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    key = _digest(version, gpu, *NVCC_FLAGS, *(p.read_bytes() for p in _sources()))
    out = cache_dir() / f"all_kernels-{gpu}-{key}.cubin"
    if not out.exists():
        tmp = out.with_suffix(".tmp")
        _run([nvcc, *NVCC_FLAGS, "-cubin", "-gencode", f"arch=compute_{arch}a,code={gpu}" if arch >= 90
              else f"arch=compute_{arch},code={gpu}", str(CSRC / "kernels" / "all_kernels.cu"), "-o", str(tmp)],
             "nvcc")  # fmt: skip
        tmp.rename(out)
    return out.read_bytes()


@functools.cache
def recorder() -> ctypes.CDLL:
    """The launch recorder: csrc/emu/emu_kernels.cpp with cuda_record.h, for the host."""
    header = Path(__file__).with_name("cuda_record.h")
    flags = ["-std=c++17", "-O0", "-g", "-fPIC", "-shared", "-DVK_EMULATE", "-fno-strict-aliasing",
             "-include", str(header), "-I", str(CSRC / "emu")]  # fmt: skip
    key = _digest(*flags, header.read_bytes(), *(p.read_bytes() for p in _sources()))
    out = cache_dir() / f"cuda_record-{key}.so"
    if not out.exists():
        tmp = out.with_suffix(".tmp.so")
        _run(["g++", *flags, str(CSRC / "emu" / "emu_kernels.cpp"), "-o", str(tmp), "-ldl"], "g++")
        tmp.rename(out)
    lib = ctypes.CDLL(str(out))
    lib.vk_record_log.restype = ctypes.c_char_p
    lib.vk_emu_performer_workspace.restype = ctypes.c_int64
    lib.vk_emu_relpos_workspace.restype = ctypes.c_int64
    return lib


# ----------------------------------------------------------------------------
# recorded launches


@dataclasses.dataclass
class CudaLaunch:
    kernel: str  # normalised, e.g. "vk::relpos_fwd_kernel<bf16, 32, 64>"
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    dynamic_shared: int
    trips: dict[str, float] = dataclasses.field(default_factory=dict)
    bytes_read: int = 0
    bytes_written: int = 0

    @property
    def base(self) -> str:
        return self.kernel.split("<")[0].split("(")[0].removeprefix("void ").strip()

    @property
    def programs(self) -> int:
        return math.prod(self.grid)

    @property
    def warps(self) -> int:
        return math.prod(self.block) // 32

    @property
    def template_ints(self) -> list[int]:
        m = re.search(r"<(.*)>", self.kernel)
        return [int(x) for x in re.findall(r"\b\d+\b", m.group(1))] if m else []


_TYPE_NAMES = [(r"\b(?:vk_emu::|vk::)?half_t\b|\b__half\b", "f16"),
               (r"\b(?:vk_emu::|vk::)?bf16_t\b|\b__nv_bfloat16\b", "bf16")]  # fmt: skip


def normalise(name: str) -> str:
    """A kernel's demangled name, host or device, without types' namespaces and arguments."""
    name = name.removeprefix("void ")
    name = re.sub(r"\(.*\)$", "", name)
    for pattern, short in _TYPE_NAMES:
        name = re.sub(pattern, short, name)
    return re.sub(r"\s+", " ", name).strip()


def _parse_log(text: str) -> list[CudaLaunch]:
    out, pending = [], None
    for line in text.splitlines():
        parts = line.split(" ", 1)
        if parts[0] == "launch":
            n = [int(x) for x in parts[1].split()]
            pending = CudaLaunch("?", (n[0], n[1], n[2]), (n[3], n[4], n[5]), n[6])
        elif parts[0] == "kernel" and pending is not None:
            pending.kernel = normalise(parts[1])
            out.append(pending)
            pending = None
    if any(launch.kernel == "?" for launch in out):
        raise RuntimeError(f"the launch recorder could not name a kernel:\n{text}")
    return out


def _p(t: torch.Tensor | None) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr() if t is not None else None)


def _s(t: torch.Tensor) -> ctypes.Array:
    return (ctypes.c_int64 * t.dim())(*t.stride())


def _f(x: float) -> ctypes.c_float:
    return ctypes.c_float(x)


def _nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _empty(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    # host buffers the recorded launchers are handed (never written: no kernel runs)
    return torch.empty(shape, dtype=dtype)


def _record(call) -> list[CudaLaunch]:
    lib = recorder()
    lib.vk_record_clear()
    rc = call(lib)
    if rc != 0:
        raise RuntimeError(f"the CUDA launcher returned error {rc}")
    return _parse_log(lib.vk_record_log().decode())


@dataclasses.dataclass
class TorchEvent:
    name: str
    bytes_read: int
    bytes_written: int


def record_calls(shape: Shape, batch: int, dtype: torch.dtype, direction: str) -> list[CudaLaunch | TorchEvent]:
    """The launches (and the op layer's torch operations) of one call of the cuda
    backend, each kernel launch with its trip counts and bytes."""
    if isinstance(shape, RelposShape):
        return _relpos(shape, batch, dtype, direction)
    if isinstance(shape, PerformerShape):
        return _performer(shape, batch, dtype, direction)
    if isinstance(shape, PatchEmbedShape):
        if direction not in ("fwd", "fwd_saving"):
            raise ValueError(
                f"patch_embed direction {direction!r}: the CUDA extension has the forward only ('fwd', "
                "'fwd_saving'); the cuda backend's backward is Triton's, reading what fwd_saving wrote"
            )
        return _patch_embed(shape, batch, dtype, direction == "fwd_saving")
    raise TypeError(f"no CUDA kernels for {type(shape).__name__}")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


_RE_LOAD_ROWS = re.compile(r"\bload_rows<\s*T\s*,([^,>]+),([^,>]+),([^,>]+)>\s*\(")


def _load_rows_trips(env: dict[str, int]) -> dict[str, float]:
    """Trip counts of common.cuh's load_rows loops at each call site (keys
    "header@file:line"): ROWS*(D/8)/NT 16-byte copies per thread on the vectorised
    path, none on the element-wise fallback (the estimated inputs are contiguous and
    16-byte aligned, rows of a multiple of 8 elements: load_rows takes the
    vectorised path; load_rows_unrolled calls load_rows only where rows do not
    vectorise, so that call site runs neither). Template arguments are evaluated
    with ``env``."""
    out = {}
    for path in sorted((CSRC / "kernels").glob("*.cuh")):
        text = path.read_text()
        for m in _RE_LOAD_ROWS.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            try:
                rows, d, nt = (eval(a.strip(), {"__builtins__": {}}, dict(env)) for a in m.groups())  # noqa: S307
            except NameError:
                if path.name == "common.cuh":  # load_rows_unrolled's fallback: only where not vectorised
                    out[f"idx<ROWS*(D/8)@{path.name}:{line}"] = out[f"idx<ROWS*D;@{path.name}:{line}"] = 0.0
                continue
            out[f"idx<ROWS*(D/8)@{path.name}:{line}"] = rows * (d / 8) / nt
            out[f"idx<ROWS*D;@{path.name}:{line}"] = 0.0
    return out


def _mirrored(la: CudaLaunch) -> bool:
    """A relpos backward kernel's MIRROR template argument (<T, DK, DV, MIRROR, VEC>)."""
    return la.kernel.removesuffix(">").split(", ")[3] == "true"


def _relpos(s: RelposShape, B: int, dtype: torch.dtype, direction: str) -> list[CudaLaunch | TorchEvent]:
    H, Nq, Nk, Dk, Dv, R = s.heads, s.nq, s.nk, s.dk, s.dv, s.side
    cq = _cdiv(R, s.q_stride)
    q, k, v = _empty(B, H, Nq, Dk, dtype=dtype), _empty(B, H, Nk, Dk, dtype=dtype), _empty(B, H, Nk, Dv, dtype=dtype)
    table = _empty(H, Nk, dtype=dtype)
    out, lse = _empty(B, H, Nq, Dv, dtype=dtype), _empty(B, H, Nq)
    dims = (ctypes.c_int * 10)(B, H, Nq, Nk, Dk, Dv, R, R, cq, s.q_stride)
    common = (_p(q), _s(q), _p(k), _s(k), _p(v), _s(v), _p(table), ctypes.c_int64(table.stride(0)),
              ctypes.c_int64(table.stride(1)), KIND[dtype], dims, _f(Dk**-0.5), _f(1.0), _p(out), _s(out), _p(lse))  # fmt: skip
    if direction == "fwd":
        launches = _record(lambda lib: lib.vk_emu_relpos_fwd(KIND[dtype], *common))
        events: list[CudaLaunch | TorchEvent] = []
    else:
        dout, delta = _empty(B, H, Nq, Dv, dtype=dtype), _empty(B, H, Nq)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        dtable = _empty(H, Nk, dtype=dtype)  # in the table's dtype
        work = _empty(recorder().vk_emu_relpos_workspace(dims))
        launches = _record(lambda lib: lib.vk_emu_relpos_bwd(
            KIND[dtype], *common, _p(dout), _s(dout), _p(delta), _p(dq), _s(dq), _p(dk), _s(dk), _p(dv), _s(dv),
            _p(dtable), _p(work)))  # fmt: skip
        events = []
    table_loop = R * R / 128  # for (i = tid; i < R*C; i += kThreads): the mean over threads
    for la in launches:
        DK, DV = (la.template_ints + [Dk, Dv])[:2]
        rows = _load_rows_trips({"kRows": 64, "kThreads": 128, "DK": DK, "DV": DV,
                                 "BN": 64 if la.base == "vk::relpos_fwd_kernel" else 32 if DK + DV > 160 else 64,
                                 "BQ": 32 if DK + DV >= 96 else 64})  # fmt: skip
        if la.base == "vk::relpos_fwd_kernel":
            # <T, DK, DV, MIRROR, VEC>: MIRROR, the table mirrored over signed offsets,
            # (2R-1) x (2C-1) floats; the `for k0` loop walks the full key tiles, the
            # last partial one (if any) is peeled after it
            mirrored = la.kernel.removesuffix(">").split(", ")[3] == "true"
            la.trips = {"i": (2 * R - 1) ** 2 / 128 if mirrored else table_loop, "k0": Nk // 64}
            la.bytes_read, la.bytes_written = _nbytes(q, k, v, table), _nbytes(out, lse)
        elif la.base == "vk::relpos_bwd_dq_kernel":
            # grid (query blocks, H, batch groups): each block walks B / groups entries;
            # <T, DK, DV, MIRROR, VEC>: MIRROR, the table and the warps' four copies of its
            # gradient over signed offsets in shared memory
            mirrored, offsets = _mirrored(la), (2 * R - 1) ** 2
            partials = _empty(la.grid[0] * la.grid[2], H, Nk)
            la.trips = {"i": offsets / 128 if mirrored else table_loop, "zi": 4 * offsets / 128,
                        "b": B / la.grid[2], "k0": _cdiv(Nk, 32 if DK + DV > 160 else 64), "n": table_loop}  # fmt: skip
            la.bytes_read = _nbytes(q, k, v, table, dout, out, lse)  # delta from out and dout
            la.bytes_written = _nbytes(dq, delta, partials)
        elif la.base == "vk::relpos_bwd_dkv_kernel":
            # then the table gradient from the dq blocks' partials: an entry a warp
            # (`for o`, round robin over the launch's warps), the partials 32 at a time
            mirrored = _mirrored(la)
            la.trips = {"i": (2 * R - 1) ** 2 / 128 if mirrored else table_loop,
                        "q0": _cdiv(Nq, 32 if DK + DV >= 96 else 64),
                        "o": _cdiv(H * Nk, 4 * la.programs), "pi": _cdiv(partials.shape[0], 32)}  # fmt: skip
            la.bytes_read = _nbytes(q, k, v, table, dout, lse, delta, partials)
            la.bytes_written = _nbytes(dk, dv, dtable)
        la.trips.update(rows)
        events.append(la)
    return events


def _performer_layout(B: int, T: int, E: int, M: int) -> dict[str, int]:
    """csrc/kernels/performer_common.cuh's layout(): padded sizes and chunking."""
    EP = 32 if E <= 32 else 64
    MP = 32
    tiles = _cdiv(max(T, 1), 64)
    want = max(1, min(_cdiv(1024, max(B, 1)), 64, tiles))
    per = _cdiv(tiles, want)
    return {"EP": EP, "MP": MP, "EX": EP + 8, "NC": _cdiv(tiles, per), "chunk_len": per * 64}


def _performer(s: PerformerShape, B: int, dtype: torch.dtype, direction: str) -> list[CudaLaunch | TorchEvent]:
    T, E, M = s.tokens, s.dim, s.features
    kqv = _empty(B, T, 3 * E, dtype=dtype)
    k, q, v = kqv.split(E, dim=-1)
    w = _empty(M, E)
    lks, vbar = _empty(B, M), _empty(B, M, E)
    dims = (ctypes.c_int * 4)(B, T, E, M)
    common = (_p(q), _s(q), _p(k), _s(k), _p(v), _s(v), _p(w), _s(w), KIND[w.dtype], int(w.dtype != dtype))
    lay = _performer_layout(B, T, E, M)
    NC, EP, MP, EX, CL = lay["NC"], lay["EP"], lay["MP"], lay["EX"], lay["chunk_len"]
    tiles = sum(_cdiv(min(CL, T - c * CL), 64) for c in range(NC)) / NC  # token tiles per chunk (mean)
    lib = recorder()
    events: list[CudaLaunch | TorchEvent] = []
    part_m, part_u = 4 * B * NC * MP, 4 * B * NC * MP * EX
    # loops of `idx = tid; idx < N; idx += 128` run N / 128 times per thread on average;
    # load_rows_ext's element-wise fallback does not run (q, k, v rows are 16-byte aligned
    # runs of E elements: views of the kqv projection with E a multiple of 8)
    common_trips = {"idx<MP*EP": MP * EP / 128, "idx<kTok*(EX/8)": 64 * (EX / 8) / 128, "idx<kTok*EX;": 0.0,
                    "idx<MP*EX": MP * EX / 128, "idx<MP*D::EX": MP * EX / 128, "m<MP": MP / 128,
                    **_load_rows_trips({"kTok": 64, "EP": EP, "kThreads": 128})}  # fmt: skip
    if direction == "fwd":
        y = _empty(B, T, E, dtype=dtype)
        work = _empty(lib.vk_emu_performer_workspace(B, T, E, M, 0))
        launches = _record(lambda lib: lib.vk_emu_performer_fwd(
            KIND[dtype], *common, dims, _f(math.log(1e-8 * M)), _p(y), _s(y), _p(lks), _p(vbar), _p(work)))  # fmt: skip
        for la in launches:
            if la.base == "vk::performer_kv_kernel":
                la.trips = {"t0": tiles, **common_trips}
                la.bytes_read, la.bytes_written = _nbytes(k, v, w), part_m + part_u
            elif la.base == "vk::performer_kv_combine_kernel":  # 256 threads
                la.trips = {"m<p.M": M / 256, "c<L.NC": NC, "idx<p.M*p.E": M * E / 256}
                la.bytes_read, la.bytes_written = part_m + part_u, _nbytes(lks, vbar)
            elif la.base == "vk::performer_q_kernel":
                la.trips = {"t0": tiles, **common_trips}
                la.bytes_read, la.bytes_written = _nbytes(q, w, lks, vbar), _nbytes(y)
            events.append(la)
        return events
    dy = _empty(B, T, E, dtype=dtype)
    dq, dk, dv = (_empty(B, T, E, dtype=dtype) for _ in range(3))
    dw = _empty(M, E)
    work = _empty(lib.vk_emu_performer_workspace(B, T, E, M, 1))
    launches = _record(lambda lib: lib.vk_emu_performer_bwd(
        KIND[dtype], *common, dims, _f(math.log(1e-8 * M)), _p(lks), _p(vbar), _p(dy), _s(dy), _p(dq), _s(dq),
        _p(dk), _s(dk), _p(dv), _s(dv), _p(dw), KIND[dw.dtype], 0, _p(work)))  # fmt: skip
    # csrc/ops/performer.cu: dw = at::zeros when w takes no gradient (T2T's fixed features)
    events.append(TorchEvent("zeros", 0, _nbytes(dw)))
    part_g, gbar = 4 * B * NC * MP * EX, 4 * B * MP * EX
    for la in launches:
        if la.base == "vk::performer_bwd_q_kernel":
            la.trips = {"t0": tiles, **common_trips}
            la.bytes_read, la.bytes_written = _nbytes(dy, q, w, lks, vbar), _nbytes(dq) + part_g
        elif la.base == "vk::performer_sum_kernel":  # gbar = sum over chunks of the q side's partials
            la.trips = {"r": NC}
            la.bytes_read, la.bytes_written = part_g, gbar
        elif la.base == "vk::performer_bwd_k_kernel":  # coef = dlks - vbar . dvbar: one thread per m
            la.trips = {"t0": tiles, "m<p.M": M / 128, "e<p.E": E, **common_trips}
            la.bytes_read, la.bytes_written = _nbytes(k, v, w, lks, vbar) + gbar, _nbytes(dk, dv)
        events.append(la)
    return events


def _patch_kt_lines() -> tuple[int, int]:
    """Lines of patch_embed_gemm_kernel's two `for kt` loops (statistics pass, main loop)."""
    lines = (CSRC / "kernels" / "patch_embed.cuh").read_text().splitlines()
    found = [i + 1 for i, line in enumerate(lines) if line.strip().startswith("for (int kt = 0; kt < KT; ++kt)")]
    if len(found) != 2:
        raise RuntimeError(f"patch_embed.cuh: expected the GEMM's two `for kt` loops, found lines {found}")
    return found[0], found[1]


def _patch_embed(s: PatchEmbedShape, B: int, dtype: torch.dtype, saving: bool = False) -> list[CudaLaunch | TorchEvent]:
    """The inference forward, or (saving) the forward of a training step that also writes
    what the backward reads (Triton's ``saved_layout``: the same buffers as its saving forward)."""
    C, side, D, K, L, P = s.channels, s.image, s.dim, s.k, s.tokens, s.prefix
    if s.layout == "channels_last":
        images = _empty(B, side, side, C, dtype=dtype).permute(0, 3, 1, 2)
    elif s.layout == "tokens":
        images = _empty(B, side * side, C, dtype=dtype).transpose(1, 2).unflatten(2, (side, side))
    else:
        images = _empty(B, C, side, side, dtype=dtype)
    weight = _empty(D, K, dtype=dtype)

    def vec(*size: int) -> torch.Tensor:
        return _empty(*size, dtype=dtype)

    tensors = (vec(D), vec(K) if s.in_norm else None, vec(K) if s.in_norm else None,
               vec(D) if s.out_norm else None, vec(D) if s.out_norm else None,
               vec(s.pos_rows, D) if s.pos_rows else None, vec(P, D) if P else None)  # fmt: skip
    out = vec(B, P + L, D)
    geo = (ctypes.c_int * 17)(B, C, side, side, s.kernel, s.kernel, s.stride, s.stride, s.padding, s.padding,
                              s.side_out, s.side_out, L, K, D, P, int(s.patch_order == "pqc"))  # fmt: skip
    params = (ctypes.c_void_p * 7)(*(t.data_ptr() if t is not None else None for t in tensors))
    saved: list[torch.Tensor | None] = [None] * 4
    if saving:
        from vitkernels.triton.patch_embed import saved_layout

        layout = saved_layout(images, weight, [s.kernel] * 2, [s.stride] * 2, [s.padding] * 2, s.patch_order,
                              s.in_norm, s.out_norm)  # fmt: skip
        saved = [None if spec is None else torch.empty_strided(spec[0], spec[1], dtype=spec[2]) for spec in layout]
    _, stats_s, ostats_s, w_plain = saved
    ptrs = (ctypes.c_void_p * 4)(*(t.data_ptr() if t is not None else None for t in saved))

    def st(t: torch.Tensor | None, d: int = 0) -> int:
        return t.stride(d) if t is not None else 0

    b, inw, inb, ow, ob, pe, cls = tensors
    pstr = (ctypes.c_int64 * 9)(st(b), st(inw), st(inb), st(ow), st(ob), st(pe), st(pe, 1), st(cls), st(cls, 1))
    launches = _record(lambda lib: lib.vk_emu_patch_embed_fwd_saving(
        KIND[dtype], _p(images), _s(images), geo, _p(weight), _s(weight), params, pstr, s.pos_rows,
        int(s.in_norm), int(s.out_norm), _f(1e-5), _f(1e-5), _p(out), ptrs,
        ctypes.c_int64(w_plain.stride(0) if w_plain is not None else 0)))  # fmt: skip
    events: list[CudaLaunch | TorchEvent] = []
    for la in launches:
        if la.base == "vk::patch_embed_prefix_kernel":
            la.trips = {"i": _cdiv(P * D, 256)}
            la.bytes_read, la.bytes_written = _nbytes(cls, pe[:P] if pe is not None else None), B * P * D * 2
        elif la.base == "vk::patch_embed_gemm_kernel":
            # the two `for kt` loops: the input norm's statistics pass (only in the
            # <..., true> instantiations: with an input norm) and the main loop
            stats, main = _patch_kt_lines()
            # w_plain's copy (saving, where Triton's kernel order is not the patch order):
            # each block of a column block a slice of its min(128, D) x K elements
            per = _cdiv(min(128, D) * K, la.grid[0])
            la.trips = {f"kt@patch_embed.cuh:{stats}": _cdiv(K, 32) if s.in_norm else 0,
                        f"kt@patch_embed.cuh:{main}": _cdiv(K, 32), "i<16": 16,
                        "k<KT*BK": _cdiv(K, 32) * 32 / 256,  # the input norm's parameters into shared memory
                        "e<hi": _cdiv(per, 256) if w_plain is not None else 0}  # fmt: skip
            la.bytes_read = _nbytes(images, weight, b, inw, inb, pe)
            # the pre-norm tokens go to y instead of out when saved (the row norm then writes out)
            la.bytes_written = B * L * D * out.element_size() + _nbytes(stats_s, w_plain)
        elif la.base == "vk::patch_embed_rownorm_kernel":
            la.trips = {"n": _cdiv(D, 32)}
            la.bytes_read = la.bytes_written = B * L * D * out.element_size()
            la.bytes_read += _nbytes(ow, ob, pe)
            la.bytes_written += _nbytes(ostats_s)
        events.append(la)
    return events


@functools.cache
def device_functions(arch: int = 90) -> dict[str, Any]:
    """{normalised kernel name: sass.Function} of the nvcc cubin."""
    from vitkernels.estimate import sass
    from vitkernels.triton._aot import cubin_tool

    funcs = sass.parse(cubin_tool("nvdisasm", cubin(arch), "-c", "-gi"))
    names = list(funcs)
    proc = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True)
    plain = proc.stdout.splitlines() if proc.returncode == 0 else names
    return {normalise(p): funcs[m] for m, p in zip(names, plain, strict=True)}


def resource_usage(arch: int = 90) -> dict[str, dict[str, int]]:
    """{mangled function: {"registers", "static_shared"}} from cuobjdump -res-usage."""
    from vitkernels.triton._aot import _RE_RES, cubin_tool

    text = cubin_tool("cuobjdump", cubin(arch), "-res-usage")
    return {m.group(1): {"registers": int(m.group(2)), "static_shared": int(m.group(4))} for m in _RE_RES.finditer(text)}
