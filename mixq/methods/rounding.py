"""Learned rounding: a weight's codes (and, where the format allows, its group scales) as trainable
parameters that always decode onto the format's grid.

Following SignRound (AutoRound) and AdaRound, each weight gets a rounding offset v in [-0.5, 0.5]
added before rounding, and each group a scale multiplier m, trained by signed gradient descent
with a straight-through round. The starting point is any method's QTensor (RTN or GPTQ): the
latent code `base` is chosen so that round(base) is that method's code, on the side of the code
on which the unrounded value lies (`start_offsets`). With v = 0 and m = 1 the weight is exactly the starting QTensor.

    u      = (base - zero) / m + zero + v          code space of the learned scale
    code   = clamp(round(u), 0, qmax)
    w      = scale * m * (code - zero) - offset

`to_qtensor` turns the result into an ordinary QTensor of the same format: same bytes, codes in
range, scales rounded to the format's storage. Scale multipliers are learned only for formats
whose group scales are free fp16 values (`IntFormat`); ggml's k-quants derive group scales from
integer sub-scales times a super-block scale, which learned rounding leaves as the start chose them.

Input columns that carry massive activations (Sun et al., 2024: a few channels whose diag(H) is
orders of magnitude above the rest, such as SmolLM2's down_proj inputs at blocks 11 and 28) keep the
start's codes and their groups' scales: one signed step flips a code there by a whole grid step on
an input hundreds of times larger than the others, and on those blocks training never recovered
the start's loss. The start (GPTQ) already weighs those columns by H.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from mixq.errors import MixqError
from mixq.formats import QTensor
from mixq.formats.integer import IntFormat

MAX_LOG_SCALE = 0.3  # |log m|: a learned scale stays within [0.74, 1.35] of the start's
OFF_NEAREST_START = 0.25  # a code off the nearest rounding starts this far from its centre
MASSIVE_INPUT = 1e4  # an input column whose diag(H) is this many times the median's is left as the start has it


def massive_columns(importance: torch.Tensor) -> torch.Tensor:
    """Which input columns carry massive activations: diag(H) above MASSIVE_INPUT x its median."""
    median = importance.float().median()
    return importance.float() > MASSIVE_INPUT * median if median > 0 else torch.zeros_like(importance, dtype=torch.bool)


def start_offsets(deviation: torch.Tensor) -> torch.Tensor:
    """Where each latent code starts inside its rounding interval [code - 0.5, code + 0.5), given
    the unrounded value's deviation from the start's code.

    A code that is the nearest rounding starts at the unrounded value, as in SignRound (0.49 at
    most, so a tie does not round away). A code the start moved off the nearest (GPTQ's error
    feedback does so for many weights) starts halfway to its edge, on the unrounded value's side:
    placed at the edge, the first step of any size would undo every such choice at once.
    """
    return torch.where(deviation.abs() <= 0.5, deviation.clamp(-0.49, 0.49), OFF_NEAREST_START * deviation.sign())


class LearnedRounding(nn.Module):
    def __init__(self, W: torch.Tensor, start: QTensor, learn_scale: bool = True,
                 importance: torch.Tensor | None = None):
        """`importance`: diag(H) of W's inputs; columns with massive activations then stay as `start` has them."""
        super().__init__()
        fmt = start.format
        if fmt.levels is not None:
            raise MixqError(f"learned rounding needs evenly spaced levels; {fmt.name} has a codebook (use gptq or cd)")
        cols = W.shape[1]
        self.start = start
        self.glen = fmt.group_len(cols)
        self.cols = cols
        self.qmax = float(fmt.qmax)
        expand = self._expand
        self.register_buffer("scale", expand(start.scale.float()))
        self.register_buffer("zero", expand(start.zero.float()))
        self.register_buffer("offset", expand(start.offset.float()) if start.offset is not None else torch.zeros((), device=W.device))
        codes = start.codes.float()
        unrounded = torch.where(self.scale != 0, (W.float() + self.offset) / self.scale, 0) + self.zero
        # Stored relative to the zero point: every step then costs a few elementwise passes fewer.
        self.register_buffer("base_above_zero", codes + start_offsets(unrounded - codes) - self.zero)
        self.v = nn.Parameter(torch.zeros_like(codes))
        self.learn_scale = learn_scale and isinstance(fmt, IntFormat)
        self.log_m = nn.Parameter(torch.zeros_like(start.scale.float()), requires_grad=self.learn_scale)
        # 1 where a latent may move, 0 on massive-activation columns (and their groups' scales): their
        # gradients are then zero, so signed steps leave them where they start.
        frozen = (massive_columns(importance) if importance is not None
                  else torch.zeros(cols, dtype=torch.bool, device=W.device))
        self.register_buffer("free_cols", (~frozen).float().unsqueeze(0))
        n_groups = start.scale.shape[1]
        frozen_groups = torch.zeros(n_groups, dtype=torch.bool, device=W.device).index_fill_(0, torch.nonzero(frozen).flatten() // self.glen, True)
        self.register_buffer("free_groups", (~frozen_groups).float().unsqueeze(0))

    def _log_m(self) -> torch.Tensor:
        return self.log_m * self.free_groups

    def _expand(self, per_group: torch.Tensor) -> torch.Tensor:
        return per_group.repeat_interleave(self.glen, dim=1)[:, : self.cols]

    def _codes(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Codes (straight-through rounded) and the expanded scale multiplier (None: not learned)."""
        m = self._expand(self._log_m().exp()) if self.learn_scale else None
        u = (self.base_above_zero if m is None else self.base_above_zero / m) + self.zero + self.v * self.free_cols
        rounded = u + (u.round() - u).detach()  # straight-through: round forward, identity backward
        return rounded.clamp(0, self.qmax), m

    def forward(self) -> torch.Tensor:
        """The dequantized weight (rows, cols), differentiable in v and the scale multipliers."""
        codes, m = self._codes()
        w = (self.scale if m is None else self.scale * m) * (codes - self.zero)
        return w - self.offset if self.offset.dim() else w

    @torch.no_grad()
    def clamp_(self) -> None:
        self.v.clamp_(-0.5, 0.5)
        self.log_m.clamp_(-MAX_LOG_SCALE, MAX_LOG_SCALE)

    @torch.no_grad()
    def to_qtensor(self) -> QTensor:
        """The learned weight as a QTensor of the starting format (exactly what `forward` gives,
        up to the rounding of learned scales to fp16)."""
        start = self.start
        scale = start.scale
        if self.learn_scale:
            scale = start.format.storable_scale(start.scale * self._log_m().exp())
        codes, _ = self._codes()
        return QTensor(start.format, codes.round().to(torch.uint8), scale, start.zero, start.offset, start.super_scale)


def sign_descent(
    groups: Sequence[tuple[Sequence[nn.Parameter], float]],
    loss_of_step: Callable[[int], torch.Tensor],
    steps: int,
    after_step: Callable[[], None] = lambda: None,
    keep_best: bool = False,
) -> None:
    """Signed gradient descent with a linearly decaying step (SignRound's optimiser): each parameter
    of a (parameters, lr) group moves by lr * (1 - i/steps) * sign(grad) at step i, so its total
    movement is bounded by about lr * steps / 2 whatever the loss's scale.

    With `keep_best` (for a loss that is the same function at every step), the parameters end at
    the lowest loss seen, the start included."""
    groups = [([p for p in params if p.requires_grad], lr) for params, lr in groups]
    every = [p for params, _ in groups for p in params]
    best_loss, best = float("inf"), None
    for i in range(steps + keep_best):  # with keep_best, one more evaluation scores the last step
        for p in every:
            p.grad = None
        loss = loss_of_step(i)
        if keep_best and float(loss.detach()) < best_loss:
            best_loss, best = float(loss.detach()), [p.detach().clone() for p in every]
        if i == steps:
            break
        loss.backward()
        with torch.no_grad():
            for params, lr in groups:
                for p in params:
                    if p.grad is not None:
                        p.sub_(lr * (1 - i / steps) * p.grad.sign())
        after_step()
    if best is not None:
        with torch.no_grad():
            for p, b in zip(every, best):
                p.copy_(b)
