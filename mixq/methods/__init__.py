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
from mixq.formats import Format, QTensor


@dataclass(frozen=True)
class MethodSettings:
    """Tuning knobs of the per-layer methods (each method reads the ones it uses)."""

    clip_search: bool = True  # search a per-group range shrink that minimises the layer's error
    clip_grid: int = 21  # ranges tried per group: shrinks from 1.0 down to clip_min (ggml's: half moves of the top)
    clip_min: float = 0.5
    damp: float = 0.01  # GPTQ: fraction of mean(diag H) added to H's diagonal
    block_size: int = 128  # GPTQ: columns per lazy-update block
    act_order: bool = True  # GPTQ: quantize columns by decreasing diag(H) (lower error on SmolLM2)
    init: str = "gptq"  # adaquant, block and cd: the method whose result they start from
    steps: int = 100  # adaquant: signed-gradient steps per layer
    lr: float | None = None  # adaquant: first step size of the rounding offsets (in [-0.5, 0.5]); None: 1/steps
    learn_scale: bool = True  # adaquant and block: also learn group scales where the format stores them freely
    cd_passes: int = 3  # cd: passes of coordinate descent over the columns (it stops early when none moves)

    def step_size(self, steps: int) -> float:
        """SignRound's default: 1/steps, so offsets can cross half a step over the decaying schedule."""
        return self.lr if self.lr is not None else 1.0 / max(steps, 1)

    def clip(self) -> tuple[int, float]:
        """(clip_grid, clip_min) for a format's `fit`: one factor, 1.0, when the search is off."""
        return (self.clip_grid, self.clip_min) if self.clip_search else (1, 1.0)


Method = Callable[[torch.Tensor, torch.Tensor, Format, MethodSettings], QTensor]
ManyMethod = Callable[[torch.Tensor, torch.Tensor, list[Format], MethodSettings], list[QTensor]]
METHODS: dict[str, Method] = {}
BLOCK_METHODS = frozenset({"block"})  # per layer only their start; trained per transformer block later
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
    method: str, W: torch.Tensor, H: torch.Tensor, fmts: list[Format], settings: MethodSettings
) -> list[QTensor]:
    """W quantized onto each of `fmts` with one method (in one pass where the method supports it)."""
    done: dict[Format, QTensor] = {}
    cols = W.shape[1]
    unique = list(dict.fromkeys(fmts))
    def stack_key(f: Format) -> tuple:  # grids quantized in one pass share these
        return type(f), f.group_len(cols), None if f.levels is None else tuple(f.levels.tolist())

    for key in dict.fromkeys(map(stack_key, unique)):
        same = [f for f in unique if stack_key(f) == key]
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


REFINING = frozenset({"adaquant", "cd"})  # per-layer methods that improve on another's result
LEARNED_ROUNDING = frozenset({"adaquant"}) | BLOCK_METHODS  # their latent codes need evenly spaced levels


def supports(method: str, fmt: Format) -> bool:
    """Whether `method` can quantize onto `fmt`: learned rounding needs evenly spaced levels, and a
    lattice's codes are chosen a group at a time, which rtn's fit and GPTQ do."""
    if fmt.joint_codes:
        return method in ("rtn", "gptq")
    return fmt.levels is None or method not in LEARNED_ROUNDING


def check_supported(method: str, fmt: Format) -> None:
    if not supports(method, fmt):
        raise MixqError(f"{method} cannot quantize onto {fmt.name}"
                        + (": its codes lie on a lattice (use rtn or gptq)" if fmt.joint_codes else ": it has a codebook"))


def starting_point(W: torch.Tensor, H: torch.Tensor, fmt: Format, settings: MethodSettings) -> QTensor:
    """The result a refining method (adaquant, cd, block) starts from: `settings.init`'s."""
    if settings.init in BLOCK_METHODS or settings.init in REFINING:
        raise MixqError(f"a refining method cannot start from {settings.init!r}: give rtn or gptq")
    return get_method(settings.init)(W, H, fmt, settings)


def importance(H: torch.Tensor) -> torch.Tensor:
    """diag(H) as per-input-column importance (uniform when no input was ever non-zero)."""
    imp = torch.diag(H).float().clamp(min=0)
    return imp if imp.sum() > 0 else torch.ones_like(imp)


def output_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """tr(dW H dW^T): the summed squared error of the layer's outputs over the calibration tokens.

    Computed in H's precision: a float32 H makes this several times faster on wide layers (the
    profile's choice), with the sum accumulated in float64 either way.
    """
    dW = (W_hat - W).to(H.dtype)  # (rows, cols)
    return float(((dW @ H) * dW).sum(dtype=torch.float64))


from mixq.methods import adaquant, coordinate_descent, gptq, rtn  # noqa: E402,F401  (register the methods)
