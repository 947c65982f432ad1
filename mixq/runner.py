"""THE block runner: the one place that knows how a model's blocks and head are called.

Every stage (capture, profile, quantize, reconstruct, evaluate) calls blocks through `BlockRunner`:
- `embed`: the hidden states entering block 0, as the model itself computes them (scaled
  embeddings, multipliers), by running the model with every block replaced by a recorder;
- `kwargs`: what each block is called with besides its hidden states, recorded the same way per
  batch shape, so every block gets its own: its attention mask (sliding window or global), the
  rotary embeddings of its layer type, position ids; no cache;
- `call` / `run`: one block on given hidden states with a given dict of its parameters (the skeleton
  holds none: `torch.func.functional_call`);
- `logits` / `projected`: the head: final norm, output matrix (tied or not), logit scaling and
  soft-capping; `token_chunks` splits tokens so that a 262k vocabulary never makes a logits tensor
  larger than `CHUNK_BYTES`; `head_slices` reads the output matrix a slice of vocabulary rows at a
  time, for stages that stream the head instead of holding it (evaluation).
Blocks compute in float32, or with their matmuls in bfloat16 (`matmul_dtype`, autocast: the
residual stream, norms and what the watchers see stay float32) where the device multiplies
bfloat16 in hardware (`fast_matmul_dtype`). `run_taped` records a block's products on a reference
run so that `run_from_tapes` can rerun it near that reference with only the difference multiplied
in bfloat16 (`LinearTape`: how the profile's KL points run on such a device).

A runner computes on one `device` (`compute_device`: CUDA when torch sees one, else the CPU). The
model's skeleton and residents stay on the CPU, where embedding and recording are cheap; what a
block, the final norm and the head are called with is moved to the device: the hidden states, the
recorded kwargs, the block's weights (`block_weights`) and buffers, the head's rows. What leaves for
storage (quantized tensors, checkpoints) goes back to the CPU at the stage that stores it.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from mixq.errors import MixqError
from mixq.memory import release_memory  # noqa: F401  (the stages call it between blocks)
from mixq.models import LoadedModel
from mixq.models.source import WeightSource
from mixq.models.layout import BlockLayout, MatmulCall, MatmulWatcher, block_layout, expert_stacks

CHUNK_BYTES = 1 << 25  # largest block of float32 logits made at once (32 MiB; a KL makes several)
ACTIVATION_BYTES = 1 << 26  # widest activation of a batch, float32 (see `windows_per_batch`)
SKIPPED_KWARGS = ("cache", "past_key_values", "past_key_value", "use_cache")
PROBE_SHAPE = (8, 64)  # tokens a block is probed with: enough that every expert stack is routed some


def windows_per_batch(loaded: LoadedModel, seq_len: int) -> int:
    """Windows per batch so that a block's widest activation, its widest matrix input (an MLP's
    intermediate) or its attention scores (heads x seq_len^2, where the attention is not fused),
    takes at most ACTIVATION_BYTES in float32: a forward keeps a few such tensors alive at once,
    which would otherwise outweigh the block itself (Qwen2.5-1.5B's 8960-wide intermediate at 8 x
    512 tokens: 147 MB each)."""
    widest = max(t.shape[1] for b in loaded.layout.block_layouts for t in b.tensors)
    heads = getattr(loaded.config.get_text_config(), "num_attention_heads", 0) or 0
    per_window = 4 * seq_len * max(widest, heads * seq_len)
    return max(1, ACTIVATION_BYTES // per_window)


def fast_matmul_dtype(device: torch.device | str) -> torch.dtype:
    """The matmul precision of the passes that tolerate bfloat16 (capture, sampling, training, the KL
    points' tapes): bfloat16 where `device` multiplies it in hardware (a CUDA GPU that supports it; a
    CPU with AMX or AVX512-BF16), else float32. Emulated, bfloat16 costs more than float32: on an
    AVX2 CPU (AMD EPYC, 2 threads) a SmolLM2 block on 2048 tokens took 842 ms in bfloat16 against
    176 ms in float32. Decided by the device's features, not by timing, so results never depend on
    how busy the machine was."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float32
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # torch's own checks of the CPU
    fast = device.type == "cpu" and any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)
    return torch.bfloat16 if fast else torch.float32


def compute_device(name: str = "auto") -> torch.device:
    """The device of `--device`: "auto" is the first CUDA device when torch sees one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise MixqError(f"--device {name!r}: not a device name (cpu, cuda, cuda:1, auto)") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise MixqError(f"--device {name}: mixq computes on cpu or cuda, not {device.type}")
    if not torch.cuda.is_available():
        raise MixqError(f"--device {name}: this torch ({torch.__version__}) sees no CUDA device")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise MixqError(f"--device {name}: torch sees {torch.cuda.device_count()} CUDA device(s)")
    return device


def to_device(value: Any, device: torch.device) -> Any:
    """`value` with every tensor in it (inside tuples, lists and dicts too) on `device`."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


class StopForward(Exception):
    """Ends a forward pass early once what is needed was recorded."""


class _Recorder(nn.Module):
    """Stands in for block `index`: records what reaches it and passes the hidden states on."""

    def __init__(self, index: int, sink, last: bool):
        super().__init__()
        self.index, self.sink, self.last = index, sink, last

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.sink(self.index, hidden_states, kwargs)
        if self.last:
            raise StopForward
        return hidden_states


def block_output(y: Any) -> torch.Tensor:
    return y[0] if isinstance(y, tuple) else y


class LinearTape(torch.overrides.TorchFunctionMode):
    """The products `F.linear(x, W)` of a block by its own 2-D weights: recorded on a reference run
    (`tape` empty), or replayed on a run whose inputs are near the reference's.

    Replayed, a product returns the recorded output plus (x - recorded x) W^T in bfloat16. The
    low precision's rounding then falls on that difference, which is as small as the run's
    departure from the reference, never on the activations themselves: bfloat16 products of the
    activations would add rounding jumps of their own to every run (a KL of about 4e-4 on SmolLM2,
    larger than the smallest effects measured), while this keeps a zero departure exactly zero and
    a small one accurate to bfloat16's 2^-8 of itself. A block's products run in the same order on
    every run of a dense block (experts' routing would change which tokens meet which matrix: not
    for mixtures of experts)."""

    def __init__(self, low: dict[int, torch.Tensor], tape: list[tuple[torch.Tensor, torch.Tensor]]):
        super().__init__()
        self.low = low  # id of each of the block's 2-D weights -> its bfloat16 copy (`low_precision`)
        self.recording = not tape
        self.tape, self.step = tape, 0
        self._copies: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # per input: its copy, or difference

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.linear:
            return func(*args, **kwargs)
        x, W = args[0], args[1] if len(args) > 1 else kwargs["weight"]
        if id(W) not in self.low:
            return func(*args, **kwargs)
        if self.recording:
            y = func(*args, **kwargs)
            seen = self._copies.get(id(x))
            if seen is None or seen[0] is not x:
                seen = self._copies[id(x)] = (x, x.clone())
            self.tape.append((seen[1], y.clone()))  # the block may change its tensors in place later
            return y
        x_ref, y_ref = self.tape[self.step]  # (an IndexError here: the block ran other products)
        self.step += 1
        seen = self._copies.get(id(x))
        if seen is None or seen[0] is not x:  # q, k and v share their input's difference too
            seen = self._copies[id(x)] = (x, (x - x_ref).to(torch.bfloat16))
        return F.linear(seen[1], self.low[id(W)]).float().add_(y_ref)

    @staticmethod
    def low_precision(weights: dict[str, torch.Tensor]) -> dict[int, torch.Tensor]:
        return {id(t): t.to(torch.bfloat16) for t in weights.values() if t.dim() == 2}


class BlockRunner:
    def __init__(self, loaded: LoadedModel, matmul_dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
        self.loaded = loaded
        self.matmul_dtype = matmul_dtype
        self.device = torch.device(device)
        self._kwargs: dict[tuple[int, int], list[dict[str, Any]]] = {}
        self._head: dict[str, torch.Tensor] | None = None  # the model's own head, read at first use
        self._buffers: dict[int, dict[str, torch.Tensor]] = {}  # block buffers on a non-CPU device

    def in_precision(self, matmul_dtype: torch.dtype) -> BlockRunner:
        """This runner with its blocks' matmuls in `matmul_dtype`, sharing what it has recorded."""
        other = copy.copy(self)
        other.matmul_dtype = matmul_dtype
        return other

    def head(self) -> dict[str, torch.Tensor]:
        """The model's own parameters that `logits` reads (final norm, output matrix), read once per
        runner: a stage that never makes logits never holds an untied output matrix."""
        if self._head is None:
            self._head = to_device(self.loaded.residents_from(None), self.device)
        return self._head

    def block_weights(self, b: int, source: WeightSource | None = None) -> dict[str, torch.Tensor]:
        """Block `b`'s parameters (`LoadedModel.block_weights`) on this runner's device."""
        return to_device(self.loaded.block_weights(b, source), self.device)

    # -- entering the blocks ------------------------------------------------------------------
    def _record(self, ids: torch.Tensor | None, residents: dict[str, torch.Tensor] | None = None,
                embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Run the model with recorders for blocks on token ids (or given embeddings): block 0's
        input, and every block's kwargs."""
        blocks = self.loaded.blocks()
        originals = list(blocks)
        kwargs: list[dict[str, Any]] = [{} for _ in originals]
        first: list[torch.Tensor] = []

        def sink(i: int, h: torch.Tensor, kw: dict[str, Any]) -> None:
            if i == 0:
                first.append(h)
            kwargs[i] = {k: v for k, v in kw.items() if k not in SKIPPED_KWARGS}

        for i in range(len(originals)):
            blocks[i] = _Recorder(i, sink, last=i == len(originals) - 1)
        try:
            inputs = {"input_ids": ids} if embeds is None else {"inputs_embeds": embeds}
            functional_call(self.loaded.model, residents or self.loaded.residents, (), {**inputs, "use_cache": False},
                            strict=False, tie_weights=False)
        except StopForward:
            pass
        finally:
            for i, m in enumerate(originals):
                blocks[i] = m
        self._kwargs[tuple((ids if embeds is None else embeds).shape[:2])] = to_device(kwargs, self.device)
        return first[0].to(self.device)

    def embed(self, windows: torch.Tensor, batch_size: int, residents: dict[str, torch.Tensor] | None = None,
              source: WeightSource | None = None) -> list[torch.Tensor]:
        """Hidden states entering block 0 for every window, in batches. The embedding is that of
        `residents` when they hold one (e.g. a quantized one), else read from `source` (default:
        the model's own) for this call only, and then only the rows of the tokens present."""
        # the skeleton embeds on the CPU, with residents there (a caller may hold them on the device)
        residents = to_device(dict(residents or self.loaded.residents), torch.device("cpu"))
        with torch.no_grad():
            if self.loaded.embedding_key in residents:
                return [self._record(batch, residents) for batch in windows.split(batch_size)]
            used, compact = torch.unique(windows, return_inverse=True)
            embeds = self._embedding_module(compact, self.loaded.embedding_rows(used, source))
            return [self._record(None, residents, e) for e in embeds.split(batch_size)]

    def _embedding_module(self, ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """The model's own embedding module (scaling included) on `ids` indexing rows of `table`; the
        model's forward then takes these as its input embeddings, as it would have made them."""
        module = self.loaded.model.get_submodule(self.loaded.layout.embedding)
        padding = getattr(module, "padding_idx", None)
        module.padding_idx = None  # checked against the table's rows; it only matters to gradients
        try:
            return functional_call(module, {"weight": table}, (ids,))
        finally:
            module.padding_idx = padding

    def embed_with_grad(self, ids: torch.Tensor, residents: dict[str, torch.Tensor]) -> torch.Tensor:
        """Block 0's input with autograd through the embedding (for the Fisher pass)."""
        return self._record(ids, residents)

    def kwargs(self, b: int, x: torch.Tensor) -> dict[str, Any]:
        shape = tuple(x.shape[:2])
        if shape not in self._kwargs:
            # Masks and positions do not depend on the tokens: zeros given as embeddings (no table read).
            with torch.no_grad():
                self._record(None, embeds=torch.zeros(*shape, self.loaded.hidden_size))
        return self._kwargs[shape][b]

    # -- blocks -----------------------------------------------------------------------------------
    def call(self, b: int, weights: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Block `b` with parameters `weights` (names inside the block) on hidden states `x`."""
        block = self.loaded.blocks()[b]
        if self.device.type != "cpu":  # the skeleton's buffers live on the CPU
            if b not in self._buffers:
                self._buffers[b] = {n: t.to(self.device) for n, t in block.named_buffers()}
            weights = {**self._buffers[b], **weights}
        with torch.autocast(x.device.type, dtype=self.matmul_dtype, enabled=self.matmul_dtype != torch.float32):
            return block_output(functional_call(block, weights, (x,), self.kwargs(b, x), strict=False))

    def run(self, b: int, weights: dict[str, torch.Tensor], batches: list[torch.Tensor]) -> list[torch.Tensor]:
        """Block `b`'s outputs for every batch (batches a watcher stopped early are left out)."""
        outs = []
        with torch.no_grad():
            for x in batches:
                try:
                    outs.append(self.call(b, weights, x))
                except StopForward:
                    continue
        return outs

    def run_taped(self, b: int, weights: dict[str, torch.Tensor], batches: list[torch.Tensor]
                  ) -> tuple[list[torch.Tensor], list[list[tuple[torch.Tensor, torch.Tensor]]]]:
        """Block `b`'s outputs for every batch, and each batch's `LinearTape` of this run."""
        outs, tapes = [], []
        low = LinearTape.low_precision(weights)
        with torch.no_grad():
            for x in batches:
                tapes.append([])
                with LinearTape(low, tapes[-1]):
                    outs.append(self.call(b, weights, x))
        return outs, tapes

    def run_from_tapes(self, b: int, weights: dict[str, torch.Tensor], runs: list[list[torch.Tensor]],
                       tapes: list[list[tuple[torch.Tensor, torch.Tensor]]]) -> list[list[torch.Tensor]]:
        """Block `b`'s outputs for each of several runs whose batches are near those its `tapes` were
        recorded on (`LinearTape`); the weights are rounded to bfloat16 once for all of them."""
        outs = []
        low = LinearTape.low_precision(weights)
        with torch.no_grad():
            for batches in runs:
                outs.append([])
                for x, tape in zip(batches, tapes, strict=True):
                    with LinearTape(low, tape):
                        outs[-1].append(self.call(b, weights, x))
        return outs

    # -- the head ---------------------------------------------------------------------------------
    def normed(self, h: torch.Tensor, residents: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The final norm of hidden states leaving the last block, with the parameters in `residents`
        (default: the model's own)."""
        r = residents if residents is not None else self.loaded.residents
        norm = self.loaded.model.get_submodule(self.loaded.layout.final_norm)
        params = {n: r[f"{self.loaded.layout.final_norm}.{n}"].to(h.device) for n, _ in norm.named_parameters()}
        return functional_call(norm, params, (h,), strict=False)

    def scaled(self, logits: torch.Tensor) -> torch.Tensor:
        """The model's own logit scaling and soft-capping, on float32 logits of the output matrix."""
        config = self.loaded.config.get_text_config()
        if getattr(config, "logits_scaling", None):  # granite divides its logits
            logits = logits / config.logits_scaling
        cap = getattr(config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def logits(self, h: torch.Tensor, residents: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Logits of hidden states leaving the last block: final norm, output matrix, scaling, soft-cap,
        with the parameters in `residents` (default: the model's own)."""
        r = residents or self.head()
        return self.projected(self.normed(h, r), r)

    def projected(self, normed: torch.Tensor, residents: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Logits of the final norm's output: output matrix, scaling, soft-cap."""
        r = residents or self.head()
        head = self.loaded.layout.head
        return self.scaled(F.linear(normed, r[f"{head}.weight"].to(normed.device),
                                    to_device(r.get(f"{head}.bias"), normed.device)).float())

    def head_slices(self, source: WeightSource | None = None,
                    residents: dict[str, torch.Tensor] | None = None) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor | None]]:
        """(vocabulary slice, its rows of the output matrix, its bias or None) from `source` (default: the
        model's own), each slice read alone (`LoadedModel.row_slices`). The bias is taken from
        `residents` (default: the model's own)."""
        head = f"{self.loaded.layout.head}.weight"
        bias = (residents if residents is not None else self.loaded.residents).get(f"{self.loaded.layout.head}.bias")
        for rows in self.loaded.row_slices(head):
            yield rows, self.loaded.head_rows(rows, source).to(self.device), to_device(
                None if bias is None else bias[rows], self.device)

    def token_chunks(self, h: torch.Tensor, width: int | None = None) -> Iterator[slice]:
        """Slices of the flattened tokens of `h` whose logits (over `width` outputs, default the whole
        vocabulary) stay under CHUNK_BYTES."""
        width = width or self.loaded.vocab_size
        n = h.shape[0] * h.shape[1]
        step = max(1, CHUNK_BYTES // (4 * width))
        for start in range(0, n, step):
            yield slice(start, min(n, start + step))


def discover_block_layouts(loaded: LoadedModel) -> tuple[BlockLayout, ...]:
    """Each block's plannable matrices and stages, by watching one run of a block of each structure
    on random weights (shapes, orientation and which inputs they share do not depend on values)."""
    runner = BlockRunner(loaded)
    config = loaded.config.get_text_config()
    n_experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None)
    hidden = loaded.hidden_size
    seq = min(PROBE_SHAPE[1], getattr(config, "max_position_embeddings", PROBE_SHAPE[1]) or PROBE_SHAPE[1])
    gen = torch.Generator().manual_seed(0)
    layouts: dict[tuple, BlockLayout] = {}
    out = []
    for b, block in enumerate(loaded.blocks()):
        shapes = {n: tuple(p.shape) for n, p in block.named_parameters()}
        signature = (type(block).__name__, tuple(shapes.items()), getattr(block, "attention_type", None))
        if signature not in layouts:
            weights = {n: torch.randn(s, generator=gen) * (0.02 if len(s) > 1 else 1.0) for n, s in shapes.items()}
            calls: list[MatmulCall] = []
            x = torch.randn(PROBE_SHAPE[0], seq, hidden, generator=gen)
            with torch.no_grad(), MatmulWatcher(weights, calls.append):
                runner.call(b, weights, x)
            layouts[signature] = block_layout("", calls, shapes, loaded.family.kept, expert_stacks(block, n_experts))
        out.append(_prefixed(layouts[signature], loaded.layout.block_prefix(b)))
    return tuple(out)


def _prefixed(layout: BlockLayout, prefix: str) -> BlockLayout:
    from dataclasses import replace

    tensors = tuple(replace(t, name=prefix + t.name, param=prefix + t.param) for t in layout.tensors)
    stages = tuple(tuple(prefix + n for n in s) for s in layout.stages)
    return BlockLayout(tensors, stages)
