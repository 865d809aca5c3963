"""``python -m vitkernels compare MODEL``: optimize a copy of a model, check that
its outputs agree with the original's, and time both.

MODEL is a name from ``vitkernels.models.list_models()``, ``timm:NAME`` (built
with ``timm.create_model(NAME, pretrained=False)``) or ``vit-pytorch:CLASS``
(``LeViT``, ``CvT``, ... or ``module.Class`` for any vit_pytorch module) with
its constructor arguments in ``--config '{"image_size": 224, ...}'``; for the
other two sources ``--config`` overrides constructor arguments. JSON lists become
tuples (vit-pytorch's PiT ``depth``, LeViT ``dim`` and ``heads`` must be tuples).

Exit status: 0 when the outputs agree, 1 when they do not (EXIT_DISAGREE), 2 for
bad arguments or a setup that cannot run the comparison (EXIT_USAGE: an unknown
model, a --config the constructor refuses, a device or forced backend this
machine lacks), reported in one ``error:`` line on stderr.

Agreement: float32/float64 outputs must match within a relative tolerance; in
float16/bfloat16 the optimized model's error against a float32 run of the
eager model must also be no worse than twice the eager model's own error.
Timing alternates eager and optimized calls (so a busy machine slows both
alike) and reports images/s from the median call.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import importlib.util
import inspect
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

import torch
from torch import nn

__all__ = [
    "EXIT_DISAGREE",
    "EXIT_USAGE",
    "Agreement",
    "build_model",
    "check_agreement",
    "compare_main",
    "ensure_torchvision_importable",
    "output_tensors",
    "time_models",
]

EXIT_DISAGREE = 1
EXIT_USAGE = 2

DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}

# max |optimized - eager| / max(1, max |eager|) accepted outright, per dtype
RELATIVE_TOLERANCE = {
    torch.float64: 1e-9,
    torch.float32: 1e-4,
    torch.float16: 1e-2,
    torch.bfloat16: 3e-2,
}

# vit-pytorch classes by the module that defines them (vit_pytorch/__init__ exports few)
VIT_PYTORCH_MODULES = {
    "ViT": "vit",
    "SimpleViT": "simple_vit",
    "DeepViT": "deepvit",
    "CaiT": "cait",
    "T2TViT": "t2t",
    "CrossViT": "cross_vit",
    "PiT": "pit",
    "LeViT": "levit",
    "CvT": "cvt",
    "DistillableViT": "distill",
}


def ensure_torchvision_importable() -> None:
    """Let ``import timm`` / ``import vit_pytorch`` work beside a mismatched torchvision.

    Call it before importing timm or vit_pytorch where torchvision does not match
    torch (the README's CPU environment: PyPI's torchvision is a CUDA build), where
    ``import timm`` otherwise fails with "operator torchvision::nms does not exist".
    Its compiled ops do not load there and its Python code then fails registering
    fakes for two of them; defining those two schemas (what the compiled library
    would) lets the pure Python parts, all that timm and vit-pytorch use, import.
    A torchvision that imports as it is (a matching build), or none, is left alone.
    """
    if importlib.util.find_spec("torchvision") is None:
        return
    try:
        import torchvision  # noqa: F401
    except RuntimeError as exc:
        if "torchvision::" not in str(exc):
            raise
    else:
        return
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]  # the failed import's half-initialised modules
    lib = torch.library.Library("torchvision", "FRAGMENT")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define(
        "qnms(Tensor dets, Tensor scores, float iou_threshold, float scale, int zero_point) -> Tensor"
    )
    _KEEP.append(lib)  # the schemas live as long as the Library object
    import torchvision  # noqa: F401, F811


_KEEP: list[object] = []


def _import(name: str, extra: str) -> Any:
    ensure_torchvision_importable()
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise ValueError(
            f"compare: {extra} models need the {name} package ({exc}); "
            "install the [compare] extra (see pyproject.toml)"
        ) from exc


def _default_image_size(name: str) -> int:
    return 240 if "crossvit" in name.lower() else 224


def _vit_pytorch_class(spec: str) -> type[nn.Module]:
    if "." in spec:
        module, cls = spec.rsplit(".", 1)
    elif spec in VIT_PYTORCH_MODULES:
        module, cls = VIT_PYTORCH_MODULES[spec], spec
    else:
        raise ValueError(
            f"compare: vit-pytorch class {spec!r} is not one of {', '.join(VIT_PYTORCH_MODULES)}; "
            "name another as vit-pytorch:module.Class (e.g. vit-pytorch:simple_vit.SimpleViT)"
        )
    _import("vit_pytorch", "vit-pytorch")
    if importlib.util.find_spec(f"vit_pytorch.{module}") is None:
        raise ValueError(
            f"compare: vit_pytorch has no module {module!r} (vit-pytorch:{spec}); expected "
            "vit-pytorch:module.Class with a module of the vit_pytorch package (e.g. simple_vit)"
        )
    mod = importlib.import_module(f"vit_pytorch.{module}")
    if not hasattr(mod, cls):
        raise ValueError(f"compare: vit_pytorch.{module} has no class {cls!r}")
    return getattr(mod, cls)


def json_to_args(value: Any) -> Any:
    """A parsed JSON value with every list (nested ones too) turned into a tuple, the
    type the model constructors expect for per-stage settings."""
    if isinstance(value, list):
        return tuple(json_to_args(v) for v in value)
    if isinstance(value, dict):
        return {k: json_to_args(v) for k, v in value.items()}
    return value


def build_model(
    spec: str, config: dict[str, Any] | None = None, image_size: int | None = None
) -> tuple[nn.Module, int]:
    """The eager model named by ``spec`` and the image size it takes.

    Args:
        spec: a registry name, ``timm:NAME`` or ``vit-pytorch:CLASS``.
        config: constructor keyword arguments (required for vit-pytorch); lists
            are passed as tuples.
        image_size: the input side; None takes the model's own (224, 240 for CrossViT).
    """
    config = json_to_args(dict(config or {}))
    if spec.startswith("timm:"):
        timm = _import("timm", "timm:")
        if not timm.is_model(spec[len("timm:") :]):
            raise ValueError(
                f"compare: timm has no model {spec[len('timm:') :]!r} "
                "(timm.list_models('pattern*') lists them)"
            )
        if image_size is not None:
            config.setdefault("img_size", image_size)
        model = timm.create_model(spec[len("timm:") :], pretrained=False, **config)
        side = image_size or int(model.pretrained_cfg.get("input_size", (3, 224, 224))[-1])
        return model, side
    if spec.startswith("vit-pytorch:"):
        cls = _vit_pytorch_class(spec[len("vit-pytorch:") :])
        params = inspect.signature(cls).parameters
        if image_size is not None and "image_size" in params:
            config.setdefault("image_size", image_size)
        required = [
            n
            for n, p in params.items()
            if p.default is inspect.Parameter.empty
            and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
            and n not in config
        ]
        if required:
            raise ValueError(
                f"compare: {spec} needs --config with {', '.join(required)} "
                f"(as JSON, e.g. --config '{{\"{required[0]}\": ...}}')"
            )
        side = image_size or int(config.get("image_size", _default_image_size(cls.__name__)))
        return cls(**config), side
    from vitkernels import models

    if spec not in models.list_models():
        raise ValueError(
            f"compare: unknown model {spec!r}; expected a name from vitkernels.models "
            f"({', '.join(models.list_models())}), timm:NAME or vit-pytorch:CLASS"
        )
    if image_size is not None and not {"image_size", "img_size"} & set(config):
        # vit-pytorch-layout families take image_size, official layouts img_size, CvT neither
        for key in ("image_size", "img_size"):
            try:
                return models.create(spec, **{key: image_size}, **config), image_size
            except TypeError as exc:
                if key not in str(exc):
                    raise
    side = config.get("image_size", config.get("img_size", image_size))
    return models.create(spec, **config), side or _default_image_size(spec)


def output_tensors(out: Any) -> list[torch.Tensor]:
    """Every tensor in a model's output (a tensor, or tuples/lists/dicts of them)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in output_tensors(o)]
    return []


def _max_abs_diff(a: Any, b: Any) -> float:
    ta, tb = output_tensors(a), output_tensors(b)
    if len(ta) != len(tb) or any(x.shape != y.shape for x, y in zip(ta, tb, strict=True)):
        raise ValueError(
            "compare: the optimized model returns outputs of other shapes "
            f"({[tuple(t.shape) for t in tb]}) than the eager one ({[tuple(t.shape) for t in ta]})"
        )
    return max(
        (
            (x.double() - y.double()).abs().nan_to_num(float("inf")).max().item()
            for x, y in zip(ta, tb, strict=True)
        ),
        default=0.0,
    )


class Agreement:
    """How far the optimized model's outputs are from the eager model's."""

    def __init__(
        self,
        max_error: float,
        tolerance: float,
        eager_error_fp32: float | None = None,
        optimized_error_fp32: float | None = None,
    ) -> None:
        self.max_error = max_error
        self.tolerance = tolerance
        self.eager_error_fp32 = eager_error_fp32
        self.optimized_error_fp32 = optimized_error_fp32

    @property
    def ok(self) -> bool:
        if self.max_error <= self.tolerance:
            return True
        if self.eager_error_fp32 is None or self.optimized_error_fp32 is None:
            return False
        return self.optimized_error_fp32 <= 2 * self.eager_error_fp32 + self.tolerance

    def describe(self) -> str:
        verdict = "agree" if self.ok else "DISAGREE"
        text = f"{self.max_error:.3g} (tolerance {self.tolerance:.3g}): {verdict}"
        if self.eager_error_fp32 is not None:
            text += (
                f"; error vs float32: eager {self.eager_error_fp32:.3g}, "
                f"optimized {self.optimized_error_fp32:.3g}"
            )
        return text


@torch.inference_mode()
def check_agreement(eager: nn.Module, optimized: nn.Module, x: torch.Tensor) -> Agreement:
    """Run both models on ``x`` and measure the difference (see the module docstring)."""
    y_eager, y_opt = eager(x), optimized(x)
    scale = max((t.double().abs().max().item() for t in output_tensors(y_eager)), default=1.0)
    tol = RELATIVE_TOLERANCE[x.dtype] * max(1.0, scale)
    err = _max_abs_diff(y_eager, y_opt)
    if x.dtype not in (torch.float16, torch.bfloat16):
        return Agreement(err, tol)
    y32 = copy.deepcopy(eager).float()(x.float())
    return Agreement(err, tol, _max_abs_diff(y32, y_eager), _max_abs_diff(y32, y_opt))


class Progress:
    """One self-overwriting line on a terminal: ``label [#####.....] 5/10``. On a stream
    that is not a terminal (a log file, CI), whole lines at 0, 25, 50, 75 and 100%
    instead of carriage returns."""

    def __init__(
        self, label: str, total: int, stream: TextIO | None = None, width: int = 30, tty: bool | None = None
    ):  # fmt: skip
        self.label, self.total, self.width = label, total, width
        self.stream = stream if stream is not None else sys.stderr
        if tty is None:
            isatty = getattr(self.stream, "isatty", None)
            tty = bool(isatty()) if callable(isatty) else False
        self.tty = tty
        self.done = 0
        self._quarter = -1  # the last quarter written as a line (not a terminal)
        self._draw()

    def _draw(self) -> None:
        filled = self.width * self.done // max(self.total, 1)
        bar = "#" * filled + "." * (self.width - filled)
        if self.tty:
            end = "\n" if self.done >= self.total else ""
            self.stream.write(f"\r{self.label} [{bar}] {self.done}/{self.total}{end}")
        else:
            quarter = 4 * self.done // max(self.total, 1)
            if quarter == self._quarter:
                return
            self._quarter = quarter
            self.stream.write(f"{self.label} [{bar}] {self.done}/{self.total}\n")
        self.stream.flush()

    def step(self) -> None:
        self.done += 1
        self._draw()


def time_models(
    fns: dict[str, Callable[[], object]],
    *,
    device: torch.device,
    warmup: int,
    iters: int,
    stream: TextIO | None = None,
) -> dict[str, float]:
    """Median seconds per call of each function, calls interleaved, with a progress line."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in fns}
    bar = Progress(f"timing {' vs '.join(fns)}", warmup + iters, stream)
    for i in range(warmup + iters):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
        bar.step()
    return {name: statistics.median(ts) for name, ts in times.items()}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m vitkernels compare",
        description="Optimize a copy of MODEL, check its outputs against the original, time both.",
    )
    p.add_argument("model", help="registry name, timm:NAME or vit-pytorch:CLASS")
    p.add_argument("--config", default=None, help="constructor arguments as a JSON object")
    p.add_argument("--batch", type=int, default=8, help="images per call (default 8)")
    p.add_argument("--image-size", type=int, default=None, help="input side (default: the model's)")
    p.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default=None,
        help="default: bfloat16 on CUDA, float32 on CPU",
    )
    p.add_argument(
        "--backend",
        choices=["auto", "reference", "torch", "triton", "cuda"],
        default="auto",
        help="force the fused modules onto one backend (default: automatic)",
    )
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--ops", default=None, help="comma-separated subset of the ops to replace")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per model (default 3)")
    p.add_argument("--iters", type=int, default=30, help="timed calls per model (default 30)")
    p.add_argument("--seed", type=int, default=0, help="seed for weights and inputs")
    return p


def _positive(name: str, value: int, minimum: int = 1) -> None:
    if value < minimum:
        raise _UsageError(f"compare: {name} must be at least {minimum}, got {value}")


def wake_zero_init_norms(model: nn.Module) -> int:
    """Set to one the norm weights an untrained model starts at zero; returns how many.

    LeViT (vit-pytorch, this repo, timm) initialises the BatchNorm after each
    attention's projection to zero, so at initialisation attention contributes
    nothing to the output and comparing outputs would check nothing.
    """
    norms = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)
    woken = 0
    with torch.no_grad():
        for m in model.modules():
            w = getattr(m, "weight", None)
            if isinstance(m, norms) and w is not None and not w.any():
                w.fill_(1.0)
                woken += 1
    return woken


class _UsageError(Exception):
    """Bad arguments, or a setup that cannot run the comparison: one line, EXIT_USAGE."""


def _device(arg: str | None) -> torch.device:
    """The --device argument as a device this machine can compute and time on."""
    try:
        device = torch.device(arg or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as exc:
        raise _UsageError(f"compare: --device {arg!r} is not a device ({exc})") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise _UsageError(f"compare: --device {arg} asked for, but CUDA is not available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise _UsageError(
                f"compare: --device {arg}: this machine has {torch.cuda.device_count()} CUDA "
                f"device(s); expected cuda:0 to cuda:{torch.cuda.device_count() - 1}"
            )
    elif device.type == "meta":
        raise _UsageError(
            "compare: --device meta holds shapes but no values, so outputs cannot be compared "
            "or timed; expected cpu or cuda"
        )
    elif device.type != "cpu":
        raise _UsageError(f"compare: --device {arg} is not supported; expected cpu or cuda")
    return device


def _config(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _UsageError(f"compare: --config is not valid JSON ({exc}): {text!r}") from exc
    if not isinstance(config, dict):
        raise _UsageError(f"compare: --config must be a JSON object, got {text!r}")
    return config


def _ops(text: str | None, known: Sequence[str]) -> tuple[str, ...]:
    if text is None:
        return tuple(known)
    ops = tuple(o.strip() for o in text.split(",") if o.strip())
    if not ops:
        raise _UsageError(
            f"compare: --ops {text!r} names no op; expected a comma-separated subset of "
            f"{', '.join(known)}"
        )
    unknown = sorted(set(ops) - set(known))
    if unknown:
        raise _UsageError(
            f"compare: --ops {text!r} names {', '.join(unknown)}; "
            f"expected a comma-separated subset of {', '.join(known)}"
        )
    return ops


def _backend_setup(backend: str | None, device: torch.device) -> None:
    """A forced backend this machine cannot run at all, said before building anything."""
    from vitkernels.ops._dispatch import triton_import_error, triton_interpret

    if backend == "cuda":
        from vitkernels import cuda

        reason = cuda.unavailable_reason()
        if reason is not None:
            raise _UsageError(f"compare: --backend cuda cannot run here: {reason}")
        if device.type != "cuda":
            raise _UsageError(f"compare: --backend cuda needs --device cuda; got {device}")
    if backend == "triton":
        err = triton_import_error()
        if err is not None:
            raise _UsageError(f"compare: --backend triton cannot run here: {err}")
        if device.type == "cpu" and not triton_interpret():
            raise _UsageError(
                "compare: --backend triton on CPU runs the kernels in the Triton interpreter: "
                "set TRITON_INTERPRET=1 (slow; meant for tests), or use --device cuda"
            )


def _build(args: argparse.Namespace, config: dict[str, Any]) -> tuple[nn.Module, int]:
    try:
        return build_model(args.model, config, args.image_size)
    except (TypeError, ValueError, AssertionError) as exc:
        if str(exc).startswith("compare: "):  # build_model's own: the model is not found
            raise _UsageError(str(exc)) from exc
        raise _UsageError(  # the constructor refuses the arguments
            f"compare: {args.model} with --config {json.dumps(config)}"
            + (f" and --image-size {args.image_size}" if args.image_size else "")
            + f": {type(exc).__name__}: {exc}"
        ) from exc


def compare_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m vitkernels compare``; returns the exit status
    (0: outputs agree, EXIT_DISAGREE: they do not, EXIT_USAGE: bad arguments or setup)."""
    args = _parser().parse_args(argv)
    try:
        return _compare(args)
    except _UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _compare(args: argparse.Namespace) -> int:
    import vitkernels
    from vitkernels.replace import DEFAULT_OPS

    _positive("--batch", args.batch)
    _positive("--iters", args.iters)
    _positive("--warmup", args.warmup, 0)
    config = _config(args.config)
    device = _device(args.device)
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    ops = _ops(args.ops, DEFAULT_OPS)
    backend = None if args.backend == "auto" else args.backend
    _backend_setup(backend, device)
    torch.manual_seed(args.seed)
    eager, side = _build(args, config)
    woken = wake_zero_init_norms(eager)
    eager = eager.to(device=device, dtype=dtype).eval()
    optimized = copy.deepcopy(eager)
    report = vitkernels.optimize(optimized, backend=backend, ops=ops)
    x = torch.randn(args.batch, 3, side, side, device=device, dtype=dtype)

    print(
        f"vitkernels compare: {args.model}  batch {args.batch}  image {side}x{side}  "
        f"{str(dtype).removeprefix('torch.')}  {device}  backend {args.backend}"
    )
    print(report)
    if woken:
        print(f"  ({woken} zero-initialised norm weights set to one so every branch counts)")
    try:
        with torch.inference_mode():
            eager(x)
    except (RuntimeError, ValueError, TypeError, AssertionError) as exc:
        raise _UsageError(
            f"compare: the eager model itself fails on a {tuple(x.shape)} "
            f"{str(dtype).removeprefix('torch.')} input on {device} (check --image-size, "
            f"--dtype, --config): {type(exc).__name__}: {exc}"
        ) from exc
    try:
        agreement = check_agreement(eager, optimized, x)
    except vitkernels.BackendNotSupportedError as exc:
        where = f"--backend {args.backend}" if backend else "automatic dispatch"
        raise _UsageError(f"compare: {where} cannot run this model here: {exc}") from exc
    with torch.inference_mode():
        median = time_models(
            {"eager": lambda: eager(x), "optimized": lambda: optimized(x)},
            device=device,
            warmup=args.warmup,
            iters=args.iters,
        )
    per_op = ", ".join(f"{op} {report.count(op)}" for op in DEFAULT_OPS if report.count(op))
    eager_ips, opt_ips = args.batch / median["eager"], args.batch / median["optimized"]
    rows = [
        ("replaced modules", f"{report.count()}" + (f" ({per_op})" if per_op else "")),
        ("left modules", str(len(report.left))),
        ("max |optimized - eager|", agreement.describe()),
        ("eager", f"{eager_ips:,.1f} images/s"),
        ("optimized", f"{opt_ips:,.1f} images/s"),
        ("speed-up", f"{opt_ips / eager_ips:.2f}x"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"  {k:<{width}}  {v}" for k, v in rows))
    return 0 if agreement.ok else EXIT_DISAGREE
