"""The shared backend-selection layer (vitkernels/ops/_dispatch.py): capabilities
declared as data on stand-in backends, then the real ops' declarations on CUDA
tensors that exist only as fakes (no GPU here) with a faked compute capability."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import vitkernels
from vitkernels.ops import patch_embed, performer, relpos
from vitkernels.ops._dispatch import (
    Backend,
    BackendNotSupportedError,
    Inputs,
    explain,
    forced_backend,
    select,
)


class _Kernel(Backend):
    name = "triton"
    devices = ("cuda",)
    interpreter = True
    auto_on_cpu = False
    dtypes = (torch.float16, torch.float32)
    param_dtypes = (torch.float32,)
    min_compute_capability = (8, 0)
    nondeterministic_grads = frozenset({"table"})
    max_sizes = {"D": 64}


class _Missing(Backend):
    name = "cuda"
    requirements = (lambda: "the CUDA extension vitkernels._C is not built",)


class _Torch(Backend):
    name = "torch"
    dtypes = (torch.float16, torch.float32, torch.float64)


class _Reference(Backend):
    name = "reference"


BACKENDS = [_Missing(), _Kernel(), _Torch(), _Reference()]


def _inputs(x: torch.Tensor, table: torch.Tensor | None = None, D: int = 16) -> Inputs:
    return Inputs("op", {"x": x, "table": table}, params=("table",), sizes={"D": D})


def test_automatic_skips_gpu_kernels_for_cpu_tensors():
    assert select(BACKENDS, _inputs(torch.randn(2))).name == "torch"


def test_forced_by_argument_context_and_env(monkeypatch):
    x = _inputs(torch.randn(2))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert select(BACKENDS, x, "reference").name == "reference"
    with vitkernels.use_backend("triton"):
        assert select(BACKENDS, x).name == "triton"
        with vitkernels.use_backend(None):
            assert select(BACKENDS, x).name == "torch"
        # the explicit argument wins over the context
        assert select(BACKENDS, x, "torch").name == "torch"
    monkeypatch.setenv("VITKERNELS_BACKEND", "reference")
    assert forced_backend() == "reference"
    assert select(BACKENDS, x).name == "reference"
    monkeypatch.setenv("VITKERNELS_BACKEND", "auto")
    assert forced_backend() is None


def test_each_declared_capability_is_a_reason(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    k = _Kernel()
    x32, t32 = torch.randn(2), torch.randn(3)
    assert k.not_supported_reasons(_inputs(x32.double(), t32.half(), D=65)) == [
        "needs CUDA tensors, got device cpu (set TRITON_INTERPRET=1 to run the Triton "
        "kernels on CPU tensors)",
        "x has dtype float64; supported: float16, float32",
        "table has dtype float16; supported: float32",
        "D=65 is above the kernels' limit of 64",
    ]
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert k.not_supported_reasons(_inputs(x32, t32)) == []
    # the interpreter's bfloat16 is wrong: refused there even where the kernels take it
    monkeypatch.setattr(_Kernel, "dtypes", (torch.bfloat16, torch.float32))
    (reason,) = k.not_supported_reasons(_inputs(x32.bfloat16(), t32))
    assert "x has dtype bfloat16" in reason and "Triton interpreter" in reason
    assert _Missing().not_supported_reasons(_inputs(x32)) == [
        "the CUDA extension vitkernels._C is not built"
    ]
    # one sentence per refused dtype, naming every tensor that has it
    two = Inputs("op", {"q": x32.double(), "k": x32.double(), "v": x32})
    assert _Torch().not_supported_reasons(two) == [] and _Kernel().not_supported_reasons(two) == [
        "q, k have dtype float64; supported: bfloat16, float32"
    ]


def test_nondeterministic_gradients_are_refused_only_where_they_are_needed():
    k = _Kernel()
    table = torch.randn(3, requires_grad=True)
    inputs = _inputs(torch.randn(2), table)
    was = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        reasons = k.not_supported_reasons(inputs)
        assert any("deterministic" in r and "table gradient" in r and "atomics" in r for r in reasons)
        with torch.no_grad():
            assert not any("deterministic" in r for r in k.not_supported_reasons(inputs))
        table.requires_grad_(False)
        assert not any("deterministic" in r for r in k.not_supported_reasons(inputs))
    finally:
        torch.use_deterministic_algorithms(was)


def test_forcing_an_unsupported_backend_names_it_and_the_reason():
    with pytest.raises(BackendNotSupportedError, match=r"backend 'cuda'.*not built"):
        select(BACKENDS, _inputs(torch.randn(2)), "cuda")


def test_no_backend_prints_the_inputs_then_every_refusal():
    refusing = [_Kernel(), _Torch()]
    with pytest.raises(BackendNotSupportedError) as info:
        select(refusing, _inputs(torch.randn(2, 5, dtype=torch.bfloat16), torch.randn(3)))
    msg = str(info.value)
    lines = msg.splitlines()
    assert lines[0] == "op: no backend can run these inputs:"
    assert "x      shape (2, 5), bfloat16, cpu" in lines[1]
    assert "table  shape (3,), float32, cpu" in lines[2] and "sizes: D=16" in lines[3]
    assert "triton: not chosen automatically for CPU tensors" in msg
    assert "torch: x has dtype bfloat16; supported: float16, float32, float64" in msg


def test_explain_runs_nothing_and_lists_every_backend():
    chosen, verdicts = explain(BACKENDS, _inputs(torch.randn(2)))
    assert chosen == "torch"
    assert [n for n, _ in verdicts] == ["cuda", "triton", "torch", "reference"]
    assert verdicts[2][1] == [] and verdicts[3][1] == []
    assert explain(BACKENDS, _inputs(torch.randn(2)), "reference")[0] == "reference"
    assert explain([_Missing()], _inputs(torch.randn(2)))[0] is None


def test_unknown_backend_names_are_rejected(monkeypatch):
    with pytest.raises(ValueError, match="unknown backend 'tensorrt'"):
        with vitkernels.use_backend("tensorrt"):
            pass
    monkeypatch.setenv("VITKERNELS_BACKEND", "trition")
    with pytest.raises(ValueError, match="VITKERNELS_BACKEND.*'trition'"):
        forced_backend()


# ----------------------------------------------------------------------------
# the real ops' declarations, on fake CUDA tensors


def _fake_cuda_calls(dtype: torch.dtype):
    """(op function, which_backend, args, kwargs) for each op, on fake CUDA tensors."""
    with FakeTensorMode():

        def t(*shape):
            return torch.empty(*shape, device="cuda", dtype=dtype)

        return [
            (vitkernels.relpos_attention, relpos.which_backend,
             (t(1, 2, 16, 16), t(1, 2, 16, 16), t(1, 2, 16, 32), t(2, 16)), {"fmap_size": 4}),
            (vitkernels.performer_attention, performer.which_backend,
             (t(1, 8, 16), t(1, 8, 16), t(1, 8, 16), t(4, 16)), {}),
            (vitkernels.patch_embed, patch_embed.which_backend,
             (t(1, 3, 8, 8), t(4, 12)), {"kernel_size": 2}),
        ]  # fmt: skip


@pytest.fixture
def capability(monkeypatch):
    """Set the (major, minor) compute capability every CUDA device reports."""
    asked: list[object] = []

    def set_to(cc: tuple[int, int]) -> list[object]:
        def fake(device=None):
            asked.append(device)
            return cc

        monkeypatch.setattr(torch.cuda, "get_device_capability", fake)
        return asked

    return set_to


def test_gpus_below_sm80_are_refused_naming_the_capability(capability):
    asked = capability((7, 5))
    for op, which_backend, args, kwargs in _fake_cuda_calls(torch.float16):
        chosen, verdicts = which_backend(*args, **kwargs)
        reasons = dict(verdicts)
        assert any("compute capability 8.0 (sm_80)" in r and "7.5 (sm_75)" in r
                   for r in reasons["triton"]), reasons  # fmt: skip
        assert chosen == "torch"
        with pytest.raises(BackendNotSupportedError, match=r"backend 'triton'.*has 7\.5 \(sm_75\)"):
            op(*args, **kwargs, backend="triton")
    assert asked and all(torch.device(d).type == "cuda" for d in asked)


def test_sm80_and_newer_take_the_triton_kernels(capability):
    for cc in ((8, 0), (9, 0)):
        capability(cc)
        for _, which_backend, args, kwargs in _fake_cuda_calls(torch.bfloat16):
            chosen, verdicts = which_backend(*args, **kwargs)
            assert chosen == "triton", verdicts
            assert dict(verdicts)["triton"] == []


def test_performer_triton_refuses_the_e_a_gpu_got_wrong(capability, monkeypatch):
    """The compiled performer kernels gave wrong results at E 33, 34 and 40 on an H200
    (relative error 0.7-0.9; the interpreter is right; E 20, 32, 48, 64 right): on CUDA
    tensors the triton backend refuses an odd E and an E between 32 and 64 that is not a
    multiple of 16, naming it, and dispatch takes another backend; other E and the
    interpreter (CPU tensors) are unaffected."""
    from vitkernels import cuda

    capability((9, 0))
    with FakeTensorMode():
        def call(E, M=17, dtype=torch.float16):
            t = lambda *shape: torch.empty(*shape, device="cuda", dtype=dtype)  # noqa: E731
            return t(1, 64, E), t(1, 64, E), t(1, 64, E), t(M, E)

        for E, dtype in ((33, torch.float16), (21, torch.float16), (1, torch.float16), (34, torch.bfloat16),
                         (40, torch.float16), (63, torch.float32), (50, torch.float16)):  # fmt: skip
            chosen, verdicts = performer.which_backend(*call(E, dtype=dtype))
            reasons = dict(verdicts)["triton"]
            assert len(reasons) == 1 and reasons[0].startswith(f"E={E}:") and "wrong results" in reasons[0]
            assert chosen != "triton" and chosen in ("cuda", "torch"), verdicts
            if cuda.unavailable_reason() is not None:
                assert chosen == "torch", verdicts
            with pytest.raises(BackendNotSupportedError, match=f"backend 'triton'.*E={E}: on a GPU"):
                vitkernels.performer_attention(*call(E, dtype=dtype), backend="triton")
        for E in (2, 16, 20, 24, 30, 32, 48, 64):
            chosen, verdicts = performer.which_backend(*call(E))
            assert dict(verdicts)["triton"] == [], (E, verdicts)
        # the switch the GPU probe turns off
        monkeypatch.setattr(performer, "REFUSE_WRONG_E_ON_GPU", False)
        assert dict(performer.which_backend(*call(33))[1])["triton"] == []
    # the interpreter runs an odd E (CPU tensors; its result is checked in test_performer.py)
    monkeypatch.setattr(performer, "REFUSE_WRONG_E_ON_GPU", True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q = torch.randn(1, 8, 33)
    w = torch.randn(17, 33)
    assert dict(performer.which_backend(q, q, q, w, backend="triton")[1])["triton"] == []


def test_relpos_triton_refuses_training_where_its_backward_faulted(capability, monkeypatch):
    """The triton dQ kernel raised an illegal memory access on an H200 at LeViT-256's
    7 x 7 stage (Dk 32, float16/bfloat16): on CUDA tensors the triton backend refuses
    such calls when they will need the backward (an input requires grad, grad mode on),
    naming the cause, and dispatch takes another backend; inference, Dk 16, float32 and
    the other grids are unaffected."""
    from vitkernels import cuda

    capability((9, 0))
    with FakeTensorMode():
        def call(R, C, dk, dv, dtype=torch.float16, grad=True, s=1):
            nq = -(-R // s) * -(-C // s)
            t = lambda *shape: torch.empty(*shape, device="cuda", dtype=dtype).requires_grad_(grad)  # noqa: E731
            table = torch.empty(6, R * C, device="cuda").requires_grad_(grad)
            return (t(2, 6, nq, dk), t(2, 6, R * C, dk), t(2, 6, R * C, dv), table), dict(fmap_size=(R, C),
                                                                                           q_stride=s)  # fmt: skip

        for R, C, dk, dv, dtype in ((7, 7, 32, 64, torch.float16), (7, 7, 32, 64, torch.bfloat16),
                                    (8, 8, 32, 128, torch.float16), (7, 7, 64, 64, torch.float16)):  # fmt: skip
            args, kw = call(R, C, dk, dv, dtype)
            chosen, verdicts = relpos.which_backend(*args, **kw)
            reasons = dict(verdicts)["triton"]
            assert len(reasons) == 1 and f"{R} x {C} grid with Dk={dk}" in reasons[0], verdicts
            assert "illegal memory access" in reasons[0] and chosen in ("cuda", "torch"), verdicts
            if cuda.unavailable_reason() is not None:
                assert chosen == "torch", verdicts
            with pytest.raises(BackendNotSupportedError, match=f"backend 'triton'.*{R} x {C} grid"):
                vitkernels.relpos_attention(*args, **kw, backend="triton")
            # inference takes the triton forward (right on the GPU)
            assert relpos.which_backend(*call(R, C, dk, dv, dtype, grad=False)[0], **kw)[0] == "triton"
            with torch.no_grad():
                assert relpos.which_backend(*args, **kw)[0] == "triton"
        for R, C, dk, dv, dtype, s in ((7, 7, 16, 64, torch.float16, 1), (7, 7, 32, 64, torch.float32, 1),
                                       (14, 14, 32, 64, torch.float16, 1), (4, 4, 32, 64, torch.float16, 1),
                                       (14, 14, 32, 128, torch.bfloat16, 2), (7, 7, 16, 64, torch.float16, 2)):  # fmt: skip
            args, kw = call(R, C, dk, dv, dtype, s=s)
            assert dict(relpos.which_backend(*args, **kw)[1])["triton"] == [], (R, C, dk, dtype)
        monkeypatch.setattr(relpos, "REFUSE_FAULTING_BACKWARD_ON_GPU", False)
        args, kw = call(7, 7, 32, 64)
        assert dict(relpos.which_backend(*args, **kw)[1])["triton"] == []


def test_forced_cuda_names_the_extension_on_every_op(capability):
    from vitkernels import cuda

    reason = cuda.unavailable_reason()
    if reason is None:
        pytest.skip("the CUDA extension is loaded here: forcing it is not refused")
    capability((9, 0))
    for op, _, args, kwargs in _fake_cuda_calls(torch.float16):
        with pytest.raises(BackendNotSupportedError, match="backend 'cuda' cannot run") as info:
            op(*args, **kwargs, backend="cuda")
        assert reason in str(info.value)


def test_interpreter_refuses_bfloat16_on_every_op(monkeypatch):
    """TRITON_INTERPRET=1 with bfloat16 CPU tensors returned garbage (relative errors
    1e9 to 1e11); the triton backend now refuses it with the reason."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    t = lambda *shape: torch.randn(*shape, dtype=torch.bfloat16)  # noqa: E731
    calls = [
        (vitkernels.relpos_attention,
         (t(1, 2, 16, 16), t(1, 2, 16, 16), t(1, 2, 16, 32), t(2, 16)), {"fmap_size": 4}),
        (vitkernels.performer_attention, (t(1, 8, 16), t(1, 8, 16), t(1, 8, 16), t(4, 16)), {}),
        (vitkernels.patch_embed, (t(1, 3, 8, 8), t(4, 12)), {"kernel_size": 2}),
    ]  # fmt: skip
    for op, args, kwargs in calls:
        with pytest.raises(BackendNotSupportedError, match=r"backend 'triton'.*bfloat16.*Triton interpreter"):
            op(*args, **kwargs, backend="triton")
        with vitkernels.use_backend("triton"), pytest.raises(BackendNotSupportedError, match="interpreter"):
            op(*args, **kwargs)
        # float32 on the same inputs still runs there
        op(*(a.float() for a in args), **kwargs, backend="triton")

