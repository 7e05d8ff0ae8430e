"""Numbers for people: ``human_size(2_400_000) == "2.4 MB"``, ``plural(1, "file") == "1 file"``."""
from __future__ import annotations

__all__ = ["human_size", "plural"]


def human_size(n: float) -> str:
    """Decimal units, three significant digits at most: 0 B, 999 B, 12.3 KB, 1.5 MB, 2.08 GB."""
    n = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 999.5 or unit == "TB":
            if unit == "B":
                return f"{n:.0f} B"
            return f"{n:,.0f} {unit}" if abs(n) >= 999.5 else f"{n:.3g} {unit}"
        n /= 1000.0
    raise AssertionError("unreachable")


def plural(count: int, word: str, plural_form: str = "") -> str:
    """``plural(1, "file") == "1 file"``, ``plural(3, "file") == "3 files"`` (thousands separated)."""
    return f"{count:,} {word if count == 1 else (plural_form or word + 's')}"
