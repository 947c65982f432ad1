"""Where things are in a model, found from its module tree and by watching one block run.

- the blocks: the ModuleList holding `num_hidden_layers` decoder layers;
- the embedding and head: transformers' `get_input_embeddings` / `get_output_embeddings`, and
  the final norm: the base model's child applied to the last block's output;
- per block, the matrices it multiplies by (every `F.linear` or `@` whose weight is a block
  parameter, or one expert's slice of a 3-D expert stack), in forward order, with the input each
  one reads: matrices that read the same tensor (q/k/v) form one stage of sequential quantization
  and share one H; the slices of one expert stack form one stage (each reads its routed tokens).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from mixq.errors import MixqError

FINAL_NORM_NAMES = ("norm", "final_layernorm", "final_norm", "ln_f")


_BLOCK = re.compile(r"\.(?:layers|h|blocks)\.(\d+)\.")


def block_and_kind(tensor: str) -> tuple[int | None, str]:
    """(block index, the tensor's role) from its name; tensors outside the blocks have no index."""
    m = _BLOCK.search(tensor)
    if m is None:
        return None, tensor.rsplit(".", 1)[-1] if "." in tensor else tensor
    kind = tensor[m.end():]
    return int(m.group(1)), re.sub(r"\.\d+$", "", kind)  # experts of one stack share a row


@dataclass(frozen=True)
class TensorRef:
    """One plannable matrix: a linear's weight, or one expert's slice of an expert stack."""

    name: str  # "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.experts.gate_up_proj.3"
    param: str  # the parameter holding it: "...q_proj.weight", "...mlp.experts.gate_up_proj"
    kind: str  # its role inside a block, shared across blocks: "self_attn.q_proj", "mlp.experts.gate_up_proj"
    shape: tuple[int, int]  # (out, in), as it multiplies
    expert: int | None = None  # index into the stack's first dimension
    transposed: bool = False  # stored (in, out): the stack is used as x @ W

    def view(self, weights: dict[str, torch.Tensor], prefix: str = "") -> torch.Tensor:
        """The (out, in) matrix inside a dict of parameters (a view: writing to it writes the parameter)."""
        w = weights[self.param.removeprefix(prefix)]
        if self.expert is not None:
            w = w[self.expert]
        return w.T if self.transposed else w


@dataclass(frozen=True)
class BlockLayout:
    tensors: tuple[TensorRef, ...]  # forward order
    stages: tuple[tuple[str, ...], ...]  # tensor names by shared input, in forward order


@dataclass(frozen=True)
class Layout:
    blocks: str  # path of the ModuleList of blocks
    embedding: str  # module path of the input embedding
    final_norm: str
    head: str  # module path of the output matrix
    tied: bool  # the head reuses the embedding's matrix
    block_layouts: tuple[BlockLayout, ...]

    def block_prefix(self, b: int) -> str:
        return f"{self.blocks}.{b}."


def find_blocks(model: nn.Module, n_layers: int) -> str:
    """Path of the ModuleList of decoder layers."""
    found = [name for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n_layers]
    if not found:
        raise MixqError(f"found no list of {n_layers} decoder layers in {type(model).__name__}")
    return min(found, key=len)


def module_name(model: nn.Module, module: nn.Module | None, what: str) -> str:
    for name, m in model.named_modules():
        if m is module:
            return name
    raise MixqError(f"{type(model).__name__} has no {what} that mixq can find")


def find_final_norm(model: nn.Module, blocks: str) -> str:
    base = blocks.rsplit(".", 1)[0]
    parent = model.get_submodule(base)
    for name in FINAL_NORM_NAMES:
        if isinstance(getattr(parent, name, None), nn.Module):
            return f"{base}.{name}"
    raise MixqError(f"{type(model).__name__} has no final norm among {base}.{{{', '.join(FINAL_NORM_NAMES)}}}")


def expert_stacks(block: nn.Module, n_experts: int | None) -> set[str]:
    """Names of the block's 3-D parameters with one matrix per expert."""
    if not n_experts:
        return set()
    return {n for n, p in block.named_parameters() if p.dim() == 3 and p.shape[0] == n_experts}


@dataclass
class MatmulCall:
    """One multiplication by a watched weight, seen while a block runs."""

    param: str  # the watched parameter's name
    expert: int | None  # which slice of an expert stack
    transposed: bool  # the weight is used as x @ W, so W is stored (in, out)
    x: torch.Tensor  # the input rows multiplied


class MatmulWatcher(torch.overrides.TorchFunctionMode):
    """Reports every `F.linear(x, W)` and `x @ W` whose W is one of the given tensors or one expert's
    slice of one. This sees matrices however a block uses them: nn.Linear, fused 3-D expert stacks
    (indexed per expert in transformers' eager expert loop), transposed stacks (gpt-oss)."""

    def __init__(self, weights: dict[str, torch.Tensor], report):
        super().__init__()
        self._by_id = {id(t): name for name, t in weights.items()}
        # An expert's matrix is a view into its stack's storage (however the stack itself was made).
        self._stacks = {t.untyped_storage().data_ptr(): (name, t) for name, t in weights.items() if t.dim() == 3}
        self._report = report

    def _find(self, w: object) -> tuple[str, int | None] | None:
        if not isinstance(w, torch.Tensor):
            return None
        if id(w) in self._by_id:
            return self._by_id[id(w)], None
        if w.dim() == 2 and self._stacks:
            found = self._stacks.get(w.untyped_storage().data_ptr())
            if found is not None:
                name, stack = found
                return name, (w.storage_offset() - stack.storage_offset()) // stack.stride(0)
        return None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.linear:
            found = self._find(args[1] if len(args) > 1 else kwargs.get("weight"))
            if found:
                self._report(MatmulCall(found[0], found[1], False, args[0]))
        elif func in (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__) and len(args) == 2:
            found = self._find(args[1])
            if found:
                self._report(MatmulCall(found[0], found[1], True, args[0]))
        return func(*args, **kwargs)


def block_layout(prefix: str, calls: list[MatmulCall], shapes: dict[str, tuple[int, ...]], kept: tuple[str, ...],
                 stacks: set[str]) -> BlockLayout:
    """A block's plannable matrices and stages from the multiplications seen in one run of it."""
    orientation: dict[str, bool] = {}
    order: list[str] = []  # parameters in order of first use
    input_of: dict[str, int] = {}  # parameter -> id of the first input it read
    for call in calls:
        if call.param not in orientation:
            orientation[call.param] = call.transposed
            order.append(call.param)
            input_of[call.param] = id(call.x)
    unseen = stacks - set(order)
    if unseen:
        raise MixqError(f"no expert of {prefix}{sorted(unseen)[0]} was routed a token while probing the block")
    tensors: list[TensorRef] = []
    stages: list[list[str]] = []
    stage_of_input: dict[int, int] = {}
    for param in order:
        kind = param.removesuffix(".weight")
        if kind in kept:
            continue
        if param in stacks:
            e, a, b = shapes[param]
            shape = (b, a) if orientation[param] else (a, b)
            refs = [TensorRef(f"{prefix}{kind}.{i}", prefix + param, kind, shape, i, orientation[param]) for i in range(e)]
            stages.append([r.name for r in refs])
        else:
            if len(shapes[param]) != 2:
                continue
            a, b = shapes[param]
            shape = (b, a) if orientation[param] else (a, b)
            refs = [TensorRef(prefix + kind, prefix + param, kind, shape, None, orientation[param])]
            key = input_of[param]
            if key in stage_of_input:
                stages[stage_of_input[key]].append(refs[0].name)
            else:
                stage_of_input[key] = len(stages)
                stages.append([refs[0].name])
        tensors += refs
    if not tensors:
        raise MixqError(f"block {prefix.rstrip('.')} multiplies by no matrix mixq can quantize")
    return BlockLayout(tuple(tensors), tuple(tuple(s) for s in stages))
