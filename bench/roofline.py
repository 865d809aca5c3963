"""Roofline floors and timing shared by every benchmark in bench/.

The workloads, their shapes and their floors are defined once, in
vitkernels/workloads.py (bench/WORKLOADS.md explains them): ``reference(id,
pass)`` gives one as a ``Workload``. Ceilings are the ones measured on the lent
H200: 4.3 TB/s device-to-device (bytes read + written) and 788 TFLOP/s dense
bf16 matrix work. floor = max(bytes / bandwidth, flops / rate), each input read
once and each output written once.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable

from vitkernels.workloads import BANDWIDTH_BYTES_PER_S, MATMUL_FLOPS_PER_S, WORKLOADS

MATH_FLOPS_PER_S = MATMUL_FLOPS_PER_S


@dataclasses.dataclass(frozen=True)
class Workload:
    id: str  # "A1", "A1 fwd+bwd", "P3", ...
    flops: float
    bytes: float

    @property
    def floor_s(self) -> float:
        return max(self.bytes / BANDWIDTH_BYTES_PER_S, self.flops / MATH_FLOPS_PER_S)

    @property
    def bound(self) -> str:
        return "memory" if self.bytes / BANDWIDTH_BYTES_PER_S >= self.flops / MATH_FLOPS_PER_S else "math"

    def row(self, impl: str, seconds: float, **extra: object) -> dict[str, object]:
        """The numbers every benchmark row reports (goes to benchmark.extra_info)."""
        return {
            "workload": self.id,
            "impl": impl,
            "time_us": seconds * 1e6,
            "tflops": self.flops / seconds / 1e12,
            "gbps": self.bytes / seconds / 1e9,
            "floor_us": self.floor_s * 1e6,
            "fraction_of_floor": self.floor_s / seconds,
            "bound": self.bound,
            **extra,
        }


def reference(wid: str, which: str = "fwd") -> Workload:
    """A reference workload's flops and bytes for one pass ("fwd", "bwd", "fwd+bwd");
    the row id is the workload id, with the pass appended unless it is "fwd"."""
    w = WORKLOADS[wid]
    return Workload(wid if which == "fwd" else f"{wid} {which}", w.flops(which), w.bytes(which))


def tensor_bytes(*shapes_and_itemsizes: tuple[tuple[int, ...], int]) -> int:
    """Sum of numel * itemsize over (shape, itemsize) pairs."""
    total = 0
    for shape, itemsize in shapes_and_itemsizes:
        n = 1
        for s in shape:
            n *= s
        total += n * itemsize
    return total


def cuda_time(fn: Callable[[], object], *, warmup: int = 25, rep: int = 200) -> float:
    """Median seconds of fn() on the current CUDA stream, timed with device events."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(rep):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)
