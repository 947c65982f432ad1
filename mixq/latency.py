"""Latency tables: how long each matrix takes in each option on this machine, measured with the target
engine's own kernels (`mixq bench-device`), and what a plan costs per token.

A table holds, for each case (kernel type, rows, cols, tokens), the seconds of one matrix product
measured several times (a product with `tokens` activation rows: 1 is a decoded token, more a prefill
batch), and the machine it was measured on: CPU model, logical CPUs, threads and the engine's build.
A table is refused on another machine, and for a model whose shapes it lacks.

A plan's predicted time per decoded token is the sum of its matrices' product times at their options.
That sum misses what the engine does besides (attention over the cache, norms, sampling, thread
hand-offs): `mixq bench-device --fit FILE ...` runs a few exported files in the engine's own
benchmark and fits, once per machine, measured = scale x sum + overhead, which the limit then uses.
An input embedding that is not the output matrix costs nothing: it is looked up.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from mixq.atomic import atomic_write_text
from mixq.errors import MixqError
from mixq.options import Option

if TYPE_CHECKING:
    from mixq.plan import Limit
    from mixq.profile import Profile

LATENCY_VERSION = 2
Case = tuple[str, int, int, int]  # (kernel type, rows, cols, tokens)


@dataclass(frozen=True)
class Machine:
    """What a measured time depends on besides the shape and type."""

    cpu: str
    logical_cpus: int
    threads: int
    engine: str  # the engine's build, e.g. "llama.cpp of llama-cpp-python 0.3.36"

    @classmethod
    def here(cls, threads: int, engine: str) -> Machine:
        return cls(cpu_model(), os.cpu_count() or 1, threads, engine)

    def __str__(self) -> str:
        return f"{self.cpu}, {self.logical_cpus} logical CPUs, {self.threads} threads, {self.engine}"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@dataclass(frozen=True)
class Kernels:
    """How a target's engine multiplies a matrix here: its build, the kernel each stored format runs
    as, a timer of cases (cases, threads, repeats -> each case's measured seconds), and for whole
    files the products one decoded token runs and the engine's own measured time per decoded token."""

    engine: Callable[[], str]
    kernel_of: Callable[[str], str]  # format name (or "f16": kept) -> kernel type
    time: Callable[[list[Case], int, int, int], dict[Case, list[float]]]  # (cases, threads, repeats, stream bytes)
    file_cases: Callable[[Path], list[Case]]
    decode_seconds: Callable[[Path, int], float]  # (exported file, threads) -> seconds per decoded token


@dataclass(frozen=True)
class EngineFit:
    """measured seconds per decoded token ~= scale x (the table's sum of products) + overhead, fitted
    on whole files run by the engine; `points` are (file, the table's sum, measured)."""

    scale: float
    overhead: float
    points: tuple[tuple[str, float, float], ...]

    def predict(self, products: float) -> float:
        return self.scale * products + self.overhead


@dataclass
class LatencyTable:
    target: str
    machine: Machine
    seconds: dict[Case, list[float]]  # each case's repeated measurements
    stream_bytes: int  # weights read per decoded token, which each product streams through as decoding does
    fit: EngineFit | None = None  # what the sums miss, fitted on whole files (`mixq bench-device --fit`)

    def time(self, case: Case) -> float:
        """The median of a case's measurements."""
        return statistics.median(self.seconds[case])

    def spread(self, case: Case) -> float:
        """(max - min) / median of a case's measurements."""
        values = self.seconds[case]
        return (max(values) - min(values)) / statistics.median(values)

    def save(self, path: Path) -> None:
        rows = [dict(type=c[0], rows=c[1], cols=c[2], tokens=c[3], seconds=s) for c, s in sorted(self.seconds.items())]
        fit = asdict(self.fit) if self.fit else None
        atomic_write_text(Path(path), json.dumps(dict(version=LATENCY_VERSION, target=self.target, fit=fit,
                                                      stream_bytes=self.stream_bytes, machine=asdict(self.machine),
                                                      cases=rows), indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> LatencyTable:
        """A table written by `save`; anything else (or a table with impossible times) is refused."""
        try:
            data = json.loads(Path(path).read_text())
            if data.get("version") != LATENCY_VERSION:
                raise ValueError(f"version {data.get('version')!r}, expected {LATENCY_VERSION}")
            machine = Machine(**data["machine"])
            seconds = {}
            for row in data["cases"]:
                case = (str(row["type"]), int(row["rows"]), int(row["cols"]), int(row["tokens"]))
                values = [float(v) for v in row["seconds"]]
                if not values or not all(np.isfinite(v) and v > 0 for v in values):
                    raise ValueError(f"case {case} has times {values}")
                seconds[case] = values
            fit = data.get("fit")
            if fit is not None:
                fit = EngineFit(float(fit["scale"]), float(fit["overhead"]),
                                tuple((str(f), float(a), float(b)) for f, a, b in fit["points"]))
            return cls(str(data["target"]), machine, seconds, int(data["stream_bytes"]), fit)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise MixqError(f"{path} is not a latency table written by `mixq bench-device`: {e}") from None

    def products(self, cases: list[Case]) -> float:
        """The table's sum over `cases` (each must be in the table)."""
        return sum(self.time(c) for c in cases)

    def check_machine(self, kernels: Kernels) -> None:
        """Refuse a table measured on another CPU or with another build of the engine."""
        here = Machine.here(self.machine.threads, kernels.engine())
        if self.machine != here:
            raise MixqError(f"the latency table was measured on another machine ({self.machine}); this one is "
                            f"{here}: measure it here with `mixq bench-device`")


def parse_latency(text: str) -> float:
    """A time per token in seconds: "40ms", "40ms/token", "0.04s", or a speed: "25tok/s"."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(ms|s|us|tok/s|tokens/s)(/tok(en)?)?\s*", text)
    if m is None or float(m[1]) <= 0:
        raise MixqError(f"latency {text!r}: expected a positive time per token (40ms, 40ms/token, 0.04s) or a "
                        f"speed (25tok/s)")
    value, unit = float(m[1]), m[2]
    if unit in ("tok/s", "tokens/s"):
        return 1.0 / value
    return value * {"s": 1.0, "ms": 1e-3, "us": 1e-6}[unit]


def show_seconds(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms/token ({1 / seconds:.1f} tok/s)" if seconds > 0 else "0 ms/token"


def profile_cases(profile: Profile, kernels: Kernels, tokens: int = 1) -> set[Case]:
    """Every case a plan over `profile` can run (each allowed option of each multiplied matrix)."""
    return {case for _, _, case in _cases_of(profile, kernels, tokens) if case is not None}


def profile_allowed(profile: Profile) -> np.ndarray:
    """(T, O): where some estimator has a finite error (one not run is infinite everywhere)."""
    return np.logical_or.reduce([np.isfinite(e) for e in profile.errors.values()])


def _cases_of(profile: Profile, kernels: Kernels, tokens: int):
    return matmul_cases(profile.tensors, profile.kinds, profile.shapes, profile.options, profile_allowed(profile),
                        kernels, tokens)


def run_timer(command: list[str], cases: list[Case], name: str) -> dict[Case, list[float]]:
    """Feed `cases` to an engine's timer process, one "KERNEL ROWS COLS TOKENS" line each, and read
    its answers, one JSON line per case ({"seconds": [...]} or {"error": ...})."""
    proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    proc.stdin.write("".join(f"{k} {r} {c} {n}\n" for k, r, c, n in cases))
    proc.stdin.close()
    seconds = {}
    for case in tqdm(cases, desc="timing matrix products", unit="case"):
        row = json.loads(proc.stdout.readline() or "{}")
        if "seconds" not in row:
            proc.kill()
            raise MixqError(f"{name}: {row.get('error', 'no answer')} for {' '.join(map(str, case))}")
        seconds[case] = row["seconds"]
    proc.wait()
    return seconds


def matmul_cases(tensors: list[str], kinds: list[str], shapes: list[tuple[int, int]], options: list[str],
                 allowed: np.ndarray, kernels: Kernels, tokens: int):
    """(tensor index, option index, case) for every allowed option of every tensor; the case is None
    for a matrix that is only looked up (an input embedding of its own)."""
    for t, (kind, (rows, cols)) in enumerate(zip(kinds, shapes)):
        for o, option in enumerate(options):
            if allowed[t, o]:
                lookup = kind == "embedding"
                yield t, o, None if lookup else (kernels.kernel_of(Option.parse(option).format), rows, cols, tokens)


def measure(cases: set[Case], kernels: Kernels, threads: int, repeats: int, target: str, stream_bytes: int
            ) -> LatencyTable:
    """Time every case with the target's kernels on this machine, each product streaming through
    `stream_bytes` of weights (a decoded token reads the whole model: from the cache when it fits
    there, else from memory, which the time of one matrix alone would not show)."""
    if not cases:
        raise MixqError("no matrix product to time (every planned matrix is only looked up)")
    ordered = sorted(cases, key=lambda c: (c[1] * c[2] * c[3], c))  # small first: early progress
    return LatencyTable(target, Machine.here(threads, kernels.engine()),
                        kernels.time(ordered, threads, repeats, stream_bytes), stream_bytes)


def model_bytes(nbytes: np.ndarray, allowed: np.ndarray) -> int:
    """A model's weight bytes at a typical plan: each tensor at the median size of its allowed options."""
    return int(sum(np.median(row[ok]) for row, ok in zip(nbytes, allowed) if ok.any()))


def fit_engine(table: LatencyTable, files: list[Path], kernels: Kernels, repeats: int = 5) -> EngineFit:
    """Run each exported file in the engine's own benchmark and fit measured = scale x products +
    overhead by least squares (one file: scale 1). Cases of the files missing from the table are
    timed and added first."""
    per_file = [kernels.file_cases(Path(f)) for f in files]
    missing = sorted({c for cases in per_file for c in cases} - set(table.seconds))
    if missing:
        table.seconds.update(kernels.time(missing, table.machine.threads, repeats, table.stream_bytes))
    points = []
    for f, cases in zip(files, per_file):
        points.append((Path(f).name, table.products(cases), kernels.decode_seconds(Path(f), table.machine.threads)))
    x, y = np.array([p[1] for p in points]), np.array([p[2] for p in points])
    if len(points) >= 2 and np.ptp(x) > 0.05 * x.mean():
        scale, overhead = np.polyfit(x, y, 1)
        if scale > 0:
            return EngineFit(float(scale), float(overhead), tuple(points))
    # One file, or files whose sums hardly differ (or no positive scale fits them): an offset only.
    return EngineFit(1.0, float(np.mean(y - x)), tuple(points))


def products_per_token(profile: Profile) -> np.ndarray:
    """(T,) how many times each matrix is multiplied per decoded token on average: once, or for an
    expert, the share of tokens routed to it on the calibration text times the experts each token is
    routed to (so one layer's experts together cost top-k products of one expert's size)."""
    runs = np.ones(len(profile.tensors))
    shares = profile.info.get("expert_tokens") or {}
    if not shares:
        return runs
    top_k = profile.info.get("experts_per_token")
    if not top_k:
        raise MixqError("this profile of a mixture of experts does not record how many experts a token is routed "
                        "to (made before latency limits took experts): profile the model again")
    for t, name in enumerate(profile.tensors):
        if name in shares:
            runs[t] = top_k * shares[name]
    return runs


def decode_limit(profile: Profile, table: LatencyTable, kernels: Kernels, bound: float) -> Limit:
    """The plan limit "time per decoded token <= bound": each (tensor, option)'s product time from
    `table` (which must hold every case the profile can plan), corrected by the table's engine fit if
    it has one (else the products alone)."""
    from mixq.plan import Limit

    cost = np.zeros(profile.nbytes.shape)
    missing = []
    runs = products_per_token(profile)
    for t, o, case in _cases_of(profile, kernels, 1):
        if case is None:
            continue
        if case not in table.seconds:
            missing.append(case)
            continue
        cost[t, o] = runs[t] * table.time(case)
    if missing:
        kind, rows, cols, _ = missing[0]
        raise MixqError(f"the latency table has no time for {kind} at {rows}x{cols} (and {len(set(missing)) - 1} "
                        f"more cases): measure this profile's shapes with `mixq bench-device --profile ...`")
    if table.fit is None:
        return Limit("decode time per token", cost, bound, show=lambda s: f"{show_seconds(s)} of matrix products")
    return Limit("decode time per token", table.fit.scale * cost, bound, show=show_seconds, offset=table.fit.overhead)
