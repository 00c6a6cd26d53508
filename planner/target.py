"""Targets: the accelerator a plan is made for, and the one size parser."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2,
          "mib": 1024**2, "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "t": 1000**4, "tb": 1000**4,
          "tib": 1024**4}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """'512KiB', '1.5MiB', '8GiB', '1e6' or plain bytes -> bytes (int)."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read size {text!r}: write bytes or a number with KiB, MiB, GiB (or kB, MB, GB)")
    return int(round(float(m.group(1)) * _UNITS[m.group(2).lower()]))


def format_size(n: float) -> str:
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def align_up(n: int, alignment: int) -> int:
    """Smallest multiple of `alignment` that is >= n (the one alignment helper)."""
    return -(-n // alignment) * alignment


@dataclass(frozen=True, slots=True)
class Target:
    name: str  # preset name or "custom"
    capacity: int | None  # scratchpad bytes; None = unbounded (minimise the arena)
    alignment: int = 64  # every buffer offset and size is a multiple of this
    offchip_bandwidth: float = 10e9  # bytes/s for load and store
    compute_rate: float = 1e12  # FLOP/s for the time estimate
    include_weights: bool = False  # weights stream through the scratchpad (else they live elsewhere)

    def __post_init__(self) -> None:
        if self.alignment < 1:
            raise ValueError(f"alignment must be >= 1, got {self.alignment}")
        if self.capacity is not None and self.capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {self.capacity}")

    def with_(self, **changes) -> Target:
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return {"name": self.name, "capacity": self.capacity, "alignment": self.alignment,
                "offchip_bandwidth": self.offchip_bandwidth, "compute_rate": self.compute_rate,
                "include_weights": self.include_weights}

    @classmethod
    def from_dict(cls, d: dict) -> Target:
        return cls(**d)


PRESETS: dict[str, Target] = {
    # An edge NPU in the COSMA class: a few MiB of SRAM, int8 MACs, LPDDR behind it.
    "npu": Target("npu", parse_size("4MiB"), alignment=64, offchip_bandwidth=25.6e9, compute_rate=4e12),
    # A microcontroller-class accelerator (TFLite-Micro arenas).
    "mcu": Target("mcu", parse_size("512KiB"), alignment=16, offchip_bandwidth=0.4e9, compute_rate=0.5e9),
    # An H100 with a budget of device memory for activations; host memory over PCIe 5.
    "h100": Target("h100", parse_size("8GiB"), alignment=512, offchip_bandwidth=55e9, compute_rate=400e12),
    # The CPU executor used in tests: no capacity, minimise the arena.
    "cpu": Target("cpu", None, alignment=64, offchip_bandwidth=10e9, compute_rate=100e9),
}


def get_target(name: str, **changes) -> Target:
    if name not in PRESETS:
        raise ValueError(f"unknown target {name!r}; presets: {', '.join(PRESETS)}")
    return PRESETS[name].with_(**changes)
