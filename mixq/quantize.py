"""Apply a plan (tensor -> option) to a model, sequentially, block by block (as in GPTQ).

For each block, read its weights, capture the H of one stage of matrices that share an input
(q/k/v, then o, then gate/up or every expert's gate/up, then down) on inputs that already passed
through the quantized earlier blocks and stages, quantize that stage in the block's weights, and
move on; finally run the block with its quantized weights to feed the next block. The model's
own weights are never changed: the result is the QTensors (and any norms or biases that moved). With `true_sequential=False` one pass captures every group of a block at once.
The output matrix (the embedding, when tied) comes last, with the H of its input.

Tensors whose option's method is `block` start from their per-layer start (GPTQ by default); once
the block is quantized, their rounding is trained jointly on the block's output (reconstruct.py),
and with norm tuning so are the block's norm weights. The full-precision model's block outputs,
the default targets, are carried along as a second stream of hidden states.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from mixq import capture
from mixq.atomic import save_tensors
from mixq.checkpoint import Checkpoints
from mixq.errors import MixqError
from mixq.formats import Format, QTensor, parse_format
from mixq.methods import BLOCK_METHODS, MethodSettings, get_method, output_error
from mixq.methods.gptq import one_factorisation_per_h
from mixq.models import LoadedModel
from mixq.models.layout import TensorRef
from mixq.options import Option
from mixq.reconstruct import ReconstructSettings, reconstruct_block, training_dtype
from mixq.runner import BlockRunner, fast_matmul_dtype, release_memory, windows_per_batch

log = logging.getLogger(__name__)
BLOCKS_CHECKPOINT = "blocks.safetensors"  # the state after the last finished block


class QuantizedTensors(Mapping[str, QTensor]):
    """Finished QTensors by name. With a `spool` directory, `spill` writes the ones held, packed as
    they will be stored, to a file there, and reading one unpacks it again: a run then holds one
    block's tensors, not the model's (a 1.5B model's codes alone are over 1 GB)."""

    def __init__(self, spool: Path | None = None):
        self.spool = spool
        self._held: dict[str, QTensor] = {}
        self._spilled: dict[str, tuple[Path, Format, tuple[int, int]]] = {}
        self._spilled_parts: dict[str, dict[str, tuple[torch.dtype, tuple[int, ...]]]] = {}
        self._names: dict[str, None] = {}  # insertion order
        self._files = 0

    def __setitem__(self, name: str, q: QTensor) -> None:
        self._spilled.pop(name, None)
        self._spilled_parts.pop(name, None)
        self._held[name] = q
        self._names[name] = None

    def __getitem__(self, name: str) -> QTensor:
        if name in self._held:
            return self._held[name]
        path, fmt, shape = self._spilled[name]
        return fmt.unpack(self._read(path, name), shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def format(self, name: str) -> Format:
        return self._held[name].format if name in self._held else self._spilled[name][1]

    def shape(self, name: str) -> tuple[int, int]:
        return self._held[name].shape if name in self._held else self._spilled[name][2]

    def packed(self, name: str) -> dict[str, torch.Tensor]:
        """The stored tensors of `name`, by part (`qweight`, `scales`, ...)."""
        if name in self._held:
            return self._held[name].format.pack(self._held[name])
        return self._read(self._spilled[name][0], name)

    def parts(self, name: str) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """dtype and shape of each stored tensor of `name`, by part."""
        if name in self._held:
            return {part: (t.dtype, tuple(t.shape)) for part, t in self.packed(name).items()}
        return self._spilled_parts[name]

    def spill(self) -> None:
        if self.spool is None or not self._held:
            return
        self.spool.mkdir(parents=True, exist_ok=True)
        path = self.spool / f"{self._files:05d}.safetensors"
        self._files += 1
        packs = {n: q.format.pack(q) for n, q in self._held.items()}
        save_tensors({f"{n}.{part}": t for n, pack in packs.items() for part, t in pack.items()}, path)
        for n, q in self._held.items():
            self._spilled[n] = (path, q.format, q.shape)
            self._spilled_parts[n] = {part: (t.dtype, tuple(t.shape)) for part, t in packs[n].items()}
        self._held.clear()

    def state(self) -> dict[str, Any]:
        """Where every tensor is spooled, in order (JSON): all of them must have been spilled."""
        assert not self._held, "spill before saving the state"
        return {"files": self._files, "tensors": [
            [n, self._spilled[n][0].name, self._spilled[n][1].name, list(self._spilled[n][2]),
             {part: [str(dtype).removeprefix("torch."), list(shape)] for part, (dtype, shape) in self._spilled_parts[n].items()}]
            for n in self._names]}

    def restore(self, state: dict[str, Any]) -> None:
        """Take back the spooled tensors of `state`; spool files written after it are overwritten."""
        self._held.clear()
        self._files = state["files"]
        for name, file, fmt, shape, parts in state["tensors"]:
            self._spilled[name] = (self.spool / file, parse_format(fmt), tuple(shape))
            self._spilled_parts[name] = {part: (getattr(torch, dtype), tuple(s)) for part, (dtype, s) in parts.items()}
            self._names[name] = None

    @staticmethod
    def _read(path: Path, name: str) -> dict[str, torch.Tensor]:
        with safe_open(str(path), framework="pt") as f:
            return {k[len(name) + 1:]: f.get_tensor(k) for k in f.keys() if k.startswith(name + ".")}  # noqa: SIM118


@dataclass
class QuantizedModel:
    """The quantized tensors of a model (by tensor name) and their layer errors."""

    tensors: QuantizedTensors = field(default_factory=QuantizedTensors)
    options: dict[str, Option] = field(default_factory=dict)
    output_errors: dict[str, float] = field(default_factory=dict)  # tr(dW H dW^T) per tensor
    block_losses: list[tuple[float, float]] = field(default_factory=list)  # reconstruction: before, after
    changed: dict[str, torch.Tensor] = field(default_factory=dict)  # other parameters changed (norms, biases)
    rare_experts: dict[str, int] = field(default_factory=dict)  # experts that saw few tokens: tokens seen

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Tensors and JSON that `restore` takes back, with the quantized tensors spilled."""
        self.tensors.spill()
        return {f"changed.{n}": t for n, t in self.changed.items()}, {
            "quantized": self.tensors.state(), "options": [[n, o.name] for n, o in self.options.items()],
            "output_errors": list(self.output_errors.items()), "block_losses": self.block_losses,
            "rare_experts": self.rare_experts,
        }

    def restore(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        self.tensors.restore(state["quantized"])
        self.options = {n: Option.parse(o) for n, o in state["options"]}
        self.output_errors = dict(state["output_errors"])
        self.block_losses = [tuple(x) for x in state["block_losses"]]
        self.rare_experts = state["rare_experts"]
        self.changed = {k.removeprefix("changed."): t for k, t in tensors.items() if k.startswith("changed.")}

    def quantize_tensor(self, name: str, weight: torch.Tensor, option: Option, stats: capture.LayerStats,
                        settings: MethodSettings, bias: torch.Tensor | None = None) -> None:
        """Quantize one matrix with its option and write the dequantized values back into it (a view
        of its parameter). With `bias`, the bias absorbs the layer's mean output error (bias correction)."""
        self.options[name] = option
        if option.is_keep:
            return
        # The methods run on the CPU (GPTQ factorises H with LAPACK in place) whatever device ran the
        # block; they do not write to W, and `weight` changes only at the end.
        W, H = weight.detach().float().cpu(), stats.H.cpu()
        q = get_method(option.method)(W, H, parse_format(option.format), settings)
        W_hat = q.dequantize()
        self.tensors[name] = q
        self.output_errors[name] = output_error(W, W_hat, H)
        if bias is not None and stats.x_sum is not None:
            bias += ((W - W_hat) @ stats.x_mean.cpu()).to(bias.device, bias.dtype)
        weight.copy_(W_hat.to(weight.device, weight.dtype))


def uniform_plan(loaded: LoadedModel, option: Option, target: str | None = None) -> dict[str, Option]:
    """Every matrix of the transformer blocks gets the same option (the output matrix is kept).

    Where the format does not fit a tensor's rows, its fallback does (ggml types, as llama.cpp does).
    With `target`, every tensor's format must be one that target stores.
    """
    from mixq.export import get_target

    Option.parse(option.name)
    stores = get_target(target) if target else None
    if stores is not None and stores.model_refusal(loaded):
        raise MixqError(f"--target {target}: {stores.model_refusal(loaded)}")
    plan = {}
    for name, ref in loaded.quantizable().items():
        fmt = parse_format(option.format)
        if not fmt.fits(ref.shape):
            fallback = getattr(fmt, "fallback", None)
            if fallback is None or not parse_format(fallback).fits(ref.shape):
                raise MixqError(f"{option.format} does not fit {name} {ref.shape} and has no fallback that does")
            fmt = parse_format(fallback)
        why = stores.refuses(loaded, name, fmt.name, ref.shape) if stores is not None else None
        if why:
            raise MixqError(f"--target {target} cannot store {name} {ref.shape} as {fmt.name}: {why}")
        plan[name] = Option(fmt.name, option.method)
    return plan


def matrices_sharing_h(stats: Mapping[str, capture.LayerStats], plan: Mapping[str, Option]) -> list[list[str]]:
    """The planned matrices of `stats`, grouped by the statistics (the input) they share, in order."""
    groups: dict[int, list[str]] = {}
    for name, layer_stats in stats.items():
        if name in plan:
            groups.setdefault(id(layer_stats), []).append(name)
    return list(groups.values())


def bias_of(ref: TensorRef, weights: dict[str, torch.Tensor], prefix: str) -> torch.Tensor | None:
    """The bias added to a linear's output (expert stacks: that expert's row of the bias stack)."""
    param = ref.param.removeprefix(prefix)
    name = param.removesuffix(".weight") + ".bias" if ref.expert is None else param + "_bias"
    bias = weights.get(name)
    return None if bias is None else (bias if ref.expert is None else bias[ref.expert])


def quantize_model(
    loaded: LoadedModel,
    windows: torch.Tensor,
    plan: dict[str, Option],
    settings: MethodSettings = MethodSettings(),
    batch_size: int | None = None,
    true_sequential: bool = True,
    reconstruct: ReconstructSettings = ReconstructSettings(),
    spool: Path | None = None,
    matmul_dtype: torch.dtype | None = None,
    checkpoints: Checkpoints | None = None,
    device: torch.device | str = "cpu",
) -> QuantizedModel:
    """Quantize every planned tensor, block by block, through the runner; nothing of the model changes.
    With `spool`, each finished block's tensors wait in a file there (QuantizedTensors). Batches hold
    `batch_size` windows (default: as many as `windows_per_batch` allows). The blocks' passes run
    their matmuls in `matmul_dtype` (default: the device's fast one, `fast_matmul_dtype`); statistics
    are accumulated in float32 either way.

    With `checkpoints`, the spool is theirs and each finished block's state (the result so far and
    the hidden states entering the next block) is saved there; a run that finds one continues after
    its block, with the same results as if it had never stopped. Blocks run on `device`; the
    quantized tensors are kept on the CPU."""
    result = QuantizedModel(QuantizedTensors(checkpoints.path("spool") if checkpoints else spool))
    runner = BlockRunner(loaded, matmul_dtype or fast_matmul_dtype(device), device)
    batch_size = batch_size or windows_per_batch(loaded, windows.shape[1])
    trained = reconstruct.norm_tuning or any(o.method in BLOCK_METHODS for o in plan.values())
    fp_stream = trained and reconstruct.target == "fp"
    if checkpoints:
        checkpoints.ensure()  # before the spool's first file
    saved = checkpoints.load(BLOCKS_CHECKPOINT) if checkpoints else None
    if saved:
        tensors, state = saved
        result.restore(tensors, state["result"])
        batches = [tensors[f"batch.{i}"].to(runner.device) for i in range(state["batches"])]
        fp_batches = [tensors[f"fp.{i}"].to(runner.device) for i in range(state["batches"])] if fp_stream else None
        first = state["block"] + 1
        log.info("resumed after block %d of %d from %s", state["block"], loaded.n_blocks, checkpoints.directory)
    else:
        fp_batches = runner.embed(windows, batch_size) if fp_stream else None
        residents = dict(loaded.residents)
        embedding = loaded.layout.embedding
        if not loaded.tied_embedding and embedding in plan:  # first: block 0 then reads quantized embeddings
            residents[f"{embedding}.weight"] = loaded.embedding()
            result.quantize_tensor(embedding, residents[f"{embedding}.weight"], plan[embedding],
                                   capture.embedding_stats(loaded, windows), settings)
        batches = runner.embed(windows, batch_size, residents)
        del residents  # a quantized untied embedding was needed only to embed the windows
        first = 0
    progress = tqdm(range(first, loaded.n_blocks), desc="quantizing blocks", unit="block",
                    initial=first, total=loaded.n_blocks)
    for b in progress:
        refs, prefix = loaded.block_tensors(b), loaded.layout.block_prefix(b)
        weights = runner.block_weights(b)
        # Only norm tuning and bias correction change parameters other than the planned matrices.
        matrices = {r.param.removeprefix(prefix) for r in refs.values()}
        movable = [n for n in weights if n not in matrices] if reconstruct.norm_tuning or \
            reconstruct.bias_correction else []
        original = {n: weights[n].clone() for n in movable}
        trained_here = [n for n in refs if n in plan and plan[n].method in BLOCK_METHODS]
        targets = None
        if trained_here or reconstruct.norm_tuning:
            # the full-precision stream only feeds reconstruction: in its precision
            targets = runner.in_precision(training_dtype(reconstruct, runner.device)).run(
                b, weights, fp_batches if fp_batches is not None else batches)
        fp_weights = {n: refs[n].view(weights, prefix).detach().float().clone() for n in trained_here}
        block_stats: dict[str, capture.LayerStats] = {}
        # A block trained jointly afterwards captures all its statistics in one pass: the training
        # sees the interactions that a capture after each group would.
        stages = loaded.block_stages(b)
        sequential = true_sequential and not trained_here
        for stage in [[s] for s in stages] if sequential else [stages]:
            if not any(name in plan and not plan[name].is_keep for group in stage for name in group):
                # nothing to round: no statistics pass, but the plan's record keeps these matrices
                result.options.update({name: plan[name] for group in stage for name in group if name in plan})
                continue
            stats = capture.collect_stats(runner, b, weights, stage, batches)
            release_memory()  # the pass's activations, before the quantizer's large temporaries
            result.rare_experts.update(capture.rare_experts(stats, refs))
            for sharing in matrices_sharing_h(stats, plan):
                # One factorisation for matrices of one input (q/k/v, gate/up); a matrix alone keeps
                # none after its own GPTQ (down_proj's would outlive it by its output error: +364 MiB
                # at Qwen2.5-1.5B's width).
                with one_factorisation_per_h() if len(sharing) > 1 else contextlib.nullcontext():
                    for name in sharing:
                        bias = bias_of(refs[name], weights, prefix) if reconstruct.bias_correction else None
                        result.quantize_tensor(name, refs[name].view(weights, prefix), plan[name], stats[name],
                                               settings, bias)
                        block_stats[name] = stats[name]
        if trained_here or reconstruct.norm_tuning:
            starts = {n: (fp_weights[n], result.tensors[n]) for n in trained_here}
            r = reconstruct_block(runner, b, weights, starts, batches, targets, reconstruct, settings.learn_scale,
                                  {n: torch.diag(block_stats[n].H) for n in trained_here})
            for name, q in r.tensors.items():
                result.tensors[name] = q.to("cpu")
                result.output_errors[name] = output_error(fp_weights[name], q.dequantize(), block_stats[name].H)
            result.block_losses.append((r.loss_before, r.loss_after))
            progress.set_postfix_str(f"block {b} output MSE {r.loss_before:.3g} -> {r.loss_after:.3g}")
            batches = r.outputs
        else:
            batches = runner.run(b, weights, batches)
        quantized_params = {refs[n].param for n in result.tensors if n in refs}
        for n in movable:  # norms (norm tuning) and biases (bias correction) that moved
            if prefix + n not in quantized_params and not torch.equal(weights[n], original[n]):
                result.changed[prefix + n] = weights[n].cpu()
        if fp_batches is not None:
            fp_batches = targets
        del weights, original
        result.tensors.spill()
        if checkpoints:
            tensors, state = result.state()
            tensors.update({f"batch.{i}": x for i, x in enumerate(batches)})
            tensors.update({f"fp.{i}": x for i, x in enumerate(fp_batches or [])})
            checkpoints.save(BLOCKS_CHECKPOINT, tensors, {"block": b, "batches": len(batches), "result": state})
        release_memory()
    head = loaded.head_name
    if head in plan:
        # A tied head is the resident embedding, which must stay as it is; an untied one is read anew.
        weight = loaded.head().clone() if loaded.tied_embedding else loaded.head()
        result.quantize_tensor(head, weight, plan[head], capture.head_stats(runner, batches), settings)
    result.tensors.spill()
    return result
