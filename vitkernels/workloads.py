"""The reference workloads and their floors (bench/WORKLOADS.md explains them).

One definition serves the benchmarks (bench/roofline.py), the compiler-based
estimate (``python -m vitkernels estimate``) and the ahead-of-time compiles of
the Triton kernels (vitkernels/triton/_aot.py). Shapes are per workload; the
batch (256) and dtype (bfloat16) are the defaults of every benchmark.

Floor of one pass = max(bytes / BANDWIDTH, flops / MATMUL), counting each input
read once and each output written once, on the H200 that is lent for
measurements: 4.3 TB/s device-to-device copy (bytes read + written) and
788 TFLOP/s dense bfloat16 matrix product, both measured on it.

    forward   relpos: q, k, v, table read, out written; 2*B*H*Nq*Nk*(Dk+Dv) flops
              performer: q, k, v, w read, y written; 8*B*T*E*M flops
              patch_embed: images, weight, bias, norms, pos, cls read, tokens
              written; 2*M*D*K flops (M = B*L rows of patches, K = C*kh*kw)
              head_mixing: q, k, v and the mixing and norm parameters read, out
              written; 2*B*H*Nq*Nk*(Dk+Dv) + 2*B*H*H*Nq*Nk per mixing (pre, post)
    backward  relpos: q, k, v, dO, O, the row logsumexp (float32) and the table
              read, dq, dk, dv, dtable written; twice the forward flops (dS and
              dP products for dq, dk; P^T dO, dO V^T)
              performer: q, k, v, dy, w and the saved key statistics (float32
              lks (B, M), vbar (B, M, E)) read, dq, dk, dv written; twice the
              forward flops
              patch_embed: grad_out, images and weight read (norm weights too),
              each parameter's gradient written; dW = dy^T @ patches (2*M*D*K)
              and, with an input norm that has an affine, dy @ W (2*M*D*K more)
              head_mixing: q, k, v, dO, the row logsumexp (float32) and the
              parameters read, dq, dk, dv and the parameters' gradients written;
              twice the forward flops
    fwd+bwd   the sum of both
"""

from __future__ import annotations

import dataclasses
from typing import Literal

BANDWIDTH_BYTES_PER_S = 4.3e12  # H200, measured: device-to-device copy
MATMUL_FLOPS_PER_S = 788e12  # H200, measured: dense bf16 matrix product
BATCH = 256
BF16_BYTES = 2
F32_BYTES = 4

Pass = Literal["fwd", "bwd", "fwd+bwd"]
PASSES: tuple[Pass, ...] = ("fwd", "bwd", "fwd+bwd")


@dataclasses.dataclass(frozen=True)
class RelposShape:
    heads: int
    side: int  # the key grid is side x side
    q_stride: int
    dk: int
    dv: int

    @property
    def nk(self) -> int:
        return self.side * self.side

    @property
    def nq(self) -> int:
        return (-(-self.side // self.q_stride)) ** 2


@dataclasses.dataclass(frozen=True)
class PerformerShape:
    tokens: int
    dim: int  # E
    features: int  # M


@dataclasses.dataclass(frozen=True)
class PatchEmbedShape:
    channels: int
    image: int  # square images
    kernel: int
    stride: int
    padding: int
    dim: int  # D
    patch_order: str  # "cpq" (Conv2d, nn.Unfold) or "pqc" (vit-pytorch's Rearrange)
    in_norm: bool
    out_norm: bool
    pos_rows: int  # 0: no positions; L or P + L rows
    prefix: int  # class tokens
    # "nchw": contiguous images; "channels_last"; "tokens": a view of (B, N, C) tokens
    # as (B, C, side, side), as T2T's later soft splits take them
    layout: str = "nchw"

    @property
    def side_out(self) -> int:
        return (self.image + 2 * self.padding - self.kernel) // self.stride + 1

    @property
    def tokens(self) -> int:  # L
        return self.side_out**2

    @property
    def k(self) -> int:  # K
        return self.channels * self.kernel * self.kernel


@dataclasses.dataclass(frozen=True)
class HeadMixingShape:
    heads: int
    nq: int
    nk: int
    head_dim: int  # Dk = Dv
    # "vit-pytorch": q and kv (CaiT) or q, k, v (DeepViT) chunks of projections,
    # 'b n (h d) -> b h n d', mixing weights used as einsum('b h i j, h g') (transposed
    # views); "timm": one qkv projection (B, N, 3, H, D) permuted, nn.Linear mixing
    layout: str
    pre: bool  # talking heads: the logits mixed
    post: bool  # the probabilities mixed (talking heads, re-attention)
    bias: bool  # the mixings' biases (timm's nn.Linear)
    norm: bool  # re-attention's LayerNorm over the heads

    @property
    def mixings(self) -> int:
        return int(self.pre) + int(self.post)

    @property
    def param_elements(self) -> int:
        n = self.mixings * self.heads * (self.heads + (1 if self.bias else 0))
        return n + (2 * self.heads if self.norm else 0)


Shape = RelposShape | PerformerShape | PatchEmbedShape | HeadMixingShape


@dataclasses.dataclass(frozen=True)
class Workload:
    id: str
    op: str  # "relpos_attention", "performer_attention", "patch_embed", "head_mixing_attention"
    title: str
    shape: Shape
    batch: int = BATCH

    def flops(self, which: Pass) -> float:
        if which == "fwd+bwd":
            return self.flops("fwd") + self.flops("bwd")
        s, B = self.shape, self.batch
        if isinstance(s, RelposShape):
            fwd = 2.0 * B * s.heads * s.nq * s.nk * (s.dk + s.dv)
            return fwd if which == "fwd" else 2 * fwd
        if isinstance(s, PerformerShape):
            fwd = 8.0 * B * s.tokens * s.dim * s.features
            return fwd if which == "fwd" else 2 * fwd
        if isinstance(s, HeadMixingShape):
            pairs = B * s.nq * s.nk
            fwd = 2.0 * pairs * s.heads * 2 * s.head_dim + s.mixings * 2.0 * pairs * s.heads * s.heads
            return fwd if which == "fwd" else 2 * fwd
        gemm = 2.0 * B * s.tokens * s.dim * s.k
        return gemm if which == "fwd" else gemm * (2 if s.in_norm else 1)

    def bytes(self, which: Pass) -> float:
        if which == "fwd+bwd":
            return self.bytes("fwd") + self.bytes("bwd")
        s, B, e = self.shape, self.batch, BF16_BYTES
        if isinstance(s, RelposShape):
            q, k = B * s.heads * s.nq * s.dk * e, B * s.heads * s.nk * s.dk * e
            v, o = B * s.heads * s.nk * s.dv * e, B * s.heads * s.nq * s.dv * e
            table = s.heads * s.nk * e
            if which == "fwd":
                return q + k + v + table + o
            lse = B * s.heads * s.nq * F32_BYTES
            return (q + k + v + 2 * o + lse + table) + (q + k + v + table)
        if isinstance(s, PerformerShape):
            act = B * s.tokens * s.dim * e
            w = s.features * s.dim * F32_BYTES  # the model's float32 random features
            if which == "fwd":
                return 4 * act + w
            stats = B * s.features * (1 + s.dim) * F32_BYTES  # lks (B, M), vbar (B, M, E)
            return (4 * act + w + stats) + 3 * act
        if isinstance(s, HeadMixingShape):
            q = o = B * s.heads * s.nq * s.head_dim * e
            k = v = B * s.heads * s.nk * s.head_dim * e
            params = s.param_elements * e
            if which == "fwd":
                return q + k + v + params + o
            lse = B * s.heads * s.nq * F32_BYTES
            return (q + k + v + o + lse + params) + (q + k + v + params)  # dO read; grads written
        images = B * s.channels * s.image * s.image * e
        weight = s.dim * s.k * e
        params = weight + s.dim * e  # weight, bias
        params += 2 * s.k * e if s.in_norm else 0
        params += 2 * s.dim * e if s.out_norm else 0
        params += (s.pos_rows + s.prefix) * s.dim * e
        tokens = B * (s.prefix + s.tokens) * s.dim * e
        if which == "fwd":
            return images + params + tokens
        return (tokens + images + params) + params  # grad_out, images, params read; grads written

    def floor_s(self, which: Pass) -> float:
        return max(self.bytes(which) / BANDWIDTH_BYTES_PER_S, self.flops(which) / MATMUL_FLOPS_PER_S)

    def bound(self, which: Pass) -> str:
        mem = self.bytes(which) / BANDWIDTH_BYTES_PER_S
        return "memory" if mem >= self.flops(which) / MATMUL_FLOPS_PER_S else "math"


_P1 = PatchEmbedShape(3, 224, 16, 16, 0, 768, "cpq", False, False, 197, 1)
WORKLOADS: dict[str, Workload] = {
    w.id: w
    for w in (
        Workload("P1", "patch_embed", "ViT-B/16 at 224 (+cls, +pos)", _P1),
        Workload("P2", "patch_embed", "vit-pytorch dual patchnorm (LN in, LN out), ViT-B/16",
                 dataclasses.replace(_P1, patch_order="pqc", in_norm=True, out_norm=True)),
        Workload("P3", "patch_embed", "T2T soft split 7/4/2 + LN(147) + kqv Linear(147->192)",
                 PatchEmbedShape(3, 224, 7, 4, 2, 192, "cpq", True, False, 0, 0)),
        Workload("A1", "relpos_attention", "LeViT-256 stage 1", RelposShape(4, 14, 1, 32, 64)),
        Workload("A2", "relpos_attention", "LeViT-256 stage 2", RelposShape(6, 7, 1, 32, 64)),
        Workload("A3", "relpos_attention", "LeViT-256 stage 3", RelposShape(8, 4, 1, 32, 64)),
        Workload("A4", "relpos_attention", "LeViT-256 shrink 14->7 (q_stride 2)",
                 RelposShape(8, 14, 2, 32, 128)),
        Workload("A5", "relpos_attention", "LeViT-128S stage 1", RelposShape(4, 14, 1, 16, 32)),
        Workload("T1", "performer_attention", "T2T-ViT-14 layer 1", PerformerShape(3136, 64, 32)),
        Workload("T2", "performer_attention", "T2T-ViT-14 layer 2", PerformerShape(784, 64, 32)),
        Workload("M1", "head_mixing_attention", "CaiT-XXS24 talking heads (vit-pytorch, this repo)",
                 HeadMixingShape(4, 196, 196, 48, "vit-pytorch", True, True, False, False)),
        Workload("M2", "head_mixing_attention", "DeepViT-S re-attention (models/deepvit.py)",
                 HeadMixingShape(12, 197, 197, 33, "vit-pytorch", False, True, False, True)),
        Workload("M3", "head_mixing_attention", "CaiT-XXS24 class attention (1 query over 197 keys)",
                 HeadMixingShape(4, 1, 197, 48, "vit-pytorch", True, True, False, False)),
    )
}  # fmt: skip

# Other layer shapes the models launch, compiled ahead of time besides the workloads
# (heads do not change a relpos launch's specialisation): every attention layer of
# timm's LeViT-128S/128/192/256/384, T2T-ViT-14's later soft splits (3/2/1 on
# 64-channel token maps; the first with attention2's norm1 + kqv, the second with the
# project layer, class token and positions), timm's CaiT attention and a re-attention
# the head-mixing kernels take.
EXTRA_SHAPES: dict[str, Shape] = {
    "L128s-shrink14": RelposShape(8, 14, 2, 16, 64),
    "L128s-7": RelposShape(6, 7, 1, 16, 32),
    "L128s-shrink7": RelposShape(16, 7, 2, 16, 64),
    "L128s-4": RelposShape(8, 4, 1, 16, 32),
    "L256-shrink7": RelposShape(12, 7, 2, 32, 128),
    "L-shrink14-dv64": RelposShape(8, 14, 2, 32, 64),  # A4 before it took Dv 128
    # LeViT-256 stage 1 at 448 px: a 28 x 28 grid, the key-blocked dQ kernel
    "L256-448px": RelposShape(4, 28, 1, 32, 64),
    # LeViT-256 stage 3 at 128 px: a 2 x 2 grid, fewer keys than one tl.dot takes
    "L256-128px": RelposShape(8, 2, 1, 32, 64),
    "T2T-2": PatchEmbedShape(64, 56, 3, 2, 1, 192, "cpq", True, False, 0, 0, "tokens"),
    "T2T-3": PatchEmbedShape(64, 28, 3, 2, 1, 384, "cpq", False, False, 197, 1, "tokens"),
    # timm's CaiT-XXS24 (TalkingHeadAttn: one qkv projection, biased nn.Linear mixing)
    "M1-timm": HeadMixingShape(4, 196, 196, 48, "timm", True, True, True, False),
    # the same on a few queries (its backward's dk/dv on 16 keys x 16 queries: 32 x 16 spilled)
    "timm-few": HeadMixingShape(4, 7, 197, 32, "timm", True, True, True, False),
    # talking heads on 2-16 queries (this repo's and vit-pytorch's layout): dk/dv on 16 x 16
    "CaiT-few": HeadMixingShape(4, 7, 197, 48, "vit-pytorch", True, True, False, False),
    # re-attention in the register kernels (at most 4 heads; M2 takes the tensor-core forward)
    "M2-H4": HeadMixingShape(4, 197, 197, 64, "vit-pytorch", False, True, False, True),
    # 5-16 heads: the tensor-core forward and backward (head_mixing_tc.py): CaiT-M's
    # 16 heads (vit-pytorch layout) and CaiT-S's 8 in timm's (the post-mix bias)
    "CaiT-M": HeadMixingShape(16, 197, 197, 48, "vit-pytorch", True, True, False, False),
    "CaiT-S-timm": HeadMixingShape(8, 197, 197, 48, "timm", True, True, True, False),
    # re-attention at 5-8 heads: the head norm on rows of two (query, key) pairs (HP = 8)
    "DeepViT-H8": HeadMixingShape(8, 197, 197, 64, "vit-pytorch", False, True, False, True),
    # 1-2 heads, where the backward's launches take a register limit (ptxas's own choice
    # spilled; ``head_mixing._reg_limits``): at 2 heads of 64 the pre-mix alone (dq,
    # 255) and the post-mix alone (dk/dv, 255); at 1 head of 32 the post-mix alone (dk/dv, 128)
    "H2-pre-D64": HeadMixingShape(2, 196, 197, 64, "vit-pytorch", True, False, False, False),
    "H2-post-D64": HeadMixingShape(2, 196, 197, 64, "vit-pytorch", False, True, False, False),
    "H1-post-D32": HeadMixingShape(1, 49, 197, 32, "vit-pytorch", False, True, False, False),
    # the head norm without a post-mix at 9-16 heads (HP = 16), heads of 33 (padded
    # copies): triton 3.6 failed to compile its dq launch ("operand #0 does not dominate")
    "H12-norm-D33": HeadMixingShape(12, 197, 197, 33, "vit-pytorch", False, False, False, True),
    # vit-pytorch's DeepViT as its README configures it (heads=16, dim_head 64, 256-px
    # images in 32-px patches: 65 tokens): the 5-16-head backward at heads of 49-64,
    # chunks of 32 and dk's two chunks in a launch each (head_mixing_tc._kv_split)
    "DeepViT-16x64": HeadMixingShape(16, 65, 65, 64, "vit-pytorch", False, True, False, True),
    # vit-pytorch's CaiT class attention at its README size (heads=16, dim_head 64; the
    # class token over 65 tokens): at one query dk and dv in one launch
    "CaiT-cls-16x64": HeadMixingShape(16, 1, 65, 64, "vit-pytorch", True, True, False, False),
    # re-attention on one query in the 1-4-head register kernels (no family's layer, but
    # a call the op takes; a sweep found it spilling, bench/NOTES.md 2026-12-04): the
    # delta, dq and dk/dv launches on 8 warps on sm_90
    "reattn-1q-4x64": HeadMixingShape(4, 1, 65, 64, "vit-pytorch", False, True, False, True),
    # edge shapes a compile sweep found failing (bench/compile_sweep.py): Triton makes an
    # integer argument equal to 1 a constant; a patch as large as the image (one token:
    # L = Wout = 1) and a pointwise 1 x 1 kernel on one channel (kh * kw = kw = C = K = 1)
    "pe-one-token": PatchEmbedShape(3, 8, 8, 8, 0, 48, "cpq", True, True, 2, 1),
    "pe-1x1": PatchEmbedShape(1, 4, 1, 1, 0, 16, "pqc", True, False, 0, 0),
}
