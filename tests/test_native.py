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
        storage = native.save(out, loaded, result, {"model": loaded.spec})
        path = out / native.WEIGHTS_FILE
        assert storage.file_bytes == path.stat().st_size
        assert storage.payload_bytes == path.stat().st_size - native.header_bytes(path)
        # the tied embedding is counted once, as a 16-bit matrix
        assert storage.n_weights == sum(p.numel() for p in loaded.model.parameters()) == loaded.n_weights
        assert storage.file_bytes <= storage.payload_bytes + native.header_bound(loaded, list(result.tensors))


def test_save_load_round_trip(tiny_llama_dir, text_file, tmp_path):
    loaded, result = quantized_tiny(tiny_llama_dir, text_file, Option("int4-g32", "gptq"))
    native.save(tmp_path, loaded, result, {"model": loaded.spec})
    saved = native.NativeSource(tmp_path)
    for name, q in result.tensors.items():
        assert torch.equal(saved.get(f"{name}.weight"), q.dequantize())
        assert torch.equal(saved.rows(f"{name}.weight", slice(3, 11)), q.dequantize()[3:11])  # read alone
    embedding = loaded.embedding_key  # kept in f16
    assert torch.equal(saved.rows(embedding, slice(5, 9)), saved.get(embedding)[5:9])
    assert torch.equal(loaded.read(embedding, rows=slice(5, 9)), loaded.read(embedding)[5:9])  # safetensors
    norm = "model.layers.0.input_layernorm.weight"
    assert torch.equal(saved.get(norm), loaded.read(norm))  # vectors stay fp32
    assert saved.names == set(loaded.parameters())


@pytest.mark.parametrize("model_type", ["qwen2", "mistral"])
def test_other_llama_family_architectures(model_type, text_file, tmp_path):
    """Qwen2 (biases on q/k/v, kept as fp32 vectors) and Mistral go through the same adapter."""
    path = save_tiny_llama(tmp_path / model_type, model_type=model_type)
    loaded, result = quantized_tiny(path, text_file, Option("int4-g32", "gptq"))
    assert loaded.config.model_type == model_type and len(result.tensors) == 14
    storage = native.save(tmp_path, loaded, result, {"model": loaded.spec})
    biases = [n for n in native.NativeSource(tmp_path).names if n.endswith(".bias")]
    assert (len(biases) == 6) == (model_type == "qwen2")  # q/k/v biases of 2 blocks
    assert storage.file_bytes == (tmp_path / native.WEIGHTS_FILE).stat().st_size


def test_spooled_tensors_save_the_same_bytes(tiny_llama_dir, text_file, tmp_path):
    """Tensors spilled to disk block by block (what the CLI does) read back and save as held ones do."""
    loaded = load_model(str(tiny_llama_dir))
    windows = load_windows(loaded, WindowSpec(8, 64, text_file), first=False)
    plan = uniform_plan(loaded, Option("q4_k", "gptq"))
    held = quantize_model(loaded, windows, plan)
    spooled = quantize_model(loaded, windows, plan, spool=tmp_path / "spool")
    assert len(list((tmp_path / "spool").iterdir())) == loaded.n_blocks  # one file per block
    assert list(spooled.tensors) == list(held.tensors)
    for name in held.tensors:
        assert torch.equal(spooled.tensors[name].dequantize(), held.tensors[name].dequantize())
    for result, out in ((held, tmp_path / "held"), (spooled, tmp_path / "spooled")):
        out.mkdir()
        native.save(out, loaded, result, {"model": loaded.spec})
    assert (tmp_path / "held" / native.WEIGHTS_FILE).read_bytes() == (tmp_path / "spooled" / native.WEIGHTS_FILE).read_bytes()
