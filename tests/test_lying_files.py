"""Model files that lie (GGUF and safetensors): every mutation of a real header ends in a reader
that holds only what the file holds, or in one `MixqError`; never a hang, a huge allocation or
another exception."""

import shutil
import json
import struct

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter
from gguf.quants import quantize
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mixq.cli import main
from mixq.errors import MixqError
from mixq.models import source_gguf
from mixq.models.gguf_file import check_gguf, read_gguf
from mixq.models.source import SafetensorsSource


def write_small_gguf(path):
    """A GGUF with every kind of value and three tensor types, as llama.cpp's writers lay it out."""
    w = GGUFWriter(path, "llama")
    w.add_name("tiny")
    w.add_uint32("tiny.count", 7)
    w.add_float32("tiny.eps", 1e-5)
    w.add_bool("tiny.flag", True)
    w.add_array("tiny.tokens", ["<s>", "a", "bb", "ccc"])
    w.add_array("tiny.scores", [0.5, -1.0, 2.0, 3.5])
    g = np.random.default_rng(0)
    w.add_tensor("a.weight", g.standard_normal((4, 8), dtype=np.float32))
    w.add_tensor("b.weight", g.standard_normal((3, 16)).astype(np.float16))
    q = quantize(g.standard_normal((2, 64), dtype=np.float32), GGMLQuantizationType.Q8_0)
    w.add_tensor("c.weight", q, raw_dtype=GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    path = write_small_gguf(tmp_path_factory.mktemp("gguf") / "small.gguf")
    reader = GGUFReader(path)
    return path, path.read_bytes(), reader.data_offset, reader


def assert_reads_only_what_it_holds(path):
    """Either one MixqError, or a reader whose every tensor has all its bytes inside the file."""
    try:
        reader = read_gguf(path)
    except MixqError as e:
        assert str(e).startswith(("cannot read GGUF file", "GGUF file")) and "\n" not in str(e)
        return False
    for t in reader.tensors:
        assert t.data.nbytes == t.n_bytes and t.data_offset + t.n_bytes <= path.stat().st_size
    return True


def test_the_small_file_and_the_shipped_model_pass(small):
    path, *_ = small
    assert assert_reads_only_what_it_holds(path)
    check_gguf(source_gguf("smollm2-135m"))


@settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_headers(small, tmp_path, data):
    path, original, data_offset, _ = small
    mutated = bytearray(original)
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, data_offset - 1))
        width = data.draw(st.sampled_from((1, 4, 8)))
        value = data.draw(st.sampled_from((0, 1, 0xFF, 2**31, 2**32 - 1, 2**63, 2**64 - 1))
                          | st.integers(0, 2**64 - 1))
        mutated[at : at + width] = (value % 256**width).to_bytes(width, "little")[: len(mutated[at : at + width])]
    out = tmp_path / "mutated.gguf"
    out.write_bytes(bytes(mutated))
    assert_reads_only_what_it_holds(out)


@settings(max_examples=100, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_truncated_files(small, tmp_path, data):
    path, original, _, reader = small
    cut = data.draw(st.integers(0, len(original) - 1))
    out = tmp_path / "cut.gguf"
    out.write_bytes(original[:cut])
    data_end = max(t.data_offset + t.n_bytes for t in reader.tensors)  # then only the last tensor's padding
    assert assert_reads_only_what_it_holds(out) == (cut >= data_end)


def field_value_offset(reader, key):
    """Offset of the first byte after a key/value entry's key and type (its value)."""
    field = reader.fields[key]
    return field.offset + 8 + len(key.encode()) + 4


def tensor_type_offset(reader, name):
    t = next(t for t in reader.tensors if t.name == name)
    return t.field.offset + 8 + len(name.encode()) + 4 + 8 * len(t.shape)


def patched(original, tmp_path, at, fmt, value):
    data = bytearray(original)
    struct.pack_into(fmt, data, at, value)
    out = tmp_path / "patched.gguf"
    out.write_bytes(bytes(data))
    return out


@pytest.mark.parametrize("lie, match", [
    ("magic", "no GGUF magic"),
    ("version", "GGUF version 7"),
    ("tensor count", "claims 7 keys and 1000000000 tensors"),
    ("array length", "claims 1152921504606846976 strings"),
    ("number array length", "array tiny.scores of 1152921504606846976 items"),
    ("value type", "unknown value type 99"),
    ("tensor type", "unknown ggml type 99"),
    ("tensor offset", "c.weight's data offset 97 is not a multiple of the alignment 32"),
    ("overlapping tensors", "c.weight's data overlaps"),
    ("tensor past the end", "runs past the end of the file"),
])
def test_each_lie_is_named(small, tmp_path, lie, match):
    path, original, data_offset, reader = small
    tokens = field_value_offset(reader, "tiny.tokens")
    c = next(t for t in reader.tensors if t.name == "c.weight")
    at, fmt, value = {
        "magic": (0, "<I", 0x12345678),
        "version": (4, "<I", 7),
        "tensor count": (8, "<Q", 10**9),
        "array length": (tokens + 4, "<Q", 2**60),
        # the gguf package alone loops for ever on this one (each read past the end advances by nothing)
        "number array length": (field_value_offset(reader, "tiny.scores") + 4, "<Q", 2**60),
        "value type": (tokens - 4, "<I", 99),
        "tensor type": (tensor_type_offset(reader, "c.weight"), "<I", 99),
        "tensor offset": (tensor_type_offset(reader, "c.weight") + 4, "<Q", 97),
        "overlapping tensors": (tensor_type_offset(reader, "c.weight") + 4, "<Q", 96),  # inside a.weight's
        "tensor past the end": (tensor_type_offset(reader, "c.weight") + 4, "<Q", c.data_offset - data_offset + 64),
    }[lie]
    with pytest.raises(MixqError, match=match):
        read_gguf(patched(original, tmp_path, at, fmt, value))


def test_a_lying_model_file_is_one_error_line(tmp_path, capsys):
    """The shipped model with one tensor's type changed to a code ggml does not have."""
    source = source_gguf("smollm2-135m")
    reader = GGUFReader(source)
    name = reader.tensors[5].name
    lying = tmp_path / "lying.gguf"
    shutil.copyfile(source, lying)
    with open(lying, "r+b") as f:
        f.seek(tensor_type_offset(reader, name))
        f.write(struct.pack("<I", 99))
    assert main(["quantize", str(lying), "--format", "q4_0", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err == f"mixq: error: cannot read GGUF file {lying}: tensor {name} has unknown ggml type 99\n"
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def small_safetensors(tiny_llama_dir):
    raw = (tiny_llama_dir / "model.safetensors").read_bytes()
    header_end = 8 + struct.unpack("<Q", raw[:8])[0]
    return raw, header_end, SafetensorsSource(tiny_llama_dir)


def assert_safetensors_read_or_refused(directory, expected):
    """Either one MixqError, or every tensor read in full with the shape the real file gives it."""
    try:
        source = SafetensorsSource(directory)
        tensors = {name: source.get(name) for name in source.names}
    except MixqError as e:
        assert "\n" not in str(e)
        return False
    for name, t in tensors.items():
        assert t.shape == expected.get(name, t).shape
    return True


@settings(max_examples=200, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_safetensors(small_safetensors, tmp_path, data):
    raw, header_end, real = small_safetensors
    mutated = bytearray(raw)
    if data.draw(st.booleans()):
        mutated = mutated[: data.draw(st.integers(0, len(raw) - 1))]
    else:
        for _ in range(data.draw(st.integers(1, 4))):
            at = data.draw(st.integers(0, header_end - 1))
            mutated[at] = data.draw(st.sampled_from(b'0189{}[]",:-eE ') | st.integers(0, 255))
    (tmp_path / "model.safetensors").write_bytes(bytes(mutated))
    expected = {name: real.get(name) for name in real.names}
    assert_safetensors_read_or_refused(tmp_path, expected)


@pytest.mark.parametrize("index, match", [
    ("not json", "cannot read"),
    (json.dumps({"weight_map": ["model.safetensors"]}), "cannot read"),
    (json.dumps({"weight_map": {"a.weight": "../../elsewhere.safetensors"}}), "outside its directory"),
    (json.dumps({"weight_map": {"a.weight": "missing.safetensors"}}), "cannot read"),
])
def test_lying_shard_indexes(tmp_path, index, match):
    (tmp_path / "model.safetensors.index.json").write_text(index)
    with pytest.raises(MixqError, match=match):
        SafetensorsSource(tmp_path)
