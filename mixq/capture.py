"""What calibration teaches about each matrix's inputs, one block at a time, through the runner.

`collect_stats` runs one block over its input batches while a MatmulWatcher accumulates, for each
plannable matrix, H = sum x^T x of the rows it multiplies: for an expert's matrix only the tokens
routed to that expert; `stats_and_outputs` does the same in the pass that also makes the block's
outputs. `iter_stats` walks the whole model so that one block's activations and statistics live in
memory at a time, one pass per block.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from mixq.formats.ggml import input_rounding_error
from mixq.models import LoadedModel
from mixq.models.layout import MatmulCall, MatmulWatcher, TensorRef
from mixq.runner import BlockRunner, StopForward, release_memory, to_device

# H sums x^T x in float32 in place: a batch adds a few thousand products per entry and a run a few
# dozen batches, far inside float32's precision, and a float64 H (or a per-batch temporary) of an
# 8960-wide down_proj would add 320-640 MB to the peak. The mean input sums each batch in float32
# (torch's reduction is a cascade: error ~1e-7 relative) and the batches in float64; a float64 sum
# of each batch took 5 s of the demo quantize run's 100 s.
STATS_DTYPE = torch.float32


@dataclass
class LayerStats:
    """What calibration taught us about one matrix's inputs."""

    H: torch.Tensor  # (cols, cols): sum over tokens of x^T x, float32
    n_tokens: int = 0
    x_sum: torch.Tensor | None = None  # (cols,): sum over tokens of x, float64 (None for stand-in statistics)
    # block width -> (cols,) float64: sum over tokens of each input's squared error when an engine
    # rounds the inputs to 8-bit blocks of that width (formats.ggml.rounded_inputs); only the widths asked for
    rounding: dict[int, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def empty(cls, cols: int, device: torch.device | str = "cpu", input_blocks: Sequence[int] = ()) -> LayerStats:
        rounding = {w: torch.zeros(cols, dtype=torch.float64, device=device) for w in input_blocks if cols % w == 0}
        return cls(torch.zeros(cols, cols, dtype=STATS_DTYPE, device=device), 0,
                   torch.zeros(cols, dtype=torch.float64, device=device), rounding)

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()  # (tokens, cols)
        add_gram(self.H, x)
        self.x_sum += x.sum(dim=0)
        self.n_tokens += x.shape[0]
        for block, error in self.rounding.items():
            error += input_rounding_error(x, block)

    @property
    def x_mean(self) -> torch.Tensor:
        return (self.x_sum / max(self.n_tokens, 1)).float()


def add_gram(H: torch.Tensor, x: torch.Tensor) -> None:
    """H += x^T x for a symmetric H, in about half the products of the whole: each panel of rows is
    multiplied from its diagonal on (a few wide GEMMs, as fast per product as one), then mirrored
    below, so H stays exactly symmetric. The H of a wide input (an MLP's down_proj: 8960^2 per token
    in Qwen2.5-1.5B) costs more than its block's own products."""
    cols = x.shape[1]
    for i, j in gram_panels(cols):
        H[i:j, i:].addmm_(x[:, i:j].T, x[:, i:])
        diagonal = H[i:j, i:j]
        diagonal.copy_(diagonal.triu() + diagonal.triu(1).T)
        H[j:, i:j] = H[i:j, j:].T


def gram_panels(cols: int, panels: int = 8, min_width: int = 128) -> list[tuple[int, int]]:
    """The row panels [i, j) in which `add_gram` multiplies: 8 of them take 56% of a full product's
    work, and panels narrower than 128 rows make slower GEMMs."""
    width = -(-max(cols // panels, min_width) // 16) * 16
    return [(i, min(i + width, cols)) for i in range(0, cols, width)]


def collect_stats(runner: BlockRunner, b: int, weights: dict[str, torch.Tensor], stages: Sequence[Sequence[str]],
                  batches: list[torch.Tensor]) -> dict[str, LayerStats]:
    """LayerStats of the matrices in `stages` of block `b`, run with `weights` on `batches`.

    Matrices of one stage share one input, hence one H (experts: each its routed tokens). The
    pass ends as soon as the last of these inputs has been seen.
    """
    return _watched_pass(runner, b, weights, stages, batches, stop_early=True)[0]


def stats_and_outputs(runner: BlockRunner, b: int, weights: dict[str, torch.Tensor], batches: list[torch.Tensor],
                      input_blocks: Sequence[int] = ()) -> tuple[dict[str, LayerStats], list[torch.Tensor]]:
    """LayerStats of every matrix of block `b` (with the rounding errors of `input_blocks`) and the
    block's outputs, from one pass."""
    return _watched_pass(runner, b, weights, runner.loaded.block_stages(b), batches, stop_early=False,
                         input_blocks=input_blocks)


def _watched_pass(runner: BlockRunner, b: int, weights: dict[str, torch.Tensor], stages: Sequence[Sequence[str]],
                  batches: list[torch.Tensor], stop_early: bool, input_blocks: Sequence[int] = (),
                  ) -> tuple[dict[str, LayerStats], list[torch.Tensor]]:
    loaded = runner.loaded
    refs = loaded.block_tensors(b)
    prefix = loaded.layout.block_prefix(b)
    wanted = [refs[n] for stage in stages for n in stage]
    leaders = {stage[0] for stage in stages}
    by_matrix = {(r.param.removeprefix(prefix), r.expert): r for r in wanted if r.expert is not None or r.name in leaders}
    position = {r.param.removeprefix(prefix): i for i, r in enumerate(refs.values())}
    last = max(position[r.param.removeprefix(prefix)] for r in wanted)
    stacks = {r.param.removeprefix(prefix) for r in refs.values() if r.expert is not None}
    stats = {r.name: LayerStats.empty(r.shape[1], runner.device, input_blocks) for r in by_matrix.values()}

    # Matrices of one stage share their input: once the last stage's first matrix has it, nothing
    # after is needed. An expert stage is seen expert by expert, so it runs until a later matrix.
    final = stages[-1][0] if refs[stages[-1][0]].expert is None else None

    def report(call: MatmulCall) -> None:
        ref = by_matrix.get((call.param, call.expert))
        if ref is not None:
            stats[ref.name].add(call.x)
            if stop_early and ref.name == final:
                raise StopForward
        elif stop_early and position.get(call.param, -1) > last and call.param not in stacks:
            raise StopForward

    with MatmulWatcher(weights, report):
        outputs = runner.run(b, weights, batches)
    out: dict[str, LayerStats] = {}
    for stage in stages:
        for name in stage:
            out[name] = stats[name] if name in stats else stats[stage[0]]
    price_rare_experts(out, [refs[n] for stage in stages for n in stage])
    return out, outputs


def price_rare_experts(stats: dict[str, LayerStats], refs: list[TensorRef]) -> None:
    """Experts that saw fewer tokens than their input width have an H too poor to trust: each takes
    the stack's mean H per token for the tokens it lacks, so its options are priced as if it had
    seen that many average tokens (conservative: an unseen expert is not free to round badly)."""
    stacks: dict[str, list[TensorRef]] = {}
    for r in refs:
        if r.expert is not None:
            stacks.setdefault(r.param, []).append(r)
    for members in stacks.values():
        total = sum(stats[r.name].n_tokens for r in members)
        if total == 0:
            mean = torch.eye(members[0].shape[1], dtype=STATS_DTYPE, device=stats[members[0].name].H.device) * 1e-6
        else:
            mean = sum(stats[r.name].H for r in members) / total
        for r in members:
            lacking = r.shape[1] - stats[r.name].n_tokens
            if lacking > 0:
                stats[r.name].H = stats[r.name].H + lacking * mean


def rare_experts(stats: dict[str, LayerStats], refs: dict[str, TensorRef]) -> dict[str, int]:
    """Expert matrices that saw fewer tokens than their input width: name -> tokens seen."""
    return {n: s.n_tokens for n, s in stats.items() if refs[n].expert is not None and s.n_tokens < refs[n].shape[1]}


def head_stats(runner: BlockRunner, batches: list[torch.Tensor], input_blocks: Sequence[int] = ()) -> LayerStats:
    """LayerStats of the output layer's input: the final norm of the last block's outputs."""
    stats = LayerStats.empty(batches[0].shape[-1], runner.device, input_blocks)
    with torch.no_grad():
        for x in batches:
            stats.add(runner.normed(x))
    return stats


def embedding_stats(loaded: LoadedModel, windows: torch.Tensor) -> LayerStats:
    """Stand-in statistics of an input embedding: a lookup's output error is sum_t ||dE[t]||^2 over
    the tokens t read, taken here as every row read equally often (H = tokens / vocab * I). A lookup
    multiplies nothing, so no engine rounds its inputs (no `rounding`)."""
    vocab, dim = loaded.model.get_parameter(loaded.embedding_key).shape
    n_tokens = windows.numel()
    return LayerStats(torch.eye(dim, dtype=STATS_DTYPE) * (n_tokens / vocab), n_tokens)


def iter_stats(loaded: LoadedModel, windows: torch.Tensor, batch_size: int,
               matmul_dtype: torch.dtype = torch.float32, start: tuple[int, list[torch.Tensor]] | None = None,
               device: torch.device | str = "cpu", input_blocks: Sequence[int] = ()) -> Iterator[tuple[dict[str, LayerStats], dict[str, torch.Tensor], list[torch.Tensor] | None]]:
    """(LayerStats, float32 matrix) of every plannable tensor with the model's own weights: an untied
    input embedding first, then one block at a time, the output matrix last, so a consumer holds
    one block's weights and statistics at once. The blocks' matmuls run in `matmul_dtype`.

    Each item also carries the hidden states after a block (None after the embedding and the head):
    with them, `start` = (the next block, its input batches) continues a walk that was stopped.
    Blocks run, and statistics and block matrices are yielded, on `device`. `input_blocks`: the block
    widths whose input rounding errors each matrix's statistics sum (`LayerStats.rounding`)."""
    from tqdm.auto import tqdm

    runner = BlockRunner(loaded, matmul_dtype, device)
    layout = loaded.layout
    first, batches = start or (0, None)
    batches = to_device(batches, runner.device)  # a resumed walk's batches come from a CPU checkpoint
    if start is None:
        if not loaded.tied_embedding:
            yield ({layout.embedding: embedding_stats(loaded, windows)},
                   {layout.embedding: loaded.embedding()}, None)
        batches = runner.embed(windows, batch_size)
    for b in tqdm(range(first, loaded.n_blocks), desc="capturing statistics", unit="block", initial=first,
                  total=loaded.n_blocks):
        weights = runner.block_weights(b)
        refs, prefix = loaded.block_tensors(b), layout.block_prefix(b)
        stats, batches = stats_and_outputs(runner, b, weights, batches, input_blocks)
        yield stats, {n: refs[n].view(weights, prefix) for n in stats}, batches
        del weights, stats
        release_memory()
    yield ({loaded.head_name: head_stats(runner, batches, input_blocks)},
           {loaded.head_name: loaded.head()}, None)


def capture_all(loaded: LoadedModel, windows: torch.Tensor, batch_size: int) -> dict[str, LayerStats]:
    """LayerStats of every plannable tensor, with the model's own (unquantized) weights."""
    return {name: s for stats, _, _ in iter_stats(loaded, windows, batch_size) for name, s in stats.items()}
