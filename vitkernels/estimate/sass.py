"""Machine code (SASS) of one kernel: instructions, control flow, loops, and the
source loop each machine loop comes from.

``parse(text)`` reads ``nvdisasm -c -gi`` output (one or more functions; ``-gi``
puts a ``//## File "...", line N [inlined at "...", line M]`` comment before the
instructions of each source line). For one function, ``analyse(function, source_loops)``:

* builds the control-flow graph (labels and branches) and keeps the
  instructions reachable from the entry (the padding after the last EXIT and
  its trap branch are not);
* finds the loops: every backward branch closes one, from its target to the
  branch (nested loops nest as address ranges); an instruction belongs to the
  innermost loop whose range holds it;
* names each machine loop after the source ``for`` loop most of its own
  instructions come from (the innermost source loop holding each instruction's
  line; instructions from lines outside every loop, e.g. an inlined helper's,
  abstain), so that a trip count given per source loop variable reaches it.

Counting executions from that: an instruction runs once per program times the
trip counts of the machine loops holding it. Both sides of a branch count (an
upper bound where code is skipped).
"""

from __future__ import annotations

import ast
import collections
import dataclasses
import os
import re

_RE_SECTION = re.compile(r"^//-+ \.text\.(\S+)\s+-+")
_RE_LINE = re.compile(r'^\s*//## File "([^"]+)", line (\d+)(?: inlined at "([^"]+)", line (\d+))?')
_RE_LABEL = re.compile(r"^(\.L_x_\d+|\w+):\s*$")
_RE_INSN = re.compile(r"^\s+/\*([0-9a-f]+)\*/\s+(?:(@!?U?P[T0-9]+)\s+)?([A-Z][A-Z0-9_]*)((?:\.[A-Za-z0-9_]+)*)\s*(.*?);")
_RE_TARGET = re.compile(r"`?\((\.L_x_\d+|\w+)\)")


@dataclasses.dataclass
class Insn:
    addr: int
    pred: str | None  # "@P0", "@!PT", ... or None
    op: str  # mnemonic without modifiers, e.g. "HGMMA"
    mods: str  # ".64x64x16.F32.BF16"
    operands: str
    file: str | None
    line: int | None
    # (file, line) innermost first: the instruction's line, then the lines that
    # called the functions inlined there (nvdisasm -gi)
    chain: tuple[tuple[str, int], ...] = ()

    @property
    def call(self) -> tuple[str, int] | None:
        """Where the function holding this instruction was inlined from, if it was."""
        return self.chain[1] if len(self.chain) > 1 else None

    @property
    def full(self) -> str:
        return self.op + self.mods


@dataclasses.dataclass
class Function:
    name: str
    insns: list[Insn]
    labels: dict[str, int]  # label -> address


_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # .../vitkernels


_CSRC_DIR = os.path.join(os.path.dirname(_PACKAGE_DIR), "csrc")  # the CUDA sources beside the package


def package_file(path: str) -> str:
    """This checkout's copy of a source file that compiled code names.

    A kernel served from an on-disk cache keeps the file names of the checkout it
    was first compiled from (another clone, a deleted copy): Triton's cache key
    covers the source and starting line of the kernel and of every jit function it
    calls, and the estimate's cubin cache (``vitkernels.estimate.cuda``) the content
    of every CUDA source, so the same lines of this checkout's file are the ones it
    was compiled from. Python files of the package map to the package, files under a
    ``csrc/`` folder to the ``csrc`` beside it (where this checkout has that file);
    other paths (triton's own, the CUDA toolkit's headers) are returned as they are."""
    norm = path.replace(os.sep, "/")
    if norm.endswith(".py") and "/vitkernels/" in norm:
        here = os.path.join(_PACKAGE_DIR, *norm.rpartition("/vitkernels/")[2].split("/"))
    elif "/csrc/" in norm and not norm.endswith(".py"):
        here = os.path.join(_CSRC_DIR, *norm.rpartition("/csrc/")[2].split("/"))
    else:
        return path
    return here if os.path.exists(here) else path


def parse(text: str) -> dict[str, Function]:
    """Functions of nvdisasm output, by name."""
    funcs: dict[str, Function] = {}
    cur: Function | None = None
    chain: list[tuple[str, int]] = []
    in_chain = False  # inside a run of location comments (innermost first)
    pending: list[str] = []
    for raw in text.splitlines():
        m = _RE_SECTION.match(raw)
        if m:
            cur = funcs.setdefault(m.group(1), Function(m.group(1), [], {}))
            chain, in_chain, pending = [], False, []
            continue
        if cur is None:
            continue
        m = _RE_LINE.match(raw)
        if m:
            if not in_chain:
                chain, in_chain = [], True
            if not chain:
                chain.append((package_file(m.group(1)), int(m.group(2))))
            if m.group(3):
                chain.append((package_file(m.group(3)), int(m.group(4))))
            continue
        m = _RE_LABEL.match(raw)
        if m:
            pending.append(m.group(1))
            continue
        m = _RE_INSN.match(raw)
        if m:
            addr = int(m.group(1), 16)
            for label in pending:
                cur.labels[label] = addr
            pending = []
            in_chain = False
            first = chain[0] if chain else (None, None)
            cur.insns.append(Insn(addr, m.group(2), m.group(3), m.group(4), m.group(5), *first, tuple(chain)))
    for f in funcs.values():
        if f.insns:
            f.labels.setdefault(f.name, f.insns[0].addr)
    return funcs


# ----------------------------------------------------------------------------
# control flow


def _never(insn: Insn) -> bool:
    return insn.pred in ("@!PT", "@!UPT")


def _target(insn: Insn, labels: dict[str, int]) -> int | None:
    m = _RE_TARGET.search(insn.operands)
    return labels.get(m.group(1)) if m else None


def reachable(f: Function) -> list[Insn]:
    """The instructions reachable from the function's entry."""
    if not f.insns:
        return []
    index = {insn.addr: i for i, insn in enumerate(f.insns)}
    seen: set[int] = set()
    stack = [0]
    while stack:
        i = stack.pop()
        while 0 <= i < len(f.insns) and i not in seen:
            seen.add(i)
            insn = f.insns[i]
            if _never(insn):
                i += 1
                continue
            conditional = insn.pred is not None
            if insn.op in ("BRA", "CALL", "JMP", "BRX", "JMX"):
                tgt = _target(insn, f.labels)
                if tgt is not None and tgt in index:
                    stack.append(index[tgt])
                elif insn.op in ("BRX", "JMX"):  # indirect: every label
                    stack.extend(index[a] for a in f.labels.values() if a in index)
                if insn.op == "CALL" or conditional or insn.mods.startswith(".DIV"):
                    i += 1
                    continue
                break
            if insn.op in ("EXIT", "RET", "KILL") and not conditional:
                break
            i += 1
    return [f.insns[i] for i in sorted(seen)]


@dataclasses.dataclass
class Loop:
    start: int  # address of the first instruction (the branch target)
    end: int  # address of the backward branch
    parent: Loop | None = None
    branch: Insn | None = None  # the backward branch
    source: SourceLoop | None = None  # the source loop it comes from
    votes: float = 0.0  # the fraction of its own attributed instructions that chose that source loop
    insns: list[Insn] = dataclasses.field(default_factory=list)  # its own (not in a nested loop)

    @property
    def depth(self) -> int:
        return 0 if self.parent is None else 1 + self.parent.depth


def loops(f: Function, insns: list[Insn]) -> tuple[list[Loop], dict[int, Loop | None]]:
    """Machine loops (outermost first) and each instruction's innermost loop."""
    ends: dict[int, Insn] = {}
    for insn in insns:
        if insn.op != "BRA" or _never(insn):
            continue
        tgt = _target(insn, f.labels)
        if tgt is not None and tgt <= insn.addr and not (tgt == insn.addr and insn.pred is None):
            if tgt not in ends or ends[tgt].addr < insn.addr:
                ends[tgt] = insn
    found = sorted((Loop(s, b.addr, branch=b) for s, b in ends.items()), key=lambda lp: (lp.start, -lp.end))
    for i, lp in enumerate(found):  # the innermost earlier loop holding it is its parent
        for outer in reversed(found[:i]):
            if outer.start <= lp.start and lp.end <= outer.end:
                lp.parent = outer
                break
    owner: dict[int, Loop | None] = {}
    for insn in insns:
        holding = [lp for lp in found if lp.start <= insn.addr <= lp.end]
        inner = min(holding, key=lambda lp: lp.end - lp.start) if holding else None
        owner[insn.addr] = inner
        if inner is not None:
            inner.insns.append(insn)
    return found, owner


# ----------------------------------------------------------------------------
# source loops


@dataclasses.dataclass(frozen=True)
class SourceLoop:
    file: str
    first: int  # the line of the `for`
    last: int  # the last line of its body
    var: str  # the loop variable
    header: str = ""  # the `for` statement's header without whitespace

    def named(self, key: str, call: tuple[str, int] | None = None) -> bool:
        """Whether a trip-count key names this loop: its variable, or (a key that is
        not a plain name) a piece of its header, whitespace ignored; a key ending in
        "@file:line" names it only where it was inlined from that line."""
        if "@" in key:
            key, where = key.rsplit("@", 1)
            file, _, line = where.rpartition(":")
            at_for = os.path.basename(self.file) == file and str(self.first) == line
            at_call = call is not None and os.path.basename(call[0]) == file and str(call[1]) == line
            if not (at_for or at_call):
                return False
        if key.isidentifier():
            return key == self.var
        return re.sub(r"\s+", "", key) in self.header

    def holds(self, file: str | None, line: int | None) -> bool:
        return file == self.file and line is not None and self.first <= line <= self.last


def python_loops(path: str) -> list[SourceLoop]:
    """The ``for`` loops of a Python file."""
    with open(path) as f:
        text = f.read()
    tree = ast.parse(text, path)
    lines = text.splitlines()
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.For):
            var = node.target.id if isinstance(node.target, ast.Name) else ast.unparse(node.target)
            header = re.sub(r"\s+", "", lines[node.lineno - 1])
            out.append(SourceLoop(path, node.lineno, node.end_lineno or node.lineno, var, header))
    return out


_RE_CFOR = re.compile(r"\bfor\s*\(\s*(?:const\s+)?(?:unsigned\s+)?(?:int64_t|int|size_t|auto|long)\s+(\w+)")


def c_loops(path: str) -> list[SourceLoop]:
    """The ``for`` loops of a C/CUDA file: the loop variable declared in the header,
    the body up to its closing brace (or the single statement)."""
    with open(path) as f:
        text = f.read()
    line_of = [0] * (len(text) + 1)
    n = 1
    for i, ch in enumerate(text):
        line_of[i] = n
        n += ch == "\n"
    line_of[len(text)] = n
    out = []
    for m in _RE_CFOR.finditer(text):
        i, depth = m.end(), 1  # skip the rest of the header's parentheses
        while i < len(text) and depth:
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            i += 1
        j = i
        while j < len(text) and text[j] in " \t\r\n":
            j += 1
        if j < len(text) and text[j] == "{":
            depth, k = 1, j + 1
            while k < len(text) and depth:
                depth += {"{": 1, "}": -1}.get(text[k], 0)
                k += 1
        else:
            k = text.find(";", j) + 1
        header = re.sub(r"\s+", "", text[m.start() : i])
        out.append(SourceLoop(path, line_of[m.start()], line_of[max(k - 1, m.start())], m.group(1), header))
    return out


def attribute(machine: list[Loop], source: list[SourceLoop]) -> None:
    """Name each machine loop after its source loop: the one whose ``for`` line the
    loop's closing branch comes from (the innermost such along the branch's inlining
    chain); where none does, the source loop most of its own instructions come
    from (each votes for the innermost source loop holding the innermost location
    of its chain that lies in one)."""
    for lp in machine:
        if lp.branch is not None:
            for file, line in lp.branch.chain:
                headed = [s for s in source if s.file == file and s.first == line]
                if headed:
                    lp.source, lp.votes = min(headed, key=lambda s: s.last - s.first), 1.0
                    break
        if lp.source is not None:
            continue
        votes: collections.Counter[SourceLoop] = collections.Counter()
        for insn in lp.insns:
            for file, line in insn.chain:  # the innermost location inside some source loop
                holding = [s for s in source if s.holds(file, line)]
                if holding:
                    votes[min(holding, key=lambda s: s.last - s.first)] += 1
                    break
        if votes:
            best, n = votes.most_common(1)[0]
            lp.source, lp.votes = best, n / sum(votes.values())


# ----------------------------------------------------------------------------
# what the instructions are

CATEGORIES = {
    "tensor core": ("HGMMA", "HMMA", "WARPGROUP", "IMMA", "QGMMA", "UTCHMMA"),
    "global memory": ("LDG", "STG", "LDGSTS", "LDGDEPBAR", "RED", "ATOMG", "ATOM", "UTMALDG", "UTMASTG",
                      "UBLKCP", "UTMAPF", "CCTL", "LD", "ST"),
    "shared memory": ("LDS", "STS", "LDSM", "STSM", "ATOMS", "REDS"),
    "local memory": ("LDL", "STL"),
    "float": ("FFMA", "FADD", "FMUL", "FMNMX", "FSEL", "FSETP", "FCHK", "FSWZADD", "HADD2", "HMUL2", "HFMA2",
              "HMNMX2", "HSETP2", "DADD", "DFMA", "DMUL", "FRND"),
    "special function": ("MUFU",),
    "integer/address": ("IMAD", "IADD3", "IABS", "LEA", "LOP3", "SHF", "ISETP", "IMNMX", "VIADD", "VIMNMX",
                        "IMUL", "POPC", "FLO", "BMSK", "SGXT", "IDP", "IADD", "LOP", "SHL", "SHR", "BREV",
                        "PLOP3", "VIADDMNMX", "IMAD.WIDE"),
    "conversion": ("F2F", "F2I", "I2F", "F2FP", "I2FP", "I2I", "F2IP"),
    "move/shuffle": ("MOV", "SEL", "PRMT", "SHFL", "CS2R", "S2R", "S2UR", "R2UR", "LDC", "P2R", "R2P", "MOVM",
                     "VOTE", "VOTEU", "MATCH", "REDUX", "CREDUX"),
    "control/sync": ("BRA", "BAR", "EXIT", "DEPBAR", "NOP", "BSSY", "BSYNC", "WARPSYNC", "MEMBAR", "FENCE",
                     "SYNCS", "ERRBAR", "YIELD", "CALL", "RET", "BPT", "ELECT", "ACQBULK", "ENDCOLLECTIVE",
                     "NANOSLEEP", "JMP", "BRX", "KILL", "ARRIVES"),
}  # fmt: skip
_CATEGORY = {op: cat for cat, ops in CATEGORIES.items() for op in ops}


def category(insn: Insn) -> str:
    if insn.op in _CATEGORY:
        return _CATEGORY[insn.op]
    if insn.op.startswith("U"):  # the uniform datapath (ULDC, UIADD3, UMOV, ...)
        return "uniform"
    return "other"


_RE_HGMMA = re.compile(r"\.(\d+)x(\d+)x(\d+)")


def mma_flops(insn: Insn, num_warps: int) -> tuple[str, str, float] | None:
    """(kind, input type, flops per program-wide execution) of a tensor-core
    instruction: HGMMA runs once per warpgroup (4 warps) on an m x n x k tile,
    HMMA once per warp on m16 n8 k(8|16)."""
    if insn.op == "HGMMA":
        m = _RE_HGMMA.search(insn.mods)
        if not m:
            return None
        dims = [int(g) for g in m.groups()]
        types = insn.mods.split(".")
        return "HGMMA", types[-1].lower(), 2.0 * dims[0] * dims[1] * dims[2] * max(1, num_warps // 4)
    if insn.op == "HMMA":
        parts = insn.mods.split(".")
        shape = parts[1] if len(parts) > 1 else ""
        if not shape.isdigit() or len(shape) < 4:
            return None
        mm, nn, kk = int(shape[:2]), int(shape[2]), int(shape[3:])
        ty = parts[-1].lower() if len(parts) > 3 else "f16"
        return "HMMA", ty, 2.0 * mm * nn * kk * num_warps
    return None


_LOCAL_SIZES = {"U8": 1, "S8": 1, "U16": 2, "S16": 2, "64": 8, "128": 16}


def spill_bytes(insns: list[Insn]) -> tuple[int, int]:
    """(bytes stored, bytes loaded) by the local-memory instructions (register
    spills: what ptxas reports as spill stores / loads)."""
    stores = loads = 0
    for insn in insns:
        if insn.op in ("STL", "LDL"):
            size = next((_LOCAL_SIZES[m] for m in insn.mods.split(".") if m in _LOCAL_SIZES), 4)
            if insn.op == "STL":
                stores += size
            else:
                loads += size
    return stores, loads


def branch_weights(f: Function, insns: list[Insn]) -> dict[int, float]:
    """1 for every instruction, except the shorter side of each if/else: where a
    conditional forward branch skips a block that ends in an unconditional forward
    branch over a second block (the two sides of an if/else), only the longer side
    counts (one of them runs; which one is not known: the longer bounds it). Inner
    if/elses are settled first; a side holding a loop's start or end is left alone."""
    index = {insn.addr: i for i, insn in enumerate(insns)}
    weight = {insn.addr: 1.0 for insn in insns}
    back = {(_target(i, f.labels) or -1, i.addr) for i in insns if i.op == "BRA" and (_target(i, f.labels) or 1 << 62) <= i.addr}
    diamonds = []
    for a, insn in enumerate(insns):
        if insn.op != "BRA" or insn.pred is None or _never(insn):
            continue
        t = _target(insn, f.labels)
        if t is None or t <= insn.addr or t not in index:
            continue
        ti = index[t]
        jump = insns[ti - 1]
        if jump.op != "BRA" or jump.pred is not None:
            continue
        y = _target(jump, f.labels)
        if y is None or y <= jump.addr or y not in index:
            continue
        lo, hi = insn.addr, y
        if any(lo < s <= hi or lo < e <= hi for s, e in back):
            continue
        diamonds.append((y - insn.addr, a + 1, ti, index[y]))
    for _, first, mid, end in sorted(diamonds):
        then = sum(weight[insns[i].addr] for i in range(first, mid))
        other = sum(weight[insns[i].addr] for i in range(mid, end))
        for i in range(mid, end) if then >= other else range(first, mid):
            weight[insns[i].addr] = 0.0
    return weight
