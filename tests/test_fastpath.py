"""The eager fast path (vitkernels/ops/_fastpath.py): a cached dispatch decision and
launchers called without torch.library give what the checked path and the custom
ops give, and a call that differs in anything the decision reads is not served a
stale one."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

import vitkernels
from vitkernels.ops import _dispatch
from vitkernels.ops import head_mixing as hm_op
from vitkernels.ops import patch_embed as pe_op
from vitkernels.ops import performer as perf_op
from vitkernels.ops import relpos as relpos_op
from vitkernels.ops._dispatch import BackendNotSupportedError, use_backend

pytest.importorskip("triton")

MODULES = {"relpos_attention": relpos_op, "performer_attention": perf_op, "patch_embed": pe_op,
           "head_mixing_attention": hm_op}  # fmt: skip


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    if not torch.cuda.is_available():  # CPU tensors for the triton backend
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("VITKERNELS_BACKEND", raising=False)
    for m in MODULES.values():
        m._DECISIONS.clear()


def _call(op: str, dtype=torch.float32, grad: bool = False, seed: int = 0):
    """(args, kwargs) of one small call, fresh random inputs."""
    g = torch.Generator().manual_seed(seed)

    def t(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(grad)

    if op == "relpos_attention":
        return (t(2, 2, 4, 16), t(2, 2, 16, 16), t(2, 2, 16, 16), t(2, 16)), {"fmap_size": 4, "q_stride": 2}
    if op == "performer_attention":
        return (t(2, 8, 16), t(2, 8, 16), t(2, 8, 16), t(4, 16)), {}
    if op == "head_mixing_attention":  # timm's talking heads with biases, and a head norm
        return (t(2, 3, 5, 16), t(2, 3, 7, 16), t(2, 3, 7, 16)), {
            "pre": (t(3, 3), t(3)), "post": (t(3, 3), t(3)), "head_norm": (t(3), t(3), 1e-5),
        }  # fmt: skip
    return (t(2, 3, 8, 8), t(16, 12), t(16)), {
        "kernel_size": 2, "pos_embed": t(1, 17, 16), "cls_token": t(1, 1, 16),
        "in_norm": (t(12), t(12), 1e-5),
    }  # fmt: skip


class _Passthrough(TorchFunctionMode):
    """Any TorchFunctionMode sends kernel calls through the custom ops."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class _Spy:
    """Counts calls of a module's custom forward op (the torch.library route)."""

    def __init__(self, monkeypatch, module, name):
        self.calls = 0
        real = getattr(module, name)

        def spy(*a):
            self.calls += 1
            return real(*a)

        monkeypatch.setattr(module, name, spy)


_CUSTOM = {"relpos_attention": "relpos_attention_fwd", "performer_attention": "performer_attention_fwd",
           "patch_embed": "patch_embed_fwd", "head_mixing_attention": "head_mixing_attention_fwd"}  # fmt: skip


def _leaves(args, kwargs):
    found = [a for a in args if isinstance(a, torch.Tensor)]
    for v in kwargs.values():
        if isinstance(v, torch.Tensor):
            found.append(v)
        elif isinstance(v, tuple):
            found += [x for x in v if isinstance(x, torch.Tensor)]
    return [x for x in found if x.requires_grad]


def _run(fn, args, kwargs, backend, grad):
    out = fn(*args, **kwargs, backend=backend)
    if not grad:
        return [out]
    leaves = _leaves(args, kwargs)
    g = torch.Generator().manual_seed(7)
    grad_out = torch.randn(out.shape, generator=g).to(out.device, out.dtype)
    return [out, *torch.autograd.grad(out, leaves, grad_out)]


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("op", list(MODULES))
def test_direct_launch_and_cached_decision_equal_the_custom_op(op, grad, monkeypatch):
    """First call (checked path), second call (cached decision), and the custom-op route
    (forced by a TorchFunctionMode): bitwise the same forward and gradients."""
    fn = getattr(vitkernels, op)
    spy = _Spy(monkeypatch, MODULES[op], _CUSTOM[op])
    args, kwargs = _call(op, grad=grad)
    first = _run(fn, args, kwargs, "triton", grad)
    assert len(MODULES[op]._DECISIONS.entries) == 1
    second = _run(fn, args, kwargs, "triton", grad)
    assert spy.calls == 0  # eager calls skipped torch.library
    with _Passthrough():
        routed = _run(fn, args, kwargs, "triton", grad)
    assert spy.calls == 1
    for a, b, c in zip(first, second, routed, strict=True):
        assert torch.isfinite(a).all()
        assert torch.equal(a, b) and torch.equal(a, c)
        assert a.requires_grad == c.requires_grad


@pytest.mark.parametrize("op", list(MODULES))
def test_a_changed_input_gets_its_own_decision(op):
    """A dtype, device, shape, backend request or environment the cached decision did
    not see is checked again: refused where the checked path refuses it."""
    fn = getattr(vitkernels, op)
    args, kwargs = _call(op)
    fn(*args, **kwargs, backend="triton")
    # dtype: float64 is not a kernel dtype
    a64, k64 = _call(op, dtype=torch.float64)
    with pytest.raises(BackendNotSupportedError, match="float64"):
        fn(*a64, **k64, backend="triton")
    # device: meta tensors are not CUDA tensors (nor CPU tensors for the interpreter)
    meta = tuple(a.to("meta") for a in args)
    kmeta = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    for key, value in kwargs.items():  # in_norm, pre, post, head_norm
        if isinstance(value, tuple):
            kmeta[key] = tuple(x.to("meta") if isinstance(x, torch.Tensor) else x for x in value)
    with pytest.raises(BackendNotSupportedError, match="device meta"):
        fn(*meta, **kmeta, backend="triton")
    # the environment: without the interpreter the triton backend needs CUDA tensors
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(BackendNotSupportedError, match="needs CUDA tensors"):
            fn(*args, **kwargs, backend="triton")
    # a requirement that stops holding (triton no longer importable)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_dispatch, "_triton_error", ["triton is not importable (test)"])
        with pytest.raises(BackendNotSupportedError, match=r"triton is not importable \(test\)"):
            fn(*args, **kwargs, backend="triton")
    fn(*args, **kwargs, backend="triton")  # and the cached decision still serves the first call


def test_head_mixing_cached_decision_takes_each_call_s_parameters():
    """The decision cache keeps only the checked scale / eps / dropout: a second call with
    other mixing and norm tensors of the same properties computes with those (as a
    fresh checked call does), and another eps, scale or a stage left out is decided
    again. The stale-parameter case a cached tensor would make."""
    fn = vitkernels.head_mixing_attention
    (q, k, v), kw = _call("head_mixing_attention")
    first = fn(q, k, v, **kw, backend="triton")
    (_, _, _), kw2 = _call("head_mixing_attention", seed=1)
    second = fn(q, k, v, **kw2, backend="triton")
    assert len(hm_op._DECISIONS.entries) == 1  # the same signature: served from the cache
    hm_op._DECISIONS.clear()
    fresh = fn(q, k, v, **kw2, backend="triton")  # the checked path
    assert torch.equal(second, fresh) and not torch.allclose(first, second)
    ref = fn(*(x.double() for x in (q, k, v)), backend="reference", **{
        n: tuple(x.double() if isinstance(x, torch.Tensor) else x for x in val) for n, val in kw2.items()})
    assert torch.allclose(second.double(), ref, atol=1e-5, rtol=1e-4)
    # in-place updates of the same parameter tensors (an optimizer step) are seen too
    with torch.no_grad():
        kw2["post"][0].mul_(-1.5)
    assert not torch.equal(fn(q, k, v, **kw2, backend="triton"), second)
    # eps, scale and the stages present are part of the decision
    w, b, _ = kw2["head_norm"]
    for other in ({**kw2, "head_norm": (w, b, 1e-3)}, {**kw2, "pre": None}, {**kw2, "head_norm": (w, None, 1e-5)}):
        n = len(hm_op._DECISIONS.entries)
        out = fn(q, k, v, **other, backend="triton")
        assert len(hm_op._DECISIONS.entries) == n + 1
        hm_op._DECISIONS.clear()
        assert torch.equal(out, fn(q, k, v, **other, backend="triton"))
    n = len(hm_op._DECISIONS.entries)
    fn(q, k, v, **kw2, scale=0.3, backend="triton")
    assert len(hm_op._DECISIONS.entries) == n + 1
    # a malformed pair after a cached call still gets the checked path's error
    with pytest.raises(TypeError, match="expected a \\(weight, bias\\) pair"):
        fn(q, k, v, pre=(kw2["pre"][0],), backend="triton")
    # a misaligned start (a view one element in: same shape, strides and dtype) is not
    # served the aligned call's decision: the kernels refuse it, as the checked path says
    qo = torch.randn(q.numel() + 1)[1:].view_as(q)
    fn(q, k, v, **kw2, backend="triton")  # the aligned signature cached
    with pytest.raises(BackendNotSupportedError, match="16-byte aligned rows"):
        fn(qo, k, v, **kw2, backend="triton")


def test_a_changed_shape_or_argument_is_checked_again():
    args, kwargs = _call("relpos_attention")
    q, k, v, table = args
    vitkernels.relpos_attention(*args, **kwargs, backend="triton")
    with pytest.raises(ValueError, match="Nq=4 queries"):  # same tensors, another q_stride
        vitkernels.relpos_attention(*args, fmap_size=4, q_stride=1, backend="triton")
    with pytest.raises(TypeError, match="q_stride must be an int, got True"):  # True == 2 - 1 but a bool
        vitkernels.relpos_attention(*args, fmap_size=4, q_stride=True, backend="triton")
    with pytest.raises(TypeError, match="fmap_size must be an int"):
        vitkernels.relpos_attention(*args, fmap_size=(4, 4.0), q_stride=2, backend="triton")
    big = torch.randn(2, 2, 4, 160), torch.randn(2, 2, 16, 160)
    with pytest.raises(BackendNotSupportedError, match="Dk=160 is above"):
        vitkernels.relpos_attention(big[0], big[1], v, table, **kwargs, backend="triton")
    # a -0.0 scale is not the cached 0.0 one: each gives its own (equal) answer
    zero = vitkernels.relpos_attention(*args, **kwargs, scale=0.0, backend="triton")
    negz = vitkernels.relpos_attention(*args, **kwargs, scale=-0.0, backend="triton")
    assert torch.equal(zero, negz)
    assert len(relpos_op._DECISIONS.entries) == 3


def test_a_changed_stride_or_requires_grad_is_computed_for_what_it_is():
    """A transposed view after the contiguous call, then inputs that need a gradient
    after the no-grad call: right values, and a gradient."""
    args, kwargs = _call("performer_attention")
    q, k, v, w = args
    base = vitkernels.performer_attention(*args, backend="triton")
    want = vitkernels.performer_attention(*args, backend="reference")
    torch.testing.assert_close(base, want, rtol=1e-4, atol=1e-5)
    qt = q.transpose(0, 1).contiguous().transpose(0, 1)  # same values, other strides
    assert qt.stride() != q.stride()
    assert torch.equal(vitkernels.performer_attention(qt, k, v, w, backend="triton"), base)
    qg = q.detach().requires_grad_(True)
    out = vitkernels.performer_attention(qg, k, v, w, backend="triton")
    assert out.requires_grad and out.grad_fn is not None
    (dq,) = torch.autograd.grad(out.sum(), qg)
    qr = q.detach().double().requires_grad_(True)
    ref = vitkernels.performer_attention(qr, k.double(), v.double(), w.double(), backend="reference")
    (dq_ref,) = torch.autograd.grad(ref.sum(), qr)
    torch.testing.assert_close(dq.double(), dq_ref, rtol=1e-3, atol=1e-4)
    with torch.no_grad():  # grad mode is part of the signature too
        assert not vitkernels.performer_attention(qg, k, v, w, backend="triton").requires_grad
    assert len(perf_op._DECISIONS.entries) == 6  # 4 triton signatures, 2 reference ones


def test_backend_requests_are_not_served_a_stale_choice(monkeypatch):
    """The automatic choice on CPU is torch; a forced backend (argument, context, env)
    afterwards runs that backend, each with its own decision."""
    ran: list[str] = []
    for b in relpos_op.BACKENDS:
        real = b.run
        monkeypatch.setattr(b, "run", lambda inputs, real=real, name=b.name: (ran.append(name), real(inputs))[1])
    args, kwargs = _call("relpos_attention")
    vitkernels.relpos_attention(*args, **kwargs)
    vitkernels.relpos_attention(*args, **kwargs)
    with use_backend("reference"):
        vitkernels.relpos_attention(*args, **kwargs)
    monkeypatch.setenv("VITKERNELS_BACKEND", "triton")
    vitkernels.relpos_attention(*args, **kwargs)
    vitkernels.relpos_attention(*args, **kwargs, backend="reference")
    monkeypatch.setenv("VITKERNELS_BACKEND", "auto")
    vitkernels.relpos_attention(*args, **kwargs)
    assert ran == ["torch", "torch", "reference", "triton", "reference", "torch"]
    with pytest.raises(ValueError, match="unknown backend 'trition'"):
        vitkernels.relpos_attention(*args, **kwargs, backend="trition")


def test_errors_after_a_cached_call_are_the_checked_path_s_errors():
    """The same bad call raises the same error with an empty cache and a warm one."""
    args, kwargs = _call("patch_embed")
    bad = [
        dict(kwargs, kernel_size=3),  # does not tile the 8x8 image
        dict(kwargs, in_norm=(None, None)),  # malformed norm
        dict(kwargs, in_norm=(None, None, True)),  # eps a bool
        dict(kwargs, patch_order="qpc"),
    ]

    def errors():
        out = []
        for kw in bad:
            with pytest.raises((TypeError, ValueError)) as info:
                vitkernels.patch_embed(*args, **kw, backend="triton")
            out.append((type(info.value), str(info.value)))
        return out

    cold = errors()
    vitkernels.patch_embed(*args, **kwargs, backend="triton")
    assert pe_op._DECISIONS.entries
    assert errors() == cold


def test_fake_tensors_and_dispatch_modes_take_the_custom_op():
    """Under FakeTensorMode (as torch.compile traces) the custom op's fake runs: the
    launchers never see fake tensors, and nothing is cached for them."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    args, kwargs = _call("relpos_attention")
    with FakeTensorMode() as mode:
        args = tuple(mode.from_tensor(a) for a in args)
        out = vitkernels.relpos_attention(*args, **kwargs, backend="triton")
    assert tuple(out.shape) == (2, 2, 4, 16)
    assert not relpos_op._DECISIONS.entries


def test_compiled_calls_do_not_use_the_cache():
    args, kwargs = _call("performer_attention")
    compiled = torch.compile(
        lambda *a: vitkernels.performer_attention(*a, backend="triton"), backend="eager", fullgraph=True
    )
    out = compiled(*args)
    assert not perf_op._DECISIONS.entries
    assert torch.equal(out, vitkernels.performer_attention(*args, backend="triton"))


def test_decision_cache_starts_over_when_full(monkeypatch):
    monkeypatch.setattr(perf_op._DECISIONS, "max_entries", 2)
    for T in (4, 5, 6):
        q = torch.randn(1, T, 8)
        vitkernels.performer_attention(q, q, q, torch.randn(4, 8), backend="triton")
    assert len(perf_op._DECISIONS.entries) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("op", list(MODULES))
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_on_a_gpu_direct_launches_equal_the_custom_op(op, backend, monkeypatch):
    """CUDA tensors, bfloat16: the eager path (cached decision, launchers called
    directly, device guard skipped on the current device) against the custom-op
    route, forward and every gradient."""
    from vitkernels import cuda

    if backend == "cuda" and not cuda.is_built():
        pytest.skip(f"no CUDA extension: {cuda.unavailable_reason()}")
    fn = getattr(vitkernels, op)
    args, kwargs = _call(op, dtype=torch.bfloat16, grad=True)
    move = lambda x: x.detach().cuda().requires_grad_(x.requires_grad) if isinstance(x, torch.Tensor) else x  # noqa: E731
    args = tuple(move(a) for a in args)
    kwargs = {k: tuple(move(x) for x in v) if isinstance(v, tuple) else move(v) for k, v in kwargs.items()}
    spy = _Spy(monkeypatch, MODULES[op], _CUSTOM[op])
    direct = [_run(fn, args, kwargs, backend, True) for _ in range(2)]
    assert spy.calls == 0
    with _Passthrough():
        routed = _run(fn, args, kwargs, backend, True)
    assert spy.calls == 1
    # every backend's gradients are deterministic (no atomics): the same bits
    for a, b, c in zip(*direct, routed, strict=True):
        assert torch.isfinite(a).all()
        for other in (b, c):
            assert torch.equal(a, other)


def test_jit_trace_records_the_custom_op():
    """torch.jit.trace records torch ops: a direct launch would vanish from the trace."""
    args, kwargs = _call("performer_attention")
    traced = torch.jit.trace(lambda q, k, v, w: vitkernels.performer_attention(q, k, v, w, backend="triton"), args)
    assert "vitkernels::performer_attention_fwd" in str(traced.graph)
    assert torch.equal(traced(*args), vitkernels.performer_attention(*args, backend="triton"))
