"""Place a model's blocks on devices and choose their tensors' options together, exactly.

Engines that split a model over devices by layers (llama.cpp's `-ngl` and `--tensor-split`,
transformers' device maps) give each device a run of consecutive blocks: the host ("cpu") keeps the
token embedding and the first blocks, the accelerators take the rest in the order given, and the
last of them takes the output matrix once every block is off the host. A device holds its blocks'
weights and their KV cache, so which blocks fit where depends on the options chosen, and the
options that fit depend on where the blocks are: both are decided in one MILP.

Positions k are the blocks 0..K-1 and the output K; p[k,d] = 1 when position k sits on device d
(d = 0: the host); z[g,o,d] = 1 when tie group g (all inside one position) takes option o on device d:

    minimise    sum L[g,o] z[g,o,d]
    subject to  sum_o z[g,o,d] = p[k(g),d]                            (a group is where its block is)
                sum_d p[k,d] = 1
                sum_{d'<=d} p[k,d'] >= sum_{d'<=d} p[k+1,d']  (k < K-1: blocks on devices in layer order)
                sum_{d>0} p[K,d] <= 1 - p[0,0],  p[K,d] <= p[K-1,d]  (the output leaves the host only
                                                                    after every block, to the last one's)
                sum B[g,o] z[g,o,d] + sum_k KV[k] p[k,d] <= C_d - F     (each device's memory)

plus, optionally, the whole file's bytes and a fixed number of positions off the host. The token
embedding stays on the host; a tied one is counted twice: llama.cpp loads the output matrix as a
copy of it wherever the output's buffer differs from the embedding's (an accelerator, or the host's
repacked layouts: Q4_0 is held twice there). Where it does not (Q5_0 on the host), llama.cpp shares
one copy, and the count is one embedding above what it holds: a bound. F, the
parameters no plan decides on (norms), is charged to every device: a bound of a few kilobytes.
Among the plans of least loss (within TIE_RTOL of it), the fastest wins: the least time per token
when the devices' latency tables are given, else the most positions off the host.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_array

from mixq.errors import MixqError
from mixq.models.layout import block_and_kind
from mixq.plan import Allocation, Budget, Limit, Plan, allocation_of, capacity, group_arrays, plan_of
from mixq.profile import Profile

HOST = "cpu"
TIE_RTOL = 1e-6  # plans whose predicted losses differ by less than this share count as equally good
KV_BYTES = 2  # llama.cpp's default KV cache type, f16
_KV_KINDS = ("k_proj", "v_proj")  # the projections whose outputs the KV cache keeps, per token


@dataclass(frozen=True)
class Device:
    name: str
    capacity: float  # bytes; inf for a host the user did not name
    holds_blocks: bool = True  # False: a host the user did not name keeps only the token embedding


@dataclass(frozen=True)
class DeviceBudget:
    """Memory per device, in layer order: the host first, then the accelerators as given."""

    devices: tuple[Device, ...]

    @classmethod
    def parse(cls, text: str) -> DeviceBudget:
        devices = []
        for part in text.split(","):
            name, eq, size = part.partition("=")
            if not (eq and re.fullmatch(r"[A-Za-z][\w:-]*", name.strip())):
                raise MixqError(f"device budget {part.strip()!r}: expected NAME=SIZE, e.g. gpu0=6GiB,cpu=10GiB")
            memory = Budget.parse(size)
            if memory.unit != "bytes":
                raise MixqError(f"device budget {part.strip()!r}: a device's memory is a size (6GiB, 900MB), "
                                f"not {memory}")
            devices.append(Device(name.strip().lower(), memory.total_bytes(0)))
        names = [d.name for d in devices]
        if len(set(names)) < len(names):
            raise MixqError(f"device budget {text!r} names a device twice")
        host = [d for d in devices if d.name == HOST] or [Device(HOST, math.inf, holds_blocks=False)]
        return cls((host[0], *(d for d in devices if d.name != HOST)))

    def __str__(self) -> str:
        return ",".join(f"{d.name}={show_bytes(d.capacity)}" for d in self.devices if d.holds_blocks)


def show_bytes(n: float) -> str:
    if n >= 2**30:
        return f"{n / 2**30:.2f}GiB"
    return f"{n / 2**20:.1f}MiB" if n >= 2**20 else f"{n / 2**10:.1f}KiB"


@dataclass(frozen=True)
class Placement:
    """Where each position sits and what each device holds."""

    devices: tuple[Device, ...]
    device_of: tuple[int, ...]  # per position (blocks, then the output): index into devices
    weights: tuple[int, ...]  # per device: bytes of the planned tensors it holds
    kv_cache: tuple[int, ...]  # per device: bytes of its blocks' KV cache
    fixed: int  # bytes of the parameters no plan decides on, charged to every device
    context: int
    seconds: float | None = None  # predicted time per decoded token, when the devices' times are known

    def positions_on(self, d: int) -> list[int]:
        return [k for k, dev in enumerate(self.device_of) if dev == d]

    def offloaded(self) -> int:
        """Positions off the host: llama.cpp's -ngl."""
        return sum(dev != 0 for dev in self.device_of)

    def llama_cpp_flags(self) -> str:
        """The llama.cpp options that split a model this way: the host's blocks come first, each
        accelerator takes its count of the positions after them (--tensor-split is proportional)."""
        flags = f"-ngl {self.offloaded()}"
        counts = [len(self.positions_on(d)) for d in range(1, len(self.devices))]
        if len(counts) > 1:
            flags += " --tensor-split " + ",".join(map(str, counts))
        return flags

    def as_dict(self) -> dict:
        n_blocks = len(self.device_of) - 1
        out = {}
        for d, dev in enumerate(self.devices):
            on = self.positions_on(d)
            blocks = [k for k in on if k < n_blocks]
            out[dev.name] = {
                "blocks": [blocks[0], blocks[-1]] if blocks else [], "output": n_blocks in on,
                "weights": self.weights[d], "kv_cache": self.kv_cache[d],
                "capacity": dev.capacity if math.isfinite(dev.capacity) else None,
            }
        return {"context": self.context, "kv_bytes_per_value": KV_BYTES, "devices": out}


def positions(profile: Profile) -> np.ndarray:
    """The position of each tensor: its block, the output K (after the K blocks), or -1 for a token
    embedding of its own."""
    blocks = [block_and_kind(t)[0] for t in profile.tensors]
    n_blocks = 1 + max((b for b in blocks if b is not None), default=-1)
    pos = [b if b is not None else (-1 if kind == "embedding" else n_blocks) for b, kind in zip(blocks, profile.kinds)]
    return np.array(pos)


def kv_cache_bytes(tensors: list[str], kinds: list[str], shapes: list[tuple[int, int]], context: int,
                   values_per_token: int | None = None) -> np.ndarray:
    """Bytes of each block's KV cache for `context` tokens: `values_per_token` per block (the config's
    keys and values of every KV head) if known, else the widths of the block's k and v projections."""
    blocks = [block_and_kind(t)[0] for t in tensors]
    n_blocks = 1 + max((b for b in blocks if b is not None), default=-1)
    if context == 0:
        return np.zeros(n_blocks, dtype=np.int64)
    if values_per_token:
        return np.full(n_blocks, values_per_token * context * KV_BYTES, dtype=np.int64)
    kv = np.zeros(n_blocks, dtype=np.int64)
    for b, kind, (rows, _) in zip(blocks, kinds, shapes):
        if b is not None and kind.endswith(_KV_KINDS):
            kv[b] += rows * context * KV_BYTES
    if n_blocks and not kv.any():
        raise MixqError("cannot tell the KV cache of this model's blocks from its profile (no head counts recorded, "
                        "no separate k and v projections): profile it again, or give --context 0 to leave the KV "
                        "cache out of the device budgets")
    return kv


def solve_placement(loss: np.ndarray, nbytes: np.ndarray, groups: list[list[int]], position: np.ndarray,
                    kv: np.ndarray, copied_to_host: np.ndarray, devices: DeviceBudget, fixed_bytes: int = 0,
                    context: int = 0, file_cap: int | None = None, offloaded: int | None = None,
                    names: list[str] | None = None, time_limits: Sequence[Limit] = ()) -> tuple[Allocation, Placement]:
    """The MILP of the module docstring over (T, O) `loss` and `nbytes`: `position` is each tensor's
    block (len(kv) for the output, -1 for a token embedding kept on the host), `kv` each block's KV
    cache bytes, `copied_to_host` marks an output matrix whose tied embedding stays on the host.
    `time_limits`, one per device (its products' seconds per token, one bound), limit the time of a
    decoded token: each position's products run on its device, one after another; the engine's fixed
    time per token is taken as the largest of the devices' offsets."""
    L, B = group_arrays(loss, nbytes, groups)
    group_pos = []
    for g in groups:
        at = set(position[g].tolist())
        if len(at) > 1:
            shown = [names[t] for t in g] if names else g
            raise MixqError(f"tensors {shown} share one option across blocks: they cannot be placed block by block")
        group_pos.append(at.pop())
    n_pos, n_dev = len(kv) + 1, len(devices.devices)
    if offloaded is not None and not 0 <= offloaded <= n_pos:
        raise MixqError(f"--offload {offloaded}: this model has {len(kv)} blocks and the output, so 0 to {n_pos}")
    if n_dev == 1 and offloaded:
        raise MixqError("--offload moves blocks off the host: name an accelerator in --device-budget too")
    time = offset = time_cap = None
    if time_limits:
        time = np.stack([np.stack([lim.cost[g].sum(axis=0) for g in groups]) for lim in time_limits])
        offset = max(lim.offset for lim in time_limits)
        time_cap = time_limits[0].bound - offset
    copied = np.array([copied_to_host[g].any() for g in groups])
    problem = _Problem(L, B, np.array(group_pos), kv, n_pos, n_dev, copied, devices.devices[0].holds_blocks, time)
    cap = np.array([d.capacity for d in devices.devices], dtype=np.float64) - fixed_bytes
    x = problem.solve(cap, file_cap, time_cap, offloaded)
    if x is None:
        raise problem.infeasible(cap, devices, file_cap, time_cap, offloaded, context,
                                 time_limits[0].show if time_limits else None, offset)
    choice_g, device_of = x
    weights, kv_used, seconds = problem.usage(choice_g, device_of)
    return (allocation_of(choice_g, L, B, groups, loss.shape[0]),
            Placement(devices.devices, tuple(device_of.tolist()), tuple(weights), tuple(kv_used), fixed_bytes, context,
                      None if seconds is None else seconds + offset))


class _Problem:
    """The MILP's variables and rows for one profile and device list: z[g,o,d] for every allowed
    (group, option) on every device it may sit on, then p[k,d]."""

    def __init__(self, L, B, group_pos, kv, n_pos, n_dev, copied_to_host, host_holds_blocks, time=None):
        self.L, self.B, self.kv, self.n_pos, self.n_dev = L, B, kv, n_pos, n_dev
        self.group_pos, self.copied_to_host, self.host_holds_blocks = group_pos, copied_to_host, host_holds_blocks
        self.time = time  # (n_dev, G, O) seconds per token of each group's products on each device, or None
        g, o = np.nonzero(np.isfinite(L))
        on_host = group_pos[g] < 0  # a token embedding of its own stays on the host
        self.d = np.concatenate([np.zeros(on_host.sum(), int)] + [np.full((~on_host).sum(), k) for k in range(n_dev)])
        self.g = np.concatenate([g[on_host]] + [g[~on_host]] * n_dev)
        self.o = np.concatenate([o[on_host]] + [o[~on_host]] * n_dev)
        self.nz = len(self.g)
        self.n = self.nz + n_pos * n_dev  # then p[k, d] at nz + k * n_dev + d
        self.loss = np.zeros(self.n)
        self.loss[: self.nz] = L[self.g, self.o]
        self.seconds = (None if time is None else
                        np.concatenate([time[self.d, self.g, self.o], np.zeros(self.n - self.nz)]))
        self.off_host = np.zeros(self.n)
        self.off_host[[self._p(k, dev) for k in range(n_pos) for dev in range(1, n_dev)]] = 1.0

    def _p(self, k, d):
        return self.nz + k * self.n_dev + d

    def _rows(self, caps):
        """The constraints for `caps` (device bytes, file bytes, seconds, positions off the host;
        None: no such limit) as one sparse matrix with lower and upper bounds."""
        cap, file_cap, time_cap, offloaded = caps
        rows, cols, vals, lo, hi = [], [], [], [], []

        def row(c, v, low, high):
            rows.extend([len(lo)] * len(c))
            cols.extend(c)
            vals.extend(v)
            lo.append(low)
            hi.append(high)

        z = np.arange(self.nz)
        for gi, k in enumerate(self.group_pos):  # one option per group, on its position's device
            if k < 0:
                row(z[self.g == gi], [1.0] * int((self.g == gi).sum()), 1, 1)
                continue
            for dev in range(self.n_dev):
                sel = z[(self.g == gi) & (self.d == dev)]
                row([*sel, self._p(k, dev)], [1.0] * len(sel) + [-1.0], 0, 0)
        for k in range(self.n_pos):
            row([self._p(k, dev) for dev in range(self.n_dev)], [1.0] * self.n_dev, 1, 1)
            if not self.host_holds_blocks:
                row([self._p(k, 0)], [1.0], 0, 0)
            if k + 2 < self.n_pos:  # blocks k and k+1
                for last in range(self.n_dev - 1):  # devices 0..last hold block k if they hold block k+1
                    row([self._p(k, e) for e in range(last + 1)] + [self._p(k + 1, e) for e in range(last + 1)],
                        [1.0] * (last + 1) + [-1.0] * (last + 1), 0, np.inf)
        # llama.cpp offloads the output only with every block (-ngl above the block count), onto the
        # accelerator of the last block.
        out, last_block = self.n_pos - 1, self.n_pos - 2
        if last_block >= 0:
            row([self._p(out, dev) for dev in range(1, self.n_dev)] + [self._p(0, 0)], [1.0] * self.n_dev, -np.inf, 1)
            for dev in range(1, self.n_dev):
                row([self._p(out, dev), self._p(last_block, dev)], [1.0, -1.0], -np.inf, 0)
        size = self.B[self.g, self.o].astype(np.float64)
        for dev in range(self.n_dev):
            if not math.isfinite(cap[dev]):
                continue
            held = size * (self.d == dev)
            if dev == 0:  # the token embedding a tied output matrix is copied from stays here
                held = held + size * self.copied_to_host[self.g]
            mine = held > 0
            ps = [self._p(k, dev) for k in range(self.n_pos - 1)]
            row([*z[mine], *ps], [*held[mine], *self.kv.astype(np.float64)], -np.inf, cap[dev])
        if file_cap is not None:
            row(z, size, -np.inf, file_cap)
        if time_cap is not None:
            row(z, self.seconds[: self.nz], -np.inf, time_cap)
        if offloaded is not None:
            on = np.nonzero(self.off_host)[0]
            row(on, [1.0] * len(on), offloaded, offloaded)
        return LinearConstraint(coo_array((vals, (rows, cols)), shape=(len(lo), self.n)), lo, hi)

    def _milp(self, objective, constraints, bounds=Bounds(0, 1)):
        res = milp(c=objective, integrality=np.ones(self.n), bounds=bounds, constraints=constraints,
                   options={"mip_rel_gap": 0.0})
        if res.status == 2:
            return None
        if res.x is None:
            raise MixqError(f"the MILP solver failed: {res.message}")
        return res.x > 0.5

    def _decode(self, x):
        choice_g = np.empty(len(self.L), dtype=np.int64)
        chosen = x[: self.nz]
        choice_g[self.g[chosen]] = self.o[chosen]
        device_of = np.argmax(x[self.nz:].reshape(self.n_pos, self.n_dev), axis=1)
        return choice_g, device_of

    def usage(self, choice_g, device_of):
        """Exact (weights, KV cache) bytes per device, and seconds per token (None without times)."""
        weights, kv = [0] * self.n_dev, [0] * self.n_dev
        seconds = 0.0
        for gi, o in enumerate(choice_g):
            k = self.group_pos[gi]
            dev = 0 if k < 0 else int(device_of[k])
            weights[dev] += int(self.B[gi, o])
            if self.copied_to_host[gi]:
                weights[0] += int(self.B[gi, o])
            if self.time is not None:
                seconds += float(self.time[dev, gi, o])
        for k, b in enumerate(self.kv):
            kv[int(device_of[k])] += int(b)
        return weights, kv, None if self.time is None else seconds

    def _overshoot(self, x, caps):
        """How far the decoded plan exceeds each limit, in exact sums (<= 0: within)."""
        cap, file_cap, time_cap, _ = caps
        choice_g, device_of = self._decode(x)
        weights, kv, seconds = self.usage(choice_g, device_of)
        file_bytes = int(self.B[np.arange(len(self.L)), choice_g].sum())
        return (np.array(weights) + np.array(kv) - cap, 0 if file_cap is None else file_bytes - file_cap,
                0 if time_cap is None else seconds - time_cap * (1 + 1e-9))

    def solve(self, cap, file_cap=None, time_cap=None, offloaded=None, objective=None):
        """The plan (choice per group, device per position) of least `objective` (default: the loss)
        within the limits, or None if none meets them. Of the plans of least loss (within TIE_RTOL),
        the fastest: the least time if times are known, else the most positions off the host."""
        limits = (cap, file_cap, time_cap, offloaded)
        objective = self.loss if objective is None else objective
        while True:
            x = self._milp(objective, [self._rows(limits)])
            if x is None:
                return None
            dev_over, file_over, time_over = self._overshoot(x, limits)
            if (dev_over <= 0).all() and file_over <= 0 and time_over <= 0:
                break
            # HiGHS works in floating point: tighten what overshot and solve again.
            limits = (cap - np.maximum(dev_over, 0), None if file_cap is None else file_cap - max(file_over, 0),
                      None if time_cap is None else time_cap - max(time_over, 0), offloaded)
        least = float(objective @ x)
        speed = self.seconds if self.seconds is not None else -self.off_host
        if objective is self.loss and (self.seconds is not None or (offloaded is None and self.host_holds_blocks)):
            if least > 0:
                keep = [LinearConstraint(self.loss[None, :] / least, -np.inf, 1 + TIE_RTOL / 2)]
                bounds = Bounds(0, 1)
            else:  # only lossless options: fixed by their bounds, which HiGHS meets exactly
                keep, bounds = [], Bounds(0, np.where(self.loss > 0, 0, 1))
            faster = self._milp(speed, [self._rows(limits), *keep], bounds)
            # HiGHS's tolerances may admit a lossier plan or one over a limit: keep it only if exact.
            within = faster is not None and all(
                np.all(np.asarray(v) <= 0) for v in self._overshoot(faster, (cap, file_cap, time_cap, None)))
            if within and speed @ faster < speed @ x and self.loss @ faster <= least * (1 + TIE_RTOL):
                x = faster
        return self._decode(x)

    def infeasible(self, cap, devices: DeviceBudget, file_cap, time_cap, offloaded, context, show, offset
                   ) -> MixqError:
        """Why no plan meets the limits, with the nearest value that can be met."""
        smallest_g = np.where(np.isfinite(self.L), self.B, np.iinfo(np.int64).max).min(axis=1)
        copy = int(smallest_g[self.copied_to_host].sum())
        need = int(smallest_g.sum() + self.kv.sum()) + copy
        room = sum(c for c in cap if math.isfinite(c))
        what = (f"weights at their smallest options{', the tied output matrix twice' if copy else ''} and the KV "
                f"cache at context {context:,}")
        if file_cap is not None and smallest_g.sum() > file_cap:
            return MixqError(f"the file budget leaves {file_cap:,} bytes for the planned tensors; the smallest "
                             f"plan needs {int(smallest_g.sum()):,}")
        if math.isfinite(room) and need > room:
            return MixqError(f"the devices ({devices}) hold {int(room):,} bytes after the fixed parameters; the "
                             f"smallest plan needs {need:,} ({what})")
        if time_cap is not None and self.solve(cap, file_cap, None, offloaded) is not None:
            fastest = self.solve(cap, file_cap, None, offloaded, objective=self.seconds)
            seconds = self.usage(*fastest)[2] + offset
            return MixqError(f"no plan within these memory budgets has a decode time per token of at most "
                             f"{show(time_cap + offset)}; the least is {show(seconds)}")
        return MixqError(f"no split of the blocks over the devices ({devices}) in layer order fits: the smallest "
                         f"plan needs {need:,} bytes in all ({what}), but each device holds whole blocks; give "
                         f"the devices more memory, a shorter --context or another --offload")


def plan_for_devices(profile: Profile, devices: DeviceBudget, estimator: str = "hessian+kl", context: int = 4096,
                     file_budget: Budget | None = None, offloaded: int | None = None,
                     time_limits: Sequence[Limit] = ()) -> tuple[Plan, Placement]:
    """The exact least-loss plan whose blocks, placed in layer order, fit every device's memory (and
    the file budget, and the time per token when `time_limits` gives one limit per device);
    `offloaded` fixes how many positions leave the host (llama.cpp's -ngl)."""
    pos = positions(profile)
    kv = kv_cache_bytes(profile.tensors, profile.kinds, profile.shapes, context,
                        profile.info.get("kv_values_per_token"))
    tied = "embedding" not in profile.kinds  # the output matrix is also the token embedding, on the host
    alloc, placement = solve_placement(
        profile.predicted(estimator), profile.nbytes, profile.tie_groups, pos, kv,
        np.array([tied and kind == "head" for kind in profile.kinds]), devices, profile.fixed_bytes, context,
        None if file_budget is None else capacity(profile, file_budget), offloaded, profile.tensors, time_limits)
    plan = plan_of(profile, alloc, estimator, "milp-devices")
    if placement.seconds is not None:
        plan = replace(plan, limited={time_limits[0].name: placement.seconds})
    return plan, placement
