"""Full-precision stand-ins (bench/standin.py): each weight moves by uniform noise of at most half its
shipped step, independently and seeded, off the shipped grid but inside its cells; and the F32 GGUF
written from a small quantized GGUF keeps every field, name and float tensor of its source."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter, LlamaFileType
from gguf.quants import dequantize
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from mixq.errors import MixqError
from mixq.formats.ggml import GGML_FORMATS
from mixq.formats.integer import encode
from mixq.models.gguf_file import read_gguf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from standin import (  # noqa: E402
    SEED_KEY, STEPPED, block_steps, standin_seed, standin_weights, tensor_generator, weight_change, write_standin_gguf,
)

NAMES = sorted(STEPPED)


def shipped(name: str, rows: int, n_blocks: int, seed: int, zero_block: bool = False):
    """A matrix as a shipped file holds it: the ggml bytes of a fitted random matrix, their QTensor,
    and the weights gguf-py dequantizes from those bytes."""
    fmt = GGML_FORMATS[name]
    W = torch.randn(rows, n_blocks * fmt.block, generator=torch.Generator().manual_seed(seed)) * 0.02
    if zero_block:
        W[0, : fmt.block] = 0  # an all-zero block: a step of 0
    packed = fmt.pack(fmt.fit(W, torch.ones(W.shape[1])))["blocks"]
    q = fmt.unpack({"blocks": packed}, tuple(W.shape))
    return packed, q, torch.from_numpy(dequantize(packed.numpy(), fmt.ggml_type)).view(q.shape)


def noise_in_steps(name: str, rows: int, n_blocks: int, seed: int):
    """(stand-in, shipped weights, steps, QTensor, noise / step where the step is not 0)."""
    _, q, W = shipped(name, rows, n_blocks, seed)
    step = block_steps(q)
    # Not the weights' generator: the same stream would make the noise a function of the weights.
    new = standin_weights(W, step, tensor_generator(seed, name))
    return new, W, step, q, ((new - W) / step)[step > 0].double()


@settings(max_examples=80, deadline=None)
@given(name=st.sampled_from(NAMES), rows=st.integers(1, 4), n_blocks=st.integers(1, 3),
       seed=st.integers(0, 2**31), zero_block=st.booleans())
def test_each_weight_moves_at_most_half_its_step(name, rows, n_blocks, seed, zero_block):
    _, q, W = shipped(name, rows, n_blocks, seed, zero_block)
    fmt, step = q.format, block_steps(q)
    assert torch.equal(q.dequantize(), W)  # the steps belong to exactly the shipped weights
    # The step is the grid's spacing: one code up moves a weight by it (either way for negative scales).
    up = fmt.dequantize(fmt.with_codes(q, q.codes.float() + 1))
    assert torch.allclose((up - W).abs(), step, rtol=1e-5, atol=0)
    new = standin_weights(W, step, tensor_generator(seed, name))
    slack = torch.finfo(torch.float32).eps * W.abs()  # rounding of the sum
    assert ((new - W).abs() <= step / 2 + slack).all()
    assert torch.equal(new[step == 0], W[step == 0])
    if zero_block:
        assert (new[0, : fmt.block] == 0).all()


@pytest.mark.parametrize("name", ["q4_1", "q8_0", "q4_k", "q6_k", "q3_k"])
def test_noise_is_uniform_and_independent(name):
    new, W, step, _, u = noise_in_steps(name, 16, 4096 // GGML_FORMATS[name].block, seed=1)
    n = u.numel()
    assert n > 0.99 * W.numel()
    assert abs(float(u.mean())) < 4 * (1 / 12 / n) ** 0.5
    assert abs(float(u.var()) * 12 - 1) < 0.03  # the variance of U(-1/2, 1/2) is 1/12
    assert stats.kstest(u.numpy(), "uniform", args=(-0.5, 1)).pvalue > 1e-3
    # Independent of its neighbour and of the weight it is added to.
    assert abs(float(np.corrcoef(u[1:].numpy(), u[:-1].numpy())[0, 1])) < 4 / n**0.5
    assert abs(float(np.corrcoef(u.numpy(), W[step > 0].double().numpy())[0, 1])) < 4 / n**0.5


@pytest.mark.parametrize("name", NAMES)
def test_off_the_grid_but_inside_its_cells(name):
    """Re-encoded with the shipped block parameters, the stand-in gives back the shipped codes, yet
    almost none of its weights is a grid value."""
    new, W, step, q, _ = noise_in_steps(name, 16, 2048 // GGML_FORMATS[name].block, seed=2)
    fmt = q.format
    codes = encode(new, fmt.expand(q.scale), fmt.expand(q.zero), fmt.qmax, fmt.expand(q.offset))
    inside = (new - W).abs() < (0.5 - 1e-4) * step  # away from a cell's edge, where rounding may tip
    assert float(inside.double().mean()) > 0.99
    assert torch.equal(codes[inside], q.codes[inside].float())
    assert float((new != W)[step > 0].double().mean()) > 0.999


def test_seeded_per_tensor():
    _, _, W = shipped("q4_k", 4, 2, seed=3)
    step = torch.full_like(W, 0.01)

    def draw(seed, name):
        return standin_weights(W, step, tensor_generator(seed, name))

    assert torch.equal(draw(0, "blk.0.attn_q.weight"), draw(0, "blk.0.attn_q.weight"))
    assert not torch.equal(draw(0, "blk.0.attn_q.weight"), draw(1, "blk.0.attn_q.weight"))
    assert not torch.equal(draw(0, "blk.0.attn_q.weight"), draw(0, "blk.0.attn_k.weight"))


def write_small_gguf(path: Path, quantized: dict[str, str]) -> dict[str, np.ndarray]:
    """A small GGUF with metadata, a tokenizer list, float vectors (F32 and F16) and the matrices
    `quantized` (name -> ggml type); returns each tensor's dequantized values."""
    writer = GGUFWriter(path, "llama")
    writer.add_string("general.name", "tiny")
    writer.add_uint32("llama.block_count", 1)
    writer.add_float32("llama.rope.freq_base", 10000.0)
    writer.add_array("tokenizer.ggml.tokens", ["<s>", "a", "b"])
    writer.add_file_type(LlamaFileType.MOSTLY_Q4_K_M)
    values = {}
    for i, (name, type_name) in enumerate(quantized.items()):
        packed, _, W = shipped(type_name, 3, 2, seed=i)
        writer.add_tensor(name, packed.numpy(), raw_dtype=GGMLQuantizationType[type_name.upper()])
        values[name] = W.numpy()
    for name, dtype in (("blk.0.attn_norm.weight", np.float32), ("blk.0.ffn_norm.weight", np.float16)):
        values[name] = np.linspace(-1, 1, 64, dtype=np.float32).astype(dtype)
        writer.add_tensor(name, values[name])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return values


def test_writes_an_all_f32_gguf_with_the_source_fields(tmp_path):
    source, out = tmp_path / "src.gguf", tmp_path / "out.gguf"
    values = write_small_gguf(source, {"token_embd.weight": "q8_0", "blk.0.attn_q.weight": "q4_k",
                                       "blk.0.ffn_down.weight": "q6_k", "blk.0.ffn_up.weight": "q4_1"})
    write_standin_gguf(source, out, seed=7)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.gguf", "src.gguf"]  # nothing partial left
    src, new = read_gguf(source), read_gguf(out)
    for key, field in src.fields.items():
        if not key.startswith(("GGUF.", "general.file_type")):
            assert new.fields[key].contents() == field.contents(), key
    assert new.fields["general.file_type"].contents() == LlamaFileType.ALL_F32
    assert standin_seed(out) == 7 and new.fields[SEED_KEY].types == [GGUFValueType.UINT32]
    assert [t.name for t in new.tensors] == [t.name for t in src.tensors]
    for t, s in zip(new.tensors, src.tensors):
        assert t.tensor_type == GGMLQuantizationType.F32 and list(t.shape) == list(s.shape)
        changed = not np.array_equal(t.data.reshape(values[t.name].shape), values[t.name].astype(np.float32))
        assert changed == (s.tensor_type not in (GGMLQuantizationType.F32, GGMLQuantizationType.F16)), t.name
    change = weight_change(source, out)
    assert change["n_changed"] == 4 and change["n_kept"] == 2
    assert 0.4 < change["max_step_fraction"] <= 0.5 + 1e-4
    assert 0 < change["by_type"]["Q8_0"]["mean_rel_change"] < change["by_type"]["Q4_1"]["mean_rel_change"]
    # Each tensor's noise comes from the seed and its name: the same seed writes the same bytes.
    _, q, W = shipped("q4_k", 3, 2, seed=1)
    expected = standin_weights(W, block_steps(q), tensor_generator(7, "blk.0.attn_q.weight"))
    assert np.array_equal(new.tensors[1].data, expected.numpy())
    again, other = tmp_path / "again.gguf", tmp_path / "other.gguf"
    write_standin_gguf(source, again, seed=7)
    write_standin_gguf(source, other, seed=8)
    assert again.read_bytes() == out.read_bytes()
    assert not np.array_equal(read_gguf(other).tensors[1].data, new.tensors[1].data)


def test_weight_change_catches_a_wrong_stand_in(tmp_path):
    """The check of a written stand-in fails on a weight moved by more than half its step."""
    source, out = tmp_path / "src.gguf", tmp_path / "out.gguf"
    write_small_gguf(source, {"blk.0.attn_q.weight": "q4_1"})
    write_standin_gguf(source, out, seed=0)
    step = float(block_steps(shipped("q4_1", 3, 2, seed=0)[1])[0, 0])
    data = bytearray(out.read_bytes())
    offset = read_gguf(out).tensors[0].data_offset
    first = np.frombuffer(data, np.float32, count=1, offset=offset)[0]
    data[offset : offset + 4] = np.float32(first + step).tobytes()
    out.write_bytes(bytes(data))
    with pytest.raises(MixqError, match="more than half"):
        weight_change(source, out)


def test_refuses_a_type_without_a_known_step(tmp_path):
    source, out = tmp_path / "src.gguf", tmp_path / "out.gguf"
    writer = GGUFWriter(source, "llama")
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((2, 18), np.uint8), raw_dtype=GGMLQuantizationType.IQ4_NL)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(MixqError, match="IQ4_NL"):
        write_standin_gguf(source, out, seed=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.gguf"]
