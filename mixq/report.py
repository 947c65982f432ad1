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


QUALITY_HEADERS = ("bpw", "ppl", "KL mean", "KL 95% interval", "KL p99", "top-1", "eval s")


def fmt_interval(interval: Sequence[float] | None) -> str:
    return "-" if interval is None else f"{fmt_value(interval[0])} - {fmt_value(interval[1])}"


def quality_row(bpw: float | None, report: dict[str, Any]) -> list[Any]:
    return [bpw, report["ppl"], report.get("kl_mean"), fmt_interval(report.get("kl_ci95")), report.get("kl_p99"),
            report.get("top1"), report["seconds"]]


def plan_summary(plan) -> str:
    """How many tensors got each option, and how many bytes they take."""
    from collections import Counter

    counts = Counter(plan.options.values())
    rows = [[opt, n] for opt, n in sorted(counts.items(), key=lambda kv: -kv[1])]
    return markdown_table(["option", "tensors"], rows)


def plot_frontier(plans, path, title: str, axis=None) -> None:
    """Predicted loss against bits per weight, or against `axis` (a plan limit, in its plans'
    `limited`, here a time per decoded token), written atomically as a PNG."""
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    shown = [p for p in plans if p.predicted_loss > 0]  # log axis: the all-16-bit plan has loss 0
    x = [p.bpw if axis is None else 1e3 * p.limited[axis.name] for p in shown]
    ax.plot(x, [p.predicted_loss for p in shown], marker=".", lw=1)
    ax.set_xlabel("bits per weight (whole file, at most)" if axis is None else
                  f"{axis.name} (ms, predicted from the latency table)")
    ax.set_yscale("log")
    ax.set_ylabel("predicted loss")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    tmp = f"{path}.partial.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
