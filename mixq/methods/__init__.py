"""Per-layer quantizers: pure functions from (W, H, format, settings) to a QTensor.

A method never walks the model or registers hooks: `quantize.py` hands it one weight matrix and
the statistics captured for that matrix's input. Each method lives in its own module and
registers itself here by name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from mixq.errors import MixqError
from mixq.formats import QTensor
from mixq.formats.integer import IntFormat


@dataclass(frozen=True)
class MethodSettings:
    """Tuning knobs of the per-layer methods (each method reads the ones it uses)."""

    clip_search: bool = True  # search a per-group range shrink that minimises the layer's error
    clip_grid: int = 21  # shrink factors tried, evenly from 1.0 down to clip_min
    clip_min: float = 0.5
    damp: float = 0.01  # GPTQ: fraction of mean(diag H) added to H's diagonal
    block_size: int = 128  # GPTQ: columns per lazy-update block
    act_order: bool = True  # GPTQ: quantize columns by decreasing diag(H) (lower error on SmolLM2)


Method = Callable[[torch.Tensor, torch.Tensor, IntFormat, MethodSettings], QTensor]
ManyMethod = Callable[[torch.Tensor, torch.Tensor, list[IntFormat], MethodSettings], list[QTensor]]
METHODS: dict[str, Method] = {}
BATCHED: dict[str, ManyMethod] = {}  # methods that quantize one W onto several grids in one pass


def register_method(name: str) -> Callable[[Method], Method]:
    def add(fn: Method) -> Method:
        METHODS[name] = fn
        return fn

    return add


def register_batched(name: str) -> Callable[[ManyMethod], ManyMethod]:
    def add(fn: ManyMethod) -> ManyMethod:
        BATCHED[name] = fn
        return fn

    return add


def quantize_many(
    method: str, W: torch.Tensor, H: torch.Tensor, fmts: list[IntFormat], settings: MethodSettings
) -> list[QTensor]:
    """W quantized onto each of `fmts` with one method (in one pass where the method supports it)."""
    done: dict[IntFormat, QTensor] = {}
    for group_size in dict.fromkeys(f.group_size for f in fmts):
        same = [f for f in fmts if f.group_size == group_size]
        if method in BATCHED:
            done.update(zip(same, BATCHED[method](W, H, same, settings)))
        else:
            done.update((f, get_method(method)(W, H, f, settings)) for f in same)
    return [done[f] for f in fmts]


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise MixqError(f"unknown method {name!r}; known: {', '.join(sorted(METHODS))}") from None


def output_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """tr(dW H dW^T): the summed squared error of the layer's outputs over the calibration tokens."""
    dW = (W_hat - W).to(torch.float64)  # (rows, cols)
    return float(((dW @ H.to(torch.float64)) * dW).sum())


from mixq.methods import gptq, rtn  # noqa: E402,F401  (register the methods)
