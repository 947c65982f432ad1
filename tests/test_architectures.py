"""Every supported family end to end on a tiny random model (bf16 safetensors), through the runner.

Checked against transformers itself: the runner's logits equal the model's own forward, each
matrix's captured H equals x^T x of the inputs transformers feeds it (experts: the tokens its
router sends them), and a quantized model saved and reloaded evaluates the same.
"""

import json
from pathlib import Path

import pytest
import torch
from conftest import FAMILY_CONFIGS, MOE

from mixq import capture
from mixq.cli import main
from mixq.evaluate import final_hidden
from mixq.export import native
from mixq.models import load_model, materialize
from mixq.runner import BlockRunner, fast_matmul_dtype

FAMILIES = list(FAMILY_CONFIGS)


def windows_of(loaded, n=3, seq=32, seed=0):
    return torch.randint(4, loaded.config.vocab_size, (n, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_runner_logits_equal_transformers(tiny_models, family):
    loaded = load_model(str(tiny_models(family)))
    windows = windows_of(loaded)
    runner = BlockRunner(loaded)
    hidden = final_hidden(runner, windows, 2, None, loaded.residents, "test")
    ours = torch.cat([runner.logits(h) for h in hidden])
    with torch.no_grad():
        theirs = materialize(loaded)(windows, use_cache=False).logits.float()
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4 * theirs.abs().max().item())


def direct_hessians(loaded, windows):
    """x^T x of every plannable matrix's inputs from one plain transformers forward pass, in float64.

    A linear's inputs come from forward pre-hooks. An expert's gate/up inputs are the tokens its
    router picked (read off the experts module's arguments); its down inputs come from running the
    experts module again on those tokens with every one sent to that expert alone, while a spy
    records what multiplies that expert's down matrix.
    """
    model = materialize(loaded)
    H: dict[str, torch.Tensor] = {}

    def add(name, x):
        x = x.reshape(-1, x.shape[-1]).double()
        H[name] = H.get(name, 0) + x.T @ x

    handles, routed = [], []
    for name, ref in loaded.quantizable().items():
        if ref.expert is None:
            module = model.get_submodule(name)
            handles.append(module.register_forward_pre_hook(lambda _m, args, n=name: add(n, args[0])))
    stacks = {ref.param.rsplit(".", 1)[0] for ref in loaded.quantizable().values() if ref.expert is not None}
    for path in stacks:
        def record(module, args, path=path):
            x, index = args[0], args[1]
            for e in range(module.gate_up_proj.shape[0]):
                tokens = (index == e).any(-1)
                if tokens.any():
                    add(f"{path}.gate_up_proj.{e}", x[tokens])
                    routed.append((path, e, x[tokens].clone()))

        handles.append(model.get_submodule(path).register_forward_pre_hook(record))
    with torch.no_grad():
        model(windows, use_cache=False)
    for h in handles:
        h.remove()
    for path, e, x in routed:
        experts = model.get_submodule(path)
        one = torch.full((x.shape[0], 1), e)
        with torch.no_grad(), DownSpy(experts.down_proj[e], lambda t, n=f"{path}.down_proj.{e}": add(n, t)):
            experts(x, one, torch.ones(x.shape[0], 1, dtype=x.dtype))
    return H


class DownSpy(torch.overrides.TorchFunctionMode):
    """Reports the left operand of every multiplication by one expert's down matrix."""

    def __init__(self, down, report):
        super().__init__()
        self.down, self.report = down, report

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.nn.functional.linear, torch.matmul, torch.Tensor.matmul) and len(args) >= 2:
            w = args[1]
            if isinstance(w, torch.Tensor) and w.data_ptr() == self.down.data_ptr() and w.shape == self.down.shape:
                self.report(args[0])
        return func(*args, **kwargs)


@pytest.mark.parametrize("family", ["gemma3_text", "qwen3_moe"])
def test_one_pass_gives_the_stats_and_outputs_of_two(tiny_models, family):
    """The profile's single pass per block: the H of every stage and the block's outputs, as the
    stage-by-stage capture and a separate run give them."""
    loaded = load_model(str(tiny_models(family)))
    runner = BlockRunner(loaded)
    batches = runner.embed(windows_of(loaded, n=4, seq=32), 3)
    for b in range(loaded.n_blocks):
        weights = loaded.block_weights(b)
        stats, outputs = capture.stats_and_outputs(runner, b, weights, batches)
        expected = runner.run(b, weights, batches)
        assert len(outputs) == len(expected) and all(torch.equal(o, e) for o, e in zip(outputs, expected))
        for stage in loaded.block_stages(b):
            alone = capture.collect_stats(runner, b, weights, [stage], batches)
            for name in stage:
                assert stats[name].n_tokens == alone[name].n_tokens
                assert torch.equal(stats[name].H, alone[name].H), name
        batches = outputs


@pytest.mark.parametrize("family", FAMILIES)
def test_captured_H_equals_direct_forward(tiny_models, family):
    loaded = load_model(str(tiny_models(family)))
    windows = windows_of(loaded, n=4, seq=32)
    expected = direct_hessians(loaded, windows)
    runner = BlockRunner(loaded)
    batches = runner.embed(windows, 3)
    assert len(batches) == 2  # batches of 3 and 1 windows
    checked = 0
    for b in range(loaded.n_blocks):
        weights = loaded.block_weights(b)
        for stage in loaded.block_stages(b):  # one stage at a time, as sequential quantization does
            stats = capture.collect_stats(runner, b, weights, [stage], batches)
            for name in stage:
                if name not in expected:
                    assert stats[name].n_tokens == 0  # an expert no token reached
                    continue
                scale = expected[name].abs().max().item()
                got = stats[name].H
                ref = loaded.quantizable()[name]
                if ref.expert is not None and stats[name].n_tokens < ref.shape[1]:  # rare expert: priced up
                    assert (torch.diag(got) >= torch.diag(expected[name]) - 1e-6 * scale).all()
                    continue
                torch.testing.assert_close(got.double(), expected[name].double(), rtol=1e-4, atol=1e-5 * scale)
                checked += 1
        batches = runner.run(b, weights, batches)
    experts = [n for n in expected if ".experts." in n]
    assert checked >= 2 * 4 and (family not in MOE or len(experts) >= 2 * 2 * 2)  # down experts checked too


@pytest.mark.parametrize("family", FAMILIES)
def test_quantize_eval_reload(tiny_models, text_file, tmp_path, capsys, family):
    model = tiny_models(family)
    calib = ["--calib-text", text_file, "--calib-windows", 8, "--calib-len", 64]
    evaluation = ["--eval-text", text_file, "--eval-windows", 4, "--eval-len", 64]
    reports = {}
    for bits in (4, 8):
        out = tmp_path / f"int{bits}"
        code = main([str(a) for a in ("quantize", model, "--bits", bits, "--group-size", 32, "--method", "gptq",
                                      *calib, *evaluation, "--out", out)])
        assert code == 0, capsys.readouterr().err
        info = json.loads((out / native.INFO_FILE).read_text())
        (reports[bits],) = info["evaluations"].values()
        assert len(info["plan"]) == len(load_model(str(model)).quantizable())
    assert reports[8]["kl_mean"] < 2e-3 and reports[8]["top1"] > 0.97 and reports[4]["kl_mean"] > 0
    code = main([str(a) for a in ("eval", tmp_path / "int4", "--text", text_file, "--windows", 4, "--seq-len", 64)])
    assert code == 0
    (again,) = json.loads((tmp_path / "int4" / native.INFO_FILE).read_text())["evaluations"].values()
    for key in ("ppl", "kl_mean", "top1"):
        assert again[key] == pytest.approx(reports[4][key], rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("family", ["gemma3_text", "qwen3_moe"])
def test_streamed_and_in_memory_give_identical_bytes(tiny_models, text_file, tmp_path, capsys, family):
    args = ["quantize", tiny_models(family), "--bits", 3, "--group-size", 32, "--calib-text", text_file,
            "--calib-windows", 8, "--calib-len", 64]
    assert main([str(a) for a in (*args, "--out", tmp_path / "streamed")]) == 0
    assert main([str(a) for a in (*args, "--in-memory", "--out", tmp_path / "memory")]) == 0
    a = (tmp_path / "streamed" / native.WEIGHTS_FILE).read_bytes()
    assert a == (tmp_path / "memory" / native.WEIGHTS_FILE).read_bytes()


@pytest.mark.parametrize("family", ["phi3", "qwen3_moe", "gpt_oss"])
def test_budget_plan_with_experts_as_options(tiny_models, text_file, tmp_path, capsys, family):
    out = tmp_path / "plan"
    code = main([str(a) for a in ("quantize", tiny_models(family), "--budget", "7bpw", "--bits-options", "3,4,8",
                                  "--group-sizes", 32, "--fisher-windows", 2, "--calib-text", text_file,
                                  "--calib-windows", 8, "--calib-len", 64, "--held-out-len", 64, "--out", out)])
    assert code == 0, capsys.readouterr().err
    info = json.loads((out / native.INFO_FILE).read_text())
    assert info["storage"]["bpw"] <= 7
    from mixq.profile import Profile

    profile = Profile.load(out / "mixq.profile")
    experts = [n for n in profile.tensors if ".experts." in n]
    assert bool(experts) == (family in MOE)
    # routing would send other tokens to the experts of a perturbed run: no tapes there; nor where
    # bfloat16 products are emulated (slower than float32)
    fast_bf16 = fast_matmul_dtype("cpu") == torch.bfloat16
    assert profile.info["kl_later_blocks"] == ("taped" if fast_bf16 and not experts else "float32")
    assert profile.info["passes"] == ("bfloat16 matmuls" if fast_bf16 else "float32")
    if experts:  # routing shares of one stack sum to one
        shares = profile.info["expert_tokens"]
        stack = [n for n in experts if "layers.0.mlp.experts.gate_up_proj" in n]
        assert sum(shares[n] for n in stack) == pytest.approx(1.0)
        assert len({info["plan"][n] for n in experts}) >= 1


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="reads the CPU's features from /proc/cpuinfo")
def test_passes_multiply_in_bfloat16_only_where_the_cpu_does_it_in_hardware():
    """Emulated bfloat16 products cost more than float32 ones (4.8x on an AVX2 CPU): the passes'
    precision follows the CPU's features as the kernel lists them."""
    flags = set(Path("/proc/cpuinfo").read_text().split())
    expected = torch.bfloat16 if flags & {"amx_bf16", "avx512_bf16"} else torch.float32
    assert fast_matmul_dtype("cpu") == expected
    assert fast_matmul_dtype(torch.device("cpu")) == expected


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "phi3"])
def test_bfloat16_passes_stay_near_float32(tiny_models, family):
    """Quantization's passes run their matmuls in bfloat16: every stage's H and the block outputs
    differ from float32 passes only by bfloat16 rounding (and do differ: the autocast is on)."""
    loaded = load_model(str(tiny_models(family)))
    windows = windows_of(loaded, n=4, seq=32)
    exact, fast = BlockRunner(loaded), BlockRunner(loaded, torch.bfloat16)
    batches = exact.embed(windows, 2)
    for b in range(loaded.n_blocks):
        weights = loaded.block_weights(b)
        stats, outputs = capture.stats_and_outputs(exact, b, weights, batches)
        stats16, outputs16 = capture.stats_and_outputs(fast, b, weights, batches)
        for name in stats:
            rel = (stats16[name].H - stats[name].H).norm() / stats[name].H.norm()
            assert rel < 2e-2, (name, rel)  # block 0's first input is the same embedding
        out, out16 = torch.cat(outputs), torch.cat(outputs16)
        assert out16.dtype == torch.float32
        assert 0 < (out16 - out).norm() / out.norm() < 1e-2
        batches = outputs


DENSE = [f for f in FAMILIES if f not in MOE]


@pytest.mark.parametrize("family", DENSE)
def test_a_taped_block_replays_its_reference_exactly_and_a_nearby_run_closely(tiny_models, family):
    """Replaying a block from its tape gives the reference outputs to the bit on the reference's
    inputs, and on perturbed inputs the float32 outputs' change to bfloat16's precision of the change
    (not of the activations: the error is far below what bfloat16 matmuls would make)."""
    loaded = load_model(str(tiny_models(family)))
    runner = BlockRunner(loaded)
    batches = runner.embed(windows_of(loaded, n=4, seq=32), 2)
    g = torch.Generator().manual_seed(2)
    for b in range(loaded.n_blocks):
        weights = loaded.block_weights(b)
        reference, tapes = runner.run_taped(b, weights, batches)
        assert all(torch.equal(x, y) for x, y in zip(runner.run(b, weights, batches), reference))
        replayed, = runner.run_from_tapes(b, weights, [batches], tapes)
        assert all(torch.equal(x, y) for x, y in zip(replayed, reference))
        nearby = [x + 1e-2 * x.std() * torch.randn(x.shape, generator=g) for x in batches]
        exact = torch.cat(runner.run(b, weights, nearby)) - torch.cat(reference)
        taped = torch.cat(runner.run_from_tapes(b, weights, [nearby], tapes)[0]) - torch.cat(reference)
        assert exact.norm() > 0 and (taped - exact).norm() / exact.norm() < 2e-2, family
        batches = reference
