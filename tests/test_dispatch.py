"""The shared backend-selection layer (vitkernels/ops/_dispatch.py) on stand-in backends."""

from __future__ import annotations

import pytest
import torch

import vitkernels
from vitkernels.ops._dispatch import Backend, BackendNotSupportedError, forced_backend, select


class _Fake(Backend):
    def __init__(self, name: str, reasons: list[str], gpu_kernel: bool = False):
        self.name, self._reasons, self.gpu_kernel = name, reasons, gpu_kernel

    def not_supported_reasons(self, **inputs):
        return list(self._reasons)


BACKENDS = [
    _Fake("cuda", ["the CUDA extension vitkernels._C is not built"], gpu_kernel=True),
    _Fake("triton", [], gpu_kernel=True),
    _Fake("torch", []),
    _Fake("reference", []),
]


def test_automatic_skips_gpu_kernels_for_cpu_tensors():
    x = torch.randn(2)
    assert select("op", BACKENDS, None, x=x).name == "torch"


def test_forced_by_argument_context_and_env(monkeypatch):
    x = torch.randn(2)
    assert select("op", BACKENDS, "reference", x=x).name == "reference"
    with vitkernels.use_backend("triton"):
        assert select("op", BACKENDS, None, x=x).name == "triton"
        with vitkernels.use_backend(None):
            assert select("op", BACKENDS, None, x=x).name == "torch"
        # the explicit argument wins over the context
        assert select("op", BACKENDS, "torch", x=x).name == "torch"
    monkeypatch.setenv("VITKERNELS_BACKEND", "reference")
    assert forced_backend() == "reference"
    assert select("op", BACKENDS, None, x=x).name == "reference"
    monkeypatch.setenv("VITKERNELS_BACKEND", "auto")
    assert forced_backend() is None


def test_forcing_an_unsupported_backend_names_it_and_the_reason():
    with pytest.raises(BackendNotSupportedError, match=r"backend 'cuda'.*not built"):
        select("relpos_attention", BACKENDS, "cuda", x=torch.randn(2))


def test_no_backend_lists_every_refusal():
    refusing = [_Fake("triton", ["needs CUDA tensors"], True), _Fake("torch", ["dtype int8"])]
    with pytest.raises(BackendNotSupportedError) as info:
        select("op", refusing, None, x=torch.randn(2, device="cpu"))
    msg = str(info.value)
    assert "triton" in msg and "torch: dtype int8" in msg


def test_unknown_backend_names_are_rejected(monkeypatch):
    with pytest.raises(ValueError, match="unknown backend 'tensorrt'"):
        with vitkernels.use_backend("tensorrt"):
            pass
    monkeypatch.setenv("VITKERNELS_BACKEND", "trition")
    with pytest.raises(ValueError, match="VITKERNELS_BACKEND.*'trition'"):
        forced_backend()
