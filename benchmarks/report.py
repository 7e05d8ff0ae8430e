"""Benchmark results: one :class:`CaseResult` per table row, the text table and the JSON document.

Every figure the goals talk about is a ratio of two sides measured in the same run on the same machine, so a row
carries both sides (with their unit), the ratio and whether the goal was met::

    row = CaseResult("P7", "parse + filter labels.tsv", ours=9.2e5, baseline=None, unit="rows/s",
                     ratio=None, goal=">= 500k rows/s", met=True)
    print(format_table([row]))
"""
from __future__ import annotations

import json
import math
import os
import platform
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence

__all__ = ["CaseResult", "format_table", "to_json", "format_value"]


@dataclass
class CaseResult:
    """One row of the benchmark table.

    ``ours``/``baseline`` are the two measured sides in ``unit`` (``baseline`` is None for absolute goals);
    ``ratio`` is the figure the goal is about (None when the goal is absolute); ``met`` is None when the case
    could not run (``error`` says why). ``details`` holds extra measurements (phases, per-worker numbers, bounds).
    """

    id: str
    measurement: str
    ours: Optional[float] = None
    baseline: Optional[float] = None
    unit: str = ""
    ratio: Optional[float] = None
    goal: str = ""
    met: Optional[bool] = None
    error: Optional[str] = None
    details: Dict[str, Any] = field(default_factory=dict)

    @classmethod
    def failed(cls, case_id: str, measurement: str, goal: str, error: str) -> "CaseResult":
        """A row for a case that could not be measured (shown as ERROR, never as met)."""
        return cls(case_id, measurement, goal=goal, met=None, error=error)


def format_value(value: Optional[float], unit: str = "") -> str:
    """Human-sized number with its unit: ``format_value(1.234, "s") == "1.23 s"``, ``format_value(0.0123, "s") ==
    "12.3 ms"``, ``format_value(912345, "rows/s") == "912k rows/s"``."""
    if value is None:
        return "-"
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return str(value)
    magnitude = abs(value)
    if unit == "s" and 0 < magnitude < 1:
        return f"{value * 1e3:.3g} ms"
    if unit in ("rows/s", "files/s", "samples/s", "ops/s") and magnitude >= 1e4:
        text = f"{value / 1e3:,.0f}k"
    elif magnitude >= 100 or float(value).is_integer():
        text = f"{value:,.0f}"
    elif magnitude >= 10:
        text = f"{value:.1f}"
    elif magnitude >= 0.01:
        text = f"{value:.3g}" if magnitude < 1 else f"{value:.2f}"
    else:
        text = f"{value:.2e}"
    return f"{text} {unit}".strip()


def _ratio_text(row: CaseResult) -> str:
    if row.ratio is None:
        return "-"
    return f"{row.ratio:.3g}x" if abs(row.ratio) < 1000 else f"{row.ratio:,.0f}x"


def _met_text(row: CaseResult) -> str:
    if row.error:
        return "ERROR"
    if row.goal in ("", "-"):
        return "-"
    return {True: "yes", False: "NO", None: "?"}[row.met]


def format_table(rows: Sequence[CaseResult]) -> str:
    """The results as an aligned text table (id | measurement | streamloader | baseline | ratio | goal | met?)."""
    header = ("id", "measurement", "streamloader", "baseline", "ratio", "goal", "met?")
    lines: List[Sequence[str]] = [header]
    for row in rows:
        lines.append((
            row.id, row.measurement, format_value(row.ours, row.unit), format_value(row.baseline, row.unit),
            _ratio_text(row), row.goal, _met_text(row),
        ))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for n, line in enumerate(lines):
        out.append(" | ".join(cell.ljust(widths[i]) for i, cell in enumerate(line)).rstrip())
        if n == 0:
            out.append("-+-".join("-" * w for w in widths))
    errors = [row for row in rows if row.error]
    for row in errors:
        out.append(f"{row.id}: {row.error}")
    return "\n".join(out)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def to_json(rows: Sequence[CaseResult], settings: Optional[Dict[str, Any]] = None) -> str:
    """The results (and the settings they were measured with) as a JSON document."""
    doc = {
        "machine": {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()},
        "settings": settings or {},
        "results": [asdict(row) for row in rows],
        "all_met": all(row.met is True for row in rows),
    }
    return json.dumps(_jsonable(doc), indent=2, sort_keys=False)
