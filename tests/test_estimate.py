"""The compiler-based estimate (vitkernels/estimate): the SASS analysis on a
hand-countable kernel, the model's occupancy and waves, and the command on a
small real subset (one relpos and one patch_embed launch) with its JSON schema."""

from __future__ import annotations

import inspect
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from vitkernels.estimate import analysis, model, sass

# A kernel as `nvdisasm -c -gi` prints it: 3 instructions, a loop of 4 (one HGMMA)
# from the `for k0` of the source file below, an if/else whose sides hold 2 and 3
# instructions, EXIT, then the trap branch and padding nothing reaches.
SOURCE = """\
def kernel():
    x = 0
    for k0 in range(10):
        x += 1
    return x
"""
SASS = """\
//--------------------- .text.tiny --------------------------
tiny:
\t//## File "{src}", line 2
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   S2R R0, SR_TID.X ;
        /*0020*/                   IMAD R2, R0, 0x4, RZ ;
.L_x_0:
\t//## File "{src}", line 4
        /*0030*/                   FFMA R3, R3, R3, R3 ;
        /*0040*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24 ;
        /*0050*/                   IADD3 R2, R2, 0x1, RZ ;
\t//## File "{src}", line 3
        /*0060*/              @!P0 BRA `(.L_x_0) ;
\t//## File "{src}", line 5
        /*0070*/               @P1 BRA `(.L_x_1) ;
        /*0080*/                   FADD R4, R4, R4 ;
        /*0090*/                   BRA `(.L_x_2) ;
.L_x_1:
        /*00a0*/                   FMUL R4, R4, R4 ;
        /*00b0*/                   FMUL R4, R4, R4 ;
        /*00c0*/                   FMUL R4, R4, R4 ;
.L_x_2:
        /*00d0*/                   STG.E [R6.64], R4 ;
        /*00e0*/                   EXIT ;
.L_x_3:
        /*00f0*/                   BRA `(.L_x_3);
        /*0100*/                   NOP;
        /*0110*/                   NOP;
"""


@pytest.fixture
def tiny(tmp_path):
    src = tmp_path / "tiny.py"
    src.write_text(SOURCE)
    f = sass.parse(SASS.format(src=src))["tiny"]
    return analysis.Code("triton", f, registers=128, static_shared=0, spill_stores=0, spill_loads=0)


def test_sass_structure_by_hand(tiny):
    f = tiny.function
    insns = sass.reachable(f)
    assert [i.addr for i in insns] == list(range(0, 0xF0, 0x10))  # no trap branch, no padding
    loops, owner = sass.loops(f, insns)
    assert [(lp.start, lp.end) for lp in loops] == [(0x30, 0x60)]
    sass.attribute(loops, tiny.source_loops)
    assert loops[0].source.var == "k0"
    weights = sass.branch_weights(f, insns)
    assert [weights[a] for a in (0x80, 0x90, 0xA0, 0xB0, 0xC0)] == [0, 0, 1, 1, 1]  # the longer side


def test_counts_and_times_by_hand(tiny):
    programs, warps, trips = 1000, 4, 10
    out = analysis.analyse(tiny, programs=programs, warps=warps, dynamic_shared=30 * 1024, trips={"k0": trips},
                           bytes_read=4_000_000, bytes_written=1_000_000)  # fmt: skip
    # 3 before the loop + 10 x 4 in it + the branch + the longer side (3) + STG + EXIT
    per_warp = 3 + trips * 4 + 1 + 3 + 2
    assert out["sass"]["executed_per_program_per_warp"] == per_warp
    # by class, with the same weights: FFMA x 10 and the longer side's 3 FMUL (the shorter
    # side's FADD not), HGMMA x 10; every executed instruction in one class
    by_class = out["sass"]["executed_by_class"]
    assert by_class["float"] == trips + 3 and by_class["tensor core"] == trips
    assert sum(by_class.values()) == per_warp
    assert out["warnings"] == []
    per_sm = math.ceil(programs / 132)  # the busiest SM's programs
    assert out["t_issue_us"] == pytest.approx(per_sm * per_warp * warps / (4 * 1.98e9) * 1e6)
    assert out["t_mem_us"] == pytest.approx(5e6 / 4.3e12 * 1e6)
    # one warpgroup: 2*64*64*16 flops per HGMMA, 10 of them per program, at 660 TFLOP/s / 132 SMs
    assert out["tensor_core"]["flops_per_program"] == 10 * 2 * 64 * 64 * 16
    assert out["t_mma_us"] == pytest.approx(per_sm * 10 * 2 * 64 * 64 * 16 / (660e12 / 132) * 1e6)
    assert out["estimate_us"] == pytest.approx(max(out["t_mem_us"], out["t_mma_us"], out["t_issue_us"]) + 3)
    # 128 registers x 4 warps: 4 programs per SM (registers), 30 KB of shared memory would allow 7
    assert out["occupancy"] == {"programs_per_sm": 4, "limited_by": "registers", "warps_fraction": 0.25}
    assert out["waves"] == pytest.approx(programs / (4 * 132))
    missing = analysis.analyse(tiny, programs=1, warps=4, dynamic_shared=0, trips={}, bytes_read=0, bytes_written=0)
    assert missing["warnings"] and "k0" in missing["warnings"][0]


def test_a_cached_kernel_names_another_checkout_and_its_loops_are_still_found(tmp_path):
    """Triton's cache serves kernels compiled from another path (a second checkout, a
    deleted copy); their line info names that path. The loops must come from this
    package's file (they once went unattributed: the dQ loop counted once)."""
    from vitkernels.triton import relpos

    src = inspect.getsource(relpos).splitlines()
    for_line = next(i for i, ln in enumerate(src, 1) if ln.strip().startswith("for "))
    gone = tmp_path / "deleted-copy" / "vitkernels" / "triton" / "relpos.py"
    text = "\n".join([
        "//--------------------- .text.k --------------------------", "k:",
        f'\t//## File "{gone}", line {for_line + 1}',
        "        /*0000*/                   FFMA R3, R3, R3, R3 ;",
        f'\t//## File "{gone}", line {for_line}',
        "        /*0010*/              @!P0 BRA `(k) ;",
        "        /*0020*/                   EXIT ;",
    ])  # fmt: skip
    f = sass.parse(text)["k"]
    assert {i.file for i in f.insns} == {relpos.__file__}
    code = analysis.Code("triton", f, registers=32, static_shared=0, spill_stores=0, spill_loads=0)
    assert [lp.first for lp in code.source_loops if lp.first == for_line] == [for_line]
    # the cubin cache (keyed by the CUDA sources' content) likewise: this checkout's csrc
    csrc = Path(sass.__file__).resolve().parents[2] / "csrc" / "kernels" / "relpos.cuh"
    assert sass.package_file(str(tmp_path / "deleted-copy" / "csrc" / "kernels" / "relpos.cuh")) == str(csrc)
    assert sass.package_file("/x/csrc/kernels/nowhere.cuh") == "/x/csrc/kernels/nowhere.cuh"
    assert sass.package_file("/usr/local/cuda/include/cuda_bf16.hpp") == "/usr/local/cuda/include/cuda_bf16.hpp"


def test_occupancy_limits():
    assert model.occupancy(24, 0, 4) == model.Occupancy(16, "warps", 64)
    assert model.occupancy(255, 0, 8).blocks_per_sm == 1  # 256 registers x 32 x 8 warps = 65536
    assert model.occupancy(64, 100 * 1024, 4) == model.Occupancy(2, "shared memory", 8)
    assert model.occupancy(16, 0, 1).limited_by == "blocks"


def test_unrolled_runtime_loop_splits_its_trip_count(tmp_path):
    """Two adjacent machine loops from one source loop, the first with 4 copies of
    the second's body: 10 trips are 2 runs of the 4-copy body and 2 of the other."""
    src = tmp_path / "u.py"
    src.write_text(SOURCE)
    body = "".join(
        f'\t//## File "{src}", line 4\n        /*{a:04x}*/                   FFMA R3, R3, R3, R3 ;\n'
        for a in range(0x10, 0x50, 0x10)
    )
    text = (
        "//--------------------- .text.u --------------------------\nu:\n"
        f"        /*0000*/                   MOV R1, R1 ;\n.L_x_0:\n{body}"
        f'\t//## File "{src}", line 3\n        /*0050*/              @P0 BRA `(.L_x_0) ;\n.L_x_1:\n'
        f'\t//## File "{src}", line 4\n        /*0060*/                   FFMA R3, R3, R3, R3 ;\n'
        f'\t//## File "{src}", line 3\n        /*0070*/              @P0 BRA `(.L_x_1) ;\n'
        "        /*0080*/                   EXIT ;\n"
    )
    code = analysis.Code("cuda", sass.parse(text)["u"], 32, 0, 0, 0)
    out = analysis.analyse(code, programs=1, warps=1, dynamic_shared=0, trips={"k0": 10}, bytes_read=0,
                           bytes_written=0)  # fmt: skip
    assert [(lp["unrolled_copies"], lp["trips"]) for lp in out["sass"]["loops"]] == [(4, 2), (1, 2)]
    assert out["sass"]["executed_per_program_per_warp"] == 1 + 2 * 5 + 2 * 2 + 1


def test_cuda_kernel_names_normalise_alike():
    from vitkernels.estimate import cuda

    host = "void vk::relpos_fwd_kernel<vk_emu::bf16_t, 32, 64>(vk::RelposParams)"
    device = "void vk::relpos_fwd_kernel<__nv_bfloat16, 32, 64>(vk::RelposParams)"
    assert cuda.normalise(host) == cuda.normalise(device) == "vk::relpos_fwd_kernel<bf16, 32, 64>"
    launches = cuda._parse_log(f"launch 4 4 256 128 1 1 20496\nkernel {host}\n")
    assert launches[0].grid == (4, 4, 256) and launches[0].programs == 4096 and launches[0].warps == 4
    assert launches[0].template_ints == [32, 64]


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not found (builds the CUDA launch recorder)")
def test_cuda_launches_recorded_from_the_extensions_launchers():
    """The recorder runs csrc's own launch logic: relpos A3 forward is one launch of
    relpos_fwd_kernel<bf16, 32, 64, true, true> (the table mirrored over signed offsets in
    shared memory: (2R-1)^2 floats loaded; contiguous q, k, v: 16-byte copies only) on
    (ceil(Nq / 64), H, B) blocks of 128 threads; its 16 keys are no full tile (the loop
    over full tiles runs 0 times, the partial tile is peeled)."""
    import torch

    from vitkernels.estimate import cuda
    from vitkernels.workloads import WORKLOADS

    if cuda.unavailable_reason() and "g++" in cuda.unavailable_reason():
        pytest.skip(cuda.unavailable_reason())
    s = WORKLOADS["A3"].shape
    (la,) = cuda.record_calls(s, 3, torch.bfloat16, "fwd")
    assert la.kernel == "vk::relpos_fwd_kernel<bf16, 32, 64, true, true>"
    assert la.grid == (1, s.heads, 3) and la.block == (128, 1, 1)
    assert la.trips["k0"] == 0 and la.trips["i"] == (2 * s.side - 1) ** 2 / 128
    bwd = [e.kernel if isinstance(e, cuda.CudaLaunch) else e.name for e in cuda.record_calls(s, 3, torch.bfloat16, "bwd")]
    assert bwd == ["vk::relpos_bwd_dq_kernel<bf16, 32, 64, true, true>",
                   "vk::relpos_bwd_dkv_kernel<bf16, 32, 64, true, true>"]  # fmt: skip


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not found (builds the CUDA launch recorder)")
def test_cuda_patch_embed_saving_forward_recorded():
    """The cuda backend's forward of a training step (the extension's
    patch_embed_fwd_saving): the inference forward's launches, with what the backward
    reads written beside them (P2: the statistics, w_plain copied by the GEMM's blocks,
    the row norm's ostats; P3: the input norm's statistics only, no w_plain copy);
    there is no CUDA backward to record."""
    import torch

    from vitkernels.estimate import cuda
    from vitkernels.workloads import WORKLOADS

    if cuda.unavailable_reason() and "g++" in cuda.unavailable_reason():
        pytest.skip(cuda.unavailable_reason())
    B = 256  # the reference batch: P2's w_plain copy is one element per thread of each block
    for wid in ("P2", "P3"):
        s = WORKLOADS[wid].shape
        plain = cuda.record_calls(s, B, torch.bfloat16, "fwd")
        saving = cuda.record_calls(s, B, torch.bfloat16, "fwd_saving")
        assert [la.kernel for la in saving] == [la.kernel for la in plain]
        M, D, K = B * s.tokens, s.dim, s.k
        for a, b in zip(plain, saving, strict=True):
            extra = 0
            if "gemm" in a.kernel:
                assert a.trips["e<hi"] == 0 and b.trips["e<hi"] == (1 if wid == "P2" else 0)
                extra = M * 8 + (D * K * 2 if wid == "P2" else 0)  # stats (+ w_plain)
            elif "rownorm" in a.kernel:
                extra = M * 8  # ostats
            assert (b.bytes_read, b.bytes_written) == (a.bytes_read, a.bytes_written + extra), a.kernel
        with pytest.raises(ValueError, match="forward only"):
            cuda.record_calls(s, B, torch.bfloat16, "bwd")


def test_estimate_command_on_a_small_subset(tmp_path):
    """`python -m vitkernels estimate` on A3 and P1 forward, Triton only (two
    compiles): the JSON another tool reads, and numbers consistent with the model
    and the shared workload definitions."""
    pytest.importorskip("triton")
    from vitkernels.workloads import WORKLOADS

    out = tmp_path / "estimate.json"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TRITON_DEFAULT_FP_FUSION")}
    proc = subprocess.run(
        [sys.executable, "-m", "vitkernels", "estimate", "--workloads", "A3,P1", "--backends", "triton",
         "--passes", "fwd", "--out", str(out), "--jobs", "2"],
        env=env, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "estimate (compiler-based, not measured)" in proc.stdout
    data = json.loads(out.read_text())
    assert data["kind"] == "estimate" and data["arch"] == "sm_90a"
    for key in ("date", "commit", "triton", "torch", "model", "launches", "calls"):
        assert key in data, key
    assert data["model"]["bandwidth_bytes_per_s"] == 4.3e12
    calls = {(c["workload"], c["pass"]): c for c in data["calls"]}
    assert set(calls) == {("A3", "fwd"), ("P1", "fwd")}
    for (wid, which), c in calls.items():
        assert c["op"] == WORKLOADS[wid].op and c["backend"] == "triton" and c["dtype"] == "bf16"
        # A3's 16 keys fit one block: the attention kernel gathers its bias from the table
        # itself, without the bias expansion launch (larger grids take two launches)
        assert c["launches"] == 1 and c["bound"] in ("mem", "mma", "issue")
        assert c["floor_us"] == pytest.approx(WORKLOADS[wid].floor_s(which) * 1e6)
        assert c["ratio"] == pytest.approx(c["estimate_us"] / c["floor_us"])
        assert c["warnings"] == []
    assert not [la for la in data["launches"] if la["kernel"] == "_tile_bias_kernel"]
    for la in data["launches"]:
        # 64-row tiles take wgmma on sm_90a; A3's 16-query tiles are too small for it
        assert la["tensor_core"]["kind"] == ("HMMA" if la["workload"] == "A3" else "HGMMA")
        assert la["estimate_us"] == pytest.approx(max(la["t_mem_us"], la["t_mma_us"], la["t_issue_us"]) + 3)
        assert la["specialization"]["stride_qd" if la["kernel"] == "_fwd_kernel" else "sxw"] == "=1"
        loops = la["sass"]["loops"]
        assert all(lp["var"] for lp in loops) and loops
    relpos = next(la for la in data["launches"] if la["kernel"] == "_fwd_kernel")
    s = WORKLOADS["A3"].shape
    # A3's 16 keys are the forward's one (tail) key block: no key loop; the program
    # gathers its bias once and loops over a group of 4 batch entries
    assert [(lp["var"], lp["trips"]) for lp in relpos["sass"]["loops"]] == [("g", 4)]
    assert relpos["programs"] == 256 // 4 * s.heads  # one 16-query block per (4 batch entries, head)
    assert relpos["bytes_read"] + relpos["bytes_written"] >= WORKLOADS["A3"].bytes("fwd")


def test_estimate_rejects_bad_arguments():
    from vitkernels.estimate.run import estimate_main

    assert estimate_main(["--workloads", "A9"]) == 2
    assert estimate_main(["--backends", "opencl"]) == 2
    assert estimate_main(["--passes", "sideways"]) == 2


def test_render_labels_estimates():
    from vitkernels.estimate.run import render

    result = {"label": "estimate (compiler-based, not measured)", "arch": "sm_90a", "triton": "3.9", "torch": "2",
              "commit": "abc", "notes": [], "launches": [],
              "calls": [{"workload": "A1", "op": "relpos_attention", "pass": "fwd", "backend": "triton",
                         "launches": 1, "estimate_us": 80.0, "floor_us": 17.9, "ratio": 4.47, "bound": "issue",
                         "warnings": []}]}  # fmt: skip
    text = render(result)
    assert text.startswith("estimate (compiler-based, not measured)")
    assert "A1 relpos fwd" in text and "4.47" in text
    assert textwrap.dedent(text) == text


def test_head_mixing_workloads_estimate_both_passes():
    """5-16-head mixing (M2: DeepViT-S's 12 heads) has a Triton forward and backward
    (head_mixing_tc.py): the estimate records both passes, as for the other workloads."""
    pytest.importorskip("triton")
    from vitkernels.estimate.run import PASSES, _triton_passes
    from vitkernels.workloads import WORKLOADS

    assert _triton_passes(WORKLOADS["M2"], PASSES) == PASSES
    assert _triton_passes(WORKLOADS["M2"], ("bwd",)) == ("bwd",)
    assert _triton_passes(WORKLOADS["M1"], PASSES) == PASSES
    assert _triton_passes(WORKLOADS["A1"], ("bwd",)) == ("bwd",)
