"""H as capture accumulates it: x^T x of every input row, exactly symmetric, in panels."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mixq.capture import LayerStats, gram_panels


@settings(max_examples=60, deadline=None)
@given(cols=st.integers(1, 700), rows=st.lists(st.integers(1, 200), min_size=1, max_size=3),
       seed=st.integers(0, 2**16))
def test_panelled_H_is_x_transpose_x_and_exactly_symmetric(cols, rows, seed):
    g = torch.Generator().manual_seed(seed)
    batches = [torch.randn(n, cols, generator=g) * 3 for n in rows]
    stats = LayerStats.empty(cols)
    for x in batches:
        stats.add(x.view(1, n, cols) if (n := x.shape[0]) % 2 else x)  # (tokens, cols) or (batch, seq, cols)
    x = torch.cat(batches).double()
    expected = x.T @ x
    assert stats.n_tokens == x.shape[0]
    assert torch.equal(stats.H, stats.H.T)
    assert torch.allclose(stats.H.double(), expected, rtol=1e-5, atol=1e-3)
    assert torch.allclose(stats.x_sum, x.sum(0), rtol=1e-5, atol=1e-4)


def test_panels_cover_every_row_once_and_halve_the_work():
    for cols in (1, 127, 576, 1536, 8960):
        panels = gram_panels(cols)
        assert panels[0][0] == 0 and panels[-1][1] == cols
        assert all(j == i2 for (_, j), (i2, _) in zip(panels, panels[1:])) and all(i < j for i, j in panels)
        work = sum((j - i) * (cols - i) for i, j in panels) / cols**2
        assert work == 1.0 if cols <= 128 else 0.55 < work < 0.61, (cols, work)
