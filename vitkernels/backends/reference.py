"""The reference backend: each op's contract written as literal PyTorch math.

This file is the specification (see DESIGN.md). It runs on any device and dtype,
is differentiable through autograd, and is the oracle every other backend is
tested against (usually on float64 copies of the inputs). It is never the fast
path: relpos materialises the (Nq x Nk) bias and logits, patch_embed
materialises the unfolded patches.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

Norm = tuple[torch.Tensor | None, torch.Tensor | None, float]


# ----------------------------------------------------------------------------
# relpos_attention


def relpos_query_grid(fmap_size: tuple[int, int], q_stride: int) -> tuple[int, int]:
    """(rows, cols) of the query grid: the key grid subsampled by q_stride."""
    R, C = fmap_size
    return -(-R // q_stride), -(-C // q_stride)


def relpos_bias_index(
    fmap_size: tuple[int, int], q_stride: int = 1, device: torch.device | None = None
) -> torch.Tensor:
    """(Nq, Nk) int64: table column |dr| * C + |dc| for query i and key j."""
    R, C = fmap_size
    Rq, Cq = relpos_query_grid(fmap_size, q_stride)
    qi = torch.arange(Rq * Cq, device=device)
    kj = torch.arange(R * C, device=device)
    q_r, q_c = (qi // Cq) * q_stride, (qi % Cq) * q_stride
    k_r, k_c = kj // C, kj % C
    dr = (q_r[:, None] - k_r[None, :]).abs()
    dc = (q_c[:, None] - k_c[None, :]).abs()
    return dr * C + dc


def relpos_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias_table: torch.Tensor,
    *,
    fmap_size: tuple[int, int],
    q_stride: int = 1,
    scale: float,
    bias_scale: float = 1.0,
    table_layout: str = "hn",
) -> torch.Tensor:
    """softmax(scale * q k^T + bias_scale * table[h, |dr|*C + |dc|]) @ v.

    q (B, H, Nq, Dk), k (B, H, Nk, Dk), v (B, H, Nk, Dv); table (H, R*C) for
    layout "hn" or (R*C, H) for "nh". Returns (B, H, Nq, Dv) in q's dtype.
    float16/bfloat16 inputs are computed in float32 (as the kernels accumulate),
    and q is scaled before the product, so q.k never overflows where the scaled
    logits are finite.
    """
    out_dtype = q.dtype
    ct = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    table = bias_table if table_layout == "hn" else bias_table.t()  # (H, R*C)
    idx = relpos_bias_index(fmap_size, q_stride, device=q.device)  # (Nq, Nk)
    bias = table[:, idx].to(ct)  # (H, Nq, Nk)
    logits = torch.einsum("bhid,bhjd->bhij", q.to(ct) * scale, k.to(ct)) + bias_scale * bias
    attn = logits.softmax(dim=-1)
    return torch.einsum("bhij,bhjd->bhid", attn, v.to(ct)).to(out_dtype)


# ----------------------------------------------------------------------------
# performer_attention


def performer_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, *, eps: float = 1e-8
) -> torch.Tensor:
    """T2T-ViT's Performer single attention, as the official Token_performer writes it.

    phi(x) = exp(x @ w.T - |x|^2 / 2) / sqrt(M)
    y = phi(q) @ (phi(k)^T v) / (phi(q) @ sum_t phi(k) + eps)
    q, k, v (B, T, E), w (M, E); math in float32 (float64 stays float64).

    Written with constant factors that cancel exactly, so that exp() stays in
    range wherever the result is finite: with a(x) = x @ w.T - |x|^2 / 2, the
    features are kp = exp(a(k) - c) for keys, c[m] = max_t a(k)[t, m], and
    qp = exp(a(q) + c - r) for queries, r[t] = max_m (a(q) + c)[t, m], so that

        qp[t, m] kp[j, m] = exp(a(q_t)_m + a(k_j)_m - r[t]) = M exp(-r[t]) phi(q_t)_m phi(k_j)_m:

    a factor of query row t alone, which cancels between the numerator and the
    denominator once eps is multiplied by it too. The largest product in each
    row is 1, so the denominator never vanishes, eps = 0 included.
    """
    out_dtype = q.dtype
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k, v, w = q.to(ct), k.to(ct), v.to(ct), w.to(ct)
    m = w.shape[0]

    def logits(x: torch.Tensor) -> torch.Tensor:  # (B, T, E) -> (B, T, M)
        return torch.einsum("bti,mi->btm", x, w) - (x * x).sum(dim=-1, keepdim=True) / 2

    aq, ak = logits(q), logits(k)
    c = ak.amax(dim=1, keepdim=True).detach()  # (B, 1, M): y does not depend on c
    r = (aq + c).amax(dim=-1, keepdim=True).detach()  # (B, T, 1): nor on r
    qp, kp = torch.exp(aq + c - r), torch.exp(ak - c)  # phi(q), phi(k) times those factors
    d = torch.einsum("bti,bi->bt", qp, kp.sum(dim=1)).unsqueeze(-1)  # (B, T, 1)
    kptv = torch.einsum("bin,bim->bnm", v, kp)  # (B, E, M)
    if eps > 0:  # eps M exp(-r) as one exp(): it overflows to inf (y = 0) only where eps dominates
        d = d + torch.exp(math.log(eps * m) - r)
    y = torch.einsum("bti,bni->btn", qp, kptv) / d
    return y.to(out_dtype)


# ----------------------------------------------------------------------------
# patch_embed


def _pair(x: int | tuple[int, int]) -> tuple[int, int]:
    return (x, x) if isinstance(x, int) else (int(x[0]), int(x[1]))


def unfold_patches(
    images: torch.Tensor,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    patch_order: str,
) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, K) patches; K ordered (c, p, q) or (p, q, c)."""
    B, C = images.shape[:2]
    kh, kw = kernel_size
    cols = F.unfold(images, kernel_size, stride=stride, padding=padding)  # (B, C*kh*kw, L)
    patches = cols.transpose(1, 2)  # (B, L, (c p q))
    if patch_order == "pqc":
        L = patches.shape[1]
        patches = patches.reshape(B, L, C, kh, kw).permute(0, 1, 3, 4, 2).reshape(B, L, -1)
    return patches


def patch_embed(
    images: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    kernel_size: int | tuple[int, int],
    stride: int | tuple[int, int] | None = None,
    padding: int | tuple[int, int] = 0,
    patch_order: str = "cpq",
    in_norm: Norm | None = None,
    out_norm: Norm | None = None,
    pos_embed: torch.Tensor | None = None,
    cls_token: torch.Tensor | None = None,
) -> torch.Tensor:
    """tokens = out_norm(in_norm(unfold(images)) @ weight.T + bias); prefix tokens; + pos.

    weight (D, K) with K = C*kh*kw in patch_order, or a Conv2d weight (D, C, kh, kw)
    (patch_order "cpq"). cls_token (D,), (P, D) or (1, P, D): P prefix tokens
    prepended. pos_embed ((1,) N+P, D) is added to every token, or ((1,) N, D) to
    the patch tokens only. Returns (B, P+N, D).
    """
    ks = _pair(kernel_size)
    st = _pair(stride if stride is not None else kernel_size)
    pad = _pair(padding)
    patches = unfold_patches(images, ks, st, pad, patch_order)  # (B, N, K)
    if in_norm is not None:
        nw, nb, eps = in_norm
        patches = F.layer_norm(patches, (patches.shape[-1],), nw, nb, eps)
    w2 = weight.reshape(weight.shape[0], -1)  # (D, K)
    tokens = patches @ w2.t()
    if bias is not None:
        tokens = tokens + bias
    if out_norm is not None:
        nw, nb, eps = out_norm
        tokens = F.layer_norm(tokens, (tokens.shape[-1],), nw, nb, eps)
    B, N, D = tokens.shape
    if cls_token is not None:
        prefix = cls_token.reshape(-1, D).to(tokens.dtype)  # (P, D)
        if pos_embed is not None and pos_embed.reshape(-1, D).shape[0] == N:
            tokens = tokens + pos_embed.reshape(N, D)
            pos_embed = None
        tokens = torch.cat([prefix.expand(B, -1, -1), tokens], dim=1)
    if pos_embed is not None:
        tokens = tokens + pos_embed.reshape(-1, D)
    return tokens


# ----------------------------------------------------------------------------
# head_mixing_attention

Mix = tuple[torch.Tensor, torch.Tensor | None]


def head_mixing_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    pre: Mix | None = None,
    post: Mix | None = None,
    head_norm: Norm | None = None,
    dropout_p: float = 0.0,
    dropout_site: str = "probs",
) -> torch.Tensor:
    """Attention whose heads are mixed around the softmax (CaiT's talking heads,
    DeepViT's re-attention), literally:

        s = (scale * q) k^T                                  (B, H, Nq, Nk)
        l[g] = sum_h A[g, h] s[h] + a[g]                      pre = (A, a)
        p = softmax over keys of l, per head                  dropout here ("probs")
        r[f] = sum_g P[f, g] p[g] + c[f]                      post = (P, c)
        n = LayerNorm over the head axis of r, per (i, j)     head_norm = (w, b, eps)
        out[f] = n[f] @ v[f]                                  dropout on n ("mixed")

    q (B, H, Nq, Dk), k (B, H, Nk, Dk), v (B, H, Nk, Dv); mixing weights (H, H) in
    nn.Linear's convention (weight[out, in]), biases (H,) or None; absent stages
    are skipped. Parameters are cast to q's dtype. Returns (B, H, Nq, Dv).
    """
    dt = q.dtype
    logits = torch.einsum("bhid,bhjd->bhij", q * scale, k)
    if pre is not None:
        logits = torch.einsum("gh,bhij->bgij", pre[0].to(dt), logits)
        if pre[1] is not None:
            logits = logits + pre[1].to(dt)[:, None, None]
    attn = logits.softmax(dim=-1)
    if dropout_p > 0 and dropout_site == "probs":
        attn = F.dropout(attn, dropout_p)
    if post is not None:
        attn = torch.einsum("fg,bgij->bfij", post[0].to(dt), attn)
        if post[1] is not None:
            attn = attn + post[1].to(dt)[:, None, None]
    if head_norm is not None:
        w, b, eps = head_norm
        w = None if w is None else w.to(dt)
        b = None if b is None else b.to(dt)
        attn = F.layer_norm(attn.movedim(1, -1), (attn.shape[1],), w, b, eps).movedim(-1, 1)
    if dropout_p > 0 and dropout_site == "mixed":
        attn = F.dropout(attn, dropout_p)
    return torch.einsum("bhij,bhjd->bhid", attn, v)
