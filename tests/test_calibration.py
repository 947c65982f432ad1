"""Learned rounding (adaquant, block reconstruction) and norm tuning on small layers and a tiny Llama."""

from __future__ import annotations

import copy

import pytest
import torch

from mixq.formats import parse_format
from mixq.methods import MethodSettings, get_method, output_error
from mixq.methods.rounding import LearnedRounding, sign_descent
from mixq.models import load_model
from mixq.options import Option
from mixq.quantize import quantize_model, uniform_plan
from mixq.reconstruct import ReconstructSettings, norm_weights


def layer(seed: int, rows: int = 16, cols: int = 64, tokens: int = 512):
    """A weight and H = X^T X of correlated inputs (the case where rounding choices interact)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    X = torch.randn(tokens, cols, generator=g) @ torch.randn(cols, cols, generator=g) * 0.3
    return W, (X.T @ X).double()


@pytest.mark.parametrize("fmt_name", ["int3-g32", "int4-g32-sym", "int2-g64", "q4_0", "q5_1", "q3_k", "q4_k"])
@pytest.mark.parametrize("seed", [0, 1])
def test_adaquant_lowers_output_error_and_stays_on_the_grid(fmt_name, seed):
    W, H = layer(seed, cols=256)
    fmt = parse_format(fmt_name)
    settings = MethodSettings(init="rtn", steps=60)
    start = get_method("rtn")(W, H, fmt, settings)
    q = get_method("adaquant")(W, H, fmt, settings)
    assert output_error(W, q.dequantize(), H) < output_error(W, start.dequantize(), H)
    # On the grid: codes in range, and storage round-trips to exactly the same weights and bytes.
    assert q.codes.dtype == torch.uint8 and int(q.codes.max()) <= fmt.qmax
    packed = fmt.pack(q)
    assert torch.equal(fmt.unpack(packed, q.shape).dequantize(), q.dequantize())
    assert sum(t.numel() * t.element_size() for t in packed.values()) == fmt.nbytes(q.shape) == start.nbytes()


@pytest.mark.parametrize("fmt_name", ["int3-g32", "q4_k"])
def test_learned_rounding_starts_exactly_at_its_start(fmt_name):
    W, H = layer(2, rows=8, cols=256)
    fmt = parse_format(fmt_name)
    start = get_method("gptq")(W, H, fmt, MethodSettings())
    rounding = LearnedRounding(W, start)
    assert torch.equal(rounding().detach(), start.dequantize())
    assert torch.equal(rounding.to_qtensor().codes, start.codes)


def test_adaquant_is_never_worse_than_gptq():
    W, H = layer(3)
    fmt = parse_format("int3-g32")
    gptq = get_method("gptq")(W, H, fmt, MethodSettings())
    ada = get_method("adaquant")(W, H, fmt, MethodSettings(steps=30))
    assert output_error(W, ada.dequantize(), H) <= output_error(W, gptq.dequantize(), H)


def test_a_small_step_keeps_the_codes_gptq_moved_off_nearest_rounding():
    W, H = layer(4, rows=16, cols=128)
    fmt = parse_format("int3-g32")
    start = get_method("gptq")(W, H, fmt, MethodSettings())
    rounding = LearnedRounding(W, start, learn_scale=False)
    unrounded = (W + rounding.offset) / rounding.scale + rounding.zero
    off = (unrounded - start.codes.float()).abs() > 0.5
    assert off.float().mean() > 0.02  # GPTQ does move codes off nearest rounding here
    with torch.no_grad():
        rounding.v.copy_(0.2 * torch.sign(unrounded - start.codes.float()))  # every code pushed toward nearest
    moved = rounding.to_qtensor().codes != start.codes
    assert not moved[off].any()


def test_massive_activation_columns_keep_their_start_codes_and_group_scales():
    """Training moves codes and scales everywhere else; a column whose diag(H) is 10^5 x the median
    (a massive activation) keeps the start's codes, and its group keeps the start's scales."""
    W, H = layer(5, rows=16, cols=64)
    fmt = parse_format("int3-g32")
    start = get_method("rtn")(W, H, fmt, MethodSettings())
    importance = torch.diag(H).float()
    importance[5] = 1e5 * importance.median()
    target = W + torch.randn(W.shape, generator=torch.Generator().manual_seed(0))  # pulls every weight away

    def trained(importance: torch.Tensor | None):
        rounding = LearnedRounding(W, start, importance=importance)
        sign_descent([(list(rounding.parameters()), 0.05)], lambda _: (rounding() - target).square().sum(), 20,
                     rounding.clamp_)
        return rounding.to_qtensor()

    free, frozen = trained(None), trained(importance)
    assert not torch.equal(free.codes[:, 5], start.codes[:, 5])  # without the rule, column 5 moves
    assert not torch.equal(free.scale[:, 0], start.scale[:, 0])
    assert torch.equal(frozen.codes[:, 5], start.codes[:, 5])
    assert torch.equal(frozen.scale[:, 0], start.scale[:, 0])  # column 5 lies in group 0
    assert not torch.equal(frozen.codes[:, 32:], start.codes[:, 32:])  # the rest still trains
    assert not torch.equal(frozen.scale[:, 1], start.scale[:, 1])


@pytest.mark.parametrize("fmt_name", ["int3-g32", "int4-g64-sym", "int2-g64", "q4_0", "q3_k", "q4_k"])
def test_coordinate_descent_lowers_gptqs_error_on_the_same_grid(fmt_name):
    W, H = layer(5, rows=32, cols=256, tokens=1024)
    fmt = parse_format(fmt_name)
    gptq = get_method("gptq")(W, H, fmt, MethodSettings())
    cd = get_method("cd")(W, H, fmt, MethodSettings())
    assert output_error(W, cd.dequantize(), H) < 0.95 * output_error(W, gptq.dequantize(), H)
    assert torch.equal(cd.scale, gptq.scale) and torch.equal(cd.zero, gptq.zero)
    assert int(cd.codes.max()) <= fmt.qmax and cd.nbytes() == gptq.nbytes()
    assert torch.equal(fmt.unpack(fmt.pack(cd), cd.shape).dequantize(), cd.dequantize())


def test_coordinate_descent_ends_where_no_single_code_move_helps():
    """Brute force over every code and both directions: the converged result is a local minimum."""
    W, H = layer(6, rows=4, cols=64, tokens=256)
    fmt = parse_format("int3-g32")
    q = get_method("cd")(W, H, fmt, MethodSettings(cd_passes=50))
    best = output_error(W, q.dequantize(), H)
    for r in range(4):
        for c in range(64):
            for move in (-1, 1):
                code = int(q.codes[r, c]) + move
                if 0 <= code <= fmt.qmax:
                    codes = q.codes.clone()
                    codes[r, c] = code
                    moved = type(q)(q.format, codes, q.scale, q.zero, q.offset, q.super_scale)
                    assert output_error(W, moved.dequantize(), H) >= best * (1 - 1e-5), (r, c, move)


def quantize_tiny(tiny_llama_dir, text_file, option: Option, reconstruct: ReconstructSettings, windows=None,
                  settings: MethodSettings = MethodSettings()):
    from mixq.data import WindowSpec, load_windows

    loaded = load_model(str(tiny_llama_dir))
    reference = None
    if windows is None:
        windows = load_windows(loaded, WindowSpec(8, 64, text_file), first=False)
    result = quantize_model(loaded, windows, uniform_plan(loaded, option), settings, batch_size=4,
                            reconstruct=reconstruct)
    return loaded, reference, result, windows


@pytest.mark.parametrize("bf16", [True, False])
def test_block_reconstruction_lowers_every_block_loss_and_is_deterministic(tiny_llama_dir, text_file, bf16):
    settings = ReconstructSettings(steps=20, batch_windows=2, bf16=bf16)
    _, _, first, _ = quantize_tiny(tiny_llama_dir, text_file, Option("int3-g32", "block"), settings)
    assert len(first.block_losses) == 2
    assert all(after <= before for before, after in first.block_losses)
    assert any(after < before for before, after in first.block_losses)
    _, _, again, _ = quantize_tiny(tiny_llama_dir, text_file, Option("int3-g32", "block"), settings)
    for name, q in first.tensors.items():
        fmt = q.format
        assert fmt.pack(q).keys() == fmt.pack(again.tensors[name]).keys()
        for part, t in fmt.pack(q).items():
            assert torch.equal(t, fmt.pack(again.tensors[name])[part]), (name, part)


def test_block_reconstruction_at_8_bits_matches_full_precision(tiny_llama_dir, text_file, tmp_path):
    from mixq.evaluate import evaluate
    from mixq.export import native

    loaded, _, result, windows = quantize_tiny(
        tiny_llama_dir, text_file, Option("int8-g32", "block"), ReconstructSettings(steps=10, batch_windows=2))
    native.save(tmp_path, loaded, result, {"model": loaded.spec})
    report = evaluate(loaded, windows, native.NativeSource(tmp_path))
    assert report.kl_mean < 1e-3 and report.top1 > 0.98
    assert all(before < 1e-4 * 64 for before, _ in result.block_losses)


def test_norm_tuning_touches_only_norm_weights(tiny_llama_dir, text_file):
    # Full-range RTN rounds each weight independently of the inputs, which norm tuning changes downstream.
    rtn = (Option("int3-g32", "rtn"), MethodSettings(clip_search=False))
    tuned, _, result, _ = quantize_tiny(tiny_llama_dir, text_file, rtn[0], ReconstructSettings(
        norm_tuning=True, steps=20, batch_windows=2), settings=rtn[1])
    norms = {f"{tuned.layout.blocks}.{b}.{n}" for b in range(2) for n in norm_weights(tuned.blocks()[b])}
    assert norms and all(n.endswith("layernorm.weight") for n in norms)
    assert result.changed and set(result.changed) <= norms
    assert all(a <= b for b, a in result.block_losses)


def test_bias_correction_removes_the_mean_output_error():
    from mixq import capture
    from mixq.quantize import QuantizedModel

    g = torch.Generator().manual_seed(0)
    layer_ = torch.nn.Linear(64, 16)
    X = torch.randn(512, 64, generator=g) + 0.5  # inputs with a non-zero mean
    stats = capture.LayerStats.empty(64)
    stats.add(X)
    with torch.no_grad():
        reference = layer_(X)
    for correct in (False, True):
        lin = copy.deepcopy(layer_)
        QuantizedModel().quantize_tensor("lin", lin.weight.data, Option("int2-g32", "rtn"), stats, MethodSettings(),
                                         lin.bias.data if correct else None)
        with torch.no_grad():
            shift = (lin(X) - reference).mean(dim=0).abs().max()
        if correct:
            assert shift < 1e-4
        else:
            assert shift > 1e-2


def test_reconstruction_runs_in_its_own_precision_whatever_the_runner(tiny_llama_dir, text_file):
    """--fp32-training means float32 block passes even when the stage's runner is bfloat16 (quantize's
    default on a CPU with bfloat16 products), and bfloat16 training stays bfloat16 under a float32
    runner; on a CPU that would emulate bfloat16, training runs in float32 either way."""
    from mixq.data import WindowSpec, load_windows
    from mixq.reconstruct import reconstruct_block
    from mixq.runner import BlockRunner, fast_matmul_dtype

    loaded = load_model(str(tiny_llama_dir))
    windows = load_windows(loaded, WindowSpec(4, 64, text_file), first=False)
    weights = loaded.block_weights(0)
    refs, prefix = loaded.block_tensors(0), loaded.layout.block_prefix(0)
    fmt = parse_format("int3-g32")
    name = next(iter(refs))
    W = refs[name].view(weights, prefix).float().clone()
    start = get_method("rtn")(W, torch.eye(W.shape[1]), fmt, MethodSettings())
    refs[name].view(weights, prefix).copy_(start.dequantize())
    losses = {}
    for bf16 in (False, True):
        settings = ReconstructSettings(steps=2, batch_windows=2, bf16=bf16)
        for runner_dtype in (torch.float32, torch.bfloat16):
            runner = BlockRunner(loaded, runner_dtype)
            batches = runner.embed(windows, 2)
            targets = [x + 0.01 for x in batches]
            r = reconstruct_block(runner, 0, {k: v.clone() for k, v in weights.items()}, {name: (W, start)},
                                  batches, targets, settings)
            losses[bf16, runner_dtype] = r.loss_before
    assert losses[False, torch.float32] == losses[False, torch.bfloat16]
    assert losses[True, torch.float32] == losses[True, torch.bfloat16]
    trains_in_bfloat16 = fast_matmul_dtype("cpu") == torch.bfloat16
    assert (losses[True, torch.float32] != losses[False, torch.float32]) == trains_in_bfloat16
