"""Memory sizes as people write and read them: `16GiB`, `24e9`, `512 MB`; `1.50 GiB`."""

from __future__ import annotations

import re

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}


def parse_size(text: str) -> int:
    """`16GiB`, `24e9`, `512 MiB`, `1.5GB`, `1000000` -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match[2].lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(f"expected a size such as 16GiB, 24e9 or 512MB, got {text!r}")
    value = float(match[1]) * _UNITS[unit]
    if value < 1:
        raise ValueError(f"a memory size must be at least 1 byte, got {text!r}")
    return int(value)


def human(n: int | float) -> str:
    """Bytes in binary units: `512 B`, `3.2 KiB`, `1.50 GiB`."""
    for unit, size in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"
