import torch

from mixq.formats.integer import IntFormat
from mixq.methods import MethodSettings, output_error
from mixq.methods.gptq import quantize_gptq
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
