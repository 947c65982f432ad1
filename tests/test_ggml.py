"""ggml block formats: bytes identical to ggml's layout (checked with the gguf package), exact sizes,
and parameter searches at least as good as llama.cpp's reference rounding."""

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGUFReader
from gguf.quants import dequantize, quantize
from hypothesis import given, settings
from hypothesis import strategies as st

from mixq.errors import MixqError
from mixq.formats import parse_format
from mixq.formats.ggml import GGML_FORMATS
from mixq.methods import MethodSettings
from mixq.methods.gptq import quantize_gptq
from mixq.methods.rtn import quantize_rtn
from mixq.models.embedded import resolve_embedded

NAMES = sorted(GGML_FORMATS)


def weights(rows, cols, seed, scale):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g) * scale
    W[:, ::13] *= 6  # outliers
    return W


@settings(max_examples=120, deadline=None)
@given(
    name=st.sampled_from(NAMES), rows=st.integers(1, 4), n_blocks=st.integers(1, 3), seed=st.integers(0, 2**31),
    scale=st.sampled_from((1e-4, 0.02, 3.0)), zero_block=st.booleans(),
)
def test_bytes_match_ggml_and_round_trip(name, rows, n_blocks, seed, scale, zero_block):
    fmt = GGML_FORMATS[name]
    W = weights(rows, n_blocks * fmt.block, seed, scale)
    if zero_block:
        W[0, : fmt.block] = 0  # an all-zero block: scales of 0 must still pack and decode
    importance = torch.rand(W.shape[1], generator=torch.Generator().manual_seed(seed)) + 0.05
    q = fmt.fit(W, importance)
    packed = fmt.pack(q)["blocks"]
    assert packed.dtype == torch.uint8 and packed.numel() == fmt.nbytes(tuple(W.shape))
    assert fmt.nbytes(tuple(W.shape)) == rows * n_blocks * GGML_QUANT_SIZES[fmt.ggml_type][1]
    ours = q.dequantize().numpy()
    theirs = dequantize(packed.numpy(), fmt.ggml_type).reshape(ours.shape)
    assert np.array_equal(ours, theirs)  # bit for bit, not approximately
    back = fmt.unpack({"blocks": packed}, tuple(W.shape))
    assert torch.equal(back.codes, q.codes) and torch.equal(back.dequantize(), q.dequantize())
    assert torch.equal(fmt.pack(back)["blocks"], packed)
    rows_read = slice(seed % rows, rows)
    assert torch.equal(fmt.unpack({"blocks": packed}, tuple(W.shape), rows_read).dequantize(),
                       q.dequantize()[rows_read])
    if zero_block:
        assert (q.dequantize()[0, : fmt.block] == 0).all()


@pytest.mark.parametrize("name", ["q8_0", "q5_1", "q5_0", "q4_1", "q4_0"])
def test_search_beats_reference_rounding(name):
    """gguf-py's quantizers are bit-exact ports of ggml's reference ones (no imatrix)."""
    fmt = GGML_FORMATS[name]
    W = weights(64, 256, 0, 0.02)
    importance = torch.ones(256)
    ours = ((fmt.fit(W, importance).dequantize() - W) ** 2).sum()
    ref = dequantize(quantize(W.numpy(), fmt.ggml_type), fmt.ggml_type).reshape(W.shape)
    assert ours < ((torch.from_numpy(ref) - W) ** 2).sum()


@pytest.mark.parametrize("name", NAMES)
def test_real_tensor_from_smollm2(name):
    """The first down_proj of the shipped SmolLM2 (1536 wide, a multiple of 256) round-trips exactly."""
    reader = GGUFReader(resolve_embedded("smollm2-135m"))
    t = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
    W = torch.from_numpy(dequantize(t.data, t.tensor_type).reshape(576, 1536).astype(np.float32))
    fmt = GGML_FORMATS[name]
    q = fmt.fit(W, torch.ones(1536))
    packed = fmt.pack(q)["blocks"].numpy()
    assert np.array_equal(dequantize(packed, fmt.ggml_type).reshape(576, 1536), q.dequantize().numpy())
    rel = ((q.dequantize() - W) ** 2).sum() / (W**2).sum()
    assert rel < {2: 0.2, 3: 0.05, 4: 0.015, 5: 0.004, 6: 1e-3, 8: 1e-4}[fmt.bits]


@pytest.mark.parametrize("name", ["q2_k", "q3_k", "q4_k", "q6_k", "q4_0", "q5_1"])
def test_gptq_on_ggml_grids_lowers_output_error(name):
    fmt = GGML_FORMATS[name]
    g = torch.Generator().manual_seed(1)
    X = torch.randn(2048, 256, generator=g) @ (torch.randn(256, 256, generator=g) * 0.2 + torch.eye(256))
    H = X.T @ X
    W = weights(32, 256, 2, 0.05)

    def err(q):
        dW = q.dequantize() - W
        return float(((dW @ H) * dW).sum())

    rtn, gptq = quantize_rtn(W, H, fmt, MethodSettings()), quantize_gptq(W, H, fmt, MethodSettings())
    assert err(gptq) < 0.9 * err(rtn)
    packed = fmt.pack(gptq)["blocks"].numpy()  # GPTQ's codes stay on the format's grid
    assert np.array_equal(dequantize(packed, fmt.ggml_type).reshape(W.shape), gptq.dequantize().numpy())


def test_rows_that_do_not_fit_are_refused():
    fmt = parse_format("q4_k")
    assert not fmt.fits((8, 576)) and parse_format("q4_0").fits((8, 576))
    with pytest.raises(MixqError, match="multiple of 256"):
        fmt.nbytes((8, 576))
