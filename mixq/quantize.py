"""Apply a plan (tensor -> option) to a model, sequentially, block by block (as in GPTQ).

For each block: capture the H of one input group of linears (q/k/v, then o, then gate/up, then
down) on inputs that already passed through the quantized earlier blocks and groups, quantize
that group, and move on; finally recompute the block's outputs with its quantized weights to feed
the next block. With `true_sequential=False` one pass captures every group of a block at once.
The output matrix (the embedding, when tied) comes last, with the H of its input.

Tensors whose option's method is `block` start from their per-layer start (GPTQ by default); once
the block is quantized, their rounding is trained jointly on the block's output (reconstruct.py),
and with norm tuning so are the block's norm weights. The full-precision model's block outputs,
the default targets, are carried along as a second stream of hidden states.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from mixq import capture
from mixq.errors import MixqError
from mixq.formats import QTensor, parse_format
from mixq.methods import BLOCK_METHODS, MethodSettings, get_method, output_error
from mixq.models import LoadedModel
from mixq.options import Option
from mixq.reconstruct import ReconstructSettings, passes, reconstruct_block

log = logging.getLogger(__name__)


@dataclass
class QuantizedModel:
    """The quantized tensors of a model (by tensor name) and their layer errors."""

    tensors: dict[str, QTensor] = field(default_factory=dict)
    options: dict[str, Option] = field(default_factory=dict)
    output_errors: dict[str, float] = field(default_factory=dict)  # tr(dW H dW^T) per tensor
    block_losses: list[tuple[float, float]] = field(default_factory=list)  # reconstruction: before, after

    def quantize_tensor(self, name: str, module: torch.nn.Module, option: Option, stats: capture.LayerStats,
                        settings: MethodSettings, correct_bias: bool = False) -> None:
        """Quantize one module's weight with its option and write the dequantized values back into it.

        With `correct_bias`, a bias absorbs the layer's mean output error on the calibration inputs.
        """
        self.options[name] = option
        if option.is_keep:
            return
        weight = module.weight
        W = weight.detach().float()
        q = get_method(option.method)(W, stats.H, parse_format(option.format), settings)
        W_hat = q.dequantize()
        self.tensors[name] = q
        self.output_errors[name] = output_error(W, W_hat, stats.H)
        bias = getattr(module, "bias", None)
        if correct_bias and bias is not None and stats.x_sum is not None:
            bias.data += ((W - W_hat) @ stats.x_mean).to(bias.dtype)
        weight.data.copy_(W_hat.to(weight.dtype))  # W may share this storage: last


def uniform_plan(loaded: LoadedModel, option: Option) -> dict[str, Option]:
    """Every linear of the transformer blocks gets the same option (the output matrix is kept).

    Where the format does not fit a tensor's rows, its fallback does (ggml types, as llama.cpp does).
    """
    Option.parse(option.name)
    plan = {}
    for name, linear in loaded.quantizable().items():
        fmt = parse_format(option.format)
        shape = tuple(linear.weight.shape)
        if not fmt.fits(shape):
            fallback = getattr(fmt, "fallback", None)
            if fallback is None or not parse_format(fallback).fits(shape):
                raise MixqError(f"{option.format} does not fit {name} {shape} and has no fallback that does")
            fmt = parse_format(fallback)
        plan[name] = Option(fmt.name, option.method)
    return plan


def quantize_model(
    loaded: LoadedModel,
    windows: torch.Tensor,
    plan: dict[str, Option],
    settings: MethodSettings = MethodSettings(),
    batch_size: int = 8,
    true_sequential: bool = True,
    reconstruct: ReconstructSettings = ReconstructSettings(),
) -> QuantizedModel:
    """Quantize `loaded.model` in place (its weights become the dequantized ones)."""
    result = QuantizedModel()
    trained = reconstruct.norm_tuning or any(o.method in BLOCK_METHODS for o in plan.values())
    fp_stream = trained and reconstruct.target == "fp"
    fp_inputs = capture.block_inputs(loaded, windows, batch_size) if fp_stream else None
    embedding = loaded.arch.embedding
    if not loaded.tied_embedding and embedding in plan:  # first: block 0 then reads quantized embeddings
        result.quantize_tensor(embedding, loaded.model.get_submodule(embedding), plan[embedding],
                               capture.embedding_stats(loaded, windows), settings)
    inputs = capture.block_inputs(loaded, windows, batch_size)
    progress = tqdm(range(len(loaded.blocks())), desc="quantizing blocks", unit="block")
    for b in progress:
        block, linears = loaded.blocks()[b], loaded.block_linears(b)
        groups = loaded.block_groups(b)
        trained_here = [n for n in linears if n in plan and plan[n].method in BLOCK_METHODS]
        with passes(block, reconstruct):  # the full-precision stream only feeds reconstruction
            targets = capture.run_block(block, fp_inputs) if fp_inputs is not None else None
            if targets is None and (trained_here or reconstruct.norm_tuning):
                targets = capture.run_block(block, inputs)
        fp_weights = {n: linears[n].weight.detach().float().clone() for n in trained_here}
        block_stats: dict[str, capture.LayerStats] = {}
        # A block trained jointly afterwards captures all its statistics in one pass: the training
        # sees the interactions that a capture after each group would.
        sequential = true_sequential and not trained_here
        for stage in [[g] for g in groups] if sequential else [groups]:
            if not any(name in plan and not plan[name].is_keep for group in stage for name in group):
                continue
            stats = capture.collect_stats(block, linears, stage, inputs)
            for name, layer_stats in stats.items():
                if name in plan:
                    result.quantize_tensor(name, linears[name], plan[name], layer_stats, settings,
                                           reconstruct.bias_correction)
                    block_stats[name] = layer_stats
        if trained_here or reconstruct.norm_tuning:
            prefix = f"{loaded.arch.blocks}.{b}."
            starts = {n.removeprefix(prefix): (fp_weights[n], result.tensors[n]) for n in trained_here}
            r = reconstruct_block(block, starts, inputs, targets, reconstruct, settings.learn_scale)
            for rel, q in r.tensors.items():
                result.tensors[prefix + rel] = q
                result.output_errors[prefix + rel] = output_error(fp_weights[prefix + rel], q.dequantize(),
                                                                  block_stats[prefix + rel].H)
            result.block_losses.append((r.loss_before, r.loss_after))
            progress.set_postfix_str(f"block {b} output MSE {r.loss_before:.3g} -> {r.loss_after:.3g}")
            inputs.batches = r.outputs
        else:
            inputs.batches = capture.run_block(block, inputs)
        if fp_inputs is not None:
            fp_inputs.batches = targets
    head = loaded.head_name
    if head in plan:
        result.quantize_tensor(head, loaded.model.get_submodule(head), plan[head],
                               capture.head_stats(loaded, inputs), settings)
    return result
