"""The streaming safetensors writer: what safetensors itself reads back, aligned as it would write."""

import json
import struct

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings
from safetensors import safe_open
from safetensors.torch import save_file

from mixq.errors import MixqError
from mixq.export.safetensors_writer import DTYPE_NAMES, write_safetensors

DTYPES = sorted(DTYPE_NAMES, key=str)


@st.composite
def tensor_sets(draw):
    names = draw(st.lists(st.text("abcdefgh._0123", min_size=1, max_size=12), min_size=1, max_size=6, unique=True))
    out = {}
    for i, name in enumerate(names):
        dtype = draw(st.sampled_from(DTYPES))
        shape = tuple(draw(st.lists(st.integers(0, 5), min_size=0, max_size=3)))
        gen = torch.Generator().manual_seed(i)
        out[name] = (torch.randn(shape, generator=gen) * 100).to(dtype)
    return out


@settings(max_examples=60, deadline=None)
@given(tensors=tensor_sets(), note=st.text(max_size=20), piece_rows=st.integers(1, 4))
def test_written_file_reads_back_as_save_file_would(tmp_path_factory, tensors, note, piece_rows):
    """Tensors given whole (scalars) or in slices of `piece_rows` rows."""
    path = tmp_path_factory.mktemp("w") / "x.safetensors"
    asked = []

    def tensor_of(name):
        asked.append(name)
        t = tensors[name]
        return [t] if t.dim() == 0 or t.shape[0] == 0 else t.split(piece_rows)

    write_safetensors(path, {n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()}, tensor_of, {"note": note})
    assert sorted(asked) == sorted(tensors)  # each made once
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"note": note}
        assert set(f.keys()) == set(tensors)
        for name, t in tensors.items():
            assert torch.equal(f.get_tensor(name), t)
    # Every tensor at an offset aligned to its dtype, and the data laid out as save_file lays it out.
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    assert n % 8 == 0
    for name, t in tensors.items():
        assert (8 + n + header[name]["data_offsets"][0]) % t.dtype.itemsize == 0
    theirs = path.with_name("theirs.safetensors")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(theirs), metadata={"note": note})
    raw_theirs = theirs.read_bytes()
    (m,) = struct.unpack("<Q", raw_theirs[:8])
    assert raw[8 + n :] == raw_theirs[8 + m :]


@pytest.mark.parametrize("pieces", [[torch.zeros(2, 3, dtype=torch.float16)], [torch.zeros(2, 2)],
                                    [torch.zeros(1, 2, dtype=torch.float16)] * 3])
def test_a_tensor_unlike_its_announcement_is_refused(tmp_path, pieces):
    with pytest.raises(MixqError, match="announced"):
        write_safetensors(tmp_path / "x.safetensors", {"a": (torch.float16, (2, 2))}, lambda name: pieces, {})
