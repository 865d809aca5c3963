"""Where does the performer's illegal memory access come from? A GPU probe.

    python bench/ima_probe.py --work DIR [--deadline EPOCH] [--dry-run]

The first GPU run (bench/results/gpu-check-2026-11-29/) hit "an illegal memory access"
in tests/test_performer_gpu.py at the triton float16 case B1 T4096 E33 M17. The error
surfaced when the forward's second kernel (performer_fwd_q) was loaded, so the fault
was in something launched before it: the first kernel (performer_fwd_kv) is the
suspect, ``torch.nn.init.orthogonal_`` on the GPU (a QR of a 33 x 17 matrix, the
test's feature matrix) the other one. Nothing found it on CPU: the interpreter saw no
out-of-bounds access, and every global load in the compiled kernels is predicated.

Each variant runs in its own process (a fault poisons the process's CUDA context) under
CUDA_LAUNCH_BLOCKING=1, synchronising after every step and every Triton launch, so the
step that faults is named. The variants change one thing at a time from the failing
case (dtype, the feature matrix's dtype, strided views or contiguous inputs, software
pipelining, chunking, the shape) so that the record says what the fault depends on.
The first variant that faults is then run once more under compute-sanitizer (memcheck,
PyTorch's caching allocator off) where the toolkit has it, for the faulting address.

The third run (bench/results/gpu-check-2026-12-04-run2/) added relpos variants (kind
"relpos": the gradient test that faulted in tests/test_relpos_gpu.py, A2 in 16-bit) and
each performer variant's statistics against float64 (which of the two forward kernels
is wrong); the triton backend's refusal of the relpos backward there is lifted in the
child too (vitkernels.ops.relpos.REFUSE_FAULTING_BACKWARD_ON_GPU).

The second run (bench/results/gpu-check-2026-12-04/) saw no fault, but a WRONG forward
at that case (relative error 0.905 against float64, w float32 or float16, views or
copies alike; the interpreter gives 2.4e-4 on the same inputs), and the deadline cut
every other variant. So each performer variant now also checks its forward against
float64 (status "wrong" past the dtype's tolerance), the triton backend's refusal of
an odd E on a GPU is lifted in the child (vitkernels.ops.performer.REFUSE_WRONG_E_ON_GPU),
and the variants that tell the cause apart come first: E even / odd, M, dtype, one
tile, the cuda backend; most run the forward only, to fit more in the stage.

Records: WORK/probe.jsonl (kind "probe"; bench/gpu_run.py report puts them in the
summary and check.json). --dry-run runs the variants' setup on CPU and records them as
skipped. Only a GPU can answer this; nothing here is a measurement of speed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    kind: str = "performer"  # "performer", "relpos" or "orthogonal"
    backend: str = "triton"
    dtype: str = "f16"
    w_dtype: str = "f32"
    layout: str = "test"  # "test": contiguous copies, as the test's clone() makes; "views":
    # the strided views of one (B, T, 3E) projection; "pad16": rows of a buffer whose
    # row stride is E rounded up to 16 elements; "offset1": contiguous, each one element
    # into its buffer (data pointers off 16 bytes)
    shape: tuple[int, ...] = (1, 4096, 33, 17)  # B, T, E, M (relpos: B, H, R, C, S, Dk, Dv)
    stages: int | None = None  # override the launch config's num_stages
    target_programs: int | None = None  # override the chunking heuristic
    trans_loads: bool = True  # False: the performer's tl.trans form (vitkernels.triton.performer._TRANS_LOADS)
    dq_warps: int | None = None  # relpos: the dQ kernel's warps (a candidate fix of its fault)
    backward: bool = True


FAILING = (1, 4096, 33, 17)
F = False  # forward only
RELPOS_A2 = (8, 6, 7, 7, 1, 32, 64)  # tests/test_relpos_gpu.py's "A2"
VARIANTS = [
    # The third run (2026-12-04) located both: the relpos fault in relpos_dq (A2, 16-bit;
    # Dk 16 right), the performer's wrong forward in performer_fwd_kv at E 33/34/40 (16-bit;
    # E 20/32/48 right), where a wgmma's A operand was the transposed view of a tile
    # stored from registers. The performer kernels now load such operands transposed from
    # memory (TRANS_LOAD); the relpos backward is refused there. Next: does TRANS_LOAD
    # fix it (each case beside its old tl.trans form), do rows off 16 bytes at E 64 (the
    # same pattern before the change, never run on a GPU) agree, and which dQ warps
    # avoid the relpos fault.
    Variant("triton f16 w f32 B1T4096E33M17 (the failing test case)"),
    Variant("triton f16 w f32 B1T4096E33M17, tl.trans form", trans_loads=False, backward=F),
    Variant("triton bf16 w f32 B2T1000E40M17", dtype="bf16", shape=(2, 1000, 40, 17)),
    Variant("triton f16 w f32 B2T1000E40M17, tl.trans form", shape=(2, 1000, 40, 17), trans_loads=False, backward=F),
    Variant("triton f16 w f32 B2T3136E64M32 rows off 16 bytes", shape=(2, 3136, 64, 32), layout="offset1"),
    Variant("triton f16 w f32 B2T3136E64M32 rows off 16 bytes, tl.trans form", shape=(2, 3136, 64, 32),
            layout="offset1", trans_loads=False, backward=F),
    Variant("relpos triton f16 A2 B8H6 7x7 (the failing test case)", kind="relpos", shape=RELPOS_A2),
    Variant("relpos triton f16 A2, dQ on 4 warps", kind="relpos", shape=RELPOS_A2, dq_warps=4),
    Variant("relpos triton f16 A2, dQ on 16 warps", kind="relpos", shape=RELPOS_A2, dq_warps=16),
    Variant("relpos triton bf16 7x7 Dk64 Dv64", kind="relpos", dtype="bf16", shape=(4, 4, 7, 7, 1, 64, 64)),
    Variant("relpos triton f16 8x8 Dk32 Dv128", kind="relpos", shape=(4, 4, 8, 8, 1, 32, 128)),
    Variant("triton f16 w f32 B1T4096E34M17 (E even)", shape=(1, 4096, 34, 17), backward=F),
    Variant("triton f16 w f32 B1T4096E33M16 (M even: faulted)", shape=(1, 4096, 33, 16), backward=F),
    Variant("triton f16 w f32 B1T4096E48M17 (E 48: 64-wide tiles, rows 16-aligned)", shape=(1, 4096, 48, 17),
            backward=F),
    Variant("triton f16 w f32 B1T4096E20M17 (E 20: 32-wide tiles)", shape=(1, 4096, 20, 17), backward=F),
    Variant("relpos triton f16 7x7 Dk16 (shrink 7to4 unstrided)", kind="relpos", shape=(4, 12, 7, 7, 1, 16, 64)),
    Variant("cuda f16 w f32 B1T4096E33M17", backend="cuda"),
    Variant("triton f16 w f32 B1T4096E33M17, rows padded to 48", layout="pad16", backward=F),
    Variant("triton f32 B1T4096E33M17", dtype="f32", backward=F),
    Variant("orthogonal_ on cuda, 17x33 (the test's feature matrix)", kind="orthogonal"),
]
# a forward past this relative error against float64 is wrong (the interpreter: f16
# 2.4e-4, f32 3.5e-7 at the failing case)
WRONG_ABOVE = {"f16": 1e-2, "bf16": 5e-2, "f32": 1e-3}
DTYPES = {"f16": "float16", "bf16": "bfloat16", "f32": "float32"}


def log(msg: str) -> None:
    print(f"[ima_probe {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------
# child: one variant, step by step


def run_variant(v: Variant, device: str) -> None:
    """Print 'STEP <name> ok' after each step (synchronised); raises at the faulting one."""
    import torch

    def step(name: str) -> None:
        if device == "cuda":
            torch.cuda.synchronize()
        print(f"STEP {name} ok", flush=True)

    if v.kind == "relpos":
        with _traced_launches(v, step):
            _run_relpos(v, device, step)
        return
    B, T, E, M = v.shape
    if v.kind == "orthogonal":
        for _ in range(3):
            w = torch.nn.init.orthogonal_(torch.empty(M, E, device=device))
        step("orthogonal_")
        err = (w @ w.T - torch.eye(M, device=device)).abs().max().item()
        print(f"INFO orthogonality error {err:.2e}", flush=True)
        return
    with _traced_launches(v, step):
        _run_performer(v, device, step)


@contextlib.contextmanager
def _traced_launches(v: Variant, step):
    """The Triton launchers synchronised and named at every launch, with the variant's
    launch-config overrides; restored on exit."""
    if v.backend != "triton":
        yield
        return
    if v.kind == "relpos":
        import vitkernels.triton.relpos as tr

        inner_r, dq_cfg = tr.launch, tr._dq_cfg

        def dq_cfg_warps(*args, **kwargs):
            cfg = dq_cfg(*args, **kwargs)
            return cfg if v.dq_warps is None else dataclasses.replace(cfg, num_warps=v.dq_warps)

        def traced_r(spec):
            print(
                f"LAUNCH {spec.name} grid={spec.grid} warps={spec.num_warps} {spec.constexprs}",
                flush=True,
            )
            inner_r(spec)
            step(f"launch {spec.name}")

        tr.launch, tr._dq_cfg = traced_r, dq_cfg_warps
        try:
            yield
        finally:
            tr.launch, tr._dq_cfg = inner_r, dq_cfg
        return
    import vitkernels.triton.performer as tp

    saved = tp.launch, tp.launch_config, tp.TARGET_PROGRAMS, tp._TRANS_LOADS
    inner, config = tp.launch, tp.launch_config

    def traced(spec):
        print(f"LAUNCH {spec.name} grid={spec.grid} trans_load={spec.constexprs.get('TRANS_LOAD')}", flush=True)
        inner(spec)
        step(f"launch {spec.name}")

    def patched(*args, **kwargs):
        cfg = config(*args, **kwargs)
        return cfg if v.stages is None else dataclasses.replace(cfg, num_stages=v.stages)

    tp.launch, tp.launch_config = traced, patched
    tp._TRANS_LOADS = v.trans_loads
    if v.target_programs is not None:
        tp.TARGET_PROGRAMS = v.target_programs
    try:
        yield
    finally:
        tp.launch, tp.launch_config, tp.TARGET_PROGRAMS, tp._TRANS_LOADS = saved


def _run_performer(v: Variant, device: str, step) -> None:
    import torch

    import vitkernels
    from vitkernels.backends import reference

    B, T, E, M = v.shape
    dtype = getattr(torch, DTYPES[v.dtype])
    gen = torch.Generator().manual_seed(0)
    # inputs made on the CPU (no cuSOLVER, no device RNG), then copied
    kqv = torch.randn(B, T, 3 * E, generator=gen) * 2.0 / math.sqrt(E)
    w = torch.nn.init.orthogonal_(torch.empty(M, E), generator=gen) * math.sqrt(M)
    kqv = kqv.to(device=device, dtype=dtype)
    w = w.to(device=device, dtype=getattr(torch, DTYPES[v.w_dtype]))
    k, q, v_ = kqv.split(E, dim=-1)
    if v.layout == "offset1":  # contiguous, one element into each buffer
        leaves = []
        for t in (q, k, v_):
            buf = torch.empty(B * T * E + 1, device=device, dtype=dtype)
            view = buf[1:].view(B, T, E)
            view.copy_(t)
            leaves.append(view.detach().requires_grad_())
    elif v.layout == "pad16":  # each a (B, T, E) view of a buffer with 16-aligned rows
        width = -(-E // 16) * 16
        leaves = []
        for t in (q, k, v_):
            buf = torch.zeros(B, T, width, device=device, dtype=dtype)
            buf[..., :E] = t
            leaves.append(buf[..., :E].detach().requires_grad_())
    elif v.layout == "views":  # strided views of the projection (row stride 3E)
        leaves = [t.detach().requires_grad_() for t in (q, k, v_)]
    else:  # as the test: clone() of a split view is a contiguous copy (row stride E)
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v_)]
    wl = w.detach().requires_grad_()
    step("inputs")
    y = vitkernels.performer_attention(*leaves, wl, backend=v.backend)
    step("forward")
    ref = reference.performer_attention(*(t.detach().double() for t in leaves), w.double())
    err = ((y.double() - ref).norm() / ref.norm()).item()
    finite = bool(torch.isfinite(y).all())
    print(f"INFO forward rel err {err:.2e}, finite {finite}", flush=True)
    if not finite or not err <= WRONG_ABOVE[v.dtype]:
        print(f"WRONG forward rel err {err:.2e} > {WRONG_ABOVE[v.dtype]:.0e}", flush=True)
    if (
        v.backend == "triton"
    ):  # which kernel: the key statistics (fwd_kv, merged) or y from them (fwd_q)
        _performer_stats(leaves, w, step)
    if v.backward:
        y.float().square().sum().backward()
        step("backward")


def _performer_stats(leaves, w, step) -> None:
    """The triton forward's saved statistics (lks = logsumexp_t a(k), vbar = the
    softmax-over-tokens average of v) against float64, and y recomputed in float64
    from the kernel's own statistics: separates performer_fwd_kv from performer_fwd_q."""
    import torch

    from vitkernels.triton import performer as tp

    q, k, v = (t.detach() for t in leaves)
    y, lks, vbar = tp.performer_attention_fwd(q, k, v, w.detach(), 1e-8)
    step("triton forward, statistics")
    wd = w.detach().double()

    def logits(x):
        x = x.double()
        return torch.einsum("bte,me->btm", x, wd) - (x * x).sum(-1, keepdim=True) / 2

    ak = logits(k)
    lks_ref = torch.logsumexp(ak, dim=1)  # (B, M)
    vbar_ref = torch.einsum("btm,bte->bme", torch.exp(ak - lks_ref[:, None, :]), v.double())
    aq = logits(q) + lks.double()[:, None, :]  # y from the kernel's statistics
    pq = torch.softmax(aq, dim=-1)
    y_from = torch.einsum("btm,bme->bte", pq, vbar.double())

    def rel(a, b):
        return ((a.double() - b).norm() / b.norm()).item()

    print(f"INFO lks rel err {rel(lks, lks_ref):.2e}; vbar rel err {rel(vbar, vbar_ref):.2e}; "
          f"y vs float64 from the kernel's own lks/vbar {rel(y, y_from):.2e}", flush=True)  # fmt: skip


def _run_relpos(v: Variant, device: str, step) -> None:
    import torch

    import vitkernels
    from vitkernels.backends import reference

    B, H, R, C, S, Dk, Dv = v.shape
    dtype = getattr(torch, DTYPES[v.dtype])
    Nq, Nk = -(-R // S) * -(-C // S), R * C
    gen = torch.Generator().manual_seed(0)
    q, k, vv = (torch.randn(B, H, n, d, generator=gen) for n, d in ((Nq, Dk), (Nk, Dk), (Nk, Dv)))
    table = torch.randn(H, Nk, generator=gen)
    leaves = [t.to(device=device, dtype=dtype).requires_grad_() for t in (q, k, vv)]
    leaves.append(table.to(device).requires_grad_())  # float32, as the test
    kw = dict(fmap_size=(R, C), q_stride=S, bias_scale=0.8)
    step("inputs")
    out = vitkernels.relpos_attention(*leaves, **kw, backend=v.backend)
    step("forward")
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref = reference.relpos_attention(*ref_leaves, scale=Dk**-0.5, **kw)
    err = ((out.double() - ref).norm() / ref.norm()).item()
    print(f"INFO forward rel err {err:.2e}", flush=True)
    bad = not err <= WRONG_ABOVE[v.dtype]
    g = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad(out, leaves, g.to(device=device, dtype=dtype))
    step("backward")
    ref.backward(g.to(device))
    for name, a, b in zip(("dq", "dk", "dv", "dtable"), grads, ref_leaves, strict=True):
        e = ((a.double() - b.grad).norm() / b.grad.norm()).item()
        print(f"INFO {name} rel err {e:.2e}", flush=True)
        bad = bad or not e <= 3 * WRONG_ABOVE[v.dtype]
    if bad:
        print("WRONG a result past the tolerance (INFO lines)", flush=True)


def child(name: str) -> int:
    v = next((x for x in VARIANTS if x.name == name), None)
    if v is None:
        print(f"no variant named {name!r}", file=sys.stderr)
        return 2
    from vitkernels.ops import performer as performer_ops
    from vitkernels.ops import relpos as relpos_ops

    # this process runs the kernels where they were wrong or faulted
    performer_ops.REFUSE_WRONG_E_ON_GPU = False
    relpos_ops.REFUSE_FAULTING_BACKWARD_ON_GPU = False
    run_variant(v, "cuda")
    print("DONE", flush=True)
    return 0


# ----------------------------------------------------------------------------
# parent: every variant in its own process


def sanitizer() -> str | None:
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root and Path(root, "bin", "compute-sanitizer").exists():
            return str(Path(root, "bin", "compute-sanitizer"))
    return None


def outcome(text: str, rc: int | None) -> dict[str, object]:
    lines = text.splitlines()
    steps = [ln[5:-3] for ln in lines if ln.startswith("STEP ") and ln.endswith(" ok")]
    launches = [ln[7:] for ln in lines if ln.startswith("LAUNCH ")]
    info = [ln[5:] for ln in lines if ln.startswith("INFO ")]
    errors = [ln.strip() for ln in lines if "Error" in ln or "error:" in ln or "illegal" in ln]
    done = any(ln == "DONE" for ln in lines)
    status = "ok" if done and rc == 0 else ("cut" if rc is None else "FAIL")
    if status == "ok" and any(ln.startswith("WRONG ") for ln in lines):
        status = "wrong"
    rec: dict[str, object] = {"status": status, "steps_ok": steps, "info": info, "rc": rc}
    if status not in ("ok", "wrong"):
        rec["last_launch"] = launches[-1] if launches else None
        rec["after_step"] = steps[-1] if steps else None
        rec["error"] = errors[-1][:300] if errors else (lines[-1][:300] if lines else "no output")
    return rec


def parent(work: Path, deadline: float, dry_run: bool) -> int:
    work.mkdir(parents=True, exist_ok=True)
    path = work / "probe.jsonl"

    def record(**fields: object) -> None:
        with path.open("a") as f:
            f.write(json.dumps({"kind": "probe", "stage": "probe", **fields}, default=str) + "\n")

    if dry_run:
        import torch  # noqa: F401  (the variants' CPU setup, so that a typo shows here)

        for v in VARIANTS:
            record(variant=v.name, status="skipped", reason="needs a GPU (dry run)")
        log(f"{len(VARIANTS)} variants recorded as skipped (dry run)")
        return 0
    env = dict(os.environ, CUDA_LAUNCH_BLOCKING="1", PYTHONUNBUFFERED="1")
    first_fault: Variant | None = None
    for v in VARIANTS:
        left = deadline - time.time()
        if left < 20:
            record(variant=v.name, status="cut", reason=f"deadline: {left:.0f} s left")
            continue
        t0 = time.time()
        try:
            p = subprocess.run([sys.executable, __file__, "--child", v.name], env=env,
                               capture_output=True, text=True, timeout=min(90, left - 5))  # fmt: skip
            text, rc = p.stdout + p.stderr, p.returncode
        except subprocess.TimeoutExpired as e:
            text, rc = f"{e.stdout or ''}{e.stderr or ''}", None
        rec = outcome(text if isinstance(text, str) else text.decode(errors="replace"), rc)
        if rc is not None and rc != 0 and "no CUDA" in str(rec.get("error")):
            rec["status"] = "error"
        record(variant=v.name, seconds=round(time.time() - t0, 1), **rec)
        log(f"{v.name}: {rec['status']}" + (f" after {rec.get('after_step')}, last launch "
            f"{rec.get('last_launch')}: {rec.get('error')}" if rec["status"] != "ok" else ""))  # fmt: skip
        if rec["status"] == "FAIL" and first_fault is None and v.kind != "orthogonal":
            first_fault = v
    tool = sanitizer()
    if first_fault is None:
        return 0
    left = deadline - time.time()
    if tool is None or left < 60:
        record(variant=first_fault.name + " [compute-sanitizer]", status="skipped",
               reason="compute-sanitizer not found" if tool is None else f"deadline: {left:.0f} s left")  # fmt: skip
        return 0
    env["PYTORCH_NO_CUDA_MEMORY_CACHING"] = "1"
    cmd = [
        tool,
        "--tool",
        "memcheck",
        "--print-limit",
        "8",
        sys.executable,
        __file__,
        "--child",
        first_fault.name,
    ]
    try:
        p = subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=min(240, left - 10)
        )
        text = p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        text = f"{e.stdout or ''}{e.stderr or ''}" + "\n(timed out)"
    if not isinstance(text, str):
        text = text.decode(errors="replace")
    report = [ln for ln in text.splitlines() if ln.startswith("=========")][:40]
    record(variant=first_fault.name + " [compute-sanitizer]", status="info", sanitizer=report)
    log("compute-sanitizer:\n" + "\n".join(report))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, help="folder of the records (probe.jsonl)")
    ap.add_argument("--deadline", type=float, default=time.time() + 300, help="epoch seconds")
    ap.add_argument("--dry-run", action="store_true", help="CPU: record the plan, run nothing")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args.child)
    if args.work is None:
        ap.error("--work DIR is required")
    return parent(args.work, args.deadline, args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
