"""Host time per op call, layer by layer: what the Python path of each op costs.

    python bench/host_overhead.py [--calls N] [--json PATH]

Each cell is the mean wall time of one call of one layer, in microseconds, over N
calls after warm-up (the fastest of 5 rounds):

    validate   the op's argument checks (``_inputs``)
    select     backend selection on those checked inputs (``select``)
    launcher   the Triton (or CUDA extension) launcher called directly
    launches   the Triton launches alone, as that launcher made them (``Launch.run``:
               Triton's own ``JITFunction.run`` and the device guard), triton only
    custom_op  the ``vitkernels::*_fwd`` custom op (launcher plus torch.library)
    op         the public op (validation, dispatch, custom op, launcher), no grad
    op_grad    the public op on inputs that require grad (builds the autograd graph)
    fwd_bwd    the public op and its backward

On a GPU the kernels run and the time is the host's: the call returns when its
kernels are queued (the script synchronises only between rounds, outside the
timing, with shapes small enough that the GPU keeps up). Without a GPU the Triton
kernels are NOT run: ``Launch.run`` (vitkernels/triton/_common.py) is replaced by
a stub that enters the device guard and returns, so the rows measure everything
up to Triton's own launch, which is not counted; the torch backend runs its
operations on the CPU at tiny shapes (float32 there, float16 on a GPU). Label CPU numbers "CPU host path, kernel
launch stubbed": they are measured, but not GPU numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

GPU = torch.cuda.is_available()
if not GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the triton backend takes CPU tensors

from vitkernels.ops import _dispatch  # noqa: E402
from vitkernels.ops import patch_embed as pe_op  # noqa: E402
from vitkernels.ops import performer as perf_op  # noqa: E402
from vitkernels.ops import relpos as relpos_op  # noqa: E402
from vitkernels.triton import _common  # noqa: E402


def _stub_launches() -> None:
    """Without a GPU: every Triton launch enters its device guard and returns."""

    def run(self: _common.Launch) -> None:
        with _common.device_guard(*self.args):
            pass

    _common.Launch.run = run  # type: ignore[method-assign]


_clock = time.perf_counter if GPU else time.process_time


def _sync() -> None:
    if GPU:
        torch.cuda.synchronize()


def per_call_us(fn: Callable[[], Any], calls: int, rounds: int = 5) -> float:
    """The fastest round's mean host time of one call (us): the least disturbed by
    other processes. On a GPU wall time (the host's latency per call); without one
    this process's CPU time, on one torch thread (a shared CPU's other processes
    then add no time)."""
    for _ in range(max(20, calls // 10)):
        fn()
    _sync()
    means = []
    for _ in range(rounds):
        total = 0.0
        for start in range(0, calls, 50):  # synchronise every 50 calls, outside the timing
            n = min(50, calls - start)
            t0 = _clock()
            for _ in range(n):
                fn()
            total += _clock() - t0
            _sync()
        means.append(total / calls * 1e6)
    return min(means)


# ----------------------------------------------------------------------------
# one tiny call of each op (host cost, not kernel time, is measured)


def _rand(*shape: int, dtype: torch.dtype, grad: bool = False) -> torch.Tensor:
    dev = "cuda" if GPU else "cpu"
    return torch.randn(*shape, dtype=dtype, device=dev).requires_grad_(grad)


def relpos_args(dtype: torch.dtype, grad: bool) -> tuple[tuple, dict]:
    B, H, R, Dk, Dv = 1, 2, 4, 16, 32
    N = R * R
    args = (_rand(B, H, N, Dk, dtype=dtype, grad=grad), _rand(B, H, N, Dk, dtype=dtype, grad=grad),
            _rand(B, H, N, Dv, dtype=dtype, grad=grad), _rand(H, N, dtype=dtype, grad=grad))  # fmt: skip
    return args, {"fmap_size": R}


def performer_args(dtype: torch.dtype, grad: bool) -> tuple[tuple, dict]:
    B, T, E, M = 1, 16, 32, 16
    qkv = _rand(B, T, 3 * E, dtype=dtype, grad=grad)
    k, q, v = qkv.split(E, dim=-1)  # (B, T, E) views of one projection, as T2T's
    return (q, k, v, _rand(M, E, dtype=dtype)), {}


def patch_args(dtype: torch.dtype, grad: bool) -> tuple[tuple, dict]:
    B, C, S, P, D = 1, 3, 16, 8, 32
    images = _rand(B, C, S, S, dtype=dtype)
    weight, bias = _rand(D, C, P, P, dtype=dtype, grad=grad), _rand(D, dtype=dtype, grad=grad)
    pos = _rand(1, (S // P) ** 2 + 1, D, dtype=dtype, grad=grad)
    cls = _rand(1, 1, D, dtype=dtype, grad=grad)
    return (images, weight, bias), {"kernel_size": P, "pos_embed": pos, "cls_token": cls}


OPS: dict[str, tuple[Any, Callable[..., Any], str, Callable[[torch.dtype, bool], tuple[tuple, dict]]]] = {
    "relpos_attention": (relpos_op, relpos_op.relpos_attention, "relpos_attention_fwd", relpos_args),
    "performer_attention": (perf_op, perf_op.performer_attention, "performer_attention_fwd", performer_args),
    "patch_embed": (pe_op, pe_op.patch_embed, "patch_embed_fwd", patch_args),
}


A1_BATCH = 256  # the benchmark's (tests/test_host_overhead.py walks the row at a small one)


def relpos_a1_args(dtype: torch.dtype, grad: bool) -> tuple[tuple, dict]:
    """The benchmark's A1 call (batch 256, 14 x 14, 4 heads, Dk 32, Dv 64): on the H200
    its triton forward took 295 us of host time a call in the ops stage against 71 us for
    the tiny call above (2026-12-04); this row says whether the host cost grows with the
    shape (GPU only: the kernels run, 200 calls a round so the launch queue never fills)."""
    B, H, R, Dk, Dv = A1_BATCH, 4, 14, 32, 64
    N = R * R
    args = (_rand(B, H, N, Dk, dtype=dtype, grad=grad), _rand(B, H, N, Dk, dtype=dtype, grad=grad),
            _rand(B, H, N, Dv, dtype=dtype, grad=grad), _rand(H, N, dtype=dtype, grad=grad))  # fmt: skip
    return args, {"fmap_size": R}


# workload-sized rows (GPU only, no-grad layers only): name -> (op, its arguments)
WORKLOAD_ROWS: dict[str, tuple[str, Callable[[torch.dtype, bool], tuple[tuple, dict]]]] = {
    "relpos_attention A1": ("relpos_attention", relpos_a1_args),
}
WORKLOAD_CALLS = 200

# the custom op's arguments between the launcher's and the backend (patch_embed: save,
# False for the inference forward measured here)
CUSTOM_EXTRA: dict[str, tuple] = {"patch_embed": (False,)}


def _launcher_args(module: Any, backend: str, args: tuple, kwargs: dict) -> tuple:
    """The arguments the backend passes its forward launcher for this call (seen once);
    the custom op takes them and the backend's name."""
    real = module._launchers
    seen: list[tuple] = []

    def spying(name: str) -> tuple[Any, Any]:
        fwd, bwd = real(name)
        return (lambda *a: (seen.append(a), fwd(*a))[1]), bwd

    module._launchers = spying
    try:
        inputs = module._inputs(*args, **kwargs)
        with torch.no_grad():
            _dispatch.select(module.BACKENDS, inputs, backend).run(inputs)
    finally:
        module._launchers = real
    return seen[0]


def _launches_of(call: Callable[[], Any]) -> list[_common.Launch]:
    """The Triton launches one call makes (each also run once, as the call would)."""
    specs: list[_common.Launch] = []
    run = _common.Launch.run

    def spying(self: _common.Launch) -> None:
        specs.append(self)
        run(self)

    _common.Launch.run = spying  # type: ignore[method-assign]
    try:
        call()
    finally:
        _common.Launch.run = run  # type: ignore[method-assign]
    return specs


def rows_for(op: str, backend: str, dtype: torch.dtype, calls: int) -> dict[str, float]:
    workload = op in WORKLOAD_ROWS
    op, make = WORKLOAD_ROWS[op] if workload else (op, OPS[op][3])
    module, fn, custom, _ = OPS[op]
    if workload:
        calls = min(calls, WORKLOAD_CALLS)
    args, kwargs = make(dtype, False)
    out: dict[str, float] = {}
    with torch.no_grad():
        out["validate"] = per_call_us(lambda: module._inputs(*args, **kwargs), calls)
        inputs = module._inputs(*args, **kwargs)
        out["select"] = per_call_us(lambda: _dispatch.select(module.BACKENDS, inputs, backend), calls)
        if backend in ("triton", "cuda"):
            launcher_args = _launcher_args(module, backend, args, kwargs)
            launcher, _ = module._launchers(backend)
            op_fn = getattr(module, custom)
            out["launcher"] = per_call_us(lambda: launcher(*launcher_args), calls)
            if backend == "triton":
                specs = _launches_of(lambda: launcher(*launcher_args))
                out["launches"] = per_call_us(lambda: [s.run() for s in specs], calls)
            extra = CUSTOM_EXTRA.get(op, ())
            out["custom_op"] = per_call_us(lambda: op_fn(*launcher_args, *extra, backend), calls)
        out["op"] = per_call_us(lambda: fn(*args, **kwargs, backend=backend), calls)
    if workload:
        return out
    gargs, gkwargs = make(dtype, True)
    out["op_grad"] = per_call_us(lambda: fn(*gargs, **gkwargs, backend=backend), calls)

    def fwd_bwd() -> None:
        fn(*gargs, **gkwargs, backend=backend).sum().backward()

    out["fwd_bwd"] = per_call_us(fwd_bwd, max(50, calls // 4))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1000, help="timed calls per round (default 1000)")
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--ops", nargs="*", default=None,
                        help=f"ops to measure (default: all; on a GPU also {', '.join(WORKLOAD_ROWS)})")
    args = parser.parse_args(argv)
    if not GPU:
        _stub_launches()
        torch.set_num_threads(1)
    dtype = torch.float16 if GPU else torch.float32  # CPU: the torch backend's float16 is slow
    backends = ["triton", "torch"] + (["cuda"] if GPU and relpos_op.BACKENDS[0].requirements[0]() is None else [])
    where = (
        f"GPU {torch.cuda.get_device_name()}: kernels run, host time per call"
        if GPU
        else f"CPU ({platform.processor() or platform.machine()}): host path, Triton kernel launch stubbed"
    )
    print(f"host_overhead: {where}; torch {torch.__version__}, Python {sys.version.split()[0]}, "
          f"{dtype_name(dtype)}, us per call")  # fmt: skip
    layers = ("validate", "select", "launcher", "launches", "custom_op", "op", "op_grad", "fwd_bwd")
    print(f"{'op':<20} {'backend':<7} " + " ".join(f"{x:>9}" for x in layers))
    results = []
    ops = args.ops if args.ops is not None else list(OPS) + (list(WORKLOAD_ROWS) if GPU else [])
    for op in ops:
        for backend in backends:
            row = rows_for(op, backend, dtype, args.calls)
            results.append({"op": op, "backend": backend, "us": row})  # row's "op" is a layer
            cells = " ".join(f"{row[x]:9.1f}" if x in row else f"{'-':>9}" for x in layers)
            print(f"{op:<20} {backend:<7} {cells}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"where": where, "torch": torch.__version__, "rows": results}, f, indent=1)
    return 0


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


if __name__ == "__main__":
    sys.exit(main())
