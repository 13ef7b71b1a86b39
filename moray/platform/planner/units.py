"""Numbers for people: the human report's formatting, in one place."""

from __future__ import annotations

from moray.platform.planner.catalogue import GIB


def gib(n_bytes: float) -> float:
    return n_bytes / GIB


def si(x: float, unit: str = "", digits: int = 3) -> str:
    """1.87e12 -> '1.87 T'; with a unit, '560 GFLOP'."""
    if x == 0:
        return f"0 {unit}".strip()
    for factor, prefix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= factor:
            return f"{x / factor:.{digits}g} {prefix}{unit}"
    return f"{x:.{digits}g} {unit}".strip()


def count(x: float) -> str:
    """Parameters and tokens: 1.87e12 -> '1.87T', 12.9e9 -> '12.9B'."""
    for factor, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= factor:
            return f"{x / factor:.3g}{suffix}"
    return f"{x:.3g}"


def sci(x: float) -> str:
    return f"{x:.3g}" if 1e-3 <= abs(x) < 1e5 or x == 0 else f"{x:.3e}".replace("e+", "e")


def money(x: float) -> str:
    if x >= 1e6:
        return f"${x / 1e6:,.1f}M"
    if x >= 100:
        return f"${x:,.0f}"
    return f"${x:.4g}"


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def num(x: float) -> str:
    """Hours and days: '55,017,373', '91.8', '0.0123'."""
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:,.1f}" if abs(x) >= 10 else f"{x:.3g}"
