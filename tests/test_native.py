"""Saving and reloading a quantized model: exact bytes, exact round trip."""

import pytest
import torch
from conftest import save_tiny_llama

from mixq.data import WindowSpec, load_windows
from mixq.export import native
from mixq.methods import MethodSettings
from mixq.models import load_model
from mixq.options import Option
from mixq.quantize import quantize_model, uniform_plan


def quantized_tiny(tiny_llama_dir, text_file, option):
    loaded = load_model(str(tiny_llama_dir))
    windows = load_windows(loaded, WindowSpec(8, 64, text_file), first=False)
    result = quantize_model(loaded, windows, uniform_plan(loaded, option), MethodSettings())
    return loaded, result


def test_storage_accounting_equals_bytes_written(tiny_llama_dir, text_file, tmp_path):
    for option in (Option("int3-g32", "gptq"), Option("int8-ch", "rtn"), Option("int2-g16-sym", "rtn")):
        loaded, result = quantized_tiny(tiny_llama_dir, text_file, option)
        out = tmp_path / option.name
        out.mkdir()
        storage = native.save(out, loaded, result.tensors, {"model": loaded.spec})
        path = out / native.WEIGHTS_FILE
        assert storage.file_bytes == path.stat().st_size
        assert storage.payload_bytes == path.stat().st_size - native.header_bytes(path)
        # the tied embedding is counted once, as a 16-bit matrix
        assert storage.n_weights == sum(p.numel() for p in loaded.model.parameters())


def test_save_load_round_trip(tiny_llama_dir, text_file, tmp_path):
    loaded, result = quantized_tiny(tiny_llama_dir, text_file, Option("int4-g32", "gptq"))
    native.save(tmp_path, loaded, result.tensors, {"model": loaded.spec})
    weights = native.load_weights(tmp_path)
    for name, q in result.tensors.items():
        assert torch.equal(weights[f"{name}.weight"], q.dequantize())
        # the model itself holds the dequantized weights after quantize_model
        assert torch.equal(loaded.model.get_parameter(f"{name}.weight"), q.dequantize())
    norm = "model.layers.0.input_layernorm.weight"
    assert torch.equal(weights[norm], loaded.model.get_parameter(norm))  # vectors stay fp32
    fresh = load_model(str(tiny_llama_dir))
    native.apply_weights(fresh, weights)
    for name, p in fresh.model.named_parameters():
        assert torch.equal(p, weights[name])


@pytest.mark.parametrize("model_type", ["qwen2", "mistral"])
def test_other_llama_family_architectures(model_type, text_file, tmp_path):
    """Qwen2 (biases on q/k/v, kept as fp32 vectors) and Mistral go through the same adapter."""
    path = save_tiny_llama(tmp_path / model_type, model_type=model_type)
    loaded, result = quantized_tiny(path, text_file, Option("int4-g32", "gptq"))
    assert loaded.arch.family == model_type and len(result.tensors) == 14
    storage = native.save(tmp_path, loaded, result.tensors, {"model": loaded.spec})
    fresh = load_model(str(path))
    native.apply_weights(fresh, native.load_weights(tmp_path))
    biases = [n for n, _ in fresh.model.named_parameters() if n.endswith(".bias")]
    assert (len(biases) == 6) == (model_type == "qwen2")  # q/k/v biases of 2 blocks
    assert storage.file_bytes == (tmp_path / native.WEIGHTS_FILE).stat().st_size
