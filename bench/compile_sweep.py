"""Compile the Triton kernels for a GPU this machine does not have, at a broad grid of
shapes the workloads do not have (tiny grids, odd sizes, small batches, every dtype,
misaligned inputs), to find launches that the Triton interpreter runs but a real
compile rejects (a dot with K < 16, a layout the backend cannot lower), that spill
registers, or that ask for more shared memory than a block may have (sm_90a 227 KB,
sm_80 163 KB). No GPU needed:

    TRITON_CACHE_DIR=/tmp/tc-$USER .venv/bin/python bench/compile_sweep.py            # quick grid, triton installed, sm_90a + sm_80
    .venv/bin/python bench/compile_sweep.py --grid full                                # the larger grid
    .venv/bin/python bench/compile_sweep.py --triton36 /tmp/vk-triton36                # also triton 3.6 (the GPU machine's), sm_90a
    .venv/bin/python bench/compile_sweep.py --op relpos --arch 90 --jobs 2 --json out.json

How: each op's launchers are called on meta tensors inside ``_common.recording()``
(``_aot.record_workload`` / each module's ``record_calls``; relpos's non-square grids
call its launchers directly the same way), so every launch is recorded with Triton's
own specialisation for that arch; the distinct launches (one per specialisation) are
compiled with ``_aot.compile_launch`` in ``--jobs`` worker processes (each re-records
only the configurations its launches come from), and ``_aot.resources`` reads
registers and spills from the cubin. A progress line is printed per compile; at the end
a table of record errors (the launcher raised on a shape the op takes), compile
failures, spills and over-limit shared memory, each with the shapes that launch it.
``--triton36 DIR`` runs the same sweep again in a subprocess with
PYTHONPATH=DIR:<repo> for sm_90a (``--triton36-arch`` to change). TRITON_INTERPRET and
TRITON_DEFAULT_FP_FUSION are removed from the environment (a user's launch has
Triton's default fusion). Exit status 1 if anything was found.

Shapes (quick / full): relpos grids 1x1..5x5, 7x7, 9x9, 14x14 and non-square ones,
q strides 1/2/3, Dk/Dv 8..128, batch 1, 2, 3, 7, 64, 256 (the dQ kernel's bias-tile
chunk and the forward's batch groups depend on it), float16/bfloat16/float32, aligned
and unaligned inputs; patch_embed small images in every layout (NCHW, channels-last,
token views), "cpq"/"pqc" callers, the pixel-pair path (2-byte NCHW, 5-8 column
windows with even starts), odd and even widths, input/output norms, class token and
positions, all four directions (inference and saving forward, backward after it and
recomputing); performer T 1..17 with small E/M and each w dtype / trainable w; head
mixing H 1..4 (5..16 are refused by the kernels and counted), Nq/Nk 1..7, 49, 196,
197, D 8..64 with each mixing option. The full grid is the quick one with more values
on each axis.

Cost: recording every configuration is cheap (~1 min per arch for ~2600 quick
configurations), but they make ~5800 distinct launches per arch (quick; ~4x that full),
at 1.5-5 s a compile. So ``--budget`` compiles at most N per op and arch, taken
round-robin over strata (kernel x a coarse class of shape: relpos grid size, square,
stride, dtype, variant; patch_embed pixel-pair path, kernel size, norms, dtype,
layout; ...), each in a fixed pseudo-random order, so a run covers every kernel and
class before it repeats any and a rerun compiles the same launches (the Triton cache
makes it fast). Quick (60: 480 compiles for two archs) took ~20 min on 2 shared cores,
full (150: 1200) ~2.5x that; ``--budget 0`` compiles everything (hours).
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}  # bytes of shared memory per block
OPS = ("relpos", "patch_embed", "performer", "head_mixing")

# ----------------------------------------------------------------------------
# the grid: a configuration is a plain tuple (op, label, params); its recording is a
# deterministic function of it, so a worker can redo exactly the main process's


def _relpos_grid(full: bool) -> list[tuple]:
    """(op, label, (rows, cols, stride, heads, dk, dv, batch, dtype, variant))."""
    grids = [(1, 1), (2, 2), (3, 3), (4, 4), (5, 5), (7, 7), (9, 9), (14, 14), (1, 7), (3, 5), (7, 4), (2, 9)]
    if full:
        grids += [(6, 6), (8, 8), (10, 10), (11, 11), (13, 13), (16, 16), (28, 28), (5, 14), (14, 3), (1, 16)]
    dims = [(8, 8), (16, 32), (32, 64), (64, 64), (128, 128), (8, 128), (128, 16)]
    if full:
        dims += [(24, 40), (48, 96), (32, 128), (16, 16), (96, 24), (64, 128)]
    batches = [1, 2, 3, 7, 64, 256]
    out = []

    def add(r, c, s, h, dk, dv, b, dt, var):
        out.append(("relpos", f"relpos {r}x{c} S{s} H{h} Dk{dk} Dv{dv} B{b} {dt} {var}", (r, c, s, h, dk, dv, b, dt, var)))

    for (r, c), s in itertools.product(grids, (1, 2, 3)):
        if s > 1 and max(r, c) < s:
            continue
        # every head size at bf16 aligned, batch 64; the batch axis at two sizes; dtypes
        # and the misaligned variant at the LeViT-like size
        for dk, dv in dims:
            add(r, c, s, 4, dk, dv, 64, "bf16", "aligned")
        for b in batches:
            if b != 64:
                add(r, c, s, 4, 32, 64, b, "bf16", "aligned")
                if full:
                    add(r, c, s, 4, 16, 32, b, "bf16", "aligned")
                    add(r, c, s, 4, 32, 64, b, "bf16", "unaligned")
        for dt in ("f16", "f32"):
            add(r, c, s, 4, 32, 64, 64, dt, "aligned")
            add(r, c, s, 4, 32, 64, 3, dt, "aligned")
        for dk, dv in (dims if full else [(32, 64), (8, 8), (128, 128)]):
            add(r, c, s, 4, dk, dv, 64, "bf16", "unaligned")
        add(r, c, s, 4, 32, 64, 7, "f32", "unaligned")
        for h in (1, 3) if full else (1,):
            add(r, c, s, h, 32, 64, 1, "bf16", "aligned")
            add(r, c, s, h, 16, 32, 2, "f16", "aligned")
    return out


def _patch_embed_grid(full: bool) -> list[tuple]:
    """(op, label, (channels, image, kernel, stride, padding, dim, order, in_norm,
    out_norm, pos, prefix, layout, dtype, variant)); pos: 0, "L" or "P+L"."""
    # (C, image, k, s, p): the pixel-pair path's 7/4/2, 5/2/2, 6/2/0, 8/4/2, 8/8/0 style
    # windows on even widths and the same on odd ones; strides 1; ViT-style
    # non-overlapping patches; 1-channel and 64-channel token maps
    geoms = [
        (3, 16, 7, 4, 2), (3, 17, 7, 4, 2), (3, 12, 5, 2, 2), (3, 13, 5, 2, 2), (3, 14, 6, 2, 0), (3, 16, 8, 4, 2),
        (3, 16, 8, 8, 0), (1, 10, 7, 2, 2), (4, 9, 3, 1, 1), (3, 8, 2, 2, 0), (3, 7, 3, 2, 1), (8, 6, 3, 2, 1),
        (3, 32, 16, 16, 0), (64, 7, 3, 2, 1), (2, 11, 6, 4, 2), (3, 5, 5, 1, 0), (3, 6, 1, 1, 0), (1, 1, 3, 1, 1),
    ]
    if full:
        geoms += [(3, 20, 7, 4, 2), (3, 15, 8, 2, 2), (1, 9, 5, 2, 0), (3, 10, 6, 2, 2), (4, 12, 7, 2, 2),
                  (3, 12, 4, 4, 0), (16, 8, 3, 1, 1), (3, 24, 8, 8, 0), (5, 11, 5, 3, 2)]  # fmt: skip
    dims = [8, 16, 48, 96, 192, 384] if full else [16, 48, 192]
    norms = [(False, False), (True, False), (False, True), (True, True)]
    extras = [(0, 0), ("L", 0), ("P+L", 1), (0, 1)]
    out = []

    def add(g, d, order, inn, outn, pos, pre, layout, dt, var):
        c, img, k, s, p = g
        label = (f"patch_embed C{c} {img}px k{k} s{s} p{p} D{d} {order} in{int(inn)} out{int(outn)} pos{pos} "
                 f"cls{pre} {layout} {dt} {var}")  # fmt: skip
        out.append(("patch_embed", label, (c, img, k, s, p, d, order, inn, outn, pos, pre, layout, dt, var)))

    for g in geoms:
        layouts = ["nchw", "channels_last"] + (["tokens"] if g[0] > 1 else [])
        for d, (inn, outn) in itertools.product(dims, norms):
            add(g, d, "cpq", inn, outn, 0, 0, "nchw", "bf16", "aligned")
        for (pos, pre), (inn, outn) in itertools.product(extras, norms if full else [(True, False), (False, True)]):
            add(g, 48, "cpq", inn, outn, pos, pre, "nchw", "bf16", "aligned")
        for layout, order in itertools.product(layouts, ("cpq", "pqc")):
            for inn, outn in norms if full else [(True, True), (False, False)]:
                add(g, 48, order, inn, outn, "P+L", 1, layout, "bf16", "aligned")
        for dt, var in (("f16", "aligned"), ("f32", "aligned"), ("bf16", "unaligned"), ("f16", "unaligned")):
            for inn, outn in norms if full else [(True, False), (True, True)]:
                add(g, 48, "cpq", inn, outn, 0, 0, "nchw", dt, var)
                if full:
                    add(g, 192, "pqc", inn, outn, "L", 0, "nchw", dt, var)
    return out


def _performer_grid(full: bool) -> list[tuple]:
    """(op, label, (T, E, M, batch, dtype, w_dtype, w_grad, variant))."""
    tokens = list(range(1, 18)) if full else [1, 2, 3, 5, 7, 8, 9, 15, 16, 17]
    em = [(8, 8), (16, 4), (64, 32), (24, 16), (32, 1)] + ([(8, 32), (48, 8), (16, 16), (64, 1), (1, 1)] if full else [])
    out = []

    def add(t, e, m, b, dt, wdt, wg, var):
        label = f"performer T{t} E{e} M{m} B{b} {dt} w{wdt}{' w_grad' if wg else ''} {var}"
        out.append(("performer", label, (t, e, m, b, dt, wdt, wg, var)))

    for t, (e, m) in itertools.product(tokens, em):
        for dt, wdt in (("bf16", "f32"), ("f16", "f16"), ("f32", "f32")):
            add(t, e, m, 2, dt, wdt, False, "aligned")
        add(t, e, m, 1, "bf16", "f32", True, "aligned")
        add(t, e, m, 3, "f16", "f32", False, "unaligned")
        if full:
            add(t, e, m, 7, "bf16", "bf16", False, "aligned")
            add(t, e, m, 64, "f32", "f32", True, "unaligned")
    return out


def _head_mixing_grid(full: bool) -> list[tuple]:
    """(op, label, (heads, nq, nk, d, layout, pre, post, bias, norm, batch, dtype, param_dtype))."""
    mixings = [
        ("vit-pytorch", True, True, False, False),  # talking heads (CaiT, this repo)
        ("vit-pytorch", True, False, False, False),
        ("vit-pytorch", False, True, False, False),
        ("timm", True, True, True, False),  # talking heads with biases (timm's CaiT)
        ("timm", False, True, True, False),
        ("vit-pytorch", False, True, False, True),  # re-attention (DeepViT)
    ]
    if full:
        mixings += [("timm", True, True, False, False), ("timm", True, False, True, False)]
    heads = list(range(1, 17)) if full else [1, 2, 3, 4, 5, 8, 16]
    ns = [1, 2, 3, 5, 7, 49, 196, 197] + ([4, 6] if full else [])
    ds = [8, 16, 24, 32, 40, 48, 56, 64] if full else [8, 16, 24, 48, 64]
    out = []

    def add(h, nq, nk, d, mix, b, dt, pdt):
        layout, pre, post, bias, norm = mix
        label = (f"head_mixing H{h} Nq{nq} Nk{nk} D{d} {layout} pre{int(pre)} post{int(post)} bias{int(bias)} "
                 f"norm{int(norm)} B{b} {dt} p{pdt}")  # fmt: skip
        out.append(("head_mixing", label, (h, nq, nk, d, layout, pre, post, bias, norm, b, dt, pdt)))

    for mix in mixings:
        layout, _, _, _, norm = mix
        # re-attention (one qkv chunk) and timm's qkv have the keys' rows for q: Nq <= Nk
        pairs = [(n, n) for n in ns] + [(1, n) for n in ns if n > 1]
        if not norm:
            pairs += [(nq, nk) for nq, nk in itertools.product(ns, ns) if nq != nk and nq > 1 and (full or nk in (7, 197))]
        if norm or layout == "timm":
            pairs = [(nq, nk) for nq, nk in pairs if nq <= nk]
        for (nq, nk), d in itertools.product(pairs, ds):
            add(4, nq, nk, d, mix, 2, "bf16", "bf16")
        for h in heads:
            for nq, nk in ((7, 7), (1, 197), (196, 196)):
                add(h, nq if not norm else nk, nk, 48, mix, 2, "bf16", "bf16")
        for nq, nk in ((1, 1), (3, 7), (49, 49), (197, 197), (1, 196)):
            if norm:
                nq = nk
            if layout == "timm" and nq > nk:
                continue
            for d in ds if full else (8, 48, 64):
                add(2, nq, nk, d, mix, 3, "f16", "f32")
                add(4, nq, nk, d, mix, 1, "f32", "f32")
                add(3, nq, nk, d, mix, 7, "f16", "f16")
    return out


def configurations(grid: str, ops: tuple[str, ...] = OPS) -> list[tuple]:
    full = grid == "full"
    makers = {"relpos": _relpos_grid, "patch_embed": _patch_embed_grid, "performer": _performer_grid,
              "head_mixing": _head_mixing_grid}  # fmt: skip
    seen, out = set(), []
    for op in ops:
        for cfg in makers[op](full):
            if cfg[2] not in seen:
                seen.add(cfg[2])
                out.append(cfg)
    return out


DIRECTIONS = {"relpos": ("fwd", "bwd"), "performer": ("fwd", "bwd"), "head_mixing": ("fwd", "bwd"),
              "patch_embed": ("fwd", "fwd_saving", "bwd", "bwd_recompute")}  # fmt: skip


def _dtype(name: str):
    import torch

    return {"f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32}[name]


def record(cfg: tuple, direction: str, arch: int):
    """The Recording of one direction of one configuration; a string: the kernels
    refuse the shape (head mixing outside their envelope)."""
    from vitkernels.triton._aot import record_workload, tensor_factory
    from vitkernels.triton._common import recording
    from vitkernels.workloads import HeadMixingShape, PatchEmbedShape, PerformerShape

    op, _, p = cfg
    if op == "relpos":
        from vitkernels.triton.relpos import record_grid

        R, C, S, H, DK, DV, B, dt, var = p
        with recording(arch) as rec:
            record_grid(R, C, S, H, DK, DV, B, _dtype(dt), direction, tensor_factory(var))
        return rec
    if op == "patch_embed":
        c, img, k, s, pad, d, order, inn, outn, pos, pre, layout, dt, var = p
        side = (img + 2 * pad - k) // s + 1
        rows = {0: 0, "L": side * side, "P+L": pre + side * side}[pos]
        shape = PatchEmbedShape(c, img, k, s, pad, d, order, inn, outn, rows, pre, layout)
        return record_workload(shape, direction, _dtype(dt), batch=2, variant=var, arch=arch)
    if op == "performer":
        t, e, m, b, dt, wdt, wg, var = p
        return record_workload(PerformerShape(t, e, m), direction, _dtype(dt), batch=b, variant=var, arch=arch,
                               w_dtype=_dtype(wdt), w_grad=wg)  # fmt: skip
    h, nq, nk, d, layout, pre, post, bias, norm, b, dt, pdt = p
    shape = HeadMixingShape(h, nq, nk, d, layout, pre, post, bias, norm)
    from vitkernels.triton.head_mixing import refusal

    why = refusal(shape)
    if why is not None:
        return why
    return record_workload(shape, direction, _dtype(dt), batch=b, arch=arch, param_dtype=_dtype(pdt))


# ----------------------------------------------------------------------------
# one sweep (one triton): record, deduplicate, compile in workers


def _env() -> dict[str, str]:
    from vitkernels.triton._aot import compile_env

    return compile_env()


def plan(
    grid: str, ops: tuple[str, ...], archs: list[int], budget: int = 0, kernels: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Record every configuration for every arch: the distinct launches (arch, config
    index, direction, launch index, name, cases; only kernels whose name contains one
    of ``kernels`` if given; at most budget per op and arch, see ``_sample``), the
    refusals and record errors."""
    cfgs = configurations(grid, ops)
    launches, refused, errors, distinct = [], collections.Counter(), [], {}
    t0 = time.time()
    for arch in archs:
        by_key: dict[str, dict] = {}
        for i, cfg in enumerate(cfgs):
            for direction in DIRECTIONS[cfg[0]]:
                try:
                    rec = record(cfg, direction, arch)
                except Exception as exc:  # a launcher that raises on a shape the op takes
                    errors.append({"arch": arch, "case": f"{cfg[1]} {direction}", "error": f"{type(exc).__name__}: {exc}"})
                    continue
                if isinstance(rec, str):
                    refused[f"{cfg[0]}: {rec}"] += 1
                    continue
                for j, la in enumerate(rec.launches):
                    key = la.specialization.key() + repr(la.kernel)
                    if key in by_key:
                        by_key[key]["cases"].append(f"{cfg[1]} {direction}")
                    else:
                        by_key[key] = {"arch": arch, "cfg": i, "direction": direction, "index": j, "name": la.name,
                                       "cases": [f"{cfg[1]} {direction}"]}  # fmt: skip
            if (i + 1) % 500 == 0:
                print(f"[sweep record sm_{arch}] {i + 1}/{len(cfgs)} configurations, {len(by_key)} distinct launches, "
                      f"{time.time() - t0:.0f} s", file=sys.stderr, flush=True)  # fmt: skip
        kept = [la for la in by_key.values() if not kernels or any(k in la["name"].split("[")[0] for k in kernels)]
        chosen = _sample(kept, cfgs, budget)
        launches += chosen
        print(f"[sweep record sm_{arch}] {len(cfgs)} configurations: {len(by_key)} distinct launches, "
              f"{len(kept)} of the kernels asked for, {len(chosen)} to compile", file=sys.stderr, flush=True)  # fmt: skip
        distinct[arch] = len(kept)  # of the kernels asked for
    return {"configurations": len(cfgs), "launches": launches, "refused": dict(refused), "record_errors": errors,
            "distinct": distinct}


def _stratum(la: dict, cfg: tuple) -> tuple:
    """The kernel and a coarse class of the configuration its first case came from:
    every stratum gets launches before any gets many."""
    op, _, p = cfg
    kernel = la["name"].split("[")[0]
    if op == "relpos":
        r, c, s = p[:3]
        return kernel, min(r * c, 17) // 9, r != c, s, p[7], p[8]  # tiny / small / large, square, stride, dtype, variant
    if op == "patch_embed":
        c, img, k, s, pad, d, order, inn, outn, pos, pre, layout, dt, var = p
        pair = dt != "f32" and layout == "nchw" and inn and 5 <= k <= 8 and s % 2 == 0 and pad % 2 == 0 and img % 2 == 0
        # integer arguments Triton makes the constant 1 (one channel, a 1 x 1 kernel, one
        # output row or column): a class of their own, so every budget compiles some
        one = c == 1 or k == 1 or (img + 2 * pad - k) // s == 0
        return kernel, one, pair, k, inn, outn, dt, layout
    if op == "performer":
        return kernel, p[0] > 8, p[4], p[6], p[7]
    return kernel, p[4:9], p[3] > 32, p[10]


def _sample(found: list[dict], cfgs: list[tuple], budget: int) -> list[dict]:
    """At most budget launches per op (0: all): round-robin over the strata, each
    stratum in a fixed pseudo-random order."""
    import hashlib
    import random

    if not budget:
        return found
    out = []
    for op in OPS:
        strata: dict[tuple, list[dict]] = collections.defaultdict(list)
        for la in found:
            if cfgs[la["cfg"]][0] == op:
                strata[_stratum(la, cfgs[la["cfg"]])].append(la)
        for key, members in strata.items():
            random.Random(hashlib.sha1(repr(key).encode()).hexdigest()).shuffle(members)
        # the strata of each kernel in a fixed pseudo-random order, the kernels interleaved
        kernels: dict[str, list[tuple]] = collections.defaultdict(list)
        for key in sorted(strata, key=repr):
            kernels[key[0]].append(key)
        for name, keys in kernels.items():
            random.Random(name).shuffle(keys)
        order = [k for row in itertools.zip_longest(*kernels.values()) for k in row if k is not None]
        queues = [strata[k] for k in order]
        taken = []
        while len(taken) < budget and any(queues):
            for q in queues:
                if q and len(taken) < budget:
                    taken.append(q.pop())
        out += taken
    return out


def worker(task_file: str, shard: int, shards: int, out_file: str, tag: str) -> None:
    """Compile every shards-th launch of the plan from the shard-th; one JSON line each."""
    from vitkernels.triton._aot import compile_launch

    with open(task_file) as f:
        task = json.load(f)
    cfgs = configurations(task["grid"], tuple(task["ops"]))
    mine = task["launches"][shard :: task["shards"]]
    recs: dict[tuple, Any] = {}
    with open(out_file, "w") as out:
        for n, la in enumerate(mine, 1):
            k = (la["arch"], la["cfg"], la["direction"])
            if k not in recs:
                recs[k] = record(cfgs[la["cfg"]], la["direction"], la["arch"])
            launch = recs[k].launches[la["index"]]
            t = time.time()
            res = {"arch": la["arch"], "name": la["name"], "cases": la["cases"]}
            try:
                c = compile_launch(launch, la["arch"])
                res.update(registers=c.registers, spill_stores=c.spill_stores, spill_loads=c.spill_loads,
                           stack=c.stack_frame, shared=max(c.shared_bytes, c.static_shared), warps=c.num_warps)  # fmt: skip
                line = f"{c.registers} regs, {c.spill_stores}/{c.spill_loads} B spilled, {res['shared']} B shared"
            except Exception as exc:
                chain, e = [], exc  # Triton's CompilationError names the source; its cause says why
                while e is not None and len(chain) < 8:
                    chain.append(f"{type(e).__name__}: {e}")
                    e = e.__cause__
                msg = "\n".join(reversed(chain))
                res["error"] = msg[:3000] + ("\n...\n" + msg[-3000:] if len(msg) > 6000 else msg[3000:6000])
                line = "ERROR " + _error_line(msg)
            res["seconds"] = round(time.time() - t, 2)
            out.write(json.dumps(res) + "\n")
            out.flush()
            print(f"[sweep {tag} {shard}:{n}/{len(mine)}] {la['name']}@sm_{la['arch']}: {line}", file=sys.stderr, flush=True)


def sweep(args: argparse.Namespace, tag: str) -> dict[str, Any]:
    """Plan, then compile in args.jobs workers of this interpreter and environment."""
    ops = tuple(args.op or OPS)
    p = plan(args.grid, ops, args.arch, args.budget, tuple(args.kernel or ()))
    p.update(grid=args.grid, ops=list(ops), shards=args.jobs, budget=args.budget)
    with tempfile.TemporaryDirectory(prefix="compile-sweep-") as tmp:
        task = os.path.join(tmp, "task.json")
        with open(task, "w") as f:
            json.dump(p, f)
        procs = []
        for i in range(args.jobs):
            out = os.path.join(tmp, f"out{i}.jsonl")
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", f"{i}/{args.jobs}", "--task", task,
                   "--out", out, "--tag", tag]  # fmt: skip
            procs.append((subprocess.Popen(cmd, env=_env()), out))
        results = []
        for proc, out in procs:
            proc.wait()
            if os.path.exists(out):
                with open(out) as f:
                    results += [json.loads(line) for line in f if line.strip()]
            if proc.returncode != 0:
                p["record_errors"].append({"arch": 0, "case": "worker", "error": f"worker exited {proc.returncode}"})
    import triton

    p.update(results=results, triton=triton.__version__)
    del p["launches"]
    return p


# ----------------------------------------------------------------------------
# the report


def _cases(cases: list[str], n: int = 3) -> str:
    more = f" (+{len(cases) - n} more)" if len(cases) > n else ""
    return "; ".join(cases[:n]) + more


def _error_line(error: str) -> str:
    """The line of a compile error that says what went wrong (Triton's CompilationError
    ends with a caret under the source; the cause is the line naming an exception)."""
    lines = [ln.strip() for ln in error.strip().splitlines() if ln.strip()]
    named = [ln for ln in lines if "Error" in ln and not ln.startswith("triton.compiler.errors.CompilationError: at")]
    return (named[0] if named else lines[-1] if lines else "")[:300]


def report(sweeps: list[dict[str, Any]]) -> int:
    found = 0
    print("\n== compile sweep ==")
    for s in sweeps:
        per = collections.Counter(r["arch"] for r in s["results"])
        secs = sum(r.get("seconds", 0) for r in s["results"])
        print(f"triton {s['triton']}, grid {s['grid']}, ops {','.join(s['ops'])}: {s['configurations']} configurations; "
              + ", ".join(f"sm_{a}: {n} of {s['distinct'].get(str(a), s['distinct'].get(a))} distinct launches compiled"
                          for a, n in sorted(per.items()))
              + f"; {secs:.0f} s of compiles")  # fmt: skip
        for why, n in sorted(s["refused"].items()):
            print(f"  refused by the kernels ({n} recordings): {why}")
    rows = []
    for s in sweeps:
        tri = s["triton"]
        for e in s["record_errors"]:
            rows.append(("RECORD", tri, f"sm_{e['arch']}", "launcher raised", e["error"][:300], e["case"]))
        for r in s["results"]:
            arch = f"sm_{r['arch']}{'a' if r['arch'] >= 90 else ''}"
            if "error" in r:
                rows.append(("FAIL", tri, arch, r["name"], _error_line(r["error"]), _cases(r["cases"])))
                continue
            if r["spill_stores"] or r["spill_loads"]:
                rows.append(("SPILL", tri, arch, r["name"],
                             f"{r['registers']} regs, {r['spill_stores']}/{r['spill_loads']} B", _cases(r["cases"])))  # fmt: skip
            if r["shared"] > SHARED_LIMIT[r["arch"]]:
                rows.append(("SHARED", tri, arch, r["name"],
                             f"{r['shared']} B > {SHARED_LIMIT[r['arch']]}", _cases(r["cases"])))  # fmt: skip
    if not rows:
        print("no record error, compile failure, spill or over-limit shared memory")
        return 0
    print(f"\n{len(rows)} finding(s):")
    for kind, tri, arch, name, what, cases in sorted(rows):
        print(f"{kind:6} triton {tri} {arch} {name}: {what}\n       shapes: {cases}")
        found += 1
    return 1 if found else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench/compile_sweep.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--grid", choices=("quick", "full"), default="quick")
    ap.add_argument("--op", action="append", choices=OPS, help="only these ops (repeatable)")
    ap.add_argument("--arch", type=int, action="append", choices=(80, 90), help="default: 90 and 80")
    ap.add_argument("--jobs", type=int, default=2, help="compile processes (default 2)")
    ap.add_argument("--kernel", action="append", help="only launches of kernels whose name contains this, e.g. "
                    "relpos_dq (repeatable; applied before --budget)")
    ap.add_argument("--budget", type=int, help="distinct launches compiled per op and arch, spread over the "
                    "kernels and shape classes (0: all; default: quick 60, full 150)")
    ap.add_argument("--triton36", metavar="DIR", help="also sweep with the triton in DIR (e.g. /tmp/vk-triton36)")
    ap.add_argument("--triton36-arch", type=int, action="append", choices=(80, 90), help="its archs (default: 90)")
    ap.add_argument("--only-triton36", action="store_true", help="skip the installed triton's sweep")
    ap.add_argument("--json", help="write every sweep's results here")
    ap.add_argument("--plan-only", action="store_true", help="record and count the launches, compile nothing")
    # internal
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--task", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--tag", default="", help=argparse.SUPPRESS)
    ap.add_argument("--sweep-json", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") or os.environ.get("TRITON_DEFAULT_FP_FUSION"):
        # the interpreter's @triton.jit functions cannot be compiled; default fusion
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *(argv or sys.argv[1:])], _env())
    if args.worker:
        shard, shards = (int(x) for x in args.worker.split("/"))
        worker(args.task, shard, shards, args.out, args.tag)
        return 0
    args.arch = args.arch or [90, 80]
    if args.budget is None:
        args.budget = 60 if args.grid == "quick" else 150
    if args.plan_only:
        p = plan(args.grid, tuple(args.op or OPS), args.arch, args.budget, tuple(args.kernel or ()))
        per = collections.Counter(la["arch"] for la in p["launches"])
        print(f"{p['configurations']} configurations; " + ", ".join(f"sm_{a}: {n} of {p['distinct'][a]}" for a, n in sorted(per.items()))
              + f" distinct launches to compile; refused {p['refused']}; {len(p['record_errors'])} record errors")  # fmt: skip
        for e in p["record_errors"]:
            print(f"RECORD sm_{e['arch']} {e['case']}: {e['error'][:300]}")
        return 0
    if args.sweep_json:  # a sweep in a subprocess (another triton)
        import triton

        s = sweep(args, f"triton{triton.__version__}")
        with open(args.sweep_json, "w") as f:
            json.dump(s, f)
        return 0
    sweeps = []
    if not args.only_triton36:
        import triton

        sweeps.append(sweep(args, f"triton{triton.__version__}"))
    if args.triton36:
        with tempfile.TemporaryDirectory(prefix="compile-sweep36-") as tmp:
            out = os.path.join(tmp, "s.json")
            env = _env()
            env["PYTHONPATH"] = os.pathsep.join([args.triton36, REPO])
            if env.get("TRITON_CACHE_DIR"):  # a cache of its own: another triton's artifacts
                env["TRITON_CACHE_DIR"] = env["TRITON_CACHE_DIR"].rstrip("/") + "-triton36"
            cmd = [sys.executable, os.path.abspath(__file__), "--grid", args.grid, "--jobs", str(args.jobs),
                   "--sweep-json", out, "--budget", str(args.budget)]  # fmt: skip
            for a in args.triton36_arch or [90]:
                cmd += ["--arch", str(a)]
            for o in args.op or []:
                cmd += ["--op", o]
            for k in args.kernel or []:
                cmd += ["--kernel", k]
            rc = subprocess.call(cmd, env=env)
            if rc == 0 and os.path.exists(out):
                with open(out) as f:
                    sweeps.append(json.load(f))
            else:
                print(f"the triton 3.6 sweep failed (exit {rc})", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(sweeps, f, indent=1)
    return report(sweeps)


if __name__ == "__main__":
    raise SystemExit(main())
