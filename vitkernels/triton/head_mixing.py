"""Triton kernels for head_mixing_attention: CaiT's talking heads, DeepViT's re-attention.

Math (per batch entry, query i, key j; heads h, g, f in 0..H-1; the spec is
``vitkernels.backends.reference.head_mixing_attention``)::

    s_h = scale * <q_h,i, k_h,j>
    l_g = sum_h A[g,h] s_h (+ a_g)                pre-mix (A, a); else l = s
    p_g = exp(l_g - lse_g,i),  lse_g,i = log sum_j exp(l_g)
    r_f = sum_g P[f,g] p_g + c_f                  post-mix (P, c); else r = p
    n_f = (r_f - mu) * rho * w_f + beta_f         head norm over f; else n = r
          mu = mean_f r_f, rho = (mean_f (r_f - mu)^2 + eps)^-1/2
    o_f,i = sum_j n_f v_f,j

The pre-mix bias a shifts a whole row of l_g by a constant, which softmax ignores:
the kernels leave it out and its gradient is exactly zero.

Backward, given do_f,i (x^ = (r - mu) rho)::

    dn_f = <do_f,i, v_f,j>                        dv_f,j = sum_i n_f do_f,i
    dw_f = sum dn_f x^_f,  dbeta_f = sum dn_f      (sums over batch, i, j)
    dr_f = rho (dn_f w_f - mean_f(dn w) - x^_f mean_f(dn w x^))
    dP[f,g] = sum dr_f p_g,  dc_f = sum dr_f,  dp_g = sum_f P[f,g] dr_f
    delta_g,i = sum_j p_g dp_g                    (needs a pass over the keys: the
    dl_g = p_g (dp_g - delta_g,i)                  mixing breaks FlashAttention's
    dA[g,h] = sum dl_g s_h,  ds_h = sum_g A[g,h] dl_g     delta = rowsum(dO * O))
    dq_h,i = scale sum_j ds_h k_h,j               dk_h,j = scale sum_i ds_h q_h,i

Kernels (every head of a tile in one program, so no (B, H, Nq, Nk) tensor is ever
in memory; a program's tiles hold all heads side by side along a last axis of HP
slots, HP = H rounded up to a power of two, at least 2):

* ``_fwd_kernel``: a program per (b, query block). Pass 1 over the key blocks keeps
  the running max and sum of each mixed head g (online softmax, float32); pass 2
  recomputes the logits, forms p, r and n tile by tile and multiplies by v. Saves
  lse (B, H, Nq) float32. Both passes take the full key blocks without key masks
  and the rest after them, masked; pass 1's full blocks are twice as wide
  (``BLOCK_S``: the row max and sum across threads once per 32 keys); q.k takes K =
  48 as 32 + 16 and the output's 48 columns are two accumulators of 32 and 16 (not
  padded to 64: fewer tensor-core flops, and registers for the mixing weights).
* ``_bwd_dq_kernel``, two launches, a program per (b, query block) each: with
  DELTA_PASS, delta and this program's partial sums of dP, dc, dw, dbeta (a first loop
  over the keys) and of dA (a second loop, once delta is known: dA = sum dl_g s_h);
  without, dq of every head. On sm_90 the H x H sums (dP, dA) are tensor-core products
  over the flattened tile (``_pair_lhs``, ``_pair_rhs``, ``_pair_trace``) instead of
  reductions across the rows and warps every key tile. Where 64-row blocks leave 1-16
  rows after their whole blocks (196 = 3 x 64 + 4) and a second launch saves a wave at
  the batch size (``_row_runs``; not with the post-mix bias or the head norm), the
  delta launch takes the whole blocks and a second one the rest on 16-row blocks (the
  ``ROW0`` constexpr: the first query). The loops reload q, dO and the
  mixing weights each iteration (``_live``) instead of holding them in registers,
  except q and dO in the 32 x 64 dq launch (HOLD: as mma.sync operands they take
  fewer registers held than reloaded). The
  dq pass leaves the (row, key) mask out of its tile chain: a padded key's logits are
  -inf (a bias in the pre-mix's first FMA), so p = 0 there, and a padded row's dq is
  not stored.
* ``_bwd_dkdv_kernel``: a program per (b, key block), looping over query blocks
  (transposed tiles): dk, dv of every head in one launch; with timm's post-mix bias,
  but at heads of 48, of a group of two heads per launch (each launch recomputes the
  tile chain of all heads; every head's gradients beside it spilled). The loop forms p
  and n and adds to dv before it computes dn = <v, dO>, so fewer tiles are live at
  once. q.k and
  dO.v take K in two chunks where the head dim is not a power of two (48 = 32 + 16:
  the loop-invariant k and v operands, in registers with mma.sync, are not padded to
  64), and the tile chain is not masked by key and query: a padded key's gradients
  are never stored and a padded query has q = dO = 0, so its terms add nothing.
* ``_param_grad_kernel``: one program (here) adds the delta launch's per-program partial
  sums row block by row block (a fixed order) and writes each parameter's gradient
  in its dtype: no torch launch is left in the backward.

Each head's products are 2-d ``tl.dot``s; the per-head tiles are stacked with
``tl.join`` (a recursive halving, ``_dots``/``_dots_acc``), which puts the head axis
in each thread's registers: the mixing (an FMA chain per output head, ``_mix``),
the softmax statistics and the head norm are then elementwise work with no data
exchange between threads, and picking one head's slot (``_slot``) is a select that
folds to a register move. Parameter gradients are written as one row of
per-program partial sums each (no atomics) and summed by ``_param_grad_kernel`` in
a fixed order, so they are deterministic.

Envelope: H <= 4, Dk and Dv <= 64 (``vitkernels.ops.head_mixing.MAX_HEADS``,
``MAX_HEAD_DIM``) and 16-byte aligned rows (``supports``). A query block's tiles of
every head, the mixing weights and the gradient accumulators live in registers;
beyond that they spill (DeepViT-S's 12 heads of 33, CaiT-S's 8 heads of 48): the
torch backend runs those, except that 5-16 heads (the head norm included, any row
alignment) have a forward and a backward in ``head_mixing_tc.py`` (the head mixing on
the tensor cores), which ``head_mixing_attention_fwd`` and ``_bwd`` hand them to. The loads are vectorised through pointer hints
(``_common.hint``) the launcher justifies (``_vector_width``), not through
Triton's specialisation of integer arguments. Every launch goes through
``_common.launch``, so the ahead-of-time compiles (``record_calls``, ``_aot.py``)
and the estimate see the launches that run.

Launcher contract (``head_mixing_attention_fwd`` / ``_bwd`` below):

``head_mixing_attention_fwd(q, k, v, pre_w, post_w, post_b, norm_w, norm_b, scale,
eps, has_norm, copies=None)``
    q (B, H, Nq, Dk), k (B, H, Nk, Dk), v (B, H, Nk, Dv): one dtype (float16,
    bfloat16 or float32), any strides. pre_w, post_w: (H, H) mixing matrices in
    nn.Linear's convention (out, in), any strides, or None; post_b (H,) or None;
    norm_w, norm_b (H,) or None (with has_norm: the head norm without that affine
    part). Parameters of float16, bfloat16 or float32; the mixing and the norm run
    in float32. Returns out (B, H, Nq, Dv) contiguous in q.dtype and lse (B, H, Nq)
    contiguous float32 (natural log, per mixed head g). With ``copies`` a dict, the
    5-16-head forward puts there the zero-padded copies of k and v ("k", "v") it read
    k and v through, if it made any (``head_mixing_tc.saved_copy_shapes``).

``head_mixing_attention_bwd(grad_out, q, k, v, pre_w, post_w, post_b, norm_w, norm_b,
lse, scale, eps, has_norm, copies=None)``
    Returns dq, dk, dv (contiguous, q.dtype) and d_pre_w, d_post_w, d_post_b,
    d_norm_w, d_norm_b in their parameters' dtypes (None where the parameter is).
    ``copies``: (k, v)'s padded copies from the forward, for 5-16 heads (the backward
    then pads nothing itself).

Configs come from small deterministic heuristics of the shape (``_fwd_cfg``,
``_bwd_cfg``), chosen so the AOT compiles fit the registers (triton 3.6 and 3.9,
sm_80 and sm_90a); a GPU tuning pass should revise them (several backward tiles
are 16 x 16 on 8 warps: warps repeat each other's work); no autotuning.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from vitkernels.triton._common import (
    SHORT,
    TRITON_36,
    Launch,
    TensorFactory,
    alloc,
    cdiv,
    float32_tiles,
    hint,
    launch,
    sm_count,
    target_arch,
)
from vitkernels.workloads import HeadMixingShape

_TRITON_36 = TRITON_36  # register allocation differs (see _bwd_cfg); tests patch it here

__all__ = ["head_mixing_attention_bwd", "head_mixing_attention_fwd", "record_calls", "supports"]

_LOG2E = 1.4426950408889634
_MAX_REG_HEADS = 4  # these kernels (every head in each thread's registers); 5-16: head_mixing_tc.py


# ----------------------------------------------------------------------------
# per-head tiles stacked along a last axis of n slots, slot i holding head h0 + step*i
# (zeros for heads >= H); built by halving: the even slots are the heads h0 + 2 step i,
# the odd ones h0 + step + 2 step i. The kernels call them with h0 = 0, step = 1, so
# slot i is head i.


@triton.jit
def _dot_head(
    X, x_offs, x_mask, Y, y_offs, y_mask, VX0: tl.constexpr, VX1: tl.constexpr, VY0: tl.constexpr,
    VY1: tl.constexpr, x_offs2, x_mask2, y_offs2, y_mask2,
):  # fmt: skip
    """X's (R, K) tile @ Y's (K, C) tile, plus the product of the second K chunk's
    tiles where x_offs2 is given (a K of 48 as 32 + 16, not padded to 64)."""
    x = tl.load(hint(X, x_offs, VX0, VX1), mask=x_mask, other=0.0)
    y = tl.load(hint(Y, y_offs, VY0, VY1), mask=y_mask, other=0.0)
    a = tl.dot(x, y, input_precision="tf32x3")
    if x_offs2 is not None:
        x = tl.load(hint(X, x_offs2, VX0, VX1), mask=x_mask2, other=0.0)
        y = tl.load(hint(Y, y_offs2, VY0, VY1), mask=y_mask2, other=0.0)
        a = tl.dot(x, y, a, input_precision="tf32x3")
    return a


@triton.jit
def _dots(
    X, x_offs, x_mask, sxh, VX0: tl.constexpr, VX1: tl.constexpr,
    Y, y_offs, y_mask, syh, VY0: tl.constexpr, VY1: tl.constexpr,
    h0: tl.constexpr, step: tl.constexpr, n: tl.constexpr, H: tl.constexpr,
    x_offs2=None, x_mask2=None, y_offs2=None, y_mask2=None,
):  # fmt: skip
    """(R, C, n): slot i = X_h @ Y_h, X_h the (R, K) tile at X + h*sxh + x_offs and
    Y_h the (K, C) tile at Y + h*syh + y_offs (vector runs VX0/VX1, VY0/VY1); with
    x_offs2 etc., K in two chunks (``_dot_head``)."""
    if n == 2:
        a = _dot_head(X + h0 * sxh, x_offs, x_mask, Y + h0 * syh, y_offs, y_mask, VX0, VX1, VY0, VY1,
                      x_offs2, x_mask2, y_offs2, y_mask2)  # fmt: skip
        if h0 + step < H:
            b = _dot_head(X + (h0 + step) * sxh, x_offs, x_mask, Y + (h0 + step) * syh, y_offs, y_mask,
                          VX0, VX1, VY0, VY1, x_offs2, x_mask2, y_offs2, y_mask2)  # fmt: skip
        else:
            b = tl.zeros_like(a)
        return tl.join(a, b)
    else:
        a = _dots(X, x_offs, x_mask, sxh, VX0, VX1, Y, y_offs, y_mask, syh, VY0, VY1,
                  h0, 2 * step, n // 2, H, x_offs2, x_mask2, y_offs2, y_mask2)  # fmt: skip
        b = _dots(X, x_offs, x_mask, sxh, VX0, VX1, Y, y_offs, y_mask, syh, VY0, VY1,
                  h0 + step, 2 * step, n // 2, H, x_offs2, x_mask2, y_offs2, y_mask2)  # fmt: skip
        return tl.reshape(tl.join(a, b), (a.shape[0], a.shape[1], n))


@triton.jit
def _dots_acc(
    x3, Y, y_offs, y_mask, syh, VY0: tl.constexpr, VY1: tl.constexpr, acc3,
    h0: tl.constexpr, step: tl.constexpr, n: tl.constexpr, H: tl.constexpr,
):  # fmt: skip
    """acc3 (R, C, n) with slot i += x3's slot i (R, K) @ Y_h, the (K, C) tile at
    Y + h*syh + y_offs (x3 cast to Y's dtype)."""
    if n == 2:
        xa, xb = tl.split(x3)
        aa, ab = tl.split(acc3)
        y = tl.load(hint(Y + h0 * syh, y_offs, VY0, VY1), mask=y_mask, other=0.0)
        aa = tl.dot(xa.to(y.dtype), y, aa, input_precision="tf32x3")
        if h0 + step < H:
            y = tl.load(hint(Y + (h0 + step) * syh, y_offs, VY0, VY1), mask=y_mask, other=0.0)
            ab = tl.dot(xb.to(y.dtype), y, ab, input_precision="tf32x3")
        return tl.join(aa, ab)
    else:
        xe, xo = tl.split(tl.reshape(x3, (x3.shape[0], x3.shape[1], n // 2, 2)))
        ae, ao = tl.split(tl.reshape(acc3, (acc3.shape[0], acc3.shape[1], n // 2, 2)))
        ae = _dots_acc(xe, Y, y_offs, y_mask, syh, VY0, VY1, ae, h0, 2 * step, n // 2, H)
        ao = _dots_acc(xo, Y, y_offs, y_mask, syh, VY0, VY1, ao, h0 + step, 2 * step, n // 2, H)
        return tl.reshape(tl.join(ae, ao), (acc3.shape[0], acc3.shape[1], n))


@triton.jit
def _slot(x3, hs, i: tl.constexpr):
    """(R, C): slot i of x3. The head axis lies in each thread's registers, so the
    selects fold to register moves (-0.0 is the identity of the sum)."""
    return tl.sum(tl.where(hs[None, None, :] == i, x3, -0.0), 2)


@triton.jit
def _mix(x3, W, s_out, s_in, hs, H: tl.constexpr, live, w_scale=1.0, bias=None):
    """(R, C, HP): slot o = sum_j w_scale * W[o, j] x3[..., j] (+ bias's slot o, bias
    broadcastable to (R, C, HP)) for o < H (zeros above); W[o, j] at W + o*s_out +
    j*s_in, read in float32. An FMA chain per output slot (the bias rides on its first
    product). live: True, or a condition true in the loop that varies with its
    variable, which keeps the compiler from hoisting the H * H weights into registers
    for the loop."""
    out = tl.zeros_like(x3)
    for o in tl.static_range(H):
        acc = _slot(x3, hs, 0) * (tl.load(W + o * s_out, mask=live, other=0.0).to(tl.float32) * w_scale)
        if bias is not None:
            acc += _slot(bias, hs, o)
        for j in tl.static_range(1, H):
            w = tl.load(W + o * s_out + j * s_in, mask=live, other=0.0).to(tl.float32) * w_scale
            acc += _slot(x3, hs, j) * w
        out = tl.where(hs[None, None, :] == o, acc[:, :, None], out)
    return out


@triton.jit
def _live(i, n):
    """The condition i < n as a boolean tensor (a loop's variable against its end: true
    in the loop, not provably loop-invariant, so loads masked by it stay in the loop)."""
    return tl.full([], i, tl.int32) < n


@triton.jit
def _group(x3, hs, G0: tl.constexpr, GP: tl.constexpr):
    """(R, C, GP): slots G0 .. G0 + GP - 1 of x3 (selects that fold to register moves)."""
    if GP == x3.shape[2]:
        return x3
    gs = tl.arange(0, GP)
    out = tl.zeros([x3.shape[0], x3.shape[1], GP], x3.dtype)
    for f in tl.static_range(GP):
        out = tl.where(gs[None, None, :] == f, _slot(x3, hs, G0 + f)[:, :, None], out)
    return out


@triton.jit
def _logits(s3, PRE_W, s_out, s_in, hs, qk_scale, H: tl.constexpr, HAS_PRE: tl.constexpr, live, bias=None):
    """l in log2 units from the products s3 = q.k: pre-mixed with the weights scaled;
    plus bias (broadcastable to s3's shape) in the first FMA where given."""
    if HAS_PRE:
        l3 = _mix(s3, PRE_W, s_out, s_in, hs, H, live, qk_scale, bias)
    elif bias is not None:
        l3 = s3 * qk_scale + bias
    else:
        l3 = s3 * qk_scale
    return l3


@triton.jit
def _outer_rows(a3, b3, n: tl.constexpr):
    """(R, HP, n): [r, j, i] = sum over the tile's columns c of a3[r, c, i] * b3[r, c, j]."""
    if n == 2:
        ae, ao = tl.split(a3)
        return tl.join(tl.sum(ae[:, :, None] * b3, 1), tl.sum(ao[:, :, None] * b3, 1))
    else:
        ae, ao = tl.split(tl.reshape(a3, (a3.shape[0], a3.shape[1], n // 2, 2)))
        e = _outer_rows(ae, b3, n // 2)
        o = _outer_rows(ao, b3, n // 2)
        return tl.reshape(tl.join(e, o), (a3.shape[0], b3.shape[2], n))


@triton.jit
def _pair_lhs(x3, J2: tl.constexpr, dt: tl.constexpr):
    """x3 (R, C, HP) as (HP*J2, R*C/J2) in dt, the columns c = c1*J2 + c2 split so that
    (row, c1) is a product's K axis: with ``_pair_rhs``'s y3, block (a, b) of the
    (HP*J2, HP*J2) product has trace sum_rc x3[r, c, a] y3[r, c, b] (``_pair_trace``).
    One tensor-core product per tile instead of H*H reductions across rows and warps."""
    x4 = _pair_split(x3, J2, dt)  # (R, C1, C2, HP) -> (HP, C2, R, C1)
    return tl.reshape(tl.permute(x4, (3, 2, 0, 1)), (x4.shape[3] * J2, x4.shape[0] * x4.shape[1]))


@triton.jit
def _pair_rhs(y3, J2: tl.constexpr, dt: tl.constexpr):
    """y3 (R, C, HP) as (R*C/J2, HP*J2) in dt (see ``_pair_lhs``)."""
    y4 = _pair_split(y3, J2, dt)  # (R, C1, C2, HP) -> (R, C1, HP, C2)
    return tl.reshape(tl.permute(y4, (0, 1, 3, 2)), (y4.shape[0] * y4.shape[1], y4.shape[3] * J2))


@triton.jit
def _pair_split(x3, J2: tl.constexpr, dt: tl.constexpr):
    """x3 (R, C, HP) in dt as (R, C / J2, J2, HP)."""
    return tl.reshape(x3.to(dt), (x3.shape[0], x3.shape[1] // J2, J2, x3.shape[2]))


@triton.jit
def _pair_trace(acc, HP: tl.constexpr, J2: tl.constexpr):
    """(HP, HP): [a, b] = the trace of block (a, b) of a ``_pair_lhs`` x ``_pair_rhs`` product."""
    a4 = tl.reshape(acc, (HP, J2, HP, J2))
    d = tl.arange(0, J2)
    diag = (d[:, None] == d[None, :])[None, :, None, :]
    t = tl.reshape(tl.permute(tl.where(diag, a4, 0.0), (0, 2, 1, 3)), (HP, HP, J2 * J2))
    return tl.sum(t, 2)


@triton.jit
def _load_vector(Vp, s0, hs, H: tl.constexpr, PRESENT: tl.constexpr, fill):
    """(1, 1, HP) float32 vector; `fill` where absent, 0 in padding slots."""
    if PRESENT:
        x = tl.load(Vp + hs * s0, mask=hs < H, other=0.0).to(tl.float32)
    else:
        x = tl.where(hs < H, fill, 0.0)
    return x[None, None, :]


@triton.jit
def _rows_tile(offs, ok, s_n, offs_d, s_d, D: tl.constexpr):
    """Offsets and mask of a (rows, BLOCK_D) tile: rows offs (valid where ok) of stride
    s_n, columns offs_d (< D) of stride s_d."""
    return offs[:, None] * s_n + offs_d[None, :] * s_d, ok[:, None] & (offs_d[None, :] < D)


@triton.jit
def _cols_tile(offs, ok, s_n, offs_d, s_d, D: tl.constexpr):
    """The transposed tile (BLOCK_D, rows) of ``_rows_tile``."""
    return offs[None, :] * s_n + offs_d[:, None] * s_d, ok[None, :] & (offs_d[:, None] < D)


@triton.jit
def _chunk_tile(offs, ok, s_n, s_d, D: tl.constexpr, C0: tl.constexpr, C: tl.constexpr):
    """The columns C0 .. C0 + C - 1 of a (rows, D) operand, one K chunk of a product
    (``_dot_head``): the columns, the (rows, C) tile's offsets and mask. A chunk at a
    time: triton 3.6 cannot return None (an absent second chunk) from a function."""
    cols = C0 + tl.arange(0, C)
    offs_t, mask_t = _rows_tile(offs, ok, s_n, cols, s_d, D)
    return cols, offs_t, mask_t


@triton.jit
def _vectors(POST_B, s_pb, NORM_W, s_nw, NORM_B, s_nb, hs, H: tl.constexpr, HAS_POST_B: tl.constexpr,
             HAS_NORM_W: tl.constexpr, HAS_NORM_B: tl.constexpr):  # fmt: skip
    """The post-mix bias, the head norm's weight and bias: (1, 1, HP) float32 each."""
    return (
        _load_vector(POST_B, s_pb, hs, H, HAS_POST_B, 0.0), _load_vector(NORM_W, s_nw, hs, H, HAS_NORM_W, 1.0),
        _load_vector(NORM_B, s_nb, hs, H, HAS_NORM_B, 0.0),
    )  # fmt: skip


@triton.jit
def _probs(l3, lse3, ok3, POST_W, s_out, s_in, post_b, hs, H: tl.constexpr,
           HAS_POST: tl.constexpr, HAS_POST_B: tl.constexpr, live, l_scale=None):  # fmt: skip
    """p = exp2(l - lse) (log2 units; 0 where ok3 is false, unless ok3 is None) and r, p
    post-mixed; with l_scale, p = exp2(l * l_scale - lse) (one FMA: the logits' scale
    there rather than on the pre-mix weights)."""
    if l_scale is not None:
        p = tl.exp2(l3 * l_scale - lse3)
    else:
        p = tl.exp2(l3 - lse3)
    if ok3 is not None:
        p = tl.where(ok3, p, 0.0)
    r = p
    if HAS_POST:
        r = _mix(p, POST_W, s_out, s_in, hs, H, live)
        if HAS_POST_B:
            r += post_b
    return p, r


@triton.jit
def _head_norm_bwd(dn3, xhat, rho, norm_w, valid, inv_h):
    """dr from dn through n = x^ w + beta, x^ = (r - mean) rho (means over real heads)."""
    g = dn3 * norm_w
    mg = tl.sum(g, 2) * inv_h
    mgx = tl.sum(g * xhat, 2) * inv_h
    return rho[:, :, None] * (g - mg[:, :, None] - xhat * mgx[:, :, None]) * valid


@triton.jit
def _rho(var_eps):
    """The head norm's 1 / sqrt(variance + eps), 0 where that is 0 (see ``_head_norm``;
    the tensor-core kernels use it too)."""
    return tl.where(var_eps > 0.0, tl.rsqrt(var_eps), 0.0)


@triton.jit
def _head_norm(r3, norm_w, norm_b, valid, inv_h, eps):
    """LayerNorm over the head slots (valid: 1 for real heads): n, x^ and rho (R, C).
    Where the variance plus eps is 0 (eps = 0 and every head's r equal: at a padding
    key, whose p is 0 in every head; at a real key only where p underflows in every
    head), rho is 0, not inf: x^ = 0 (the norm's output its bias) and the backward's
    dr = 0, where 0 * inf would be NaN (a padding key's zero v row would carry it into
    every output of its query rows). At such a real key eager LayerNorm gives NaN too;
    the float64 reference, whose p does not underflow, a value no 16- or 32-bit
    arithmetic reproduces (at eps = 0 the norm is scale-invariant)."""
    mean = tl.sum(r3 * valid, 2) * inv_h
    xc = (r3 - mean[:, :, None]) * valid
    rho = _rho(tl.sum(xc * xc, 2) * inv_h + eps)
    xhat = xc * rho[:, :, None]
    return xhat * norm_w + norm_b, xhat, rho


# ----------------------------------------------------------------------------
# forward


@triton.jit
def _key_ok(offs_n, NK, MASKED: tl.constexpr):
    """The keys of a tile that exist: offs_n < NK, or all (a full block, no mask)."""
    if MASKED:
        return offs_n < NK
    else:
        return tl.full(offs_n.shape, 1, tl.int1)


@triton.jit
def _fwd_logits(
    start_n, NK, Qb, Kb, PRE_W, q_offs, q_mask, q_offs2, q_mask2, offs_ka, offs_kb, hs, qk_scale, bias,
    stride_qh, stride_kh, stride_kn, stride_kd, stride_pre0, stride_pre1,
    H: tl.constexpr, HP: tl.constexpr, BLOCK_N: tl.constexpr, DK: tl.constexpr, HAS_PRE: tl.constexpr,
    VQ: tl.constexpr, VK: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """The forward's key tile at start_n: (l (BM, BN, HP) in log2 units, bias added in the
    pre-mix's first FMA; the tile's keys offs_n and n_ok). q.k over K in two chunks
    where q_offs2 is given (``_dot_head``)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_ok = _key_ok(offs_n, NK, MASKED)
    kt_offs, kt_mask = _cols_tile(offs_n, n_ok, stride_kn, offs_ka, stride_kd, DK)  # (KA, BN)
    kt_offs2, kt_mask2 = None, None
    if offs_kb is not None:
        kt_offs2, kt_mask2 = _cols_tile(offs_n, n_ok, stride_kn, offs_kb, stride_kd, DK)  # (KB, BN)
    s3 = _dots(Qb, q_offs, q_mask, stride_qh, 1, VQ, Kb, kt_offs, kt_mask, stride_kh, VK, 1, 0, 1, HP, H,
               q_offs2, q_mask2, kt_offs2, kt_mask2)  # fmt: skip
    return _logits(s3, PRE_W, stride_pre0, stride_pre1, hs, qk_scale, H, HAS_PRE, True, bias), offs_n, n_ok


@triton.jit
def _fwd_stats(
    start_n, NK, m_i, l_i, Qb, Kb, PRE_W, q_offs, q_mask, q_offs2, q_mask2, offs_ka, offs_kb, hs, qk_scale,
    stride_qh, stride_kh, stride_kn, stride_kd, stride_pre0, stride_pre1,
    H: tl.constexpr, HP: tl.constexpr, BLOCK_N: tl.constexpr, DK: tl.constexpr, HAS_PRE: tl.constexpr,
    VQ: tl.constexpr, VK: tl.constexpr, FOLD: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """Pass 1's step over the key tile at start_n: the running row max m_i and sum l_i
    (BM, HP) of every mixed head; MASKED: padding keys in the tile (their logits -inf)."""
    key_bias = None
    if MASKED and FOLD:  # -inf on the padding keys, added in the pre-mix's first FMA (no select)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        key_bias = tl.broadcast_to(tl.where(offs_n < NK, 0.0, float("-inf"))[None, :, None], (1, BLOCK_N, HP))
    l3, offs_n, n_ok = _fwd_logits(
        start_n, NK, Qb, Kb, PRE_W, q_offs, q_mask, q_offs2, q_mask2, offs_ka, offs_kb, hs, qk_scale, key_bias,
        stride_qh, stride_kh, stride_kn, stride_kd, stride_pre0, stride_pre1, H, HP, BLOCK_N, DK, HAS_PRE,
        VQ, VK, MASKED,
    )  # fmt: skip
    if MASKED and not FOLD:
        l3 = tl.where(n_ok[None, :, None], l3, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(l3, 1))
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(tl.exp2(l3 - m_new[:, None, :]), 1)
    return m_new, l_i


@triton.jit
def _fwd_probs(
    start_n, NK, lse2, Qb, Kb, PRE_W, POST_W, q_offs, q_mask, q_offs2, q_mask2, offs_ka, offs_kb, hs,
    post_b, norm_w, norm_b, valid, inv_h, eps, qk_scale,
    stride_qh, stride_kh, stride_kn, stride_kd, stride_pre0, stride_pre1, stride_post0, stride_post1,
    H: tl.constexpr, HP: tl.constexpr, BLOCK_N: tl.constexpr, DK: tl.constexpr,
    HAS_PRE: tl.constexpr, HAS_POST: tl.constexpr, HAS_POST_B: tl.constexpr, HAS_NORM: tl.constexpr,
    VQ: tl.constexpr, VK: tl.constexpr, FOLD: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """Pass 2's tile at start_n: (n (BM, BN, HP), the normalised, mixed (and normed)
    probabilities; offs_n, n_ok). MASKED: padding keys in the tile (p = 0 there: a k of 0
    gives p = exp2(-lse), which may overflow). With FOLD the -lse rides on the pre-mix's
    first FMA."""
    if FOLD:
        bias = -lse2[:, None, :]
        shift = 0.0
    else:
        bias = None
        shift = lse2[:, None, :]
    l3, offs_n, n_ok = _fwd_logits(
        start_n, NK, Qb, Kb, PRE_W, q_offs, q_mask, q_offs2, q_mask2, offs_ka, offs_kb, hs, qk_scale, bias,
        stride_qh, stride_kh, stride_kn, stride_kd, stride_pre0, stride_pre1, H, HP, BLOCK_N, DK, HAS_PRE,
        VQ, VK, MASKED,
    )  # fmt: skip
    ok3 = None
    if MASKED:
        ok3 = n_ok[None, :, None] & (hs < H)[None, None, :]
    _, n3 = _probs(l3, shift, ok3, POST_W, stride_post0, stride_post1, post_b, hs, H, HAS_POST, HAS_POST_B, True)
    if HAS_NORM:
        n3, _, _ = _head_norm(n3, norm_w, norm_b, valid, inv_h, eps)
    return n3, offs_n, n_ok


@triton.jit
def _fwd_pv(n3, Vb, offs_n, n_ok, cols, acc, stride_vh, stride_vn, stride_vd, H: tl.constexpr,
            HP: tl.constexpr, DV: tl.constexpr, VV: tl.constexpr):  # fmt: skip
    """acc (BM, C, HP) += n3 @ the v tile's columns cols (C of them) of every head."""
    v_offs, v_mask = _rows_tile(offs_n, n_ok, stride_vn, cols, stride_vd, DV)  # (BN, C)
    return _dots_acc(n3, Vb, v_offs, v_mask, stride_vh, 1, VV, acc, 0, 1, HP, H)


@triton.jit
def _fwd_step(
    start_n, NK, lse2, accs, Qb, Kb, Vb, PRE_W, POST_W, q_offs, q_mask, q_offs2, q_mask2, offs_ka, offs_kb,
    offs_va, offs_vb, hs, post_b, norm_w, norm_b, valid, inv_h, eps, qk_scale,
    stride_qh, stride_kh, stride_kn, stride_kd, stride_vh, stride_vn, stride_vd,
    stride_pre0, stride_pre1, stride_post0, stride_post1,
    H: tl.constexpr, HP: tl.constexpr, BLOCK_N: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    HAS_PRE: tl.constexpr, HAS_POST: tl.constexpr, HAS_POST_B: tl.constexpr, HAS_NORM: tl.constexpr,
    VQ: tl.constexpr, VK: tl.constexpr, VV: tl.constexpr, VB: tl.constexpr, FOLD: tl.constexpr,
    MASKED: tl.constexpr,
):  # fmt: skip
    """Pass 2's step over the key tile at start_n: the accumulators accs (``_fwd_kernel``)
    plus the tile's probabilities times v. MASKED: padding keys in the tile. (A tuple: a
    None accumulator for VB = 0 cannot be reassigned in the loops.)"""
    n3, offs_n, n_ok = _fwd_probs(
        start_n, NK, lse2, Qb, Kb, PRE_W, POST_W, q_offs, q_mask, q_offs2, q_mask2, offs_ka, offs_kb, hs,
        post_b, norm_w, norm_b, valid, inv_h, eps, qk_scale,
        stride_qh, stride_kh, stride_kn, stride_kd, stride_pre0, stride_pre1, stride_post0, stride_post1,
        H, HP, BLOCK_N, DK, HAS_PRE, HAS_POST, HAS_POST_B, HAS_NORM, VQ, VK, FOLD, MASKED,
    )  # fmt: skip
    acc = _fwd_pv(n3, Vb, offs_n, n_ok, offs_va, accs[0], stride_vh, stride_vn, stride_vd, H, HP, DV, VV)
    if VB > 0:
        accs = (acc, _fwd_pv(n3, Vb, offs_n, n_ok, offs_vb, accs[1], stride_vh, stride_vn, stride_vd, H, HP, DV, VV))
    else:
        accs = (acc,)
    return accs


@triton.jit
def _fwd_store(O, acc, b, offs_m, m_ok, cols, hs, NQ, H: tl.constexpr, DV: tl.constexpr):
    """out's (BM, C, HP) tile at columns cols; out (B, H, NQ, DV) contiguous."""
    o_ptrs = O + (b * H + hs[None, None, :]) * NQ * DV + offs_m[:, None, None] * DV + cols[None, :, None]
    o_mask = m_ok[:, None, None] & (cols[None, :, None] < DV) & (hs[None, None, :] < H)
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=o_mask)


@triton.jit
def _fwd_kernel(
    Q, K, V, PRE_W, POST_W, POST_B, NORM_W, NORM_B, O, LSE,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_pre0, stride_pre1, stride_post0, stride_post1, stride_postb, stride_nw, stride_nb,
    NQ, NK, NUM_QB, qk_scale, eps,  # qk_scale: scale * log2(e)
    H: tl.constexpr, HP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    HAS_PRE: tl.constexpr, HAS_POST: tl.constexpr, HAS_POST_B: tl.constexpr,
    HAS_NORM: tl.constexpr, HAS_NORM_W: tl.constexpr, HAS_NORM_B: tl.constexpr,
    VQ: tl.constexpr, VK: tl.constexpr, VV: tl.constexpr, VG: tl.constexpr, FOLD: tl.constexpr,
    BLOCK_S: tl.constexpr, PEEL: tl.constexpr, KA: tl.constexpr, KB: tl.constexpr, VA: tl.constexpr,
    VB: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    pid_m = pid % NUM_QB
    b = (pid // NUM_QB).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < NQ
    hs = tl.arange(0, HP)  # the head of each slot
    valid = (hs < H).to(tl.float32)[None, None, :]
    inv_h = 1.0 / H

    Qb = Q + b * stride_qb
    Kb = K + b * stride_kb
    Vb = V + b * stride_vb
    # q.k over K = DK in two chunks of KA + KB columns (``_dot_head``), and the output's
    # DV columns as VA + VB (two accumulators: 48 = 32 + 16, not padded to 64)
    offs_ka, q_offs, q_mask = _chunk_tile(offs_m, m_ok, stride_qn, stride_qd, DK, 0, KA)  # (BM, KA)
    offs_kb, q_offs2, q_mask2 = None, None, None
    if KB > 0:
        offs_kb, q_offs2, q_mask2 = _chunk_tile(offs_m, m_ok, stride_qn, stride_qd, DK, KA, KB)  # (BM, KB)
    offs_va = tl.arange(0, VA)
    offs_vb = None
    if VB > 0:
        offs_vb = VA + tl.arange(0, VB)

    post_b, norm_w, norm_b = _vectors(POST_B, stride_postb, NORM_W, stride_nw, NORM_B, stride_nb, hs, H,
                                      HAS_POST_B, HAS_NORM_W, HAS_NORM_B)  # fmt: skip

    # pass 1: row max and sum of every mixed head (log2 units), over the full key blocks
    # of BLOCK_S without key masks, then the rest in blocks of BLOCK_N, masked (without
    # PEEL every block masked: two copies of the loops spilled there)
    m_i = tl.full([BLOCK_M, HP], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M, HP], tl.float32)
    nk_s = NK - NK % BLOCK_S if PEEL else 0
    for start_s in range(0, nk_s, BLOCK_S):
        m_i, l_i = _fwd_stats(
            start_s, NK, m_i, l_i, Qb, Kb, PRE_W, q_offs, q_mask, q_offs2, q_mask2, offs_ka, offs_kb, hs,
            qk_scale, stride_qh, stride_kh, stride_kn, stride_kd, stride_pre0, stride_pre1,
            H, HP, BLOCK_S, DK, HAS_PRE, VQ, VK, FOLD, False,
        )  # fmt: skip
    for start_t in range(nk_s, NK, BLOCK_N):
        m_i, l_i = _fwd_stats(
            start_t, NK, m_i, l_i, Qb, Kb, PRE_W, q_offs, q_mask, q_offs2, q_mask2, offs_ka, offs_kb, hs,
            qk_scale, stride_qh, stride_kh, stride_kn, stride_kd, stride_pre0, stride_pre1,
            H, HP, BLOCK_N, DK, HAS_PRE, VQ, VK, FOLD, True,
        )  # fmt: skip
    lse2 = m_i + tl.log2(l_i)  # (BM, HP)
    lse_ptrs = LSE + (b * H + hs[None, :]) * NQ + offs_m[:, None]  # (B, H, NQ) contiguous
    lse_mask = m_ok[:, None] & (hs[None, :] < H)
    if FOLD:  # lse (natural log) stored now, so that only -lse stays live (sm_80 spilled)
        tl.store(lse_ptrs, lse2 * 0.6931471805599453, mask=lse_mask)

    # pass 2: normalised, mixed (and normed) probabilities times v; the full key blocks
    # without key masks, then the last (partial) one masked
    # the output's columns offs_va (and offs_vb): accs = (acc (BM, VA, HP)[, acc2 (BM, VB, HP)])
    accs = (tl.zeros([BLOCK_M, VA, HP], tl.float32),)
    if VB > 0:
        accs = (accs[0], tl.zeros([BLOCK_M, VB, HP], tl.float32))
    nk_n = NK - NK % BLOCK_N if PEEL else 0
    for start_n in range(0, nk_n, BLOCK_N):
        accs = _fwd_step(
            start_n, NK, lse2, accs, Qb, Kb, Vb, PRE_W, POST_W, q_offs, q_mask, q_offs2, q_mask2, offs_ka,
            offs_kb, offs_va, offs_vb, hs, post_b, norm_w, norm_b, valid, inv_h, eps, qk_scale,
            stride_qh, stride_kh, stride_kn, stride_kd, stride_vh, stride_vn, stride_vd,
            stride_pre0, stride_pre1, stride_post0, stride_post1,
            H, HP, BLOCK_N, DK, DV, HAS_PRE, HAS_POST, HAS_POST_B, HAS_NORM, VQ, VK, VV, VB, FOLD, False,
        )  # fmt: skip
    for start_u in range(nk_n, NK, BLOCK_N):
        accs = _fwd_step(
            start_u, NK, lse2, accs, Qb, Kb, Vb, PRE_W, POST_W, q_offs, q_mask, q_offs2, q_mask2, offs_ka,
            offs_kb, offs_va, offs_vb, hs, post_b, norm_w, norm_b, valid, inv_h, eps, qk_scale,
            stride_qh, stride_kh, stride_kn, stride_kd, stride_vh, stride_vn, stride_vd,
            stride_pre0, stride_pre1, stride_post0, stride_post1,
            H, HP, BLOCK_N, DK, DV, HAS_PRE, HAS_POST, HAS_POST_B, HAS_NORM, VQ, VK, VV, VB, FOLD, True,
        )  # fmt: skip

    _fwd_store(O, accs[0], b, offs_m, m_ok, offs_va, hs, NQ, H, DV)
    if VB > 0:
        _fwd_store(O, accs[1], b, offs_m, m_ok, offs_vb, hs, NQ, H, DV)
    if not FOLD:  # stored here, the few-rows layout takes fewer registers
        tl.store(lse_ptrs, lse2 * 0.6931471805599453, mask=lse_mask)


# ----------------------------------------------------------------------------
# backward


@triton.jit
def _tile_probs(
    s3, qk_scale, lse3, ok3, PRE_W, stride_pre0, stride_pre1,
    POST_W, stride_post0, stride_post1, post_b, norm_w, norm_b, valid, inv_h, eps, hs,
    H: tl.constexpr, HAS_PRE: tl.constexpr, HAS_POST: tl.constexpr, HAS_POST_B: tl.constexpr,
    HAS_NORM: tl.constexpr, live, bias=None, SCALE_IN_EXP: tl.constexpr = False,
):  # fmt: skip
    """From a tile's products s3 = q.k: p, n, and the head norm's x^ and rho (r and 1
    without the head norm) for ``_tile_dp``; bias (broadcastable to s3, 0 or -inf)
    added to the logits in the pre-mix's first FMA. SCALE_IN_EXP: qk_scale applied in
    p's exponent (one FMA with -lse) instead of to the H*H pre-mix weights every tile."""
    if SCALE_IN_EXP:
        l3 = _logits(s3, PRE_W, stride_pre0, stride_pre1, hs, 1.0, H, HAS_PRE, live, bias)
        p, n = _probs(l3, lse3, ok3, POST_W, stride_post0, stride_post1, post_b, hs, H, HAS_POST,
                      HAS_POST_B, live, qk_scale)  # fmt: skip
    else:
        l3 = _logits(s3, PRE_W, stride_pre0, stride_pre1, hs, qk_scale, H, HAS_PRE, live, bias)
        p, n = _probs(l3, lse3, ok3, POST_W, stride_post0, stride_post1, post_b, hs, H, HAS_POST,
                      HAS_POST_B, live)  # fmt: skip
    xhat = n
    rho = 1.0
    if HAS_NORM:
        n, xhat, rho = _head_norm(n, norm_w, norm_b, valid, inv_h, eps)
    return p, n, xhat, rho


@triton.jit
def _tile_dp(
    dn3, xhat, rho, norm_w, valid, inv_h, POST_W, stride_post0, stride_post1, hs,
    H: tl.constexpr, HAS_POST: tl.constexpr, HAS_NORM: tl.constexpr, live,
):  # fmt: skip
    """From a tile's dn3 = <do, v> (and ``_tile_probs``'s x^, rho): dr and dp, the
    gradients of r and of p."""
    dr = dn3
    if HAS_NORM:
        dr = _head_norm_bwd(dn3, xhat, rho, norm_w, valid, inv_h)
    dp = dr
    if HAS_POST:  # dp_g = sum_f P[f, g] dr_f: the transposed mixing
        dp = _mix(dr, POST_W, stride_post1, stride_post0, hs, H, live)
    return dr, dp


@triton.jit(do_not_specialize=["NUM_QB"])
def _bwd_dq_kernel(
    Q, K, V, DO, PRE_W, POST_W, POST_B, NORM_W, NORM_B, LSE, DELTA, DQ_, PART,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_gb, stride_gh, stride_gn, stride_gd,
    stride_pre0, stride_pre1, stride_post0, stride_post1, stride_postb, stride_nw, stride_nb,
    NQ, NK, NUM_QB, NPART, qk_scale, sm_scale, eps,
    H: tl.constexpr, HP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    HAS_PRE: tl.constexpr, HAS_POST: tl.constexpr, HAS_POST_B: tl.constexpr,
    HAS_NORM: tl.constexpr, HAS_NORM_W: tl.constexpr, HAS_NORM_B: tl.constexpr,
    VQ: tl.constexpr, VK: tl.constexpr, VV: tl.constexpr, VG: tl.constexpr,
    DELTA_PASS: tl.constexpr, PAIR_DOT: tl.constexpr, KA: tl.constexpr, KB: tl.constexpr,
    VA: tl.constexpr, VB: tl.constexpr, HOLD: tl.constexpr, LIVE_QH: tl.constexpr, LIVE_GH: tl.constexpr,
    DEFER_ROWSUM: tl.constexpr, ROW0: tl.constexpr, ONE_QB: tl.constexpr,
):  # fmt: skip
    """A program per (b, query block), one pass over the key blocks, the blocks from
    query ROW0 on. DELTA_PASS: delta (B, H, NQ) and this program's row of PART, the
    partial sums of dP (HP x HP, [f, g]), dc, dw, dbeta, dA (HP x HP, [g, h]). Else
    (delta read back): dq (B, H, NQ, DK) of every head. (One launch doing both passes
    spilled.) ONE_QB: NUM_QB is 1 and the code may know it (the launcher's choice:
    NUM_QB itself is never specialised, see ``_one_block``)."""
    pid = tl.program_id(0)
    if ONE_QB:
        pid_m = 0
        b = pid.to(tl.int64)
    else:
        pid_m = pid % NUM_QB
        b = (pid // NUM_QB).to(tl.int64)
    offs_m = ROW0 + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < NQ
    hs = tl.arange(0, HP)
    valid = (hs < H).to(tl.float32)[None, None, :]
    inv_h = 1.0 / H
    post_b, norm_w, norm_b = _vectors(POST_B, stride_postb, NORM_W, stride_nw, NORM_B, stride_nb, hs, H,
                                      HAS_POST_B, HAS_NORM_W, HAS_NORM_B)  # fmt: skip

    Qb = Q + b * stride_qb
    Kb = K + b * stride_kb
    Vb = V + b * stride_vb
    Gb = DO + b * stride_gb
    # q.k and dO.v over K in two chunks (``_dot_head``): DK = KA + KB, DV = VA + VB columns
    offs_ka, q_offs, q_mask = _chunk_tile(offs_m, m_ok, stride_qn, stride_qd, DK, 0, KA)  # (BM, KA)
    offs_va, g_offs, g_mask = _chunk_tile(offs_m, m_ok, stride_gn, stride_gd, DV, 0, VA)  # (BM, VA)
    offs_kb, q_offs2, q_mask2, offs_vb, g_offs2, g_mask2 = None, None, None, None, None, None
    if KB > 0:
        offs_kb, q_offs2, q_mask2 = _chunk_tile(offs_m, m_ok, stride_qn, stride_qd, DK, KA, KB)  # (BM, KB)
    if VB > 0:
        offs_vb, g_offs2, g_mask2 = _chunk_tile(offs_m, m_ok, stride_gn, stride_gd, DV, VA, VB)  # (BM, VB)
    row_ok = m_ok[:, None] & (hs[None, :] < H)
    rows = (b * H + hs[None, :]) * NQ + offs_m[:, None]  # (BM, HP) into (B, H, NQ)
    lse2 = tl.load(LSE + rows, mask=row_ok, other=0.0) * 1.4426950408889634
    part = PART + pid.to(tl.int64) * NPART
    J2: tl.constexpr = min(BLOCK_N, 64 // HP)  # the H x H sums as products of HP*J2 rows (``_pair_lhs``)
    DT: tl.constexpr = Q.dtype.element_ty

    if DELTA_PASS:
        delta = _delta_pass(
            Qb, Kb, Vb, Gb, PRE_W, POST_W, q_offs, q_mask, g_offs, g_mask,
            q_offs2, q_mask2, g_offs2, g_mask2, row_ok, rows, lse2,
            DELTA, part, offs_ka, offs_kb, offs_va, offs_vb,
            stride_qh, stride_kh, stride_kn, stride_kd, stride_vh, stride_vn, stride_vd, stride_gh,
            stride_pre0, stride_pre1, stride_post0, stride_post1, post_b, norm_w, norm_b,
            valid, inv_h, eps, hs, NK, qk_scale, sm_scale,
            H, HP, BLOCK_M, BLOCK_N, DK, DV, HAS_PRE, HAS_POST, HAS_POST_B, HAS_NORM, VQ, VK, VV, VG,
            J2, DT, PAIR_DOT, LIVE_QH, LIVE_GH, DEFER_ROWSUM,
        )  # fmt: skip
    else:
        delta = tl.load(DELTA + rows, mask=row_ok, other=0.0)
        _dq_pass(
            Qb, Kb, Vb, Gb, PRE_W, POST_W, q_offs, q_mask, g_offs, g_mask,
            q_offs2, q_mask2, g_offs2, g_mask2, row_ok, lse2, delta,
            DQ_, offs_m, m_ok, offs_ka, offs_kb, offs_va, offs_vb, b, NQ,
            stride_qh, stride_kh, stride_kn, stride_kd, stride_vh, stride_vn, stride_vd, stride_gh,
            stride_pre0, stride_pre1, stride_post0, stride_post1, post_b, norm_w, norm_b,
            valid, inv_h, eps, hs, NK, qk_scale, sm_scale,
            H, HP, BLOCK_M, BLOCK_N, BLOCK_DK, DK, DV, HAS_PRE, HAS_POST, HAS_POST_B, HAS_NORM,
            VQ, VK, VV, VG, HOLD,
        )  # fmt: skip


@triton.jit
def _bwd_key_tile(
    start_n, NK, Qb, Kb, Vb, Gb, q_offs, q_mask, g_offs, g_mask,
    q_offs2, q_mask2, g_offs2, g_mask2, row_ok, offs_ka, offs_kb, offs_va, offs_vb,
    stride_qh, stride_kh, stride_kn, stride_kd, stride_vh, stride_vn, stride_vd, stride_gh,
    BLOCK_N: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, HP: tl.constexpr, H: tl.constexpr,
    VQ: tl.constexpr, VK: tl.constexpr, VV: tl.constexpr, VG: tl.constexpr, HOLD: tl.constexpr = False,
    LIVE_QH: tl.constexpr = False, LIVE_GH: tl.constexpr = False,
):  # fmt: skip
    """The start of every backward step over a query block's key tile at start_n:
    (s3 = q_h . k_h, dn3 = dO_h . v_h, both (BM, BN, HP); ok3, the valid (row, key, head)
    entries; live, ``_live``: q and dO reloaded each tile, not held for the loop, unless
    HOLD (the dq launch: held in registers as mma.sync operands, fewer than reloaded);
    the tile's keys offs_n and n_ok). LIVE_QH, LIVE_GH: q's (dO's) head stride made
    loop-variant too, so that each head's q (dO) addresses are formed in the loop
    instead of held through it (the delta launch, ``_bwd_cfg``)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_ok = offs_n < NK
    live = _live(start_n, NK)
    q_live = tl.full([], 1, tl.int1) if HOLD else live  # the q and dO loads' condition
    kt_offs, kt_mask = _cols_tile(offs_n, n_ok, stride_kn, offs_ka, stride_kd, DK)  # (KA, BN)
    vt_offs, vt_mask = _cols_tile(offs_n, n_ok, stride_vn, offs_va, stride_vd, DV)  # (VA, BN)
    kt_offs2, kt_mask2, vt_offs2, vt_mask2, q_live2, g_live2 = None, None, None, None, None, None
    if offs_kb is not None:
        kt_offs2, kt_mask2 = _cols_tile(offs_n, n_ok, stride_kn, offs_kb, stride_kd, DK)  # (KB, BN)
        q_live2 = tl.where(q_live, q_mask2, False)
    if offs_vb is not None:
        vt_offs2, vt_mask2 = _cols_tile(offs_n, n_ok, stride_vn, offs_vb, stride_vd, DV)  # (VB, BN)
        g_live2 = tl.where(q_live, g_mask2, False)
    if LIVE_QH:
        stride_qh = tl.where(live, stride_qh, 0)
    if LIVE_GH:
        stride_gh = tl.where(live, stride_gh, 0)
    s3 = _dots(Qb, q_offs, tl.where(q_live, q_mask, False), stride_qh, 1, VQ,
               Kb, kt_offs, kt_mask, stride_kh, VK, 1, 0, 1, HP, H, q_offs2, q_live2, kt_offs2, kt_mask2)
    dn3 = _dots(Gb, g_offs, tl.where(q_live, g_mask, False), stride_gh, 1, VG,
                Vb, vt_offs, vt_mask, stride_vh, VV, 1, 0, 1, HP, H, g_offs2, g_live2, vt_offs2, vt_mask2)
    return s3, dn3, n_ok[None, :, None] & row_ok[:, None, :], live, offs_n, n_ok


@triton.jit
def _key_head_ok(n_ok, hs, H: tl.constexpr, HP: tl.constexpr):
    """(1, BN, 1 or HP): the tile's real keys (and real head slots where H < HP), the
    delta launch's mask of p: a padded query row needs none there, its dO is 0, so every
    sum it reaches (delta, dP, dc, dw, dbeta, dA) gets 0 from it."""
    if H == HP:
        return n_ok[None, :, None]
    else:
        return n_ok[None, :, None] & (hs < H)[None, None, :]


@triton.jit
def _delta_pass(
    Qb, Kb, Vb, Gb, PRE_W, POST_W, q_offs, q_mask, g_offs, g_mask,
    q_offs2, q_mask2, g_offs2, g_mask2, row_ok, rows, lse2,
    DELTA, part, offs_ka, offs_kb, offs_va, offs_vb,
    stride_qh, stride_kh, stride_kn, stride_kd, stride_vh, stride_vn, stride_vd, stride_gh,
    stride_pre0, stride_pre1, stride_post0, stride_post1, post_b, norm_w, norm_b,
    valid, inv_h, eps, hs, NK, qk_scale, sm_scale,
    H: tl.constexpr, HP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, HAS_PRE: tl.constexpr, HAS_POST: tl.constexpr,
    HAS_POST_B: tl.constexpr, HAS_NORM: tl.constexpr,
    VQ: tl.constexpr, VK: tl.constexpr, VV: tl.constexpr, VG: tl.constexpr,
    J2: tl.constexpr, DT: tl.constexpr, PAIR_DOT: tl.constexpr, LIVE_QH: tl.constexpr,
    LIVE_GH: tl.constexpr, DEFER_ROWSUM: tl.constexpr,
):  # fmt: skip
    """delta (B, H, NQ) of a query block, and its partial sums of dP (HP x HP, [f, g]),
    dc, dw, dbeta and dA (HP x HP, [g, h]) at part. The first loop over the keys sums
    delta, dP, dc, dw, dbeta; dA = sum_ij dl_g s_h needs delta (dl_g = p_g (dp_g -
    delta_g)), so a second loop recomputes the tiles for it (no dq accumulator beside
    them, unlike the dq pass, where it spilled). The H x H sums are tensor-core products
    over the flattened tile (``_pair_lhs``), not reductions across the rows each tile
    (PAIR_DOT; without, on sm_80, where those products spilled: ``_outer_rows`` sums)."""
    delta = tl.zeros([BLOCK_M, HP], tl.float32)
    if DEFER_ROWSUM:  # per-thread partial sums of delta: 4 per row (the lanes of a row's keys)
        delta4 = tl.zeros([BLOCK_M, 4, HP], tl.float32)
    if PAIR_DOT:
        acc_dp = tl.zeros([HP * J2, HP * J2], tl.float32)  # ``_pair_lhs`` of dr times ``_pair_rhs`` of p
    else:
        acc_dp = tl.zeros([HP, HP], tl.float32)  # [f, g]
    acc_dc = tl.zeros([BLOCK_M, HP], tl.float32)
    acc_dw = tl.zeros([BLOCK_M, HP], tl.float32)
    acc_db = tl.zeros([BLOCK_M, HP], tl.float32)
    for start_n in range(0, NK, BLOCK_N):
        s3, dn3, ok3, live, offs_n, n_ok = _bwd_key_tile(
            start_n, NK, Qb, Kb, Vb, Gb, q_offs, q_mask, g_offs, g_mask,
            q_offs2, q_mask2, g_offs2, g_mask2, row_ok, offs_ka, offs_kb, offs_va, offs_vb,
            stride_qh, stride_kh, stride_kn, stride_kd, stride_vh, stride_vn, stride_vd, stride_gh,
            BLOCK_N, DK, DV, HP, H, VQ, VK, VV, VG, False, LIVE_QH, LIVE_GH,
        )  # fmt: skip
        p, _, xhat, rho = _tile_probs(
            s3, qk_scale, lse2[:, None, :], _key_head_ok(n_ok, hs, H, HP), PRE_W, stride_pre0, stride_pre1,
            POST_W, stride_post0, stride_post1, post_b, norm_w, norm_b, valid, inv_h, eps, hs,
            H, HAS_PRE, HAS_POST, HAS_POST_B, HAS_NORM, live, None, True,
        )  # fmt: skip
        dr, dp = _tile_dp(dn3, xhat, rho, norm_w, valid, inv_h, POST_W, stride_post0, stride_post1, hs,
                          H, HAS_POST, HAS_NORM, live)  # fmt: skip
        if DEFER_ROWSUM:  # the keys j = 8 k + 2 t + e: sums over k and e (in a thread's registers)
            delta4 += tl.sum(tl.sum(tl.reshape(p * dp, (BLOCK_M, BLOCK_N // 8, 4, 2, HP)), 3), 1)
        else:
            delta += tl.sum(p * dp, 1)
        if HAS_NORM:
            acc_dw += tl.sum(dn3 * xhat, 1)
            acc_db += tl.sum(dn3, 1)
        if HAS_POST:
            if PAIR_DOT and HAS_NORM:
                # dr = rho u may pass float16's range (rho = 1 / std over the heads, large
                # at eps ~ 0): rho moved to p's side before the 16-bit rounding
                rinv = tl.where(rho > 0.0, 1.0 / rho, 0.0)[:, :, None]
                acc_dp = tl.dot(_pair_lhs(dr * rinv, J2, DT), _pair_rhs(p * rho[:, :, None], J2, DT), acc_dp,
                                input_precision="tf32x3")  # fmt: skip
            elif PAIR_DOT:
                acc_dp = tl.dot(_pair_lhs(dr, J2, DT), _pair_rhs(p, J2, DT), acc_dp, input_precision="tf32x3")
            else:
                acc_dp += tl.sum(_outer_rows(p, dr, HP), 0)  # [f, g]
            if HAS_POST_B:
                acc_dc += tl.sum(dr, 1)
    if DEFER_ROWSUM:  # across the lanes once
        delta = tl.sum(delta4, 1)
    tl.store(DELTA + rows, delta, mask=row_ok)
    if HAS_POST:  # stored now, so that the second loop holds no accumulator but dA's
        if PAIR_DOT:
            acc_dp = _pair_trace(acc_dp, HP, J2)
        tl.store(part + hs[:, None] * HP + hs[None, :], acc_dp)  # dP[f, g]
        if HAS_POST_B:
            tl.store(part + HP * HP + hs, tl.sum(acc_dc, 0))
    if HAS_NORM:
        tl.store(part + HP * HP + HP + hs, tl.sum(acc_dw, 0))
        tl.store(part + HP * HP + 2 * HP + hs, tl.sum(acc_db, 0))
    if HAS_PRE:  # s = scale * q.k
        acc_da = tl.zeros([HP, HP], tl.float32)  # [g, h], s unscaled
        if PAIR_DOT:
            acc_ds = tl.zeros([HP * J2, HP * J2], tl.float32)  # ``_pair_lhs`` of dl times ``_pair_rhs`` of s
        for start_n in range(0, NK, BLOCK_N):
            s3, dn3, ok3, live, offs_n, n_ok = _bwd_key_tile(
                start_n, NK, Qb, Kb, Vb, Gb, q_offs, q_mask, g_offs, g_mask,
                q_offs2, q_mask2, g_offs2, g_mask2, row_ok, offs_ka, offs_kb, offs_va, offs_vb,
                stride_qh, stride_kh, stride_kn, stride_kd, stride_vh, stride_vn, stride_vd, stride_gh,
                BLOCK_N, DK, DV, HP, H, VQ, VK, VV, VG, False, LIVE_QH, LIVE_GH,
            )  # fmt: skip
            if PAIR_DOT:
                s_rhs = _pair_rhs(s3, J2, DT)
            p, _, xhat, rho = _tile_probs(
                s3, qk_scale, lse2[:, None, :], _key_head_ok(n_ok, hs, H, HP), PRE_W, stride_pre0, stride_pre1,
                POST_W, stride_post0, stride_post1, post_b, norm_w, norm_b, valid, inv_h, eps, hs,
                H, HAS_PRE, HAS_POST, HAS_POST_B, HAS_NORM, live, None, True,
            )  # fmt: skip
            _, dp = _tile_dp(dn3, xhat, rho, norm_w, valid, inv_h, POST_W, stride_post0, stride_post1, hs,
                             H, HAS_POST, HAS_NORM, live)  # fmt: skip
            dl = p * (dp - delta[:, None, :])
            if PAIR_DOT:
                acc_ds = tl.dot(_pair_lhs(dl, J2, DT), s_rhs, acc_ds, input_precision="tf32x3")
            else:
                acc_da += tl.sum(_outer_rows(s3, dl, HP), 0)  # [g, h]
        if PAIR_DOT:
            acc_da = _pair_trace(acc_ds, HP, J2)
        tl.store(part + HP * HP + 3 * HP + hs[:, None] * HP + hs[None, :], acc_da * sm_scale)
    return delta


@triton.jit
def _dq_pass(
    Qb, Kb, Vb, Gb, PRE_W, POST_W, q_offs, q_mask, g_offs, g_mask,
    q_offs2, q_mask2, g_offs2, g_mask2, row_ok, lse2, delta,
    DQ_, offs_m, m_ok, offs_ka, offs_kb, offs_va, offs_vb, b, NQ,
    stride_qh, stride_kh, stride_kn, stride_kd, stride_vh, stride_vn, stride_vd, stride_gh,
    stride_pre0, stride_pre1, stride_post0, stride_post1, post_b, norm_w, norm_b,
    valid, inv_h, eps, hs, NK, qk_scale, sm_scale,
    H: tl.constexpr, HP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DK: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, HAS_PRE: tl.constexpr,
    HAS_POST: tl.constexpr, HAS_POST_B: tl.constexpr, HAS_NORM: tl.constexpr,
    VQ: tl.constexpr, VK: tl.constexpr, VV: tl.constexpr, VG: tl.constexpr, HOLD: tl.constexpr,
):  # fmt: skip
    """dq (B, H, NQ, DK) of every head of a query block (HOLD: ``_bwd_key_tile``)."""
    dq = tl.zeros([BLOCK_M, BLOCK_DK, HP], tl.float32)
    for start_n in range(0, NK, BLOCK_N):
        s3, dn3, ok3, live, offs_n, n_ok = _bwd_key_tile(
            start_n, NK, Qb, Kb, Vb, Gb, q_offs, q_mask, g_offs, g_mask,
            q_offs2, q_mask2, g_offs2, g_mask2, row_ok, offs_ka, offs_kb, offs_va, offs_vb,
            stride_qh, stride_kh, stride_kn, stride_kd, stride_vh, stride_vn, stride_vd, stride_gh,
            BLOCK_N, DK, DV, HP, H, VQ, VK, VV, VG, HOLD,
        )  # fmt: skip
        # the padded keys' logits -inf in the pre-mix's first FMA (p = 0 there, where a k
        # of 0 could meet an infinite p), the (row, key) mask left out: a padded row's dq
        # is not stored
        key_bias = tl.broadcast_to(tl.where(n_ok, 0.0, float("-inf"))[None, :, None], (1, BLOCK_N, HP))
        p, _, xhat, rho = _tile_probs(
            s3, qk_scale, lse2[:, None, :], (hs < H)[None, None, :], PRE_W, stride_pre0, stride_pre1,
            POST_W, stride_post0, stride_post1, post_b, norm_w, norm_b, valid, inv_h, eps, hs,
            H, HAS_PRE, HAS_POST, HAS_POST_B, HAS_NORM, live, key_bias,
        )  # fmt: skip
        _, dp = _tile_dp(dn3, xhat, rho, norm_w, valid, inv_h, POST_W, stride_post0, stride_post1, hs,
                         H, HAS_POST, HAS_NORM, live)  # fmt: skip
        ds = p * (dp - delta[:, None, :])  # d l
        if HAS_PRE:
            ds = _mix(ds, PRE_W, stride_pre1, stride_pre0, hs, H, live)  # sum_g A[g, h] dl_g
        offs_dk = tl.arange(0, BLOCK_DK)
        k_offs, k_mask = _rows_tile(offs_n, n_ok, stride_kn, offs_dk, stride_kd, DK)  # (BN, BDK)
        dq = _dots_acc(ds, Kb, k_offs, k_mask, stride_kh, 1, VK, dq, 0, 1, HP, H)

    offs_dk = tl.arange(0, BLOCK_DK)
    dq_ptrs = (
        DQ_ + (b * H + hs[None, None, :]) * NQ * DK
        + offs_m[:, None, None] * DK + offs_dk[None, :, None]
    )  # fmt: skip
    dq_mask = m_ok[:, None, None] & (offs_dk[None, :, None] < DK) & (hs[None, None, :] < H)
    tl.store(dq_ptrs, (dq * sm_scale).to(DQ_.dtype.element_ty), mask=dq_mask)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, PRE_W, POST_W, POST_B, NORM_W, NORM_B, LSE, DELTA, DK_, DV_,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_gb, stride_gh, stride_gn, stride_gd,
    stride_pre0, stride_pre1, stride_post0, stride_post1, stride_postb, stride_nw, stride_nb,
    NQ, NK, NUM_KB, qk_scale, sm_scale, eps,
    H: tl.constexpr, HP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    HAS_PRE: tl.constexpr, HAS_POST: tl.constexpr, HAS_POST_B: tl.constexpr,
    HAS_NORM: tl.constexpr, HAS_NORM_W: tl.constexpr, HAS_NORM_B: tl.constexpr,
    VQ: tl.constexpr, VK: tl.constexpr, VV: tl.constexpr, VG: tl.constexpr,
    G0: tl.constexpr, GP: tl.constexpr, KA: tl.constexpr, KB: tl.constexpr, VA: tl.constexpr,
    VB: tl.constexpr,
):  # fmt: skip
    """dk (B, H, NK, DK) and dv (B, H, NK, DV) of the heads G0 .. G0 + GP - 1: a program
    per key block, transposed tiles (keys x queries) over the query blocks."""
    pid = tl.program_id(0)
    pid_n = pid % NUM_KB
    b = (pid // NUM_KB).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    n_ok = offs_n < NK
    hs = tl.arange(0, HP)
    valid = (hs < H).to(tl.float32)[None, None, :]
    inv_h = 1.0 / H
    post_b, norm_w, norm_b = _vectors(POST_B, stride_postb, NORM_W, stride_nw, NORM_B, stride_nb, hs, H,
                                      HAS_POST_B, HAS_NORM_W, HAS_NORM_B)  # fmt: skip

    Qb = Q + b * stride_qb
    Kb = K + b * stride_kb
    Vb = V + b * stride_vb
    Gb = DO + b * stride_gb
    # q.k and dO.v with K in two chunks (``_dot_head``): DK = KA + KB, DV = VA + VB columns
    offs_ka, ka_offs, ka_mask = _chunk_tile(offs_n, n_ok, stride_kn, stride_kd, DK, 0, KA)  # (BN, KA)
    offs_va, va_offs, va_mask = _chunk_tile(offs_n, n_ok, stride_vn, stride_vd, DV, 0, VA)  # (BN, VA)
    offs_kb, kb_offs, kb_mask, offs_vb, vb_offs, vb_mask = None, None, None, None, None, None
    if KB > 0:
        offs_kb, kb_offs, kb_mask = _chunk_tile(offs_n, n_ok, stride_kn, stride_kd, DK, KA, KB)  # (BN, KB)
    if VB > 0:
        offs_vb, vb_offs, vb_mask = _chunk_tile(offs_n, n_ok, stride_vn, stride_vd, DV, VA, VB)  # (BN, VB)

    dk = tl.zeros([BLOCK_N, BLOCK_DK, GP], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV, GP], tl.float32)
    for start_m in range(0, NQ, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < NQ
        qta_offs, qta_mask = _cols_tile(offs_m, m_ok, stride_qn, offs_ka, stride_qd, DK)  # (KA, BM)
        gta_offs, gta_mask = _cols_tile(offs_m, m_ok, stride_gn, offs_va, stride_gd, DV)  # (VA, BM)
        qtb_offs, qtb_mask, gtb_offs, gtb_mask = None, None, None, None
        if KB > 0:
            qtb_offs, qtb_mask = _cols_tile(offs_m, m_ok, stride_qn, offs_kb, stride_qd, DK)  # (KB, BM)
        if VB > 0:
            gtb_offs, gtb_mask = _cols_tile(offs_m, m_ok, stride_gn, offs_vb, stride_gd, DV)  # (VB, BM)
        row_ok = m_ok[:, None] & (hs[None, :] < H)
        rows = hs[None, :] * NQ + offs_m[:, None]  # (BM, HP) into (H, NQ) of batch entry b
        lse2 = tl.load(LSE + b * H * NQ + rows, mask=row_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + b * H * NQ + rows, mask=row_ok, other=0.0)
        # p and n first, dv, then dn (fewer tiles live at once than with dn first)
        st3 = _dots(Kb, ka_offs, ka_mask, stride_kh, 1, VK, Qb, qta_offs, qta_mask, stride_qh, VQ, 1,
                    0, 1, HP, H, kb_offs, kb_mask, qtb_offs, qtb_mask)  # K = DK in two chunks
        ok3 = (hs < H)[None, None, :]  # padded keys and queries add nothing (module docstring)
        p, n, xhat, rho = _tile_probs(
            st3, qk_scale, lse2[None, :, :], ok3, PRE_W, stride_pre0, stride_pre1,
            POST_W, stride_post0, stride_post1, post_b, norm_w, norm_b, valid, inv_h, eps, hs,
            H, HAS_PRE, HAS_POST, HAS_POST_B, HAS_NORM, True,
        )  # fmt: skip
        g_offs, g_mask = _rows_tile(offs_m, m_ok, stride_gn, offs_dv, stride_gd, DV)  # (BM, BDV)
        dv = _dots_acc(
            _group(n, hs, G0, GP), Gb + G0 * stride_gh, g_offs, g_mask, stride_gh, 1, VG, dv,
            0, 1, GP, H - G0,
        )  # fmt: skip
        dn3 = _dots(Vb, va_offs, va_mask, stride_vh, 1, VV, Gb, gta_offs, gta_mask, stride_gh, VG, 1,
                    0, 1, HP, H, vb_offs, vb_mask, gtb_offs, gtb_mask)
        _, dp = _tile_dp(dn3, xhat, rho, norm_w, valid, inv_h, POST_W, stride_post0, stride_post1, hs,
                         H, HAS_POST, HAS_NORM, True)  # fmt: skip
        ds = p * (dp - delta[None, :, :])  # d l
        if HAS_PRE:
            ds = _mix(ds, PRE_W, stride_pre1, stride_pre0, hs, H, True)
        q_offs, q_mask = _rows_tile(offs_m, m_ok, stride_qn, offs_dk, stride_qd, DK)  # (BM, BDK)
        dk = _dots_acc(
            _group(ds, hs, G0, GP), Qb + G0 * stride_qh, q_offs, q_mask, stride_qh, 1, VQ, dk,
            0, 1, GP, H - G0,
        )  # fmt: skip

    gs = G0 + tl.arange(0, GP)
    base = (b * H + gs[None, None, :]) * NK + offs_n[:, None, None]
    mask = n_ok[:, None, None] & (gs[None, None, :] < H)
    tl.store(
        DK_ + base * DK + offs_dk[None, :, None], (dk * sm_scale).to(DK_.dtype.element_ty),
        mask=mask & (offs_dk[None, :, None] < DK),
    )
    tl.store(
        DV_ + base * DV + offs_dv[None, :, None], dv.to(DV_.dtype.element_ty),
        mask=mask & (offs_dv[None, :, None] < DV),
    )


@triton.jit
def _param_grad_kernel(
    PART, D_PRE, D_POST, D_POST_B, D_NORM_W, D_NORM_B, NROWS, NPART,
    H: tl.constexpr, HP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    HAS_PRE: tl.constexpr, HAS_POST: tl.constexpr, HAS_POST_B: tl.constexpr,
    HAS_NORM_W: tl.constexpr, HAS_NORM_B: tl.constexpr,
):  # fmt: skip
    """The parameters' gradients from the delta launch's partial sums, PART (NROWS,
    NPART) float32 with columns [dP (HP x HP, [f, g]), dc, dw, dbeta (HP each), dA (HP x
    HP, [g, h])], added row block by row block in a fixed order (deterministic) and
    written to the contiguous outputs in their own dtypes; BLOCK_C columns a program
    (here one program takes them all; ``head_mixing_tc.py``'s backward, whose rows have
    up to 560 columns, launches a program per 64)."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    acc = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    for start_r in range(0, NROWS, BLOCK_R):
        rows = start_r + tl.arange(0, BLOCK_R)
        mask = (rows < NROWS)[:, None] & (cols < NPART)[None, :]
        acc += tl.load(PART + rows.to(tl.int64)[:, None] * NPART + cols[None, :], mask=mask, other=0.0)
    tot = tl.sum(acc, 0)  # (BLOCK_C,)
    hi = cols // HP  # a matrix column's row (out) index, or a vector column's vector
    lo = cols % HP
    in_range = (hi < H) & (lo < H)
    if HAS_POST:
        tl.store(D_POST + hi * H + lo, tot.to(D_POST.dtype.element_ty), mask=in_range & (cols < HP * HP))
    vec = (cols - HP * HP) // HP  # 0: dc, 1: dw, 2: dbeta
    in_vec = (cols >= HP * HP) & (cols < HP * HP + 3 * HP) & (lo < H)
    if HAS_POST_B:
        tl.store(D_POST_B + lo, tot.to(D_POST_B.dtype.element_ty), mask=in_vec & (vec == 0))
    if HAS_NORM_W:
        tl.store(D_NORM_W + lo, tot.to(D_NORM_W.dtype.element_ty), mask=in_vec & (vec == 1))
    if HAS_NORM_B:
        tl.store(D_NORM_B + lo, tot.to(D_NORM_B.dtype.element_ty), mask=in_vec & (vec == 2))
    if HAS_PRE:
        pre = cols - (HP * HP + 3 * HP)
        tl.store(D_PRE + (pre // HP) * H + pre % HP, tot.to(D_PRE.dtype.element_ty),
                 mask=(pre >= 0) & (pre < HP * HP) & (pre // HP < H) & (pre % HP < H))  # fmt: skip


# ----------------------------------------------------------------------------
# configs: small deterministic heuristics of the shape, checked by the ahead-of-time
# compiles (tests/test_compile_budget.py) to fit the registers on sm_80 and sm_90a.
# The envelope they cover (vitkernels.ops.head_mixing.MAX_HEADS, MAX_HEAD_DIM): H <= 4,
# Dk and Dv <= 64; rows 16-byte aligned (``supports``) or not (element by element).


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class _Config:
    """One kernel launch: the constexprs and launch options the heuristics chose."""

    kernel: object
    constexprs: dict
    num_warps: int
    num_stages: int
    maxnreg: int | None = None  # ptxas's register limit (None: its own choice)


@dataclasses.dataclass(frozen=True)
class _Mixing:
    """What a call mixes (from ``_flags``), in the terms the launch rules below use."""

    pre: bool
    post: bool
    post_b: bool
    norm: bool

    @classmethod
    def of(cls, flags: dict) -> _Mixing:
        return cls(*(bool(flags.get(k)) for k in ("HAS_PRE", "HAS_POST", "HAS_POST_B", "HAS_NORM")))

    @property
    def mixes(self) -> bool:  # the pre- or post-mix (or both)
        return self.pre or self.post

    @property
    def both(self) -> bool:  # talking heads
        return self.pre and self.post

    @property
    def one(self) -> bool:  # the pre- or the post-mix alone
        return self.pre != self.post

    @property
    def pre_only(self) -> bool:
        return self.pre and not self.post

    @property
    def post_only(self) -> bool:  # with or without the head norm
        return self.post and not self.pre

    @property
    def plain(self) -> bool:  # no mixing, no head norm
        return not (self.mixes or self.norm)


def _common(heads: int, dk: int, dv: int, flags: dict) -> dict:
    return dict(
        H=heads, HP=max(2, _pow2(heads)), BLOCK_DK=max(16, _pow2(dk)), BLOCK_DV=max(16, _pow2(dv)),
        DK=dk, DV=dv, **flags,
    )  # fmt: skip


def _fwd_cfg(
    heads: int, nq: int, nk: int, dk: int, dv: int, flags: dict, f32: bool = False, arch: int = 90,
    f32_params: bool = False,
) -> _Config:
    """The forward launch. f32_params: 16-bit inputs with float32 mixing / norm
    parameters (a model under autocast), where triton 3.6 allocated registers differently."""
    c = _common(heads, dk, dv, flags)
    m = _Mixing.of(flags)
    # float32 (tf32x3 dots: each operand split in two) takes the few-row config below at
    # every Nq: 64 rows spilled 656 B at M1 (sm_90a, triton 3.9), 32 rows 64-140 B, 16 rows
    # with FOLD or the 32 + 16 split 44-232 B (bench/NOTES.md, 2026-12-01)
    if nq > 16 and not f32:  # 64 query rows on one warpgroup (wgmma on sm_90a)
        # FOLD: pass 1's key mask and pass 2's -lse ride on the pre-mix's first FMA.
        # every head's tiles take all 255 registers; with the post-mix bias (timm's
        # layout) triton 3.6 spilled 12 B there: 8 warps then (estimate at M1 on 3.9:
        # 118 us on 8 warps against 62 on 4, so only where it spills). q.k over K = DK
        # and the output's DV columns in two chunks each (48 = 32 + 16); pass 1's full
        # key blocks of 32 (64 took as long at M1, with more padding elsewhere). PEEL
        # (the full key blocks unmasked) only with the two accumulators: with one of 64
        # columns (D64, and D48 before the split) the two copies of the loops spilled, and
        # not with the head norm (8-16 B spilled at heads of 48-56 on sm_90a, of 56 on
        # sm_80, triton 3.9); the head norm at heads of 49-63 (Dv as 32 + 32, some masked)
        # on 8 warps on sm_80 (4 spilled 4 B at 56 without PEEL)
        (ka, kb), (va, vb) = _k_split(dk), _k_split(dv)
        warps = 8 if (_TRITON_36 and m.post_b) or (m.norm and arch < 90 and vb == 32 < dv < 64) else 4
        peel = vb > 0 and not m.norm
        # a head dim of 64 as 32 + 32 with triton 3.6: one chunk of 64 spilled 4-8 B (talking
        # heads on sm_90a, with the post-mix bias or the head norm (M2-H4) on sm_80)
        if _TRITON_36:
            (ka, kb), (va, vb) = ((32, 32) if a == 64 else (a, b) for a, b in ((ka, kb), (va, vb)))
        return _Config(_fwd_kernel, dict(**c, BLOCK_M=64, BLOCK_N=16, BLOCK_S=32, PEEL=peel, FOLD=True,
                                         KA=ka, KB=kb, VA=va, VB=vb), warps, 1)  # fmt: skip
    # triton 3.6, 16-bit inputs with float32 parameters: ptxas's own register choice
    # spilled (``_reg_limits``): timm's at 4 heads of 48-64 on 8 warps (capped at 128,
    # 16 B; 212 with the limit), the post-mix alone at 3 heads of 64 on 4 (128, 4 B; 126
    # with a limit of 128)
    lim, wide36 = None, _TRITON_36 and f32_params and arch >= 90
    if wide36 and heads == 4 and m.pre and m.post_b and min(dk, dv) > 32:
        lim = 255
    if wide36 and heads == 3 and m.post_only and not m.norm:
        lim = 128
    # a few query rows (CaiT's class attention: 1); FOLD took 104 -> 144 registers there
    # (one program per SM, not two) and 8 instructions more per key tile. 16-bit inputs on
    # 4 warps: on 8 each warp issued about as many instructions a key tile (415 against
    # 439 on 4), so M3's issue time halved on 4 (estimate 12.2 -> 6.7 us, 104 -> 148
    # registers; bench/NOTES.md, 2026-12-01); float32 keeps 8 (its 16-row tiles everywhere),
    # and so does the post-mix bias with triton 3.6 (4 warps spilled 8 B on sm_80 at D64),
    # and the pre-mix alone with triton 3.6 (24 B at 4 heads of 48-64, sm_90a)
    warps = 8 if f32 or (_TRITON_36 and (m.post_b or m.pre_only)) else 4
    # float32 with triton 3.6: pass 2 on 16-key tiles on 4 warps (32 keys on 8 spilled
    # 8-20 B at 4 heads of 48-64, 255 registers, 16 keys on 8 4-8 B for 1-7 rows; K as
    # 32 + 16 at 48 1272 B), with a limit of 255 (ptxas's own 128-168 spilled 4-28 B
    # with one mixing and at heads of 32); but 1-16 rows with one mixing on 8 (4 spilled
    # 4-16 B at 255 registers, 3-4 heads of 48-64)
    bn = 16 if f32 and _TRITON_36 else 32
    # (re-attention there on ptxas's own choice: 255 spilled 8 B at one query, 4 heads of
    # 64; 171 without)
    if f32 and _TRITON_36:
        warps, lim = (8 if nq <= 16 and m.one else 4), (None if nq <= 16 and m.one and m.norm else 255)
    # float32 with triton 3.9: q.k over K in two chunks (48 as 32 + 16; ``_dot_head``):
    # in one of 64 (the padded head) the forward spilled 20-36 B at 4 heads of 48 (M3,
    # M1-timm; sm_90a), with the chunks 128-174 registers and none (triton 3.6 spilled
    # with them: one chunk there)
    ka, kb = _k_split(dk) if f32 and not _TRITON_36 else (c["BLOCK_DK"], 0)
    return _Config(_fwd_kernel, dict(**c, BLOCK_M=16, BLOCK_N=bn, BLOCK_S=32, PEEL=False, FOLD=False,
                                     KA=ka, KB=kb, VA=c["BLOCK_DV"], VB=0), warps, 1, lim)  # fmt: skip



def _k_split(d: int) -> tuple[int, int]:
    """A product's K = d in two chunks: a power of two (at least 16) and 0 or a power
    of two covering the rest; d = 48 as 32 + 16, not padded to 64."""
    a = max(16, 1 << (int(d).bit_length() - 1))
    return a, (max(16, _pow2(d - a)) if d > a else 0)


def _bwd_cfg(
    heads: int, nq: int, nk: int, dk: int, dv: int, flags: dict, arch: int, f32: bool = False,
    f32_params: bool = False,
) -> tuple[list, list]:
    """(the delta launch and the dq launch, the dk/dv launches). On sm_90 the delta launch
    takes 64 query rows x 16 keys on 4 warps (one warpgroup: the sums over the keys
    stay in a warp) where that fits, on 8 where it spilled (the head norm; the post-mix
    bias with triton 3.6), the dq launch 32 query rows x 64 keys on 8 warps and 2 stages for heads of
    40-64 (16 x 16 with one mixing at 4 heads), 16 x 16 (q and dO reloaded) for heads of 16 or less, else 16 x 64 on one stage (mma.sync; with the head norm 64 x 16); on sm_80 (mma.sync layouts), and for a few query rows (CaiT's class
    attention: 1), both take 16 rows. dk/dv: one
    launch for every head's gradients on 16 keys x 64 queries (32 queries for heads of
    17-32 and 49-63, 16 for 16 or less), 16 x 16 where that
    spilled, 32 keys x 16 queries for one query row and 16 x 16 for 2-16; two heads per
    launch with the post-mix bias (see bench/NOTES.md).
    Warps: the largest counts the AOT compiles found spill-free (triton 3.6 and 3.9)."""
    # the delta launch's H x H sums as tensor-core products (sm_80: they spilled there)
    base = _common(heads, dk, dv, flags)
    # q.k and dO.v over K in two chunks where the dq or dk/dv launch holds q and dO (k and
    # v) in registers as mma.sync operands (D = 48 as 32 + 16; ``_dot_head``); elsewhere one
    (ka, kb), (va, vb) = _k_split(dk), _k_split(dv)
    split = dict(KA=ka, KB=kb, VA=va, VB=vb)
    c = dict(base, KA=base["BLOCK_DK"], KB=0, VA=base["BLOCK_DV"], VB=0, PAIR_DOT=arch >= 90, LIVE_QH=False,
             LIVE_GH=False, DEFER_ROWSUM=False)
    few = nq <= 16
    m = _Mixing.of(flags)
    # 2-16 query rows: NQ = 1 (CaiT's class attention) is a constant to Triton and compiles
    # leaner; the configurations below chosen for it spilled at 7 and 16 rows (sm_80's delta
    # and dq on 4 warps 4-8 B, dk/dv 12-188 B; bench/NOTES.md, 2026-12-02)
    some = few and nq > 1
    if f32:
        return _bwd_cfg_f32(heads, few, m, base, c, split)
    wide = min(dk, dv) > 32  # the dq launch's 32 x 64 on two stages: D16 and D32 spilled (triton 3.6)
    # triton 3.6 spilled 4 B in the 64-row head-norm dq (D64, float32 parameters)
    # (on sm_90, re-attention's 2-16 rows take the many-row launches: the few-row delta
    # on 4 warps spilled 8-60 B at 3-4 heads of 48-64, on 8 warps 12-36 B, and its dq on
    # 4 warps 4 B; the 64-row delta on 8 warps did not. The head norm alone stays: its
    # 16 x 16 dq spilled 4 B there)
    # (but all three at 4 heads on float32 parameters keep the few-row ones: the 64-row
    # delta spilled 56 B there, float16 at heads of 48-64, and the 64-row dq 4 B; at 3
    # heads the few-row dq spilled 28 B)
    all3_f32p = m.pre and f32_params and heads == 4
    norm_rows = some and m.norm and m.post and arch >= 90 and not _TRITON_36 and not all3_f32p
    if (few and not norm_rows) or arch < 90 or (_TRITON_36 and m.norm):
        # a few rows on 4 warps: on sm_80 8 spilled 16 B with dA's second loop; on sm_90 8
        # issued about as many instructions a warp (M3 delta estimate 18.9 -> 12.6 us on 4)
        delta_warps = 4 if few and not (some and arch < 90) else 8
        # sm_80, 2-16 rows: 8 warps and LIVE_QH (below), but talking heads without the bias
        # at 4 heads on 4 (8 spilled 8 B in bf16; at 3 heads 4 spilled 12 B; without
        # LIVE_QH 4-8 B)
        if some and arch < 90 and heads == 4 and m.both and not m.post_b:
            delta_warps = 4
        # triton 3.6, the head norm alone at 3 heads: 8 (4 spilled 8 B at 7 rows, 48-64)
        if _TRITON_36 and heads == 3 and m.norm and not m.post:
            delta_warps = 8
        # sm_90, a few rows with the head norm and a mixing: 8 (on 4 the one-query delta
        # spilled 16-52 B at 3-4 heads of 48-64, re-attention and all three, bf16; the
        # norm alone stays on 4: on 8 ptxas capped it at 128 registers and spilled 4-16 B)
        head_norm8 = few and m.norm and m.mixes and arch >= 90
        if head_norm8:
            delta_warps = 8
            # but all three at one query and 4 heads on float32 parameters on 4 (8 spilled
            # 4 B, float16 at heads of 48-64; at 3 heads 4 spilled 16-40 B)
            if nq == 1 and m.both and f32_params and heads == 4:
                delta_warps = 4
        # (with float32 parameters re-attention defers but at heads of 64: not deferring
        # spilled 4 B at 4 heads of 48 and 56, one query, float16)
        defer_spills = m.pre or max(dk, dv) > 56
        # sm_80, a few rows with all three (pre-mix, post-mix, head norm): the delta's
        # sums deferred on 4 warps (without, 4 heads of 48-64 spilled 28 B at one query and
        # 12 B at 7 rows, and on 8 warps 8 B at 7), but not at one query with float32
        # parameters (4 B spilled with, none without)
        all3_80 = few and arch < 90 and m.norm and m.both and not (nq == 1 and f32_params)
        # LIVE_QH (q's addresses formed in the loops, not held): triton 3.6's sm_80 16-row
        # launches (the few-row one spilled 24 B without; triton 3.9's 12-16 B with), and
        # sm_80's for 2-16 rows and at 3 heads (talking heads at 48-64 spilled 8 B without); DEFER_ROWSUM (delta's sums across the lanes once, after
        # the loop): sm_90's few rows, but not 2-16 with the post-mix bias (36 B spilled,
        # float16 with float32 parameters), nor with the head norm and a mixing on float32
        # parameters (8 B spilled: re-attention at 4 heads of 64, one query)
        delta = _Config(_bwd_dq_kernel, dict(c, BLOCK_M=16, BLOCK_N=32, DELTA_PASS=True, HOLD=False,
                                             LIVE_QH=arch < 90 and (_TRITON_36 or some or heads == 3),
                                             DEFER_ROWSUM=(few and arch >= 90 and not (some and m.post_b)
                                                           and not (head_norm8 and f32_params and defer_spills))
                                             or all3_80),
                        delta_warps, 1)  # fmt: skip
        # a few rows on 4 warps (8 on sm_80 with triton 3.6, 4 spilled 16 B at M3, and for
        # 2-16 rows)
        # (and 8 without any mixing: 4 spilled 16 B at 7 rows, 4 heads of 48-64, capped
        # at 128 registers)
        # (and with triton 3.6 at 3 heads: 4 spilled 8-24 B at 7 rows, heads of 64)
        # (and on sm_90 with the head norm and a mixing: 4 spilled 8-44 B at 3-4 heads of
        # 48-64, one query or 7 rows; but the pre-mix and the norm at 3 heads stay on 4: on
        # 8 capped at 128 registers they spilled 12 B)
        norm_dq8 = head_norm8 and not (heads == 3 and not m.post)
        # sm_80, one query with the pre-mix and the head norm at 4 heads: 8 (4 spilled
        # 8-16 B at heads of 64)
        norm_dq8 = norm_dq8 or (arch < 90 and nq == 1 and heads == 4 and m.norm and m.pre)
        # (triton 3.6 at 3 heads takes 8, but not the pre-mix with the norm at one query:
        # 8 capped at 128 registers spilled 16 B at heads of 48-64; on 4, 136)
        pre_norm_1q = nq == 1 and m.norm and m.pre and not m.post
        dq_warps = 4 if few and not (arch < 90 and (_TRITON_36 or some)) and not m.plain and not norm_dq8 else 8
        dq = _Config(_bwd_dq_kernel, dict(**c, BLOCK_M=16, BLOCK_N=16, DELTA_PASS=False, HOLD=False),
                     8 if _TRITON_36 and heads == 3 and not pre_norm_1q else dq_warps, 1)  # fmt: skip
        # all three at one query, 4 heads of 64: q.k and dO.v over K in two chunks on 4
        # warps (8 spilled 12 B, 4 without the chunks 20 B; at heads of 56 the chunks
        # spilled 8-32 B, 8 warps without them none)
        if head_norm8 and m.both and nq == 1 and heads == 4 and dk == dv == 64:
            dq = _Config(_bwd_dq_kernel, dict(dq.constexprs, KA=32, KB=32, VA=32, VB=32), 4, 1)
    else:
        # 4 warps spilled 148 B with the head norm, 16-80 B with the post-mix bias on
        # triton 3.6 (40 B on 3.9 before LIVE_QH); LIVE_QH: q's addresses formed in the
        # loops, not held (the registers of the dA product's accumulator), and dO's
        # too on triton 3.6 (LIVE_GH: 4 warps spilled 12 B without); DEFER_ROWSUM (delta's
        # sums across the lanes once, after the loop) without the post-mix bias (44 B
        # spilled with it) and the head norm
        # (LIVE_GH also with the pre-mix alone: 4 B spilled at 4 heads of 48-64 without;
        # and with triton 3.6 the pre-mix alone on 8 warps: on 4 its compile failed,
        # "operand #0 does not dominate this use" in TritonGPURemoveLayoutConversions)
        delta_warps = 8 if m.norm or (_TRITON_36 and (m.post_b or m.pre_only)) else 4
        delta = _Config(_bwd_dq_kernel, dict(c, BLOCK_M=64, BLOCK_N=16, DELTA_PASS=True, HOLD=False, LIVE_QH=True,
                                             LIVE_GH=_TRITON_36 or m.pre_only,
                                             DEFER_ROWSUM=not (m.post_b or m.norm)),
                        delta_warps, 1)  # fmt: skip
        if m.norm:  # 16 x 64 spilled 12 B (D64)
            # (the head norm without the post-mix at 4 heads of 48-64: 64 x 16 spilled
            # 20-24 B, 32 x 16 20 B at 64; 16 x 16 did not)
            bm_q = 16 if wide and heads == 4 and not m.post else 64
            dq = _Config(_bwd_dq_kernel, dict(**c, BLOCK_M=bm_q, BLOCK_N=16, DELTA_PASS=False, HOLD=False), 8, 1)
        else:
            # 32 query rows x 64 keys on 8 warps (mma.sync), two stages (k and v loaded a
            # tile ahead: 32 x 64 on one stage spilled 108 B, 16 x 64 on one stage did
            # per query twice the per-tile work; see bench/NOTES.md) for heads of 40-64
            # (D16 and D32 spilled 1.5-23 KB with triton 3.6); otherwise 16 x 64, one
            # stage. 64 x 16 on 8 warps had both warpgroups compute the same tile (warps
            # [8, 1] over 64 rows), 16 x 64 on 4 warps spilled 184-300 B, 32 x 64 on 16
            # warps (128 registers) 1148 B
            bm_q, st_q = (32, 2) if wide else (16, 1)
            # without any mixing (plain attention) 16 x 32 at heads of 32 or less (16 x 64
            # spilled 8 B at 3 heads of 32)
            plain_narrow = not (wide or m.mixes)
            bn_q = 32 if plain_narrow else 64
            dq = _Config(_bwd_dq_kernel, dict(c, **split, BLOCK_M=bm_q, BLOCK_N=bn_q, DELTA_PASS=False, HOLD=True),
                         8, st_q)  # fmt: skip
            # 16 x 16, q and dO reloaded: at D16 (16 x 64 spilled 936 B, H4, triton 3.9;
            # without HOLD 964 B), and with one mixing (pre or post alone) at 4 heads of
            # 48-64, where 32 x 64 spilled 12-32 B with triton 3.9 (one stage 16 B, HOLD
            # off 8 B) and 16 x 64 36 B with triton 3.6 (bf16); at 3 heads 32 x 64 stays
            # (16 x 64 spilled 20 B at 64 there, triton 3.9)
            # (and with triton 3.6 without any mixing at heads of 32: 16 x 32 spilled 4 B)
            if min(dk, dv) <= 16 or (wide and m.one and heads == 4) or (_TRITON_36 and plain_narrow):
                dq = _Config(_bwd_dq_kernel, dict(**c, BLOCK_M=16, BLOCK_N=16, DELTA_PASS=False, HOLD=False), 8, 1)
    # every head's dk, dv in one launch: 16 keys x 64 queries on 8 warps (each warp its
    # own 8 queries: Triton lays the warps of a dot that feeds another dot along one
    # axis, and at 32 queries warp pairs repeated each other's work); 16 x 16 with
    # the head norm (32 queries spilled); with the post-mix bias two heads per launch on
    # 16 x 16 (every head at 16 x 16 spilled 4 B), but at heads of 48 (timm's CaiT-XXS)
    # every head on 64 queries as without it (at 40 that spilled 16-24 B on sm_90a, at 64
    # 12-20 B on sm_80, triton 3.9; for a few queries, 32 keys x 16, every head spilled
    # 92-100 B at 7-16 queries); for one query 32 keys x 16 on 4 warps, for 2-16 and with
    # the post-mix bias 16 x 16 on 8 (32 x 16 spilled 12-188 B at heads of 32-64, 16 x 16
    # on 4 8-32 B), two heads a launch for 2-16 with both mixings at 4 heads over 48
    # (every head spilled 16 B at 64), but every head at 3 (two a launch spilled 8-36 B:
    # talking heads at 64, timm's at 32; and at more rows timm's 8-36 B at 32 and 64, on
    # 16 x 16 capped at 128 registers)
    hp = base["HP"]
    pairs = m.post_b and (few or not dk == dv == 48)
    pairs = pairs or (some and heads == 4 and m.both and max(dk, dv) > 48)
    pairs = pairs and heads != 3
    gp = min(2, hp) if pairs else hp
    # (at 3 heads with the bias, where two a launch took 16 x 16, every head takes it:
    # on 32 queries the post-mix alone spilled 12-20 B at heads of 32)
    bias16 = m.post_b and heads == 3 and not dk == dv == 48
    bm = 16 if few or pairs or bias16 or m.norm else 64
    # 64 queries spilled 792 B at D16, 44 B at D32, 16 B at D56 (K as 32 + 32; H4, triton 3.9),
    # 52 B at D64 on sm_80 with triton 3.6
    if bm == 64 and (min(dk, dv) <= 32 or 32 in (kb, vb) or (_TRITON_36 and arch < 90 and min(dk, dv) > 48)):
        bm = 16 if min(dk, dv) <= 16 else 32
    # sm_80 and triton 3.6 without the post-mix (no mixing, or the pre-mix alone): 16
    # queries (64 and 32 spilled 4-24 B at 3-4 heads of 48-64, capped at 128 registers);
    # triton 3.6 at 3 heads of 32 too (32 spilled 4 B)
    if (arch < 90 or _TRITON_36) and not m.post or (_TRITON_36 and heads == 3 and min(dk, dv) <= 32):
        bm = 16
    bn, warps = (32, 4) if nq == 1 and not pairs else (16, 8)
    if nq == 1 and heads == 4 and m.norm and m.post:  # 4 warps spilled 20 B (re-attention, heads of 64)
        warps = 8
    # sm_90 at 4 heads of 49-63 (K as 32 + 32) with the head norm: the norm alone at one
    # query on 8 warps (4 spilled 4 B at heads of 56), all three on 2-16 rows (two heads
    # a launch) on 4 (8 spilled 8 B there)
    if arch >= 90 and heads == 4 and m.norm and 32 in (kb, vb):
        if nq == 1 and not m.mixes:
            warps = 8
        elif some and m.both and pairs:
            warps = 4
    if _TRITON_36 and heads == 3 and bm == bn == 16:  # 8 warps spilled 8 B (timm's, heads of 32)
        warps = 4
    # on sm_90 the 64-query blocks of heads of 48 and 64 on two stages (q and dO loaded
    # a block ahead: fewer instructions per block; D40 and D56 spilled 76 B with
    # triton 3.9, D16 1.4 KB with triton 3.6; see bench/NOTES.md)
    stages = 2 if bm == 64 and arch >= 90 and dk in (48, 64) and dv in (48, 64) else 1
    # triton 3.6, 16-bit inputs with float32 parameters, 2-16 rows at 4 heads: the dq
    # launch with the post-mix alone and timm's delta launch on 8 warps (4 spilled 8-16 B
    # at 254-255 registers, heads of 48-64)
    if _TRITON_36 and f32_params and heads == 4 and few and arch >= 90:
        if m.post_only and not m.norm:
            dq = dataclasses.replace(dq, num_warps=8)
        if some and m.pre and m.post_b and min(dk, dv) > 32:
            delta = dataclasses.replace(delta, num_warps=8)
    lim_delta, lim_dq, lim_dkdv = _reg_limits(heads, nq, dk, dv, arch, flags, f32_params)
    delta = dataclasses.replace(delta, maxnreg=lim_delta)
    dq = dataclasses.replace(dq, maxnreg=lim_dq)
    dkdv = [_Config(_bwd_dkdv_kernel, dict(**base, **split, BLOCK_M=bm, BLOCK_N=bn, G0=g0, GP=gp), warps, stages,
                    lim_dkdv)
            for g0 in range(0, heads, gp)]  # fmt: skip
    return [delta, dq], dkdv


def _reg_limits(heads: int, nq: int, dk: int, dv: int, arch: int, flags: dict, f32_params: bool = False) -> tuple:
    """ptxas's register limit (``.maxnreg``) for the backward's (delta, dq, dk/dv)
    launches at 1-2 heads, where its own choice spilled (None: its own). A compile sweep
    of every launch at 1-2 heads (heads of 32 / 48 / 64; 1, 7, 49 and 196 queries;
    every mixing kind; sm_90a and sm_80, triton 3.9 and 3.6, bfloat16 and float16 with
    float32 parameters; bench/NOTES.md, 2026-12-03) found two kinds of spill:
    - at 8 warps ptxas capped the launch at 128 registers (two blocks an SM) and spilled
      8-28 B; it needs 156-196, so one block an SM: 255;
    - elsewhere ptxas chose 48-96 registers and spilled 4-8 B (its occupancy
      heuristics); with a limit of 128 it takes 70-126 and spills nothing.
    Triton 3.6 on sm_90a adds its own: without any mixing at 3 heads (below), and for
    16-bit inputs with float32 parameters (f32_params: a model under autocast) at 1-4
    heads (``_reg_limits_36_wide``)."""
    few, some = nq <= 16, 1 < nq <= 16
    m = _Mixing.of(flags)
    lim_delta = lim_dq = lim_dkdv = None
    if heads == 2:
        # the 64-query dk/dv blocks of heads of 64 with the post-mix (talking heads 12 B,
        # the post-mix alone 28 B; sm_80, talking heads 8 B), capped at 128
        if not few and m.post and not (m.post_b or m.norm) and min(dk, dv) > 48:
            lim_dkdv = 255
        # the 32 x 64 dq on sm_90 with one mixing: the pre-mix alone at 64 (8 B), the
        # post-mix alone at 48 (20 B, float16 with float32 parameters), capped at 128
        # (the pre-mix alone at 48 and the post-mix alone at 64 did not spill: they keep
        # two blocks an SM)
        narrow = min(dk, dv)
        if not few and arch >= 90 and not m.norm and (m.pre_only and narrow > 48 or m.post_only and 32 < narrow <= 48):
            lim_dq = 255
        # triton 3.6: talking heads' dk/dv for one query row at heads of 32 (96
        # registers, 4 B), and the few-row delta without mixing at 64 (72, 8 B)
        if nq == 1 and m.both and not m.post_b and max(dk, dv) <= 32:
            lim_dkdv = 128
        if some and m.plain and min(dk, dv) > 48:
            lim_delta = 128
    elif heads == 1:
        # dk/dv on 32 queries at heads of 32 with the pre- or post-mix (48 registers,
        # 4 B; sm_90a), re-attention's dk/dv on sm_80 at 48 (64, 8 B), and timm's
        # delta launch for one query row on sm_80 at 32 (56, 8 B)
        if not few and m.mixes and not (m.post_b or m.norm) and max(dk, dv) <= 32:
            lim_dkdv = 128
        if m.norm and m.post and arch < 90:
            lim_dkdv = 128
        # the pre-mix with the head norm on 2-16 rows at heads of 32 (64 registers, 8 B;
        # sm_90a)
        if some and m.pre and m.norm and max(dk, dv) <= 32:
            lim_dkdv = 128
        # and with the head norm there at heads of 49-63 (K as 32 + 32; 64 registers on 8
        # warps, sm_90a: the norm alone 16 B at heads of 56, re-attention and all three
        # 8 B with triton 3.6)
        if some and m.norm and arch >= 90 and 32 in (_k_split(dk)[1], _k_split(dv)[1]):
            lim_dkdv = 128
        if nq == 1 and m.post_b and arch < 90:
            lim_delta = 128
    # triton 3.6 on sm_90a without any mixing or norm (no parameters), one row at 3 heads
    # of 48-64: the delta launch on 4 warps took 80 registers and spilled 8 B
    if _TRITON_36 and arch >= 90 and heads == 3 and nq == 1 and m.plain and min(dk, dv) > 32:
        lim_delta = 128
    if _TRITON_36 and f32_params and arch >= 90:  # 16-bit inputs with float32 parameters on triton 3.6
        wide_lims = _reg_limits_36_wide(heads, nq, dk, dv, flags)
        lim_delta, lim_dq, lim_dkdv = (w or g for w, g in zip(wide_lims, (lim_delta, lim_dq, lim_dkdv), strict=True))
    return lim_delta, lim_dq, lim_dkdv


def _reg_limits_36_wide(heads: int, nq: int, dk: int, dv: int, flags: dict) -> tuple:
    """``_reg_limits`` for triton 3.6 (the GPU machine's) with 16-bit inputs and float32
    parameters, on sm_90a (a sweep of 1-4 heads, bench/NOTES.md, 2026-12-03): 255 where
    ptxas capped 8 warps at 128 (talking heads' and timm's dq for one row at 3 heads of
    32, 4 B; the post-mix alone's dk/dv at 3 heads of 64, 12 B) or chose 168 on 4 (the
    post-mix alone's dq for one row at 4 heads of 48, 24 B); 128 where it chose 48-80
    (the pre-mix alone's dk/dv at 1 head of 32 for 7 rows, 8 B; the post-mix alone's at
    2 heads of 32, 8 B); with the head norm see below."""
    few, some = nq <= 16, 1 < nq <= 16
    m = _Mixing.of(flags)
    lim_delta = lim_dq = lim_dkdv = None
    if heads == 3 and nq == 1 and m.both and max(dk, dv) <= 32:
        lim_dq = 255
    if heads == 3 and not few and m.post_only and not m.norm and min(dk, dv) > 48:
        lim_dkdv = 255
    if heads == 4 and nq == 1 and m.post_only and not m.norm:
        lim_dq = 255
    if heads in (1, 2) and some and m.one and not m.norm and max(dk, dv) <= 32:
        lim_dkdv = 128
    # the head norm at 3 heads of 48-64 (8 warps capped at 128; 2026-12-04): re-attention's
    # dq on 2-16 rows (8 B), the norm alone's delta for one row (8 B at 48)
    if heads == 3 and m.norm and min(dk, dv) > 32:
        if some and m.post_only:
            lim_dq = 255
        if nq == 1 and not m.mixes:
            lim_delta = 255
    return lim_delta, lim_dq, lim_dkdv


def _bwd_cfg_f32(heads: int, few: bool, m: _Mixing, base: dict, c: dict, split: dict) -> tuple[list, list]:
    """float32's backward launches (tf32x3 dots: each operand split in two, so the
    16-bit tiles spilled 48-908 B at M1 on sm_90a, triton 3.9): every launch on 16
    query rows. delta: 16 x 32 keys on 8 warps and two stages (one with triton 3.6 at 3
    heads, and no DEFER_ROWSUM there), q's addresses formed in
    the loops (LIVE_QH), delta's sums across the lanes after the loop (DEFER_ROWSUM) and
    the H x H sums without tensor-core products (PAIR_DOT off: with them 44-72 B
    spilled); dq (two stages): 16 x 16, q and dO reloaded per tile (HOLD off), K in one
    chunk; dk/dv: 16 keys x 16 queries on 8 warps and one stage, two heads per launch
    (every head in one launch spilled 24 B), but with the head norm at 4 heads of 49-64
    (below). See bench/NOTES.md, 2026-12-01 and 2026-12-03."""
    # triton 3.6: the delta launch's K and Dv in two chunks (48 as 32 + 16: in one of 64
    # it spilled 16-136 B at 255 registers, 2-4 heads of 48-64; with triton 3.9 the
    # chunks spilled 32 B, one did not)
    chunks = split if _TRITON_36 else {}
    # two stages (k and v tiles through shared memory) and delta's sums across the lanes
    # after the loop (DEFER_ROWSUM): on one stage without, 41 of 72 launches at 4 heads
    # (eight kinds; 1, 7, 196 rows; heads of 32 / 48 / 64; sm_90a, triton 3.9) spilled
    # 4-80 B, the workloads' among them; with both, 7 (4-8 B, none at heads of 48 but
    # timm's for one row); with triton 3.6 timm-few's 8 B went too, and at 4 heads 17 of
    # 60 -> 6. But triton 3.6 at 3 heads keeps one stage without: there the two spilled
    # in 10 of the first 49 launches (4-124 B, heads of 32-64), one stage in 7 of 60 (D64)
    two = not (_TRITON_36 and heads == 3)
    delta = _Config(_bwd_dq_kernel, dict(c, **chunks, BLOCK_M=16, BLOCK_N=32, DELTA_PASS=True, HOLD=False,
                                         LIVE_QH=True, PAIR_DOT=False, DEFER_ROWSUM=two), 8, 2 if two else 1)  # fmt: skip
    # the dq launch on two stages too: on one, 12 at 4 heads spilled 4-40 B (talking
    # heads, the pre- or post-mix alone; 1, 7, 196 rows; heads of 32-64; sm_90a, triton
    # 3.9; CaiT-few's 32 B), on two none of them; with triton 3.6 M2-H4's 16 B went too
    dq = _Config(_bwd_dq_kernel, dict(c, BLOCK_M=16, BLOCK_N=16, DELTA_PASS=False, HOLD=False), 8, 2)
    gp = min(2, base["HP"])
    # triton 3.6, 1-16 rows at heads of 32-48: dk/dv with a register limit of 255 (ptxas
    # capped it at 128 and spilled 4-16 B at 3-4 heads; 199-255 registers with the limit;
    # at heads of 64 the limit made launches that had not spilled spill 8-24 B)
    wide = max(base["DK"], base["DV"])
    lim = 255 if _TRITON_36 and few and wide <= 48 else None
    dkdv = [_Config(_bwd_dkdv_kernel, dict(**base, **split, BLOCK_M=16, BLOCK_N=16, G0=g0, GP=gp), 8, 1, lim)
            for g0 in range(0, heads, gp)]  # fmt: skip
    # the head norm at 4 heads of 49-64: each pair of heads' launch spilled 8-20 B on one
    # stage and 8 warps (sm_90a, triton 3.9; M2-H4's first 12 B): the second pair's on two
    # stages (at 56: 8-12 B -> 0), and at 57-64 the first pair's on 4 warps with the
    # post-mix (12 B -> 0; two stages: 8 B), two stages with the norm alone (20 B -> 0; 4
    # warps: 28 B). Each combination compiled clean on sm_90a and sm_80 (3.9) and sm_90a
    # (3.6); 4 warps at heads of 48 spilled 20 B (bench/NOTES.md, 2026-12-03)
    if heads == 4 and m.norm and wide > 48:
        first, second = dkdv
        if wide > 56:
            first = dataclasses.replace(first, num_warps=4) if m.post else dataclasses.replace(first, num_stages=2)
        dkdv = [first, dataclasses.replace(second, num_stages=2)]
    return [delta, dq], dkdv


def _vector_width(t: torch.Tensor, offset_bytes: int) -> int:
    """Elements per 16-byte vector when every row of t's last dim starts 16-byte aligned
    (offset_bytes: the first element's address modulo 16) and the last dim is
    contiguous and a whole number of vectors, else 1."""
    v = 16 // t.element_size()
    if t.stride(-1) != 1 or t.shape[-1] % v or offset_bytes % 16:
        return 1
    if any(st % v for st, n in zip(t.stride()[:-1], t.shape[:-1], strict=True) if n > 1):
        return 1
    return v


def _offset_bytes(t: torch.Tensor) -> int:
    """The start's offset into its storage in bytes (torch allocates storage 16-byte
    aligned). 0 while torch.compile or torch.export traces: the launcher checks the
    real address when the op runs (and reads element by element if it is not)."""
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and compiler.is_compiling():
        return 0
    return t.storage_offset() * t.element_size()


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> list[str]:
    """Reasons beyond the size limits (``vitkernels.ops.head_mixing.MAX_HEADS`` and
    ``MAX_HEAD_DIM``, which dispatch checks) that the kernels do not take these
    inputs (empty: they do): rows that are not 16-byte aligned. From the tensors'
    layout only, so that it also runs on the fake tensors of torch.compile and
    torch.export."""
    reasons = []
    for name, t in (("q", q), ("k", k), ("v", v)):
        if _vector_width(t, _offset_bytes(t)) == 1:
            n = 16 // t.element_size()
            reasons.append(
                f"{name} (shape {tuple(t.shape)}, strides {t.stride()}) does not have 16-byte "
                f"aligned rows: the kernels need a contiguous last dim of a multiple of {n} "
                f"elements, other strides multiples of {n} and an aligned start"
            )
    return reasons


# ----------------------------------------------------------------------------
# launchers

_alloc = alloc  # every buffer the launchers write, outputs and partials (tests poison them)


_F32_TILES_ON_CPU = False  # tests set this to run float32's configs under the interpreter


def _float32_tiles(t: torch.Tensor) -> bool:
    """Whether the launches take float32's configs (``_bwd_cfg_f32``; ``float32_tiles``)."""
    return float32_tiles(t, _F32_TILES_ON_CPU)


def _width(t: torch.Tensor | None) -> int:
    return 1 if t is None else _vector_width(t, t.data_ptr())


def _vecs(q, k, v, grad_out=None) -> dict:
    """The vector widths of the operand tiles (1: element by element)."""
    return dict(VQ=_width(q), VK=_width(k), VV=_width(v), VG=_width(grad_out))


def _f32_params(q: torch.Tensor, params: tuple) -> bool:
    """16-bit inputs with float32 mixing / norm parameters (a model under autocast)."""
    return q.dtype != torch.float32 and any(t is not None and t.dtype == torch.float32 for t in params)


def _flags(pre_w, post_w, post_b, norm_w, norm_b, has_norm: bool) -> dict:
    return dict(
        HAS_PRE=pre_w is not None, HAS_POST=post_w is not None, HAS_POST_B=post_b is not None,
        HAS_NORM=has_norm, HAS_NORM_W=has_norm and norm_w is not None,
        HAS_NORM_B=has_norm and norm_b is not None,
    )  # fmt: skip


def _param_args(q: torch.Tensor, pre_w, post_w, post_b, norm_w, norm_b) -> tuple[list, list]:
    """Pointers and strides of the parameters (q stands in for an absent one)."""

    def mat(w):
        return (q, 0, 0) if w is None else (w, w.stride(0), w.stride(1))

    def vec(x):
        return (q, 0) if x is None else (x, x.stride(0))

    (pw, *ps), (qw, *qs) = mat(pre_w), mat(post_w)
    (pb, pbs), (nw, nws), (nb, nbs) = vec(post_b), vec(norm_w), vec(norm_b)
    return [pw, qw, pb, nw, nb], [*ps, *qs, pbs, nws, nbs]


def _tag(q: torch.Tensor, k: torch.Tensor, params: tuple, flags: dict) -> str:
    """The launch's name suffix: dtypes, shape, the stages present."""
    B, H, NQ, DK = q.shape
    pdt = next((SHORT[t.dtype] for t in params if t is not None), "-")
    stages = "".join(c for c, on in (("A", flags["HAS_PRE"]), ("P", flags["HAS_POST"]),
                                     ("c", flags["HAS_POST_B"]), ("n", flags["HAS_NORM"])) if on)  # fmt: skip
    return f"{SHORT[q.dtype]},p{pdt},H{H},Nq{NQ},Nk{k.shape[2]},D{DK},{stages or 'plain'}"


def head_mixing_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pre_w: torch.Tensor | None,
    post_w: torch.Tensor | None,
    post_b: torch.Tensor | None,
    norm_w: torch.Tensor | None,
    norm_b: torch.Tensor | None,
    scale: float,
    eps: float,
    has_norm: bool,
    copies: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward: (out (B, H, Nq, Dv) q.dtype, lse (B, H, Nq) float32). See the module docstring.
    5-16 heads go to the tensor-core forward (``head_mixing_tc``)."""
    B, H, NQ, DK = q.shape
    if H > _MAX_REG_HEADS:
        from vitkernels.triton.head_mixing_tc import head_mixing_attention_fwd_tc

        return head_mixing_attention_fwd_tc(q, k, v, pre_w, post_w, post_b, norm_w, norm_b, scale, eps, has_norm,
                                            copies)  # fmt: skip
    NK, DV = k.shape[2], v.shape[3]
    out = _alloc((B, H, NQ, DV), q.dtype, q.device)
    lse = _alloc((B, H, NQ), torch.float32, q.device)
    if out.numel() == 0:
        return out, lse
    params = (pre_w, post_w, post_b, norm_w, norm_b)
    flags = _flags(*params, has_norm)
    cfg = _fwd_cfg(H, NQ, NK, DK, DV, flags, _float32_tiles(q), target_arch(q.device), _f32_params(q, params))
    num_qb = cdiv(NQ, cfg.constexprs["BLOCK_M"])
    ptrs, strides = _param_args(q, *params)
    bn = cfg.constexprs["BLOCK_N"]
    nk_s, nk_n = (NK - NK % cfg.constexprs["BLOCK_S"], NK - NK % bn) if cfg.constexprs["PEEL"] else (0, 0)
    args = [
        q, k, v, *ptrs, out, lse, *q.stride(), *k.stride(), *v.stride(), *strides,
        NQ, NK, num_qb, scale * _LOG2E, eps,
    ]  # fmt: skip
    launch(Launch(
        f"head_mixing_fwd[{_tag(q, k, params, flags)}]", cfg.kernel, (num_qb * B,), args,
        {**cfg.constexprs, **_vecs(q, k, v)}, cfg.num_warps, cfg.num_stages,
        reads=(q, k, v, *params), writes=(out, lse), maxnreg=cfg.maxnreg,
        loops={"start_s": nk_s // cfg.constexprs["BLOCK_S"], "start_t": cdiv(NK - nk_s, bn),
               "start_n": nk_n // bn, "start_u": cdiv(NK - nk_n, bn)},
    ))  # fmt: skip
    return out, lse


def head_mixing_attention_bwd(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pre_w: torch.Tensor | None,
    post_w: torch.Tensor | None,
    post_b: torch.Tensor | None,
    norm_w: torch.Tensor | None,
    norm_b: torch.Tensor | None,
    lse: torch.Tensor,
    scale: float,
    eps: float,
    has_norm: bool,
    copies: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor | None, ...]:
    """Backward: (dq, dk, dv, d_pre_w, d_post_w, d_post_b, d_norm_w, d_norm_b); the
    parameter gradients are None where the parameter is. See the module docstring."""
    B, H, NQ, DK = q.shape
    if H > _MAX_REG_HEADS:
        from vitkernels.triton.head_mixing_tc import head_mixing_attention_bwd_tc

        return head_mixing_attention_bwd_tc(grad_out, q, k, v, pre_w, post_w, post_b, norm_w, norm_b, lse, scale,
                                            eps, has_norm, copies)  # fmt: skip
    NK, DV = k.shape[2], v.shape[3]
    dev = q.device
    dq = _alloc((B, H, NQ, DK), q.dtype, dev)
    dk = _alloc((B, H, NK, DK), q.dtype, dev)
    dv = _alloc((B, H, NK, DV), q.dtype, dev)
    params = (pre_w, post_w, post_b, norm_w, norm_b)
    if B == 0:
        return dq, dk, dv, *(None if t is None else torch.zeros_like(t) for t in params)
    if _width(grad_out) == 1:  # the consumer's strides: read it aligned
        grad_out = grad_out.contiguous()
    flags = _flags(*params, has_norm)
    arch, f32 = target_arch(q.device), _float32_tiles(q)
    f32_params = _f32_params(q, params)
    dq_cfgs, dkdv_cfgs = _bwd_cfg(H, NQ, NK, DK, DV, flags, arch, f32, f32_params)
    HP = dq_cfgs[0].constexprs["HP"]
    ptrs, strides = _param_args(q, *params)
    common = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *strides)
    qk_scale = scale * _LOG2E
    vecs = _vecs(q, k, v, grad_out)
    tag = _tag(q, k, params, flags)
    reads = (q, k, v, grad_out, *params, lse)

    # delta, dq, and per query block the partial sums of dP, dc, dw, dbeta, dA (the
    # columns of absent parameters are never written or read)
    delta = _alloc((B, H, NQ), torch.float32, dev)
    npart = 2 * HP * HP + 3 * HP
    # the delta launch over the query rows (where it pays, the rows after the whole
    # 64-row blocks in a second launch of the few-row configuration: ``_row_runs``),
    # then the dq launch
    delta_cfg, dq_cfg = dq_cfgs
    # (not with the post-mix bias or the head norm: there the few-row delta launch
    # spilled 24-60 B at NQ 196-197, sm_90a, triton 3.9)
    row_runs = [(0, NQ)] if flags["HAS_POST_B"] or flags["HAS_NORM"] else _row_runs(
        NQ, delta_cfg.constexprs["BLOCK_M"], B, sm_count(dev))  # fmt: skip
    runs = [(delta_cfg if row0 == 0 else _bwd_cfg(H, rows, NK, DK, DV, flags, arch, f32, f32_params)[0][0], row0, rows)
            for row0, rows in row_runs]  # fmt: skip
    runs = [(cfg, row0, rows, cdiv(rows, cfg.constexprs["BLOCK_M"])) for cfg, row0, rows in runs]
    # a row of partial sums per delta program, each launch's rows after the one before's
    part = _alloc((B * sum(num_qb for *_, num_qb in runs), npart), torch.float32, dev)
    pid0 = 0
    for cfg, row0, rows, num_qb in [*runs, (dq_cfg, 0, NQ, cdiv(NQ, dq_cfg.constexprs["BLOCK_M"]))]:
        c = cfg.constexprs
        if c["DELTA_PASS"]:
            part_rows = part[pid0 : pid0 + num_qb * B]
            pid0 += num_qb * B
            rows_in = (q[:, :, row0 : row0 + rows], grad_out[:, :, row0 : row0 + rows], k, v, *params,
                       lse[:, :, row0 : row0 + rows])  # fmt: skip
            rows_out = (delta[:, :, row0 : row0 + rows], part_rows)
        else:
            part_rows, rows_in, rows_out = part, (*reads, delta), (dq,)
        launch(Launch(
            f"head_mixing_bwd_{'delta' if c['DELTA_PASS'] else 'dq'}[{tag}{f',rows{row0}+' if row0 else ''}]",
            cfg.kernel, (num_qb * B,),
            [q, k, v, grad_out, *ptrs, lse, delta, dq, part_rows, *common, NQ, NK, num_qb, npart, qk_scale,
             scale, eps],
            {**c, **vecs, "ROW0": row0, "ONE_QB": _one_block(num_qb, c)}, cfg.num_warps, cfg.num_stages,
            reads=rows_in, writes=rows_out, maxnreg=cfg.maxnreg,
            loops={"start_n": cdiv(NK, c["BLOCK_N"])},
        ))  # fmt: skip
    for cfg in dkdv_cfgs:
        c = cfg.constexprs
        g0, gp = c["G0"], c["GP"]
        num_kb = cdiv(NK, c["BLOCK_N"])
        launch(Launch(
            f"head_mixing_bwd_dkdv[{tag},G{g0}]", cfg.kernel, (num_kb * B,),
            [q, k, v, grad_out, *ptrs, lse, delta, dk, dv, *common, NQ, NK, num_kb, qk_scale, scale, eps],
            {**c, **vecs}, cfg.num_warps, cfg.num_stages,
            reads=(*reads, delta), writes=(dk[:, g0 : g0 + gp], dv[:, g0 : g0 + gp]), maxnreg=cfg.maxnreg,
            loops={"start_m": cdiv(NQ, c["BLOCK_M"])},
        ))  # fmt: skip

    # the parameters' gradients: the partial sums added in a fixed order, one launch
    # (each gradient its own buffer: the op's outputs must not share storage)
    def out(t):
        return None if t is None else _alloc(tuple(t.shape), t.dtype, dev)

    norm_w, norm_b = (norm_w, norm_b) if has_norm else (None, None)
    grads = [out(t) for t in (pre_w, post_w, post_b, norm_w, norm_b)]
    if any(g is not None for g in grads):
        block_r = 64
        launch(Launch(
            f"head_mixing_bwd_params[{tag}]", _param_grad_kernel, (1,),
            [part, *(part if g is None else g for g in grads), part.shape[0], npart],
            dict(H=H, HP=HP, BLOCK_R=block_r, BLOCK_C=_pow2(npart), HAS_PRE=flags["HAS_PRE"],
                 HAS_POST=flags["HAS_POST"], HAS_POST_B=flags["HAS_POST_B"],
                 HAS_NORM_W=flags["HAS_NORM_W"], HAS_NORM_B=flags["HAS_NORM_B"]),
            4, 1, reads=(part,), writes=tuple(g for g in grads if g is not None),
            loops={"start_r": cdiv(part.shape[0], block_r)},
        ))  # fmt: skip
    return dq, dk, dv, *grads


def _one_block(num_qb: int, c: dict) -> bool:
    """Whether the delta / dq kernel is compiled knowing that there is one query block
    (``ONE_QB``; NUM_QB is never specialised): for the 16-row blocks of a few query
    rows, not for larger blocks, which then compile the code of many blocks (the code
    the sweeps at Nq 196-197 check) rather than a one-block variant of their own.
    Compiles decided it (sm_90a, triton 3.9, 2026-12-03): known, the 64-row delta pass
    spilled at Nq 49 (re-attention, 4 heads of 64 in f16 with float32 parameters, 12 B;
    timm's talking heads, 4 heads of 48 in bf16, 16 B); not known, the dq pass on 16-row
    blocks spilled (Nq 7, talking heads at 4 heads of 32-64: 8-48 B)."""
    return num_qb == 1 and c["BLOCK_M"] == 16


def _row_runs(nq: int, block_m: int, batch: int, sms: int) -> list[tuple[int, int]]:
    """(first query, queries) of each delta launch: one over every row, or, where 64-row
    blocks leave 1-16 rows after their whole blocks (Nq = 196: 3 x 64 + 4) and it pays,
    the whole blocks and then the rest, which the caller gives the few-row configuration
    (16-row blocks). A 64-row block of 4 real rows costs a whole program; a 16-row
    program costs ~0.4 of one, a launch ~0.25 (the estimate's numbers at M1: 12.1 us, 4.6
    and 3): so the second launch when the whole blocks alone, in waves of `sms` programs,
    take fewer waves by more than that (at M1's batch 256: 8 -> 6 waves against ~1.05;
    a batch of up to sms / 4 keeps one launch)."""
    rest = nq % block_m
    if block_m != 64 or nq < block_m or not 0 < rest <= 16:
        return [(0, nq)]
    blocks = nq // block_m + 1
    saved = cdiv(blocks * batch, sms) - cdiv((blocks - 1) * batch, sms)
    if saved <= 0.4 * cdiv(batch, sms) + 0.25:
        return [(0, nq)]
    return [(0, nq - rest), (nq - rest, rest)]


# ----------------------------------------------------------------------------
# the launches of one workload shape (ahead-of-time compiles, the estimate)


def refusal(shape: HeadMixingShape) -> str | None:
    """Why the kernels do not take this workload shape (dispatch gives it to the torch
    backend), or None."""
    from vitkernels.ops.head_mixing import MAX_FWD_HEADS, MAX_HEAD_DIM, MAX_HEADS

    if shape.heads > MAX_FWD_HEADS:
        return f"H={shape.heads} heads is above the kernels' limit of {MAX_FWD_HEADS}"
    if shape.head_dim > MAX_HEAD_DIM:
        return f"D={shape.head_dim} is above the kernels' limit of {MAX_HEAD_DIM}"
    if shape.heads <= MAX_HEADS and shape.head_dim % 8:  # 5-16 heads: masked loads, any alignment
        return f"D={shape.head_dim}: 16-bit rows of {2 * shape.head_dim} bytes are not 16-byte aligned"
    return None


def directions(shape: HeadMixingShape) -> tuple[str, ...]:
    """The directions the kernels run for this shape (both: 5-16 heads in head_mixing_tc.py)."""
    return ("fwd", "bwd")


def record_calls(
    shape: HeadMixingShape,
    batch: int,
    dtype: torch.dtype,
    direction: str,
    tensor: TensorFactory,
    param_dtype: torch.dtype | None = None,
) -> None:
    """Call the launcher of one direction ("fwd" or "bwd") as the models' layers call
    the op (``shape.layout``), inputs made by ``tensor``; the mixing and norm
    parameters in ``param_dtype`` (default: dtype; float32 under autocast). "bwd" is
    the backward after the custom op's forward (reading the padded k / v copies it
    saved, where it saves any); "bwd_unsaved" the backward without them (a launcher
    caller passing none: it pads k and v itself)."""
    why = refusal(shape)
    if why is None and direction not in (*directions(shape), "bwd_unsaved"):
        why = f"no {direction!r} direction"
    if why is not None:
        raise ValueError(f"head_mixing: the kernels do not take {shape}: {why}")
    B, H, D, NQ, NK = batch, shape.heads, shape.head_dim, shape.nq, shape.nk
    pdt = dtype if param_dtype is None else param_dtype
    if shape.layout == "timm":  # qkv (B, N, 3, H, D) -> (3, B, H, N, D)
        qkv = tensor((B, NK, 3, H, D), dtype).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0][:, :, :NQ], qkv[1], qkv[2]
    elif shape.norm:  # DeepViT: to_qkv(x).chunk(3), 'b n (h d) -> b h n d' (q: the first Nq rows)
        q, k, v = (t.unflatten(-1, (H, D)).transpose(1, 2) for t in tensor((B, NK, 3 * H * D), dtype).chunk(3, -1))
        q = q[:, :, :NQ]
    else:  # CaiT: to_q(x), to_kv(context).chunk(2), 'b n (h d) -> b h n d'
        q = tensor((B, NQ, H * D), dtype).unflatten(-1, (H, D)).transpose(1, 2)
        k, v = (t.unflatten(-1, (H, D)).transpose(1, 2) for t in tensor((B, NK, 2 * H * D), dtype).chunk(2, -1))

    def mixing() -> torch.Tensor:  # vit-pytorch's einsum('b h i j, h g') weight is W[in, out]
        w = tensor((H, H), pdt)
        return w if shape.layout == "timm" else w.t()

    pre_w = mixing() if shape.pre else None
    post_w = mixing() if shape.post else None
    post_b = tensor((H,), pdt) if shape.post and shape.bias else None
    norm_w, norm_b = (tensor((H,), pdt), tensor((H,), pdt)) if shape.norm else (None, None)
    params = (pre_w, post_w, post_b, norm_w, norm_b)
    scale = D**-0.5
    if direction == "fwd":
        head_mixing_attention_fwd(q, k, v, *params, scale, 1e-5, shape.norm)
        return
    # the output's gradient as the layer's 'b h n d -> b n (h d)' hands it back
    grad_out = tensor((B, NQ, H * D), dtype).unflatten(-1, (H, D)).transpose(1, 2)
    lse = tensor((B, H, NQ), torch.float32)
    copies = None
    if H > _MAX_REG_HEADS and direction == "bwd":  # the forward's padded k / v copies (fresh, aligned), as saved
        from vitkernels.triton.head_mixing_tc import saved_copy_shapes

        shapes = saved_copy_shapes(q, k, v)
        copies = None if shapes is None else tuple(torch.empty(sh, dtype=dtype, device=q.device) for sh in shapes)
    head_mixing_attention_bwd(grad_out, q, k, v, *params, lse, scale, 1e-5, shape.norm, copies)
