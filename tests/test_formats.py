import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mixq.errors import MixqError
from mixq.formats import parse_format
from mixq.formats.bitpack import pack_bits, packed_nbytes, unpack_bits
from mixq.formats.integer import GROUP_SIZES, IntFormat

formats = st.builds(
    IntFormat,
    bits=st.integers(2, 8),
    group_size=st.sampled_from((0, 16, 32, 64, 128)),
    symmetric=st.booleans(),
)
shapes = st.tuples(st.integers(1, 6), st.integers(1, 300))


def weights(shape, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(shape, generator=g) * scale
    W[:, ::7] *= 10  # outliers
    return W


@settings(max_examples=200, deadline=None)
@given(fmt=formats, shape=shapes, seed=st.integers(0, 2**31), scale=st.sampled_from((1e-3, 1.0, 30.0)))
def test_error_within_half_a_step(fmt, shape, seed, scale):
    W = weights(shape, seed, scale)
    s, z = fmt.qparams(W)  # full range, no clipping
    q = fmt.quantize(W, s, z)
    step = fmt.expand(s, shape[1])
    err = (W - q.dequantize()).abs()
    assert (err <= step / 2 * (1 + 1e-3) + 1e-7).all(), (err / step).max()
    assert q.codes.max() <= fmt.qmax and (z == z.round()).all()


@settings(max_examples=100, deadline=None)
@given(fmt=formats, shape=shapes, seed=st.integers(0, 2**31))
def test_pack_unpack_round_trip_and_exact_bytes(fmt, shape, seed):
    W = weights(shape, seed)
    q = fmt.quantize(W, *fmt.qparams(W))
    packed = fmt.pack(q)
    assert sum(t.numel() * t.element_size() for t in packed.values()) == fmt.nbytes(shape)
    back = fmt.unpack(packed, shape)
    assert torch.equal(back.codes, q.codes)
    assert torch.equal(back.dequantize(), q.dequantize())
    start = seed % shape[0]
    rows = slice(start, start + 1 + seed % (shape[0] - start))
    part = fmt.unpack(packed, shape, rows)  # a slice of rows, read without unpacking the others
    assert torch.equal(part.dequantize(), q.dequantize()[rows])


@given(bits=st.integers(1, 8), codes=st.lists(st.integers(0, 255), min_size=1, max_size=200), data=st.data())
def test_bitpack_unpacks_any_run_of_codes(bits, codes, data):
    t = torch.tensor([c % (2**bits) for c in codes], dtype=torch.uint8)
    first = data.draw(st.integers(0, len(codes) - 1))
    n = data.draw(st.integers(0, len(codes) - first))
    assert torch.equal(unpack_bits(pack_bits(t, bits), bits, n, first), t[first : first + n])


@given(bits=st.integers(1, 8), codes=st.lists(st.integers(0, 255), max_size=200))
def test_bitpack_round_trip(bits, codes):
    t = torch.tensor([c % (2**bits) for c in codes], dtype=torch.uint8)
    packed = pack_bits(t, bits)
    assert packed.numel() == packed_nbytes(len(codes), bits)
    assert torch.equal(unpack_bits(packed, bits, len(codes)), t)


def test_ragged_last_group():
    fmt = IntFormat(4, 128)
    assert fmt.n_groups(576) == 5  # 4 x 128 + 64
    W = weights((3, 576), 0)
    W[:, 512:] *= 100  # the short last group has its own scale
    s, z = fmt.qparams(W)
    assert s.shape == (3, 5)
    assert (s[:, 4] > 20 * s[:, :4].max(dim=1).values).all()


def test_symmetric_grid_uses_all_levels():
    fmt = IntFormat(4, 0, symmetric=True)
    W = torch.linspace(-1, 1, 64).unsqueeze(0)
    s, z = fmt.qparams(W, clip=0.9)
    assert (z == 8).all()
    q = fmt.quantize(W, s, z)
    assert q.codes.min() == 0 and q.codes.max() == 15  # levels -8 .. 7 around the zero point 8


def test_names_round_trip():
    for bits in range(2, 9):
        for g in (0, *GROUP_SIZES):
            for sym in (False, True):
                fmt = IntFormat(bits, g, sym)
                assert parse_format(fmt.name) == fmt


@pytest.mark.parametrize("bad", ["int9-g128", "int1-g128", "int4-g100", "int4", "fp4-g32"])
def test_bad_formats_are_refused(bad):
    with pytest.raises(MixqError):
        parse_format(bad)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e30])
@pytest.mark.parametrize("symmetric", [False, True])
def test_nan_weights_refused(bad, symmetric):
    """Weights no fp16 scale can hold: one clear error from the parameters and from the search."""
    W = torch.ones(2, 64)
    W[1, 40] = bad
    fmt = IntFormat(4, 32, symmetric)
    with pytest.raises(MixqError, match="not finite"):
        fmt.qparams(W)
    with pytest.raises(MixqError, match="not finite"):
        fmt.fit(W, torch.ones(64))


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 8), st.sampled_from([0, 16, 32]), st.booleans(), st.integers(0, 2**31 - 1))
def test_clip_search_picks_the_least_weighted_error(bits, group, symmetric, seed):
    """The compiled search returns, for every group, a candidate whose importance-weighted error is the
    least of all candidates (ties to rounding aside), computed here by plain torch."""
    from mixq.formats.integer import IntFormat

    g = torch.Generator().manual_seed(seed)
    fmt = IntFormat(bits, group, symmetric)
    W = torch.randn(6, 48, generator=g) * torch.rand(6, 1, generator=g) * 3
    importance = torch.rand(48, generator=g) + 0.01
    q = fmt.fit(W, importance)
    G, imp = fmt.grouped(W), fmt.grouped(importance.unsqueeze(0))
    lo, hi = fmt.group_range(G)
    clips = torch.linspace(1.0, 0.5, 21).view(-1, 1, 1)
    scales, zeros = fmt.qparams_from_range(lo, hi, clips)
    s, z = scales.unsqueeze(3), zeros.unsqueeze(3)
    errors = ((((G / s).round() + z).clamp(0, fmt.qmax) - z) * s - G).square().mul(imp).sum(3)  # (21, rows, groups)
    chosen = ((((G / q.scale.unsqueeze(2)).round() + q.zero.unsqueeze(2)).clamp(0, fmt.qmax) - q.zero.unsqueeze(2))
              * q.scale.unsqueeze(2) - G).square().mul(imp).sum(2)
    least = errors.min(0).values
    assert (chosen <= least * (1 + 1e-5) + 1e-12).all()
    assert ((scales == q.scale).any(0)).all()  # the parameters are one of the candidates
