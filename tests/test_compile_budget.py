"""Every Triton kernel, compiled ahead of time exactly as the launchers launch it,
for sm_80 and sm_90a without a GPU; the machine code must not spill registers.

The launches are recorded from the launchers (vitkernels/triton/_aot.py): each
kernel module's record_calls runs its launchers on meta tensors for every
workload of vitkernels.workloads and the other layer shapes the models launch,
and Triton's own launch binder gives each launch the specialisation its JIT
would compile (16-byte aligned pointers and integers divisible by 16 marked
tt.divisibility=16, integers equal to 1 made constants). The compiles run in
subprocesses with TRITON_INTERPRET unset (this session may run the interpreter,
whose @triton.jit functions cannot be compiled), side by side.
VITKERNELS_AOT_TRITON_PATHS (colon-separated folders holding another triton, e.g.
`pip install --target DIR triton==3.6.0`) adds those versions for sm_90a: the
GPU machine runs a different triton than CI, and register allocation differs
between them. The launches are also compiled with misaligned inputs (views one
element into a buffer) for sm_90a, and float32's own tiles of patch_embed, relpos and
head mixing at 1-4 heads ("float32", sm_90a and sm_80). The default suite compiles only its share of the
launches (one launch of every kernel, a workload's where one launches it) for sm_90a
with the installed triton; VITKERNELS_AOT_FULL=1 runs every launch through the whole
matrix (CI does, as a step of its own). Floating-point fusion is Triton's default (on),
as a user's launch has it.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from vitkernels.triton._aot import compile_env  # noqa: E402

TRITONS = ["installed"] + [p for p in os.environ.get("VITKERNELS_AOT_TRITON_PATHS", "").split(":") if p]
# (triton, arch, variant). The suite compiles its share of the launches (_aot.suite_launches:
# one launch of every kernel, 29 of 377) for sm_90a with the installed triton (under a
# minute on 2 cores); VITKERNELS_AOT_FULL=1 compiles every launch
# and adds sm_80, misaligned inputs, float32's own tiles (patch_embed, relpos, head mixing) and the
# other tritons (.ci/run runs that matrix as a step of its own, which would take the
# suite past its time budget).
FULL = os.environ.get("VITKERNELS_AOT_FULL", "") not in ("", "0")
VARIANTS = [("installed", 90, "aligned")] + (
    [("installed", 80, "aligned"), ("installed", 90, "unaligned"), ("installed", 90, "float32"),
     ("installed", 80, "float32")] + [(tri, 90, v) for tri in TRITONS[1:] for v in ("aligned", "float32")]
    if FULL
    else []
)


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """{(triton, variant key): report}, one subprocess per variant."""
    tmp = tmp_path_factory.mktemp("aot")
    procs = []
    # one process per core and variant, each compiling every n-th launch
    shards = max(1, min(4, (os.cpu_count() or 1) // len(VARIANTS)))
    for i, (tri, arch, variant) in enumerate(VARIANTS):
        for shard in range(shards):
            out = tmp / f"v{i}-{shard}.json"
            cmd = [sys.executable, "-m", "vitkernels.triton._aot", "--arch", str(arch), "--variant", variant,
                   "--shard", f"{shard}/{shards}", "--json", str(out)] + ([] if FULL else ["--suite"])  # fmt: skip
            env = compile_env() if tri == "installed" else compile_env(tri, str(tmp / f"cache{i}"))
            procs.append((tri, arch, subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True), out))
    merged = {}
    for tri, arch, proc, out in procs:
        _, err = proc.communicate(timeout=3000)
        assert proc.returncode == 0, f"AOT compile ({tri}) for sm_{arch} failed:\n{err[-4000:]}"
        merged.update({(tri, k): v for k, v in json.loads(out.read_text()).items()})
    return merged


def _recorded():
    from vitkernels.triton._aot import recorded_launches

    return recorded_launches("aligned", 90)


def test_every_kernel_is_recorded():
    """Every @triton.jit *_kernel of vitkernels.triton is launched by some recorded call."""
    import importlib
    import pkgutil

    import vitkernels.triton as pkg

    kernels = set()
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"vitkernels.triton.{info.name}")
        for name, obj in vars(mod).items():
            fn = getattr(obj, "fn", None)
            if name.endswith("_kernel") and inspect.isfunction(fn) and fn.__module__ == mod.__name__:
                kernels.add(f"{mod.__name__}.{name}")
    launched = {f"{rl.launch.kernel.fn.__module__}.{rl.launch.kernel.fn.__name__}" for rl in _recorded()}
    assert kernels, "found no kernels"
    assert kernels <= launched, f"kernels no recorded launch compiles: {sorted(kernels - launched)}"


def test_the_suites_share_compiles_one_launch_of_every_kernel():
    """The suite compiles (without VITKERNELS_AOT_FULL) one launch of every kernel, a
    workload's where a workload launches it (its first), else the kernel's first; every
    other launch is CI's compile matrix."""
    from vitkernels.triton._aot import suite_launches
    from vitkernels.workloads import WORKLOADS

    def kernel(rl):
        return f"{rl.launch.kernel.fn.__module__}.{rl.launch.kernel.fn.__name__}"

    def of_workload(rl):
        return any(c.split()[0] in WORKLOADS for c in rl.cases)

    every = _recorded()
    share = suite_launches(every)
    assert sorted(kernel(rl) for rl in share) == sorted({kernel(rl) for rl in every})  # each once
    for rl in share:
        same = [x for x in every if kernel(x) == kernel(rl)]
        want = next((x for x in same if of_workload(x)), same[0])
        assert rl is want, (rl.name, want.name)
    assert any(not of_workload(rl) for rl in share)  # a kernel no workload launches is still compiled
    names = {rl.name for rl in share}
    assert [rl.name for rl in share] == [rl.name for rl in every if rl.name in names]  # recorded order


def test_recorded_launches_cover_the_workloads():
    cases = {c for rl in _recorded() for c in rl.cases}
    for wid in ("A1", "A2", "A3", "A4", "A5", "T1", "T2", "P1", "P2", "P3", "T2T-2", "T2T-3", "L128s-shrink7",
                "M1", "M3", "M1-timm", "timm-few", "CaiT-few", "M2-H4", "CaiT-M", "CaiT-S-timm", "DeepViT-H8", "M2",
                "H2-pre-D64", "H2-post-D64", "H1-post-D32", "H12-norm-D33", "DeepViT-16x64",
                "CaiT-cls-16x64", "reattn-1q-4x64"):
        # 5-16 heads (CaiT-M, CaiT-S-timm, M2: DeepViT-S's re-attention): head_mixing_tc.py
        for direction in ("fwd", "bwd"):
            assert f"{wid} {direction}" in cases, f"{wid} {direction}"


def test_float32_variant_compiles_head_mixing_at_1_to_4_heads():
    """CI's "float32" variant holds the float32 head-mixing launches of every 1-4-head
    shape of the catalogue, both directions, but those FLOAT32_HEAD_MIXING_LEFT names
    (with a reason); 5-16 heads take float16 / bfloat16 only."""
    from vitkernels.triton._aot import FLOAT32_HEAD_MIXING_LEFT, recorded_launches
    from vitkernels.workloads import EXTRA_SHAPES, WORKLOADS, HeadMixingShape

    shapes = {**{w.id: w.shape for w in WORKLOADS.values()}, **EXTRA_SHAPES}
    few = {c for c, s in shapes.items() if isinstance(s, HeadMixingShape) and s.heads <= 4}
    assert {"M1", "M3", "M1-timm", "CaiT-few"} <= few - set(FLOAT32_HEAD_MIXING_LEFT)
    assert set(FLOAT32_HEAD_MIXING_LEFT) <= few and all(FLOAT32_HEAD_MIXING_LEFT.values())
    launches = [rl for rl in recorded_launches("float32", 90) if rl.launch.name.startswith("head_mixing")]
    cases = {c for rl in launches for c in rl.cases}
    for case in few:
        for direction in ("fwd", "bwd"):
            assert (f"{case} {direction}" in cases) == (case not in FLOAT32_HEAD_MIXING_LEFT), (case, direction)
    assert all("[f32," in rl.launch.name for rl in launches)
    assert not any(c.split()[0] in shapes and shapes[c.split()[0]].heads > 4 for c in cases)


def test_head_mixing_shapes_outside_the_kernels_are_not_compiled():
    """What the kernels do not run (the torch backend does) is not recorded, and
    recording it says why: more than 16 heads, and 4 heads of 33 (rows not 16-byte
    aligned; 5-16 heads of 33, M2, run both directions)."""
    import dataclasses

    from vitkernels.triton._aot import record_workload
    from vitkernels.workloads import EXTRA_SHAPES, WORKLOADS

    m2 = WORKLOADS["M2"].shape
    # the forward: no pre-mix, so the row statistics in their own launch (each head's
    # own) before the fused kernel; that launch also writes the zero-padded copies of k
    # and v (rows of 48) the fused kernel reads
    fwd = record_workload(m2, "fwd").launches
    assert [rl.name.split("[")[0] for rl in fwd] == ["head_mixing_lse_tc", "head_mixing_fwd_tc"]
    kv = fwd[0].writes[1:]
    assert [tuple(t.shape)[1:] for t in kv] == [(12, 197, 48)] * 2
    assert all(any(t is c for t in fwd[1].reads) for c in kv)
    assert [rl.name.split("[")[0] for rl in record_workload(EXTRA_SHAPES["CaiT-M"], "fwd").launches] == [
        "head_mixing_fwd_tc"]  # the pre-mix: the statistics stay in the fused kernel
    # DeepViT-S's rows of 33 through zero-padded copies: k and v the forward's (saved by
    # the custom op), or without them by a launch of their own; q and dO written by the
    # dq launch (which reads them as they are), then read by the dk / dv launches
    names = ["head_mixing_bwd_q_tc", "head_mixing_bwd_dk_tc", "head_mixing_bwd_dv_tc", "head_mixing_bwd_params_tc"]
    for direction, first in (("bwd", []), ("bwd_unsaved", ["head_mixing_pad_kv"])):
        bwd = record_workload(m2, direction).launches
        assert [rl.name.split("[")[0] for rl in bwd] == first + names
        dq, copies = bwd[len(first)].writes[0], bwd[len(first)].writes[3:]
        assert [tuple(t.shape) for t in copies] == [(dq.shape[0], 12, 197, 48)] * 2
        assert all(any(t is c for t in la.reads) for la in bwd[len(first) + 1:len(first) + 3] for c in copies)
        kv = bwd[len(first)].reads[1:3]
        assert [tuple(t.shape)[1:] for t in kv] == [(12, 197, 48)] * 2
        assert all(any(t is c for t in la.reads) for la in bwd[len(first) + 1:len(first) + 3] for c in kv)
    assert [rl.name.split("[")[0] for rl in record_workload(EXTRA_SHAPES["CaiT-S-timm"], "bwd").launches] == [
        "head_mixing_bwd_q_tc", "head_mixing_bwd_dkdv_tc", "head_mixing_bwd_params_tc"]
    # heads of 49-64 at HP = 16 (vit-pytorch's DeepViT): chunks of 32 in every launch,
    # dk's two in a launch each (one launch of both spilled: bench/NOTES.md, 2026-12-03)
    bwd = record_workload(EXTRA_SHAPES["DeepViT-16x64"], "bwd").launches
    assert [rl.name.split("[")[0] for rl in bwd] == [
        "head_mixing_bwd_q_tc", "head_mixing_bwd_dka_tc", "head_mixing_bwd_dkb_tc", "head_mixing_bwd_dv_tc",
        "head_mixing_bwd_params_tc"]
    assert [(rl.constexprs["KA"], rl.constexprs["KB"], rl.constexprs.get("DK_CHUNK")) for rl in bwd[:4]] == [
        (32, 32, None), (32, 32, 1), (32, 32, 2), (32, 32, 0)]
    # ... but at one query (CaiT's class attention) dk and dv share one launch (the query
    # loop runs once: it compiled clean there, and reads k and v once), with the head
    # norm too (the recorder's DeepViT layout takes q's first Nq rows)
    for shape in (EXTRA_SHAPES["CaiT-cls-16x64"], dataclasses.replace(EXTRA_SHAPES["DeepViT-16x64"], nq=1),
                  dataclasses.replace(EXTRA_SHAPES["CaiT-M"], nq=1)):
        bwd = record_workload(shape, "bwd").launches
        assert [rl.name.split("[")[0] for rl in bwd] == [
            "head_mixing_bwd_q_tc", "head_mixing_bwd_dkdv_tc", "head_mixing_bwd_params_tc"], shape
        assert all(",Nq1," in rl.name for rl in bwd)
        assert [(rl.constexprs["DO_DK"], rl.constexprs["DO_DV"], rl.constexprs["DK_CHUNK"]) for rl in bwd[1:2]] == [
            (True, True, 0)]
    # two queries keep the split
    bwd = record_workload(dataclasses.replace(EXTRA_SHAPES["CaiT-cls-16x64"], nq=2), "bwd").launches
    assert [rl.name.split("[")[0] for rl in bwd][1:4] == [
        "head_mixing_bwd_dka_tc", "head_mixing_bwd_dkb_tc", "head_mixing_bwd_dv_tc"]
    assert [rl.name.split("[")[0] for rl in record_workload(EXTRA_SHAPES["CaiT-M"], "bwd").launches] == [
        "head_mixing_bwd_q_tc", "head_mixing_bwd_dk_tc", "head_mixing_bwd_dv_tc", "head_mixing_bwd_params_tc"]
    with pytest.raises(ValueError, match="H=17 heads is above the kernels' limit of 16"):
        record_workload(dataclasses.replace(m2, heads=17), "fwd")
    with pytest.raises(ValueError, match="D=33: 16-bit rows of 66 bytes are not 16-byte aligned"):
        record_workload(dataclasses.replace(m2, heads=4), "fwd")


def test_many_heads_dq_launch_defers_its_key_sums_but_with_the_norm_at_16_slots_or_a_pre_mix():
    """The 5-16-head dq launch sums over the keys after its first loop (fewer
    instructions a tile), but with the head norm at 9-16 heads or after a pre-mix, where
    its launch spilled (bench/NOTES.md, 2026-12-03)."""
    from vitkernels.triton._aot import record_workload
    from vitkernels.workloads import HeadMixingShape

    for heads, (pre, post, bias, norm), want in (
        (12, (False, True, False, True), False), (8, (False, True, False, True), True),
        (12, (True, True, False, False), True), (12, (False, True, True, False), True),
        (8, (False, False, False, True), True), (12, (False, False, False, True), False),
        (8, (True, False, False, True), False), (12, (True, True, False, True), False),
    ):  # fmt: skip
        shape = HeadMixingShape(heads, 197, 197, 64, "vit-pytorch", pre, post, bias, norm)
        la = record_workload(shape, "bwd").launches[0]
        assert la.name.startswith("head_mixing_bwd_q_tc[")
        assert la.constexprs["DEFER_SUMS"] is want, (heads, pre, post, bias, norm)


def test_head_mixing_launches_are_recorded_with_their_traffic():
    """M1's launches (vit-pytorch CaiT layout): one forward, and the backward's delta
    (with every parameter's partial sums; in two launches at batch 256, the whole
    64-row blocks and the last 4 of 196 rows on 16-row blocks, each counted with its
    own rows of q and dO), dq of every head, dk/dv of every head, the parameters'
    gradients from the partial sums; the first three read every head's q, k, v. No torch
    launch is left in the backward."""
    from vitkernels.triton._aot import record_workload
    from vitkernels.workloads import WORKLOADS

    w = WORKLOADS["M1"]
    fwd = record_workload(w.shape, "fwd").launches
    assert [la.name.split("[")[0] for la in fwd] == ["head_mixing_fwd"]
    read, written = fwd[0].bytes_moved()
    assert read + written >= w.bytes("fwd")  # and the row logsumexp it saves
    rec = record_workload(w.shape, "bwd")
    names = [e.name.split("[")[0] for e in rec.events]  # launches and torch operations
    assert names == ["head_mixing_bwd_delta", "head_mixing_bwd_delta", "head_mixing_bwd_dq", "head_mixing_bwd_dkdv",
                     "head_mixing_bwd_params"]  # fmt: skip
    whole, rest = rec.launches[:2]
    assert (whole.constexprs["ROW0"], whole.constexprs["BLOCK_M"], whole.grid) == (0, 64, (3 * 256,))
    assert (rest.constexprs["ROW0"], rest.constexprs["BLOCK_M"], rest.grid) == (192, 16, (256,))
    row_bytes = 256 * 4 * (2 * 48 * 2 + 4)  # a query row of q, dO (16-bit) and lse (float32), every head
    assert whole.bytes_moved()[0] - rest.bytes_moved()[0] == (192 - 4) * row_bytes  # each launch its own rows
    assert all(la.loops for la in rec.launches)


def _launch(rec, name: str):
    (launch,) = [la for la in rec.launches if la.name.startswith(name + "[")]
    return launch


def test_recording_follows_tritons_specialisation():
    """The recorded specialisation is Triton's: pointers 16-byte aligned, integers
    divisible by 16 marked so, integers equal to 1 constants, misaligned views not
    marked (A1 forward: q (B, H, 196, 32) has strides (25088, 6272, 32, 1))."""
    from vitkernels.triton._aot import record_workload
    from vitkernels.workloads import WORKLOADS

    shape = WORKLOADS["A1"].shape
    rec = record_workload(shape, "fwd")
    assert [la.name.split("[")[0] for la in rec.launches] == ["relpos_fwd_bias", "relpos_fwd"]
    fwd = _launch(rec, "relpos_fwd").specialization.describe()
    assert fwd["Q"] == "*bf16 /16" and fwd["LSE"] == "*fp32 /16"
    assert fwd["stride_qb"] == "i32 /16" and fwd["stride_qn"] == "i32 /16"
    assert fwd["stride_qd"] == "=1"
    assert fwd["NQ"] == "=196" and fwd["NK_FULL"] == "=192"  # the key extents are constexprs
    assert fwd["BLOCK_M"] == "=64"
    unaligned = _launch(record_workload(shape, "fwd", variant="unaligned"), "relpos_fwd")
    spec = unaligned.specialization.describe()
    assert spec["Q"] == "*bf16" and spec["O"] == "*bf16 /16"  # out is the launcher's own


def test_recording_keeps_a_kernels_unspecialised_arguments():
    """A kernel's ``do_not_specialize`` arguments are recorded as Triton's JIT passes
    them, not specialised: the head-mixing backward's NUM_QB, also where it is 1 (Nq 49
    on 64-row blocks; Nq 7 and Nq 1 on 16-row blocks, where NQ = 1 is a constant). The
    launcher says by ONE_QB where the code knows there is one block: on 16-row blocks
    only (their dq pass spilled without it; the 64-row delta pass spilled with it)."""
    from vitkernels.triton._aot import record_workload
    from vitkernels.workloads import WORKLOADS, HeadMixingShape

    cases = [  # shape, NQ as recorded, [(launch, NUM_QB, ONE_QB)] in launch order
        (HeadMixingShape(4, 49, 49, 48, "timm", True, True, True, False), "i32",
         [("delta", 1, False), ("dq", 2, False)]),  # dq on 32-row blocks
        (HeadMixingShape(4, 7, 197, 64, "vit-pytorch", True, True, False, False), "i32",
         [("delta", 1, True), ("dq", 1, True)]),
        (WORKLOADS["M3"].shape, "=1", [("delta", 1, True), ("dq", 1, True)]),
        (WORKLOADS["M1"].shape, "i32", [("delta", 3, False), ("delta", 1, True), ("dq", 7, False)]),  # 3 x 64 + 4 rows; dq 7 x 32
    ]  # fmt: skip
    for shape, nq, want in cases:
        got = []
        for launch in record_workload(shape, "bwd").launches:
            kind = launch.name.split("[")[0].removeprefix("head_mixing_bwd_")
            if kind in ("delta", "dq"):
                spec = launch.specialization.describe()
                assert spec["NUM_QB"] == "i32" and spec["NQ"] == nq, (shape, launch.name, spec["NUM_QB"], spec["NQ"])
                got.append((kind, launch.args[launch.kernel.arg_names.index("NUM_QB")], launch.constexprs["ONE_QB"]))
        assert got == want, shape


def test_recording_counts_torch_operations():
    """The torch operations a launcher runs between kernels are recorded (each is a
    kernel launch on a GPU): patch_embed's backward on channels-last images after a
    forward that saved nothing (the cuda backend's) copies the weight (D, K) into the
    kernel's patch order for dxn; after a saving forward (whose prep wrote it) and with
    NCHW images (P1) it runs none: its fold kernel sums the partials over the splits
    and the batch."""
    import dataclasses

    from vitkernels.triton._aot import record_workload
    from vitkernels.triton._common import TorchOp
    from vitkernels.workloads import WORKLOADS

    rec = record_workload(WORKLOADS["P1"].shape, "bwd")
    assert [e.name.split("[")[0] for e in rec.events] == ["patch_embed_dw", "patch_embed_fold"]
    shape = dataclasses.replace(WORKLOADS["P3"].shape, layout="channels_last")
    rec = record_workload(shape, "bwd_recompute")
    ops = [e for e in rec.events if isinstance(e, TorchOp)]
    weight_bytes = shape.dim * shape.k * 2
    assert [(o.name, o.bytes_read, o.bytes_written) for o in ops] == [("clone", weight_bytes, weight_bytes)]
    rec = record_workload(shape, "bwd")
    assert [e.name.split("[")[0] for e in rec.events] == ["patch_embed_dw_dxn", "patch_embed_fold"]


def _pe_names(rec) -> list[str]:
    return [e.name.split("[")[0] + (",save" if e.name.endswith(",save]") else ",recompute"
            if e.name.endswith(",recompute]") else "") for e in rec.events]  # fmt: skip


def test_patch_embed_backward_reads_what_the_forward_saved():
    """P2 and P3 as the estimate records them: the inference forward writes the tokens
    only; the forward of a training step writes what the backward reads (P2: the
    pre-norm tokens in bfloat16 and both norms' statistics, and the plain weight from
    its prep; P3: the input norm's statistics), so P2's backward is 4 launches (no prep,
    no recompute of the forward GEMM) and P3's 2 (no statistics launch); after a
    forward that saved nothing (the cuda backend's) the backward recomputes."""
    from vitkernels.triton._aot import record_workload
    from vitkernels.workloads import BATCH, WORKLOADS

    p2, p3 = WORKLOADS["P2"].shape, WORKLOADS["P3"].shape
    fwd = record_workload(p2, "fwd")
    assert _pe_names(fwd) == ["patch_embed_prep", "patch_embed_fwd"]
    assert not fwd.launches[0].constexprs["WRITE_PLAIN"] and not fwd.launches[1].constexprs["SAVE_Y"]
    assert [t for t in fwd.launches[1].writes if t is not None] == [fwd.launches[1].args[8]]  # out only
    saving = record_workload(p2, "fwd_saving")
    assert _pe_names(saving) == ["patch_embed_prep", "patch_embed_fwd,save"]
    assert saving.launches[0].constexprs["WRITE_PLAIN"]
    written = [t for t in saving.launches[1].writes if t is not None]
    M, D = BATCH * p2.tokens, p2.dim
    assert [(tuple(t.shape), t.dtype) for t in written] == [
        ((BATCH, 1 + p2.tokens, D), torch.bfloat16), ((M, 2), torch.float32),
        ((BATCH, p2.tokens, D), torch.bfloat16), ((M, 2), torch.float32),
    ]  # fmt: skip
    assert _pe_names(record_workload(p2, "bwd")) == [
        "patch_embed_out_norm_bwd", "patch_embed_dw", "patch_embed_dxn", "patch_embed_fold"]
    assert _pe_names(record_workload(p2, "bwd_recompute")) == [
        "patch_embed_prep", "patch_embed_fwd,recompute", "patch_embed_out_norm_bwd", "patch_embed_dw",
        "patch_embed_dxn", "patch_embed_fold"]  # fmt: skip
    assert _pe_names(record_workload(p3, "fwd")) == ["patch_embed_prep", "patch_embed_fwd"]
    assert _pe_names(record_workload(p3, "fwd_saving")) == ["patch_embed_prep", "patch_embed_fwd,save"]
    assert _pe_names(record_workload(p3, "bwd")) == ["patch_embed_dw_dxn", "patch_embed_fold"]
    assert _pe_names(record_workload(p3, "bwd_recompute")) == [
        "patch_embed_stats", "patch_embed_dw_dxn", "patch_embed_fold"]


def test_float32_patch_embed_backward_keeps_dw_and_dxn_apart():
    """float32's dots are FMA loops with register-resident operands: P3's fused dW + dxn
    kernel spilled 0.7-18 KB on sm_90a with every tile tried, so float32 runs the two
    kernels (each compiled ahead of time without spills, one pipeline stage)."""
    from vitkernels.triton._aot import record_workload
    from vitkernels.workloads import WORKLOADS

    p3 = WORKLOADS["P3"].shape
    rec = record_workload(p3, "bwd", torch.float32)
    assert _pe_names(rec) == ["patch_embed_dw", "patch_embed_dxn", "patch_embed_fold"]
    assert [la.num_stages for la in rec.launches[:2]] == [1, 1]
    assert _pe_names(record_workload(p3, "bwd", torch.bfloat16)) == ["patch_embed_dw_dxn", "patch_embed_fold"]


def test_no_register_spills(reports):
    """One check over every compile (the reports name the failures)."""
    assert reports, "no compile reports"
    bad = []
    for (tri, key), rep in sorted(reports.items()):
        where = f"{key} ({tri})"
        if "error" in rep:
            bad.append(f"{where}: {rep['error'][:2000]}")
        elif rep["spill_stores"] or rep["spill_loads"] or rep["registers"] > 255:
            bad.append(f"{where}: {rep['registers']} registers, {rep['spill_stores']} B spill stores, "
                       f"{rep['spill_loads']} B spill loads (cases: {', '.join(rep['cases'])})")  # fmt: skip
    assert not bad, f"{len(bad)} of {len(reports)} compiles failed or spilled:\n" + "\n".join(bad)
    variants = {(tri, key.split("@")[1]) for tri, key in reports}
    expected = {(tri, f"sm_{a}" + ("" if v == "aligned" else f"/{v}")) for tri, a, v in VARIANTS}
    assert variants == expected
    from vitkernels.triton._aot import suite_launches

    want = _recorded() if FULL else suite_launches(_recorded())
    assert {key.split("@")[0] for tri, key in reports if key.endswith("@sm_90") and tri == "installed"} == {
        rl.name for rl in want}  # fmt: skip


# the most shared memory a block may take (dynamic, after opting in, plus static):
# A100 163 KB, H100 / H200 227 KB (CUDA C++ Programming Guide, compute capabilities)
SHARED_LIMIT = {"sm_80": 166912, "sm_90": 232448}


def test_shared_memory_fits_the_device(reports):
    """Every compile's shared memory within what its architecture lets a block have:
    beyond it the launch fails on the GPU (two-stage pipelines hold their tiles there)."""
    bad = []
    for (tri, key), rep in sorted(reports.items()):
        if "error" in rep:
            continue  # test_no_register_spills names it
        arch = key.split("@")[1].split("/")[0]
        used = rep["shared_bytes"] + rep["static_shared"]
        if used > SHARED_LIMIT[arch]:
            bad.append(f"{key} ({tri}): {used} B of shared memory, above {arch}'s {SHARED_LIMIT[arch]}")
    assert not bad, "\n".join(bad)


def test_no_dot_the_compiler_made(reports):
    """Every tensor-core dot of every compile is a tl.dot of the source. Triton's
    combine pass turns tl.sum(a[:, :, None] * b[None, :, :], 1) into a dot that runs
    at TF32 and sums wrongly where the summed axis is shorter than the instruction's
    K; the interpreter never shows it (relpos's table gradient, 2x at A4 on an H200)."""
    bad = [f"{key} ({tri}): {dot}" for (tri, key), rep in sorted(reports.items())
           for dot in rep.get("compiler_dots", [])]  # fmt: skip
    assert not bad, f"{len(bad)} dots no tl.dot wrote:\n" + "\n".join(bad)


def test_no_wgmma_on_a_transposed_register_tile(reports):
    """No compile has a wgmma whose A operand is a transposed view of a shared buffer
    stored from registers (``_aot.transposed_register_a``): the performer's forward
    built so was wrong on an H200 at E 33/34/40 (triton 3.6; right in the interpreter),
    and its kernels now load such operands transposed from memory instead."""
    bad = [f"{key} ({tri}): {a}" for (tri, key), rep in sorted(reports.items())
           for a in rep.get("transposed_a", [])]  # fmt: skip
    assert not bad, f"{len(bad)} wgmma(s) on a transposed register tile:\n" + "\n".join(bad)


def test_the_transposed_register_tile_check_reads_ttgir():
    """What ``transposed_register_a`` finds: a memdesc_trans of a local_alloc made from a
    value, as a wgmma's first operand; not one of a cp.async buffer, nor a B operand."""
    from vitkernels.triton import _aot

    ttgir = "\n".join([
        "    %vx_1 = ttg.local_alloc %vx : (tensor<64x64xf16, #blocked>) -> !ttg.memdesc<64x64xf16, #s1, #smem>",
        "    %buf = ttg.local_alloc : () -> !ttg.memdesc<2x64x64xf16, #s1, #smem, mutable>",
        "    %t1 = ttg.memdesc_trans %vx_1 {order = array<i32: 1, 0>} : !ttg.memdesc<64x64xf16, #s1, #smem> -> "
        "!ttg.memdesc<64x64xf16, #s0, #smem>",
        "    %t2 = ttg.memdesc_trans %buf_3 {order = array<i32: 1, 0>} : !ttg.memdesc<64x64xf16, #s1, #smem> -> "
        "!ttg.memdesc<64x64xf16, #s0, #smem>",
        "    %d1 = ttng.warp_group_dot %t1, %p, %acc {isAsync = true} : !ttg.memdesc<64x64xf16, #s0, #smem> * "
        "!ttg.memdesc<64x32xf16, #s2, #smem> -> tensor<64x32xf32, #mma>",
        "    %d2 = ttng.warp_group_dot %t2, %p, %acc {isAsync = true} : !ttg.memdesc<64x64xf16, #s0, #smem> * "
        "!ttg.memdesc<64x32xf16, #s2, #smem> -> tensor<64x32xf32, #mma>",
        "    %d3 = ttng.warp_group_dot %k, %t1, %acc {isAsync = true} : !ttg.memdesc<64x64xf16, #s3, #smem> * "
        "!ttg.memdesc<64x64xf16, #s0, #smem> -> tensor<64x64xf32, #mma>",
    ])  # fmt: skip
    assert _aot.transposed_register_a(ttgir) == ["A !ttg.memdesc<64x64xf16, #s0, #smem>"]


def test_a_cached_kernel_from_another_checkout_is_read_from_this_one(tmp_path):
    """Triton's on-disk cache serves a kernel compiled from another path (a second
    checkout, a deleted copy) when its source and starting lines match; its TTIR still
    names the old path. The dot check reads those lines from this package's file."""
    pytest.importorskip("triton")
    from vitkernels.triton import _aot, relpos

    src = inspect.getsource(relpos).splitlines()
    dot_line = next(i for i, ln in enumerate(src, 1) if "tl.dot(" in ln)
    other_line = next(i for i, ln in enumerate(src, 1) if ln.strip() and ".dot(" not in ln)
    gone = tmp_path / "deleted-copy" / "vitkernels" / "triton" / "relpos.py"
    ttir = "\n".join([
        f'#loc1 = loc("{gone}":{dot_line}:8)',
        f'#loc2 = loc("{gone}":{other_line}:8)',
        "    %0 = tt.dot %a, %b, %c : tensor<64x32xbf16> * tensor<32x64xbf16> -> tensor<64x64xf32> loc(#loc1)",
        "    %1 = tt.dot %a, %b, %c : tensor<64x16xf32> * tensor<16x64xf32> -> tensor<64x64xf32> loc(#loc2)",
    ])  # fmt: skip
    found = _aot.compiler_made_dots(ttir)
    assert len(found) == 1 and "tensor<64x16xf32>" in found[0], found
    assert f"relpos.py:{other_line}: {src[other_line - 1].strip()}" in found[0]
