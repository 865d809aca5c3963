"""Ahead-of-time compilation of the Triton kernels exactly as the launchers launch
them, for a GPU this machine does not have.

The launches come from the launchers themselves: each kernel module's
``record_calls`` calls its launchers for one workload shape on meta tensors
inside ``_common.recording()``, which records every launch with Triton's own
specialisation (pointer alignment, integers divisible by 16, integers equal to
1: see ``_common``). ``recorded_launches()`` does that for every workload of
``vitkernels.workloads`` (and the other layer shapes the models launch), both
directions (and patch_embed's saving forward and recomputing backward), the
dtypes the kernels serve, and keeps one launch per distinct
specialisation; ``compile_launch`` compiles one with ``triton.compile`` for
``sm_<arch>`` (sm_90 becomes sm_90a) with the options Triton's JIT would pass,
and ``resources`` reads what ptxas made of it from the cubin.

Variants: "aligned" records the launches on tensors torch allocated (16-byte
aligned); "unaligned" makes every input a view one element into its buffer, as a
caller's slice can be (the launchers' own outputs stay aligned); "float32" records
the float32 launches of patch_embed, relpos and head mixing at 1-4 heads (tiles of
their own; aligned), which CI's compile matrix checks beside the suite's "aligned".

    python -m vitkernels.triton._aot --arch 90 [--variant unaligned|float32] [--json FILE]

compiles every launch (``--suite``: the test suite's share, ``suite_launches``; run it with TRITON_INTERPRET unset: the interpreter
replaces @triton.jit functions with Python ones that cannot be compiled).
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import tempfile
from typing import Any

import torch

from vitkernels.triton._common import Launch, Recording, TensorFactory, recording
from vitkernels.workloads import (
    BATCH,
    EXTRA_SHAPES,
    WORKLOADS,
    HeadMixingShape,
    PatchEmbedShape,
    PerformerShape,
    RelposShape,
    Shape,
)

VARIANTS = ("aligned", "unaligned", "float32")


def tensor_factory(variant: str) -> TensorFactory:
    """Meta tensors as torch allocates them, or views one element into a buffer."""
    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r}; expected one of {VARIANTS}")

    def make(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if variant != "unaligned":
            return torch.empty(shape, device="meta", dtype=dtype)
        n = 1
        for s in shape:
            n *= s
        return torch.empty(n + 1, device="meta", dtype=dtype)[1:].view(shape)

    return make


def compile_env(triton_dir: str | None = None, cache: str | None = None) -> dict[str, str]:
    """This process's environment for a child that compiles for a GPU: without the
    interpreter, and with Triton's default floating-point fusion (the tests turn it
    off for the interpreter's sake; a user's launch has it on); ``triton_dir`` (another
    Triton, installed with ``pip --target``) first on PYTHONPATH; its own cache."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TRITON_DEFAULT_FP_FUSION")}
    if triton_dir:
        env["PYTHONPATH"] = os.pathsep.join([triton_dir, env.get("PYTHONPATH", "")])
    if cache:
        env["TRITON_CACHE_DIR"] = cache
    return env


def record_workload(
    shape: Shape, direction: str, dtype: torch.dtype = torch.bfloat16, *, batch: int = BATCH,
    variant: str = "aligned", arch: int = 90, **options: Any,
) -> Recording:
    """The launches (and torch operations) of one call of the op for this shape."""
    from vitkernels.triton import head_mixing, patch_embed, performer, relpos

    module = {RelposShape: relpos, PerformerShape: performer, PatchEmbedShape: patch_embed,
              HeadMixingShape: head_mixing}[type(shape)]  # fmt: skip
    with recording(arch) as rec:
        module.record_calls(shape, batch, dtype, direction, tensor_factory(variant), **options)
    return rec


def head_mixing_refusal(shape: HeadMixingShape) -> str | None:
    """Why the head-mixing kernels do not take this shape (None: they do)."""
    from vitkernels.triton.head_mixing import refusal

    return refusal(shape)


# float32 head-mixing shapes left out of the "float32" variant, and why (the kernels
# run them; their launches spill: bench/NOTES.md, 2026-12-03)
FLOAT32_HEAD_MIXING_LEFT: dict[str, str] = {}


def _float32_head_mixing(case: str, shape: HeadMixingShape) -> bool:
    """Whether the "float32" variant compiles this head-mixing shape: the register
    kernels' (at most 4 heads; 5-16 heads take float16 / bfloat16 only, float32 the
    torch backend) but those listed in FLOAT32_HEAD_MIXING_LEFT."""
    from vitkernels.ops.head_mixing import MAX_HEADS

    return shape.heads <= MAX_HEADS and head_mixing_refusal(shape) is None and case not in FLOAT32_HEAD_MIXING_LEFT


def _configurations(variant: str = "aligned") -> list[tuple[str, Shape, torch.dtype, dict]]:
    """(case, shape, dtype, options) for every configuration compiled ahead of time
    (head-mixing shapes outside the kernels' envelope are not, nor misaligned
    head-mixing inputs: the kernels refuse rows that are not 16-byte aligned, and the
    torch backend runs them)."""
    f16, bf16, f32 = torch.float16, torch.bfloat16, torch.float32
    shapes = {**{w.id: w.shape for w in WORKLOADS.values()}, **EXTRA_SHAPES}
    out = []
    for case, shape in shapes.items():
        if variant == "float32":
            # float32 models (FMA dots in patch_embed, tf32x3 or ieee in relpos: tiles of
            # their own), as torch allocates their tensors; relpos at the workloads and
            # LeViT's other layers (EXTRA_SHAPES) but the 448-px layer (its dQ still spills
            # 20 B with triton 3.6, sm_90a: bench/NOTES.md, 2026-12-01); performer's
            # float32 is in "aligned"
            if isinstance(shape, PatchEmbedShape) or (isinstance(shape, RelposShape) and case != "L256-448px"):
                out.append((case, shape, f32, {}))
            elif isinstance(shape, HeadMixingShape) and _float32_head_mixing(case, shape):
                out.append((case, shape, f32, {"param_dtype": f32}))
            continue
        if isinstance(shape, PerformerShape):
            # 16-bit inputs with the model's float32 w (split into hi + lo) or w cast to
            # the input dtype; float32 throughout; a trainable w
            for dt, wdt in ((f16, f32), (f16, f16), (bf16, f32), (bf16, bf16), (f32, f32)):
                out.append((case, shape, dt, {"w_dtype": wdt}))
            for dt in (bf16, f32):
                out.append((case, shape, dt, {"w_dtype": f32, "w_grad": True}))
        elif isinstance(shape, HeadMixingShape):
            if variant != "aligned" or head_mixing_refusal(shape) is not None:  # the torch backend runs it
                continue
            # bfloat16 throughout; float16 with autocast's float32 mixing and norm
            # parameters (the models' own layout; float16 and bfloat16 compile alike)
            out.append((case, shape, bf16, {"param_dtype": bf16}))
            if shape.layout == "vit-pytorch":
                out.append((case, shape, f16, {"param_dtype": f32}))
        else:
            out += [(case, shape, f16, {}), (case, shape, bf16, {})]
        if isinstance(shape, PatchEmbedShape) and shape.layout == "nchw":  # the kernel then reads "pqc"
            out.append((case + "/channels_last", dataclasses.replace(shape, layout="channels_last"), bf16, {}))
    return out


@dataclasses.dataclass
class RecordedLaunch:
    """One distinct specialisation, with the configurations that launch it."""

    name: str  # unique
    launch: Launch
    cases: list[str]


def recorded_launches(variant: str = "aligned", arch: int = 90) -> list[RecordedLaunch]:
    """Every distinct launch of every configuration (both directions)."""
    by_key: dict[str, RecordedLaunch] = {}
    names: set[str] = set()
    for case, shape, dtype, options in _configurations(variant):
        # patch_embed's forward that saves for the backward, and the backward that
        # recomputes after a forward that saved nothing (a caller passing none)
        extra = ("fwd_saving", "bwd_recompute") if isinstance(shape, PatchEmbedShape) else ()
        both = ("fwd", "bwd")
        if isinstance(shape, HeadMixingShape):  # the directions the kernels run (both)
            from vitkernels.triton.head_mixing import directions

            both = directions(shape)
            # the backward without the forward's padded k / v copies (its own padding;
            # where the forward keeps none, the same launches as "bwd")
            extra = ("bwd_unsaved",)
        for direction in (*both, *extra):
            rec = record_workload(shape, direction, dtype, variant=variant, arch=arch, **options)
            for launch in rec.launches:
                key = launch.specialization.key() + repr(launch.kernel)
                if key in by_key:
                    by_key[key].cases.append(f"{case} {direction}")
                    continue
                name, n = launch.name, 2
                while name in names:
                    name, n = f"{launch.name}#{n}", n + 1
                names.add(name)
                by_key[key] = RecordedLaunch(name, launch, [f"{case} {direction}"])
    return list(by_key.values())


def suite_launches(launches: list[RecordedLaunch]) -> list[RecordedLaunch]:
    """The test suite's share of ``launches``: one launch of every kernel, the first that
    a workload of ``vitkernels.workloads.WORKLOADS`` makes, else its first (CI's compile
    matrix compiles them all; the workloads' every launch took the suite's compile
    fixture to two of its 20 minutes on 2 cores)."""
    from vitkernels.workloads import WORKLOADS

    def kernel(rl: RecordedLaunch) -> str:
        return f"{rl.launch.kernel.fn.__module__}.{rl.launch.kernel.fn.__name__}"

    picked: dict[str, RecordedLaunch] = {}
    for rl in launches:
        if any(c.split()[0] in WORKLOADS for c in rl.cases):
            picked.setdefault(kernel(rl), rl)
    for rl in launches:
        picked.setdefault(kernel(rl), rl)
    ids = {id(rl) for rl in picked.values()}
    return [rl for rl in launches if id(rl) in ids]


# ----------------------------------------------------------------------------
# compiling


@dataclasses.dataclass
class Compiled:
    """A launch compiled for one architecture, and what ptxas made of it."""

    arch: str  # "sm_90a"
    cubin: bytes
    shared_bytes: int  # dynamic shared memory Triton launches it with
    num_warps: int
    registers: int
    spill_stores: int  # bytes of local-memory stores in the machine code (spills)
    spill_loads: int
    stack_frame: int
    static_shared: int
    compiler_dots: list[str] = dataclasses.field(default_factory=list)  # see compiler_made_dots
    transposed_a: list[str] = dataclasses.field(default_factory=list)  # see transposed_register_a


def bin_dir() -> str:
    """The folder of the CUDA tools bundled with the imported triton."""
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def gpu_name(arch: int) -> str:
    return f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"


def compile_launch(launch: Launch, arch: int = 90) -> Compiled:
    """``triton.compile`` of the launch's specialisation (as ``JITFunction.run`` would)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from vitkernels.triton._common import _binder

    spec = launch.specialization
    if spec is None or spec.arch != arch:
        raise ValueError(f"{launch.name}: record it for sm_{arch} first (inside recording(arch={arch}))")
    jit = _binder(launch.kernel, arch)[0]
    src = ASTSource(jit, spec.signature, spec.constexprs, spec.attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=spec.options)
    cubin = compiled.asm["cubin"]
    res = resources(cubin, jit.fn.__name__)
    return Compiled(
        arch=gpu_name(arch),
        cubin=cubin,
        shared_bytes=int(getattr(compiled.metadata, "shared", 0) or 0),
        num_warps=int(compiled.metadata.num_warps),
        compiler_dots=compiler_made_dots(compiled.asm["ttir"]),
        transposed_a=transposed_register_a(compiled.asm.get("ttgir", "")),
        **res,
    )


_RE_LOC_DEF = re.compile(r"^(#loc\d*) = loc\((.*)\)$", re.M)
_RE_DOT = re.compile(r"= tt\.dot .*?: (tensor<[^>]*>) \* (tensor<[^>]*>) .*loc\((#loc\d*)\)\s*$", re.M)


def _source_lines(ref: str, defs: dict[str, str], depth: int = 0) -> list[tuple[str, int]]:
    """(file, line) of every source position a TTIR location (``#locN``) refers to,
    through names and call sites."""
    expr = defs.get(ref, "")
    out = [(f, int(line)) for f, line in re.findall(r'"([^"]+)":(\d+):\d+', expr)]
    if depth < 32:
        for inner in re.findall(r"#loc\d*", expr):
            out += _source_lines(inner, defs, depth + 1)
    return out


def compiler_made_dots(ttir: str) -> list[str]:
    """The ``tt.dot`` ops of a kernel's TTIR that no ``tl.dot`` of the source wrote.

    Triton's combine pass rewrites ``tl.sum(a[:, :, None] * b[None, :, :], 1)`` into
    a ``tt.dot``: on the GPU that runs on tensor cores at TF32 (triton 3.6) whatever
    the kernel's float32 policy, and its lowering gives wrong (doubled) sums when the
    reduced axis is shorter than the instruction's K (8 for float32). The interpreter
    runs the sum as written, so only the compiled IR shows it. A dot counts as the
    source's when one of its source lines outside triton's own files calls ``.dot(``.
    Returns one line per such dot: operand types and the source lines it came from.
    """
    import linecache

    import triton

    from vitkernels.estimate.sass import package_file

    triton_dir = os.path.dirname(triton.__file__)
    defs = dict(_RE_LOC_DEF.findall(ttir))
    found = []
    for lhs, rhs, ref in _RE_DOT.findall(ttir):
        # a cached kernel names the checkout it was first compiled from: read this one's lines
        lines = [(package_file(f), n) for f, n in _source_lines(ref, defs) if not f.startswith(triton_dir)]
        if any(".dot(" in linecache.getline(f, n) for f, n in lines):
            continue
        where = "; ".join(f"{os.path.basename(f)}:{n}: {linecache.getline(f, n).strip()}" for f, n in lines)
        found.append(f"{lhs} * {rhs} from {where or 'no source line'}")
    return found


_RE_LOCAL_ALLOC = re.compile(r"^\s*(%[\w.#]+) = ttg\.local_alloc %", re.M)  # from a register value
_RE_TRANS = re.compile(r"^\s*(%[\w.#]+) = ttg\.memdesc_trans (%[\w.#]+)", re.M)
_RE_WGMMA = re.compile(r"^\s*%[\w.#]+ = ttng\.warp_group_dot (%[\w.#]+), .*?: (!ttg\.memdesc<[^>]*>)", re.M)


def transposed_register_a(ttgir: str) -> list[str]:
    """The wgmma ops (``ttng.warp_group_dot``) of a kernel's TTGIR whose A operand is a
    transposed view (``ttg.memdesc_trans``) of a shared buffer stored from registers
    (``ttg.local_alloc`` of a value). Triton makes that of ``tl.dot(tl.trans(x), y)``
    where the 16-bit tile x cannot be copied to shared memory asynchronously (rows not
    provably 16-byte aligned); on an H200 with triton 3.6 the performer's forward
    built so was wrong (bench/NOTES.md, 2026-12-04), where the same view of a cp.async
    buffer, and the transposed B operand, were right. The interpreter cannot show it.
    Returns one line per such wgmma: its A operand's type."""
    allocs = set(_RE_LOCAL_ALLOC.findall(ttgir))
    trans = dict(_RE_TRANS.findall(ttgir))
    return [f"A {ty}" for a, ty in _RE_WGMMA.findall(ttgir) if trans.get(a) in allocs]


_RE_RES = re.compile(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_RE_LOCAL = re.compile(r"\b(STL|LDL)(?:\.(U8|S8|U16|S16|64|128))?\b")
_SIZES = {None: 4, "U8": 1, "S8": 1, "U16": 2, "S16": 2, "64": 8, "128": 16}


def _run_tool(args: list[str]) -> str:
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{proc.stdout}{proc.stderr}")
    return proc.stdout


def cubin_tool(tool: str, cubin: bytes, *flags: str) -> str:
    """Run cuobjdump / nvdisasm (from the triton wheel) on a cubin."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        return _run_tool([os.path.join(bin_dir(), tool), *flags, path])


def resources(cubin: bytes, function: str | None = None) -> dict[str, int]:
    """Registers, stack frame, static shared memory and spill bytes (the
    local-memory accesses of the machine code, as ptxas counts them) of one
    function of a cubin."""
    usage = {m.group(1): m for m in _RE_RES.finditer(cubin_tool("cuobjdump", cubin, "-res-usage"))}
    if not usage:
        raise RuntimeError("cuobjdump -res-usage reported no function")
    m = usage[function] if function in usage else next(iter(usage.values()))
    sass = cubin_tool("nvdisasm", cubin, "-c")
    stores = loads = 0
    for op, size in _RE_LOCAL.findall(sass):
        if op == "STL":
            stores += _SIZES[size or None]
        else:
            loads += _SIZES[size or None]
    return dict(registers=int(m.group(2)), stack_frame=int(m.group(3)), static_shared=int(m.group(4)),
                spill_stores=stores, spill_loads=loads)


def main(argv: list[str] | None = None) -> int:
    """Compile every recorded launch for the given architectures; print one line per
    launch, and with --json write {name@sm_XX[/variant]: report}."""
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m vitkernels.triton._aot")
    parser.add_argument("--arch", type=int, action="append", help="80, 90 (repeatable; default both)")
    parser.add_argument("--variant", choices=VARIANTS, default="aligned")
    parser.add_argument("--json", help="write the reports here")
    parser.add_argument("--list", action="store_true", help="list the launches, compile nothing")
    parser.add_argument(
        "--only", action="append", help="compile only the launches whose name contains this (repeatable)"
    )
    parser.add_argument(
        "--suite", action="store_true", help="only the test suite's share (suite_launches): one launch of every kernel"
    )
    parser.add_argument(
        "--shard", default="0/1", help="I/N: compile every N-th launch from the I-th (N processes side by side)"
    )
    args = parser.parse_args(argv)
    try:
        shard, shards = (int(x) for x in args.shard.split("/"))
        if not 0 <= shard < shards:
            raise ValueError
    except ValueError:
        parser.error(f"--shard {args.shard!r}: expected I/N with 0 <= I < N, e.g. 0/2")
    results: dict[str, dict[str, object]] = {}
    suffix = "" if args.variant == "aligned" else f"/{args.variant}"
    for arch in args.arch or [80, 90]:
        launches = recorded_launches(args.variant, arch)
        if args.suite:
            launches = suite_launches(launches)
        launches = [rl for rl in launches if not args.only or any(o in rl.name for o in args.only)][shard::shards]
        for i, rl in enumerate(launches, 1):
            key = f"{rl.name}@sm_{arch}{suffix}"
            if args.list:
                print(f"{key}: {', '.join(rl.cases)}")
                continue
            try:
                c = compile_launch(rl.launch, arch)
                results[key] = {
                    "registers": c.registers, "spill_stores": c.spill_stores, "spill_loads": c.spill_loads,
                    "stack_frame": c.stack_frame, "shared_bytes": c.shared_bytes, "static_shared": c.static_shared,
                    "compiler_dots": c.compiler_dots, "transposed_a": c.transposed_a, "cases": rl.cases,
                }  # fmt: skip
                line = f"{c.registers} regs, {c.spill_stores}/{c.spill_loads} B spilled"
                if c.compiler_dots:
                    line += f", {len(c.compiler_dots)} dot(s) the compiler made"
                if c.transposed_a:
                    line += f", {len(c.transposed_a)} wgmma(s) on a transposed register tile"
            except Exception as exc:  # reported per launch; the test fails on it
                results[key] = {"error": f"{type(exc).__name__}: {exc}", "cases": rl.cases}
                line = "ERROR"
            print(f"[aot {i}/{len(launches)}] {key}: {line}", file=sys.stderr, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
