import torch

from mixq.formats.integer import IntFormat
from mixq.methods import MethodSettings, output_error
from mixq.methods.gptq import _LastFactor, one_factorisation_per_h, quantize_gptq
from mixq.methods.rtn import quantize_rtn


def correlated_inputs(tokens: int, cols: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    X = torch.randn(tokens, cols, generator=g) @ mix
    X[:, :3] *= 8  # a few loud input channels, as in LLM activations
    return X


def test_output_error_is_squared_output_difference():
    X = correlated_inputs(200, 48)
    W = torch.randn(16, 48)
    W_hat = W + 0.01 * torch.randn(16, 48)
    H = X.double().T @ X.double()
    direct = ((X.double() @ (W_hat - W).double().T) ** 2).sum().item()
    assert abs(output_error(W, W_hat, H) - direct) < 1e-8 * direct


def test_gptq_with_diagonal_hessian_equals_rtn():
    W = torch.randn(24, 96)
    H = torch.diag(torch.rand(96, dtype=torch.float64) + 0.5)
    for fmt in (IntFormat(3, 32), IntFormat(4, 0), IntFormat(2, 64, symmetric=True)):
        for act_order in (False, True):
            s = MethodSettings(act_order=act_order, damp=0.0)
            assert torch.equal(quantize_gptq(W, H, fmt, s).codes, quantize_rtn(W, H, fmt, s).codes)


def test_gptq_beats_rtn_on_correlated_inputs():
    X = correlated_inputs(2000, 128)
    H = (X.T @ X).double()
    W = torch.randn(64, 128)
    for fmt in (IntFormat(3, 32), IntFormat(4, 0), IntFormat(2, 64)):
        rtn = output_error(W, quantize_rtn(W, H, fmt, MethodSettings()).dequantize(), H)
        gptq = output_error(W, quantize_gptq(W, H, fmt, MethodSettings()).dequantize(), H)
        assert gptq < 0.8 * rtn, (fmt.name, gptq, rtn)


def test_matrices_of_one_input_share_the_factor_of_exactly_that_h(monkeypatch):
    """q/k/v share one H object and so one factorisation; a changed H (in place) or other settings
    must not reuse it: each result equals one made from a fresh copy of its H."""
    from mixq.methods import gptq

    factorised = []
    real = gptq.inverse_cholesky
    monkeypatch.setattr(gptq, "inverse_cholesky", lambda H: factorised.append(H.shape) or real(H))
    X = correlated_inputs(500, 64)
    H = X.T @ X
    W1, W2 = torch.randn(32, 64), torch.randn(16, 64)
    fmt, s = IntFormat(3, 32), MethodSettings()

    def same(a, b):
        return torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale)

    with one_factorisation_per_h():
        quantize_gptq(W1, H, fmt, s)
        shared = quantize_gptq(W2, H, fmt, s)
        assert len(factorised) == 1
        assert same(shared, quantize_gptq(W2, H.clone(), fmt, s))
        quantize_gptq(W1, H, fmt, s)
        H.add_(correlated_inputs(500, 64, seed=1).T @ correlated_inputs(500, 64, seed=1))
        changed = quantize_gptq(W2, H, fmt, s)
        assert same(changed, quantize_gptq(W2, H.clone(), fmt, s)) and not same(changed, shared)
        for other in (MethodSettings(act_order=False), MethodSettings(damp=0.1)):
            quantize_gptq(W1, H, fmt, s)
            assert same(quantize_gptq(W2, H, fmt, other), quantize_gptq(W2, H.clone(), fmt, other))
    assert _LastFactor.entry is None  # nothing kept after the block
    before = len(factorised)
    quantize_gptq(W1, H, fmt, s)
    quantize_gptq(W2, H, fmt, s)
    assert len(factorised) == before + 2  # outside the block, every call factorises


def test_clip_search_never_worse_than_full_range():
    X = correlated_inputs(500, 64)
    H = (X.T @ X).double()
    W = torch.randn(32, 64)
    W[:, 5] *= 20
    fmt = IntFormat(3, 32)
    d = torch.diag(H)
    full = quantize_rtn(W, H, fmt, MethodSettings(clip_search=False)).dequantize()
    searched = quantize_rtn(W, H, fmt, MethodSettings()).dequantize()
    assert (((searched - W) ** 2) * d).sum() <= (((full - W) ** 2) * d).sum()


def test_dead_inputs_get_zero_weights():
    X = correlated_inputs(300, 32)
    X[:, 7] = 0
    H = (X.T @ X).double()
    q = quantize_gptq(torch.randn(8, 32), H, IntFormat(4, 32), MethodSettings())
    assert (q.dequantize()[:, 7] == 0).all()


def test_stacked_gptq_equals_one_at_a_time():
    from mixq.methods.gptq import quantize_gptq_many

    X = correlated_inputs(400, 80)
    H = (X.T @ X).double()
    W = torch.randn(12, 80)
    fmts = [IntFormat(2, 32), IntFormat(4, 32), IntFormat(3, 32, symmetric=True)]
    for q, fmt in zip(quantize_gptq_many(W, H, fmts, MethodSettings()), fmts):
        alone = quantize_gptq(W, H, fmt, MethodSettings())
        assert torch.equal(q.codes, alone.codes) and torch.equal(q.scale, alone.scale)


def reference_gptq(W: torch.Tensor, H: torch.Tensor, fmt, settings: MethodSettings):
    """GPTQ as the paper's Algorithm 1 states it, in float64, one column at a time, without lazy
    batches: each group's grid is fitted when its first column comes up (columns in storage order)."""
    from mixq.formats.integer import decode, encode

    W = W.double().clone()
    rows, cols = W.shape
    glen = fmt.group_len(cols)
    diag = torch.diag(H).double()
    Hd = H.double() + settings.damp * diag.mean() * torch.eye(cols, dtype=torch.float64)
    U = torch.linalg.cholesky(torch.linalg.inv(Hd), upper=True)
    codes = torch.zeros(rows, cols, dtype=torch.long)
    for i in range(cols):
        if i % glen == 0:
            group = fmt.fit(W[:, i : i + glen].float(), diag[i : i + glen].float(), *settings.clip())
            scale, zero = group.scale[:, 0].double(), group.zero[:, 0].double()
            offset = group.offset[:, 0].double() if group.offset is not None else torch.zeros(rows, dtype=torch.float64)
        q = encode(W[:, i], scale, zero, torch.full((rows,), float(fmt.qmax), dtype=torch.float64), offset)
        codes[:, i] = q.long()
        err = (W[:, i] - decode(q, scale, zero, offset)) / U[i, i]
        W[:, i:] -= err[:, None] * U[i, i:][None, :]
    return codes


def test_gptq_equals_a_straightforward_reference():
    """The lazy-batch float32 column loop gives the codes of the plain float64 algorithm (a code may
    differ only where float32 rounding tips a value at a rounding boundary)."""
    torch.manual_seed(0)
    X = correlated_inputs(512, 256, seed=3)
    W = torch.randn(48, 256)
    H = X.T @ X
    for fmt in (IntFormat(4, 32), IntFormat(3, 64, symmetric=True)):
        settings = MethodSettings(act_order=False, block_size=64)
        ours = quantize_gptq(W, H, fmt, settings)
        ref = reference_gptq(W, H, fmt, settings)
        assert (ours.codes.long() != ref).float().mean() < 0.002


def torch_column_loop(W, Hinv, scale, zero, offset, qmax, levels, group_of):
    """GPTQ's column loop over one block as torch calls, one column at a time (what the compiled
    kernel replaced)."""
    from mixq.formats.integer import decode, encode

    W, Q, Err = W.clone(), torch.zeros_like(W), torch.zeros_like(W)
    for i in range(W.shape[1]):
        g = group_of[i]
        q = encode(W[:, i], scale[:, g], zero[:, g], qmax, offset[:, g], levels)
        err = (W[:, i] - decode(q, scale[:, g], zero[:, g], offset[:, g], levels)) / Hinv[i, i].item()
        Q[:, i], Err[:, i] = q, err
        W[:, i:] -= err.unsqueeze(1) @ Hinv[i, i:].unsqueeze(0)
    return W, Q, Err


def test_compiled_column_loop_equals_torch_to_the_bit():
    import numpy as np

    from mixq.methods.gptq_columns import quantize_columns

    g = torch.Generator().manual_seed(1)
    rows, cols, glen = 40, 96, 32
    Hinv = torch.linalg.cholesky(torch.linalg.inv(correlated_inputs(300, cols).T @ correlated_inputs(300, cols) / 300
                                                  + torch.eye(cols)), upper=True).float()
    W = torch.randn(rows, cols, generator=g)
    group_of = torch.arange(cols).flip(0) // glen  # visiting order unlike storage order, as with act_order
    scale = torch.rand(rows, cols // glen, generator=g) * 0.3 + 0.05
    codebook = torch.tensor([-1.0, -0.6, -0.25, 0.0, 0.2, 0.5, 1.0])
    for zero, offset, qmax, levels in (
        (torch.full_like(scale, 8.0), torch.zeros_like(scale), torch.full((rows,), 15.0), None),  # int4
        (torch.randint(0, 8, scale.shape, generator=g).float(), torch.rand(scale.shape, generator=g),
         torch.tensor([3.0, 7.0]).repeat(rows // 2), None),  # two grids stacked, with offsets (ggml mins)
        (torch.zeros_like(scale), torch.zeros_like(scale), torch.full((rows,), 6.0), codebook),
    ):
        want_W, want_Q, want_Err = torch_column_loop(W, Hinv, scale, zero, offset, qmax, levels, group_of.tolist())
        got_W, got_Q, got_Err = W.clone(), torch.zeros(rows, cols), torch.zeros(rows, cols)
        uniform = torch.zeros(1) if levels is None else levels
        for start, stop in ((0, 50), (50, cols)):  # stopped part-way, as GPTQ does to fit a new group
            quantize_columns(Hinv.numpy(), scale.numpy(), zero.numpy(), offset.numpy(), qmax.numpy(), uniform.numpy(),
                             levels is not None, group_of.numpy(), got_W.numpy(), got_Q.numpy(), got_Err.numpy(),
                             start, stop, 0, cols)
        assert torch.equal(got_Q, want_Q) and torch.equal(got_Err, want_Err) and torch.equal(got_W, want_W)
        assert len(got_Q.unique()) > 3  # the grids were used, not collapsed to one code


LATTICE_TYPES = ("iq3_s", "iq3_xxs", "iq2_s", "iq2_xs", "iq2_xxs")


def reference_lattice_gptq(W, H, fmt, settings):
    """GPTQ onto a lattice type written plainly in float64: the scales of the format's fit of W, then
    each chunk's codes from the current weights and each column's error pushed onto all later columns
    at once (no lazy batch)."""
    from mixq.formats.ggml import positive_importance

    W = W.double().clone()
    importance = torch.diag(H).float()
    grid = fmt.fit(W.float(), importance, *settings.clip())
    Hd = H.double().clone()
    Hd.diagonal().add_(settings.damp * torch.diag(H).double().mean())
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(Hd)), upper=True)
    scale, imp = fmt.expand(grid.scale).double(), positive_importance(importance)
    codes = torch.empty(W.shape, dtype=torch.uint8)
    for c0 in range(0, W.shape[1], fmt.chunk):
        c1 = c0 + fmt.chunk
        codes[:, c0:c1] = fmt.chunk_codes(W[:, c0:c1].float(), imp[c0:c1], scale[:, c0].float())
        Q = scale[:, c0:c1] * fmt.levels.double()[codes[:, c0:c1].long()]
        for j in range(c0, c1):
            err = (W[:, j] - Q[:, j - c0]) / U[j, j]
            W[:, j:] -= err[:, None] * U[j, j:][None, :]
    return codes


def test_lattice_gptq_equals_a_straightforward_reference_and_beats_rtn():
    """GPTQ onto each lattice type: the lazy-batch loop over chunks of columns gives the plain float64
    algorithm's codes (up to float32 rounding at a tie), and a lower output error than rtn's fit onto
    the same type on correlated inputs."""
    from mixq.formats.ggml import GGML_FORMATS

    X = correlated_inputs(2000, 512, seed=4)
    H = X.T @ X
    W = torch.randn(32, 512, generator=torch.Generator().manual_seed(5))
    settings = MethodSettings(block_size=64, clip_grid=4)
    for name in LATTICE_TYPES:
        fmt = GGML_FORMATS[name]
        ours = quantize_gptq(W, H, fmt, settings)
        ref = reference_lattice_gptq(W, H, fmt, settings)
        assert (ours.codes != ref).float().mean() < 0.002, name
        rtn = output_error(W, quantize_rtn(W, H, fmt, settings).dequantize(), H.double())
        gptq = output_error(W, ours.dequantize(), H.double())
        assert gptq < 0.85 * rtn, (name, gptq, rtn)


def test_lattice_gptq_with_diagonal_hessian_equals_rtn():
    """Nothing to push onto later columns: every chunk's codes are those of rtn's fit."""
    from mixq.formats.ggml import GGML_FORMATS

    W = torch.randn(16, 256, generator=torch.Generator().manual_seed(6))
    H = torch.diag(torch.rand(256, dtype=torch.float64) + 0.5)
    for name in LATTICE_TYPES:
        fmt, s = GGML_FORMATS[name], MethodSettings(damp=0.0, clip_grid=4)
        ours, rtn = quantize_gptq(W, H, fmt, s), quantize_rtn(W, H, fmt, s)
        assert torch.equal(ours.codes, rtn.codes) and torch.equal(ours.scale, rtn.scale), name
