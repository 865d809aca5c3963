"""The estimate's model of an H200 (sm_90a): occupancy, waves, and the three times.

Per launch (bench/WORKLOADS.md, "Estimates from the compiler"):

    t_mem   = bytes the launch must move (its inputs read once, outputs written
              once) / 4.3 TB/s
    t_mma   = tensor-core flops it issues / the rate of the instruction kind
              (HGMMA ~660 TFLOP/s bf16/f16 dense, HMMA ~330; tf32 half of those)
    t_issue = warp instructions it executes / (132 SMs x 4 issue slots x 1.98 GHz)
    estimate = max(t_mem, t_mma, t_issue) + 3 us per launch

t_mma and t_issue take the busiest SM's share: programs are spread over the
SMs, so one SM runs ceil(programs / 132) of them, and both times are that many
programs' work at one SM's rate. With programs a multiple of 132 this is the
total divided by 132 SMs; a launch of 1.45 SM-loads takes two (its tail).
Occupancy (resident programs per SM, from registers, shared memory and warps)
and waves (programs / (resident per SM x 132)) are reported beside it.
"""

from __future__ import annotations

import dataclasses
import math

SMS = 132
CLOCK_HZ = 1.98e9
ISSUE_SLOTS_PER_SM = 4  # one warp instruction per cycle per SM sub-partition
BANDWIDTH_BYTES_PER_S = 4.3e12
LAUNCH_S = 3e-6
# achievable dense rates per instruction kind and input type (flops / s)
MMA_RATE = {
    ("HGMMA", "bf16"): 660e12, ("HGMMA", "f16"): 660e12, ("HGMMA", "tf32"): 330e12,
    ("HMMA", "bf16"): 330e12, ("HMMA", "f16"): 330e12, ("HMMA", "tf32"): 165e12,
}  # fmt: skip
# per SM
REGISTERS = 65536
SHARED_BYTES = 228 * 1024
SHARED_PER_BLOCK_RESERVED = 1024  # the runtime's share of each resident block
MAX_WARPS = 64
MAX_BLOCKS = 32
REG_ALLOC_UNIT = 256  # registers per warp are allocated in units of 256


def constants() -> dict[str, float]:
    """The model's constants, for the estimate's JSON."""
    return {
        "sms": SMS, "clock_hz": CLOCK_HZ, "issue_slots_per_sm": ISSUE_SLOTS_PER_SM,
        "bandwidth_bytes_per_s": BANDWIDTH_BYTES_PER_S, "launch_s": LAUNCH_S,
        "mma_rates_flops_per_s": {f"{k}.{t}": v for (k, t), v in MMA_RATE.items()},
        "registers_per_sm": REGISTERS, "shared_bytes_per_sm": SHARED_BYTES, "max_warps_per_sm": MAX_WARPS,
        "max_blocks_per_sm": MAX_BLOCKS,
    }  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Occupancy:
    blocks_per_sm: int
    limited_by: str  # "registers", "shared memory", "warps", "blocks"
    warps_per_sm: int

    @property
    def fraction(self) -> float:
        return self.warps_per_sm / MAX_WARPS


def occupancy(registers: int, shared_bytes: int, warps: int) -> Occupancy:
    """Resident programs per SM on sm_90 for a kernel's registers per thread,
    shared memory per program (static + dynamic) and warps per program."""
    regs_per_warp = math.ceil(max(registers, 1) * 32 / REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    limits = {
        "registers": REGISTERS // (regs_per_warp * warps),
        "shared memory": SHARED_BYTES // (shared_bytes + SHARED_PER_BLOCK_RESERVED),
        "warps": MAX_WARPS // warps,
        "blocks": MAX_BLOCKS,
    }
    name = min(limits, key=lambda k: limits[k])
    blocks = limits[name]
    return Occupancy(blocks, name, blocks * warps)


def busiest_sm_programs(programs: int) -> int:
    return math.ceil(programs / SMS)


def t_issue(warp_insns_per_program: float, programs: int) -> float:
    return busiest_sm_programs(programs) * warp_insns_per_program / (ISSUE_SLOTS_PER_SM * CLOCK_HZ)


def t_mma(flops_per_program: dict[tuple[str, str], float], programs: int) -> float:
    """Seconds of tensor-core work on the busiest SM (each kind at its own rate)."""
    per_sm = busiest_sm_programs(programs)
    return sum(per_sm * f / (MMA_RATE.get(k, MMA_RATE[(k[0], "bf16")]) / SMS) for k, f in flops_per_program.items())


def t_mem(nbytes: float) -> float:
    return nbytes / BANDWIDTH_BYTES_PER_S
