"""head_mixing_attention's gradients through each backward configuration (the
tile, warp and register-limit choices per head count, arch and triton version)
against the float64 reference, in the interpreter; shared inputs and checks in
_head_mixing_common.py, the forward and the op's interface in test_head_mixing.py."""

from __future__ import annotations

import pytest
import torch
from _head_mixing_common import (
    BACKENDS,
    CASES,
    GRAD_CASES,
    GRAD_TOL,
    TOL,
    check_grads,
    make,
    make_params,
    poisoned_fixture,  # noqa: F401 (the fixture "poisoned")
    ref64,
    tk,
)
from _numerics import assert_close

import vitkernels


@pytest.mark.parametrize("case", list(GRAD_CASES), ids=list(GRAD_CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_float32(backend, case, poisoned):
    kind = GRAD_CASES[case]
    q, k, v = make(CASES[case])
    params = make_params(CASES[case][1], kind)
    check_grads(backend, q, k, v, params, GRAD_TOL[torch.float32], f"{case} {kind}")


@pytest.mark.parametrize("case", ["H1 N49 D32", "H2 N17 Dk24 Dv40", "H4 N49 D64"])
def test_float32_tiles(case, poisoned, monkeypatch):
    """float32 on a GPU takes configs of its own (``_float32_tiles``, ``_bwd_cfg_f32``);
    the interpreter's float32 tests run the 16-bit ones instead. These run float32's
    (forward and gradients) against float64."""
    monkeypatch.setattr(tk, "_F32_TILES_ON_CPU", True)
    ran = []
    real = tk.launch
    monkeypatch.setattr(tk, "launch", lambda spec: (ran.append(spec), real(spec)))
    kind = GRAD_CASES[case]
    q, k, v = make(CASES[case])
    check_grads("triton", q, k, v, make_params(CASES[case][1], kind), GRAD_TOL[torch.float32], f"{case} {kind}")
    dkdv = [la.maxnreg for la in ran if la.name.startswith("head_mixing_bwd_dkdv[")]
    assert dkdv and all(m is None for m in dkdv)  # 17-49 rows: ptxas's own choice
    fwd = next(la for la in ran if la.name.startswith("head_mixing_fwd["))
    assert fwd.num_warps == 8 and fwd.constexprs["BLOCK_M"] == 16  # 16-bit inputs: 4 warps, 64 rows


@pytest.mark.parametrize("triton36", [True, False], ids=["triton 3.6", "triton 3.9"])
def test_float32_tiles_of_triton36(triton36, poisoned, monkeypatch):
    """float32's tiles with triton 3.6 (the GPU machine's): the forward's second pass on
    16-key tiles on 4 warps with a register limit of 255 and q.k's K in one chunk, the
    delta launch with K and Dv in two chunks (48 as 32 + 16); triton 3.9 keeps 32 keys
    on 8 warps and ptxas's own limit, with q.k's K in two chunks in the forward and one
    in the delta launch (each spilled on the other). Either way the delta launch takes
    two stages and sums delta across the lanes after its loop, and the dq launch two
    stages. Talking heads at 4
    heads of 48 on 20 queries and 37 keys (a masked key tile either way); the launches
    are spied on, forward and gradients against float64."""
    monkeypatch.setattr(tk, "_F32_TILES_ON_CPU", True)
    monkeypatch.setattr(tk, "_TRITON_36", triton36)
    ran = []
    real = tk.launch
    monkeypatch.setattr(tk, "launch", lambda spec: (ran.append(spec), real(spec)))
    q, k, v = make((1, 4, 20, 37, 48, 48))
    params = make_params(4, "vit-pytorch talking heads")
    check_grads("triton", q, k, v, params, GRAD_TOL[torch.float32], f"float32 tiles, triton 3.6 {triton36}")
    dkdv = [la.maxnreg for la in ran if la.name.startswith("head_mixing_bwd_dkdv[")]
    assert dkdv == [None, None]  # 20 rows: ptxas's own choice (1-16 rows: 255 with triton 3.6, below)
    fwd = next(la for la in ran if la.name.startswith("head_mixing_fwd["))
    delta_launch = next(la for la in ran if la.name.startswith("head_mixing_bwd_delta["))
    delta = delta_launch.constexprs
    assert (fwd.constexprs["BLOCK_N"], fwd.num_warps, fwd.maxnreg) == ((16, 4, 255) if triton36 else (32, 8, None))
    assert (fwd.constexprs["KA"], fwd.constexprs["KB"]) == ((64, 0) if triton36 else (32, 16))
    want = (32, 16, 32, 16) if triton36 else (64, 0, 64, 0)
    assert tuple(delta[n] for n in ("KA", "KB", "VA", "VB")) == want
    # either: two stages, and delta's sums across the lanes after the loop
    assert (delta_launch.num_stages, delta["DEFER_ROWSUM"]) == (2, True)
    dq = next(la for la in ran if la.name.startswith("head_mixing_bwd_dq["))
    assert dq.num_stages == 2
    # but triton 3.6's delta launch at 3 heads: one stage, the sums each tile
    flags = tk._flags(1, 1, None, None, None, False)
    for heads in (1, 2, 3, 4):
        (d3, q3), _ = tk._bwd_cfg(heads, 7, 197, 48, 48, flags, 90, True)
        one = triton36 and heads == 3
        assert (d3.num_stages, d3.constexprs["DEFER_ROWSUM"], q3.num_stages) == ((1, False, 2) if one else (2, True, 2))


def test_float32_few_row_dkdv_of_triton36_takes_a_register_limit(monkeypatch):
    """float32's dk/dv launches for 1-16 rows at heads of 32-48 with triton 3.6: a limit
    of 255 (ptxas capped them at 128 and spilled); many rows, heads of 64 (where the
    limit made them spill), and triton 3.9 keep ptxas's own."""
    flags = tk._flags(1, 1, None, None, None, False)
    for t36 in (True, False):
        monkeypatch.setattr(tk, "_TRITON_36", t36)
        for nq, d, want in ((1, 32, 255), (7, 48, 255), (16, 32, 255), (7, 64, None), (17, 32, None),
                            (196, 48, None)):  # fmt: skip
            got = {c.maxnreg for c in tk._bwd_cfg(4, nq, 197, d, d, flags, 90, True)[1]}
            assert got == {want if t36 else None}, (t36, nq, d, got)


@pytest.mark.parametrize(("kind", "d", "want"), [
    ("re-attention", 64, [(4, 1), (8, 2)]), ("norm", 64, [(8, 2), (8, 2)]), ("re-attention", 56, [(8, 1), (8, 2)]),
    ("re-attention", 48, [(8, 1), (8, 1)]),
])  # fmt: skip
def test_float32_head_norm_dkdv_at_4_wide_heads(poisoned, monkeypatch, kind, d, want):
    """float32's dk/dv launches (two heads each) with the head norm at 4 heads of 49-64:
    the second on two stages, and at 57-64 the first on 4 warps with the post-mix (two
    stages with the norm alone); each spilled 8-20 B on 8 warps and one stage (sm_90a,
    triton 3.9: M2-H4). Heads of 48 keep 8 warps and one stage. The launches are spied
    on, gradients against float64 (the launch options do not change the interpreter's
    math: the check is that these launches run and write every gradient)."""
    monkeypatch.setattr(tk, "_F32_TILES_ON_CPU", True)
    ran = []
    real = tk.launch
    monkeypatch.setattr(tk, "launch", lambda spec: (ran.append(spec), real(spec)))
    q, k, v = make((1, 4, 20, 21, d, d))
    params = make_params(4, kind)
    check_grads("triton", q, k, v, params, GRAD_TOL[torch.float32], f"float32 {kind} D{d}")
    dkdv = [la for la in ran if la.name.startswith("head_mixing_bwd_dkdv[")]
    assert [(la.num_warps, la.num_stages) for la in dkdv] == want
    assert [la.constexprs["G0"] for la in dkdv] == [0, 2]


def test_few_row_forward_takes_one_warpgroup(poisoned, monkeypatch):
    """A few query rows (class attention) on 4 warps with 16-bit inputs (8 issued about
    as many instructions a warp: bench/NOTES.md); 8 for float32's tiles and, with
    triton 3.6, with the post-mix bias or the pre-mix alone (4 spilled). So does the backward's delta launch
    (sm_90 and sm_80). The forward launch that runs is spied on and its output checked
    against float64 (the few-row gradients: test_gradients_float32's Nq1 case)."""
    ca = tk._flags(object(), object(), None, None, None, False)
    timm = tk._flags(object(), object(), object(), None, None, False)
    assert [tk._bwd_cfg(4, 1, 197, 48, 48, ca, arch)[0][0].num_warps for arch in (80, 90)] == [4, 4]
    assert tk._fwd_cfg(4, 1, 197, 48, 48, ca).num_warps == 4
    assert tk._fwd_cfg(4, 1, 197, 48, 48, ca, True).num_warps == 8
    pre = tk._flags(object(), None, None, None, None, False)
    monkeypatch.setattr(tk, "_TRITON_36", True)
    assert (tk._fwd_cfg(4, 1, 197, 64, 64, ca).num_warps, tk._fwd_cfg(4, 1, 197, 64, 64, timm).num_warps) == (4, 8)
    assert tk._fwd_cfg(4, 7, 197, 64, 64, pre).num_warps == 8  # the pre-mix alone: 4 spilled 24 B
    monkeypatch.setattr(tk, "_TRITON_36", False)
    assert tk._fwd_cfg(4, 1, 197, 64, 64, timm).num_warps == tk._fwd_cfg(4, 7, 197, 64, 64, pre).num_warps == 4
    ran = []
    real = tk.launch
    monkeypatch.setattr(tk, "launch", lambda spec: (ran.append(spec), real(spec)))
    q, k, v = make((2, 2, 1, 40, 32, 32), torch.float16)
    params = make_params(2, "vit-pytorch talking heads", torch.float16)
    out = vitkernels.head_mixing_attention(q, k, v, **params, backend="triton")
    assert [(la.constexprs["BLOCK_M"], la.num_warps) for la in ran] == [(16, 4)]
    assert_close(out, ref64(q, k, v, params)[0], TOL[torch.float16], "few-row forward")


@pytest.mark.parametrize("case, kind", [("rect Nq20 Nk49 Dk32 Dv48", "all"), ("H2 Nq1 Nk197", "vit-pytorch talking heads"),
                                        ("H4 N49 D64", "pre")])  # fmt: skip
def test_gradients_with_the_sm80_configs(case, kind, monkeypatch, poisoned):
    """The launches an sm_80 GPU gets (16-row blocks; the delta launch sums dP and dA
    over the rows, where sm_90 takes tensor-core products): the interpreter otherwise
    runs sm_90's. Without the post-mix, dk/dv on 16 queries (64 spilled)."""
    monkeypatch.setattr(tk, "target_arch", lambda device: 80)
    pre, post, norm = kind in ("all", "pre", "vit-pytorch talking heads"), kind != "pre", kind == "all"
    flags = tk._flags(*(object() if pre else None, object() if post else None, None, None, None), norm)
    (delta, _), dkdv = tk._bwd_cfg(*CASES[case][1:], flags, 80)
    assert not delta.constexprs["PAIR_DOT"]
    # q's addresses formed in the delta launch's loops at 3 heads (8 B spilled without)
    assert delta.constexprs["LIVE_QH"] == (CASES[case][1] == 3) or tk._TRITON_36
    assert kind != "pre" or [c.constexprs["BLOCK_M"] for c in dkdv] == [16]
    q, k, v = make(CASES[case])
    params = make_params(CASES[case][1], kind)
    check_grads("triton", q, k, v, params, GRAD_TOL[torch.float32], f"{case} {kind} sm_80")


def test_gradients_with_the_64_query_dkdv_and_64_key_dq_tiles(poisoned, monkeypatch):
    """CaiT's talking heads (M1's launches): dk/dv on 16 keys x 64 queries, dq on 32
    queries x 64 keys on two stages, q.k and dO.v over K in two chunks (Dk 48 =
    32 + 16, Dv 40 = 32 + 16 of which 8 masked); the padded queries (70 = 64 + 6 for
    dk/dv, 3 x 32 - 26 for dq) and keys (21 of 64) left out of the tile chain's mask
    (dq: the keys' -inf logit bias instead). The launches that run are spied on."""
    case = (1, 4, 70, 21, 48, 40)
    flags = tk._flags(object(), object(), None, None, None, False)
    (delta, dq), (dkdv,) = tk._bwd_cfg(*case[1:], flags, 90)
    # the delta launch: 64 rows on one warpgroup, q's addresses formed in its loops
    # (LIVE_QH); with timm's post-mix bias too on triton 3.9 (3.6: 8 warps)
    assert delta.constexprs["LIVE_QH"] and delta.constexprs["DEFER_ROWSUM"] and delta.num_warps == 4
    timm = tk._flags(object(), object(), object(), None, None, False)
    assert tk._bwd_cfg(4, 196, 196, 48, 48, timm, 90)[0][0].num_warps == (8 if tk._TRITON_36 else 4)
    split = (32, 16, 32, 16)
    c = dkdv.constexprs
    # one stage at Dv 40 (two spilled), two at M1's D48
    assert (c["BLOCK_M"], c["BLOCK_N"], c["KA"], c["KB"], c["VA"], c["VB"], dkdv.num_stages) == (64, 16, *split, 1)
    assert tk._bwd_cfg(4, 196, 196, 48, 48, flags, 90)[1][0].num_stages == 2
    c = dq.constexprs
    assert (c["BLOCK_M"], c["BLOCK_N"], c["KA"], c["KB"], c["VA"], c["VB"], dq.num_stages) == (32, 64, *split, 2)
    seen = {}
    real = tk.launch

    def spy(spec):
        kind = spec.name.split("[")[0]
        c = spec.constexprs
        seen[kind] = (c.get("BLOCK_M"), c.get("BLOCK_N"), spec.num_warps, spec.num_stages)
        real(spec)

    monkeypatch.setattr(tk, "launch", spy)
    q, k, v = make(case)
    params = make_params(4, "vit-pytorch talking heads")
    check_grads("triton", q, k, v, params, GRAD_TOL[torch.float32], "64-query dk/dv")
    assert seen["head_mixing_bwd_dq"] == (32, 64, 8, 2)
    assert seen["head_mixing_bwd_delta"] == (64, 16, delta.num_warps, 1)
    assert seen["head_mixing_bwd_dkdv"] == (64, 16, 8, 1)


@pytest.mark.parametrize("h, nq, d, tiles", [(4, 70, 48, [(64, 16, 0, 4)]), (4, 70, 40, [(16, 16, 0, 2), (16, 16, 2, 2)]),
                                              (4, 7, 48, [(16, 16, 0, 2), (16, 16, 2, 2)]),
                                              (4, 7, 32, [(16, 16, 0, 2), (16, 16, 2, 2)]),
                                              (3, 70, 32, [(16, 16, 0, 4)]), (3, 49, 64, [(16, 16, 0, 4)]),
                                              (3, 70, 48, [(64, 16, 0, 4)])],
                         ids=["D48 every head", "D40 two heads a launch", "Nq7 D48 two heads a launch",
                              "Nq7 D32 two heads a launch", "H3 D32 every head", "H3 Nq49 D64 every head",
                              "H3 D48 every head"])  # fmt: skip
def test_gradients_of_timm_talking_heads_through_its_dkdv_launches(h, nq, d, tiles, poisoned, monkeypatch):
    """timm's TalkingHeadAttn (post-mix bias): at heads of 48 (CaiT-XXS) dk/dv of every
    head in one launch on 16 keys x 64 queries, as without the bias; at other head dims,
    and for a few queries (16 keys x 16), two heads a launch (every head there spilled);
    at 3 heads every head in one launch, on 16 x 16 where two took it (two a launch
    spilled at heads of 32 and 64, and every head on 32 queries at 32).
    70 queries: a whole block of 64 and a padded one; 21 keys: a padded key block. The
    launches are spied on."""
    case = (1, h, nq, 21, d, d)
    seen = []
    real = tk.launch

    def spy(spec):
        if spec.name.startswith("head_mixing_bwd_dkdv"):
            c = spec.constexprs
            seen.append((c["BLOCK_M"], c["BLOCK_N"], c["G0"], c["GP"]))
        real(spec)

    monkeypatch.setattr(tk, "launch", spy)
    q, k, v = make(case, view="timm")
    params = make_params(h, "timm talking heads")
    check_grads("triton", q, k, v, params, GRAD_TOL[torch.float32], f"timm D{d}")
    assert seen == tiles


@pytest.mark.parametrize("kind, h, nq, d, arch, tiles", [
    ("vit-pytorch talking heads", 4, 1, 48, 90, [(16, 32, 0, 4, 4)]),
    ("vit-pytorch talking heads", 4, 7, 48, 90, [(16, 16, 0, 4, 8)]),
    ("vit-pytorch talking heads", 4, 16, 64, 90, [(16, 16, 0, 2, 8), (16, 16, 2, 2, 8)]),
    ("vit-pytorch talking heads", 3, 7, 64, 90, [(16, 16, 0, 4, 8)]),
    ("timm talking heads", 3, 16, 32, 90, [(16, 16, 0, 4, 8)]),
    ("pre", 4, 7, 64, 90, [(16, 16, 0, 4, 8)]),
    ("vit-pytorch talking heads", 4, 7, 48, 80, [(16, 16, 0, 4, 8)]),
    ("vit-pytorch talking heads", 3, 7, 48, 80, [(16, 16, 0, 4, 8)]),
], ids=["Nq1 D48", "Nq7 D48", "Nq16 D64 two heads a launch", "H3 Nq7 D64", "timm H3 Nq16 D32", "Nq7 D64 pre-mix",
        "Nq7 D48 sm_80", "H3 Nq7 D48 sm_80"])
def test_gradients_of_a_few_queries_through_their_dkdv_launches(kind, h, nq, d, arch, tiles, poisoned, monkeypatch):
    """2-16 query rows: dk/dv on 16 keys x 16 queries on 8 warps, two heads a launch with
    both mixings at 4 heads over 48 and with timm's post-mix bias, every head at 3, and
    on sm_80 the delta and dq launches on 8 warps (the delta of talking heads at 4 heads
    on 4), the delta launch with q's addresses formed in its loops (LIVE_QH), and on sm_90
    not deferring its row sums with the post-mix bias (DEFER_ROWSUM); one query row's
    configurations (Triton's NQ = 1 constant) spilled there (dk/dv's 32 x 16 on 4 warps
    12-188 B). One query row keeps 32 x 16 on 4. 21 keys: a padded key block.
    The launches are spied on; every gradient against float64."""
    monkeypatch.setattr(tk, "target_arch", lambda device: arch)
    case = (1, h, nq, 21, d, d)
    seen, warps = [], {}
    real = tk.launch

    def spy(spec):
        c = spec.constexprs
        if spec.name.startswith("head_mixing_bwd_dkdv"):
            seen.append((c["BLOCK_M"], c["BLOCK_N"], c["G0"], c["GP"], spec.num_warps))
        elif spec.name.startswith(("head_mixing_bwd_delta", "head_mixing_bwd_dq")):
            warps[spec.name.split("[")[0]] = (spec.num_warps, c["LIVE_QH"], c["DEFER_ROWSUM"])
        real(spec)

    monkeypatch.setattr(tk, "launch", spy)
    q, k, v = make(case)
    params = make_params(h, kind)
    check_grads("triton", q, k, v, params, GRAD_TOL[torch.float32], f"{kind} H{h} Nq{nq} D{d} sm_{arch}")
    assert seen == tiles
    some80 = arch < 90 and nq > 1  # sm_80, 2-16 rows: 8 warps, and the delta launch's q addresses in its loops
    w = 8 if some80 else 4
    w_delta = 4 if some80 and h == 4 and kind == "vit-pytorch talking heads" else w  # 8 spilled there
    # sm_90's few-row delta sums across the lanes after its loop, not with 2-16 rows and the bias (spilled)
    defer = arch >= 90 and not (nq > 1 and kind.startswith("timm"))
    assert warps == {"head_mixing_bwd_delta": (w_delta, some80, defer), "head_mixing_bwd_dq": (w, False, False)}


def _spy_bwd(monkeypatch, names: tuple[str, ...], what) -> dict:
    """Spy on the backward's launches named (delta, dq, dkdv, ...): {name: what(spec)},
    filled as they launch (a name launched twice keeps its last)."""
    seen = {}
    real = tk.launch

    def spy(spec):
        name = spec.name.split("[")[0].removeprefix("head_mixing_bwd_")
        if name in names:
            seen[name] = what(spec)
        real(spec)

    monkeypatch.setattr(tk, "launch", spy)
    return seen


def _spy_delta_dq(monkeypatch) -> dict:
    """Spy on the backward's delta and dq launches: {"delta" / "dq": (BLOCK_M, BLOCK_N,
    stages, LIVE_GH, ONE_QB, NUM_QB, warps)}, filled as they launch."""

    def what(spec):
        c = spec.constexprs
        num_qb = spec.args[spec.kernel.arg_names.index("NUM_QB")]
        return c["BLOCK_M"], c["BLOCK_N"], spec.num_stages, c["LIVE_GH"], c["ONE_QB"], num_qb, spec.num_warps

    return _spy_bwd(monkeypatch, ("delta", "dq"), what)


@pytest.mark.parametrize("kind, h, d, want", [
    ("vit-pytorch talking heads", 4, 48, {"delta": (64, 16, 1, False, False, 1, 4), "dq": (32, 64, 2, False, False, 2, 8)}),
    ("pre", 4, 48, {"delta": (64, 16, 1, True, False, 1, 4), "dq": (16, 16, 1, False, False, 4, 8)}),
    ("post", 4, 64, {"delta": (64, 16, 1, False, False, 1, 4), "dq": (16, 16, 1, False, False, 4, 8)}),
    ("timm post", 4, 48, {"delta": (64, 16, 1, False, False, 1, 4), "dq": (16, 16, 1, False, False, 4, 8)}),
    ("vit-pytorch talking heads", 4, 64, {"delta": (16, 32, 1, False, True, 1, 4), "dq": (16, 16, 1, False, True, 1, 4)}),
    ("pre", 3, 64, {"delta": (64, 16, 1, True, False, 1, 4), "dq": (32, 64, 2, False, False, 2, 8)}),
    ("plain", 3, 32, {"delta": (64, 16, 1, False, False, 1, 4), "dq": (16, 32, 1, False, False, 4, 8)}),
    ("norm", 4, 48, {"delta": (64, 16, 1, False, False, 1, 8), "dq": (16, 16, 1, False, False, 4, 8)}),
    ("re-attention", 4, 48, {"delta": (64, 16, 1, False, False, 1, 8), "dq": (64, 16, 1, False, False, 1, 8)}),
    ("plain", 4, 48, {"delta": (16, 32, 1, False, True, 1, 4), "dq": (16, 16, 1, False, True, 1, 8)}),
], ids=["talking heads Nq49 D48", "pre-mix Nq49 D48", "post-mix Nq49 D64", "timm post-mix Nq49 D48",
        "talking heads Nq7 D64", "pre-mix H3 Nq49 D64", "no mixing H3 Nq49 D32", "head norm alone Nq49 D48",
        "re-attention Nq49 D48", "no mixing Nq7 D48"])  # fmt: skip
def test_gradients_of_one_query_block_and_of_one_mixing(kind, h, d, want, poisoned, monkeypatch):
    """Where every query row fits one block (Nq 49 on 64-row blocks, Nq 7 on 16), NUM_QB
    is 1 but never specialised (Triton's NUM_QB == 1 code spilled in the 64-row delta
    launch); ONE_QB lets the 16-row launches know it (without, their dq spilled). With
    one mixing (pre or post alone) at 4 heads of 48-64 the dq launch takes 16 x 16 with
    q and dO reloaded (32 x 64 on two stages spilled, 16 x 64 with triton 3.6; at 3
    heads 32 x 64 stays: 16 x 64 spilled there) and the pre-mix-only
    delta launch LIVE_GH; without any mixing at heads of 32 16 x 32; the head norm
    without the post-mix at 4 heads of 48-64 16 x 16 (re-attention keeps 64 x 16); a few
    rows without any mixing on 8 warps. The
    launches are spied on (BLOCK_M, BLOCK_N, stages, LIVE_GH, ONE_QB, NUM_QB, warps); every
    gradient against float64, in poisoned buffers; 21 keys: a padded key block."""
    nq = 7 if want["delta"][0] == 16 else 49
    case = (1, h, nq, 21, d, d)
    seen = _spy_delta_dq(monkeypatch)
    q, k, v = make(case)
    if kind in ("post", "timm post"):
        params = {"post": make_params(h, "timm talking heads" if kind == "timm post" else "vit-pytorch talking heads")["post"]}
    else:
        params = make_params(h, kind)
    check_grads("triton", q, k, v, params, GRAD_TOL[torch.float32], f"{kind} H{h} Nq{nq} D{d}")
    assert seen == want


@pytest.mark.parametrize("kind, want", [
    ("re-attention", {"delta": (64, 16, 1, False, False, 1, 8), "dq": (64, 16, 1, False, False, 1, 8)}),
    ("norm", {"delta": (16, 32, 1, False, True, 1, 4), "dq": (16, 16, 1, False, True, 1, 4)}),
])  # fmt: skip
def test_gradients_of_a_few_rows_of_re_attention(kind, want, poisoned, monkeypatch):
    """Re-attention over 2-16 rows (7 tokens) on sm_90 takes the many-row delta and dq
    launches (64-row blocks, 8 warps): the few-row ones spilled there (delta 8-60 B, dq
    4 B). The head norm alone keeps the few-row launches (its 16 x 16 dq spilled as a
    many-row launch). Spied on as below; every gradient against float64, in poisoned
    buffers."""
    case = (1, 4, 7, 7, 64, 64)
    seen = _spy_delta_dq(monkeypatch)
    q, k, v = make(case)
    check_grads("triton", q, k, v, make_params(4, kind), GRAD_TOL[torch.float32], f"{kind} N7 D64")
    assert seen == want


@pytest.mark.parametrize("kind, h, nq, d, want", [
    ("re-attention", 4, 1, 64, {"delta": (8, 64, 0), "dq": (8, 64, 0), "dkdv": (8, 64, 0)}),
    ("all three", 4, 1, 64, {"delta": (8, 64, 0), "dq": (4, 32, 32), "dkdv": (8, 64, 0)}),
    ("all three", 4, 1, 56, {"delta": (8, 64, 0), "dq": (8, 64, 0), "dkdv": (8, 32, 32)}),
    ("pre and norm", 4, 7, 48, {"delta": (8, 64, 0), "dq": (8, 64, 0), "dkdv": (8, 32, 16)}),
    ("pre and norm", 3, 1, 64, {"delta": (8, 64, 0), "dq": (4, 64, 0), "dkdv": (4, 64, 0)}),
    ("norm", 4, 1, 64, {"delta": (4, 64, 0), "dq": (4, 64, 0), "dkdv": (4, 64, 0)}),
    ("norm", 4, 1, 56, {"delta": (4, 64, 0), "dq": (4, 64, 0), "dkdv": (8, 32, 32)}),
    ("all three", 4, 7, 56, {"delta": (8, 64, 0), "dq": (8, 64, 0), "dkdv": (4, 32, 32)}),
    ("all three", 4, 7, 64, {"delta": (8, 64, 0), "dq": (8, 64, 0), "dkdv": (8, 64, 0)}),
], ids=["re-attention H4 Nq1 D64", "all three H4 Nq1 D64", "all three H4 Nq1 D56", "pre-mix and norm H4 Nq7 D48",
        "pre-mix and norm H3 Nq1 D64", "norm alone H4 Nq1 D64", "norm alone H4 Nq1 D56", "all three H4 Nq7 D56",
        "all three H4 Nq7 D64"])  # fmt: skip
def test_gradients_of_a_few_rows_with_the_head_norm(kind, h, nq, d, want, poisoned, monkeypatch):
    """The 1-4-head backward on a few query rows (one: a class token's; 7) with the head
    norm and a mixing, on sm_90 (bench/NOTES.md, 2026-12-04: a compile sweep found them
    spilling 8-52 B on 4 warps): the delta and dq launches on 8 warps, but the pre-mix
    and the norm at 3 heads (8 spilled there); at one query and 4 heads of 64 with all
    three, the dq launch's q.k and dO.v over K in two chunks of 32 on 4 warps; at one
    query and 4 heads with the post-mix, dk/dv on 8 warps. The norm alone keeps 4. At
    4 heads of 49-63 (K as 32 + 32; 2026-12-04 second session) the norm alone's one-query
    dk/dv takes 8 warps and all three's on 2-16 rows 4 (heads of 64 keep 8). The
    launches are spied on ((warps, KA, KB) of each); every gradient against float64, in
    poisoned buffers; 21 keys: a padded key block."""
    case = (1, h, nq, 21, d, d)
    seen = _spy_bwd(monkeypatch, ("delta", "dq", "dkdv"),
                    lambda spec: (spec.num_warps, spec.constexprs["KA"], spec.constexprs["KB"]))
    q, k, v = make(case)
    norm = make_params(h, "re-attention")["head_norm"]
    params = {"re-attention": lambda: make_params(h, kind),
              "all three": lambda: dict(make_params(h, "vit-pytorch talking heads"), head_norm=norm),
              "pre and norm": lambda: dict(make_params(h, "pre"), head_norm=norm),
              "norm": lambda: make_params(h, "norm")}[kind]()
    check_grads("triton", q, k, v, params, GRAD_TOL[torch.float32], f"{kind} H{h} Nq{nq} D{d}")
    assert seen == want


def _norm_kind_params(h: int, kind: str, dtype: torch.dtype = torch.float32) -> dict:
    """The parameters of the head-norm kinds the few-row tests name."""
    norm = make_params(h, "re-attention", dtype)["head_norm"]
    return {"re-attention": lambda: make_params(h, kind, dtype),
            "all three": lambda: dict(make_params(h, "vit-pytorch talking heads", dtype), head_norm=norm),
            "pre and norm": lambda: dict(make_params(h, "pre", dtype), head_norm=norm)}[kind]()


@pytest.mark.parametrize("kind, h, nq, d, want", [
    ("all three", 4, 1, 64, {"delta": (4, True), "dq": (8, False)}),
    ("all three", 4, 7, 48, {"delta": (4, True), "dq": (8, False)}),
    ("all three", 2, 1, 32, {"delta": (4, True), "dq": (4, False)}),
    ("pre and norm", 4, 1, 64, {"delta": (4, False), "dq": (8, False)}),
    ("pre and norm", 3, 1, 64, {"delta": (4, False), "dq": (4, False)}),
    ("re-attention", 4, 1, 64, {"delta": (4, False), "dq": (4, False)}),
], ids=["all three H4 Nq1 D64", "all three H4 Nq7 D48", "all three H2 Nq1 D32", "pre-mix and norm H4 Nq1 D64",
        "pre-mix and norm H3 Nq1 D64", "re-attention H4 Nq1 D64"])  # fmt: skip
def test_gradients_of_a_few_rows_with_the_head_norm_on_sm80(kind, h, nq, d, want, poisoned, monkeypatch):
    """sm_80, the 1-4-head backward on a few query rows with the head norm (bench/NOTES.md,
    2026-12-04 second session: 4 warps spilled 8-28 B): with all three (pre-mix, post-mix,
    norm) the delta launch defers its row sums (DEFER_ROWSUM) on 4 warps; at one query the
    pre-mix with the norm at 4 heads takes the dq launch on 8 warps (and 2-16 rows take 8
    there already). Re-attention, and 3 heads, keep 4 and no deferral. The launches are
    spied on ((warps, DEFER_ROWSUM) of each); every gradient against float64, in poisoned
    buffers; 21 keys: a padded key block."""
    monkeypatch.setattr(tk, "target_arch", lambda device: 80)
    case = (1, h, nq, 21, d, d)
    seen = _spy_bwd(monkeypatch, ("delta", "dq"), lambda spec: (spec.num_warps, spec.constexprs["DEFER_ROWSUM"]))
    q, k, v = make(case)
    check_grads("triton", q, k, v, _norm_kind_params(h, kind), GRAD_TOL[torch.float32], f"{kind} H{h} Nq{nq} D{d} sm80",
                peer=4)  # fmt: skip
    assert seen == want


def test_sm80_all_three_defers_the_row_sums_but_not_at_one_query_on_float32_parameters():
    """sm_80, all three on a few rows: the delta launch defers its row sums, but with
    float32 parameters (16-bit inputs under autocast) not at one query, where deferring
    spilled 4 B and not deferring none (float16, heads of 48-64); on 7 rows it defers
    (4 B spilled without, heads of 64). sm_90a's rule is its own (the head norm with a
    mixing defers nowhere on float32 parameters)."""
    all3 = tk._flags(1, 1, None, 1, 1, True)
    reattn = tk._flags(None, 1, None, 1, 1, True)
    for nq, f32_params, want in ((1, False, True), (1, True, False), (7, True, True), (7, False, True)):
        for d in (48, 64):
            delta = tk._bwd_cfg(4, nq, 197, d, d, all3, 80, False, f32_params)[0][0]
            assert (delta.constexprs["DEFER_ROWSUM"], delta.num_warps) == (want, 4), (nq, f32_params, d)
            assert not tk._bwd_cfg(4, nq, 197, d, d, reattn, 80, False, f32_params)[0][0].constexprs["DEFER_ROWSUM"]


@pytest.mark.parametrize("kind, h, nq, d, env, want", [
    ("all three", 4, 7, 48, "3.9 f32p", {"delta": (16, 32, 8, False), "dq": (16, 16, 8, False)}),
    ("all three", 4, 7, 48, "3.9 f16p", {"delta": (64, 16, 8, False), "dq": (64, 16, 8, False)}),
    ("all three", 4, 1, 64, "3.9 f32p", {"delta": (16, 32, 4, False), "dq": (16, 16, 4, False)}),
    ("all three", 4, 1, 64, "3.9 f16p", {"delta": (16, 32, 8, True), "dq": (16, 16, 4, False)}),
    ("re-attention", 4, 1, 48, "3.9 f32p", {"delta": (16, 32, 8, True), "dq": (16, 16, 8, False)}),
    ("re-attention", 4, 1, 64, "3.9 f32p", {"delta": (16, 32, 8, False), "dq": (16, 16, 8, False)}),
    ("re-attention", 4, 1, 56, "3.9 f32p", {"delta": (16, 32, 8, True), "dq": (16, 16, 8, False)}),
    ("all three", 3, 1, 64, "3.9 f32p", {"delta": (16, 32, 8, False), "dq": (16, 16, 8, False)}),
    ("all three", 3, 7, 32, "3.9 f32p", {"delta": (64, 16, 8, False), "dq": (64, 16, 8, False)}),
    ("pre and norm", 3, 1, 64, "3.6 f16p", {"delta": (16, 32, 8, True), "dq": (16, 16, 4, False)}),
    ("pre and norm", 3, 7, 64, "3.6 f16p", {"delta": (16, 32, 8, True), "dq": (16, 16, 8, False)}),
], ids=["all three H4 Nq7 D48 f32p", "all three H4 Nq7 D48 f16p", "all three H4 Nq1 D64 f32p",
        "all three H4 Nq1 D64 f16p", "re-attention H4 Nq1 D48 f32p", "re-attention H4 Nq1 D64 f32p",
        "re-attention H4 Nq1 D56 f32p",
        "all three H3 Nq1 D64 f32p", "all three H3 Nq7 D32 f32p",
        "3.6 pre-mix and norm H3 Nq1 D64", "3.6 pre-mix and norm H3 Nq7 D64"])  # fmt: skip
def test_gradients_of_a_few_rows_with_the_head_norm_in_float16(kind, h, nq, d, env, want, poisoned, monkeypatch):
    """sm_90, float16 inputs on a few query rows with the head norm, float32 parameters
    (f32p: a model under autocast) or float16 (f16p); "3.6": triton 3.6's rules
    (bench/NOTES.md, 2026-12-04 second session: compile sweeps found 4-56 B spilled).
    With float32 parameters all three on 2-16 rows keep the few-row delta and dq
    launches at 4 heads (16 rows; the 64-row ones spilled), at one query the delta
    launch takes 4 warps without deferred row sums (3 heads keep the others);
    re-attention's one-query delta defers them at heads of 48 and 56, not 64. Triton
    3.6's pre-mix with the norm at 3 heads takes the dq launch on 4 warps at one query
    (8 at 7 rows). Spied on ((BLOCK_M, BLOCK_N, warps, DEFER_ROWSUM)
    of the delta and dq launches); every gradient against float64, in poisoned buffers;
    21 keys: a padded key block."""
    monkeypatch.setattr(tk, "_TRITON_36", env.startswith("3.6"))
    pdt = torch.float32 if env.endswith("f32p") else torch.float16

    def what(spec):
        c = spec.constexprs
        return c["BLOCK_M"], c["BLOCK_N"], spec.num_warps, c["DEFER_ROWSUM"]

    seen = _spy_bwd(monkeypatch, ("delta", "dq"), what)
    q, k, v = make((1, h, nq, 21, d, d), torch.float16)
    check_grads("triton", q, k, v, _norm_kind_params(h, kind, pdt), GRAD_TOL[torch.float16], f"{kind} H{h} Nq{nq} D{d} {env}")
    assert seen == want


# env: "3.9" (float32 inputs, the interpreter's), or triton 3.6's rules ("3.6": _TRITON_36
# patched) with float16 inputs and float32 ("3.6 f32p") or float16 ("3.6 f16p") parameters
@pytest.mark.parametrize("kind, arch, h, nq, d, env, want", [
    ("pre", 90, 2, 20, 64, "3.9", {"dq": 255}),
    ("post", 90, 2, 20, 64, "3.9", {"dkdv": 255}),
    ("post", 80, 2, 20, 64, "3.9", {"dkdv": 255}),
    ("timm post", 90, 2, 20, 48, "3.9", {"dq": 255}),
    ("post", 90, 1, 20, 32, "3.9", {"dkdv": 128}),
    ("vit-pytorch talking heads", 90, 2, 1, 32, "3.9", {"dkdv": 128}),
    ("plain", 90, 2, 7, 64, "3.9", {"delta": 128}),
    ("re-attention", 80, 1, 20, 48, "3.9", {"dkdv": 128}),
    ("norm", 90, 1, 7, 56, "3.9", {"dkdv": 128}),
    ("norm", 90, 1, 7, 64, "3.9", {}),
    ("re-attention", 90, 1, 7, 56, "3.6 f32p", {"dkdv": 128}),
    ("re-attention", 90, 3, 7, 64, "3.6 f32p", {"dq": 255}),
    ("affine norm", 90, 3, 1, 48, "3.6 f32p", {"delta": 255}),
    ("timm talking heads", 80, 1, 1, 32, "3.9", {"delta": 128}),
    ("vit-pytorch talking heads", 90, 2, 20, 48, "3.9", {}),
    ("pre", 90, 2, 20, 48, "3.9", {}),
    ("vit-pytorch talking heads", 90, 4, 20, 64, "3.9", {}),
    ("vit-pytorch talking heads", 90, 3, 1, 32, "3.6 f32p", {"dq": 255}),
    ("post", 90, 3, 20, 64, "3.6 f32p", {"dkdv": 255}),
    ("post", 90, 4, 1, 48, "3.6 f32p", {"dq": 255}),
    ("timm talking heads", 90, 4, 7, 48, "3.6 f32p", {"fwd": 255}),
    ("post", 90, 3, 1, 64, "3.6 f32p", {"fwd": 128}),
    ("pre", 90, 1, 7, 32, "3.6 f32p", {"dkdv": 128}),
    ("plain", 90, 3, 1, 48, "3.6 f32p", {"delta": 128}),
    ("post", 90, 4, 1, 48, "3.6 f16p", {}),
    ("vit-pytorch talking heads", 90, 3, 1, 32, "3.9 f32p", {}),
], ids=["pre-mix H2 D64", "post-mix H2 D64", "post-mix H2 D64 sm80", "timm post-mix H2 D48", "post-mix H1 D32",
        "talking heads H2 Nq1 D32", "no mixing H2 Nq7 D64", "re-attention H1 D48 sm80", "timm H1 Nq1 sm80",
        "norm alone H1 Nq7 D56", "norm alone H1 Nq7 D64: none", "3.6 re-attention H1 Nq7 D56",
        "3.6 re-attention H3 Nq7 D64", "3.6 norm alone H3 Nq1 D48",
        "talking heads H2 D48: none", "pre-mix H2 D48: none", "talking heads H4: none",
        "3.6 talking heads H3 Nq1 D32", "3.6 post-mix H3 D64", "3.6 post-mix H4 Nq1 D48", "3.6 timm H4 Nq7 D48",
        "3.6 post-mix H3 Nq1 D64", "3.6 pre-mix H1 Nq7 D32", "3.6 no mixing H3 Nq1 D48",
        "3.6 float16 parameters: none", "3.9 float32 parameters: none"])  # fmt: skip
def test_gradients_with_a_register_limit(kind, arch, h, nq, d, env, want, poisoned, monkeypatch):
    """The launches where ptxas's own register choice spilled (``_reg_limits``) take a
    limit: 255 where it capped 8 warps at 128 registers (or chose 168 on 4), 128 where
    it chose 48-96: at 1-2 heads, and with triton 3.6 (the GPU machine's) for 16-bit
    inputs with float32 parameters (autocast) at 1-4 heads. The launch passes it to
    Triton as ``maxnreg`` (the interpreter takes the same tiles and ignores it), and only
    those launches do: not their neighbours that did not spill, nor triton 3.9's or
    float16 parameters' launches where only 3.6 with float32 parameters spilled. Spied
    on; every gradient against float64, in poisoned buffers (21 keys: a padded key block)."""
    monkeypatch.setattr(tk, "target_arch", lambda device: arch)
    monkeypatch.setattr(tk, "_TRITON_36", env.startswith("3.6"))
    dtype = torch.float32 if env == "3.9" else torch.float16
    pdt = torch.float16 if env.endswith("f16p") else torch.float32
    seen = {}
    real = tk.launch

    def spy(spec):
        name = spec.name.split("[")[0].removeprefix("head_mixing_")
        opts = spec.options()
        assert opts.get("maxnreg") == spec.maxnreg  # what the kernel call is given
        if spec.maxnreg is not None:
            seen[name.removeprefix("bwd_")] = spec.maxnreg
        real(spec)

    monkeypatch.setattr(tk, "launch", spy)
    nk = 21 if kind != "re-attention" else nq
    case = (1, h, nq, nk, d, d)
    q, k, v = make(case, dtype)
    if kind in ("post", "timm post"):
        params = {"post": make_params(h, "timm talking heads" if kind == "timm post" else "vit-pytorch talking heads",
                                      pdt)["post"]}  # fmt: skip
    elif kind == "affine norm":  # the head norm alone, with its weight and bias
        params = {"head_norm": make_params(h, "re-attention", pdt)["head_norm"]}
    else:
        params = make_params(h, kind, pdt)
    check_grads("triton", q, k, v, params, GRAD_TOL[dtype], f"{kind} H{h} Nq{nq} D{d} sm{arch} {env}")
    assert seen == want


def test_triton36_float32_parameters_at_4_heads_take_8_warps(monkeypatch):
    """Triton 3.6, 16-bit inputs with float32 parameters, 2-16 rows at 4 heads of 48-64:
    the dq launch with the post-mix alone and timm's delta launch on 8 warps (4 spilled
    8-16 B at 254-255 registers, sm_90a); with float16 parameters, or triton 3.9, 4."""
    post = tk._flags(None, 1, None, None, None, False)
    timm = tk._flags(1, 1, 1, None, None, False)
    for t36, f32_params, want in ((True, True, 8), (True, False, 4), (False, True, 4)):
        monkeypatch.setattr(tk, "_TRITON_36", t36)
        for d in (48, 64):
            assert tk._bwd_cfg(4, 7, 197, d, d, post, 90, False, f32_params)[0][1].num_warps == want
            assert tk._bwd_cfg(4, 7, 197, d, d, timm, 90, False, f32_params)[0][0].num_warps == want


def test_register_limits_reach_the_recorded_compile():
    """A launch's register limit is part of what the ahead-of-time compile gets (the
    recorded specialisation's options, and its key: the same launch without it is
    another binary); the workloads' launches keep ptxas's own choice."""
    import dataclasses

    from vitkernels.triton._aot import record_workload
    from vitkernels.triton._common import specialize
    from vitkernels.workloads import EXTRA_SHAPES, WORKLOADS

    want = {"H2-pre-D64": {"dq": 255}, "H2-post-D64": {"dkdv": 255}, "H1-post-D32": {"dkdv": 128}}
    for name, limits in want.items():
        for arch in (90, 80):
            got = {}
            for la in record_workload(EXTRA_SHAPES[name], "bwd", arch=arch).launches:
                assert la.specialization.options.get("maxnreg") == la.maxnreg, la.name
                if la.maxnreg is not None:
                    got[la.name.split("[")[0].removeprefix("head_mixing_bwd_")] = la.maxnreg
                    other = specialize(dataclasses.replace(la, maxnreg=None, specialization=None), arch)
                    assert other.key() != la.specialization.key()
            # the dq rule is sm_90's (its 32 x 64 tiles): sm_80's dq takes 16 x 16
            assert got == (limits if arch == 90 or "dq" not in limits else {}), (name, arch, got)
    for wid in ("M1", "M3"):
        for direction in ("fwd", "bwd"):
            assert all(la.maxnreg is None for la in record_workload(WORKLOADS[wid].shape, direction).launches)


def test_row_runs_split_the_delta_launch_only_where_it_pays():
    """The backward's delta launch over the query rows (``_row_runs``): M1's 196 queries
    at batch 256 on 132 SMs as 3 whole 64-row blocks and a launch of 16-row blocks for
    the last 4; one launch where the rest is not 1-16 rows, the blocks are not 64 rows,
    or the batch is too small for the whole blocks to save a wave."""
    assert tk._row_runs(196, 64, 256, 132) == [(0, 192), (192, 4)]
    assert tk._row_runs(197, 64, 256, 132) == [(0, 192), (192, 5)]
    assert tk._row_runs(196, 64, 32, 132) == [(0, 196)]  # 1 wave either way
    assert tk._row_runs(196, 64, 33, 132) == [(0, 196)]  # 132 programs: still one wave
    assert tk._row_runs(196, 64, 34, 132) == [(0, 192), (192, 4)]  # 136 -> 102 programs: a wave saved
    assert tk._row_runs(230, 64, 256, 132) == [(0, 230)]  # 38 rows left: a 64-row block
    assert tk._row_runs(64, 64, 256, 132) == [(0, 64)]
    assert tk._row_runs(49, 64, 256, 132) == [(0, 49)]
    assert tk._row_runs(196, 16, 256, 132) == [(0, 196)]  # sm_80's 16-row delta launch


@pytest.mark.parametrize("kind", ["vit-pytorch talking heads", "pre", "timm talking heads", "re-attention"])
def test_gradients_with_the_delta_launch_split_over_the_rows(kind, poisoned, monkeypatch):
    """The delta launch in two (the whole 64-row blocks, then the 6 rows after them on
    the few-row configuration), as at M1's batch 256: made to split at batch 2 by
    reporting one SM. Every row's delta and each launch's rows of partial sums must be
    written (poisoned buffers) and right (the parameters' gradients sum them all). With
    the post-mix bias (timm) or the head norm one launch (the few-row one spilled)."""
    case = (2, 4, 70, 21, 48, 40)
    monkeypatch.setattr(tk, "sm_count", lambda device: 1)
    seen = []
    real = tk.launch

    def spy(spec):
        if spec.name.startswith("head_mixing_bwd_delta"):
            seen.append((spec.constexprs["BLOCK_M"], spec.constexprs["ROW0"], spec.grid))
        real(spec)

    monkeypatch.setattr(tk, "launch", spy)
    q, k, v = make(case)
    params = make_params(4, kind)
    check_grads("triton", q, k, v, params, GRAD_TOL[torch.float32], kind)
    one = kind in ("timm talking heads", "re-attention")
    assert seen == ([(64, 0, (4,))] if one else [(64, 0, (2,)), (16, 64, (2,))])


@pytest.mark.parametrize("dk, dv, nq, dq_tile, dkdv_m", [(16, 16, 20, (16, 16), 16), (32, 56, 40, (16, 64), 32)],
                         ids=["D16", "Dk32 Dv56"])
def test_gradients_with_the_small_head_dim_tiles(dk, dv, nq, dq_tile, dkdv_m, poisoned, monkeypatch):
    """Talking heads with heads of 16, 32 and 56 (beyond the AOT shapes; the 16-bit M1
    tiles spilled there): dk/dv on 16 (D16) or 32 (D17-32, and D49-63: K as 32 + 32)
    query blocks, the D16 dq on 16 x 16 tiles with q and dO reloaded (HOLD off). The
    launches that run are spied on; the second query block is partly padded."""
    flags = tk._flags(object(), object(), None, None, None, False)
    assert [tk._bwd_cfg(4, 197, 197, d, d, flags, 90)[1][0].constexprs["BLOCK_M"] for d in (40, 48, 56, 64)] == [
        64, 64, 32, 64]
    seen = {}
    real = tk.launch

    def spy(spec):
        c = spec.constexprs
        seen[spec.name.split("[")[0]] = (c.get("BLOCK_M"), c.get("BLOCK_N"), c.get("HOLD"))
        real(spec)

    monkeypatch.setattr(tk, "launch", spy)
    q, k, v = make((1, 2, nq, 21, dk, dv))
    check_grads("triton", q, k, v, make_params(2, "vit-pytorch talking heads"), GRAD_TOL[torch.float32], f"D{dk}")
    assert seen["head_mixing_bwd_dq"] == (*dq_tile, dk > 16)
    assert seen["head_mixing_bwd_dkdv"] == (dkdv_m, 16, None)


def test_triton36_talking_heads_d64_tiles(poisoned, monkeypatch):
    """Triton 3.6's configs for heads of 64: the 64-row forward takes q.k and the output
    in two chunks of 32 (one of 64 spilled 4-8 B; re-attention's M2-H4 too), without the
    peeled key loop; on sm_80 talking heads' dk/dv take 32-query blocks (64 spilled 52
    B) and the few-row dq 8 warps (4 spilled 16 B at M3). The forward launch that runs
    is spied on and checked against float64."""
    monkeypatch.setattr(tk, "_TRITON_36", True)
    flags = tk._flags(object(), object(), None, None, None, False)
    reattn = tk._flags(None, object(), None, object(), object(), True)
    assert tk._fwd_cfg(4, 197, 197, 64, 64, reattn).constexprs["KB"] == 32
    assert [tk._bwd_cfg(4, 1, 197, 48, 48, flags, a)[0][1].num_warps for a in (80, 90)] == [8, 4]
    assert [tk._bwd_cfg(4, 197, 197, 64, 64, flags, a)[1][0].constexprs["BLOCK_M"] for a in (80, 90)] == [32, 64]
    ran = []
    real = tk.launch
    monkeypatch.setattr(tk, "launch", lambda spec: (ran.append(spec), real(spec)))
    q, k, v = make((1, 2, 20, 21, 64, 64))
    params = make_params(2, "vit-pytorch talking heads")
    out = vitkernels.head_mixing_attention(q, k, v, **params, backend="triton")
    c = ran[0].constexprs
    assert (c["BLOCK_M"], c["KA"], c["KB"], c["VA"], c["VB"], c["PEEL"]) == (64, 32, 32, 32, 32, False)
    assert_close(out, ref64(q, k, v, params)[0], TOL[torch.float32], "triton 3.6 D64 forward")


@pytest.mark.parametrize("d, arch, warps", [(48, 90, 4), (56, 80, 8), (56, 90, 4)])
def test_head_norm_forward_without_the_peeled_key_loop(d, arch, warps, poisoned, monkeypatch):
    """Re-attention's 64-row forward (the head norm) without the peeled key loop at heads
    of 48-56 (Dv in two chunks; with it 8-16 B spilled on sm_90a), on 8 warps on sm_80
    at heads of 49-63 (4 spilled 4 B at 56); talking heads keep it. 20 queries, 21 keys:
    padded rows and a padded key block. The launch that runs is spied on and its output
    checked against float64."""
    monkeypatch.setattr(tk, "target_arch", lambda device: arch)
    talking = tk._flags(object(), object(), None, None, None, False)
    assert tk._fwd_cfg(4, 197, 197, d, d, talking, arch=arch).constexprs["PEEL"]
    ran = []
    real = tk.launch
    monkeypatch.setattr(tk, "launch", lambda spec: (ran.append(spec), real(spec)))
    q, k, v = make((2, 4, 20, 21, d, d))
    params = make_params(4, "re-attention")
    out = vitkernels.head_mixing_attention(q, k, v, **params, backend="triton")
    c = ran[0].constexprs
    assert (c["BLOCK_M"], c["PEEL"], c["VB"], ran[0].num_warps) == (64, False, {48: 16, 56: 32}[d], warps)
    assert_close(out, ref64(q, k, v, params)[0], TOL[torch.float32], f"re-attention D{d} forward sm_{arch}")


@pytest.mark.parametrize("kind, warps", [("vit-pytorch talking heads", 4), ("pre", 8)])
def test_gradients_with_triton36_delta_config(kind, warps, poisoned, monkeypatch):
    """The sm_90 delta launch triton 3.6 gets (the GPU machine's version): dO's addresses
    formed in its loops too (LIVE_GH), which the interpreter otherwise never runs; with
    the pre-mix alone on 8 warps (triton 3.6 failed to compile it on 4)."""
    monkeypatch.setattr(tk, "_TRITON_36", True)
    case = (1, 4, 20, 21, 16, 16)
    flags = tk._flags(object(), object() if kind != "pre" else None, None, None, None, False)
    delta = tk._bwd_cfg(*case[1:], flags, 90)[0][0]
    assert delta.constexprs["LIVE_GH"] and delta.constexprs["BLOCK_M"] == 64 and delta.num_warps == warps
    q, k, v = make(case)
    params = make_params(4, kind)
    check_grads("triton", q, k, v, params, GRAD_TOL[torch.float32], f"triton 3.6 delta, {kind}")


@pytest.mark.parametrize("kind, nq, d, want", [
    ("pre", 7, 64, {"dq": (16, 16, 8), "dkdv": [(16, 16, 4)]}),
    ("plain", 49, 32, {"dq": (16, 16, 8), "dkdv": [(16, 16, 4)]}),
    ("timm talking heads", 7, 32, {"dq": (16, 16, 8), "dkdv": [(16, 16, 4)]}),
    ("norm", 7, 48, {"delta": (16, 32, 8), "dq": (16, 16, 8), "dkdv": [(16, 16, 4)]}),
], ids=["pre-mix Nq7 D64", "no mixing Nq49 D32", "timm Nq7 D32", "head norm alone Nq7 D48"])  # fmt: skip
def test_gradients_with_triton36_configs_at_3_heads(kind, nq, d, want, poisoned, monkeypatch):
    """What triton 3.6 (the GPU machine's) gets at 3 heads where its compiles spilled
    (sm_90a): a few rows' dq on 8 warps (and the head norm alone's delta); dk/dv on
    16 x 16 on 4 warps; without the
    post-mix dk/dv on 16 queries; without any mixing at heads of 32 the dq launch on
    16 x 16. Spied on
    (BLOCK_M, BLOCK_N, warps); every gradient against float64, in poisoned buffers."""
    monkeypatch.setattr(tk, "_TRITON_36", True)
    seen = {"dkdv": []}
    real = tk.launch

    def spy(spec):
        c = spec.constexprs
        name = spec.name.split("[")[0].removeprefix("head_mixing_bwd_")
        if name == "dq" or (name == "delta" and kind == "norm"):
            seen[name] = (c["BLOCK_M"], c["BLOCK_N"], spec.num_warps)
        elif name == "dkdv":
            seen["dkdv"].append((c["BLOCK_M"], c["BLOCK_N"], spec.num_warps))
        real(spec)

    monkeypatch.setattr(tk, "launch", spy)
    case = (1, 3, nq, 21, d, d)
    q, k, v = make(case, view="timm" if kind.startswith("timm") else "contiguous")
    check_grads("triton", q, k, v, make_params(3, kind), GRAD_TOL[torch.float32], f"triton 3.6 {kind} Nq{nq} D{d}")
    assert seen == want


