"""`mixq report`: one self-contained HTML page about a profile and the runs made from it.

From a profile: the frontier of predicted loss against size (and against the time per decoded
token, given a latency table), each tensor's sensitivity (its
predicted loss in a middle option) as a heat map over blocks and tensor kinds, and the allocation
of the plan for a budget. From `mixq quantize` outputs: their measured KL with its 95% interval,
drawn on the frontier next to what their plan predicted, their allocation, and a table. Figures
are inline SVG (matplotlib), so the page needs no other file and no network.
"""

from __future__ import annotations

import html
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mixq.errors import MixqError
from mixq.export import native
from mixq.models.layout import block_and_kind
from mixq.report import QUALITY_HEADERS, quality_row

@dataclass(frozen=True)
class Run:
    """A `mixq quantize` output: its plan (tensor -> option) and what was measured on it."""

    path: Path
    info: dict

    @property
    def plan(self) -> dict[str, str]:
        return self.info.get("plan", {})

    @property
    def bpw(self) -> float:
        return self.info["storage"]["bpw"]

    @property
    def predicted_loss(self) -> float | None:
        return (self.info.get("plan_summary") or {}).get("predicted_loss")

    def evaluations(self) -> list[tuple[str, dict]]:
        return list(self.info.get("evaluations", {}).items())


def read_inputs(paths: list[Path]):
    """(the profile or None, the runs) from paths that are a profile file or `mixq quantize` outputs."""
    from mixq.profile import Profile

    profile, runs = None, []
    for path in paths:
        if path.is_dir():
            runs.append(Run(path, native.read_info(path)))
        elif profile is None:
            profile = Profile.load(path)
        else:
            raise MixqError(f"give at most one profile ({path} is a second one)")
    if profile is None and not runs:
        raise MixqError("give a profile or a `mixq quantize` output directory")
    return profile, runs


def grid(values: dict[str, float]) -> tuple[np.ndarray, list[str], int]:
    """(kinds x blocks) array of the mean value per cell (NaN where empty), its row labels, blocks."""
    cells: dict[tuple[str, int], list[float]] = {}
    for tensor, v in values.items():
        block, kind = block_and_kind(tensor)
        if block is not None:
            cells.setdefault((kind, block), []).append(v)
    kinds = list(dict.fromkeys(k for k, _ in cells))
    n_blocks = 1 + max((b for _, b in cells), default=-1)
    out = np.full((len(kinds), n_blocks), np.nan)
    for (kind, block), vs in cells.items():
        out[kinds.index(kind), block] = float(np.mean(vs))
    return out, kinds, n_blocks


def svg(fig) -> str:
    """A matplotlib figure as inline SVG markup (closed after)."""
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]


def figure(svg_markup: str) -> str:
    return f"<figure>{svg_markup}</figure>"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def frontier_figure(profile, runs: list[Run], estimator: str, axis=None) -> str:
    """Predicted loss of the frontier against bits per weight, or against `axis` (a plan limit such
    as the time per decoded token), with the runs' measured KL at their own place on that axis."""
    from mixq.plan import frontier_plans

    plt = _pyplot()
    plans = frontier_plans(profile, estimator, axis)
    # Up to where the loss falls below 1e-4 of the smallest plan's: the rest is the 8-16 bit tail.
    plans = [p for p in plans if p.predicted_loss > 1e-4 * plans[0].predicted_loss]

    def place(bpw: float, limited: dict) -> float:
        return bpw if axis is None else 1e3 * limited[axis.name]

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    ax.plot([place(p.bpw, p.limited) for p in plans], [p.predicted_loss for p in plans], lw=1.2,
            label=f"frontier, predicted ({estimator})")
    for run in runs:
        for _, rep in run.evaluations()[:1]:
            if rep.get("kl_mean") is None or (axis is not None and set(run.plan) != set(profile.tensors)):
                continue
            x = place(run.bpw, {} if axis is None else {axis.name: axis.total(
                np.array([profile.options.index(run.plan[t]) for t in profile.tensors]))})
            lo, hi = rep.get("kl_ci95") or (rep["kl_mean"], rep["kl_mean"])
            ax.errorbar([x], [rep["kl_mean"]], yerr=[[rep["kl_mean"] - lo], [hi - rep["kl_mean"]]], fmt="o",
                        capsize=3, label=f"{run.path.name}: measured KL, 95% interval")
            if run.predicted_loss:
                ax.plot([x], [run.predicted_loss], "x", color="black")
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (whole file)" if axis is None else f"{axis.name} (ms, predicted)")
    ax.set_ylabel("KL to the reference")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    return svg(fig)


def outside_blocks(values: dict[str, float]) -> str:
    """The tensors a block map has no cell for (embedding, output matrix), as a line of text."""
    rest = [f"{t}: {_fmt(v)}" for t, v in values.items() if block_and_kind(t)[0] is None]
    return f"<p>Outside the blocks: {html.escape('; '.join(rest))}.</p>" if rest else ""


def heat_map(values: dict[str, float], title: str, label: str, log: bool = False) -> str:
    from matplotlib.colors import LogNorm

    plt = _pyplot()
    data, kinds, n_blocks = grid(values)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.22 * n_blocks + 2.5), 0.32 * len(kinds) + 1.4))
    positive = data[np.isfinite(data) & (data > 0)]
    norm = LogNorm(positive.min(), positive.max()) if log and positive.size else None
    image = ax.imshow(np.ma.masked_invalid(data), aspect="auto", cmap="viridis", norm=norm, interpolation="nearest")
    ax.set_yticks(range(len(kinds)), kinds, fontsize=7)
    ax.set_xticks(range(0, n_blocks, max(1, n_blocks // 15)))
    ax.set_xlabel("block")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label=label)
    return svg(fig)


def bits_per_weight(options: dict[str, str], shapes: dict[str, tuple[int, int]]) -> dict[str, float]:
    from mixq.options import Option

    return {t: 8 * Option.parse(o).nbytes(shapes[t]) / (shapes[t][0] * shapes[t][1]) for t, o in options.items()
            if t in shapes}


def sensitivity(profile, estimator: str) -> tuple[dict[str, float], str]:
    """Each tensor's predicted loss in one option: of the options the most tensors may take, the one
    nearest 3.5 bits per weight (where plans under common budgets choose)."""
    predicted = profile.predicted(estimator)
    n_weights = sum(r * c for r, c in profile.shapes)
    allowed = np.isfinite(predicted).sum(axis=0)
    widest = np.nonzero(allowed == allowed.max())[0]
    o = int(min(widest, key=lambda i: abs(8 * profile.nbytes[:, i].sum() / n_weights - 3.5)))
    values = {t: float(predicted[i, o]) for i, t in enumerate(profile.tensors) if np.isfinite(predicted[i, o])}
    return values, profile.options[o]


def shapes_of(profile, runs: list[Run]) -> dict[str, tuple[int, int]]:
    if profile is not None:
        return {t: tuple(s) for t, s in zip(profile.tensors, profile.shapes)}
    from mixq.models import load_model

    return {name: ref.shape for name, ref in load_model(runs[0].info["model"]).plannable().items()}


def quality_table(runs: list[Run]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in ("run", "evaluated on", *QUALITY_HEADERS))
    rows = []
    for run in runs:
        for where, rep in run.evaluations():
            cells = [run.path.name, where, *quality_row(run.bpw, rep)]
            rows.append("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>" if rows else \
        "<p>No run here was evaluated (give `--eval-text` to `mixq quantize`, or run `mixq eval`).</p>"


def _fmt(v) -> str:
    from mixq.report import fmt_value

    return fmt_value(v)


def render(profile, runs: list[Run], estimator: str = "hessian+kl", budget: str | None = None,
           latency=None) -> str:
    """The page's HTML; with `latency` (a plan limit in time per decoded token) also the frontier
    along it."""
    from mixq.plan import Budget, plan_for_budget

    title = profile.model if profile is not None else runs[0].info.get("model", "mixq")
    sections = []
    if profile is not None:
        sections.append(("Frontier", "Predicted loss of the best plan at each size"
                         + (" and the runs' measured KL (points, with 95% bootstrap intervals over windows; "
                            "x: what their plan predicted)" if runs else "") + ".",
                         figure(frontier_figure(profile, runs, estimator))))
        if latency is not None:
            sections.append(("Frontier in time", f"Predicted loss of the best plan at each {latency.name}, "
                             "as the latency table predicts it" + (" (a run's x: its plan's time)" if runs else "")
                             + ".", figure(frontier_figure(profile, runs, estimator, latency))))
        values, option = sensitivity(profile, estimator)
        sections.append(("Sensitivity", f"Predicted loss of each tensor in {option} alone ({estimator}); "
                         "brighter is more sensitive.", figure(heat_map(values, f"predicted loss in {option}", "loss", log=True))
                         + outside_blocks(values)))
    shapes = shapes_of(profile, runs)
    plans = [(run.path.name, run.plan) for run in runs if run.plan]
    if budget and profile is not None:
        plan = plan_for_budget(profile, Budget.parse(budget), estimator)
        plans.insert(0, (f"plan for {budget}", plan.options))
    for name, options in plans:
        bits = bits_per_weight(options, shapes)
        sections.append((f"Allocation: {name}", "Bits per weight of each tensor's option (experts of a stack: "
                         "their mean).", figure(heat_map(bits, f"{name}: bits per weight", "bits per weight"))
                         + outside_blocks(bits)))
    if runs:
        sections.append(("Measured", "Quality of each run against its reference.", quality_table(runs)))
    body = "\n".join(f'<section id="{re.sub(r"[^a-z]+", "-", h.lower()).strip("-")}"><h2>{html.escape(h)}</h2>'
                     f"<p>{html.escape(note)}</p>\n{content}</section>" for h, note, content in sections)
    meta = json.dumps({"model": title, "runs": [r.path.name for r in runs]})
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>mixq report: {html.escape(title)}</title>
<script type="application/json" id="mixq-report">{html.escape(meta)}</script>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 70em; color: #222; }}
h1 {{ font-size: 1.4em; }} h2 {{ font-size: 1.15em; border-bottom: 1px solid #ccc; }}
figure {{ margin: 0; }} figure svg {{ max-width: 100%; height: auto; }}
table {{ border-collapse: collapse; font-size: 0.85em; }} td, th {{ border: 1px solid #ccc; padding: 0.2em 0.5em; }}
</style></head>
<body><h1>mixq report: {html.escape(title)}</h1>
{body}
</body></html>
"""
