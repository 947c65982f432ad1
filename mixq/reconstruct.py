"""Block reconstruction (BRECQ; AutoRound's SignRound): after a transformer block's linears are
quantized, train their rounding jointly, and optionally the block's norm scales, so that the
quantized block reproduces the full-precision block's output on the calibration windows.

Sequential, one block in memory: the block's inputs come from the already-quantized blocks before
it; its targets are, by default (`target="fp"`), the outputs of the full-precision model at this
block, so the block also learns to undo the error that reached it. `target="local"` asks the
full-precision block for its output on the quantized inputs instead (pure per-block fidelity).

Forward passes run their matmuls in bfloat16 by default where the device multiplies it in hardware
(`ReconstructSettings.bf16`, see there).

Trained parameters: the learned rounding (methods/rounding.py) of every tensor whose option's method
is `block`, and with `norm_tuning` the weights of the block's norms (the LLM analogue of
AdaQuant's batch-norm tuning; stored at full precision, so they cost no bits). A block keeps the
trained parameters only if they lower its loss over all calibration windows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mixq.formats import QTensor
from mixq.methods.rounding import LearnedRounding, sign_descent
from mixq.models.layout import TensorRef
from mixq.runner import BlockRunner, fast_matmul_dtype

TARGETS = ("fp", "local")


@dataclass(frozen=True)
class ReconstructSettings:
    steps: int = 40  # signed-gradient steps per block
    batch_windows: int = 4  # calibration windows per step
    target: str = "fp"  # "fp": the full-precision model's outputs; "local": the fp block on quantized inputs
    norm_tuning: bool = False  # also train the block's norm weights
    norm_step: float = 0.002  # first step of a norm weight's relative change
    bias_correction: bool = False  # add a layer's mean output error to its bias, where it has one
    seed: int = 0
    # Matmuls in bfloat16 (autocast) in the training steps and in the passes over every calibration
    # window, where the device multiplies bfloat16 in hardware: 2.3-3x faster on an AMX CPU. The
    # residual stream, the loss and the layer statistics stay float32; a block output computed so
    # differs from float32 by ~0.1% of the int4 error.
    bf16: bool = True

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}")


@dataclass(frozen=True)
class BlockResult:
    loss_before: float  # mean squared error of the block's output over every window, before training
    loss_after: float  # ... and after (equal to before when training did not help)
    tensors: dict[str, QTensor]  # the trained rounding of each `block` tensor, by name in the block
    outputs: list[torch.Tensor]  # the block's outputs on the inputs, as it is left: the next block's inputs


def norm_weights(block: nn.Module) -> list[str]:
    """Names (inside the block) of the block's norm scales: 1-d weights of modules that are not linear layers."""
    return [
        f"{name}.weight"
        for name, module in block.named_modules()
        if not isinstance(module, nn.Linear) and isinstance(getattr(module, "weight", None), nn.Parameter)
        and module.weight.dim() == 1
    ]


def training_dtype(settings: ReconstructSettings, device: torch.device) -> torch.dtype:
    """The precision of the matmuls in the block's training and passes (the runner's autocast):
    with `bf16`, the device's fast one."""
    return fast_matmul_dtype(device) if settings.bf16 else torch.float32


def mse(outputs: list[torch.Tensor], targets: list[torch.Tensor]) -> float:
    """Mean squared error of a block's outputs against the targets, over every window."""
    return sum(float((y - t).square().sum()) for y, t in zip(outputs, targets)) / sum(t.numel() for t in targets)


def with_matrices(weights: dict[str, torch.Tensor], matrices: dict[TensorRef, torch.Tensor],
                  prefix: str) -> dict[str, torch.Tensor]:
    """`weights` with some matrices replaced, out of place (autograd flows into the new ones): a
    linear's weight is replaced whole, an expert stack is restacked with the given experts' matrices."""
    out = dict(weights)
    by_param: dict[str, dict[int | None, torch.Tensor]] = {}
    for ref, W in matrices.items():
        by_param.setdefault(ref.param.removeprefix(prefix), {})[ref.expert] = W.T if ref.transposed else W
    for param, slices in by_param.items():
        if None in slices:
            out[param] = slices[None]
        else:
            out[param] = torch.stack([slices.get(e, weights[param][e]) for e in range(weights[param].shape[0])])
    return out


def reconstruct_block(
    runner: BlockRunner,
    b: int,
    weights: dict[str, torch.Tensor],  # the block's parameters, quantized to the starts; updated in place
    starts: dict[str, tuple[torch.Tensor, QTensor]],  # tensor name -> (fp matrix, start)
    batches: list[torch.Tensor],
    targets: list[torch.Tensor],
    settings: ReconstructSettings,
    learn_scale: bool = True,
    importance: dict[str, torch.Tensor] | None = None,  # tensor name -> diag(H) of its inputs
) -> BlockResult:
    """Train the block's learned rounding (and norms) against the targets; write the result into `weights`.
    Given `importance`, each tensor's massive-activation columns keep their start (methods/rounding.py)."""
    loaded = runner.loaded
    runner = runner.in_precision(training_dtype(settings, runner.device))
    refs, prefix = loaded.block_tensors(b), loaded.layout.block_prefix(b)
    roundings = {name: LearnedRounding(W, q.to(W.device), learn_scale, (importance or {}).get(name))
                 for name, (W, q) in starts.items()}
    norms = norm_weights(loaded.blocks()[b]) if settings.norm_tuning else []
    norm_start = {name: weights[name].clone() for name in norms}
    norm_change = {name: nn.Parameter(torch.zeros_like(weights[name])) for name in norms}

    def trained_weights() -> dict[str, torch.Tensor]:
        out = with_matrices(weights, {refs[name]: r() for name, r in roundings.items()}, prefix)
        out.update({name: norm_start[name] * (1 + norm_change[name]) for name in norms})
        return out

    start_outputs = runner.run(b, weights, batches)
    before = mse(start_outputs, targets)
    if not roundings and not norms:
        return BlockResult(before, before, {}, start_outputs)
    x_all, y_all = torch.cat(batches), torch.cat(targets)
    gen = torch.Generator().manual_seed(settings.seed)
    order = torch.cat([torch.randperm(len(x_all), generator=gen) for _ in range(
        settings.steps * settings.batch_windows // len(x_all) + 1)])

    def step_loss(i: int) -> torch.Tensor:
        idx = order[i * settings.batch_windows : (i + 1) * settings.batch_windows]
        y = runner.call(b, trained_weights(), x_all[idx])
        return (y.float() - y_all[idx]).square().mean()

    def clamp() -> None:
        for r in roundings.values():
            r.clamp_()

    rounding_params = [p for r in roundings.values() for p in r.parameters()]
    groups = [(rounding_params, 1.0 / max(settings.steps, 1)), (list(norm_change.values()), settings.norm_step)]
    sign_descent(groups, step_loss, settings.steps, clamp)

    tensors = {name: r.to_qtensor() for name, r in roundings.items()}
    saved = {name: refs[name].view(weights, prefix).clone() for name in tensors}
    with torch.no_grad():
        for name, q in tensors.items():
            refs[name].view(weights, prefix).copy_(q.dequantize())
        for name in norms:
            weights[name].copy_(norm_start[name] * (1 + norm_change[name]))
    outputs = runner.run(b, weights, batches)
    after = mse(outputs, targets)
    if after < before:
        return BlockResult(before, after, tensors, outputs)
    with torch.no_grad():  # training did not help on the whole calibration set: back to the start
        for name, W in saved.items():
            refs[name].view(weights, prefix).copy_(W)
        for name in norms:
            weights[name].copy_(norm_start[name])
    return BlockResult(before, before, {}, start_outputs)
