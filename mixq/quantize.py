"""Apply a plan (tensor -> option) to a model, sequentially, block by block (as in GPTQ).

For each block: capture the H of one input group of linears (q/k/v, then o, then gate/up, then
down) on inputs that already passed through the quantized earlier blocks and groups, quantize
that group, and move on; finally recompute the block's outputs with its quantized weights to feed
the next block. With `true_sequential=False` one pass captures every group of a block at once.
The output matrix (the embedding, when tied) comes last, with the H of its input.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from mixq import capture
from mixq.errors import MixqError
from mixq.formats import QTensor, parse_format
from mixq.methods import MethodSettings, get_method, output_error
from mixq.models import LoadedModel
from mixq.options import Option

log = logging.getLogger(__name__)


@dataclass
class QuantizedModel:
    """The quantized tensors of a model (by tensor name) and their layer errors."""

    tensors: dict[str, QTensor] = field(default_factory=dict)
    options: dict[str, Option] = field(default_factory=dict)
    output_errors: dict[str, float] = field(default_factory=dict)  # tr(dW H dW^T) per tensor

    def quantize_tensor(self, name: str, weight: torch.nn.Parameter, option: Option,
                        stats: capture.LayerStats, settings: MethodSettings) -> None:
        """Quantize one weight with its option and write the dequantized values back into it."""
        self.options[name] = option
        if option.is_keep:
            return
        W = weight.detach().float()
        q = get_method(option.method)(W, stats.H, parse_format(option.format), settings)
        W_hat = q.dequantize()
        self.tensors[name] = q
        self.output_errors[name] = output_error(W, W_hat, stats.H)
        weight.data.copy_(W_hat.to(weight.dtype))


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
) -> QuantizedModel:
    """Quantize `loaded.model` in place (its weights become the dequantized ones)."""
    result = QuantizedModel()
    embedding = loaded.arch.embedding
    if not loaded.tied_embedding and embedding in plan:  # first: block 0 then reads quantized embeddings
        weight = loaded.model.get_submodule(embedding).weight
        result.quantize_tensor(embedding, weight, plan[embedding], capture.embedding_stats(loaded, windows), settings)
    inputs = capture.block_inputs(loaded, windows, batch_size)
    for b in tqdm(range(len(loaded.blocks())), desc="quantizing blocks", unit="block"):
        block, linears = loaded.blocks()[b], loaded.block_linears(b)
        groups = loaded.block_groups(b)
        for stage in [[g] for g in groups] if true_sequential else [groups]:
            if not any(name in plan and not plan[name].is_keep for group in stage for name in group):
                continue
            stats = capture.collect_stats(block, linears, stage, inputs)
            for name, layer_stats in stats.items():
                if name in plan:
                    result.quantize_tensor(name, linears[name].weight, plan[name], layer_stats, settings)
        inputs.batches = capture.run_block(block, inputs)
    head = loaded.head_name
    if head in plan:
        weight = loaded.model.get_submodule(head).weight
        result.quantize_tensor(head, weight, plan[head], capture.head_stats(loaded, inputs), settings)
    return result
