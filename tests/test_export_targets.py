"""Export targets: compressed-tensors (transformers, vLLM) carries every value over exactly; targets
refuse what they cannot store, and `--target` keeps plans within what they store."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import save_tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st

from mixq.cli import main
from mixq.data import WindowSpec, load_windows
from mixq.errors import MixqError
from mixq.export import TARGETS, compressed_tensors, get_target, native
from mixq.formats import QTensor, parse_format
from mixq.formats.integer import IntFormat
from mixq.methods import MethodSettings
from mixq.models import load_model, materialize
from mixq.options import Option, OptionSpace
from mixq.plan import Budget
from mixq.profile import OptionTable
from mixq.quantize import quantize_model

MIXED = (Option("int4-g32", "gptq"), Option("int8-ch", "rtn"), Option("int3-g16-sym", "gptq"),
         Option("int2-g32", "rtn"), Option("f16", "keep"), Option("int5-g64-sym", "gptq"))


def quantized_dir(model_dir, text_file, out, options=MIXED):
    """A mixq output of `model_dir` whose linears take `options` in turn."""
    loaded = load_model(str(model_dir))
    windows = load_windows(loaded, WindowSpec(8, 64, text_file), first=False)
    plan = {n: options[i % len(options)] for i, n in enumerate(loaded.quantizable())}
    result = quantize_model(loaded, windows, plan, MethodSettings())
    out.mkdir()
    native.save(out, loaded, result, {"model": loaded.spec})
    return loaded, windows, out


def transformers_logits(path, ids, dtype):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    with torch.no_grad():
        return model(ids).logits.float()


def mixq_logits(loaded, out, ids):
    with torch.no_grad():
        return materialize(loaded, native.NativeSource(out))(ids).logits


def mean_kl(p_logits, q_logits):
    return torch.nn.functional.kl_div(q_logits.log_softmax(-1), p_logits.log_softmax(-1), log_target=True,
                                      reduction="none").sum(-1).mean().item()


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_compressed_tensors_carries_every_value_over(model_type, text_file, tmp_path):
    """A mix of integer formats (asymmetric and symmetric, 2-8 bits, groups and channels) and kept
    linears loads in transformers; in float32 its logits are mixq's, in float16 (the config's dtype)
    within fp16 rounding."""
    model_dir = save_tiny_model(tmp_path / model_type, model_type, tied=model_type == "llama")
    loaded, windows, out = quantized_dir(model_dir, text_file, tmp_path / "q")
    wrote = get_target("compressed-tensors").export(out, tmp_path / "ct", False)
    assert "kept at 16 bits" in wrote

    config = json.loads((tmp_path / "ct" / "config.json").read_text())
    qconfig = config["quantization_config"]
    assert qconfig["quant_method"] == "compressed-tensors" and qconfig["format"] == "pack-quantized"
    schemes = {m: g["weights"] for g in qconfig["config_groups"].values() for m in g["targets"]}
    for i, name in enumerate(loaded.quantizable()):
        option = MIXED[i % len(MIXED)]
        if option.is_keep:
            assert name in qconfig["ignore"] and name not in schemes
            continue
        fmt = parse_format(option.format)
        w = schemes[name]
        assert (w["num_bits"], w["symmetric"], w["group_size"], w["strategy"]) == (
            fmt.bits, fmt.symmetric, fmt.group_size or None, "group" if fmt.group_size else "channel")
    assert "lm_head" in qconfig["ignore"]

    ids = windows[:2]
    ours = mixq_logits(loaded, out, ids)
    exact = transformers_logits(tmp_path / "ct", ids, torch.float32)
    assert torch.allclose(exact, ours, atol=1e-5, rtol=0), (exact - ours).abs().max()
    half = transformers_logits(tmp_path / "ct", ids, torch.float16)
    assert mean_kl(ours, half) < 1e-3


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(2, 8), group=st.sampled_from([0, 16, 32, 64]), symmetric=st.booleans(),
       rows=st.integers(1, 70), groups=st.integers(1, 4), seed=st.integers(0, 2**31 - 1))
def test_packing_decompresses_to_mixq_values(bits, group, symmetric, rows, groups, seed):
    """Any codes and zero points, packed as compressed-tensors stores them, decompress (by the package's
    own code) to exactly mixq's dequantized weight."""
    fmt = IntFormat(bits, group, symmetric)
    cols = (group or 16) * groups
    gen = torch.Generator().manual_seed(seed)
    n_groups = fmt.n_groups(cols)
    codes = torch.randint(0, 2**bits, (rows, cols), generator=gen, dtype=torch.uint8)
    scale = (torch.rand(rows, n_groups, generator=gen) + 1e-3).half().float()
    zero = torch.full_like(scale, 2.0 ** (bits - 1)) if symmetric else \
        torch.randint(0, 2**bits, (rows, n_groups), generator=gen).float()
    q = fmt.unpack(fmt.pack(QTensor(fmt, codes, scale, zero)), (rows, cols))  # as mixq stores it
    tensors = compressed_tensors.packed(q, q.scale.half())
    assert torch.equal(compressed_tensors.dequantized_by_the_package(tensors, fmt), q.dequantize())


def test_targets_refuse_what_they_cannot_store(tiny_llama_dir, text_file, tmp_path):
    ggml = quantized_dir(tiny_llama_dir, text_file, tmp_path / "ggml", (Option("q8_0", "rtn"),))[2]
    with pytest.raises(MixqError, match=r"model.layers.0.self_attn.q_proj is stored as q8_0: compressed-tensors"):
        get_target("compressed-tensors").export(ggml, tmp_path / "ct", False)
    assert not (tmp_path / "ct").exists()
    int8 = quantized_dir(tiny_llama_dir, text_file, tmp_path / "int8", (Option("int8-g32", "rtn"),))[2]
    with pytest.raises(MixqError, match=r"vLLM's CPU kernel runs 4-bit"):
        get_target("vllm").export(int8, tmp_path / "v", False)
    with pytest.raises(MixqError, match=r"is stored as int8-g32: llama.cpp reads ggml types only; the nearest to int8-g32 is q8_0"):
        get_target("gguf").export(int8, tmp_path / "x.gguf", False)
    assert not (tmp_path / "v").exists() and not (tmp_path / "x.gguf").exists()
    assert compressed_tensors.refusal("int4-g128", (64, 576)).startswith("its 576 columns are not a whole number")
    assert compressed_tensors.refusal("int4-g64", (64, 576)) is None


def test_target_restricts_the_option_space(tiny_llama_dir):
    loaded = load_model(str(tiny_llama_dir))
    space = OptionSpace(group_sizes=(32, 128))
    free = OptionTable.build(loaded, space)
    for name in TARGETS:
        if name == "gguf":
            continue
        table = OptionTable.build(loaded, space, name)
        assert (table.allowed <= free.allowed).all() and table.allowed.sum() < free.allowed.sum()
        for t, tensor in enumerate(table.tensors):
            for o in np.nonzero(table.allowed[t])[0]:
                option = table.options[o]
                if not option.is_keep:
                    assert get_target(name).refuses(loaded, tensor, option.format, loaded.plannable()[tensor].shape) is None
    vllm = OptionTable.build(loaded, space, "vllm")
    formats = {o.format for t in range(len(vllm.tensors)) for o in np.array(vllm.options)[vllm.allowed[t]]}
    assert formats == {"int4-g32", "f16"}  # 64 columns: no group of 128; 4 bits only


def test_quantize_for_a_target_then_export(tiny_llama_dir, text_file, tmp_path, capsys):
    common = ["--calib-text", str(text_file), "--calib-windows", "4", "--calib-len", "64"]
    assert main(["quantize", str(tiny_llama_dir), "--format", "int4-g128", "--target", "compressed-tensors",
                 "--out", str(tmp_path / "refused"), *common]) == 2
    assert "cannot store model.layers.0.self_attn.q_proj (64, 64) as int4-g128" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()

    out = tmp_path / "q"
    assert main(["quantize", str(tiny_llama_dir), "--budget", "7bpw", "--target", "vllm", "--out", str(out),
                 "--held-out-windows", "2", "--held-out-len", "64", "--fisher-windows", "0", *common]) == 0
    info = json.loads((out / native.INFO_FILE).read_text())
    plan = info["plan"]
    # int4 in groups of 32 is also Q4_0/Q4_1, so such a plan is exportable to llama.cpp as well
    ggml_too = all(o == "f16" or o.startswith("int4-g32-") for o in plan.values())  # option: FORMAT-METHOD
    assert info["exportable_to"] == ["compressed-tensors", *["gguf", "llama-quantize-recipe"] * ggml_too, "vllm"]
    for b in range(2):  # vLLM fuses q/k/v and gate/up: each takes one option
        p = f"model.layers.{b}."
        assert plan[p + "self_attn.q_proj"] == plan[p + "self_attn.k_proj"] == plan[p + "self_attn.v_proj"]
        assert plan[p + "mlp.gate_proj"] == plan[p + "mlp.up_proj"]
    assert all(o == "f16" or o.startswith("int4-") for o in plan.values())
    assert main(["export", str(out), "--to", "vllm", str(tmp_path / "v")]) == 0
    assert (tmp_path / "v" / "model.safetensors").is_file() and (tmp_path / "v" / "tokenizer.json").is_file()
    # the budget is vLLM's model.safetensors: never above the prediction, which is within the header bound
    size, predicted = (tmp_path / "v" / "model.safetensors").stat().st_size, info["plan_summary"]["max_file_bytes"]
    assert size <= predicted <= Budget.parse("7bpw").total_bytes(info["plan_summary"]["n_weights"])
    assert predicted - size <= compressed_tensors.header_bound(load_model(str(tiny_llama_dir)), list(plan))
    assert main(["export", str(out), "--to", "vllm", str(tmp_path / "v")]) == 2  # exists: not replaced
    assert "already exists" in capsys.readouterr().err


@pytest.mark.slow
def test_smollm2_in_transformers_matches_mixq(smollm2, tmp_path):
    """SmolLM2 with a mixed plan, exported and loaded by transformers in its default dtype (float16):
    mean KL to mixq's own model of the same file, on sampled windows."""
    from mixq.data import sample_windows

    windows = sample_windows(smollm2, n=4, seq_len=128, seed=0)
    plan = {n: (Option("int4-g64", "gptq"), Option("int8-ch", "gptq"), Option("f16", "keep"))[i % 3]
            for i, n in enumerate(smollm2.quantizable())}
    result = quantize_model(smollm2, windows, plan, MethodSettings())
    out = tmp_path / "q"
    out.mkdir()
    native.save(out, smollm2, result, {"model": smollm2.spec})
    get_target("compressed-tensors").export(out, tmp_path / "ct", False)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ct")
    assert model.dtype == torch.float16
    with torch.no_grad():
        theirs = model(windows[:2]).logits.float()
    kl = mean_kl(mixq_logits(smollm2, out, windows[:2]), theirs)
    assert kl < 1e-3 and math.isfinite(kl), kl


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral"])
def test_a_mixture_of_experts_in_transformers(model_type, text_file, tmp_path, capsys):
    """Quantized for the compressed-tensors target, every expert of the model shares one symmetric grid
    (transformers reads experts in one scheme, without zero points) while the other linears mix:
    transformers loads the export (each expert written as the linears its checkpoint lists) and its
    logits are mixq's within the fp16 rounding of the experts, which transformers decompresses in the
    scales' dtype."""
    model_dir = save_tiny_model(tmp_path / model_type, model_type, tied=False)
    out = tmp_path / "q"
    assert main(["quantize", str(model_dir), "--budget", "14bpw", "--target", "compressed-tensors",
                 "--bits-options", "3,4,8", "--group-sizes", "32,64", "--methods", "rtn", "--fisher-windows", "0",
                 "--calib-text", str(text_file), "--calib-windows", "8", "--calib-len", "64", "--out", str(out)]) == 0
    info = json.loads((out / native.INFO_FILE).read_text())
    plan = info["plan"]
    experts = {o for n, o in plan.items() if ".experts." in n}
    assert len(experts) == 1 and "-sym" in next(iter(experts)), experts
    assert len({o for n, o in plan.items() if ".experts." not in n and "embed" not in n}) >= 2  # the rest mixes
    get_target("compressed-tensors").export(out, tmp_path / "ct", False)
    qconfig = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert qconfig["config_groups"]["experts"]["targets"] == [compressed_tensors.EXPERTS_TARGET]
    # the budget is the written model.safetensors (each expert split into its checkpoint's linears)
    size, predicted = (tmp_path / "ct" / "model.safetensors").stat().st_size, info["plan_summary"]["max_file_bytes"]
    assert size <= predicted <= Budget.parse("14bpw").total_bytes(info["plan_summary"]["n_weights"])
    assert predicted - size <= compressed_tensors.header_bound(load_model(str(model_dir)), list(plan))

    loaded = load_model(str(model_dir))
    ids = load_windows(loaded, WindowSpec(2, 64, text_file), first=True)
    ours = mixq_logits(loaded, out, ids)
    theirs = transformers_logits(tmp_path / "ct", ids, torch.float32)
    assert mean_kl(ours, theirs) < 1e-5, mean_kl(ours, theirs)
    assert not torch.equal(ours, theirs)  # the experts' fp16 rounding is there: the test sees the experts


def test_experts_in_two_grids_or_with_zero_points_are_refused(text_file, tmp_path):
    model_dir = save_tiny_model(tmp_path / "moe", "qwen3_moe", tied=False)
    loaded = load_model(str(model_dir))
    refs = loaded.quantizable()
    for name, formats in (("two", ("int4-g32-sym", "int8-g32-sym")), ("asym", ("int4-g32", "int4-g32"))):
        options = {n: Option(formats[ref.expert % 2] if ref.expert is not None else "int8-ch", "rtn")
                   for n, ref in refs.items()}
        _, _, out = quantized_dir(model_dir, text_file, tmp_path / name, tuple(options.values()))
        match = "ties them" if name == "two" else "symmetric grids only"
        with pytest.raises(MixqError, match=match):
            get_target("compressed-tensors").export(out, tmp_path / f"{name}-ct", False)
        assert not (tmp_path / f"{name}-ct").exists()
