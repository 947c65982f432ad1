"""Apply per-tensor options to a model, sequentially, block by block (as in GPTQ).

For each block: capture the H of one input group of linears (q/k/v, then o, then gate/up, then
down) on inputs that already passed through the quantized earlier blocks and groups, quantize
that group, and move on; finally recompute the block's outputs with its quantized weights to feed
the next block. With `true_sequential=False` one pass captures every group of a block at once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from mixq import capture
from mixq.formats import QTensor, parse_format
from mixq.methods import MethodSettings, get_method, output_error
from mixq.models import LoadedModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Option:
    """One way to store one weight matrix: a number format and the method that rounds onto it."""

    format: str  # a registered format name, e.g. "int4-g128"
    method: str  # a registered method name, e.g. "gptq"

    @property
    def name(self) -> str:
        return f"{self.format}-{self.method}"


@dataclass
class QuantizedModel:
    """The quantized tensors of a model (by linear name) and what it cost to make them."""

    tensors: dict[str, QTensor] = field(default_factory=dict)
    options: dict[str, Option] = field(default_factory=dict)
    output_errors: dict[str, float] = field(default_factory=dict)  # tr(dW H dW^T) per linear


def uniform_plan(loaded: LoadedModel, option: Option) -> dict[str, Option]:
    """Every quantizable linear of the model gets the same option."""
    parse_format(option.format)
    get_method(option.method)
    return {name: option for name in loaded.quantizable()}


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
    inputs = capture.block_inputs(loaded, windows, batch_size)
    n_blocks = len(loaded.blocks())
    bar = tqdm(range(n_blocks), desc="quantizing blocks", unit="block")
    for b in bar:
        block = loaded.blocks()[b]
        linears = loaded.block_linears(b)
        prefix = f"{loaded.arch.blocks}.{b}"
        groups = [[f"{prefix}.{name}" for name in group] for group in loaded.arch.input_groups]
        stages = [[g] for g in groups] if true_sequential else [groups]
        for stage in stages:
            stats = capture.collect_stats(block, linears, stage, inputs)
            for name, layer_stats in stats.items():
                if name not in plan:
                    continue
                option = plan[name]
                weight = linears[name].weight
                W = weight.detach().float()
                q = get_method(option.method)(W, layer_stats.H, parse_format(option.format), settings)
                W_hat = q.dequantize()
                result.tensors[name] = q
                result.options[name] = option
                result.output_errors[name] = output_error(W, W_hat, layer_stats.H)
                weight.data.copy_(W_hat.to(weight.dtype))
        inputs.batches = capture.run_block(block, inputs)
    return result
