"""head_mixing_attention with many heads (the kernels that keep the heads in
chunks, the padded copies of unaligned k and v, the head norm at eps 0) against the
float64 reference, in the interpreter; shared inputs and checks in
_head_mixing_common.py."""

from __future__ import annotations

import pytest
import torch
from _head_mixing_common import (
    GRAD_TOL,
    TOL,
    _inputs,
    _leaves,
    _map_params,
    check_grads,
    make,
    make_params,
    poisoned_fixture,  # noqa: F401 (the fixture "poisoned")
    ref64,
    tk,
)
from _numerics import assert_close

import vitkernels
from vitkernels.ops import head_mixing as ops

MANY_HEADS = {
    "H5 N1 D32 pre": ((2, 5, 1, 1, 32, 32), "pre", "contiguous"),
    "H8 N49 D48 timm": ((1, 8, 49, 49, 48, 48), "timm talking heads", "timm"),
    "H12 N49 D64 vit-pytorch": ((1, 12, 49, 49, 64, 64), "vit-pytorch talking heads", "vit-pytorch"),
    # Nk197 with two query blocks (Nq = Nk = 197 takes ~10 s in the interpreter)
    "H16 Nq17 Nk197 D48 vit-pytorch": ((1, 16, 17, 197, 48, 48), "vit-pytorch talking heads", "vit-pytorch"),
    "H6 Nq20 Nk49 Dk32 Dv48 post": ((1, 6, 20, 49, 32, 48), "post", "contiguous"),
    "H16 Nq1 Nk197 D32 timm": ((2, 16, 1, 197, 32, 32), "timm talking heads", "timm"),
    "H7 N17 D40 plain": ((2, 7, 17, 17, 40, 40), "plain", "contiguous"),
    # the head norm (re-attention: DeepViT-S's 12 heads of 33, rows of 66 bytes; the
    # layouts of this repo's and vit-pytorch's DeepViT). Nq20 Nk197: M2's keys, two
    # query blocks (Nq = Nk = 197 takes ~10 s in the interpreter)
    "H12 Nq20 Nk197 D33 re-attention": ((1, 12, 20, 197, 33, 33), "re-attention", "vit-pytorch"),
    "H12 N49 D33 re-attention eps1e-3": ((2, 12, 49, 49, 33, 33), "re-attention eps1e-3", "vit-pytorch"),
    # the norm alone: the padded head slots (HP = 8) hold p = 1/Nk, not 0 (no post-mix)
    "H5 Nq1 Nk197 D32 norm": ((2, 5, 1, 197, 32, 32), "norm", "contiguous"),
    "H8 N49 D48 re-attention timm": ((1, 8, 49, 49, 48, 48), "re-attention", "timm"),
    # eps = 0 and no post-mix bias: a padded key's p is 0 in every head, its normed p
    # 0 * rsqrt(0) = NaN unless zeroed; pre-mix too
    "H16 Nq17 Nk50 D64 pre re-attention eps0": ((1, 16, 17, 50, 64, 64), "pre re-attention eps0", "contiguous"),
    "H6 Nq20 Nk49 D33 norm weight only": ((1, 6, 20, 49, 33, 33), "post, norm weight only", "contiguous"),
    # a whole last key block (Nk a multiple of 16: the peeled last block has no padded key)
    "H9 Nq17 Nk48 D33 pre re-attention eps0": ((1, 9, 17, 48, 33, 33), "pre re-attention eps0", "vit-pytorch"),
    # LayerNorm(elementwise_affine=False) after the post-mix, float32 parameters (autocast)
    "H12 N17 D32 post-mix non-affine norm f32 params": ((2, 12, 17, 17, 32, 32), "post, plain norm, f32",
                                                         "contiguous"),
    # no pre-mix: the row statistics from their own launch (_lse_tc_kernel: 64-key blocks
    # and a 16-key tail; Nk65 one key in the tail), D64 and D48 in one chunk and two
    "H10 Nq17 Nk65 D64 re-attention": ((1, 10, 17, 65, 64, 64), "re-attention", "contiguous"),
    "H5 Nq1 Nk1 D48 post": ((1, 5, 1, 1, 48, 48), "post", "contiguous"),
}


def _many_heads_params(H: int, kind: str) -> dict:
    if kind == "post":  # nn.Linear(H, H) on the probabilities only, bias included
        bound = H**-0.5
        w = torch.empty(H, H).uniform_(-bound, bound)
        return dict(post=(w.half(), torch.empty(H).uniform_(-bound, bound).half()))
    if kind == "re-attention eps1e-3":  # an eps that moves the output by ~10%
        p = make_params(H, "re-attention", torch.float16)
        return dict(p, head_norm=(*p["head_norm"][:2], 1e-3))
    if kind == "pre re-attention eps0":
        p = make_params(H, "re-attention", torch.float16)
        return dict(p, pre=make_params(H, "pre", torch.float16)["pre"], head_norm=(*p["head_norm"][:2], 0.0))
    if kind == "post, norm weight only":  # nn.Linear post-mix with bias, LayerNorm(bias=False)
        p = _many_heads_params(H, "post")
        return dict(p, head_norm=(make_params(H, "re-attention", torch.float16)["head_norm"][0], None, 1e-5))
    if kind == "post, plain norm, f32":
        return dict(post=(torch.randn(H, H).t(), None), head_norm=(None, None, 1e-5))
    return make_params(H, kind, torch.float16)


@pytest.mark.parametrize("case", list(MANY_HEADS), ids=list(MANY_HEADS))
def test_many_heads_forward_matches_float64_reference(case, poisoned, monkeypatch):
    from vitkernels.triton import head_mixing_tc

    monkeypatch.setattr(head_mixing_tc, "_alloc", tk._alloc)  # poisoned (NaN) buffers
    shape, kind, view = MANY_HEADS[case]
    q, k, v = make(shape, torch.float16, view=view)
    params = _many_heads_params(shape[1], kind)
    assert ops.which_backend(q, k, v, **params, backend="triton")[0] == "triton"
    out = vitkernels.head_mixing_attention(q, k, v, **params, backend="triton")
    assert out.dtype == torch.float16 and out.shape == (*q.shape[:3], v.shape[-1])
    assert_close(out, ref64(q, k, v, params)[0], TOL[torch.float16], f"{case} {kind}")


@pytest.mark.parametrize("kind", ["post", "re-attention"])
def test_many_heads_very_negative_logits_give_a_finite_forward_with_padded_keys(kind, poisoned, monkeypatch):
    """Every real logit near -300 (float16 inputs): a padded key (k = 0, logit 0 unless
    masked) would get p = 2**430 = inf in pass 2, and inf * 0 in the product with v NaN
    (with the head norm, NaN through the norm). 37 keys: two full key blocks and 11
    padded keys in the third."""
    from vitkernels.triton import head_mixing_tc

    monkeypatch.setattr(head_mixing_tc, "_alloc", tk._alloc)
    q, k, v = make((1, 6, 20, 37, 32, 32))
    q, k = (q * 0.1 + 10.0).half(), (-(k * 0.1 + 10.0)).half()
    v = v.half()
    params = _many_heads_params(6, kind)
    out = vitkernels.head_mixing_attention(q, k, v, **params, backend="triton")
    assert torch.isfinite(out).all()
    # logits of ~300 carry float32 rounding of ~300 * 2**-24 into exp()
    assert_close(out, ref64(q, k, v, params)[0], TOL[torch.float16], f"very negative logits {kind}")


def test_many_heads_reads_only_the_head_dim_of_unaligned_views(poisoned, monkeypatch):
    """DeepViT-S's heads of 33 as views of wider rows whose other columns hold inf: the
    kernel (q read in place, k and v through zero-padded copies) reads none of them."""
    from vitkernels.triton import head_mixing_tc

    monkeypatch.setattr(head_mixing_tc, "_alloc", tk._alloc)
    q, k, v = make((1, 12, 20, 37, 33, 33), torch.float16)
    q, k, v = (torch.cat([t, torch.full((*t.shape[:3], 7), float("inf"), dtype=t.dtype)], -1)[..., :33]
               for t in (q, k, v))  # fmt: skip
    params = make_params(12, "re-attention", torch.float16)
    out = vitkernels.head_mixing_attention(q, k, v, **params, backend="triton")
    assert_close(out, ref64(q, k, v, params)[0], TOL[torch.float16], "gapped views")


def _unaligned_k_v(B: int, H: int, N: int, dk: int, dv: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float16 k (B, H, N, dk) and v (B, H, N, dv) in two different unaligned layouts: k
    a view of a (B, N, H, dk + 3) tensor (rows of dk + 3 elements), v a transposed view
    of (B, H, dv, N) (its head dim strided by N)."""
    k = torch.randn(B, N, H, dk + 3, dtype=torch.float16).transpose(1, 2)[..., 1 : dk + 1]
    v = torch.randn(B, H, dv, N, dtype=torch.float16).transpose(2, 3)
    return k, v


def test_many_heads_pad_kv_copies_every_element(poisoned, monkeypatch):
    """The launcher's one padding launch for k and v (``_pad_kv``): contiguous copies
    whose columns past Dk / Dv are exactly zero, from k and v of different widths and
    layouts; 2 x 6 (b, h) and 37 keys (two 32-row blocks, the second partial), into
    NaN-filled buffers."""
    from vitkernels.triton import head_mixing_tc

    monkeypatch.setattr(head_mixing_tc, "_alloc", tk._alloc)
    k, v = _unaligned_k_v(2, 6, 37, 33, 20)
    kp, vp = head_mixing_tc._pad_kv(k, v, 48, 32)
    assert kp.is_contiguous() and vp.is_contiguous()
    assert torch.equal(kp, torch.nn.functional.pad(k, (0, 15)))
    assert torch.equal(vp, torch.nn.functional.pad(v, (0, 12)))
    with pytest.raises(ValueError, match="padded widths 36, 32 for k and v of 33, 20 columns"):
        head_mixing_tc._pad_kv(k, v, 36, 32)
    with pytest.raises(ValueError, match=r"shapes \(2, 6, 37, 33\) and \(2, 6, 36, 20\); expected the same"):
        head_mixing_tc._pad_kv(k, v[:, :, :36], 48, 32)


@pytest.mark.parametrize("kind", ["re-attention", "post"])
def test_many_heads_forward_with_unaligned_k_and_v_of_different_widths(kind, poisoned, monkeypatch):
    """k of 33 columns and v of 20, unaligned in different layouts (``_unaligned_k_v``):
    both through the padded copies, the output at v's 20 columns."""
    from vitkernels.triton import head_mixing_tc

    monkeypatch.setattr(head_mixing_tc, "_alloc", tk._alloc)
    k, v = _unaligned_k_v(2, 7, 37, 33, 20)
    q = torch.randn(2, 7, 18, 33, dtype=torch.float16)
    params = _many_heads_params(7, kind)
    out = vitkernels.head_mixing_attention(q, k, v, **params, backend="triton")
    assert out.shape == (2, 7, 18, 20)
    assert_close(out, ref64(q, k, v, params)[0], TOL[torch.float16], f"unaligned k, v {kind}")


@pytest.mark.parametrize("kind", ["timm talking heads", "all", "re-attention"],
                         ids=["talking heads", "with the head norm", "re-attention (no pre-mix)"])  # fmt: skip
def test_many_heads_forward_saves_lse(kind, poisoned, monkeypatch):
    """The launcher's lse (B, H, Nq): log-sum-exp over the keys of each mixed head's
    logits (the head norm, after the softmax, leaves it alone); out beside it. Without
    a pre-mix the row statistics come from their own launch (``_row_lse``)."""
    from vitkernels.triton import head_mixing_tc

    monkeypatch.setattr(head_mixing_tc, "_alloc", tk._alloc)
    q, k, v = make((2, 9, 21, 40, 48, 48), torch.float16)
    params = make_params(9, kind, torch.float16)
    norm = "head_norm" in params
    pre_w = params["pre"][0] if "pre" in params else None
    post_w, post_b = params["post"]
    norm_w, norm_b, eps = params["head_norm"] if norm else (None, None, 1e-5)
    out, lse = tk.head_mixing_attention_fwd(q, k, v, pre_w, post_w, post_b, norm_w, norm_b, 0.3, eps, norm)
    s = torch.einsum("bhid,bhjd->bhij", q.double(), k.double()) * 0.3
    logits = s if pre_w is None else torch.einsum("gh,bhij->bgij", pre_w.double(), s)
    assert lse.shape == (2, 9, 21) and lse.dtype == torch.float32
    assert_close(lse, logits.logsumexp(-1), TOL[torch.float16], "lse")
    assert_close(out, ref64(q, k, v, params, scale=0.3)[0], TOL[torch.float16], "out")


@pytest.mark.parametrize(
    "shape, scale",
    [((2, 3, 17, 197, 33, 48), 0.2), ((1, 2, 1, 1, 64, 64), 0.125), ((1, 2, 70, 64, 48, 48), 0.3),
     ((1, 1, 20, 65, 32, 32), -0.2), ((1, 2, 5, 16, 16, 16), 0.0)],
    ids=["Nq17 Nk197 Dq33 k padded to 48", "Nq1 Nk1 D64", "Nq70 Nk64 (no tail) D48", "Nk65 negative scale",
         "Nk16 scale 0"],
)  # fmt: skip
def test_many_heads_row_lse_kernel(shape, scale, poisoned, monkeypatch):
    """``_row_lse`` (the forward's statistics without a pre-mix, ``_lse_tc_kernel``):
    lse (B, H, Nq) against a float64 logsumexp; k as ``_pad_kv`` leaves it (columns past
    Dq zero) or as wide as q; 64-key blocks and the 16-key tail, query blocks of 64 and
    a partial one; into a NaN-filled buffer."""
    from vitkernels.triton import head_mixing_tc

    B, H, NQ, NK, DQ, DK = shape
    q = torch.randn(B, H, NQ, DQ, dtype=torch.float16)
    k = torch.nn.functional.pad(torch.randn(B, H, NK, DQ), (0, DK - DQ)).half()
    lse = tk._alloc((B, H, NQ), torch.float32, q.device)
    head_mixing_tc._row_lse(q, k, lse, scale)
    want = (torch.einsum("bhid,bhjd->bhij", q.double(), k[..., :DQ].double()) * scale).logsumexp(-1)
    assert_close(lse, want, 1e-5, "lse")  # float16 products, float32 sums: near exact
    with pytest.raises(ValueError, match=r"q \(2, 3, 17, 33\), k \(2, 3, 197, 32\), lse \(2, 3, 17\); expected"):
        head_mixing_tc._row_lse(torch.zeros(2, 3, 17, 33), torch.zeros(2, 3, 197, 32), torch.zeros(2, 3, 17), 1.0)


def test_many_heads_row_lse_of_very_negative_logits():
    """Logits near -300 (float16 q, k): lse near -300, finite and right (the running
    maximum starts at -1e30 and is of the unscaled logits); 197 keys, the tail padded."""
    from vitkernels.triton import head_mixing_tc

    q = (torch.randn(1, 2, 20, 32) * 0.1 + 10.0).half()
    k = (-(torch.randn(1, 2, 197, 32) * 0.1 + 10.0)).half()
    lse = torch.full((1, 2, 20), float("nan"))
    head_mixing_tc._row_lse(q, k, lse, 0.09)
    want = (torch.einsum("bhid,bhjd->bhij", q.double(), k.double()) * 0.09).logsumexp(-1)
    assert want.max() < -250
    assert_close(lse, want, 1e-5, "lse near -300")


@pytest.mark.parametrize(
    "shape",
    [(2, 3, 70, 197, 33, 20), (1, 2, 1, 37, 33, 12), (1, 2, 200, 64, 12, 33), (1, 5, 130, 260, 20, 40)],
    ids=["Nq70 Nk197 (2 query blocks, 4 key blocks)", "Nq1 Nk37 (the tail only) Dv12",
         "Nq200 Nk64 (4 query blocks, 1 key block) Dk12", "Nq130 Nk260 Dk20 Dv40 (3 and 5)"],
)  # fmt: skip
def test_many_heads_row_lse_kernel_writes_the_padded_k_and_v_copies(shape, poisoned, monkeypatch):
    """``_row_lse`` with ``widths`` (the forward without a pre-mix, rows that are not
    whole 16-byte vectors): the statistics launch reads k as it is and writes the
    zero-padded contiguous copies of k and v (``_pad_kv``'s) into NaN-filled buffers,
    each key block by exactly one program whatever the number of query blocks (more,
    fewer or as many as the key blocks); lse against float64 as without copies."""
    from vitkernels.triton import head_mixing_tc

    monkeypatch.setattr(head_mixing_tc, "_alloc", tk._alloc)
    B, H, NQ, NK, DK, DV = shape
    k, v = _unaligned_k_v(B, H, NK, DK, DV)
    q = torch.randn(B, NQ, H, DK, dtype=torch.float16).transpose(1, 2)
    wk, wv = (sum(tk._k_split(d)) for d in (DK, DV))
    lse = tk._alloc((B, H, NQ), torch.float32, q.device)
    kp, vp = head_mixing_tc._row_lse(q, k, lse, -0.2, v, (wk, wv))
    assert kp.shape == (B, H, NK, wk) and vp.shape == (B, H, NK, wv)
    assert kp.is_contiguous() and vp.is_contiguous()
    assert torch.equal(kp, torch.nn.functional.pad(k, (0, wk - DK)))
    assert torch.equal(vp, torch.nn.functional.pad(v, (0, wv - DV)))
    want = (torch.einsum("bhid,bhjd->bhij", q.double(), k.double()) * -0.2).logsumexp(-1)
    assert_close(lse, want, 1e-5, "lse")
    with pytest.raises(ValueError, match=rf"copies of k \({B}, {H}, {NK}, {DK}\) and v .* \({wk}, {wv + 8}\) wide"):
        head_mixing_tc._row_lse(q, k, lse, 1.0, v, (wk, wv + 8))


@pytest.mark.parametrize("kind", ["re-attention", "timm talking heads"])
def test_many_heads_forward_pads_k_and_v_in_the_stats_launch_without_a_pre_mix(kind, poisoned, monkeypatch):
    """Unaligned k and v (33 and 20 columns): without a pre-mix the statistics launch
    makes the padded copies (no ``_pad_kv`` launch); with one (its statistics in the
    fused kernel) ``_pad_kv`` makes them. The output against float64 either way."""
    from vitkernels.triton import head_mixing_tc

    monkeypatch.setattr(head_mixing_tc, "_alloc", tk._alloc)
    padded, pad_kv = [], head_mixing_tc._pad_kv

    def spy(a, b, *widths):
        padded.append(a.shape)
        return pad_kv(a, b, *widths)

    monkeypatch.setattr(head_mixing_tc, "_pad_kv", spy)
    k, v = _unaligned_k_v(2, 9, 70, 33, 20)
    q = torch.randn(2, 9, 20, 33, dtype=torch.float16)
    params = _many_heads_params(9, kind)
    out = vitkernels.head_mixing_attention(q, k, v, **params, backend="triton")
    assert padded == ([] if "pre" not in params else [(2, 9, 70, 33)])
    assert_close(out, ref64(q, k, v, params)[0], TOL[torch.float16], f"unaligned k, v {kind}")


def test_many_heads_limits_are_reasons():
    """Beyond 4 heads the kernels (forward and backward) take 16-bit inputs only, the
    head norm included, with or without gradients; each refusal names what was given."""
    q, k, v = make((1, 8, 17, 17, 32, 32), torch.float16)
    params = make_params(8, "vit-pytorch talking heads", torch.float16)
    assert ops.TritonBackend().not_supported_reasons(_inputs(q, k, v, params)) == []
    qg = q.clone().requires_grad_()
    assert ops.TritonBackend().not_supported_reasons(_inputs(qg, k, v, params)) == []
    q32, k32, v32 = (t.float() for t in (q, k, v))
    reasons = ops.TritonBackend().not_supported_reasons(_inputs(q32.requires_grad_(), k32, v32, {}))
    assert reasons == ["H=8: with more than 4 heads the kernels (the head mixing on tensor cores) take float16 "
                       "and bfloat16 inputs; q has dtype float32"], reasons
    # re-attention at DeepViT-S's 12 heads of 33, a parameter requiring grad: taken
    q, k, v = make((1, 12, 3, 3, 33, 33), torch.float16, view="vit-pytorch")
    reattn = make_params(12, "re-attention", torch.float16)
    w = reattn["post"][0].detach().requires_grad_()
    assert ops.TritonBackend().not_supported_reasons(_inputs(q, k, v, dict(reattn, post=(w, None)))) == []
    q, k, v = make((1, 17, 2, 2, 32, 32), torch.float16)
    reasons = ops.TritonBackend().not_supported_reasons(_inputs(q, k, v, {}))
    assert any("H=17 is above the kernels' limit of 16" in r for r in reasons), reasons
    # the launchers refuse what dispatch refuses
    q, k, v = make((1, 6, 3, 3, 16, 16))
    with pytest.raises(ValueError, match=r"q.dtype=torch.float32; expected float16 or bfloat16"):
        tk.head_mixing_attention_bwd(q, q, k, v, None, None, None, None, None, q[..., 0], 0.25, 1e-5, False)
    q, k, v = make((1, 17, 3, 3, 16, 16), torch.float16)
    with pytest.raises(ValueError, match="H=17 heads; expected 5 to 16"):
        tk.head_mixing_attention_bwd(q, q, k, v, None, None, None, None, None, q[..., 0].float(), 0.25, 1e-5,
                                     False)


# id: (B, H, Nq, Nk, Dk, Dv), stages (_many_heads_params), view; small shapes (the
# interpreter: seconds each), HP = 8 and 16, rectangular, padded keys and queries
MANY_HEADS_GRADS = {
    "H5 Nq17 Nk20 D32 timm": ((1, 5, 17, 20, 32, 32), "timm talking heads", "timm"),
    "H8 Nq1 Nk17 D48 all": ((2, 8, 1, 17, 48, 48), "all", "contiguous"),
    "H12 Nq20 Nk33 D33 re-attention": ((1, 12, 20, 33, 33, 33), "re-attention", "vit-pytorch"),
    "H16 Nq17 Nk18 D32 pre re-attention eps0": ((1, 16, 17, 18, 32, 32), "pre re-attention eps0", "contiguous"),
    "H6 Nq20 Nk17 D33 post, norm weight only": ((1, 6, 20, 17, 33, 33), "post, norm weight only", "contiguous"),
    "H12 N17 D32 post-mix non-affine norm f32 params": ((1, 12, 17, 17, 32, 32), "post, plain norm, f32",
                                                         "contiguous"),
    "H7 Nq33 Nk1 Dk32 Dv48 norm": ((1, 7, 33, 1, 32, 48), "norm", "contiguous"),
    "H9 N17 D64 plain": ((1, 9, 17, 17, 64, 64), "plain", "contiguous"),
    # heads of 49-64 at HP = 16: chunks of 32 and dk's two chunks in a launch each
    # (``_bwd_chunks``, ``_kv_split``); vit-pytorch's DeepViT size (16 heads of 64)
    "H16 Nq17 Nk33 D64 re-attention": ((1, 16, 17, 33, 64, 64), "re-attention", "vit-pytorch"),
    "H10 Nq20 Nk17 Dk56 Dv48 talking heads": ((1, 10, 20, 17, 56, 48), "vit-pytorch talking heads", "contiguous"),
    # ... at one query (CaiT's class attention) dk and dv in one launch (``_kv_split``)
    "H16 Nq1 Nk33 D64 talking heads": ((2, 16, 1, 33, 64, 64), "vit-pytorch talking heads", "contiguous"),
    "H12 Nq1 Nk20 Dk56 Dv64 pre": ((1, 12, 1, 20, 56, 64), "pre", "contiguous"),
    "H12 Nq1 Nk20 D48 re-attention": ((2, 12, 1, 20, 48, 48), "re-attention", "contiguous"),
    "H10 Nq1 Nk19 D33 timm talking heads": ((1, 10, 1, 19, 33, 33), "timm talking heads", "contiguous"),
}


@pytest.fixture
def many_poisoned(poisoned, monkeypatch):
    from vitkernels.triton import head_mixing_tc

    monkeypatch.setattr(head_mixing_tc, "_alloc", tk._alloc)  # poisoned (NaN) buffers
    return head_mixing_tc


@pytest.mark.parametrize("case", list(MANY_HEADS_GRADS), ids=list(MANY_HEADS_GRADS))
def test_many_heads_gradients_match_float64_reference(case, many_poisoned, monkeypatch):
    """dq, dk, dv and every parameter's gradient of the 5-16-head backward against the
    float64 reference; the backward launcher must be the one that runs."""
    shape, kind, view = MANY_HEADS_GRADS[case]
    q, k, v = make(shape, torch.float16, view=view)
    params = _many_heads_params(shape[1], kind)
    calls = []
    launcher = many_poisoned.head_mixing_attention_bwd_tc

    def spy(*args):
        calls.append(args[1].shape)
        return launcher(*args)

    monkeypatch.setattr(many_poisoned, "head_mixing_attention_bwd_tc", spy)
    qg = q.detach().requires_grad_()
    assert ops.which_backend(qg, k, v, **params, backend="triton")[0] == "triton"
    check_grads("triton", q, k, v, params, GRAD_TOL[torch.float16], f"{case} {kind}")
    assert len(calls) == 1


@pytest.mark.parametrize("kind", ["re-attention", "timm talking heads"])
def test_many_heads_backward_reads_the_forwards_padded_copies(kind, many_poisoned, monkeypatch):
    """Heads of 33 as DeepViT lays them out (chunks of one qkv projection): the
    forward's zero-padded copies of k and v are saved, so the backward pads nothing
    (with a pre-mix the forward's ``_pad_kv`` makes them, without one its statistics
    launch), and every gradient matches float64."""
    padded, pad_kv = [], many_poisoned._pad_kv

    def spy(a, b, *widths):
        padded.append(tuple(a.shape))
        return pad_kv(a, b, *widths)

    monkeypatch.setattr(many_poisoned, "_pad_kv", spy)
    q, k, v = make((2, 6, 19, 19, 33, 33), torch.float16, view="vit-pytorch")
    params = _many_heads_params(6, kind) if kind != "timm talking heads" else make_params(6, kind, torch.float16)
    assert many_poisoned.saved_copy_shapes(q, k, v) == ((2, 6, 19, 48), (2, 6, 19, 48))
    check_grads("triton", q, k, v, params, GRAD_TOL[torch.float16], f"saved copies {kind}")
    assert padded == ([(2, 6, 19, 33)] if "pre" in params else [])


def test_many_heads_saved_copies_only_where_the_head_dim_needs_them():
    """From shapes and dtype alone: 5-16 heads of 16-bit types whose Dk or Dv is not a
    multiple of 8 (aligned head dims, other head counts, float32: none)."""
    from vitkernels.triton.head_mixing_tc import saved_copy_shapes

    def shapes(H, dk, dv, dtype=torch.float16):
        return saved_copy_shapes(torch.empty(2, H, 3, dk, dtype=dtype, device="meta"),
                                 torch.empty(2, H, 5, dk, dtype=dtype, device="meta"),
                                 torch.empty(2, H, 5, dv, dtype=dtype, device="meta"))  # fmt: skip

    assert shapes(12, 33, 33) == ((2, 12, 5, 48), (2, 12, 5, 48))
    assert shapes(5, 48, 20, torch.bfloat16) == ((2, 5, 5, 48), (2, 5, 5, 32))
    assert shapes(16, 64, 17) == ((2, 16, 5, 64), (2, 16, 5, 32))
    assert shapes(12, 32, 48) is None
    assert shapes(4, 33, 33) is None  # the register kernels read unaligned rows themselves
    assert shapes(17, 33, 33) is None
    assert shapes(12, 33, 33, torch.float32) is None


def test_many_heads_backward_refuses_copies_of_the_wrong_shape(many_poisoned):
    q, k, v = make((1, 6, 4, 5, 33, 33), torch.float16)
    lse = torch.zeros(1, 6, 4)
    args = (q, q, k, v, None, None, None, None, None, lse, 0.25, 1e-5, False)
    good = torch.zeros(1, 6, 5, 48, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"padded copy of v is \(1, 6, 5, 40\).*expected a contiguous \(1, 6, 5, 48\)"):
        many_poisoned.head_mixing_attention_bwd_tc(*args, (good, good[..., :40].contiguous()))
    with pytest.raises(ValueError, match=r"padded copy of k is .*torch.float32.*expected"):
        many_poisoned.head_mixing_attention_bwd_tc(*args, (good.float(), good))


@pytest.mark.parametrize("kind", ["post", "re-attention"])
def test_many_heads_very_negative_logits_give_finite_gradients_with_padded_keys(kind, many_poisoned):
    """Every real logit near -300: a padded key (k = 0) would get p = 2**430 = inf
    without the -inf mask, and inf * 0 NaN in delta, dq and (through the flattened
    mix dots) the neighbouring real key's dk. 37 keys: 11 padded in the third block.
    dq = scale sum_j ds_j k_j, and sum_j ds_j = 0: k's common offset (-10) cancels, so
    the 16-bit rounding of ds (as in any float16 attention backward) comes back times
    the offset over k's spread; a spread of 0.5 keeps that near 1% (at 0.1 it reached
    the 2% tolerance at some seeds, e.g. 4227048279)."""
    q, k, v = make((1, 6, 20, 37, 32, 32))
    q, k = (q * 0.1 + 10.0).half(), (-(k * 0.5 + 10.0)).half()
    params = _many_heads_params(6, kind)
    check_grads("triton", q, k, v.half(), params, GRAD_TOL[torch.float16], f"very negative logits {kind}")


@pytest.mark.parametrize("kind", ["re-attention", "norm"])
def test_norm_at_eps_0_with_padding_keys_is_finite(kind, poisoned):
    """The register kernels (3 and 4 heads) with the head norm at eps = 0 and 20 keys
    (padding keys in the last tile): there p = 0 in every head, so the variance is 0
    and 1 / sqrt(0) = inf; x^ = 0 * inf was NaN and, through the padding key's zero v
    row, every output and gradient of its query rows NaN. Forward and every gradient
    against float64."""
    for H in (3, 4):
        q, k, v = (t.half() for t in make((1, H, 17, 20, 32, 32)))
        p = make_params(H, kind, torch.float16)
        params = dict(p, head_norm=(*p["head_norm"][:2], 0.0))
        assert ops.which_backend(q, k, v, **params, backend="triton")[0] == "triton"
        out = vitkernels.head_mixing_attention(q, k, v, **params, backend="triton")
        assert_close(out, ref64(q, k, v, params)[0], TOL[torch.float16], f"eps 0, {kind}, H{H}")
        check_grads("triton", q, k, v, params, GRAD_TOL[torch.float16], f"eps 0, {kind}, H{H}", rounded_grad=True)


@pytest.mark.parametrize("H", [4, 9])  # the register kernels; the tensor-core kernels
def test_norm_at_eps_0_where_every_head_of_a_real_key_underflows(H, poisoned, many_poisoned):
    """eps = 0 and one real key (3) whose logit is ~130 below the others in every head:
    its p is 0 in float32 (not in float64) in every head, so the head norm's variance
    there is 0. The kernels take x^ = 0 there (rho = 0, not inf: no 0 * inf = NaN);
    the float64 reference has a finite x^ no 32-bit arithmetic reproduces, so this
    key's v row is 0 (its n then moves no output, dq or dk) and its dv is left out."""
    q, k, v = make((1, H, 17, 20, 32, 32))
    q[..., 0] = 3.0
    k[:, :, 3] = 0.0
    k[:, :, 3, 0] = -250.0
    v[:, :, 3] = 0.0
    q, k, v = q.half(), k.half(), v.half()
    p = make_params(H, "re-attention", torch.float16)
    params = dict(p, head_norm=(*p["head_norm"][:2], 0.0))
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
    out = vitkernels.head_mixing_attention(qg, kg, vg, **params, backend="triton")
    expected, (q64, k64, v64), _ = ref64(q, k, v, params)
    assert_close(out, expected, TOL[torch.float16], f"eps 0, H{H} out")
    grad = torch.randn_like(expected)
    expected.backward(grad)
    dq, dk, dv = torch.autograd.grad(out, (qg, kg, vg), grad.half())
    keep = torch.arange(20) != 3
    for name, g, r in (("dq", dq, q64.grad), ("dk", dk, k64.grad), ("dv", dv[:, :, keep], v64.grad[:, :, keep])):
        assert_close(g, r, GRAD_TOL[torch.float16], f"eps 0, H{H} {name}", floor=1.0)
    assert torch.isfinite(dv).all()


@pytest.mark.parametrize("H", [3, 4, 7, 9])  # the register kernels; HP = 8 and 16
def test_norm_at_eps_0_gives_finite_gradients_where_one_key_is_nearly_ignored(H, many_poisoned):
    """Re-attention with the head norm at eps = 0, one key (5) of p ~ 1e-4 in every
    head and a large v: the norm's rho = 1 / std over the heads is ~1e3 there and its
    backward's dr ~1e6, past float16's 65504, though every float64 gradient is O(100).
    dr rounded to 16 bits would be inf: in the tensor-core kernels for the P^T mix (dq,
    dk NaN) and the dP dot, in the register kernels for the dP dot (the post-mix
    weight's gradient NaN); the kernels move rho out of the 16-bit operands."""
    q, k, v = make((1, H, 17, 20, 32, 32))
    q[..., 0] = 3.0
    k[:, :, 5] = 0.0
    k[:, :, 5, 0] = -8.0  # logit -4.2 against ~N(0, 1) for the other keys
    v[:, :, 5] *= 30.0
    p = make_params(H, "re-attention", torch.float16)
    params = dict(p, head_norm=(*p["head_norm"][:2], 0.0))
    check_grads("triton", q.half(), k.half(), v.half(), params, GRAD_TOL[torch.float16], f"eps 0, H{H}",
                rounded_grad=True)


@pytest.mark.parametrize("H", [6, 8])  # HP = 8: two (query, key) pairs a row of the flattened tile
def test_many_heads_norm_of_a_small_key_beside_a_dominant_one(H, many_poisoned):
    """Re-attention at 5-8 heads, where keys 2m and 2m + 1 of a query share a row of
    the post-mix's flattened tile (8 head slots each): key 4 takes p ~ 0.95 in every
    head, its neighbour key 5 p ~ 1e-4, eps = 0. Key 5's variance over the heads
    (~1e-8) must come from its own half of the row: as the row's sum minus key 4's it
    drowned in the float32 rounding of ~1 (its x^ off by a factor; v of key 5 x 10
    makes that visible). Forward and every gradient against float64."""
    q, k, v = make((1, H, 17, 20, 32, 32))
    q[..., 0] = 3.0
    k[:, :, 4, 0] = 12.0  # logit ~ +6.4 over the other keys'
    k[:, :, 5, 0] = -4.0
    v[:, :, 5] *= 10.0
    q, k, v = q.half(), k.half(), v.half()
    p = make_params(H, "re-attention", torch.float16)
    params = dict(p, head_norm=(*p["head_norm"][:2], 0.0))
    out = vitkernels.head_mixing_attention(q, k, v, **params, backend="triton")
    assert_close(out, ref64(q, k, v, params)[0], TOL[torch.float16], f"H{H} forward")
    check_grads("triton", q, k, v, params, GRAD_TOL[torch.float16], f"H{H}", rounded_grad=True)


def test_many_heads_parameter_gradients_are_deterministic(many_poisoned, monkeypatch):
    """The parameter gradients: per-program partial sums added in a fixed order, so
    two runs agree bit for bit; with the reduction's blocks shrunk to 1 row x 16
    columns (every row a loop step, a program per 16 columns) they still match the
    float64 reference."""
    monkeypatch.setattr(many_poisoned, "_PARAM_BLOCK", (1, 16))
    q, k, v = make((1, 8, 33, 17, 32, 32), torch.float16)
    params = _many_heads_params(8, "all")
    leaves = _leaves(params)

    def grads():
        qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
        ps = _map_params(params, lambda t: t.detach().requires_grad_())
        out = vitkernels.head_mixing_attention(qq, kk, vv, **ps, backend="triton")
        return torch.autograd.grad(out, [qq, kk, vv, *_leaves(ps)], gy)

    gy = torch.randn(1, 8, 33, 32).half()
    first, second = grads(), grads()
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    expected, ref_qkv, p64 = ref64(q, k, v, params)
    expected.backward(gy.double())
    for a, r in zip(first[3:], _leaves(p64), strict=True):
        assert_close(a, r.grad, GRAD_TOL[torch.float16], "parameter grads, small reduction blocks", floor=1.0)
    assert len(first) == 3 + len(leaves) == 9  # pre, post (weights, biases), norm (weight, bias)


@pytest.mark.parametrize("kind", ["re-attention", "timm talking heads"])
def test_many_heads_backward_dq_launch_writes_the_padded_q_and_do_copies(kind, many_poisoned, monkeypatch):
    """Rows that are not whole 16-byte vectors: the dq launch reads q (33 columns) and
    dO (20) as they are (unaligned, non-contiguous views) and writes the zero-padded
    contiguous copies (B, H, Nq, 48) and (B, H, Nq, 32) the dk / dv launches read, into
    NaN-filled buffers (every row of every head, columns past 33 / 20 zero); only k and
    v go through ``_pad_kv``. Nq 18: two query blocks, the second of 2 rows; dq, dk, dv
    against float64 (DeepViT's re-attention; CaiT's pre- and post-mix)."""
    made, padded = [], []
    alloc, pad_kv = many_poisoned._alloc, many_poisoned._pad_kv

    def record(shape, dtype, device):
        made.append(alloc(shape, dtype, device))
        return made[-1]

    def spy(a, b, *widths):
        padded.append(a.shape)
        return pad_kv(a, b, *widths)

    monkeypatch.setattr(many_poisoned, "_alloc", record)
    monkeypatch.setattr(many_poisoned, "_pad_kv", spy)
    B, H, NQ, NK = 2, 7, 18, 37
    k, v = _unaligned_k_v(B, H, NK, 33, 20)
    q = torch.randn(B, NQ, H, 36, dtype=torch.float16).transpose(1, 2)[..., 2:35]
    g = torch.randn(B, H, 20, NQ, dtype=torch.float16).transpose(2, 3)  # head dim strided by Nq
    p = _many_heads_params(H, kind)
    (pre_w, _), (post_w, post_b) = p.get("pre", (None, None)), p["post"]
    norm = "head_norm" in p
    norm_w, norm_b, eps = p["head_norm"] if norm else (None, None, 1e-5)
    args = (q, k, v, pre_w, post_w, post_b, norm_w, norm_b)
    _, lse = many_poisoned.head_mixing_attention_fwd_tc(*args, 0.3, eps, norm)
    made.clear(), padded.clear()
    dq, dk, dv, *_ = many_poisoned.head_mixing_attention_bwd_tc(g, *args, lse, 0.3, eps, norm)
    assert padded == [(B, H, NK, 33)]
    (qp,) = [t for t in made if t.shape == (B, H, NQ, 48)]
    (gp,) = [t for t in made if t.shape == (B, H, NQ, 32)]
    assert torch.equal(qp, torch.nn.functional.pad(q, (0, 15)))
    assert torch.equal(gp, torch.nn.functional.pad(g, (0, 12)))
    expected, ref_qkv, _ = ref64(q, k, v, p, scale=0.3)
    expected.backward(g.double())
    for name, mine, r in zip(("dq", "dk", "dv"), (dq, dk, dv), ref_qkv, strict=True):
        assert_close(mine, r.grad, GRAD_TOL[torch.float16], f"{kind} {name}", floor=1.0)


@pytest.mark.parametrize("d", [16, 33])
def test_many_heads_custom_op_compile_and_export(d, poisoned, monkeypatch):
    """The 5-16-head kernels through the custom ops: opcheck (forward and backward),
    torch.compile(fullgraph) of a call with its backward, torch.export of a call
    without gradients. Heads of 33: the forward returns the padded k / v copies (the
    fake tensors' shapes must agree) and the backward reads them."""
    from vitkernels.triton import head_mixing_tc

    monkeypatch.setattr(head_mixing_tc, "_alloc", tk._alloc)
    q, k, v = make((1, 6, 5, 9, d, d), torch.float16)
    params = make_params(6, "timm talking heads", torch.float16)
    pre_w, pre_b, post_w, post_b, *_ = ops._unpack(params["pre"], params["post"], None)
    args = (q, k, v, pre_w, pre_b, post_w, post_b, None, None, 0.25, 0.0, False, "triton")
    torch.library.opcheck(ops.head_mixing_attention_fwd, args)
    out, lse, k_copy, v_copy = ops.head_mixing_attention_fwd(*args)
    assert k_copy.shape == ((1, 6, 9, 48) if d == 33 else (0,))
    bwd_args = (torch.randn_like(out), q, k, v, pre_w, pre_b, post_w, post_b, None, None, lse, k_copy, v_copy, 0.25,
                0.0, False, "triton")  # fmt: skip
    torch.library.opcheck(ops.head_mixing_attention_bwd, bwd_args)

    def f(q, k, v):
        return vitkernels.head_mixing_attention(q, k, v, scale=0.25, **params, backend="triton")

    expected, ref_qkv, _ = ref64(q, k, v, params, scale=0.25)
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(qg, kg, vg)
    assert_close(got, expected, TOL[torch.float16])
    g = torch.randn_like(expected)
    got.backward(g.half())
    expected.backward(g)
    for mine, want in zip((qg, kg, vg), ref_qkv, strict=True):
        assert_close(mine.grad, want.grad, GRAD_TOL[torch.float16], floor=1.0)

    class M(torch.nn.Module):
        def forward(self, q, k, v):
            return f(q, k, v)

    ep = torch.export.export(M(), (q, k, v))
    assert any("head_mixing_attention_fwd" in str(n.target) for n in ep.graph.nodes)
    assert_close(ep.module()(q, k, v), expected, TOL[torch.float16])
