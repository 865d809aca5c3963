"""The eager fast path of every op: what a repeated call skips.

Two things cost most of an op call's host time once the kernels are compiled
(bench/host_overhead.py measures them layer by layer):

* validation and backend selection, which build the same answer for every call
  with the same signature. ``DecisionCache`` keeps, per op, the chosen backend and
  the checked non-tensor arguments of each signature that validated and found a
  backend. The key is everything either step reads: each tensor's dtype, device
  (with its index: a CUDA device's compute capability is fixed for the process),
  shape, strides and requires_grad, every other argument (tagged with its type,
  floats by their exact bits), the forced backend (argument, use_backend,
  VITKERNELS_BACKEND), TRITON_INTERPRET, grad mode, deterministic mode and what
  each backend's requirements answer now. Only plain tensors and parameters are
  keyed: a call with a tensor subclass (fake tensors, ...) takes the checked
  path every time. A call that fails either step is never cached, so its error
  is raised by the same code every time. Under torch.compile the cache is not
  used (dispatch is traced as plain Python, as before).
* the ``torch.library`` custom op around a kernel launcher, which costs more
  than the launcher itself. ``direct_call_ok`` says when an eager call may call
  the launcher directly (no grad needed) or through a ``torch.autograd.Function``
  that saves the same tensors and runs the same backward launcher: not while
  compiling, not under a TorchDispatchMode or TorchFunctionMode (fake tensors,
  tracing, launch recording), not inside functorch transforms, forward-mode AD
  or torch.jit.trace, and only for plain tensors and parameters. Everywhere else
  the custom op runs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any

import torch
import torch.autograd.forward_ad as _forward_ad

from vitkernels.ops._dispatch import Backend, forced_backend

__all__ = ["DecisionCache", "direct_call_ok", "needs_grad"]

_PLAIN = (torch.Tensor, torch.nn.Parameter)
_UNCACHEABLE = object()


def _arg_key(x: Any) -> Hashable:
    """x tagged with its type all the way down (True is not 1, 1.0 is not 1, -0.0 is
    not 0.0); _UNCACHEABLE for anything but None, bool, int, float, str and
    tuples/lists of them."""
    kind = type(x)
    if x is None or kind in (bool, int, str):
        return (kind, x)
    if kind is float:
        return (kind, x.hex())
    if kind in (tuple, list):
        parts = tuple(_arg_key(e) for e in x)
        return _UNCACHEABLE if _UNCACHEABLE in parts else (kind, parts)
    return _UNCACHEABLE


def _tensor_key(t: Any) -> Hashable:
    """A plain tensor's (or parameter's) properties; _UNCACHEABLE for anything else
    (tensor subclasses such as fake tensors take the checked path every time)."""
    if t is None:
        return None
    if type(t) not in _PLAIN:
        return _UNCACHEABLE
    return (t.dtype, t.device, t.shape, t.stride(), t.requires_grad)


class DecisionCache:
    """Per-op memo: call signature -> (chosen backend, the checked non-tensor arguments).

    ``key`` answers None for a call that must take the checked path (compiling,
    an argument that cannot be keyed, an unknown backend name: its error comes
    from the checked path). At ``max_entries`` the memo starts over.
    """

    def __init__(self, op: str, backends: Sequence[Backend], max_entries: int = 1024) -> None:
        self.op = op
        self.requirements: tuple[Callable[[], str | None], ...] = tuple(
            dict.fromkeys(r for b in backends for r in b.requirements)
        )
        self.max_entries = max_entries
        self.entries: dict[Hashable, tuple[Backend, Any]] = {}

    def key(self, explicit: str | None, tensors: Iterable[Any], args: Iterable[Any]) -> Hashable | None:
        if torch.compiler.is_compiling():
            return None
        try:
            forced = forced_backend(explicit, self.op)
        except ValueError:
            return None
        parts: list[Hashable] = [
            forced,
            os.environ.get("TRITON_INTERPRET"),
            torch.is_grad_enabled(),
            torch.are_deterministic_algorithms_enabled(),
            tuple(r() for r in self.requirements),
        ]
        for t in tensors:
            parts.append(_tensor_key(t))
        for a in args:
            parts.append(_arg_key(a))
        if _UNCACHEABLE in parts:
            return None
        return tuple(parts)

    def get(self, key: Hashable | None) -> tuple[Backend, Any] | None:
        return None if key is None else self.entries.get(key)

    def put(self, key: Hashable | None, backend: Backend, checked: Any) -> None:
        if key is None:
            return
        if len(self.entries) >= self.max_entries:
            self.entries.clear()
        self.entries[key] = (backend, checked)

    def clear(self) -> None:
        self.entries.clear()


def direct_call_ok(tensors: Iterable[torch.Tensor | None]) -> bool:
    """Whether an eager call may run a kernel launcher without its custom op (see
    the module docstring)."""
    if (
        torch.compiler.is_compiling()
        or torch._C._len_torch_dispatch_stack() > 0
        or torch._C._is_torch_function_mode_enabled()
        or torch._C._functorch.peek_interpreter_stack() is not None
        or _forward_ad._current_level >= 0
        or torch._C._get_tracing_state() is not None  # torch.jit.trace records ops, not launches
    ):
        return False
    return all(t is None or type(t) in _PLAIN for t in tensors)


def needs_grad(tensors: Iterable[torch.Tensor | None]) -> bool:
    """Whether autograd records this call: grad mode on and an input requires grad."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
