"""Choose one option per tensor under a budget, exactly.

The problem: tensors t are partitioned into tie groups g (tensors that must share one option,
such as q/k/v). Option o of group g costs bytes B[g,o] = sum_{t in g} bytes[t,o] and predicted loss
L[g,o] = sum_{t in g} loss[t,o]; options a tensor may not take have infinite loss.

    minimise    sum_g sum_o L[g,o] x[g,o]
    subject to  sum_o x[g,o] = 1                 for every group g
                sum_g sum_o B[g,o] x[g,o] <= C    (C: the budget's bytes left for these tensors)
                x[g,o] in {0, 1}

The quality-constrained twin (`solve_min_bytes`) swaps objective and constraint: the fewest bytes
whose predicted loss sum_g sum_o L[g,o] x[g,o] stays at most a bound. Either takes further limits
(`Limit`: a per-tensor cost in each option, such as the measured time of its matrix product, and a
bound on its sum), each one more row of the same form as the bytes'.

`solve` hands this multiple-choice knapsack to HiGHS (scipy.optimize.milp) with a zero optimality
gap and then checks the byte count in exact integers, so a plan never exceeds its budget; among
plans of the least loss it returns one of the fewest bytes (a second, quality-constrained solve).
`frontier` sweeps the Lagrangian relaxation: every point it returns is an optimal plan for its own
size (the lower convex hull of the size/loss trade-off), all of them in milliseconds.
`closed_form` is BAQ's continuous allocation (loss_t(b) = a_t 2^(-2b), equal marginal loss per
weight), a fast baseline that ignores the option grid.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_array

from mixq.errors import MixqError

if TYPE_CHECKING:
    from mixq.profile import Profile

_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


@dataclass(frozen=True)
class Budget:
    """A size limit for the whole model file: bits per weight ("3.0bpw") or bytes ("60MB", "58MiB")."""

    value: float
    unit: str  # "bpw" or "bytes"

    @classmethod
    def parse(cls, text: str) -> Budget:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]+)\s*", text)
        if m is None:
            raise MixqError(f"budget {text!r}: expected a number with a unit, e.g. 3.0bpw or 60MB")
        value, unit = float(m[1]), m[2].lower()
        if unit == "bpw":
            return cls(value, "bpw")
        if unit not in _UNITS:
            raise MixqError(f"budget {text!r}: unknown unit {m[2]!r} (bpw, B, KB, MB, GB, KiB, MiB, GiB)")
        return cls(value * _UNITS[unit], "bytes")

    def total_bytes(self, n_weights: int) -> int:
        """The largest whole-file size that meets the budget."""
        if self.unit == "bpw":
            return math.floor(self.value * n_weights / 8)
        return math.floor(self.value)

    def __str__(self) -> str:
        return f"{self.value:g}bpw" if self.unit == "bpw" else f"{int(self.value):,} bytes"


class InfeasibleBudget(MixqError):
    def __init__(self, capacity: int, smallest: int):
        self.capacity, self.smallest = capacity, smallest
        super().__init__(
            f"no plan fits in {capacity:,} bytes for the planned tensors; the smallest feasible plan needs "
            f"{smallest:,} bytes"
        )


LOSS_RTOL = 1e-9  # a plan's loss is a float sum: bounds hold up to this relative rounding


@dataclass(frozen=True)
class Limit:
    """A resource other than bytes that a plan must stay within: each tensor's cost in each option
    (T, O), e.g. the seconds of its matrix product per token, and the bound on their sum."""

    name: str  # what it limits, for messages: "decode time per token"
    cost: np.ndarray  # (T, O), finite wherever the option is allowed
    bound: float
    show: Callable[[float], str] = "{:.4g}".format  # a value in the user's units
    offset: float = 0.0  # a part of the total no plan changes (e.g. an engine's fixed time per token)

    def total(self, choice: np.ndarray) -> float:
        return float(self.cost[np.arange(len(choice)), choice].sum()) + self.offset


class InfeasibleLimits(MixqError):
    """No plan meets every limit at once; the message names the nearest values that can be met."""


class InfeasibleLoss(MixqError):
    def __init__(self, bound: float, least: float):
        self.bound, self.least = bound, least
        super().__init__(
            f"no plan has a predicted loss of at most {bound:g}; the least lossy plan in this option space "
            f"predicts {least:.4g} (allow more options, e.g. 16-bit tensors, or raise the bound)"
        )


@dataclass(frozen=True)
class Allocation:
    """One option index per tensor, with the plan's exact bytes and predicted loss."""

    choice: np.ndarray  # (T,) option index of each tensor
    nbytes: int
    loss: float


def group_arrays(
    loss: np.ndarray, nbytes: np.ndarray, groups: list[list[int]]
) -> tuple[np.ndarray, np.ndarray]:
    """Per-group loss (G, O) and bytes (G, O) from per-tensor ones (T, O); inf loss = not allowed."""
    L = np.stack([loss[g].sum(axis=0) for g in groups])
    B = np.stack([nbytes[g].sum(axis=0) for g in groups]).astype(np.int64)
    stuck = np.nonzero(~np.isfinite(L).any(axis=1))[0]
    if len(stuck):
        raise MixqError(f"tensors {groups[stuck[0]]} must share one option but no option is allowed for all of them")
    return L, B


def allocation_of(choice_g: np.ndarray, L: np.ndarray, B: np.ndarray, groups: list[list[int]], T: int) -> Allocation:
    choice = np.empty(T, dtype=np.int64)
    for g, members in enumerate(groups):
        choice[members] = choice_g[g]
    rows = np.arange(len(groups))
    return Allocation(choice, int(B[rows, choice_g].sum()), float(L[rows, choice_g].sum()))


def smallest_bytes(loss: np.ndarray, nbytes: np.ndarray, groups: list[list[int]]) -> int:
    L, B = group_arrays(loss, nbytes, groups)
    return int(np.where(np.isfinite(L), B, np.iinfo(np.int64).max).min(axis=1).sum())


def solve(loss: np.ndarray, nbytes: np.ndarray, capacity: int, groups: list[list[int]],
          limits: Sequence[Limit] = ()) -> Allocation:
    """The plan of least predicted loss whose bytes are at most `capacity` (exact) and that meets
    every further limit."""
    T = loss.shape[0]
    L, B = group_arrays(loss, nbytes, groups)
    smallest = smallest_bytes(loss, nbytes, groups)
    if smallest > capacity:
        raise InfeasibleBudget(capacity, smallest)
    _check_each_limit(L, limits, groups)
    g_idx, o_idx = np.nonzero(np.isfinite(L))  # one binary variable per allowed (group, option)
    rows = [B[g_idx, o_idx].astype(np.float64)] + [_grouped(lim.cost, groups)[g_idx, o_idx] for lim in limits]
    bounds = [float(capacity)] + [lim.bound - lim.offset for lim in limits]
    while True:
        choice_g = _solve_milp(L[g_idx, o_idx], rows, bounds, g_idx, o_idx, len(groups))
        if choice_g is None:
            names, rows_g, bounds_g, shown = _limit_rows(limits, groups)
            raise _infeasible_together(["bytes of the planned tensors", *names], [B.astype(np.float64), *rows_g],
                                       [float(capacity), *bounds_g], ["{:,.0f}".format, *shown], np.isfinite(L))
        alloc = allocation_of(choice_g, L, B, groups, T)
        over = [alloc.nbytes - capacity] + [_overshoot(lim, alloc) for lim in limits]
        if all(o <= 0 for o in over):
            break
        # HiGHS works in floating point: tighten each bound by its overshoot and solve again.
        bounds = [b - max(o, 0) for b, o in zip(bounds, over)]
    # Plans of equal predicted loss can differ in bytes (an exact option and a 16-bit one both
    # predict 0): of the least lossy plans, the smallest.
    smallest_of_least = solve_min_bytes(loss, nbytes, alloc.loss, groups, limits)
    return smallest_of_least if smallest_of_least.nbytes < alloc.nbytes else alloc


def _grouped(cost: np.ndarray, groups: list[list[int]]) -> np.ndarray:
    """Per-group (G, O) sums of a per-tensor (T, O) cost."""
    return np.stack([cost[g].sum(axis=0) for g in groups])


def _overshoot(lim: Limit, alloc: Allocation) -> float:
    """How far a plan's total exceeds the limit's bound, beyond float rounding (<= 0: it holds)."""
    return lim.total(alloc.choice) - lim.bound * (1 + LOSS_RTOL)


def _check_each_limit(L: np.ndarray, limits: Sequence[Limit], groups: list[list[int]]) -> None:
    """Refuse a limit that no plan meets even alone, naming the least value any plan reaches."""
    for lim in limits:
        least = float(np.where(np.isfinite(L), _grouped(lim.cost, groups), np.inf).min(axis=1).sum()) + lim.offset
        if least > lim.bound * (1 + LOSS_RTOL):
            raise InfeasibleLimits(f"no plan has a {lim.name} of at most {lim.show(lim.bound)}; the least in "
                                   f"this option space is {lim.show(least)}")


def _infeasible_together(what: list[str], rows: list[np.ndarray], bounds: list[float],
                         shown: list[Callable[[float], str]], allowed: np.ndarray) -> InfeasibleLimits:
    """Every bound can be met alone but not all together: for each, the least its row can be with
    the others kept (the nearest feasible values). Rows are (G, O); `allowed` marks the options."""
    g_idx, o_idx = np.nonzero(allowed)
    n_groups = allowed.shape[0]
    nearest = []
    for i in range(len(rows)):
        others = [k for k in range(len(rows)) if k != i]
        choice_g = _solve_milp(rows[i][g_idx, o_idx], [rows[k][g_idx, o_idx] for k in others],
                               [bounds[k] for k in others], g_idx, o_idx, n_groups)
        if choice_g is not None:
            nearest.append(f"{what[i]} of {shown[i](float(rows[i][np.arange(n_groups), choice_g].sum()))}")
    names = [f"the {w} limit" for w in what]
    names = ", ".join(names[:-1]) + " and " + names[-1]
    detail = ("; with the others kept, the least feasible is " + " or ".join(nearest)) if nearest else ""
    return InfeasibleLimits(f"no plan meets {names} together{detail}")


def _limit_rows(limits: Sequence[Limit], groups: list[list[int]]):
    """(names, (G, O) rows, bounds, formatters) of further limits, for `_infeasible_together`."""
    return ([lim.name for lim in limits], [_grouped(lim.cost, groups) for lim in limits],
            [lim.bound - lim.offset for lim in limits],
            [lambda v, lim=lim: lim.show(v + lim.offset) for lim in limits])


def _solve_milp(cost: np.ndarray, weights: list[np.ndarray], limits: list[float], g_idx: np.ndarray,
                o_idx: np.ndarray, n_groups: int) -> np.ndarray | None:
    """One option per group (variables are the allowed (group, option) pairs) of least total cost
    with each total weight within its limit: the chosen option of each group, or None if no choice
    meets the limits."""
    n = len(g_idx)
    one_each = coo_array((np.ones(n), (g_idx, np.arange(n))), shape=(n_groups, n))
    res = milp(
        c=cost,
        integrality=np.ones(n),
        bounds=Bounds(0, 1),
        constraints=[LinearConstraint(one_each, 1, 1)]
        + [LinearConstraint(w[None, :], -np.inf, lim) for w, lim in zip(weights, limits)],
        options={"mip_rel_gap": 0.0},
    )
    if res.status == 2:  # infeasible
        return None
    if res.x is None:
        raise MixqError(f"the MILP solver failed: {res.message}")
    chosen = res.x > 0.5
    choice_g = np.empty(n_groups, dtype=np.int64)
    choice_g[g_idx[chosen]] = o_idx[chosen]
    return choice_g


def solve_min_bytes(loss: np.ndarray, nbytes: np.ndarray, max_loss: float, groups: list[list[int]],
                    limits: Sequence[Limit] = ()) -> Allocation:
    """The plan of fewest bytes whose predicted loss is at most `max_loss` (exact in bytes; the loss
    bound is checked on the plan's own sum, up to float rounding (LOSS_RTOL), and tightened and
    solved again if HiGHS's tolerance let it slip) and that meets every further limit.

    The constraint is written on each group's loss above its least, as a share of the slack
    max_loss - least: options that alone exceed the slack are dropped, so the coefficients stay
    within [0, 1] whatever the scale of the losses.
    """
    T = loss.shape[0]
    L, B = group_arrays(loss, nbytes, groups)
    least_g = np.where(np.isfinite(L), L, np.inf).min(axis=1)
    least = float(least_g.sum())
    if least > max_loss:
        raise InfeasibleLoss(max_loss, least)
    _check_each_limit(L, limits, groups)
    slack = max_loss * (1 + LOSS_RTOL) - least  # the same float rounding allowance as the final check
    excess = L - least_g[:, None]
    g_idx, o_idx = np.nonzero(np.isfinite(L) & (excess <= slack))
    share = excess[g_idx, o_idx] / slack if slack > 0 else np.zeros(len(g_idx))
    size = B[g_idx, o_idx].astype(np.float64)
    rows = [share] + [_grouped(lim.cost, groups)[g_idx, o_idx] for lim in limits]
    bounds = [1.0] + [lim.bound - lim.offset for lim in limits]
    while True:
        choice_g = _solve_milp(size, rows, bounds, g_idx, o_idx, len(groups))
        if choice_g is None:
            names, rows_g, bounds_g, shown = _limit_rows(limits, groups)
            allowed = np.isfinite(L)
            raise _infeasible_together(["predicted loss", *names], [np.where(allowed, L, 0.0), *rows_g],
                                       [max_loss, *bounds_g], ["{:.4g}".format, *shown], allowed)
        alloc = allocation_of(choice_g, L, B, groups, T)
        loss_over = (alloc.loss - max_loss) / slack + 1e-9 if alloc.loss > max_loss * (1 + LOSS_RTOL) and slack > 0 else 0
        over = [loss_over] + [_overshoot(lim, alloc) for lim in limits]
        if all(o <= 0 for o in over):
            return alloc
        bounds = [b - max(o, 0) for b, o in zip(bounds, over)]


def frontier(loss: np.ndarray, nbytes: np.ndarray, groups: list[list[int]], axis: np.ndarray | None = None
             ) -> list[Allocation]:
    """Plans on the lower convex hull of (cost, loss), from the cheapest to the least lossy; the cost
    is the bytes, or `axis` (a (T, O) cost such as a time per decoded token).

    Each is optimal for its own cost: start every group at its cheapest option and apply the
    upgrades along each group's convex hull in order of loss saved per unit of cost.
    """
    T = loss.shape[0]
    L, B = group_arrays(loss, nbytes, groups)
    C = B if axis is None else _grouped(axis, groups)
    start = np.empty(len(groups), dtype=np.int64)
    upgrades = []  # (loss saved per unit of cost, group, option)
    for g in range(len(groups)):
        allowed = np.nonzero(np.isfinite(L[g]))[0]
        hull = _lower_hull(allowed, C[g], L[g])
        start[g] = hull[0]
        for a, b in zip(hull, hull[1:]):
            upgrades.append(((L[g, a] - L[g, b]) / (C[g, b] - C[g, a]), g, b))
    upgrades.sort(key=lambda u: -u[0])  # steepest first; within a group slopes decrease, so order holds
    group_of = np.empty(T, dtype=np.int64)  # tensor -> its group, to expand group choices at once
    for g, members in enumerate(groups):
        group_of[members] = g
    rows = np.arange(len(groups))
    choice_g = start.copy()
    nbytes, total = int(B[rows, start].sum()), float(L[rows, start].sum())
    plans = [Allocation(choice_g[group_of], nbytes, total)]
    for _, g, o in upgrades:
        nbytes += int(B[g, o] - B[g, choice_g[g]])
        total += float(L[g, o] - L[g, choice_g[g]])
        choice_g[g] = o
        plans.append(Allocation(choice_g[group_of], nbytes, total))
    return plans


def _lower_hull(options: np.ndarray, B: np.ndarray, L: np.ndarray) -> list[int]:
    """Options on the lower-left convex hull of (cost B, loss), by increasing cost and decreasing loss."""
    order = sorted(options.tolist(), key=lambda o: (B[o], L[o]))
    hull: list[int] = []
    for o in order:
        if hull and L[o] >= L[hull[-1]]:
            continue  # no cheaper in loss than something smaller: never worth it
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # drop b if it lies on or above the segment a -> o
            if (L[b] - L[a]) * (B[o] - B[a]) >= (L[o] - L[a]) * (B[b] - B[a]):
                hull.pop()
            else:
                break
        hull.append(o)
    return hull


def closed_form(a: np.ndarray, n: np.ndarray, total_bits: float, lo: float, hi: float) -> tuple[np.ndarray, float]:
    """BAQ's continuous allocation: bits b_t minimising sum a_t 2^(-2 b_t) with sum n_t b_t = total_bits.

    At the optimum every tensor's marginal loss per weight is equal: a_t 2^(-2 b_t) = lam n_t, i.e.
    b_t = log2(a_t / (lam n_t)) / 2, clipped to [lo, hi]; lam is found by bisection on log lam.
    Returns the bits per tensor and the predicted loss.
    """
    a = np.maximum(a, 1e-300)
    if total_bits < lo * n.sum() - 1e-9 or total_bits > hi * n.sum() + 1e-9:
        raise MixqError(f"closed form: {total_bits / n.sum():.3f} bits per weight is outside [{lo}, {hi}]")

    def bits(log_lam: float) -> np.ndarray:
        return np.clip(0.5 * (np.log2(a / n) - log_lam), lo, hi)

    low, high = -2000.0, 2000.0  # log2 lam: bits decrease as lam grows
    for _ in range(200):
        mid = (low + high) / 2
        if (bits(mid) * n).sum() > total_bits:
            low = mid
        else:
            high = mid
    b = bits(high)
    return b, float((a * 2.0 ** (-2 * b)).sum())


@dataclass(frozen=True)
class Plan:
    """tensor -> option, with the predicted loss and the size of the file it makes."""

    options: dict[str, str]
    estimator: str
    solver: str
    predicted_loss: float
    planned_bytes: int  # the planned tensors, exactly
    max_file_bytes: int  # planned + fixed tensors + the header's upper bound
    n_weights: int
    limited: dict[str, float] = field(default_factory=dict)  # each further limit's name -> the plan's total

    @property
    def bpw(self) -> float:
        return 8 * self.max_file_bytes / self.n_weights

    def as_dict(self) -> dict:
        return dict(self.__dict__, bpw=self.bpw)


def plan_from_options(profile: Profile, options: dict[str, str], estimator: str, solver: str) -> Plan:
    """A hand-made plan (tensor -> option name) priced with the profile's tables."""
    missing = set(profile.tensors) - set(options)
    if missing:
        raise MixqError(f"plan leaves {len(missing)} tensors without an option, e.g. {sorted(missing)[0]}")
    choice = np.array([profile.options.index(options[t]) for t in profile.tensors])
    rows = np.arange(len(choice))
    loss = profile.predicted(estimator)[rows, choice]
    alloc = Allocation(choice, int(profile.nbytes[rows, choice].sum()), float(loss.sum()))
    return plan_of(profile, alloc, estimator, solver)


def plan_of(profile: Profile, alloc: Allocation, estimator: str, solver: str, limits: Sequence[Limit] = ()) -> Plan:
    return Plan(
        options={t: profile.options[o] for t, o in zip(profile.tensors, alloc.choice.tolist())},
        estimator=estimator, solver=solver, predicted_loss=alloc.loss, planned_bytes=alloc.nbytes,
        max_file_bytes=alloc.nbytes + profile.fixed_bytes + profile.header_bytes, n_weights=profile.n_weights,
        limited={lim.name: lim.total(alloc.choice) for lim in limits},
    )


def capacity(profile: Profile, budget: Budget) -> int:
    """Bytes left for the planned tensors once fixed tensors and the header are paid for."""
    return budget.total_bytes(profile.n_weights) - profile.fixed_bytes - profile.header_bytes


def budget_infeasible(budget: Budget, smallest_file: int, n_weights: int) -> MixqError:
    """The error for a budget below the smallest file the option space can make."""
    return MixqError(
        f"budget {budget} ({budget.total_bytes(n_weights):,} bytes) is infeasible: the smallest plan in this "
        f"option space needs {smallest_file:,} bytes ({8 * smallest_file / n_weights:.3f} bpw)"
    )


def plan_for_budget(profile: Profile, budget: Budget, estimator: str = "hessian+kl",
                    limits: Sequence[Limit] = ()) -> Plan:
    """The exact least-loss plan whose whole file fits the budget and that meets every further limit."""
    loss = profile.predicted(estimator)
    try:
        alloc = solve(loss, profile.nbytes, capacity(profile, budget), profile.tie_groups, limits)
    except InfeasibleBudget as e:
        raise budget_infeasible(budget, e.smallest + profile.fixed_bytes + profile.header_bytes, profile.n_weights) from None
    return plan_of(profile, alloc, estimator, "milp", limits)


def plan_for_loss(profile: Profile, max_loss: float, estimator: str = "hessian+kl",
                  limits: Sequence[Limit] = ()) -> Plan:
    """The exact smallest plan whose predicted loss is at most `max_loss` and that meets every further limit."""
    if not max_loss > 0:
        raise MixqError(f"the loss bound must be positive, got {max_loss}")
    alloc = solve_min_bytes(profile.predicted(estimator), profile.nbytes, max_loss, profile.tie_groups, limits)
    return plan_of(profile, alloc, estimator, "milp-loss", limits)


def frontier_plans(profile: Profile, estimator: str = "hessian+kl", axis: Limit | None = None) -> list[Plan]:
    """The frontier along the bytes, or along `axis` (its bound unused): each plan's total on the axis
    is in its `limited`."""
    loss = profile.predicted(estimator)
    cost = None if axis is None else axis.cost
    limits = [] if axis is None else [axis]
    return [plan_of(profile, a, estimator, "frontier", limits)
            for a in frontier(loss, profile.nbytes, profile.tie_groups, cost)]


def closed_form_plan(profile: Profile, budget: Budget, estimator: str = "hessian+kl") -> tuple[Plan, float]:
    """BAQ's continuous allocation, rounded down onto the option grid; also its continuous loss.

    Per tie group g, loss_g(b) = a_g 2^(-2b) is fitted through its options (median of
    loss * 2^(2 bits)); the continuous optimum is rounded per group to the least lossy option
    whose bytes stay within the group's continuous share.
    """
    loss = profile.predicted(estimator)
    L, B = group_arrays(loss, profile.nbytes, profile.tie_groups)
    n = np.array([sum(profile.shapes[t][0] * profile.shapes[t][1] for t in g) for g in profile.tie_groups], float)
    bits = 8 * B / n[:, None]
    usable = np.isfinite(L) & (L > 0)
    with np.errstate(over="ignore", invalid="ignore"):
        a = np.array([np.median(L[g][usable[g]] * 2.0 ** (2 * bits[g][usable[g]])) for g in range(len(n))])
    lo = float(np.where(np.isfinite(L), bits, np.inf).min(axis=1).max())
    hi = float(np.where(np.isfinite(L), bits, -np.inf).max(axis=1).min())
    total_bits = 8.0 * capacity(profile, budget)
    b, continuous_loss = closed_form(a, n, min(max(total_bits, lo * n.sum()), hi * n.sum()), lo, hi)
    choice_g = np.empty(len(n), dtype=np.int64)
    for g in range(len(n)):
        fits = np.isfinite(L[g]) & (B[g] <= b[g] * n[g] / 8 + 1e-9)
        cand = np.nonzero(fits)[0] if fits.any() else [int(np.argmin(np.where(np.isfinite(L[g]), B[g], np.inf)))]
        choice_g[g] = min(cand, key=lambda o: L[g, o])
    alloc = allocation_of(choice_g, L, B, profile.tie_groups, loss.shape[0])
    return plan_of(profile, alloc, estimator, "closed-form"), continuous_loss
