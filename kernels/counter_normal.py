"""Counter-based standard normals in plain tensor ops: element i of a draw is a function of (seed, offset + i).
No generator state and no host read, so torch.compile traces a draw into its graph, which inductor fuses and vectorizes.
"""

from __future__ import annotations

import math

import torch


def _signed(value: int) -> int:
    """A 64-bit constant as the int64 with the same bits (torch has int64 arithmetic, not uint64)."""
    return value - 2**64 if value >= 2**63 else value


_GOLDEN = _signed(0x9E3779B97F4A7C15)  # 2**64 / golden ratio, odd: splitmix64's step from one counter to the next
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)
_LOW32 = 0xFFFFFFFF


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 bits: >> is arithmetic on int64, so mask off the copies of the sign bit."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finalizer (Stafford's mix 13): a bijection of 64-bit words in which every input bit flips
    each output bit with probability ~1/2. int64 products wrap mod 2**64 in eager and inductor code alike."""
    x = (x ^ _shr(x, 30)) * _MIX1
    x = (x ^ _shr(x, 27)) * _MIX2
    return x ^ _shr(x, 31)


def counter_normal(seed_offset: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """Standard normals (shape) in fp32 on seed_offset's device; seed_offset is an int64 tensor [seed, offset].

    Element i (row-major) is splitmix64 output number offset + i of the stream seeded with mix(seed), split
    into two 32-bit uniforms for Box-Muller: the Triton kernel's counter convention (its Philox gives other
    numbers). The largest |value| is sqrt(-2 ln 2**-33) = 6.76: u1 is at least 2**-33, never 0.
    """
    numel = math.prod(shape)
    # The pair is read on the device only: to a compiled graph a new [seed, offset] is new data, not a new graph.
    counters = seed_offset[1] + torch.arange(1, numel + 1, dtype=torch.int64, device=seed_offset.device)
    bits = _mix64(_mix64(seed_offset[0]) + counters * _GOLDEN)  # (numel,) int64
    # u1 in (0, 1] from the high 32 bits (+0.5: log never sees 0; values below 2**24, which make the tails,
    # convert to fp32 exactly), the angle 2 pi u2 from the low 32 bits.
    u1 = (_shr(bits, 32).float() + 0.5) * 2.0**-32
    angle = (bits & _LOW32).float() * (2 * math.pi * 2.0**-32)
    return ((-2.0 * u1.log()).sqrt() * angle.cos()).view(shape)
