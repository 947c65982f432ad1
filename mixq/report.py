"""Tables for the terminal and for bench/results/*.md (GitHub markdown)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def fmt_value(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) >= 100:
            return f"{v:.1f}"
        if abs(v) >= 0.01:
            return f"{v:.4f}".rstrip("0").rstrip(".") if abs(v) < 1 else f"{v:.3f}"
        return f"{v:.2e}"
    return str(v)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[fmt_value(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    def line(values: Sequence[str]) -> str:
        return "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in cells)])


QUALITY_HEADERS = ("bpw", "ppl", "KL mean", "KL p99", "top-1", "eval s")


def quality_row(bpw: float | None, report: dict[str, Any]) -> list[Any]:
    return [bpw, report["ppl"], report.get("kl_mean"), report.get("kl_p99"), report.get("top1"), report["seconds"]]
