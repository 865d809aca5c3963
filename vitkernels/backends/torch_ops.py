"""The torch backend: the best stock PyTorch composite for each op.

The automatic choice on CPU, and the baseline the kernels must beat on GPU
(e.g. SDPA with a gathered, materialised bias for relpos_attention). Each op's
section below is owned by that op's module in vitkernels/ops/.
"""

from __future__ import annotations

import torch  # noqa: F401
import torch.nn.functional as F  # noqa: F401

# ----------------------------------------------------------------------------
# performer_attention (owned by vitkernels/ops/performer.py)


def performer_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, *, eps: float = 1e-8
) -> torch.Tensor:
    """T2T-ViT's Performer attention as stock ops, in a form whose exp() stays finite.

    The same number as the reference (see vitkernels/triton/performer.py for the
    derivation): with a = x w^T - |x|^2 / 2, lks = logsumexp_t(a_k) and
    vbar = softmax_t(a_k)^T v, y = sum_m p vbar / (sum_m p + eps M e^-s) where
    p = exp(a_q + lks - s), s = max_m(a_q + lks). Float32 math (float64 stays
    float64); q, k, v (B, T, E), w (M, E); returns (B, T, E) in q's dtype.
    """
    import math

    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    wt = w.to(ct).t()  # (E, M)

    def logits(x: torch.Tensor) -> torch.Tensor:  # (B, T, E) -> (B, T, M)
        x = x.to(ct)
        return x @ wt - 0.5 * (x * x).sum(dim=-1, keepdim=True)

    ak = logits(k)
    lks = torch.logsumexp(ak, dim=1)  # (B, M)
    vbar = torch.softmax(ak, dim=1).transpose(1, 2) @ v.to(ct)  # (B, M, E)
    lq = logits(q) + lks.unsqueeze(1)  # (B, T, M)
    s = lq.amax(dim=-1, keepdim=True).detach()  # y does not depend on s: no gradient
    p = torch.exp(lq - s)
    z = p.sum(dim=-1, keepdim=True)
    if eps > 0:
        z = z + torch.exp(math.log(eps) + math.log(w.shape[0]) - s)
    return ((p @ vbar) / z).to(q.dtype)


# ----------------------------------------------------------------------------
# patch_embed (owned by vitkernels/ops/patch_embed.py)


def _to_cpq(
    t: torch.Tensor | None, kernel_size: tuple[int, int], channels: int, patch_order: str
) -> torch.Tensor | None:
    """(..., K) in patch_order -> (..., K) in Conv2d / F.unfold's (c, p, q) order."""
    if t is None or patch_order == "cpq":
        return t
    kh, kw = kernel_size
    return t.reshape(*t.shape[:-1], kh, kw, channels).movedim(-1, -3).reshape(t.shape)


def patch_embed(
    images: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    patch_order: str = "cpq",
    in_norm: tuple[torch.Tensor | None, torch.Tensor | None, float] | None = None,
    out_norm: tuple[torch.Tensor | None, torch.Tensor | None, float] | None = None,
    pos_embed: torch.Tensor | None = None,
    cls_token: torch.Tensor | None = None,
) -> torch.Tensor:
    """Patch embedding as stock ops: Conv2d without an input norm (the weight's
    "pqc" columns permuted to Conv2d's (c, p, q)), else unfold + layer_norm +
    linear in Conv2d's patch order (the norm's affine permuted alike; its
    statistics do not depend on the order). images (B, C, H, W), weight (D, K),
    pos_embed (L or P + L, D), cls_token (P, D); returns (B, P + L, D).
    """
    B, C = images.shape[:2]
    kh, kw = kernel_size
    D, K = weight.shape

    def to_cpq(t: torch.Tensor | None) -> torch.Tensor | None:
        return _to_cpq(t, kernel_size, C, patch_order)

    w = to_cpq(weight)
    if in_norm is None:
        y = F.conv2d(images, w.reshape(D, C, kh, kw), bias, stride=stride, padding=padding)
        tokens = y.flatten(2).transpose(1, 2)  # (B, D, Ho, Wo) -> (B, L, D)
    else:
        nw, nb, eps = in_norm
        cols = F.unfold(images, kernel_size, stride=stride, padding=padding)  # (B, K, L)
        x = F.layer_norm(cols.transpose(1, 2), (K,), to_cpq(nw), to_cpq(nb), eps)
        tokens = F.linear(x, w, bias)
    if out_norm is not None:
        nw, nb, eps = out_norm
        tokens = F.layer_norm(tokens, (D,), nw, nb, eps)
    L = tokens.shape[1]
    if pos_embed is not None and pos_embed.shape[0] == L:
        tokens = tokens + pos_embed
        pos_embed = None
    if cls_token is not None:
        tokens = torch.cat([cls_token.expand(B, -1, -1), tokens], dim=1)
    if pos_embed is not None:
        tokens = tokens + pos_embed
    return tokens


def _layer_norm_backward(dy: torch.Tensor, xhat: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    """dx of xhat = (x - mean) * rstd over the last dim, given dy = dL/dxhat."""
    return (dy - dy.mean(-1, keepdim=True) - xhat * (dy * xhat).mean(-1, keepdim=True)) * rstd


def _normalise(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    var, mean = torch.var_mean(x, dim=-1, keepdim=True, correction=0)
    rstd = torch.rsqrt(var + eps)
    return (x - mean) * rstd, rstd


def patch_embed_image_grad(
    grad_out: torch.Tensor,
    images: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    in_norm: tuple[torch.Tensor | None, torch.Tensor | None, float] | None,
    out_norm: tuple[torch.Tensor | None, torch.Tensor | None, float] | None,
    *,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    patch_order: str,
    prefix: int,
) -> torch.Tensor:
    """d images of patch_embed, in float32 stock ops (the kernels' backward gives
    the parameter gradients; T2T-ViT's later soft splits also need this one).

    grad_out (B, P + L, D); the patch tokens' rows go back through the output norm
    (recomputing the GEMM), the projection, the input norm (recomputing the
    patches' statistics) and F.fold, which sums the overlapping patches.
    Returns (B, C, H, W) in the images' dtype.
    """
    B, C, H, W = images.shape
    D = weight.shape[0]
    K = weight.numel() // D

    def f32(t: torch.Tensor | None, order: str = "cpq") -> torch.Tensor | None:
        return None if t is None else _to_cpq(t.float(), kernel_size, C, order)

    w = f32(weight.reshape(D, K), patch_order)
    cols = F.unfold(images.float(), kernel_size, stride=stride, padding=padding).transpose(1, 2)
    dy = grad_out[:, prefix:].float()  # (B, L, D)
    if in_norm is not None:
        g_in = f32(in_norm[0], patch_order)
        xhat_in, rstd_in = _normalise(cols, in_norm[2])
    if out_norm is not None:
        a = cols
        if in_norm is not None:
            a = F.layer_norm(cols, (K,), g_in, f32(in_norm[1], patch_order), in_norm[2])
        zhat, rstd_out = _normalise(F.linear(a, w, f32(bias)), out_norm[2])
        g_out = f32(out_norm[0])
        dy = _layer_norm_backward(dy if g_out is None else dy * g_out, zhat, rstd_out)
    da = dy @ w  # (B, L, K)
    if in_norm is not None:
        da = _layer_norm_backward(da if g_in is None else da * g_in, xhat_in, rstd_in)
    grad = F.fold(da.transpose(1, 2), (H, W), kernel_size, stride=stride, padding=padding)
    return grad.to(images.dtype)


# ----------------------------------------------------------------------------
# relpos_attention (owned by vitkernels/ops/relpos.py)

_RELPOS_INDEX: dict[tuple[int, int, int, str], torch.Tensor] = {}


def _relpos_index(fmap_size: tuple[int, int], q_stride: int, device: torch.device) -> torch.Tensor:
    """(Nq, Nk) table columns |dr|*C + |dc| (reference.relpos_bias_index), cached per device."""
    from vitkernels.backends.reference import relpos_bias_index

    if _tracing():  # torch.compile / torch.export: a traced constant, never cached (fake)
        return relpos_bias_index(fmap_size, q_stride, device=device)
    key = (fmap_size[0], fmap_size[1], q_stride, str(device))
    idx = _RELPOS_INDEX.get(key)
    if idx is None:
        with torch.inference_mode(False):  # a normal tensor, usable by later autograd calls
            idx = relpos_bias_index(fmap_size, q_stride, device=device)
        _RELPOS_INDEX[key] = idx
    return idx


def _tracing() -> bool:
    """Under torch.compile or torch.export tracing (tensors may be fake)."""
    compiler = getattr(torch, "compiler", None)
    for name in ("is_compiling", "is_exporting"):
        fn = getattr(compiler, name, None)
        if fn is not None and fn():
            return True
    return False


def _relpos_bias(
    bias_table: torch.Tensor,
    fmap_size: tuple[int, int],
    q_stride: int,
    bias_scale: float,
    table_layout: str,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The gathered (H, Nq, Nk) bias in ``dtype``, from the table's current values.

    Gathered on every call, never cached: fused optimizers (``AdamW(fused=True)``)
    and writes through ``.data`` change a table without moving its version
    counter, so no cache keyed on the tensor could tell that its values changed.
    The gather is an index_select of H * Nq * Nk elements (CPU, one thread, H4
    N196: about 0.24 ms; the eager ``table[:, idx]`` takes about 1 ms).
    """
    table = bias_table if table_layout == "hn" else bias_table.t()  # (H, R*C)
    idx = _relpos_index(fmap_size, q_stride, bias_table.device)  # (Nq, Nk)
    bias = table.index_select(1, idx.flatten()).view(table.shape[0], *idx.shape)
    return bias.to(dtype) * bias_scale


def relpos_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias_table: torch.Tensor,
    *,
    fmap_size: tuple[int, int],
    q_stride: int,
    scale: float,
    bias_scale: float,
    table_layout: str,
) -> torch.Tensor:
    """SDPA with the bias gathered into a (1, H, Nq, Nk) tensor in q's dtype.

    The bias rows are padded to a multiple of 8 elements (then sliced back), so the
    memory-efficient SDPA kernel takes the mask as it is instead of copying it.
    Off CUDA, SDPA with a float mask is slower than two matmuls and a softmax at
    LeViT's sizes (CPU, B8 H4 N196 Dk16: 2.4 ms against 1.2 ms), so there the
    explicit product runs, with the scale and bias applied in place.
    """
    bias = _relpos_bias(bias_table, fmap_size, q_stride, bias_scale, table_layout, q.dtype)
    if q.device.type != "cuda":
        # float16/bfloat16 in float32, as SDPA's CPU kernels do internally
        ct = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
        logits = torch.matmul(q.to(ct), k.to(ct).transpose(-1, -2)).mul_(scale).add_(bias.to(ct))
        return torch.matmul(logits.softmax(dim=-1), v.to(ct)).to(q.dtype)  # (B, H, Nq, Dv)
    nk = bias.shape[-1]
    if nk % 8:
        bias = F.pad(bias, (0, -nk % 8))[..., :nk]  # (H, Nq, Nk), row stride 8-aligned
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.unsqueeze(0), scale=scale)


# ----------------------------------------------------------------------------
# head_mixing_attention (owned by vitkernels/ops/head_mixing.py)


def _mix_heads(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """(B, H, Nq, Nk) -> (B, H, Nq, Nk): out[:, o] = sum_i weight[o, i] x[:, i] + bias[o],
    one batched matrix product over the flattened (i, j) plane."""
    B, H, Nq, Nk = x.shape
    w = weight.to(x.dtype).expand(B, H, H)
    flat = x.reshape(B, H, Nq * Nk)
    if bias is None:
        return torch.bmm(w, flat).view(B, H, Nq, Nk)
    bias = bias.to(x.dtype).view(1, H, 1).expand(B, H, Nq * Nk)
    return torch.baddbmm(bias, w, flat).view(B, H, Nq, Nk)


def head_mixing_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    pre: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    post: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    head_norm: tuple[torch.Tensor | None, torch.Tensor | None, float] | None = None,
    dropout_p: float = 0.0,
    dropout_site: str = "probs",
) -> torch.Tensor:
    """The reference's math with batched matrix products: logits from one matmul of
    the pre-scaled queries, each head mixing as one bmm (the bias folded in with
    baddbmm), softmax, the head norm as F.layer_norm over a head-last view. On CPU,
    float16/bfloat16 run in float32 (as SDPA's CPU kernels do internally). The
    (B, H, Nq, Nk) logits and probabilities are materialised (the Triton kernels
    never do). q (B, H, Nq, Dk), k (B, H, Nk, Dk), v (B, H, Nk, Dv) -> (B, H, Nq, Dv).
    """
    ct = q.dtype
    if q.device.type != "cuda" and ct in (torch.float16, torch.bfloat16):
        ct = torch.float32
    attn = torch.matmul(q.to(ct) * scale, k.to(ct).transpose(-1, -2))  # (B, H, Nq, Nk)
    if pre is not None:
        attn = _mix_heads(attn, *pre)
    attn = attn.softmax(dim=-1)
    if dropout_p > 0 and dropout_site == "probs":
        attn = F.dropout(attn, dropout_p)
    if post is not None:
        attn = _mix_heads(attn, *post)
    if head_norm is not None:
        w, b, eps = head_norm
        w = None if w is None else w.to(ct)
        b = None if b is None else b.to(ct)
        attn = F.layer_norm(attn.movedim(1, -1), (attn.shape[1],), w, b, eps).movedim(-1, 1)
    if dropout_p > 0 and dropout_site == "mixed":
        attn = F.dropout(attn, dropout_p)
    return torch.matmul(attn, v.to(ct)).to(q.dtype)
