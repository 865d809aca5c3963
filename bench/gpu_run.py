"""The stages of bench/gpu_check.sh, one process each, all under one deadline.

    python bench/gpu_run.py STAGE --work DIR [--deadline EPOCH] [--dry-run] [options]

    env          versions, clocks, and the two ceilings measured on this GPU: a large
                 device-to-device copy (bytes read + written) and a bf16 matrix product
    correctness  every op x backend (torch, triton, cuda) x dtype (float32, float16,
                 bfloat16), forward and backward, against the reference backend in
                 float64: fresh random inputs, outputs poisoned with NaN
    ops          the op benchmarks (default A1 A4 T1 P1, forward and forward+backward)
                 against their peers: eager, eager_timm, torch, triton, cuda first,
                 then the compiling peers (compiled, flex) while time remains
    models       whole models at batch 256 (default LeViT-256, T2T-ViT-14, ViT-B/16):
                 eager and optimized first, then compiled and compiled_optimized
    report       (no torch) WORK/ -> the files under --out: the results JSON for
                 bench/results/ (pytest-benchmark layout, read by bench/make_results.py),
                 check.json (everything) and summary.txt; prints the summary

Every stage appends one JSON record per line to WORK/<stage>.jsonl as it goes, so a
stage stopped at the deadline (gpu_check.sh sends SIGINT) keeps what it measured and
records what it cut; before each item a stage checks that the item still fits.

Times are medians of CUDA-event timed calls after warm-up, with the input sets
rotated so that they do not sit in L2. Beside each (the ops stage): the host's time
to issue one call, the device time of the call's kernels from torch.profiler
(kernel_us, what the compiler-based estimate models), calls back to back between
two events (stream_us) and the calls replayed from one CUDA graph (graph_us, no
host cost per call; graph_error where an op cannot be captured). Measured numbers come only from a GPU:
--dry-run walks the same plan on CPU at tiny sizes in seconds, runs what runs
there (the torch backend against float64, the eager peers, the models at batch 1)
and records everything that needs a GPU as skipped; it never writes a time.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime as dt
import hashlib
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
NOMINAL_COPY = 4.3e12  # B/s, WORKLOADS.md: measured on the lent H200
NOMINAL_MATMUL = 788e12  # FLOP/s, dense bf16, likewise
NEEDS_GPU = "needs a GPU (dry run)"
STAGES = ("env", "correctness", "ops", "models", "report")
DEFAULT_OPS = ("A1", "A4", "T1", "P1", "M1")
REST_OPS = ("A2", "A3", "A5", "T2", "P2", "P3", "M2", "M3")
DEFAULT_MODELS = ("LeViT-256 [timm]", "T2T-ViT-14 [zoo]", "ViT-B/16 [timm]")
PASSES = ("fwd", "fwd+bwd")
PEERS = ("eager", "eager_timm", "torch", "compiled", "flex")  # as bench/make_results.py
OUTSIDE_PEERS = ("eager", "eager_timm", "compiled", "flex")  # not this package's code
CHEAP_IMPLS = ("eager", "eager_timm", "torch", "triton", "cuda")
COMPILING_IMPLS = ("compiled", "flex")


class Stage:
    """One stage's records (WORK/<name>.jsonl, one JSON object per line) and deadline."""

    def __init__(self, name: str, work: Path, deadline: float, dry_run: bool) -> None:
        self.name, self.deadline, self.dry_run = name, deadline, dry_run
        work.mkdir(parents=True, exist_ok=True)
        self.path = work / f"{name}.jsonl"
        self.current = ""

    def left(self) -> float:
        return self.deadline - time.time()

    def record(self, kind: str, **fields: Any) -> dict[str, Any]:
        rec = {"kind": kind, "stage": self.name, **fields}
        with self.path.open("a") as f:
            f.write(json.dumps(rec, default=str) + "\n")
        return rec

    def fits(self, what: str, seconds: float) -> bool:
        """Whether ``what`` (about ``seconds`` long) fits before the deadline; records a cut if not."""
        if self.left() >= seconds:
            self.current = what
            return True
        self.record(
            "cut", what=what, reason=f"deadline: {self.left():.0f} s left, needs ~{seconds:.0f} s"
        )
        return False


# ----------------------------------------------------------------------------
# shared helpers


def log(msg: str) -> None:
    print(f"[gpu_run {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _torch():
    import torch

    return torch


def device(dry_run: bool) -> str:
    return "cpu" if dry_run else "cuda"


def sync(dev: str) -> None:
    if dev == "cuda":
        _torch().cuda.synchronize()


def poison(dev: str) -> None:
    """Fill the caching allocator's free blocks with NaN (0xFF bytes is NaN in float32,
    float16 and bfloat16), so an output element a kernel never writes shows up."""
    if dev != "cuda":
        return
    torch = _torch()
    torch.cuda.synchronize()
    big = torch.empty(512 * 2**20, dtype=torch.uint8, device=dev).fill_(0xFF)
    small = [torch.empty(2**19, dtype=torch.uint8, device=dev).fill_(0xFF) for _ in range(64)]
    del big, small


def dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def commit() -> str:
    """VITKERNELS_COMMIT (the device machine's copy has no .git), else git, else unknown."""
    value = os.environ.get("VITKERNELS_COMMIT", "").strip()
    if value:
        return value
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT, timeout=10
        )
        if out.returncode == 0:
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def tree_digest() -> str:
    """sha256 of the package, kernels and bench sources: identifies the code that ran
    even where there is no commit to name."""
    h = hashlib.sha256()
    for folder, pattern in (
        ("vitkernels", "*.py"),
        ("models", "*.py"),
        ("csrc", "*"),
        ("bench", "*.py"),
    ):
        for f in sorted((ROOT / folder).rglob(pattern)):
            if f.is_file() and "__pycache__" not in f.parts:
                h.update(f.relative_to(ROOT).as_posix().encode())
                h.update(f.read_bytes())
    return h.hexdigest()[:16]


def nvidia_smi() -> dict[str, str]:
    fields = (
        "name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.draw,temperature.gpu,pstate"
    )
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=20,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError) as exc:
        return {"error": f"nvidia-smi: {exc}"}
    if out.returncode != 0 or not out.stdout.strip():
        return {"error": f"nvidia-smi exit {out.returncode}: {out.stderr.strip()[:200]}"}
    values = [v.strip() for v in out.stdout.splitlines()[0].split(",")]
    return dict(zip(fields.split(","), values, strict=False))


def time_calls(
    step: Callable[[int], Any], dev: str, budget_s: float, min_reps: int = 10, max_reps: int = 200
) -> dict[str, float]:
    """Median time of step(i) from CUDA events, after a first call (compilation, timed on
    the host) and a warm-up; reps fill about budget_s. step(i) rotates its input sets."""
    torch = _torch()
    t0 = time.perf_counter()
    step(0)
    sync(dev)
    first_s = time.perf_counter() - t0
    for i in range(3):
        step(i + 1)
    sync(dev)
    probe = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
    probe[0].record()
    for i in range(3):
        step(i)
    probe[1].record()
    probe[1].synchronize()
    per_call = max(probe[0].elapsed_time(probe[1]) / 3e3, 1e-6)
    reps = int(min(max_reps, max(min_reps, budget_s / per_call)))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    host = time.perf_counter()
    for i in range(reps):
        starts[i].record()
        step(i)
        ends[i].record()
    host = time.perf_counter() - host  # the host's time to issue the calls (no sync inside)
    ends[-1].synchronize()
    times = sorted(s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends, strict=True))
    return {
        "time_us": statistics.median(times),
        "min_us": times[0],
        "p90_us": times[int(0.9 * (len(times) - 1))],
        # host_us >= time_us: the GPU waited for the host (launch-bound at this size)
        "host_us": host / reps * 1e6,
        "reps": reps,
        "first_call_s": first_s,
        **stream_time(step, reps),
        **kernel_time(step, dev),
    }


def stream_time(step: Callable[[int], Any], calls: int) -> dict[str, float]:
    """stream_us: ``calls`` calls back to back between two events, per call. Where the
    host is slower than the GPU this is still the host's time (the GPU waits for each
    launch); graph_time removes the host."""
    torch = _torch()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(calls):
        step(i)
    end.record()
    end.synchronize()
    return {"stream_us": start.elapsed_time(end) * 1e3 / calls}


def kernel_time(step: Callable[[int], Any], dev: str, calls: int = 5) -> dict[str, Any]:
    """kernel_us: the device time of the kernels one call runs, from torch.profiler: the
    durations of every CUDA kernel, memset and copy of ``calls`` calls, summed, per call
    (what the estimate models; no launch gaps). kernels: how many per call."""
    torch = _torch()
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for i in range(calls):
                step(i)
            sync(dev)
        device = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    except Exception as exc:  # the profiler is unavailable or failed: say so in the row
        torch.cuda.synchronize()
        return {"kernel_error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    if not device:
        return {"kernel_error": "the profiler recorded no CUDA kernels"}
    total = sum(e.time_range.elapsed_us() for e in device)
    return {"kernel_us": total / calls, "kernels": len(device) / calls}


def graph_time(step: Callable[[int], Any], sets: int, replays: int = 20) -> dict[str, Any]:
    """graph_us: the same calls captured in one CUDA graph (one call per input set) and
    replayed, per call: the device's time without the host's per-call cost. An op that
    cannot be captured (a host sync, an unsupported allocation) reports graph_error."""
    torch = _torch()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    try:
        with torch.cuda.stream(side):  # warm-up on a side stream, as capture needs
            for i in range(sets):
                step(i)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(sets):
                step(i)
        graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
    except Exception as exc:
        torch.cuda.synchronize()
        return {"graph_error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    return {"graph_us": start.elapsed_time(end) * 1e3 / (replays * sets)}


def rel_error(got: Any, want: Any, floor: float = 0.0) -> tuple[float, int]:
    """(||got - want|| / max(||want||, floor) in float64, number of non-finite elements
    of got). floor: the scale of a value that is 0 in exact arithmetic (see
    ``zero_gradient_floors``)."""
    got64, want64 = got.detach().double(), want.detach().double()
    nonfinite = int((~got64.isfinite()).sum())
    denom = max(want64.norm().item(), floor) or 1.0
    if nonfinite:
        return math.inf, nonfinite
    return (got64 - want64).norm().item() / denom, 0


# ----------------------------------------------------------------------------
# env: versions, clocks, ceilings


def versions() -> dict[str, Any]:
    torch = _torch()
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "commit": commit(),
        "tree": tree_digest(),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as exc:  # the record says why
        info["triton"] = f"not importable ({type(exc).__name__}: {exc})"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(
            gpu=p.name,
            capability=f"{p.major}.{p.minor}",
            sms=p.multi_processor_count,
            l2_bytes=getattr(p, "L2_cache_size", None),
            memory_gib=round(p.total_memory / 2**30, 1),
            gpu_count=torch.cuda.device_count(),
        )
    else:
        info.update(gpu=None, gpu_count=0)
    from vitkernels import cuda

    info["cuda_extension"] = cuda.library_path()
    info["cuda_extension_reason"] = cuda.unavailable_reason()
    return info


def measure_copy(dev: str) -> dict[str, float]:
    torch = _torch()
    n = 2**30  # bfloat16 elements: 2 GiB read + 2 GiB written per copy
    src = torch.randn(n, device=dev, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    t = time_calls(lambda i: dst.copy_(src), dev, budget_s=0.3, min_reps=10, max_reps=50)
    return {"bytes_per_s": 2 * n * 2 / (t["time_us"] * 1e-6), **t}


def measure_matmul(dev: str) -> dict[str, float]:
    torch = _torch()
    n = 8192
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    t = time_calls(lambda i: a @ b, dev, budget_s=0.3, min_reps=10, max_reps=50)
    return {"flops_per_s": 2.0 * n**3 / (t["time_us"] * 1e-6), **t}


def stage_env(st: Stage) -> None:
    info = versions()
    st.record("env", **info)
    log(
        f"{info.get('gpu') or 'no GPU'}; torch {info['torch']} (CUDA {info['cuda']}), "
        f"triton {info['triton']}; commit {info['commit'][:12]}; CUDA extension: "
        f"{info['cuda_extension'] or info['cuda_extension_reason']}"
    )
    if st.dry_run:
        st.record("skipped", what="clocks and ceilings", reason=NEEDS_GPU)
        return
    st.record("clocks", when="before the ceilings", **nvidia_smi())
    if st.fits("ceiling: copy", 10):
        copy_ = measure_copy("cuda")
        st.record("ceiling", name="copy", value=copy_["bytes_per_s"], unit="B/s", **copy_)
        log(f"copy: {copy_['bytes_per_s'] / 1e12:.2f} TB/s (read + written)")
    if st.fits("ceiling: bf16 matmul", 10):
        mm = measure_matmul("cuda")
        st.record("ceiling", name="matmul_bf16", value=mm["flops_per_s"], unit="FLOP/s", **mm)
        log(f"bf16 matmul 8192^3: {mm['flops_per_s'] / 1e12:.0f} TFLOP/s")
    st.record("clocks", when="after the ceilings", **nvidia_smi())


# ----------------------------------------------------------------------------
# correctness: every op x backend x dtype against float64


class Case:
    """One op call: make(dtype, dev) -> (leaves that get gradients, other tensors);
    call(tensors, backend) -> output."""

    def __init__(self, op: str, name: str, workload: bool, make: Callable, call: Callable) -> None:
        self.op, self.name, self.workload, self.make, self.call = op, name, workload, make, call


def relpos_case(
    name: str, workload: bool, B: int, H: int, R: int, C: int, s: int, Dk: int, Dv: int
) -> Case:
    def make(dtype, dev):
        torch = _torch()
        nq = (-(-R // s)) * (-(-C // s))
        leaves = {
            "q": torch.randn(B, H, nq, Dk, device=dev, dtype=dtype),
            "k": torch.randn(B, H, R * C, Dk, device=dev, dtype=dtype),
            "v": torch.randn(B, H, R * C, Dv, device=dev, dtype=dtype),
            "table": torch.randn(H, R * C, device=dev, dtype=dtype),
        }
        return leaves, {}

    def call(t, backend):
        import vitkernels

        return vitkernels.relpos_attention(
            t["q"], t["k"], t["v"], t["table"], fmap_size=(R, C), q_stride=s, backend=backend
        )

    return Case("relpos_attention", name, workload, make, call)


def performer_case(name: str, workload: bool, B: int, T: int, E: int, M: int) -> Case:
    def make(dtype, dev):
        torch = _torch()
        # as T2T's kqv Linear after a LayerNorm gives them: entries ~ N(0, 1/3)
        kqv = (torch.randn(B, T, 3 * E, device=dev) * 0.6).to(dtype)
        w = torch.nn.init.orthogonal_(torch.empty(M, E, device=dev)) * math.sqrt(M)
        return {"kqv": kqv}, {"w": w}  # w stays float32, as the model holds it

    def call(t, backend):
        import vitkernels

        k, q, v = t["kqv"].split(E, dim=-1)  # views of one projection, as Token_performer
        return vitkernels.performer_attention(q, k, v, t["w"], backend=backend)

    return Case("performer_attention", name, workload, make, call)


def patch_case(
    name: str,
    workload: bool,
    B: int,
    side: int,
    kernel: int,
    stride: int,
    padding: int,
    D: int,
    order: str,
    in_norm: bool,
    out_norm: bool,
    prefix: int,
) -> Case:
    L = ((side + 2 * padding - kernel) // stride + 1) ** 2
    K = 3 * kernel * kernel

    def make(dtype, dev):
        torch = _torch()
        leaves = {
            "weight": torch.randn(D, K, device=dev, dtype=dtype) * K**-0.5,
            "bias": torch.randn(D, device=dev, dtype=dtype) * 0.1,
        }
        if in_norm:
            leaves["in_w"] = 1 + 0.1 * torch.randn(K, device=dev, dtype=dtype)
            leaves["in_b"] = 0.1 * torch.randn(K, device=dev, dtype=dtype)
        if out_norm:
            leaves["out_w"] = 1 + 0.1 * torch.randn(D, device=dev, dtype=dtype)
            leaves["out_b"] = 0.1 * torch.randn(D, device=dev, dtype=dtype)
        if prefix:
            leaves["cls"] = torch.randn(1, prefix, D, device=dev, dtype=dtype)
            leaves["pos"] = torch.randn(1, prefix + L, D, device=dev, dtype=dtype) * 0.1
        return leaves, {"images": torch.randn(B, 3, side, side, device=dev, dtype=dtype)}

    def call(t, backend):
        import vitkernels

        return vitkernels.patch_embed(
            t["images"], t["weight"], t["bias"], kernel_size=kernel, stride=stride,
            padding=padding, patch_order=order,
            in_norm=(t["in_w"], t["in_b"], 1e-5) if in_norm else None,
            out_norm=(t["out_w"], t["out_b"], 1e-5) if out_norm else None,
            pos_embed=t.get("pos"), cls_token=t.get("cls"), backend=backend,
        )  # fmt: skip

    return Case("patch_embed", name, workload, make, call)


def mixing_case(
    name: str, workload: bool, B: int, H: int, nq: int, nk: int, D: int, kind: str
) -> Case:
    """head_mixing_attention: kind "talking" (pre and post mixing weights, vit-pytorch's
    CaiT), "talking+bias" (timm's TalkingHeadAttn), "reattention" (post mixing and a
    LayerNorm over the heads, DeepViT) or "pre" (logits mixed only)."""

    def make(dtype, dev):
        torch = _torch()
        leaves = {
            "q": torch.randn(B, H, nq, D, device=dev, dtype=dtype),
            "k": torch.randn(B, H, nk, D, device=dev, dtype=dtype),
            "v": torch.randn(B, H, nk, D, device=dev, dtype=dtype),
        }
        mix = {"pre_w": "pre" in kind or "talking" in kind, "post_w": kind != "pre"}
        for key, on in mix.items():
            if on:  # near identity, as trained mixings are
                leaves[key] = torch.eye(H, device=dev, dtype=dtype) + 0.3 * torch.randn(
                    H, H, device=dev, dtype=dtype
                )
        if "bias" in kind:
            leaves["pre_b"] = 0.1 * torch.randn(H, device=dev, dtype=dtype)
            leaves["post_b"] = 0.1 * torch.randn(H, device=dev, dtype=dtype)
        if kind == "reattention":
            leaves["norm_w"] = 1 + 0.1 * torch.randn(H, device=dev, dtype=dtype)
            leaves["norm_b"] = 0.1 * torch.randn(H, device=dev, dtype=dtype)
        return leaves, {}

    def call(t, backend):
        import vitkernels

        kw = {}
        if "pre_w" in t:
            kw["pre"] = (t["pre_w"], t.get("pre_b"))
        if "post_w" in t:
            kw["post"] = (t["post_w"], t.get("post_b"))
        if "norm_w" in t:
            kw["head_norm"] = (t["norm_w"], t["norm_b"], 1e-5)
        return vitkernels.head_mixing_attention(t["q"], t["k"], t["v"], **kw, backend=backend)

    return Case("head_mixing_attention", name, workload, make, call)


def correctness_cases(dry_run: bool) -> list[Case]:
    if dry_run:  # the same plan at sizes the CPU runs in a blink
        return [
            relpos_case("A1", True, 1, 2, 4, 4, 1, 8, 16),
            relpos_case("A4", True, 1, 2, 4, 4, 2, 8, 32),
            relpos_case("rect 5x9 q_stride 2", False, 1, 2, 5, 9, 2, 16, 24),
            performer_case("T1", True, 1, 64, 16, 8),
            performer_case("odd T 50 E 48 M 24", False, 1, 50, 48, 24),
            patch_case("P1", True, 1, 32, 16, 16, 0, 32, "cpq", False, False, 1),
            patch_case("P2", True, 1, 32, 16, 16, 0, 32, "pqc", True, True, 1),
            patch_case("P3", True, 1, 32, 7, 4, 2, 24, "cpq", True, False, 0),
            mixing_case("M1", True, 1, 4, 9, 9, 16, "talking"),
            mixing_case("M1-timm biases", True, 1, 4, 9, 9, 16, "talking+bias"),
            mixing_case("M2-H4 re-attention", True, 1, 4, 9, 9, 16, "reattention"),
        ]
    return [
        relpos_case("A1 (batch 8)", True, 8, 4, 14, 14, 1, 32, 64),
        relpos_case("A4 (batch 8)", True, 8, 8, 14, 14, 2, 32, 128),
        relpos_case("A3 (batch 8)", True, 8, 8, 4, 4, 1, 32, 64),
        relpos_case("rect 5x9 q_stride 2", False, 2, 2, 5, 9, 2, 16, 24),
        performer_case("T1 (batch 2)", True, 2, 3136, 64, 32),
        performer_case("odd T 1000 E 48 M 24", False, 2, 1000, 48, 24),
        patch_case("P1 (batch 4)", True, 4, 224, 16, 16, 0, 768, "cpq", False, False, 1),
        patch_case("P2 (batch 2)", True, 2, 224, 16, 16, 0, 768, "pqc", True, True, 1),
        patch_case("P3 (batch 2)", True, 2, 224, 7, 4, 2, 192, "cpq", True, False, 0),
        patch_case("odd 30x30 k6 s4 p2", False, 2, 30, 6, 4, 2, 40, "cpq", True, True, 1),
        mixing_case("M1 (batch 8)", True, 8, 4, 196, 196, 48, "talking"),
        mixing_case("M1-timm biases (batch 4)", True, 4, 4, 196, 196, 48, "talking+bias"),
        mixing_case("M2-H4 re-attention (batch 4)", True, 4, 4, 197, 197, 64, "reattention"),
        mixing_case("M3 class attention (batch 8)", True, 8, 4, 1, 197, 48, "talking"),
        mixing_case("odd H3 Nq50 Nk77 D32 pre only", False, 2, 3, 50, 77, 32, "pre"),
    ]


TOL = {"float32": 1e-4, "float16": 4e-3, "bfloat16": 2e-2}  # ||err|| / ||ref||
GRAD_TOL = {"float32": 2e-4, "float16": 1e-2, "bfloat16": 5e-2}


def tf32_in_force(backend: str) -> str | None:
    """Which of torch's TF32 switches are on for a backend that runs float32 through
    cuBLAS/cuDNN (the torch backend: Conv2d, linear, matmul, SDPA), else None. The
    triton and cuda kernels set their own dot precision (ieee or tf32x3), whatever
    torch's switches say; the reference backend runs float64."""
    if backend != "torch":
        return None
    torch = _torch()
    on = [name for name, flag in (("cudnn.allow_tf32", torch.backends.cudnn.allow_tf32),
                                  ("cuda.matmul.allow_tf32", torch.backends.cuda.matmul.allow_tf32))
          if flag]  # fmt: skip
    return ", ".join(on) or None


# TF32 rounds float32 operands to a 10-bit mantissa, unit roundoff u = 2**-11 (4.9e-4),
# and accumulates and stores in float32: forward 4u, gradients (two products deep) 8u
TF32_TOL, TF32_GRAD_TOL = 4 * 2.0**-11, 8 * 2.0**-11


def tolerances(backend: str, dtype: str) -> tuple[float, float, str | None]:
    """(forward, gradient) tolerance for a backend's result in dtype, and why it is not
    the dtype's own: a float32 result the torch backend computed with TF32 on (cuDNN's
    default for convolutions) is held to TF32's rounding, not float32's."""
    tf32 = tf32_in_force(backend) if dtype == "float32" else None
    if tf32 is None:
        return TOL[dtype], GRAD_TOL[dtype], None
    return TF32_TOL, TF32_GRAD_TOL, f"TF32 on ({tf32}): tolerances of its 10-bit mantissa"


OP_MODULES = {"relpos_attention": "relpos", "performer_attention": "performer",
              "patch_embed": "patch_embed", "head_mixing_attention": "head_mixing"}  # fmt: skip


def op_backends(op: str) -> list[str]:
    """The backends an op has (head_mixing_attention has no cuda backend)."""
    import importlib

    return [b.name for b in importlib.import_module(f"vitkernels.ops.{OP_MODULES[op]}").BACKENDS]


def softmax_input_grads() -> Any:
    """A torch function mode under which every softmax whose input requires grad records
    that input's gradient (in ``.grads``) when a backward pass reaches it; entered for
    the float64 reference call only."""
    torch = _torch()

    class SoftmaxInputGrads(torch.overrides.TorchFunctionMode):
        def __init__(self) -> None:
            super().__init__()
            self.grads: list[Any] = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in (torch.Tensor.softmax, torch.softmax) and args[0].requires_grad:
                args[0].register_hook(self.grads.append)
            return func(*args, **(kwargs or {}))

    return SoftmaxInputGrads()


def zero_gradient_floors(case: Case, logit_grads: list[Any]) -> dict[str, float]:
    """{leaf: floor} for the gradients that are 0 in exact arithmetic. The pre-mix bias
    a[g] shifts a whole softmax row, which the softmax ignores: its exact gradient is 0
    (the triton kernels return exact zeros), and a backend that sums its B*Nq*Nk terms
    dl[b, g, i, j] (autograd does) lands at the rounding of sum |dl|. Its error is
    measured against that sum's norm over g, not against the float64 reference's own
    rounding (~1e-17, which made every backend fail by 1e12 or by 1.0 on the GPU)."""
    if case.op != "head_mixing_attention" or not logit_grads:
        return {}
    (dl,) = logit_grads  # (B, H, Nq, Nk), the mixed logits' gradient
    return {"pre_b": dl.detach().abs().sum((0, 2, 3)).norm().item()}


def _expected_refusal(backend: str, dtype: str, workload: bool) -> str | None:
    """Why a refusal is expected (a capability, not a defect), or None when it is a failure."""
    from vitkernels import cuda

    if backend == "cuda" and not cuda.is_built():
        return f"no CUDA extension: {cuda.unavailable_reason()}"
    if backend == "cuda" and dtype == "float32":
        return "the cuda backend takes float16/bfloat16 (float32 runs on triton)"
    if not workload:
        return "an odd shape a backend may decline"
    return None


def check_one(st: Stage, case: Case, backend: str, dtype: Any, dev: str) -> None:
    torch = _torch()
    from vitkernels import BackendNotSupportedError

    name = dtype_name(dtype)
    base = {"op": case.op, "case": case.name, "backend": backend, "dtype": name}
    leaves, consts = case.make(dtype, dev)
    ref_leaves = {k: v.detach().double().requires_grad_() for k, v in leaves.items()}
    ref_consts = {k: v.double() for k, v in consts.items()}
    with softmax_input_grads() as logit_grads:
        want = case.call({**ref_leaves, **ref_consts}, "reference")
    grad_out = torch.randn_like(want)
    want_grads = torch.autograd.grad(want, list(ref_leaves.values()), grad_out)
    floors = zero_gradient_floors(case, logit_grads.grads)
    run_leaves = {k: v.detach().clone().requires_grad_() for k, v in leaves.items()}
    poison(dev)
    try:
        got = case.call({**run_leaves, **consts}, backend)
    except BackendNotSupportedError as exc:
        why = _expected_refusal(backend, name, case.workload)
        for p in ("fwd", "bwd"):
            if why is None:
                st.record("check", **base, **{"pass": p}, status="FAIL", reason=f"refused: {exc}")
            else:
                st.record("check", **base, **{"pass": p}, status="n/a", reason=why)
        return
    sync(dev)
    tol, grad_tol, why = tolerances(backend, name)
    if why:
        base["tol_note"] = why
    err, bad = rel_error(got, want)
    ok = got.shape == want.shape and got.dtype == dtype and err <= tol
    st.record(
        "check",
        **base,
        **{"pass": "fwd"},
        status="pass" if ok else "FAIL",
        rel_err=err,
        nonfinite=bad,
        tol=tol,
        shape=list(got.shape),
        out_dtype=dtype_name(got.dtype),
    )
    poison(dev)
    grads = torch.autograd.grad(
        got, list(run_leaves.values()), grad_out.to(got.dtype), allow_unused=True
    )
    sync(dev)
    worst, worst_name, worst_bad = 0.0, "", 0
    for (leaf, g), w in zip(zip(run_leaves, grads, strict=True), want_grads, strict=True):
        if g is None:
            worst, worst_name, worst_bad = math.inf, f"{leaf} (no gradient)", 0
            break
        e, b = rel_error(g, w, floors.get(leaf, 0.0))
        if e >= worst:
            worst, worst_name, worst_bad = e, leaf, b
    st.record(
        "check",
        **base,
        **{"pass": "bwd"},
        status="pass" if worst <= grad_tol else "FAIL",
        rel_err=worst,
        worst=worst_name,
        nonfinite=worst_bad,
        tol=grad_tol,
    )


def stage_correctness(st: Stage, backends: list[str]) -> None:
    torch = _torch()
    dev = device(st.dry_run)
    dtypes = (torch.bfloat16, torch.float16, torch.float32)
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    st.record("seed", seed=seed)
    # bfloat16 first: the dtype that matters on a GPU
    plan = [(d, c, b) for d in dtypes for c in correctness_cases(st.dry_run) for b in backends]
    for n, (dtype, case, backend) in enumerate(plan):
        base = {"op": case.op, "case": case.name, "backend": backend, "dtype": dtype_name(dtype)}
        if backend not in op_backends(case.op):  # not a refusal: the op has no such backend
            for p in ("fwd", "bwd"):
                st.record("check", **base, **{"pass": p}, status="n/a",
                          reason=f"{case.op} has no {backend} backend")  # fmt: skip
            continue
        if st.dry_run and (backend != "torch" or dtype != torch.float32):
            for p in ("fwd", "bwd"):
                st.record("check", **base, **{"pass": p}, status="skipped", reason=NEEDS_GPU)
            continue
        what = " ".join(base.values())
        if not st.fits(f"correctness from {what} on ({len(plan) - n} combinations)", 3):
            return
        try:
            check_one(st, case, backend, dtype, dev)
        except Exception as exc:  # a crash is a failed check, and the rest still run
            reason = f"{type(exc).__name__}: {str(exc)[:300]}"
            for p in ("fwd", "bwd"):
                st.record("check", **base, **{"pass": p}, status="FAIL", reason=reason)
    log("correctness: done")


# ----------------------------------------------------------------------------
# op benchmarks

# counting as WORKLOADS.md: each input read once, each output written once
RELPOS = {"A1": (4, 14, 1, 32, 64), "A2": (6, 7, 1, 32, 64), "A3": (8, 4, 1, 32, 64),
          "A4": (8, 14, 2, 32, 128), "A5": (4, 14, 1, 16, 32)}  # fmt: skip
PERFORMER = {"T1": (3136, 64, 32), "T2": (784, 64, 32)}
PATCH = ("P1", "P2", "P3")
MIXING = ("M1", "M2", "M3")  # vitkernels/workloads.py's shapes; peers: bench/test_head_mixing.py


def counts(wid: str, B: int) -> dict[str, tuple[float, float]]:
    """{pass: (flops, bytes)} for bfloat16 at batch B; backward as bench/NOTES and the
    estimate count it (twice the forward products; saved statistics read)."""
    e, f32 = 2, 4
    if wid in RELPOS:
        H, side, s, Dk, Dv = RELPOS[wid]
        nk, nq = side * side, (-(-side // s)) ** 2
        fwd_f = 2.0 * B * H * nq * nk * (Dk + Dv)
        q, k = B * H * nq * Dk * e, B * H * nk * Dk * e
        v, o, table = B * H * nk * Dv * e, B * H * nq * Dv * e, H * nk * e
        fwd_b = q + k + v + table + o
        bwd_b = (q + k + v + 2 * o + B * H * nq * f32 + table) + (q + k + v + table)
        return {"fwd": (fwd_f, fwd_b), "fwd+bwd": (3 * fwd_f, fwd_b + bwd_b)}
    if wid in MIXING:
        from vitkernels.workloads import WORKLOADS

        w = dataclasses.replace(WORKLOADS[wid], batch=B)
        return {p: (w.flops(p), w.bytes(p)) for p in PASSES}
    if wid in PERFORMER:
        T, E, M = PERFORMER[wid]
        fwd_f = 8.0 * B * T * E * M
        act, w = B * T * E * e, M * E * f32
        fwd_b = 4 * act + w
        bwd_b = 4 * act + w + B * M * (1 + E) * f32 + 3 * act
        return {"fwd": (fwd_f, fwd_b), "fwd+bwd": (3 * fwd_f, fwd_b + bwd_b)}
    side, kernel, stride, pad, D, in_norm, out_norm, prefix = {
        "P1": (224, 16, 16, 0, 768, False, False, 1),
        "P2": (224, 16, 16, 0, 768, True, True, 1),
        "P3": (224, 7, 4, 2, 192, True, False, 0),
    }[wid]
    L = ((side + 2 * pad - kernel) // stride + 1) ** 2
    K = 3 * kernel * kernel
    gemm = 2.0 * B * L * D * K
    images, tokens = B * 3 * side * side * e, B * (prefix + L) * D * e
    params = D * K * e + D * e + (2 * K * e if in_norm else 0) + (2 * D * e if out_norm else 0)
    params += (2 * prefix + L) * D * e if prefix else 0
    fwd_b = images + params + tokens
    bwd_f = gemm * (2 if in_norm else 1)
    return {"fwd": (gemm, fwd_b), "fwd+bwd": (gemm + bwd_f, fwd_b + tokens + images + 2 * params)}


def _bench_module(name: str):
    """bench/test_<name>.py, for its peer implementations (one definition of each)."""
    sys.path.insert(0, str(HERE))
    import importlib

    return importlib.import_module(f"test_{name}")


class OpBench:
    """One workload's inputs and implementations: impl(name, train) -> fn(i) or a reason."""

    def __init__(self, wid: str, B: int, dev: str, dtype: Any, compile_mode: str, l2: int) -> None:
        self.wid, self.B, self.dev, self.dtype = wid, B, dev, dtype
        self.mode, self.l2 = compile_mode, l2
        torch = _torch()
        torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
        if wid in RELPOS:
            self._relpos_setup()
        elif wid in PERFORMER:
            self._performer_setup()
        elif wid in MIXING:
            self._mixing_setup()
        else:
            self._patch_setup()

    def _n_sets(self, per_set: int) -> int:
        return max(1, min(8, math.ceil(2 * self.l2 / per_set)))

    # relpos -----------------------------------------------------------------
    def _relpos_setup(self) -> None:
        torch = _torch()
        H, side, s, Dk, Dv = RELPOS[self.wid]
        nk, nq = side * side, (-(-side // s)) ** 2
        self.scale = Dk**-0.5
        self.table = torch.randn(H, nk, device=self.dev, dtype=self.dtype, requires_grad=True)
        shapes = ((nq, Dk), (nk, Dk), (nk, Dv))
        per_set = sum(self.B * H * n * d * 2 for n, d in shapes)
        self.sets = [
            tuple(torch.randn(self.B, H, n, d, device=self.dev, dtype=self.dtype, requires_grad=True)
                  for n, d in shapes)
            + (torch.randn(self.B, H, nq, Dv, device=self.dev, dtype=self.dtype),)
            for _ in range(self._n_sets(per_set))
        ]  # fmt: skip

    def _relpos_impl(self, impl: str, train: bool):
        import vitkernels

        torch = _torch()
        H, side, s, _, _ = RELPOS[self.wid]
        peers = _bench_module("relpos")
        if impl in ("eager", "eager_timm", "compiled"):
            cls = peers.TimmMath if impl == "eager_timm" else peers.VitPytorchMath
            module = (
                cls(self.table.detach(), side, s, self.scale).to(self.dev, self.dtype).train(train)
            )
            fn = torch.compile(module, mode=self.mode) if impl == "compiled" else module
            params = list(module.parameters())
        elif impl == "flex":
            fn, params = peers.flex_fn(self.table, side, s, self.scale), [self.table]
        else:

            def fn(q, k, v):
                return vitkernels.relpos_attention(q, k, v, self.table, fmap_size=side, q_stride=s,
                                                   scale=self.scale, backend=impl)  # fmt: skip

            params = [self.table]

        def step(i):
            q, k, v, g = self.sets[i % len(self.sets)]
            if train:
                return torch.autograd.grad(fn(q, k, v), [q, k, v, *params], g)
            with torch.no_grad():
                return fn(q, k, v)

        def check():
            q, k, v, _ = self.sets[0]
            with torch.no_grad():
                got = fn(q, k, v)[:2]
                want = vitkernels.relpos_attention(
                    q[:2].double(), k[:2].double(), v[:2].double(), self.table.double(),
                    fmap_size=side, q_stride=s, scale=self.scale, backend="reference",
                )  # fmt: skip
            return rel_error(got, want)

        return step, check

    # performer --------------------------------------------------------------
    def _performer_setup(self) -> None:
        torch = _torch()
        T, E, M = PERFORMER[self.wid]
        per_set = self.B * T * 3 * E * 2
        self.w = torch.nn.init.orthogonal_(torch.empty(M, E, device=self.dev)) * math.sqrt(M)
        self.sets = [
            ((torch.randn(self.B, T, 3 * E, device=self.dev) * 0.6).to(self.dtype).requires_grad_(),
             torch.randn(self.B, T, E, device=self.dev, dtype=self.dtype))
            for _ in range(self._n_sets(per_set))
        ]  # fmt: skip

    def _performer_impl(self, impl: str, train: bool):
        import vitkernels
        from vitkernels.backends import reference

        torch = _torch()
        E = PERFORMER[self.wid][1]
        peers = _bench_module("performer")
        if impl == "eager":
            attend = peers.official
        elif impl == "compiled":
            attend = torch.compile(peers.official, mode=self.mode)
        elif impl in ("torch", "triton", "cuda"):

            def attend(q, k, v, w):
                return vitkernels.performer_attention(q, k, v, w, eps=peers.EPS, backend=impl)
        else:
            return f"{impl} has no performer_attention peer"

        def step(i):
            kqv, dy = self.sets[i % len(self.sets)]
            if train:
                k, q, v = kqv.split(E, dim=-1)
                return torch.autograd.grad(attend(q, k, v, self.w), kqv, dy)
            with torch.no_grad():
                k, q, v = kqv.split(E, dim=-1)
                return attend(q, k, v, self.w)

        def check():
            kqv = self.sets[0][0].detach()
            with torch.no_grad():
                k, q, v = kqv.split(E, dim=-1)
                got = attend(q, k, v, self.w)[:2]
            k, q, v = kqv[:2].double().split(E, dim=-1)
            return rel_error(
                got, reference.performer_attention(q, k, v, self.w.double(), eps=peers.EPS)
            )

        return step, check

    # head_mixing ------------------------------------------------------------
    def _mixing_setup(self) -> None:
        torch = _torch()
        from vitkernels.workloads import WORKLOADS

        s = WORKLOADS[self.wid].shape
        self.mix_shape = s
        H, D = s.heads, s.head_dim
        per_set = self.B * H * (s.nq + 2 * s.nk) * D * 2

        def one_set():
            # as the layers hand them over: views of one projection, 'b n (h d) -> b h n d'
            q = torch.randn(self.B, s.nq, H * D, device=self.dev, dtype=self.dtype)
            kv = torch.randn(self.B, s.nk, 2 * H * D, device=self.dev, dtype=self.dtype)
            heads = [t.unflatten(-1, (H, D)).transpose(1, 2) for t in (q, *kv.chunk(2, -1))]
            g = torch.randn(self.B, H, s.nq, D, device=self.dev, dtype=self.dtype)
            return (*(t.detach().requires_grad_() for t in heads), g)

        self.sets = [one_set() for _ in range(self._n_sets(per_set))]

    def _mixing_impl(self, impl: str, train: bool):
        import vitkernels

        torch = _torch()
        peers = _bench_module("head_mixing")
        s = self.mix_shape
        if impl == "eager_timm" and s.norm:
            return None  # timm has no re-attention: not a row
        module = peers.eager_module_for(s, impl).to(self.dev, self.dtype).train(train)
        q0, k0, v0, _ = self.sets[0]
        fn = peers.implementation_for(impl, module, q0, k0, v0, self.mode)
        if isinstance(fn, str):
            return fn
        params = list(module.parameters())

        def step(i):
            q, k, v, g = self.sets[i % len(self.sets)]
            if train:
                return torch.autograd.grad(fn(q, k, v), [q, k, v, *params], g)
            with torch.no_grad():
                return fn(q, k, v)

        def check():
            q, k, v, _ = self.sets[0]
            kw = {key: tuple(t[...].double() if isinstance(t, torch.Tensor) else t for t in val)
                  for key, val in module.kernel_args().items()}  # fmt: skip
            with torch.no_grad():
                got = fn(q, k, v)[:2]
                want = vitkernels.head_mixing_attention(
                    q[:2].double(), k[:2].double(), v[:2].double(), scale=module.scale, **kw,
                    backend="reference",
                )  # fmt: skip
            return rel_error(got, want)

        return step, check

    # patch_embed ------------------------------------------------------------
    def _patch_setup(self) -> None:
        torch = _torch()
        peers = _bench_module("patch_embed")
        self.module = peers.BUILDERS[self.wid]().to(device=self.dev, dtype=self.dtype)
        per_set = self.B * 3 * 224 * 224 * 2
        self.sets = [torch.randn(self.B, 3, 224, 224, device=self.dev, dtype=self.dtype)
                     for _ in range(self._n_sets(per_set))]  # fmt: skip
        with torch.no_grad():
            out = self.module(self.sets[0][:1])
        self.grad_out = torch.randn(self.B, *out.shape[1:], device=self.dev, dtype=self.dtype)

    def _patch_impl(self, impl: str, train: bool):
        torch = _torch()
        module = self.module.train(train)
        if impl == "eager":
            fn = module
        elif impl == "compiled":
            fn = torch.compile(module, mode=self.mode)
        elif impl in ("torch", "triton", "cuda"):

            def fn(img):
                return module.fused(img, impl)
        else:
            return f"{impl} has no patch_embed peer"
        params = list(module.parameters())

        def step(i):
            img = self.sets[i % len(self.sets)]
            if train:
                return torch.autograd.grad(fn(img), params, self.grad_out)
            with torch.no_grad():
                return fn(img)

        def check():
            with torch.no_grad():
                got = fn(self.sets[0])[:2]
                ref = copy.deepcopy(module).double()
                want = ref(self.sets[0][:2].double())
            return rel_error(got, want)

        return step, check

    def impl(self, impl: str, train: bool):
        from vitkernels import cuda

        if self.wid in MIXING:
            if impl in ("cuda", "flex"):
                return None  # no cuda kernel; FlexAttention's score_mod sees one head
            return self._mixing_impl(impl, train)
        if impl == "cuda" and not cuda.is_built():
            return f"no CUDA extension: {cuda.unavailable_reason()}"
        if impl in ("eager_timm", "flex") and self.wid not in RELPOS:
            return None  # no such peer for this op: not a row at all
        if self.wid in RELPOS:
            return self._relpos_impl(impl, train)
        if self.wid in PERFORMER:
            return self._performer_impl(impl, train)
        return self._patch_impl(impl, train)


def stage_ops(
    st: Stage, workloads: list[str], batch: int, compile_mode: str, budget_s: float
) -> None:
    torch = _torch()
    dev = device(st.dry_run)
    dtype = torch.float32 if st.dry_run else torch.bfloat16
    B = 1 if st.dry_run else batch
    l2 = 60 * 2**20
    if dev == "cuda":
        l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", l2) or l2
    benches: dict[str, OpBench] = {}
    for phase, impls, need in (("cheap", CHEAP_IMPLS, 8.0), ("compiling", COMPILING_IMPLS, 45.0)):
        for wid in workloads:
            for p in PASSES:
                for impl in impls:
                    what = f"{wid} {p} {impl}"
                    if not st.fits(what, need):
                        continue
                    if wid not in benches:
                        benches[wid] = OpBench(wid, B, dev, dtype, compile_mode, l2)
                    _bench_op(st, benches[wid], wid, p, impl, budget_s)
        if phase == "cheap":
            log("ops: kernels and eager peers done")
    log("ops: done")


def _bench_op(st: Stage, bench: OpBench, wid: str, p: str, impl: str, budget_s: float) -> None:
    torch = _torch()
    flops, nbytes = counts(wid, bench.B)[p]
    base = {"workload": wid if p == "fwd" else f"{wid} fwd+bwd", "base_workload": wid, "pass": p,
            "impl": impl, "dtype": dtype_name(bench.dtype), "batch": bench.B, "flops": flops,
            "bytes": nbytes}  # fmt: skip
    if impl == "compiled":
        base["compile_mode"] = bench.mode
    try:
        made = bench.impl(impl, p == "fwd+bwd")
        if made is None:
            return
        if isinstance(made, str):
            st.record("bench", **base, status="skipped", reason=made)
            return
        step, check = made
        if st.dry_run and impl not in ("eager", "eager_timm", "torch"):
            st.record("bench", **base, status="skipped", reason=NEEDS_GPU)
            return
        # that every row computes the same function: a wrong one is off by O(1) (the
        # correctness stage holds the kernels to their dtype's tolerance; eager peers
        # in bfloat16 are ~1e-2 off the float64 reference)
        err, bad = check()
        if bad or err > 0.1:
            st.record("bench", **base, status="FAIL", reason=f"output off the float64 reference: "
                      f"relative error {err:.3g}, {bad} non-finite")  # fmt: skip
            return
        if st.dry_run:
            step(0)  # the timed step runs (gradients too) but nothing is timed
            st.record("bench", **base, status="skipped", reason=NEEDS_GPU, check_err=err)
            return
        t = time_calls(step, bench.dev, budget_s)
        if impl in COMPILING_IMPLS:  # inductor's own graphs and guards: not captured here
            t["graph_error"] = "not captured: a compiling peer"
        else:
            t.update(graph_time(step, len(bench.sets)))
        st.record("bench", **base, status="ok", check_err=err, sets=len(bench.sets), **t)
        log(f"{base['workload']:<12} {impl:<10} {t['time_us']:10.1f} us (host {t['host_us']:.1f}, "
            f"kernels {_fmt(t.get('kernel_us'), '.1f')}, graph {_fmt(t.get('graph_us'), '.1f')})")  # fmt: skip
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        torch._dynamo.reset()
        st.record("bench", **base, status="error", reason=f"{type(exc).__name__}: {str(exc)[:300]}")
        log(f"{base['workload']} {impl}: {type(exc).__name__}: {str(exc)[:200]}")


# ----------------------------------------------------------------------------
# whole models


def model_list(names: list[str]) -> list[tuple[str, str, str, int]]:
    models = _bench_module("models").MODELS  # (name, source, spec, side)
    by_label = {f"{n} [{s}]": (n, s, spec, side) for n, s, spec, side in models}
    missing = [n for n in names if n not in by_label]
    if missing:
        raise SystemExit(
            f"gpu_run.py: unknown models {missing}; expected names from {list(by_label)}"
        )
    return [by_label[n] for n in names]


COMPILED_FROM = {"compiled": "eager", "compiled_optimized": "optimized"}
MODEL_PHASES = ((("eager", "optimized"), 25.0), (("compiled", "compiled_optimized"), 120.0))


def stage_models(
    st: Stage, names: list[str], batch: int, compile_mode: str, budget_s: float
) -> None:
    chosen = model_list(names)
    for impls, need in MODEL_PHASES:
        for name, source, spec, side in chosen:
            label = f"{name} [{source}]"
            if st.dry_run:  # building a model at 224 px costs seconds on a CPU: named only
                for impl in impls:
                    st.record("model", workload=label, impl=impl, model=spec, status="skipped",
                              reason=NEEDS_GPU)  # fmt: skip
            elif st.fits(f"{label} {'/'.join(impls)}", need):
                _bench_model(st, label, spec, side, impls, batch, compile_mode, budget_s, need)
    log("models: done")


def _bench_model(st: Stage, label: str, spec: str, side: int, impls: tuple[str, ...], B: int,
                 compile_mode: str, budget_s: float, need: float) -> None:  # fmt: skip
    torch = _torch()
    import vitkernels
    from vitkernels.compare import build_model, check_agreement

    dtype = torch.bfloat16
    base = {
        "workload": label,
        "dtype": dtype_name(dtype),
        "batch": B,
        "image_size": side,
        "model": spec,
    }
    try:
        torch._dynamo.reset()
        torch.manual_seed(0)
        eager, _ = build_model(spec, image_size=side)
        eager = eager.to(device="cuda", dtype=dtype).eval()
        optimized = copy.deepcopy(eager)
        replaced = vitkernels.optimize(optimized).count()
        x = torch.randn(B, 3, side, side, device="cuda", dtype=dtype)
        agreement = check_agreement(eager, optimized, x[:8])
        if not agreement.ok:
            st.record("model", **base, impl="optimized", status="FAIL",
                      reason=f"optimized disagrees with eager: {agreement.describe()}")  # fmt: skip
            return
        models = {"eager": eager, "optimized": optimized}
        for impl in impls:
            if not st.fits(f"{label} {impl}", need / 2):
                continue
            if impl in COMPILED_FROM:
                models[impl] = torch.compile(models[COMPILED_FROM[impl]], mode=compile_mode)
            row = {**base, "impl": impl, "replaced": replaced if "optimized" in impl else 0}
            if impl in COMPILED_FROM:
                row["compile_mode"] = compile_mode

            def step(i, model=models[impl]):
                with torch.inference_mode():
                    return model(x)

            t = time_calls(step, "cuda", budget_s, min_reps=5, max_reps=50)
            st.record("model", **row, status="ok", images_per_s=B / (t["time_us"] * 1e-6),
                      agreement=agreement.describe(), **t)  # fmt: skip
            log(f"{label:<22} {impl:<18} {B / (t['time_us'] * 1e-6):12,.0f} images/s")
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        st.record("model", **base, impl="/".join(impls), status="error",
                  reason=f"{type(exc).__name__}: {str(exc)[:300]}")  # fmt: skip
        log(f"{label}: {type(exc).__name__}: {str(exc)[:200]}")
    finally:
        torch._dynamo.reset()
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------
# report: WORK/*.jsonl -> OUT/ files and the summary (no torch)


def read_records(work: Path) -> list[dict[str, Any]]:
    records = []
    for f in sorted(work.glob("*.jsonl")):
        for line in f.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short when a stage was killed
                continue
    return records


def newest_estimates(results: Path) -> tuple[Path | None, dict[tuple[str, str, str, str], dict]]:
    """The newest bench/results/estimate-sm90a-<date>.json (``python -m vitkernels
    estimate``), as {(workload, pass, backend, dtype): call}."""
    files = sorted(results.glob("estimate-sm90a-*.json"))
    if not files:
        return None, {}
    try:
        data = json.loads(files[-1].read_text())
    except (OSError, json.JSONDecodeError):
        return files[-1], {}
    table: dict[tuple[str, str, str, str], dict] = {}
    for call in data.get("calls", []) if isinstance(data, dict) else []:
        key = tuple(str(call.get(k, "")) for k in ("workload", "pass", "backend", "dtype"))
        table.setdefault(key, call)  # type: ignore[arg-type]
    return files[-1], table


def estimate_for(table: dict, wid: str, p: str, impl: str, dtype: str) -> float | None:
    short = {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}.get(dtype, dtype)
    for d in (short, dtype):
        call = table.get((wid, p, impl, d))
        if call is not None and isinstance(call.get("estimate_us"), (int, float)):
            return float(call["estimate_us"])
        if p == "fwd+bwd":  # forward and backward estimated apart: their sum
            parts = [table.get((wid, q, impl, d)) for q in ("fwd", "bwd")]
            if all(c is not None and isinstance(c.get("estimate_us"), (int, float)) for c in parts):
                return float(sum(c["estimate_us"] for c in parts))  # type: ignore[index]
    return None


def slug(gpu: str | None) -> str:
    if not gpu:
        return "cpu-dry-run"
    name = re.sub(r"^nvidia\s+", "", gpu.strip().lower())
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "gpu"


# "3 passed, 1 skipped in 2.0s"; a dry run's "252 tests collected in 1.9s" (or
# "252/300 tests collected (48 deselected) in ...", the selected count first)
_COUNT = re.compile(r"(\d+)(?:/\d+)? (?:tests? )?(passed|failed|errors?|skipped|deselected|xfailed|xpassed|collected)\b")


def pytest_outcome(log_path: Path) -> str | None:
    """The gpu tests' outcome summed over the per-file pytest runs in the log (each
    file's block starts with '##### FILE'), naming the files with failures or errors."""
    if not log_path.exists():
        return None
    lines = log_path.read_text(errors="replace").splitlines()
    blocks: list[tuple[str, list[str]]] = [("", [])]
    for line in lines:
        if line.startswith("##### "):
            blocks.append((line[6:].strip(), []))
        else:
            blocks[-1][1].append(line)
    totals: dict[str, int] = {}
    bad, unfinished, cut, seen = [], [], False, set()
    for name, block in blocks:
        summary = next((ln for ln in reversed(block) if _COUNT.search(ln) and " in " in ln), None)
        cut |= any("KeyboardInterrupt" in ln for ln in block[-60:])
        if summary is None:
            if name:  # crashed (a segfault) or killed
                unfinished.append(name)
            continue
        counts = {kind.rstrip("s") if kind.startswith("error") else kind: int(n)
                  for n, kind in _COUNT.findall(summary)}  # fmt: skip
        if " (rerun after a CUDA fault" in name:  # its deselected tests ran in the blocks before
            counts.pop("deselected", None)
            name = name.split(" (rerun")[0]
        seen.add(name)
        for kind, n in counts.items():
            totals[kind] = totals.get(kind, 0) + n
        failing = [f"{counts[k]} {k}" for k in ("failed", "error") if counts.get(k)]
        if failing:
            bad.append(f"{name or 'pytest'} ({', '.join(failing)})")
    if not seen and not unfinished:
        return "no summary line (see pytest-gpu.log)"
    order = ("failed", "error", "passed", "skipped", "deselected", "xfailed", "xpassed", "collected")
    text = ", ".join(f"{totals[k]} {'errors' if k == 'error' and totals[k] != 1 else k}"
                     for k in order if totals.get(k))  # fmt: skip
    if len(blocks) > 1:
        text += f" in {len(seen)} file(s)"
    if bad:
        text += "; failing: " + ", ".join(bad)
    if unfinished:
        text += f"; {len(unfinished)} file(s) without a summary line (crashed or stopped): " + ", ".join(unfinished)
    return text + (" (stopped at the deadline)" if cut else "")


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def report(work: Path, out: Path, estimates_dir: Path) -> int:
    records = read_records(work)
    env = next((r for r in records if r["kind"] == "env"), {})
    ceilings = {r["name"]: r["value"] for r in records if r["kind"] == "ceiling"}
    copy_bw = ceilings.get("copy") or NOMINAL_COPY
    matmul = ceilings.get("matmul_bf16") or NOMINAL_MATMUL
    est_file, est = newest_estimates(estimates_dir)
    head = {k: env.get(k) for k in ("gpu", "torch", "triton", "cuda")}

    rows: list[dict[str, Any]] = []
    for r in records:
        if r["kind"] == "bench" and r.get("status") == "ok":
            floor_s = max(r["bytes"] / copy_bw, r["flops"] / matmul)
            t = r["time_us"] * 1e-6
            rows.append({
                "workload": r["workload"], "impl": r["impl"], "dtype": r["dtype"], "pass": r["pass"],
                "batch": r["batch"], "time_us": r["time_us"], "min_us": r["min_us"],
                "reps": r["reps"], "host_us": r.get("host_us"), "kernel_us": r.get("kernel_us"),
                "kernels": r.get("kernels"), "stream_us": r.get("stream_us"), "graph_us": r.get("graph_us"),
                "graph_error": r.get("graph_error"), "kernel_error": r.get("kernel_error"),
                "tflops": r["flops"] / t / 1e12, "gbps": r["bytes"] / t / 1e9,
                "floor_us": floor_s * 1e6, "fraction_of_floor": floor_s / t,
                "bound": "memory" if r["bytes"] / copy_bw >= r["flops"] / matmul else "math",
                "images_per_s": None, **head,
            })  # fmt: skip
            if r["impl"] == "compiled":
                rows[-1]["compile_mode"] = r.get("compile_mode")
        elif r["kind"] == "model" and r.get("status") == "ok":
            rows.append({
                "workload": r["workload"], "impl": r["impl"], "dtype": r["dtype"], "batch": r["batch"],
                "time_us": r["time_us"], "min_us": r["min_us"], "reps": r["reps"],
                "images_per_s": r["images_per_s"], "tflops": None, "gbps": None,
                "fraction_of_floor": None, "replaced": r.get("replaced"), **head,
            })  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    results_name = f"{slug(env.get('gpu'))}-{dt.datetime.now(dt.timezone.utc):%Y-%m-%d}.json"
    results = {
        "machine_info": {"node": platform.node(), **head, "vitkernels": env},
        "commit_info": {"id": env.get("commit"), "tree": env.get("tree")},
        "datetime": dt.datetime.now(dt.timezone.utc).isoformat(),
        "version": "bench/gpu_run.py",
        "benchmarks": [
            {"name": f"{row['workload']} {row['impl']}", "group": row["workload"],
             "stats": {"median": row["time_us"] * 1e-6}, "extra_info": row}
            for row in rows
        ],
    }  # fmt: skip
    (out / results_name).write_text(json.dumps(results, indent=1, default=str) + "\n")

    checks = [r for r in records if r["kind"] == "check"]
    bad = [r for r in records if r.get("status") in ("FAIL", "error")]
    # a peer that cannot run a workload (FlexAttention's head-dim rules, a compile
    # error) is reported; only this package's own failures fail the check
    peer_errors = [r for r in bad if r["kind"] == "bench" and r["impl"] in OUTSIDE_PEERS]
    # the probe's faults are listed in its own lines of the summary (torch's own
    # orthogonal_ faulting is reported, not counted against this package)
    probe_other = [r for r in bad if r["kind"] == "probe" and "orthogonal_" in str(r.get("variant"))]
    failures = [r for r in bad if r not in peer_errors and r not in probe_other]
    stages = [r for r in records if r["kind"] == "stage"]
    cuts = [r for r in records if r["kind"] == "cut"]
    tests = pytest_outcome(out / "pytest-gpu.log")
    failed = bool(failures) or any(s.get("status") == "failed" for s in stages)
    failed |= bool(tests and re.search(r"\d+ (failed|errors?)\b", tests))
    # a file that crashed (no summary line) fails the run unless the deadline stopped it
    failed |= bool(tests and "(crashed or stopped)" in tests and not tests.endswith("(stopped at the deadline)"))
    (out / "check.json").write_text(json.dumps({
        "records": records, "results_file": results_name, "ceilings_used": {"copy": copy_bw, "matmul_bf16": matmul},
        "estimates_file": str(est_file) if est_file else None, "pytest": tests, "failed": failed,
    }, indent=1, default=str) + "\n")  # fmt: skip

    lines = summary_lines(
        env, records, rows, ceilings, est, est_file, checks, failures, stages, cuts, tests
    )
    others = sorted(
        {p.name for p in out.iterdir() if p.is_file()} - {results_name} | {"summary.txt"}
    )
    lines.append(f"files: {results_name} (copy to bench/results/), {', '.join(others)}")
    lines.append("RESULT: " + ("FAILED (see above)" if failed else "ok"))
    text = "\n".join(lines) + "\n"
    (out / "summary.txt").write_text(text)
    print(text, end="")
    return 1 if failed else 0


def summary_lines(
    env, records, rows, ceilings, est, est_file, checks, failures, stages, cuts, tests
) -> list[str]:
    L = ["", "=" * 30 + " vitkernels gpu_check summary " + "=" * 30]
    gpu = env.get("gpu") or "no GPU (dry run)"
    if env.get("capability"):
        gpu += f" (sm_{env['capability'].replace('.', '')}, {env.get('sms')} SMs)"
    L.append(f"{gpu}; torch {env.get('torch')}, triton {env.get('triton')}, CUDA {env.get('cuda')}; "
             f"python {env.get('python')}; commit {str(env.get('commit'))[:12]} (tree {env.get('tree')}); "
             f"{env.get('date')}")  # fmt: skip
    ext = env.get("cuda_extension")
    L.append(
        f"CUDA extension: {'loaded from ' + ext if ext else 'not loaded: ' + str(env.get('cuda_extension_reason'))}"
    )
    for c in (r for r in records if r["kind"] == "clocks"):
        L.append(f"clocks {c.get('when')}: SM {c.get('clocks.sm')}/{c.get('clocks.max.sm')} MHz, "
                 f"memory {c.get('clocks.mem')} MHz, {c.get('power.draw')} W, {c.get('temperature.gpu')} C, "
                 f"{c.get('pstate')}" if "error" not in c else f"clocks {c.get('when')}: {c['error']}")  # fmt: skip
    if ceilings:
        L.append(f"ceilings measured here: copy {_fmt(ceilings.get('copy', 0) / 1e12, '.2f')} TB/s, "
                 f"bf16 matmul {_fmt(ceilings.get('matmul_bf16', 0) / 1e12, '.0f')} TFLOP/s "
                 f"(WORKLOADS.md: {NOMINAL_COPY / 1e12:.1f}, {NOMINAL_MATMUL / 1e12:.0f}); floors below use these")  # fmt: skip
    if stages:
        L.append("stages: " + " | ".join(
            f"{s['name']} {s['status']} {s.get('seconds', 0)}s" + (f" ({s['note']})" if s.get("note") else "")
            for s in stages))  # fmt: skip
    by = {}
    for c in checks:
        by[c["status"]] = by.get(c["status"], 0) + 1
    if checks:
        L.append("correctness vs float64 (op x backend x dtype x pass): "
                 + ", ".join(f"{n} {k}" for k, n in sorted(by.items())))  # fmt: skip
        na = sorted(
            {f"{c['backend']} {c['dtype']}: {c['reason']}" for c in checks if c["status"] == "n/a"}
        )
        for reason in na[:4]:
            L.append(f"  n/a  {reason[:150]}")
    probes = [r for r in records if r["kind"] == "probe"]
    if probes:
        L.append("illegal-access probe (bench/ima_probe.py, CUDA_LAUNCH_BLOCKING=1, one process per variant):")
        for r in probes:
            if r.get("sanitizer"):
                L.append(f"  {r['variant']}:")
                L += [f"    {ln[:150]}" for ln in r["sanitizer"][:12]]
                continue
            where = ""
            if r.get("status") == "FAIL":
                where = f" after step '{r.get('after_step')}', last launch {r.get('last_launch')}: {r.get('error')}"
            elif r.get("reason"):
                where = f" ({r['reason']})"
            elif r.get("info"):  # the forward's error against float64
                where = f" ({'; '.join(r['info'])})"
            L.append(f"  {r.get('status', '?'):<5} {r['variant']}{where}"[:260])
    failures = [f for f in failures if f["kind"] != "probe"]
    for f in failures[:12]:
        what = " ".join(str(f.get(k)) for k in ("op", "case", "workload", "backend", "impl", "dtype", "pass")
                        if f.get(k) is not None)  # fmt: skip
        detail = (
            f.get("reason")
            or f"rel err {f.get('rel_err', 0):.2e} > tol {f.get('tol')}, {f.get('nonfinite')} non-finite"
        )
        L.append(f"  {f['status']:<5} {what}: {str(detail)[:160]}")
    if len(failures) > 12:
        L.append(f"  ... {len(failures) - 12} more failures in check.json")
    op_rows = [r for r in rows if r.get("images_per_s") is None]
    if op_rows:
        src = (
            f"estimate = compiler-based ({est_file.name}), not a measurement"
            if est_file
            else "no estimate file in bench/results/ (python -m vitkernels estimate writes one)"
        )
        L += ["", f"ops, measured, {op_rows[0]['dtype']}, batch {op_rows[0]['batch']}; {src}.",
              "  event us: median of calls each timed by a CUDA event pair (the host's time where it is "
              "slower); host us: the host's time to issue one call;",
              "  kernel us: the device time of the call's kernels (torch.profiler, summed), what the "
              "estimate models; graph us: the calls replayed from one CUDA graph (no host cost):"]  # fmt: skip
        L.append(f"{'workload':<13}{'impl':<11}{'event us':>10}{'host us':>9}{'kernel us':>10}"
                 f"{'estimate us':>12}{'graph us':>9}{'floor us':>9}{'of floor':>9}{'vs eager':>9}"
                 f"{'vs peer':>8}")  # fmt: skip
        peers = PEERS
        for wl in dict.fromkeys(r["workload"] for r in op_rows):
            group = [r for r in op_rows if r["workload"] == wl]
            eager = min(
                (r["time_us"] for r in group if r["impl"].startswith("eager")), default=None
            )
            best_peer = min((r["time_us"] for r in group if r["impl"] in peers), default=None)
            for r in group:
                e = estimate_for(est, wl.split()[0], r["pass"], r["impl"], r["dtype"])
                vs_peer = (
                    None if r["impl"] in peers or best_peer is None else best_peer / r["time_us"]
                )
                host_bound = (r.get("host_us") or 0) >= 0.9 * r["time_us"]
                L.append(f"{wl:<13}{r['impl']:<11}{r['time_us']:9.1f}{'*' if host_bound else ' '}"
                         f"{_fmt(r.get('host_us'), '9.1f'):>9}{_fmt(r.get('kernel_us'), '10.1f'):>10}"
                         f"{_fmt(e, '12.1f'):>12}{_fmt(r.get('graph_us'), '9.1f'):>9}{r['floor_us']:9.1f}"
                         f"{r['fraction_of_floor']:9.0%}"
                         f"{_fmt(eager and eager / r['time_us'], '8.2f', 'x'):>9}{_fmt(vs_peer, '7.2f', 'x'):>8}")  # fmt: skip
        if any((r.get("host_us") or 0) >= 0.9 * r["time_us"] for r in op_rows):
            L.append(
                "* the host issued the calls no faster than the GPU ran them: launch-bound at this size"
            )
        for what in ("kernel_error", "graph_error"):
            reasons = sorted({f"{r['impl']}: {r[what]}"[:120] for r in op_rows if r.get(what)})
            if reasons:
                L.append(f"{what.split('_')[0]} us '-': " + "; ".join(reasons[:4]))
    model_rows = [r for r in rows if r.get("images_per_s") is not None]
    if model_rows:
        L += [
            "",
            f"models, measured, images/s ({model_rows[0]['dtype']}, batch {model_rows[0]['batch']}, inference):",
        ]
        for wl in dict.fromkeys(r["workload"] for r in model_rows):
            group = {r["impl"]: r["images_per_s"] for r in model_rows if r["workload"] == wl}
            eager = group.get("eager")
            cells = [f"{impl} {v:,.0f}" + (f" ({v / eager:.2f}x)" if eager and impl != "eager" else "")
                     for impl, v in group.items()]  # fmt: skip
            L.append(f"  {wl:<22} " + ", ".join(cells))
    skipped = [
        r for r in records if r.get("status") == "skipped" and r["kind"] in ("bench", "model")
    ]
    if skipped:
        reasons = sorted({str(r.get("reason"))[:100] for r in skipped})
        L.append(f"skipped: {len(skipped)} benchmark rows ({'; '.join(reasons[:3])})")
    if tests:
        L.append(f"gpu tests: {tests}")
    if cuts:
        L.append(f"cut at the deadline ({len(cuts)}): " + "; ".join(c["what"] for c in cuts[:8])
                 + (" ..." if len(cuts) > 8 else ""))  # fmt: skip
    return L


# ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("stage", choices=STAGES)
    ap.add_argument("--work", type=Path, required=True, help="folder of the stages' records")
    ap.add_argument("--out", type=Path, help="report: where the files go")
    ap.add_argument("--deadline", type=float, default=time.time() + 540, help="epoch seconds")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, nothing timed")
    ap.add_argument("--backends", default="torch,triton,cuda", help="correctness: backends")
    ap.add_argument("--workloads", default=",".join(DEFAULT_OPS), help="ops: workload ids")
    ap.add_argument("--models", default=";".join(DEFAULT_MODELS), help="models: ';'-separated")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument(
        "--compile-mode", default="default", help="torch.compile mode of the compiled peers"
    )
    ap.add_argument("--budget", type=float, default=0.25, help="seconds of timed calls per row")
    ap.add_argument(
        "--estimates", type=Path, default=HERE / "results", help="report: estimate files"
    )
    ap.add_argument("--tag", default="", help="suffix of the records file (two runs of one stage)")
    args = ap.parse_args(argv)
    if args.stage == "report":
        return report(args.work, args.out or args.work, args.estimates)
    st = Stage(
        args.stage + (f"-{args.tag}" if args.tag else ""), args.work, args.deadline, args.dry_run
    )
    if not args.dry_run and not _torch().cuda.is_available():
        st.record(
            "cut", what=args.stage, reason="no CUDA GPU visible to torch (use --dry-run on CPU)"
        )
        log("no CUDA GPU visible to torch: nothing measured (use --dry-run on CPU)")
        return 2
    try:
        if args.stage == "env":
            stage_env(st)
        elif args.stage == "correctness":
            stage_correctness(st, args.backends.split(","))
        elif args.stage == "ops":
            stage_ops(st, args.workloads.split(","), args.batch, args.compile_mode, args.budget)
        else:
            stage_models(st, args.models.split(";"), args.batch, args.compile_mode, 1.0)
    except KeyboardInterrupt:
        st.record("cut", what=st.current or args.stage, reason="stopped at the deadline (SIGINT)")
        log(f"{args.stage}: stopped at the deadline during {st.current}")
        return 124
    return 0


if __name__ == "__main__":
    sys.exit(main())
