"""Command line: ``python -m vitkernels info | compare | build | estimate``.

Exit status 2 means bad arguments (an unknown command or option) or a setup that
cannot do what was asked, said in one ``error:`` line on stderr.
"""

from __future__ import annotations

import argparse
import importlib
import platform
import sys


def _versions() -> list[tuple[str, str]]:
    import torch

    rows = [
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("torch CUDA", torch.version.cuda or "none (CPU build)"),
    ]
    try:
        import triton

        rows.append(("triton", triton.__version__))
    except Exception as exc:  # pragma: no cover - depends on the machine
        rows.append(("triton", f"not importable ({type(exc).__name__})"))
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            rows.append(
                (f"GPU {i}", f"{p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB")
            )
    else:
        rows.append(("GPU", "none visible to torch"))
    from vitkernels import cuda

    reason = cuda.unavailable_reason()
    rows.append(("CUDA extension", "built and loaded" if reason is None else f"no: {reason}"))
    return rows


def _typical_calls(device: str, dtype):
    """(op, description, which_backend, args, kwargs) for a typical input of each op."""
    import torch

    from vitkernels.ops import head_mixing, patch_embed, performer, relpos

    def t(*shape):
        return torch.randn(*shape, device=device, dtype=dtype)

    return [
        (
            "relpos_attention",
            "LeViT-256 stage 1 (B2, H4, N196, Dk32, Dv64)",
            relpos.which_backend,
            (t(2, 4, 196, 32), t(2, 4, 196, 32), t(2, 4, 196, 64), t(4, 196)),
            {"fmap_size": 14},
        ),
        (
            "performer_attention",
            "T2T-ViT layer 1 (B2, T3136, E64, M32)",
            performer.which_backend,
            (t(2, 3136, 64), t(2, 3136, 64), t(2, 3136, 64), t(32, 64)),
            {},
        ),
        (
            "patch_embed",
            "ViT-B/16 patchify (B2, 3x224x224 -> 197x768)",
            patch_embed.which_backend,
            (t(2, 3, 224, 224), t(768, 3, 16, 16), t(768)),
            {"kernel_size": 16, "cls_token": t(1, 1, 768), "pos_embed": t(1, 197, 768)},
        ),
        (
            "head_mixing_attention",
            "CaiT-XXS24 talking heads (B2, H4, N196, D48)",
            head_mixing.which_backend,
            (t(2, 4, 196, 48), t(2, 4, 196, 48), t(2, 4, 196, 48)),
            {"pre": (t(4, 4), t(4)), "post": (t(4, 4), t(4))},
        ),
    ]


def _backend_rows() -> list[tuple[str, str]]:
    """For each op, the backend that would run a typical input here, and why others refuse."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    rows = [("", f"backend per op for a typical {str(dtype).removeprefix('torch.')} input on {device}:")]
    for op, desc, which_backend, args, kwargs in _typical_calls(device, dtype):
        chosen, verdicts = which_backend(*args, **kwargs)
        rows.append((op, f"{desc}: {chosen or 'no backend fits'}"))
        for name, reasons in verdicts:
            if reasons and reasons[0].startswith("passed over: "):
                rows.append(("", f"  {name}: " + "; ".join(reasons)))
            elif reasons:
                rows.append(("", f"  {name} refuses: " + "; ".join(reasons)))
    return rows


def _evidence_rows() -> list[tuple[str, str]]:
    """Per op: whether automatic dispatch may take the cuda backend before triton on
    this GPU's architecture (sm_90, the estimate's, without a GPU), and why."""
    import torch

    from vitkernels import evidence

    if torch.cuda.is_available():
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    else:
        caps = [(9, 0)]
    rows = [("", f"cuda before triton? (speed evidence from {evidence.origin()}):")]
    for op in ("relpos_attention", "performer_attention", "patch_embed"):
        for major, minor in caps:
            for which in ("fwd", "fwd+bwd"):
                v = evidence.verdict(op, "cuda", "triton", (major, minor), which)
                rows.append((op, f"sm_{major}{minor} {which}: {'taken' if v.take else 'passed over'}: {v.why}"))
    return rows


def info_main(argv: list[str]) -> int:
    argparse.ArgumentParser(prog="python -m vitkernels info").parse_args(argv)
    rows = _versions() + [("", "")] + _backend_rows() + [("", "")] + _evidence_rows()
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}" if key or value else "")
    return 0


COMMANDS = {
    "info": ("vitkernels.__main__", "info_main", "versions, GPU, extension, backend per op"),
    "compare": ("vitkernels.compare", "compare_main", "eager vs optimized model: error, speed"),
    "build": ("vitkernels.cuda", "build_main", "JIT-build the CUDA extension"),
    "estimate": (
        "vitkernels.estimate.run",
        "estimate_main",
        "compiler-based speed estimate (sm_90a, no GPU)",
    ),
}


def _usage() -> str:
    lines = [f"usage: python -m vitkernels {{{','.join(COMMANDS)}}} [options]", ""]
    lines += [f"  {name:<8} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += ["", "`python -m vitkernels COMMAND --help` describes a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv and argv[0] == "--version":
        from vitkernels import __version__

        print(f"vitkernels {__version__}")
        return 0
    if not argv or argv[0] not in COMMANDS:
        what = f"unknown command {argv[0]!r}" if argv else "no command given"
        print(f"error: {what}; expected one of {', '.join(COMMANDS)}\n\n{_usage()}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[argv[0]]
    return getattr(importlib.import_module(module), func)(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
