"""optimize() on the official LeViT and T2T-ViT code, by layout.

Users copy facebookresearch/LeViT (``levit.py``: tokens, ``levit_c.py``: feature
maps) and yitu-opensource/T2T-ViT into their projects under any module path.
Their code is not in this repository: the stand-ins below are written here with
the official class names, attribute names and forward math (the relative-offset
index, the eval-time ``ab`` bias cache, the v skip connection of T2T-ViT-t's
Token_transformer, T2T_module's three variants). The rules recognise them by
layout and replace them only after the optimize-time check; the eager copy is
the oracle.
"""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from _numerics import assert_close
from torch import nn

import vitkernels
from vitkernels.replace import is_fused

UNKNOWN = "not a class vitkernels knows as written; checked at optimize time"


def _close(got: torch.Tensor, want: torch.Tensor, tol: float = 1e-5) -> None:
    """Within tol of the original module, errors measured against at least 1."""
    assert_close(got, want, tol, floor=1.0)


def _randomize(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.3)
                m.running_mean.normal_(0, 0.3)
                m.running_var.uniform_(0.5, 1.5)
        for name, p in model.named_parameters():
            if name.endswith("attention_biases"):
                p.normal_(0, 1.0)
    return model


# ----------------------------------------------------------------------------
# LeViT stand-ins (official names, attributes and math)


class Linear_BN(nn.Sequential):  # noqa: N801
    """Linear without bias, then BatchNorm1d over the flattened tokens."""

    def __init__(self, a: int, b: int, bn_weight_init: float = 1.0) -> None:
        super().__init__()
        self.add_module("c", nn.Linear(a, b, bias=False))
        self.add_module("bn", nn.BatchNorm1d(b))
        nn.init.constant_(self.bn.weight, bn_weight_init)

    def forward(self, x):
        y = self.c(x)
        return self.bn(y.flatten(0, 1)).reshape_as(y)


class Conv2d_BN(nn.Sequential):  # noqa: N801
    def __init__(self, a: int, b: int, bn_weight_init: float = 1.0) -> None:
        super().__init__()
        self.add_module("c", nn.Conv2d(a, b, 1, bias=False))
        self.add_module("bn", nn.BatchNorm2d(b))
        nn.init.constant_(self.bn.weight, bn_weight_init)


class Subsample(nn.Module):
    def __init__(self, stride: int, resolution: int) -> None:
        super().__init__()
        self.stride, self.resolution = stride, resolution

    def forward(self, x):
        B, _, C = x.shape
        grid = x.view(B, self.resolution, self.resolution, C)
        return grid[:, :: self.stride, :: self.stride].reshape(B, -1, C)


def _offsets(queries, keys, stride: int) -> tuple[int, torch.Tensor]:
    """Each (|dr|, |dc|) offset numbered in order of first appearance, as the
    official code builds attention_bias_idxs: (number of offsets, (Nq, Nk) index)."""
    numbers: dict[tuple[int, int], int] = {}
    idxs = [
        numbers.setdefault((abs(r * stride - r2), abs(c * stride - c2)), len(numbers))
        for r, c in queries
        for r2, c2 in keys
    ]
    return len(numbers), torch.LongTensor(idxs).view(len(queries), len(keys))


class _LeViTBias(nn.Module):
    def _set_biases(self, num_heads: int, resolution: int, resolution_: int, stride: int) -> None:
        keys = list(itertools.product(range(resolution), range(resolution)))
        queries = list(itertools.product(range(resolution_), range(resolution_)))
        n, idxs = _offsets(queries, keys, stride)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, n))
        self.register_buffer("attention_bias_idxs", idxs)

    @torch.no_grad()
    def train(self, mode: bool = True):
        super().train(mode)
        if mode and hasattr(self, "ab"):
            del self.ab
        else:
            self.ab = self.attention_biases[:, self.attention_bias_idxs]

    def _bias(self) -> torch.Tensor:
        return self.attention_biases[:, self.attention_bias_idxs] if self.training else self.ab


def _levit_classes(conv: bool) -> tuple[type, type]:
    """(Attention, AttentionSubsample) of levit.py (tokens) or levit_c.py (maps)."""
    proj_cls = Conv2d_BN if conv else Linear_BN

    class Attention(_LeViTBias):
        def __init__(self, dim, key_dim, num_heads=8, attn_ratio=4, activation=None, resolution=14):
            super().__init__()
            self.num_heads = num_heads
            self.scale = key_dim**-0.5
            self.key_dim = key_dim
            self.nh_kd = key_dim * num_heads
            self.d = int(attn_ratio * key_dim)
            self.dh = self.d * num_heads
            self.attn_ratio = attn_ratio
            self.qkv = proj_cls(dim, self.dh + 2 * self.nh_kd)
            self.proj = nn.Sequential(activation(), proj_cls(self.dh, dim, bn_weight_init=0))
            self._set_biases(num_heads, resolution, resolution, 1)

        def forward(self, x):
            if conv:  # x (B, C, H, W)
                B, _, H, W = x.shape
                q, k, v = self.qkv(x).view(B, self.num_heads, -1, H * W).split(
                    [self.key_dim, self.key_dim, self.d], dim=2
                )
                attn = ((q.transpose(-2, -1) @ k) * self.scale + self._bias()).softmax(dim=-1)
                return self.proj((v @ attn.transpose(-2, -1)).view(B, -1, H, W))
            B, N, _ = x.shape  # x (B, N, C)
            q, k, v = self.qkv(x).view(B, N, self.num_heads, -1).split(
                [self.key_dim, self.key_dim, self.d], dim=3
            )
            q, k, v = q.permute(0, 2, 1, 3), k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)
            attn = ((q @ k.transpose(-2, -1)) * self.scale + self._bias()).softmax(dim=-1)
            return self.proj((attn @ v).transpose(1, 2).reshape(B, N, self.dh))

    class AttentionSubsample(_LeViTBias):
        def __init__(self, in_dim, out_dim, key_dim, num_heads=8, attn_ratio=2, activation=None,
                     stride=2, resolution=14, resolution_=7):  # fmt: skip
            super().__init__()
            self.num_heads = num_heads
            self.scale = key_dim**-0.5
            self.key_dim = key_dim
            self.nh_kd = key_dim * num_heads
            self.d = int(attn_ratio * key_dim)
            self.dh = self.d * num_heads
            self.attn_ratio = attn_ratio
            self.resolution_ = resolution_
            self.resolution_2 = resolution_**2
            self.kv = proj_cls(in_dim, self.dh + self.nh_kd)
            sub = nn.AvgPool2d(1, stride, 0) if conv else Subsample(stride, resolution)
            self.q = nn.Sequential(sub, proj_cls(in_dim, self.nh_kd))
            self.proj = nn.Sequential(activation(), proj_cls(self.dh, out_dim))
            self.stride = stride
            self.resolution = resolution
            self._set_biases(num_heads, resolution, resolution_, stride)

        def forward(self, x):
            if conv:
                B, _, H, W = x.shape
                k, v = self.kv(x).view(B, self.num_heads, -1, H * W).split([self.key_dim, self.d], dim=2)
                q = self.q(x).view(B, self.num_heads, self.key_dim, self.resolution_2)
                attn = ((q.transpose(-2, -1) @ k) * self.scale + self._bias()).softmax(dim=-1)
                out = (v @ attn.transpose(-2, -1)).reshape(B, -1, self.resolution_, self.resolution_)
                return self.proj(out)
            B, N, _ = x.shape
            k, v = self.kv(x).view(B, N, self.num_heads, -1).split([self.key_dim, self.d], dim=3)
            k, v = k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)
            q = self.q(x).view(B, self.resolution_2, self.num_heads, self.key_dim).permute(0, 2, 1, 3)
            attn = ((q @ k.transpose(-2, -1)) * self.scale + self._bias()).softmax(dim=-1)
            return self.proj((attn @ v).transpose(1, 2).reshape(B, -1, self.dh))

    return Attention, AttentionSubsample


def _levit(conv: bool) -> tuple[nn.Module, torch.Tensor]:
    """Attention at 5x5, shrink attention 5x5 -> 3x3, Attention at 3x3."""
    Attention, AttentionSubsample = _levit_classes(conv)
    act = nn.Hardswish
    model = nn.Sequential(
        Attention(16, 8, num_heads=2, attn_ratio=2, activation=act, resolution=5),
        AttentionSubsample(16, 24, 8, num_heads=3, attn_ratio=2, activation=act, stride=2,
                           resolution=5, resolution_=3),  # fmt: skip
        Attention(24, 8, num_heads=3, attn_ratio=2, activation=act, resolution=3),
    )
    x = torch.randn(2, 16, 5, 5) if conv else torch.randn(2, 25, 16)
    return _randomize(model), x


@pytest.mark.parametrize("conv", [False, True], ids=["levit.py", "levit_c.py"])
def test_official_levit_attention_is_replaced_after_the_check(conv):
    eager, x = _levit(conv)
    model = copy.deepcopy(eager).eval()
    eager.eval()
    with torch.no_grad():
        want = eager(x)
    report = vitkernels.optimize(model, backend="torch")
    assert report.count("relpos_attention") == 3 and not report.left, str(report)
    assert all(UNKNOWN in r.checked for r in report.replaced)
    assert [r.source for r in report.replaced] == ["Attention", "AttentionSubsample", "Attention"]
    with torch.no_grad():
        _close(model(x), want)
    # training mode (BatchNorm on batch statistics): outputs and every gradient
    eager.train(), model.train()
    out_e, out_f = eager(x), model(x)
    _close(out_f, out_e)
    g = torch.randn_like(out_e)
    out_e.backward(g)
    out_f.backward(g)
    grads = dict(eager.named_parameters())
    for name, p in model.named_parameters():
        _close(p.grad, grads[name].grad, 1e-4)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_official_levit_on_other_backends(backend):
    eager, x = _levit(conv=True)
    eager.eval()
    model = copy.deepcopy(eager)
    assert vitkernels.optimize(model, backend=backend).count() == 3
    with torch.no_grad():
        _close(model(x), eager(x), 1e-4)


def test_official_levit_eval_cache_is_rebuilt_on_restore():
    """The official modules serve ``ab`` (set by train(False)) in eval mode: the
    fused ones read attention_biases, and restore rebuilds ab from it."""
    model, x = _levit(conv=False)
    model.eval()
    vitkernels.optimize(model, backend="torch")
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "attention_biases"):
                m.attention_biases.data.normal_()  # a .data write, in eval mode
        fused_out = model(x)
    assert vitkernels.restore(model) == 3
    with torch.no_grad():
        _close(model(x), fused_out)


def test_official_levit_with_another_offset_convention_is_left():
    Attention, _ = _levit_classes(conv=False)
    module = Attention(16, 8, num_heads=2, attn_ratio=2, activation=nn.Hardswish, resolution=4)
    grid = list(itertools.product(range(4), range(4)))
    swapped = [[abs(c - c2) * 4 + abs(r - r2) for r2, c2 in grid] for r, c in grid]  # |dc|*R + |dr|
    module.attention_bias_idxs.copy_(torch.tensor(swapped))
    report = vitkernels.optimize(nn.Sequential(module))
    (left,) = report.left
    assert "attention_bias_idxs does not encode |dr|*C + |dc|" in left.reason


# ----------------------------------------------------------------------------
# T2T-ViT stand-ins


class Mlp(nn.Module):
    def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.GELU, drop=0.0):
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Attention(nn.Module):
    """transformer_block.Attention: the backbone's multi-head attention."""

    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_scale=None, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = self.attn_drop(((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1))
        return self.proj_drop(self.proj((attn @ v).transpose(1, 2).reshape(B, N, C)))


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads=num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TokenAttention(nn.Module):
    """token_transformer.Attention: qkv to in_dim per head, v as the skip connection."""

    def __init__(self, dim, num_heads=8, in_dim=None, qkv_bias=False, qk_scale=None, attn_drop=0.0,
                 proj_drop=0.0):  # fmt: skip
        super().__init__()
        self.num_heads = num_heads
        self.in_dim = in_dim
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, in_dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(in_dim, in_dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.in_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = self.attn_drop(((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1))
        x = self.proj_drop(self.proj((attn @ v).transpose(1, 2).reshape(B, N, self.in_dim)))
        return v.squeeze(1) + x


TokenAttention.__name__ = TokenAttention.__qualname__ = "Attention"  # its official name


class Token_transformer(nn.Module):  # noqa: N801
    def __init__(self, dim, in_dim, num_heads, mlp_ratio=1.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = TokenAttention(dim, in_dim=in_dim, num_heads=num_heads)
        self.norm2 = nn.LayerNorm(in_dim)
        self.mlp = Mlp(in_dim, int(in_dim * mlp_ratio), in_dim)

    def forward(self, x):
        x = self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Token_performer(nn.Module):  # noqa: N801
    def __init__(self, dim, in_dim, head_cnt=1, kernel_ratio=0.5, dp1=0.1, dp2=0.1):
        super().__init__()
        self.emb = in_dim * head_cnt
        self.kqv = nn.Linear(dim, 3 * self.emb)
        self.dp = nn.Dropout(dp1)
        self.proj = nn.Linear(self.emb, self.emb)
        self.head_cnt = head_cnt
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(self.emb)
        self.epsilon = 1e-8
        self.mlp = nn.Sequential(nn.Linear(self.emb, self.emb), nn.GELU(), nn.Linear(self.emb, self.emb),
                                 nn.Dropout(dp2))  # fmt: skip
        self.m = int(self.emb * kernel_ratio)
        w = nn.init.orthogonal_(torch.randn(self.m, self.emb)) * math.sqrt(self.m)
        self.w = nn.Parameter(w, requires_grad=False)

    def prm_exp(self, x):
        # phi(x) = exp(w x - |x|^2 / 2) / sqrt(m), in float32 as the official code has it
        xd = (x * x).sum(dim=-1, keepdim=True).repeat(1, 1, self.m) / 2
        wtx = torch.einsum("bti,mi->btm", x.float(), self.w)
        return torch.exp(wtx - xd) / math.sqrt(self.m)

    def single_attn(self, x):
        k, q, v = torch.split(self.kqv(x), self.emb, dim=-1)
        kp, qp = self.prm_exp(k), self.prm_exp(q)
        D = torch.einsum("bti,bi->bt", qp, kp.sum(dim=1)).unsqueeze(dim=2)
        kptv = torch.einsum("bin,bim->bnm", v.float(), kp)
        y = torch.einsum("bti,bni->btn", qp, kptv) / (D.repeat(1, 1, self.emb) + self.epsilon)
        return v + self.dp(self.proj(y))

    def forward(self, x):
        x = self.single_attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class T2T_module(nn.Module):  # noqa: N801
    def __init__(self, img_size=224, tokens_type="performer", in_chans=3, embed_dim=768, token_dim=64):
        super().__init__()
        if tokens_type == "convolution":  # the official code's comparison variant
            self.soft_split0 = nn.Conv2d(3, token_dim, kernel_size=7, stride=4, padding=2)
            self.soft_split1 = nn.Conv2d(token_dim, token_dim, kernel_size=3, stride=2, padding=1)
            self.project = nn.Conv2d(token_dim, embed_dim, kernel_size=3, stride=2, padding=1)
        else:
            self.soft_split0 = nn.Unfold(kernel_size=(7, 7), stride=(4, 4), padding=(2, 2))
            self.soft_split1 = nn.Unfold(kernel_size=(3, 3), stride=(2, 2), padding=(1, 1))
            self.soft_split2 = nn.Unfold(kernel_size=(3, 3), stride=(2, 2), padding=(1, 1))
            if tokens_type == "transformer":
                self.attention1 = Token_transformer(in_chans * 49, token_dim, num_heads=1)
                self.attention2 = Token_transformer(token_dim * 9, token_dim, num_heads=1)
            else:
                self.attention1 = Token_performer(in_chans * 49, token_dim, kernel_ratio=0.5)
                self.attention2 = Token_performer(token_dim * 9, token_dim, kernel_ratio=0.5)
            self.project = nn.Linear(token_dim * 9, embed_dim)
        self.num_patches = (img_size // 16) ** 2

    def forward(self, x):
        x = self.soft_split0(x).transpose(1, 2)
        x = self.attention1(x)
        B, new_HW, C = x.shape
        x = x.transpose(1, 2).reshape(B, C, int(math.sqrt(new_HW)), int(math.sqrt(new_HW)))
        x = self.soft_split1(x).transpose(1, 2)
        x = self.attention2(x)
        B, new_HW, C = x.shape
        x = x.transpose(1, 2).reshape(B, C, int(math.sqrt(new_HW)), int(math.sqrt(new_HW)))
        x = self.soft_split2(x).transpose(1, 2)
        return self.project(x)


class T2T_ViT(nn.Module):  # noqa: N801
    def __init__(self, img_size=32, tokens_type="performer", num_classes=10, embed_dim=32, depth=2,
                 num_heads=2, token_dim=16):  # fmt: skip
        super().__init__()
        self.tokens_to_token = T2T_module(img_size, tokens_type, 3, embed_dim, token_dim)
        n = self.tokens_to_token.num_patches
        self.cls_token = nn.Parameter(torch.randn(1, 1, embed_dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, n + 1, embed_dim) * 0.02, requires_grad=False)
        self.pos_drop = nn.Dropout(0.0)
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, x):
        x = self.tokens_to_token(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = self.pos_drop(x + self.pos_embed)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x)[:, 0])


@pytest.mark.parametrize("tokens_type", ["performer", "transformer"])
def test_official_t2t_vit_is_replaced_after_the_check(tokens_type):
    eager = T2T_ViT(tokens_type=tokens_type).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = eager(x)
    model = copy.deepcopy(eager)
    report = vitkernels.optimize(model, backend="torch")
    ops = {r.path: r.op for r in report.replaced}
    inner = "attention1" if tokens_type == "performer" else "attention1.attn"
    assert ops["tokens_to_token"] == "patch_embed" and ops["blocks.0.attn"] == "attention", str(report)
    assert ops[f"tokens_to_token.{inner}"] in ("performer_attention", "attention"), str(report)
    assert len(ops) == 5 and not report.left, str(report)
    assert all(UNKNOWN in r.checked for r in report.replaced), str(report)
    with torch.no_grad():
        _close(model(x), want)
    assert vitkernels.restore(model) == 5
    assert not any(is_fused(m) for m in model.modules())


def test_official_t2t_performer_folds_norm1_and_kqv_into_the_soft_split(monkeypatch):
    """The official Token_performer's forward passes the check for the kqv path:
    the fused T2T module runs soft split + norm1 + kqv as one patch_embed call."""
    import vitkernels.replace.fused_t2t as ft2t

    calls = []
    real = ft2t.patch_embed
    monkeypatch.setattr(ft2t, "patch_embed", lambda *a, **k: calls.append(k) or real(*a, **k))
    model = T2T_ViT().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
    vitkernels.optimize(model, backend="torch")
    assert model.tokens_to_token.attention1._vk.spec.takes_kqv
    calls.clear()  # (the optimize-time check ran the fused module too)
    with torch.no_grad():
        _close(model(x), want)
    assert len(calls) == 3 and calls[0]["in_norm"] is not None


def test_official_t2t_convolution_variant_is_left_with_one_sentence():
    module = T2T_module(img_size=32, tokens_type="convolution", embed_dim=32, token_dim=16)
    report = vitkernels.optimize(nn.Sequential(module))
    (left,) = report.left
    assert left.reason == (
        "built with tokens_type='convolution' (Conv2d soft splits, no soft_split2): "
        "the official forward only runs the unfold-based variants"
    )
    assert len(str(report).splitlines()) == 2
