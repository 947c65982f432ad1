"""Run calibration windows through a model one transformer block at a time.

Only one block's activations live in memory: `block_inputs` stops the forward pass at block 0
and keeps what reaches it; `collect_stats` runs one block over those inputs while hooks
accumulate each linear input's H = sum x^T x; `run_block` runs the block again (after its
weights were quantized, when quantizing sequentially) to produce the next block's inputs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mixq.models import LoadedModel

STATS_DTYPE = torch.float64  # H accumulates many fp32 outer-product sums; keep the running sum exact-ish


@dataclass
class LayerStats:
    """What calibration taught us about one linear layer's inputs."""

    H: torch.Tensor  # (cols, cols): sum over tokens of x^T x, float64
    n_tokens: int = 0
    x_sum: torch.Tensor | None = None  # (cols,): sum over tokens of x (None for stand-in statistics)

    @classmethod
    def empty(cls, cols: int) -> LayerStats:
        return cls(torch.zeros(cols, cols, dtype=STATS_DTYPE), 0, torch.zeros(cols, dtype=STATS_DTYPE))

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()  # (tokens, cols)
        # Each batch's sum in fp32 (fast), the running sum in float64 (no drift across batches).
        self.H += (x.T @ x).to(STATS_DTYPE)
        self.x_sum += x.sum(dim=0, dtype=STATS_DTYPE)
        self.n_tokens += x.shape[0]

    @property
    def x_mean(self) -> torch.Tensor:
        return (self.x_sum / max(self.n_tokens, 1)).float()


@dataclass
class BlockInputs:
    """The hidden states entering a block, in calibration batches, and the other forward kwargs."""

    batches: list[torch.Tensor]
    kwargs: dict[str, Any] = field(default_factory=dict)


class _StopForward(Exception):
    """Ends a forward pass early once what is needed was recorded (private: nothing else raises it)."""


def block_inputs(loaded: LoadedModel, windows: torch.Tensor, batch_size: int) -> BlockInputs:
    """Hidden states entering block 0 for every calibration window, batched."""
    blocks = loaded.blocks()
    first = blocks[0]
    recorded = BlockInputs(batches=[])

    class Catcher(nn.Module):
        def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> None:
            recorded.batches.append(hidden_states.detach())
            # Rotary embeddings, positions and masks are the same for every batch of equal length.
            recorded.kwargs = {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values")}
            raise _StopForward

    blocks[0] = Catcher()
    try:
        with torch.no_grad():
            for batch in windows.split(batch_size):
                try:
                    loaded.model(batch, use_cache=False)
                except _StopForward:
                    pass
    finally:
        blocks[0] = first
    return recorded


def run_block(block: nn.Module, inputs: BlockInputs) -> list[torch.Tensor]:
    """The block's outputs for every input batch (empty if a hook stopped the forward early)."""
    outs = []
    with torch.no_grad():
        for x in inputs.batches:
            try:
                y = block(x, **inputs.kwargs)
            except _StopForward:
                continue
            outs.append(y[0] if isinstance(y, tuple) else y)
    return outs


@contextlib.contextmanager
def record_inputs(linears: dict[str, nn.Linear], stop_after: str | None = None) -> Iterator[dict[str, LayerStats]]:
    """Accumulate LayerStats of each given linear's input while the block runs.

    With `stop_after`, the forward pass ends once that linear has seen its input: nothing after
    it in the block is needed for these statistics.
    """
    stats = {name: LayerStats.empty(lin.in_features) for name, lin in linears.items()}

    def hook(name: str, x: torch.Tensor) -> None:
        stats[name].add(x)
        if name == stop_after:
            raise _StopForward

    handles = [
        lin.register_forward_pre_hook(lambda _m, args, name=name: hook(name, args[0]))
        for name, lin in linears.items()
    ]
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()


def collect_stats(
    block: nn.Module, linears: dict[str, nn.Linear], groups: Sequence[Sequence[str]], inputs: BlockInputs
) -> dict[str, LayerStats]:
    """LayerStats for the named linears of one block; linears in one group share one input and one H."""
    leaders = {group[0]: linears[group[0]] for group in groups}
    with record_inputs(leaders, stop_after=groups[-1][0]) as stats:
        run_block(block, inputs)
    return {name: stats[group[0]] for group in groups for name in group}


def head_stats(loaded: LoadedModel, inputs: BlockInputs) -> LayerStats:
    """LayerStats of the output layer's input: the final norm of the last block's outputs."""
    norm = loaded.model.get_submodule(loaded.arch.final_norm)
    stats = LayerStats.empty(inputs.batches[0].shape[-1])
    with torch.no_grad():
        for x in inputs.batches:
            stats.add(norm(x))
    return stats


def embedding_stats(loaded: LoadedModel, windows: torch.Tensor) -> LayerStats:
    """Stand-in statistics of an input embedding: a lookup's output error is sum_t ||dE[t]||^2 over
    the tokens t read, taken here as every row read equally often (H = tokens / vocab * I)."""
    vocab, dim = loaded.model.get_submodule(loaded.arch.embedding).weight.shape
    n_tokens = windows.numel()
    return LayerStats(torch.eye(dim, dtype=STATS_DTYPE) * (n_tokens / vocab), n_tokens)


def iter_stats(loaded: LoadedModel, windows: torch.Tensor, batch_size: int) -> Iterator[dict[str, LayerStats]]:
    """LayerStats of every plannable tensor with the model's own (unquantized) weights: an untied
    input embedding first, then one block at a time, the output matrix last, so a consumer holds
    one block's statistics at once."""
    from tqdm.auto import tqdm

    if not loaded.tied_embedding:
        yield {loaded.arch.embedding: embedding_stats(loaded, windows)}
    inputs = block_inputs(loaded, windows, batch_size)
    for b in tqdm(range(len(loaded.blocks())), desc="capturing statistics", unit="block"):
        block = loaded.blocks()[b]
        yield collect_stats(block, loaded.block_linears(b), loaded.block_groups(b), inputs)
        inputs.batches = run_block(block, inputs)
    yield {loaded.head_name: head_stats(loaded, inputs)}


def capture_all(loaded: LoadedModel, windows: torch.Tensor, batch_size: int) -> dict[str, LayerStats]:
    """LayerStats of every plannable tensor, with the model's own (unquantized) weights."""
    return {name: s for block in iter_stats(loaded, windows, batch_size) for name, s in block.items()}
