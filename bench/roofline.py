"""Roofline floors and timing shared by every benchmark in bench/.

Ceilings are the ones WORKLOADS.md measured on the lent H100: 3.0 TB/s
device-to-device (bytes read + written) and 798 TFLOP/s dense bf16 matrix work.
floor = max(bytes / bandwidth, flops / rate), each input read once and each
output written once.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable

BANDWIDTH_BYTES_PER_S = 3.0e12
MATH_FLOPS_PER_S = 798e12


@dataclasses.dataclass(frozen=True)
class Workload:
    id: str  # "A1", "P3", ...
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
