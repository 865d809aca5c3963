"""patch_embed: every backend against the reference on float64 copies.

The triton backend runs under TRITON_INTERPRET=1 on CPU tensors (float32 and
float16; bfloat16 arithmetic is wrong in the interpreter and is tested in
test_patch_embed_gpu.py). Every buffer the Triton launchers allocate is poisoned
with NaN, so an element a kernel fails to write fails the comparison. Some cases
force 16-wide tiles so that several row, column and K tiles (with ragged edges)
go through the loops.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from _numerics import assert_close

import vitkernels
from vitkernels import BackendNotSupportedError
from vitkernels.backends import reference
from vitkernels.ops import patch_embed as pe_op

tp = pytest.importorskip("vitkernels.triton.patch_embed")


@dataclasses.dataclass(frozen=True)
class Case:
    """One configuration: image and kernel geometry, which parts are present."""

    B: int = 2
    C: int = 3
    H: int = 12
    W: int = 12
    k: int | tuple[int, int] = 4
    s: int | tuple[int, int] | None = None
    p: int | tuple[int, int] = 0
    D: int = 40
    order: str = "cpq"
    in_norm: str | None = None  # None, "affine", "plain" (no weight and bias), "weight"
    out_norm: str | None = None
    bias: bool = True
    cls: int = 0  # prefix tokens
    pos: str | None = None  # None, "all" (P + L rows), "patch" (L rows)
    conv_weight: bool = False  # weight as (D, C, kh, kw)
    layout: str = "nchw"  # "nchw", "channels_last", "view" (a strided slice)


CASES = {
    # ViT/DeiT (timm Conv2d): 4x4 patches, class token, positions for every token
    "vit": Case(k=4, D=48, cls=1, pos="all", conv_weight=True),
    # vit-pytorch dual patchnorm: (p1 p2 c) patches, LayerNorm in and out
    "vit_pytorch": Case(k=4, order="pqc", in_norm="affine", out_norm="affine", cls=1, pos="all"),
    # CrossViT: two patch sizes of one image
    "crossvit_small": Case(k=4, order="pqc", in_norm="affine", out_norm="affine", cls=1, pos="all", D=24),
    "crossvit_large": Case(k=6, order="pqc", in_norm="affine", out_norm="affine", cls=1, pos="all", D=36),
    # PiT: overlapping patch / half-patch unfold
    "pit": Case(H=10, W=10, k=4, s=2, D=48, cls=1, pos="all"),
    # T2T soft split 7/4/2 on an image that is not a multiple of the stride, + LN + kqv
    "t2t_7_4_2": Case(H=13, W=11, k=7, s=4, p=2, in_norm="affine", D=24),
    "t2t_3_2_1": Case(C=4, H=7, W=7, k=3, s=2, p=1, in_norm="affine", D=36),
    # K = 32, a whole k tile: the backward's bias column (k = K) gets a tile of its own
    "t2t_k32": Case(C=2, H=9, W=9, k=4, s=2, p=1, in_norm="affine", D=24),
    # CaiT: positions for the patch tokens only, then the class token
    "cait": Case(k=4, cls=1, pos="patch", D=32),
    # distillation: two prefix tokens
    "distill": Case(k=4, order="pqc", in_norm="affine", out_norm="affine", cls=2, pos="all"),
    # norms without affine, no bias, rectangular kernel and stride
    "plain_norms": Case(H=12, W=10, k=(4, 2), s=(4, 2), in_norm="plain", out_norm="plain", bias=False),
    "weight_only_norms": Case(k=4, order="pqc", in_norm="weight", out_norm="weight", pos="patch"),
    # D not a power of two
    "d192": Case(B=1, H=8, W=8, k=4, order="pqc", in_norm="affine", out_norm="affine", D=192, cls=1, pos="all"),
    "d384": Case(B=1, H=8, W=8, k=4, D=384, cls=1, pos="all"),
    # memory layouts: channels_last (the kernel gathers in (p, q, c) order) and a strided view
    "vit_channels_last": Case(k=4, D=48, cls=1, pos="all", layout="channels_last"),
    "vit_pytorch_channels_last": Case(
        k=4, order="pqc", in_norm="affine", out_norm="affine", cls=1, pos="all", layout="channels_last"
    ),
    "t2t_view": Case(H=13, W=11, k=7, s=4, p=2, in_norm="affine", D=24, layout="view"),
    "t2t_channels_last": Case(H=13, W=11, k=7, s=4, p=2, in_norm="affine", D=24,
                              layout="channels_last"),
}


def _grid(c: Case) -> tuple[int, int]:
    k = (c.k, c.k) if isinstance(c.k, int) else c.k
    s = k if c.s is None else (c.s, c.s) if isinstance(c.s, int) else c.s
    p = (c.p, c.p) if isinstance(c.p, int) else c.p
    return (c.H + 2 * p[0] - k[0]) // s[0] + 1, (c.W + 2 * p[1] - k[1]) // s[1] + 1


def make_inputs(c: Case, dtype: torch.dtype) -> dict:
    """Fresh random inputs for case c; norms' affine away from 1 and 0 so mistakes show."""
    kh, kw = (c.k, c.k) if isinstance(c.k, int) else c.k
    K = c.C * kh * kw
    Ho, Wo = _grid(c)
    L = Ho * Wo
    t = lambda *shape, scale=1.0: (torch.randn(*shape) * scale).to(dtype)  # noqa: E731
    if c.layout == "view":  # every other column of a wider image, one row off
        images = t(c.B, c.C, c.H + 1, 2 * c.W)[:, :, 1:, ::2]
    else:
        images = t(c.B, c.C, c.H, c.W)
        if c.layout == "channels_last":
            images = images.contiguous(memory_format=torch.channels_last)
    weight = t(c.D, K, scale=K**-0.5)
    if c.conv_weight:
        weight = weight.reshape(c.D, c.C, kh, kw)

    def norm(kind, n):
        if kind is None:
            return None
        w = (1 + 0.5 * torch.randn(n)).to(dtype) if kind in ("affine", "weight") else None
        b = t(n, scale=0.5) if kind == "affine" else None
        return (w, b, 1e-5)

    return {
        "images": images,
        "weight": weight,
        "bias": t(c.D) if c.bias else None,
        "kernel_size": c.k,
        "stride": c.s,
        "padding": c.p,
        "patch_order": c.order,
        "in_norm": norm(c.in_norm, K),
        "out_norm": norm(c.out_norm, c.D),
        "pos_embed": None if c.pos is None else t(1, L + (c.cls if c.pos == "all" else 0), c.D),
        "cls_token": None if c.cls == 0 else t(1, c.cls, c.D),
    }


def _map_tensors(inputs: dict, fn) -> dict:
    out = {}
    for key, v in inputs.items():
        if isinstance(v, torch.Tensor):
            out[key] = fn(v)
        elif isinstance(v, tuple):
            out[key] = tuple(fn(x) if isinstance(x, torch.Tensor) else x for x in v)
        else:
            out[key] = v
    return out


def reference64(inputs: dict) -> torch.Tensor:
    return reference.patch_embed(**_map_tensors(inputs, lambda t: t.double()))


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Every buffer the Triton launchers allocate starts as NaN."""

    def new(shape, device, dtype):
        return torch.full(shape, float("nan"), device=device, dtype=dtype)

    monkeypatch.setattr(tp, "_new", new)


@pytest.fixture
def small_tiles(monkeypatch):
    """16-wide tiles: several row, column and K tiles with ragged edges."""
    monkeypatch.setattr(tp, "fwd_config", lambda *a, **k: tp.FwdConfig(16, 16, 16, 4, 1))
    monkeypatch.setattr(tp, "bwd_config", lambda *a, **k: tp.BwdConfig(16, 16, 16, 4, 1, 3))


# ----------------------------------------------------------------------------
# forward


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("name", list(CASES))
def test_triton_forward(name, dtype):
    inputs = make_inputs(CASES[name], dtype)
    out = vitkernels.patch_embed(**inputs, backend="triton")
    assert_close(out, reference64(inputs), what=name, dtype=dtype)


def test_output_norm_config_by_target():
    """The output norm's whole-row programs (P2: dual patch norm, D 768): 64 rows on one
    warpgroup for sm_90 with aligned 16-bit tensors; 32 for sm_80, float32 and
    misaligned tensors, where 64 spilled when compiled ahead of time."""

    def rows(dtype=torch.bfloat16, **kw):
        return tp.fwd_config(256 * 196, 768, 768, dtype, True, True, False, **kw).block_m

    assert rows(arch=90) == rows(torch.float16, arch=90) == 64
    assert rows(arch=80) == rows(torch.float32, arch=90) == rows(arch=90, aligned=False) == 32


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_output_norm_over_one_feature_is_its_bias(backend):
    """LayerNorm over D = 1 features normalises every token to 0: the output is
    exactly the norm's bias (float16; the kernel once took the statistics of the
    unrounded tokens and normalised the rounded ones: errors up to 0.21)."""
    torch.manual_seed(0)
    dt = torch.float16
    images = (torch.randn(2, 3, 8, 8) * 4).to(dt)
    weight, bias = torch.randn(1, 3, 4, 4).to(dt), torch.randn(1).to(dt)
    out_norm = (torch.randn(1).to(dt), torch.randn(1).to(dt), 1e-5)
    out = vitkernels.patch_embed(images, weight, bias, kernel_size=4, out_norm=out_norm, backend=backend)
    want = out_norm[1].expand(2, 4, 1)
    assert (out.float() - want.float()).abs().max().item() <= 1e-3, f"{backend}: {out.flatten()} != {want[0, 0]}"


@pytest.mark.parametrize("name", ["vit", "vit_pytorch", "pit", "t2t_7_4_2", "distill", "d192"])
def test_triton_forward_many_tiles(name, small_tiles):
    inputs = make_inputs(CASES[name], torch.float32)
    out = vitkernels.patch_embed(**inputs, backend="triton")
    assert_close(out, reference64(inputs), what=name, dtype=torch.float32)


THIRDS_CASES = {  # D = 3 * 16: the three 16-column tiles of one program
    "t2t_d48": dataclasses.replace(CASES["t2t_7_4_2"], D=48),
    "vit": CASES["vit"],
    "pit_plain_in_norm": dataclasses.replace(CASES["pit"], in_norm="plain", order="pqc"),
}


@pytest.fixture
def thirds_tiles(monkeypatch, launches):
    """16 x (3 x 16) tiles (the layout T2T's D 192 gets on a GPU: three 64-column tiles
    of one program); every launch checked to have taken it."""
    monkeypatch.setattr(tp, "fwd_config", lambda *a, **k: tp.FwdConfig(16, 16, 16, 4, 1, thirds=True))
    yield
    fwds = [la for la in launches if la.name.startswith("patch_embed_fwd")]
    assert fwds and all(la.constexprs["THIRDS"] for la in fwds)


@pytest.mark.parametrize("name", list(THIRDS_CASES))
def test_triton_forward_column_thirds(name, thirds_tiles):
    inputs = make_inputs(THIRDS_CASES[name], torch.float32)
    out = vitkernels.patch_embed(**inputs, backend="triton")
    assert_close(out, reference64(inputs), what=name, dtype=torch.float32)


def test_triton_gradients_after_column_thirds(thirds_tiles):
    """The saving forward with three column tiles per program writes the input norm's
    statistics once per row: the backward that reads them matches float64."""
    inputs = make_inputs(THIRDS_CASES["t2t_d48"], torch.float32)
    grad = torch.randn_like(reference64(inputs))
    got = _grads(inputs, "triton", torch.float32, grad)
    want = _grads(inputs, None, torch.float64, grad)
    for key in want:
        assert_close(got[key], want[key], what=f"t2t_d48 d{key}", grad=True, floor=1.0, dtype=torch.float32)


def test_column_thirds_config():
    """D 192 with a small K (T2T's first soft split) takes three 64-column tiles per
    program on a GPU (a 256-column tile spent a quarter of its MMA and epilogue past
    D); other widths, larger K and the output norm do not."""
    cfg = tp.fwd_config(256 * 3136, 192, 147, torch.bfloat16, True, False, False)
    assert cfg.thirds and cfg.block_n == 64
    assert not tp.fwd_config(256 * 3136, 256, 147, torch.bfloat16, True, False, False).thirds
    assert not tp.fwd_config(256 * 196, 192, 768, torch.bfloat16, True, True, False).thirds
    assert not tp.fwd_config(64 * 784, 192, 576, torch.bfloat16, True, False, False).thirds


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", list(CASES))
def test_torch_forward(name, dtype):
    inputs = make_inputs(CASES[name], dtype)
    out = vitkernels.patch_embed(**inputs, backend="torch")
    assert_close(out, reference64(inputs), what=name, dtype=dtype)


def test_reference_backend_is_the_reference_function():
    inputs = make_inputs(CASES["vit_pytorch"], torch.float64)
    out = vitkernels.patch_embed(**inputs, backend="reference")
    torch.testing.assert_close(out, reference64(inputs), atol=0, rtol=0)


def test_vit_pytorch_patch_order_is_its_rearrange():
    """"pqc" is vit-pytorch's Rearrange('b c (h p1) (w p2) -> b (h w) (p1 p2 c)')."""
    from einops import rearrange

    x = torch.randn(2, 3, 8, 12, dtype=torch.float64)
    w = torch.randn(5, 3 * 4 * 4, dtype=torch.float64)
    patches = rearrange(x, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=4, p2=4)
    for backend in ("torch", "reference"):
        out = vitkernels.patch_embed(x, w, kernel_size=4, patch_order="pqc", backend=backend)
        torch.testing.assert_close(out, patches @ w.t())


def test_in_norm_counts_padding_zeros():
    """Padded pixels are zeros inside the patch, in the input norm's statistics too."""
    x = torch.rand(1, 1, 2, 2, dtype=torch.float64) + 1.0  # every pixel > 0
    w = torch.eye(9, dtype=torch.float64)  # tokens = the normalised patches
    patch = torch.nn.functional.pad(x, (1, 1, 1, 1))[0, 0, :3, :3].reshape(-1)  # 5 zeros
    want = (patch - patch.mean()) / patch.std(unbiased=False)
    for backend in ("torch", "reference"):  # 1 patch of 3x3 from the padded 4x4
        out = vitkernels.patch_embed(
            x, w, kernel_size=3, stride=3, padding=1, in_norm=(None, None, 0.0), backend=backend
        )
        torch.testing.assert_close(out[0, 0], want)
    out = vitkernels.patch_embed(
        x.float(), w.float(), kernel_size=3, stride=3, padding=1, in_norm=(None, None, 0.0),
        backend="triton",
    )
    assert_close(out[0, 0], want)


@pytest.mark.parametrize(
    "case",
    [
        # one patch wider than the image, padded on both sides of both axes
        Case(C=2, H=3, W=5, k=7, s=4, p=2, in_norm="affine", D=24),
        # a 3 x 15 kernel: the widest the forward's per-row padding bit words take
        Case(C=2, H=6, W=16, k=(3, 15), s=(1, 2), p=(1, 7), in_norm="affine", D=24),
        # a 16-wide kernel: past the bit words, the padding from coordinates
        Case(C=1, H=18, W=18, k=16, s=2, p=1, in_norm="affine", D=24),
    ],
    ids=["kernel_past_both_sides", "kernel_3x15", "kernel_16"],
)
def test_triton_forward_padding_edges(case):
    """The padding mask at its edges (float32, interpreter)."""
    inputs = make_inputs(case, torch.float32)
    out = vitkernels.patch_embed(**inputs, backend="triton")
    assert_close(out, reference64(inputs), what=str(case), dtype=torch.float32)


PAIR_CASES = {
    # T2T's 7 / 4 / 2 on an even width: the last window's third pixel pair past the right
    # edge, the last windows' rows past the bottom; kx padded 7 -> 8
    "t2t_7_4_2": Case(H=15, W=12, k=7, s=4, p=2, in_norm="affine", D=24),
    # 5 columns (two zero columns in the last pair), caller order (p, q, c), output norm
    # (the column loop's passes without the sums), prefix token and positions
    "k3x5_out_norm_pqc": Case(C=2, H=7, W=12, k=(3, 5), s=(1, 2), p=(1, 2), order="pqc",
                              in_norm="affine", out_norm="affine", D=24, cls=1, pos="all"),
    # 8 columns (no padding column), a norm without affine; 6 columns, one channel
    "k2x8_plain": Case(C=3, H=9, W=16, k=(2, 8), s=(2, 4), p=(1, 2), in_norm="plain", D=24),
    "k6_c1": Case(C=1, H=10, W=10, k=6, s=2, p=2, in_norm="weight", D=24),
}


@pytest.mark.parametrize("tiles", ["default", "k16"])
@pytest.mark.parametrize("name", list(PAIR_CASES))
def test_triton_forward_pixel_pairs(name, tiles, launches, monkeypatch):
    """float16 images whose windows start at even columns: the forward gathers them as
    4-byte pixel pairs in the padded k order (every forward launch checked to take it);
    K steps of 32 (the interpreter's) and of 16 (two window rows, as on a GPU)."""
    if tiles == "k16":
        monkeypatch.setattr(tp, "fwd_config", lambda *a, **k: tp.FwdConfig(16, 16, 16, 4, 1))
    inputs = make_inputs(PAIR_CASES[name], torch.float16)
    out = vitkernels.patch_embed(**inputs, backend="triton")
    assert_close(out, reference64(inputs), what=name, dtype=torch.float16)
    fwds = [la for la in launches if la.name.startswith("patch_embed_fwd")]
    k = PAIR_CASES[name].k
    assert fwds and all(la.constexprs["PAIR_KW"] == (k if isinstance(k, int) else k[1]) for la in fwds)


def test_triton_forward_pixel_pairs_column_thirds(thirds_tiles, launches):
    """The pair path with three column tiles per program (T2T's D 192 on a GPU): the
    first two as one double-width tile, split after the loop."""
    inputs = make_inputs(dataclasses.replace(PAIR_CASES["t2t_7_4_2"], D=48), torch.float16)
    out = vitkernels.patch_embed(**inputs, backend="triton")
    assert_close(out, reference64(inputs), what="t2t_d48 pairs", dtype=torch.float16)
    assert all(la.constexprs["PAIR_KW"] == 7 for la in launches if la.name.startswith("patch_embed_fwd"))


def test_pixel_pairs_only_where_they_hold():
    """The pair path needs 2-byte images, even window starts and an even width; float32,
    an odd width, an odd stride and a misaligned view keep the per-element gather."""
    def kw(shape=(2, 3, 16, 16), dtype=torch.float16, k=7, s=4, p=2, offset=0):
        n = math.prod(shape)
        images = torch.empty(n + offset, dtype=dtype, device="meta")[offset:].view(shape)
        g = tp._geometry(images, (k, k), (s, s), (p, p))
        return tp._pair_kw(images, g, "cpq")

    assert kw() == 7
    assert kw(dtype=torch.bfloat16) == 7
    assert kw(dtype=torch.float32) == 0
    assert kw(shape=(2, 3, 16, 15)) == 0
    assert kw(s=3) == 0
    assert kw(p=1) == 0
    assert kw(offset=1) == 0
    assert kw(k=4, p=2, s=2) == 0  # 4 columns: half the padded order would be zeros
    assert kw(k=9, p=2, s=2) == 0


@pytest.mark.parametrize("name", ["t2t_7_4_2", "k3x5_out_norm_pqc"])
def test_triton_gradients_after_pixel_pairs(name):
    """The saving forward in the pair order writes the input norm's statistics and keeps
    W in the plain kernel order for the backward (permuted from the caller's "pqc" by
    the prep launch's other loop): its gradients match float64."""
    inputs = make_inputs(PAIR_CASES[name], torch.float16)
    grad = torch.randn_like(reference64(inputs))
    got = _grads(inputs, "triton", torch.float16, grad)
    want = _grads(inputs, None, torch.float64, grad)
    for key in want:
        assert_close(got[key], want[key], what=f"{name} d{key}", grad=True, floor=1.0, dtype=torch.float16)


def _bright_images(c: Case, dtype: torch.dtype, kind: str) -> torch.Tensor:
    """Bright patches (mean 200) that are flat ("flat": one value, variance 0, so the
    input norm's rstd is eps**-0.5) or nearly so ("near": steps of 1/8, exact in f16)."""
    shape = (c.B, c.C, c.H, c.W)
    if kind == "flat":
        return torch.full(shape, 200.0, dtype=dtype)
    return (200 + 0.125 * torch.randint(-2, 3, shape).float()).to(dtype)


@pytest.mark.parametrize("kind", ["flat", "near"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("name", ["vit_pytorch", "t2t_7_4_2"])
def test_triton_large_mean_input_norm(name, dtype, kind):
    """Bright, (nearly) flat patches: the input norm's sums and the folded GEMM are
    taken around a per-patch shift, so the mean does not cancel (before: float32 off
    by 0.7 of the output scale, float16 by 1e-2); output and gradients match float64."""
    c = CASES[name]
    inputs = make_inputs(c, dtype)
    inputs["images"] = _bright_images(c, dtype, kind)
    out = vitkernels.patch_embed(**inputs, backend="triton")
    assert_close(out, reference64(inputs))
    grad = torch.randn_like(reference64(inputs))
    got = _grads(inputs, "triton", dtype, grad)
    want = _grads(inputs, None, torch.float64, grad)
    for key in want:
        assert_close(got[key], want[key], what=f"{name} d{key}", grad=True, floor=1.0, dtype=dtype)


# ----------------------------------------------------------------------------
# gradients


GRAD_CASES = ["vit", "vit_pytorch", "pit", "t2t_7_4_2", "cait", "distill", "plain_norms", "d192",
              "vit_channels_last", "t2t_channels_last", "weight_only_norms"]


def _params(inputs: dict) -> list[tuple[str, torch.Tensor]]:
    out = [(k, inputs[k]) for k in ("weight", "bias", "pos_embed", "cls_token") if inputs[k] is not None]
    for key in ("in_norm", "out_norm"):
        if inputs[key] is not None:
            out += [(f"{key}[{i}]", t) for i, t in enumerate(inputs[key][:2]) if t is not None]
    return out


def spy_launches(monkeypatch) -> list[str]:
    """The kernel names of the triton launcher's launches from here on, in order."""
    names: list[str] = []
    launch = tp.launch

    def spy(spec):
        names.append(spec.name.split("[")[0])
        return launch(spec)

    monkeypatch.setattr(tp, "launch", spy)
    return names


def _grads(inputs: dict, backend: str | None, dtype: torch.dtype, grad: torch.Tensor, images_grad=False,
           unaligned_grad=False):
    """Gradients of <out, grad> w.r.t. every parameter (and the images), in float64.
    unaligned_grad: the op's backward gets grad in out's dtype as a view one element
    into its buffer (no 16-byte aligned rows)."""
    leaves = {}

    def leaf(t):
        x = t.detach().to(dtype).requires_grad_()
        leaves[id(t)] = x
        return x

    params = _params(inputs)
    names = {id(t): n for n, t in params}
    ins = _map_tensors(inputs, lambda t: leaf(t) if id(t) in names else t.to(dtype))
    if images_grad:
        ins["images"] = inputs["images"].detach().to(dtype).requires_grad_()
    fn = reference.patch_embed if backend is None else vitkernels.patch_embed
    kw = {} if backend is None else {"backend": backend}
    out = fn(**ins, **kw)
    if unaligned_grad:
        g = torch.empty(grad.numel() + 1, dtype=out.dtype, device=out.device)[1:].view(grad.shape)
        g.copy_(grad)
        out.backward(g)
    else:
        (out.double() * grad).sum().backward()
    res = {names[i]: x.grad for i, x in leaves.items()}
    if images_grad:
        res["images"] = ins["images"].grad
    return res


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("name", GRAD_CASES)
def test_triton_gradients(name, dtype):
    inputs = make_inputs(CASES[name], dtype)
    grad = torch.randn_like(reference64(inputs))
    got = _grads(inputs, "triton", dtype, grad)
    want = _grads(inputs, None, torch.float64, grad)
    assert got.keys() == want.keys()
    for key in want:
        assert_close(got[key], want[key], what=f"{name} d{key}", grad=True, floor=1.0, dtype=dtype)


@pytest.mark.parametrize("name", ["vit_pytorch", "t2t_7_4_2", "pit"])
def test_triton_gradients_many_tiles(name, small_tiles):
    inputs = make_inputs(CASES[name], torch.float32)
    grad = torch.randn_like(reference64(inputs))
    got = _grads(inputs, "triton", torch.float32, grad)
    want = _grads(inputs, None, torch.float64, grad)
    for key in want:
        assert_close(got[key], want[key], what=f"{name} d{key}", grad=True, floor=1.0)


@pytest.mark.parametrize("name", ["vit", "vit_pytorch", "pit", "t2t_7_4_2", "distill"])
def test_torch_gradients_with_images(name):
    inputs = make_inputs(CASES[name], torch.float64)
    grad = torch.randn_like(reference64(inputs))
    got = _grads(inputs, "torch", torch.float64, grad, images_grad=True)
    want = _grads(inputs, None, torch.float64, grad, images_grad=True)
    for key in want:
        assert_close(got[key], want[key], what=f"d{key}", grad=True, floor=1.0)


def test_triton_gradient_mask_skips_frozen_parameters():
    inputs = make_inputs(CASES["vit_pytorch"], torch.float32)
    w = inputs["weight"].clone().requires_grad_()
    out = vitkernels.patch_embed(**{**inputs, "weight": w}, backend="triton")
    out.sum().backward()
    assert w.grad is not None and torch.isfinite(w.grad).all()
    assert inputs["in_norm"][0].grad is None and inputs["pos_embed"].grad is None


@pytest.mark.parametrize("name", ["t2t_7_4_2", "t2t_k32"])
def test_triton_fused_backward_pieces(name):
    """The fused dW + dxn kernel (input norm, D in one tile) with the weight frozen:
    the bias (its k = K column) and the input norm's affine still get theirs; with
    every gradient wanted, each matches float64 (K = 32: the bias column in a k tile
    of its own)."""
    inputs = make_inputs(CASES[name], torch.float32)
    grad = torch.randn_like(reference64(inputs))
    want = _grads(inputs, None, torch.float64, grad)
    got = _grads(inputs, "triton", torch.float32, grad)
    for key in want:
        assert_close(got[key], want[key], what=f"{name} d{key}", grad=True, floor=1.0)
    frozen = {**inputs, "bias": inputs["bias"].detach().clone().requires_grad_(),
              "in_norm": tuple(t.detach().clone().requires_grad_() if isinstance(t, torch.Tensor) else t
                               for t in inputs["in_norm"])}  # fmt: skip
    (vitkernels.patch_embed(**frozen, backend="triton").double() * grad).sum().backward()
    assert inputs["weight"].grad is None
    assert_close(frozen["bias"].grad, want["bias"], what=f"{name} dbias", grad=True, floor=1.0)
    for t, key in zip(frozen["in_norm"][:2], ("in_norm[0]", "in_norm[1]"), strict=True):
        assert_close(t.grad, want[key], what=f"{name} d{key}", grad=True, floor=1.0)


@pytest.mark.parametrize(
    "hw", [(11, 67), (15, 63)], ids=["ragged", "even"]
)  # 3 x 17 and 4 x 16 patches: 2 x 3 and 2 x 2 tiles of 2 x 8 per image
def test_triton_fused_backward_tile_walk(hw, small_tiles, monkeypatch):
    """The fused dW + dxn kernel walks its split's tiles of the patch grid by a
    mixed-radix add (tile column, tile row, image) from a start that is not an image's
    first tile: with several tiles along both grid axes, ragged (edge tiles masked)
    or not, splits that start mid-row and walk on into the next image, every gradient
    matches float64."""
    names = spy_launches(monkeypatch)
    inputs = make_inputs(Case(H=hw[0], W=hw[1], k=7, s=4, p=2, in_norm="affine", D=24), torch.float32)
    grad = torch.randn_like(reference64(inputs))
    got = _grads(inputs, "triton", torch.float32, grad)
    want = _grads(inputs, None, torch.float64, grad)
    assert "patch_embed_dw_dxn" in names, names
    assert got.keys() == want.keys()
    for key in want:
        assert_close(got[key], want[key], what=f"{hw} d{key}", grad=True, floor=1.0, dtype=torch.float32)


@pytest.mark.parametrize("layout", ["aligned", "unaligned"])
def test_fused_backward_only_on_aligned_16bit_rows(layout, monkeypatch):
    """float16 gradients (the interpreter runs sm_90a's launches): the fused dW + dxn
    kernel where dy's rows are 16-byte aligned; where they are not, dW and dxn run as
    their own kernels (``_dy_rows_async``: triton 3.9 built the fused kernel's dW dot
    there on a transposed register tile, the pattern the H200 got wrong in the
    performer), and every gradient matches float64 either way."""
    names = spy_launches(monkeypatch)
    dtype = torch.float16
    inputs = make_inputs(Case(H=11, W=67, k=7, s=4, p=2, in_norm="affine", D=24), dtype)
    grad = torch.randn_like(reference64(inputs)).to(dtype).double()
    got = _grads(inputs, "triton", dtype, grad, unaligned_grad=layout == "unaligned")
    want = _grads(inputs, None, torch.float64, grad)
    taken = ["patch_embed_dw_dxn"] if layout == "aligned" else ["patch_embed_dw", "patch_embed_dxn"]
    assert names[-len(taken) - 1:] == [*taken, "patch_embed_fold"], names
    assert got.keys() == want.keys()
    for key in want:
        assert_close(got[key], want[key], what=f"{layout} d{key}", grad=True, floor=1.0, dtype=dtype)


def test_dy_rows_async():
    """The rule itself: 16-bit rows of 8-element aligned runs (grad_out's, or the
    output norm's own contiguous buffer's, D % 8 == 0); float32 always."""
    g = torch.empty(2, 5, 24, dtype=torch.bfloat16)
    assert tp._dy_rows_async(g, False, 24)
    assert not tp._dy_rows_async(torch.empty(g.numel() + 1, dtype=g.dtype)[1:].view(g.shape), False, 24)
    assert not tp._dy_rows_async(torch.empty(2, 5, 28, dtype=torch.float16)[..., :24], False, 24)
    assert tp._dy_rows_async(torch.empty(g.numel() + 1, dtype=g.dtype)[1:].view(g.shape), True, 24)
    assert not tp._dy_rows_async(torch.empty(2, 5, 20, dtype=torch.float16), True, 20)
    assert tp._dy_rows_async(torch.empty(g.numel() + 1)[1:].view(g.shape), False, 24)


def test_triton_fused_backward_split_rounded_down(monkeypatch):
    """The fused kernel's row split is rounded to whole tiles per split (4 asked, 6
    tiles: 2 per split, 3 splits): the input norm's gradients sum only the 3 splits'
    partials (they summed a 4th, never written: garbage from the workspace)."""
    cfg = tp.bwd_config
    monkeypatch.setattr(tp, "bwd_config", lambda *a, **k: dataclasses.replace(cfg(*a, **k), split=4))
    inputs = make_inputs(Case(H=11, W=67, k=7, s=4, p=2, in_norm="affine", D=24), torch.float32)
    grad = torch.randn_like(reference64(inputs))
    got = _grads(inputs, "triton", torch.float32, grad)
    want = _grads(inputs, None, torch.float64, grad)
    for key in want:
        assert_close(got[key], want[key], what=f"d{key}", grad=True, floor=1.0, dtype=torch.float32)


@pytest.mark.parametrize("name", ["vit", "t2t_7_4_2"])
def test_triton_bias_gradient_with_frozen_weight(name):
    """Without an output norm the bias gradient comes out of the dW kernel (an extra
    tile sums dy): with the weight frozen it still runs, and only the bias
    gets a gradient."""
    inputs = make_inputs(CASES[name], torch.float32)
    b = inputs["bias"].detach().clone().requires_grad_()
    grad = torch.randn_like(reference64(inputs))
    out = vitkernels.patch_embed(**{**inputs, "bias": b}, backend="triton")
    (out.double() * grad).sum().backward()
    b64 = inputs["bias"].detach().double().requires_grad_()
    ins64 = _map_tensors(inputs, lambda t: t.double())
    (reference.patch_embed(**{**ins64, "bias": b64}) * grad).sum().backward()
    assert inputs["weight"].grad is None
    assert_close(b.grad, b64.grad, what=f"{name} dbias", grad=True, floor=1.0, dtype=torch.float32)


@pytest.mark.parametrize(
    "name", ["vit", "vit_pytorch", "pit", "t2t_7_4_2", "t2t_3_2_1", "distill", "plain_norms",
             "weight_only_norms", "t2t_channels_last", "cait"],
)  # fmt: skip
def test_triton_image_gradients(name):
    """Images that need a gradient (T2T's later soft splits take token maps): the
    kernels' forward and parameter gradients, the image gradient from stock ops;
    all against float64 autograd of the reference."""
    inputs = make_inputs(CASES[name], torch.float32)
    grad = torch.randn_like(reference64(inputs))
    got = _grads(inputs, "triton", torch.float32, grad, images_grad=True)
    want = _grads(inputs, None, torch.float64, grad, images_grad=True)
    assert got.keys() == want.keys() and "images" in got
    for key in want:
        assert_close(
            got[key], want[key], what=f"{name} d{key}", grad=True, floor=1.0, dtype=torch.float32
        )


def test_triton_image_gradient_alone():
    """Only the images need a gradient: no parameter gradient kernel runs, the
    image gradient is still right (float16 inputs, float32 arithmetic)."""
    inputs = make_inputs(CASES["t2t_3_2_1"], torch.float16)
    images = inputs["images"].clone().requires_grad_()
    out = vitkernels.patch_embed(**{**inputs, "images": images}, backend="triton")
    grad = torch.randn_like(out)
    (out * grad).sum().backward()
    ref_images = inputs["images"].double().requires_grad_()
    ins = _map_tensors({**inputs, "images": None}, lambda t: t.double())
    ref = reference.patch_embed(**{**ins, "images": ref_images})
    (ref * grad.double()).sum().backward()
    assert_close(images.grad, ref_images.grad, what="d images", grad=True, dtype=torch.float16)


@pytest.fixture
def launches(monkeypatch):
    """The Triton launches the patch_embed launchers run, in order (they still run)."""
    seen = []

    def run(spec):
        seen.append(spec)
        spec.run()

    monkeypatch.setattr(tp, "launch", run)
    return seen


def _kinds(seen) -> list[str]:
    """Launch names without their shape tags, with the forward's ",save" / ",recompute"."""
    return [la.name.split("[")[0] + ("," + la.name.split(",")[-1][:-1] if la.name.endswith(("save]", "recompute]"))
            else "") for la in seen]  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("name", ["vit_pytorch", "t2t_7_4_2"])
def test_backward_reads_what_the_forward_saved(name, dtype, launches):
    """A forward that needs a gradient writes what the backward reads (P2-like: the
    pre-norm tokens in the input dtype, both norms' row statistics and the plain weight
    in kernel order; T2T: the input norm's statistics), so the backward runs neither the
    prep nor the recompute of the forward GEMM nor the statistics kernel; its gradients
    match float64."""
    inputs = make_inputs(CASES[name], dtype)
    grad = torch.randn_like(reference64(inputs))
    want = _grads(inputs, None, torch.float64, grad)
    got = _grads(inputs, "triton", dtype, grad)
    for key in want:
        assert_close(got[key], want[key], what=f"{name} d{key}", grad=True, floor=1.0, dtype=dtype)
    kinds = _kinds(launches)
    fwd_end = kinds.index("patch_embed_fwd,save") + 1
    assert kinds[:fwd_end] == ["patch_embed_prep", "patch_embed_fwd,save"]
    assert launches[0].constexprs["WRITE_PLAIN"] == (name == "vit_pytorch")  # "pqc" of NCHW images
    fwd = launches[fwd_end - 1].constexprs
    assert fwd["WRITE_STATS"] and fwd["SAVE_Y"] == (name == "vit_pytorch")
    bwd = kinds[fwd_end:]
    assert bwd[-1] == "patch_embed_fold"
    assert not [k for k in bwd if k.startswith(("patch_embed_prep", "patch_embed_fwd", "patch_embed_stats"))]
    if name == "vit_pytorch":
        assert bwd[0] == "patch_embed_out_norm_bwd" and launches[fwd_end].constexprs["HAS_OSTATS"]


@pytest.mark.parametrize("name", ["vit_pytorch", "t2t_7_4_2"])
def test_inference_forward_saves_nothing(name, launches):
    """Without a gradient to come (no_grad, or no input requiring one) the forward
    writes the tokens only: no saving specialisation, no plain weight, the same
    tokens as a saving forward's; a later call that needs a gradient saves and gets
    float64's gradients (nothing carried over from the inference call)."""
    inputs = make_inputs(CASES[name], torch.float32)
    params = {id(t) for _, t in _params(inputs)}
    with_grad = _map_tensors(inputs, lambda t: t.clone().requires_grad_() if id(t) in params else t)
    with torch.no_grad():
        out = vitkernels.patch_embed(**with_grad, backend="triton")
    plain = vitkernels.patch_embed(**inputs, backend="triton")
    assert _kinds(launches) == ["patch_embed_prep", "patch_embed_fwd"] * 2
    for la in launches:
        assert not la.constexprs.get("WRITE_PLAIN") and not la.constexprs.get("WRITE_STATS")
        assert not la.constexprs.get("SAVE_Y")
        assert all(t is None for t in la.writes[1:]) if la.name.startswith("patch_embed_fwd") else True
    assert_close(out, reference64(inputs))
    torch.testing.assert_close(plain, out, rtol=0, atol=0)
    del launches[:]
    saving = vitkernels.patch_embed(**with_grad, backend="triton")
    assert _kinds(launches) == ["patch_embed_prep", "patch_embed_fwd,save"]
    torch.testing.assert_close(saving.detach(), out, rtol=0, atol=0)
    grad = torch.randn_like(reference64(inputs))
    want = _grads(inputs, None, torch.float64, grad)
    (saving.double() * grad).sum().backward()
    leaves = dict(_params(with_grad))
    for key in want:
        assert_close(leaves[key].grad, want[key], what=f"{name} d{key}", grad=True, floor=1.0)


@pytest.mark.parametrize("name", ["vit_pytorch", "t2t_7_4_2", "t2t_channels_last"])
def test_backward_without_saved_tensors_recomputes(name, launches):
    """A forward that saved nothing (the launcher contract allows it; the cuda backend's
    forward saves as Triton's does: tests/test_cuda_compile.py): the backward launcher
    given empty saved tensors (or none) recomputes them (prep + the forward GEMM with
    an output norm, the statistics kernel without) and its gradients equal those it
    gives from a saving forward's tensors, and float64's."""
    inputs = make_inputs(CASES[name], torch.float32)
    args = _op_args(inputs)[:-2]
    grad = torch.randn_like(reference64(inputs)).float()
    mask = [True] * 8
    out, *saved = tp.patch_embed_fwd_saving(*args)
    del launches[:]
    from_saved = tp.patch_embed_bwd(grad, *args, mask, saved)
    assert not any(k.startswith(("patch_embed_prep", "patch_embed_stats")) for k in _kinds(launches))
    del launches[:]
    empty = [inputs["images"].new_empty((0,)) for _ in range(4)]
    recomputed = tp.patch_embed_bwd(grad, *args, mask, empty)
    kinds = _kinds(launches)
    if CASES[name].out_norm:
        assert kinds[:2] == ["patch_embed_prep", "patch_embed_fwd,recompute"]
    else:
        assert kinds[0] == "patch_embed_stats"
    want = _grads(inputs, None, torch.float64, grad.double())
    names = ["weight", "bias", "in_norm[0]", "in_norm[1]", "out_norm[0]", "out_norm[1]", "pos_embed", "cls_token"]
    checked = 0
    for key, a, b in zip(names, from_saved, recomputed, strict=True):
        if key not in want:
            assert a.numel() == 0 and b.numel() == 0
            continue
        ref = want[key].reshape(a.shape)
        assert_close(a, ref, what=f"{name} d{key} (saved)", grad=True, floor=1.0)
        assert_close(b, ref, what=f"{name} d{key} (recomputed)", grad=True, floor=1.0)
        checked += 1
    assert checked == len(want)
    none = tp.patch_embed_bwd(grad, *args, mask)  # the launcher contract without saved tensors
    for a, b in zip(none, recomputed, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ----------------------------------------------------------------------------
# torch.library registration, compile, dispatch


def _op_args(inputs: dict, backend: str = "triton", save: bool = False) -> tuple:
    v = pe_op._validate(**{k: inputs[k] for k in inputs})
    iw, ib, ie = v["in_norm"] or (None, None, 0.0)
    ow, ob, oe = v["out_norm"] or (None, None, 0.0)
    return (v["images"], v["weight"], v["bias"], iw, ib, ow, ob, v["pos_embed"], v["cls_token"],
            list(v["kernel_size"]), list(v["stride"]), list(v["padding"]), v["patch_order"],
            float(ie), float(oe), v["in_norm"] is not None, v["out_norm"] is not None, save, backend)


@pytest.mark.parametrize("save", [False, True], ids=["inference", "saving"])
@pytest.mark.parametrize("name", ["distill", "t2t_7_4_2"])
def test_custom_ops_opcheck(name, save):
    """Both ops, with the forward saving what the backward reads (distill: "pqc" patches
    of NCHW images, so the plain weight in kernel order too; T2T: the input norm's
    statistics only) or not (the backward gets empty tensors and recomputes)."""
    inputs = make_inputs(CASES[name], torch.float32)
    args = list(_op_args(inputs, save=save))
    for i in (1, 2, 3, 4, 5, 6, 7, 8):
        if args[i] is not None:
            args[i] = args[i].clone().requires_grad_()
    torch.library.opcheck(torch.ops.vitkernels.patch_embed_fwd.default, tuple(args))
    out, *saved = torch.ops.vitkernels.patch_embed_fwd(*args)
    assert [t.numel() > 0 for t in saved] == (
        [name == "distill", True, name == "distill", name == "distill"] if save else [False] * 4
    )
    grad = torch.randn_like(out)
    bwd_args = (grad, *[a.detach() if isinstance(a, torch.Tensor) else a for a in args[:-2]],
                [True, True, True, False, True, True, True, False], *[t.detach() for t in saved], "triton")
    torch.library.opcheck(torch.ops.vitkernels.patch_embed_bwd.default, bwd_args,
                          test_utils=("test_schema", "test_faketensor"))


def test_compile_fullgraph_forward_and_backward():
    inputs = make_inputs(CASES["distill"], torch.float32)
    params = {k: v for k, v in _params(inputs)}

    params["images"] = inputs["images"]

    def f(images, weight, bias, pos, cls, in_w, in_b, out_w, out_b):
        return vitkernels.patch_embed(
            images, weight, bias, kernel_size=4, patch_order="pqc",
            in_norm=(in_w, in_b, 1e-5), out_norm=(out_w, out_b, 1e-5), pos_embed=pos,
            cls_token=cls, backend="triton",
        )

    keys = ["images", "weight", "bias", "pos_embed", "cls_token", "in_norm[0]", "in_norm[1]",
            "out_norm[0]", "out_norm[1]"]
    eager = [params[k].clone().requires_grad_() for k in keys]
    comp = [params[k].clone().requires_grad_() for k in keys]
    out_e = f(*eager)
    out_c = torch.compile(f, fullgraph=True, backend="aot_eager")(*comp)
    torch.testing.assert_close(out_c, out_e)
    grad = torch.randn_like(out_e)
    out_e.backward(grad)
    out_c.backward(grad)
    for k, a, b in zip(keys, comp, eager, strict=True):
        assert a.grad is not None, k
        torch.testing.assert_close(a.grad, b.grad, msg=lambda m, k=k: f"d{k}: {m}")


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    c = CASES["t2t_7_4_2"]
    with FakeTensorMode():
        inputs = make_inputs(dataclasses.replace(c, cls=2, pos="all"), torch.float16)
        out, *saved = torch.ops.vitkernels.patch_embed_fwd(*_op_args(inputs))
    Ho, Wo = _grid(c)
    assert tuple(out.shape) == (c.B, 2 + Ho * Wo, c.D) and out.dtype == torch.float16
    assert [tuple(t.shape) for t in saved] == [(0,)] * 4


def test_automatic_dispatch_on_cpu_is_torch():
    inputs = make_inputs(CASES["vit_pytorch"], torch.float32)
    chosen, verdicts = pe_op.which_backend(**inputs)
    assert chosen == "torch", verdicts
    with vitkernels.use_backend("triton"):
        assert pe_op.which_backend(**inputs)[0] == "triton"


def test_forced_backends_that_cannot_run_say_why():
    inputs = make_inputs(CASES["vit"], torch.float64)
    with pytest.raises(BackendNotSupportedError, match="float64"):
        vitkernels.patch_embed(**inputs, backend="triton")
    with pytest.raises(BackendNotSupportedError, match="cuda"):
        vitkernels.patch_embed(**make_inputs(CASES["vit"], torch.float16), backend="cuda")


def test_patch_grid_matches_unfold():
    x = torch.randn(1, 2, 13, 11)
    for k, s, p in ((7, 4, 2), (3, 2, 1), (4, 2, 0), ((4, 2), (4, 1), (1, 0))):
        kk = (k, k) if isinstance(k, int) else k
        ss = (s, s) if isinstance(s, int) else s
        pp = (p, p) if isinstance(p, int) else p
        Ho, Wo = pe_op.patch_grid((13, 11), kk, ss, pp)
        assert torch.nn.functional.unfold(x, kk, stride=ss, padding=pp).shape[-1] == Ho * Wo


# ----------------------------------------------------------------------------
# input errors


def _err(exc, match, **changes):
    inputs = make_inputs(CASES["vit_pytorch"], torch.float32)
    inputs.update(changes)
    with pytest.raises(exc, match=match):
        vitkernels.patch_embed(**inputs)


def test_error_image_not_covered_by_the_grid():
    _err(ValueError, r"does not cover the image height 13.*12 or 16",
         images=torch.randn(2, 3, 13, 12), pos_embed=None)
    # padding lets an odd size through where the grid reaches every pixel (T2T 7/4/2)
    inputs = make_inputs(CASES["t2t_7_4_2"], torch.float32)
    vitkernels.patch_embed(**inputs)


def test_error_image_smaller_than_kernel():
    _err(ValueError, "smaller than the kernel", images=torch.randn(2, 3, 3, 12), pos_embed=None)


def test_error_channel_mismatch():
    _err(ValueError, r"weight has shape \(40, 48\); expected \(D, 32\).*C=2 channels",
         images=torch.randn(2, 2, 12, 12))
    inputs = make_inputs(CASES["vit"], torch.float32)
    inputs["images"] = torch.randn(2, 2, 12, 12)
    with pytest.raises(ValueError, match=r"expected \(D, 2, 4, 4\)"):
        vitkernels.patch_embed(**inputs)


def test_error_pos_embed_length():
    _err(ValueError, r"pos_embed has shape \(1, 11, 40\).*T = 10 \(every token\) or 9",
         pos_embed=torch.randn(1, 11, 40))
    _err(ValueError, r"pos_embed has shape \(10, 39\)", pos_embed=torch.randn(10, 39))


def test_error_other_arguments():
    _err(ValueError, r"cls_token has shape \(2, 1, 40\)", cls_token=torch.randn(2, 1, 40))
    _err(ValueError, "patch_order='qpc'", patch_order="qpc")
    _err(TypeError, "kernel_size=.*int or a pair", kernel_size="4")
    _err(ValueError, r"stride=0; expected values >= 1", stride=0)
    _err(ValueError, r"in_norm weight has shape \(40,\); expected \(48,\)",
         in_norm=(torch.ones(40), None, 1e-5))
    _err(TypeError, r"in_norm must be a \(weight, bias, eps\) tuple", in_norm=torch.ones(48))
    _err(ValueError, "out_norm eps=-1.0", out_norm=(None, None, -1.0))
    _err(ValueError, r"images has shape \(3, 12, 12\); expected \(B, C, H, W\)",
         images=torch.randn(3, 12, 12))
    _err(TypeError, "bias has dtype torch.float64 but images have torch.float32",
         bias=torch.randn(40, dtype=torch.float64))
    _err(TypeError, "images has dtype torch.int64", images=torch.ones(2, 3, 12, 12, dtype=torch.long))
    _err(ValueError, r"Conv2d weight .* patch_order='pqc'", weight=torch.randn(40, 3, 4, 4))


# ----------------------------------------------------------------------------
# the launchers' vectorisation hints (the GPU trusts them; the interpreter ignores them)


def _gather_offsets(images: torch.Tensor, k, s, p, order):
    """(M, K) element offsets of the patch elements as the kernels compute them, and
    whether each lies inside the image."""
    B, C, H, W = images.shape
    sxb, sxc, sxh, sxw = images.stride()
    Ho, Wo = (H + 2 * p - k) // s + 1, (W + 2 * p - k) // s + 1
    m = torch.arange(B * Ho * Wo)[:, None]
    kk = torch.arange(C * k * k)[None, :]
    b, l = m // (Ho * Wo), m % (Ho * Wo)
    ih0, iw0 = (l // Wo) * s - p, (l % Wo) * s - p
    if order == "pqc":
        c, pq = kk % C, kk // C
    else:
        c, pq = kk // (k * k), kk % (k * k)
    ih, iw = ih0 + pq // k, iw0 + pq % k
    off = b * sxb + c * sxc + ih * sxh + iw * sxw
    inside = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    return off, inside


@pytest.mark.parametrize(
    "shape,layout,k,s,p",
    [
        ((2, 3, 32, 32), "nchw", 16, 16, 0),
        ((2, 3, 32, 32), "channels_last", 16, 16, 0),
        ((2, 8, 16, 16), "channels_last", 4, 4, 2),  # padding: runs inside one pixel (C % v)
        ((2, 3, 24, 24), "nchw", 8, 8, 8),  # padding that is a multiple of the run
        ((2, 3, 13, 11), "nchw", 7, 4, 2),  # T2T: no runs
        ((2, 16, 8, 8), "view", 4, 4, 0),
    ],
)
@pytest.mark.parametrize("order", ["cpq", "pqc"])
def test_patch_vectorisation_hint_holds(shape, layout, k, s, p, order):
    x = torch.randn(*shape, dtype=torch.float16)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "view":
        x = torch.randn(shape[0], shape[1], shape[2], 2 * shape[3], dtype=torch.float16)[..., ::2]
    g = tp._geometry(x, (k, k), (s, s), (p, p))
    kernel_order = tp._kernel_order(x, order)
    v = tp._patch_vec(x, g, kernel_order)
    off, inside = _gather_offsets(x, k, s, p, kernel_order)
    if v == 1:
        return
    assert x.data_ptr() % (v * x.element_size()) == 0
    runs = off.reshape(off.shape[0], -1, v)
    assert (runs[..., 0] % v == 0).all(), "a run starts unaligned"
    assert (runs - runs[..., :1] == torch.arange(v)).all(), "a run is not contiguous"
    ins = inside.reshape(inside.shape[0], -1, v)
    assert (ins == ins[..., :1]).all(), "a run is partly outside the image"


def test_vectorisation_hints_where_they_matter():
    """P1/P2 (NCHW) and channels_last P2 get 16-byte runs; T2T's 7-wide rows get none."""
    for layout in ("nchw", "channels_last"):
        x = torch.empty(2, 3, 224, 224, dtype=torch.bfloat16)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        g = tp._geometry(x, (16, 16), (16, 16), (0, 0))
        assert tp._patch_vec(x, g, tp._kernel_order(x, "pqc")) == 8, layout
    x = torch.empty(2, 3, 224, 224, dtype=torch.bfloat16)
    assert tp._patch_vec(x, tp._geometry(x, (7, 7), (4, 4), (2, 2)), "cpq") == 1
    w = torch.empty(768, 768, dtype=torch.bfloat16)
    assert tp._run_vec(w, 1, 768) == 8 and tp._run_vec(w.t(), 1, 768) == 1
    assert tp._run_vec(w[:, 1:], 1, 767) == 1  # unaligned start, odd length
    assert tp._run_vec(torch.empty(4, 197, 768, dtype=torch.float32), 2, 768) == 4




def test_reciprocal_row_division_is_exact_below_its_limit():
    """The dW and dXn loops divide patch rows by L and Wout with a float32 reciprocal
    (``_patch_rows``, RCP_ROWS): floor((x + 0.5) * r) must equal x // d for every x
    below the launcher's limit, r the rounded reciprocal and r pushed 2 ulp either way
    (Triton's float32 division is div.full.f32, within 2 ulp); checked at every quotient
    boundary (k*d - 1 and k*d) of small and of fresh random divisors."""
    limit = tp._RCP_ROWS_LIMIT
    divisors = torch.cat([torch.arange(1, 200), torch.randint(200, limit, (30,))])
    zero, big = torch.tensor(0.0), torch.tensor(1.0e9)
    for d in divisors.tolist():
        k = torch.arange(1, limit // d + 1, dtype=torch.int64)
        x = torch.cat([k * d - 1, k * d])
        x = x[x < limit]
        r = torch.tensor(1.0, dtype=torch.float32) / torch.tensor(float(d), dtype=torch.float32)
        lo = torch.nextafter(torch.nextafter(r, zero), zero)
        hi = torch.nextafter(torch.nextafter(r, big), big)
        for rr in (lo, r, hi):
            q = ((x.to(torch.float32) + 0.5) * rr).to(torch.int64)
            wrong = (q != x // d).nonzero().flatten()
            assert wrong.numel() == 0, f"d={d}, x={x[wrong[0]].item()}: {q[wrong[0]].item()}"


@pytest.mark.parametrize("name", ["vit_pytorch", "t2t_7_4_2"])
def test_triton_gradients_with_integer_row_division(name, monkeypatch):
    """Past the reciprocal's limit the dW and dXn loops divide rows as integers: forced
    here by a limit of 0, the gradients still match float64."""
    monkeypatch.setattr(tp, "_RCP_ROWS_LIMIT", 0)
    inputs = make_inputs(CASES[name], torch.float32)
    grad = torch.randn_like(reference64(inputs))
    got = _grads(inputs, "triton", torch.float32, grad)
    want = _grads(inputs, None, torch.float64, grad)
    assert got.keys() == want.keys()
    for key in want:
        assert_close(got[key], want[key], what=f"{name} d{key}", grad=True, floor=1.0, dtype=torch.float32)
