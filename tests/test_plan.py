import itertools

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from mixq.errors import MixqError
from mixq.plan import (
    Budget,
    InfeasibleBudget,
    LOSS_RTOL,
    InfeasibleLimits,
    InfeasibleLoss,
    Limit,
    closed_form,
    frontier,
    smallest_bytes,
    solve,
    solve_min_bytes,
)


def instance(seed: int, T: int, O: int, tie: bool):
    rng = np.random.default_rng(seed)
    nbytes = rng.integers(1, 1000, size=(T, O)).astype(np.int64)
    loss = rng.random((T, O)) * 10
    loss[rng.random((T, O)) < 0.15] = np.inf  # some options not allowed
    loss[np.arange(T), rng.integers(0, O, T)] = rng.random(T)  # at least one allowed per tensor
    if tie and T >= 3:
        groups = [[0, 1], *[[t] for t in range(2, T)]]
    else:
        groups = [[t] for t in range(T)]
    return loss, nbytes, groups


def every_plan(loss, nbytes, groups):
    """(bytes, loss) of every plan, tie groups sharing one option."""
    for combo in itertools.product(range(loss.shape[1]), repeat=len(groups)):
        choice = np.empty(loss.shape[0], dtype=int)
        for g, o in zip(groups, combo):
            choice[g] = o
        rows = np.arange(len(choice))
        yield nbytes[rows, choice].sum(), loss[rows, choice].sum()


def brute_force(loss, nbytes, capacity, groups):
    return min((total for size, total in every_plan(loss, nbytes, groups) if size <= capacity), default=np.inf)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10**6), T=st.integers(1, 5), O=st.integers(1, 4), tie=st.booleans(),
       frac=st.floats(0.0, 1.0))
def test_solver_equals_brute_force_and_never_exceeds(seed, T, O, tie, frac):
    loss, nbytes, groups = instance(seed, T, O, tie)
    assume(all(np.isfinite(loss[g].sum(axis=0)).any() for g in groups))  # see test_tie_group_without_option
    lo = smallest_bytes(loss, nbytes, groups)
    capacity = int(lo + frac * (nbytes.max() * T - lo))
    best = brute_force(loss, nbytes, capacity, groups)
    alloc = solve(loss, nbytes, capacity, groups)
    assert alloc.nbytes <= capacity
    assert alloc.loss == pytest.approx(best, rel=1e-9, abs=1e-9)
    for g in groups:  # tie groups share one option
        assert len(set(alloc.choice[g].tolist())) == 1


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10**6), T=st.integers(1, 5), O=st.integers(2, 4), frac=st.floats(0.0, 1.0))
def test_of_plans_with_equal_least_loss_the_solver_takes_the_fewest_bytes(seed, T, O, frac):
    """Losses from {0, 1, 2} make many plans tie (as exact and 16-bit options both predict 0)."""
    rng = np.random.default_rng(seed)
    nbytes = rng.integers(1, 1000, size=(T, O)).astype(np.int64)
    loss = rng.integers(0, 3, size=(T, O)).astype(float)
    groups = [[t] for t in range(T)]
    lo = smallest_bytes(loss, nbytes, groups)
    capacity = int(lo + frac * (nbytes.max() * T - lo))
    plans = [(total, size) for size, total in every_plan(loss, nbytes, groups) if size <= capacity]
    alloc = solve(loss, nbytes, capacity, groups)
    assert (alloc.loss, alloc.nbytes) == min(plans)


def test_tie_group_without_a_common_option_is_an_error():
    loss = np.array([[1.0, np.inf], [np.inf, 1.0]])
    with pytest.raises(MixqError, match="must share one option"):
        solve(loss, np.ones((2, 2), np.int64), 10, [[0, 1]])


def test_infeasible_budget_names_the_smallest():
    loss, nbytes, groups = instance(0, 4, 3, False)
    lo = smallest_bytes(loss, nbytes, groups)
    with pytest.raises(InfeasibleBudget) as e:
        solve(loss, nbytes, lo - 1, groups)
    assert e.value.smallest == lo and f"{lo:,}" in str(e.value)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10**6), T=st.integers(1, 30), O=st.integers(1, 8))
def test_frontier_is_monotone_and_optimal_at_its_points(seed, T, O):
    loss, nbytes, groups = instance(seed, T, O, True)
    assume(all(np.isfinite(loss[g].sum(axis=0)).any() for g in groups))  # see test_tie_group_without_option
    plans = frontier(loss, nbytes, groups)
    sizes = [p.nbytes for p in plans]
    losses = [p.loss for p in plans]
    assert sizes == sorted(sizes) and losses == sorted(losses, reverse=True)
    for p in plans[:: max(1, len(plans) // 4)]:
        assert solve(loss, nbytes, p.nbytes, groups).loss == pytest.approx(p.loss, rel=1e-9, abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10**6), T=st.integers(1, 30), O=st.integers(1, 8))
def test_frontier_along_another_cost_is_optimal_for_that_cost(seed, T, O):
    """Along a time per token (bytes free): each frontier plan is the least loss at its own time."""
    loss, nbytes, groups = instance(seed, T, O, True)
    assume(all(np.isfinite(loss[g].sum(axis=0)).any() for g in groups))
    seconds = np.random.default_rng(seed + 1).random((T, O))
    plans = frontier(loss, nbytes, groups, axis=seconds)
    times = [float(seconds[np.arange(T), p.choice].sum()) for p in plans]
    assert times == sorted(times) and [p.loss for p in plans] == sorted((p.loss for p in plans), reverse=True)
    for p, t in list(zip(plans, times))[:: max(1, len(plans) // 4)]:
        assert p.nbytes == nbytes[np.arange(T), p.choice].sum()
        best = solve(loss, nbytes, int(nbytes.sum()), groups, [Limit("time", seconds, t * (1 + 1e-12))])
        assert best.loss == pytest.approx(p.loss, rel=1e-9, abs=1e-12)


def test_budget_parsing():
    assert Budget.parse("3.0bpw") == Budget(3.0, "bpw")
    assert Budget.parse("60MB").total_bytes(0) == 60_000_000
    assert Budget.parse("1MiB").total_bytes(0) == 2**20
    assert Budget.parse("3bpw").total_bytes(1000) == 375
    for bad in ("3", "bpw", "3 parsecs", "-1bpw"):
        with pytest.raises(Exception):
            Budget.parse(bad)


def test_closed_form_has_equal_marginal_loss():
    a = np.array([1.0, 10.0, 100.0, 1000.0])
    n = np.array([10.0, 10.0, 20.0, 5.0])
    bits, total = closed_form(a, n, total_bits=4.0 * n.sum(), lo=1, hi=16)
    assert (bits * n).sum() == pytest.approx(4.0 * n.sum())
    marginal = a * 2.0 ** (-2 * bits) / n
    assert np.allclose(marginal, marginal[0], rtol=1e-6)
    assert total == pytest.approx((a * 2.0 ** (-2 * bits)).sum())


def brute_force_min_bytes(loss, nbytes, max_loss, groups):
    return min(size for size, total in every_plan(loss, nbytes, groups) if total <= max_loss * (1 + LOSS_RTOL))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10**6), T=st.integers(1, 5), O=st.integers(1, 4), tie=st.booleans(),
       frac=st.floats(0.0, 1.0))
def test_min_bytes_under_a_loss_bound_equals_brute_force(seed, T, O, tie, frac):
    loss, nbytes, groups = instance(seed, T, O, tie)
    L = np.stack([loss[g].sum(axis=0) for g in groups])
    assume(np.isfinite(L).any(axis=1).all())  # every tie group has an allowed option
    least = np.where(np.isfinite(L), L, np.inf).min(axis=1).sum()
    most = np.where(np.isfinite(L), L, -np.inf).max(axis=1).sum()
    bound = least + frac * (most - least)
    size = brute_force_min_bytes(loss, nbytes, bound, groups)
    alloc = solve_min_bytes(loss, nbytes, bound, groups)
    assert alloc.nbytes == size
    assert alloc.loss <= bound * (1 + LOSS_RTOL)


def test_unreachable_loss_bound_names_the_least_loss():
    loss = np.array([[1.0, 2.0], [0.5, np.inf]])
    nbytes = np.array([[10, 5], [8, 4]])
    with pytest.raises(InfeasibleLoss, match=r"at most 1; the least lossy plan in this option space predicts 1\.5"):
        solve_min_bytes(loss, nbytes, 1.0, [[0], [1]])


def every_choice(O: int, groups: list[list[int]], T: int):
    for combo in itertools.product(range(O), repeat=len(groups)):
        choice = np.empty(T, dtype=int)
        for g, o in zip(groups, combo):
            choice[g] = o
        yield choice


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 10**6), T=st.integers(1, 5), O=st.integers(1, 4), tie=st.booleans(),
       byte_frac=st.floats(0.0, 1.0), time_frac=st.floats(-0.2, 1.0))
def test_solver_with_a_second_limit_equals_brute_force(seed, T, O, tie, byte_frac, time_frac):
    """Bytes and a time limit at once: the least lossy plan meeting both, or an error exactly when
    no plan meets both (brute force over every plan)."""
    assume(abs(time_frac) > 1e-6)  # a bound within float rounding of the fastest plan holds either way
    loss, nbytes, groups = instance(seed, T, O, tie)
    assume(all(np.isfinite(loss[g].sum(axis=0)).any() for g in groups))
    seconds = np.random.default_rng(seed + 1).random((T, O)) * 1e-3  # unrelated to bytes, as on a real CPU
    lo = smallest_bytes(loss, nbytes, groups)
    capacity = int(lo + byte_frac * (nbytes.max() * T - lo))
    fastest = min(seconds[np.arange(T), c].sum() for c in every_choice(O, groups, T)
                  if np.isfinite(loss[np.arange(T), c]).all())
    bound = fastest * (1 + time_frac)
    rows = np.arange(T)
    feasible = [c for c in every_choice(O, groups, T) if np.isfinite(loss[rows, c]).all()
                and nbytes[rows, c].sum() <= capacity and seconds[rows, c].sum() <= bound]
    offset = fastest * 0.5  # a fixed part (an engine's time outside the products) moves the bound, not the plan
    limit = Limit("decode time", seconds, bound + offset, offset=offset)
    if not feasible:
        with pytest.raises(MixqError, match="no plan"):
            solve(loss, nbytes, capacity, groups, [limit])
        return
    best = min(loss[rows, c].sum() for c in feasible)
    alloc = solve(loss, nbytes, capacity, groups, [limit])
    assert alloc.nbytes <= capacity and limit.total(alloc.choice) <= (bound + offset) * (1 + LOSS_RTOL)
    assert alloc.loss == pytest.approx(best, rel=1e-9, abs=1e-9)


def test_limits_that_only_fail_together_name_the_nearest_feasible_values():
    """Two tensors, options (small, slow) and (large, fast): 14 bytes or 3 s each alone, not both."""
    loss = np.array([[1.0, 0.5], [1.0, 0.5]])
    nbytes = np.array([[5, 10], [5, 10]])
    seconds = np.array([[2.0, 1.0], [2.0, 1.0]])
    limit = Limit("decode time per token", seconds, 3.0, show="{:g} s".format)
    with pytest.raises(InfeasibleLimits) as e:
        solve(loss, nbytes, 14, [[0], [1]], [limit])
    assert str(e.value) == ("no plan meets the bytes of the planned tensors limit and the decode time per token limit "
                            "together; with the others kept, the least feasible is bytes of the planned tensors of 15 "
                            "or decode time per token of 4 s")
    # The quality-constrained twin, where the less lossy option is the slower: loss <= 1 needs 4 s.
    slow = np.array([[1.0, 2.0], [1.0, 2.0]])
    with pytest.raises(InfeasibleLimits) as e:
        solve_min_bytes(loss, nbytes, 1.0, [[0], [1]], [Limit("decode time per token", slow, 3.0, show="{:g} s".format)])
    assert str(e.value).endswith("the least feasible is predicted loss of 1.5 or decode time per token of 4 s"), e.value
    with pytest.raises(InfeasibleLimits, match="least in this option space is 2 s"):
        solve(loss, nbytes, 100, [[0], [1]], [Limit("decode time per token", seconds, 1.5, show="{:g} s".format)])
