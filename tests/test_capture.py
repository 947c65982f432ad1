"""Block-by-block capture gives the same H as hooking the whole model's forward pass."""

import torch

from mixq import capture
from mixq.models import load_model


def direct_hessians(loaded, windows):
    """H of every quantizable linear from one plain forward pass of the whole model, in float64."""
    H = {}

    def hook(name):
        def add(_m, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            H[name] = H.get(name, 0) + x.T @ x
        return add

    handles = [lin.register_forward_pre_hook(hook(n)) for n, lin in loaded.quantizable().items()]
    with torch.no_grad():
        loaded.model(windows, use_cache=False)
    for h in handles:
        h.remove()
    return H


def test_captured_H_equals_direct_computation(tiny_llama_dir):
    loaded = load_model(str(tiny_llama_dir))
    windows = torch.randint(0, loaded.model.config.vocab_size, (6, 32), generator=torch.Generator().manual_seed(0))
    expected = direct_hessians(loaded, windows)

    inputs = capture.block_inputs(loaded, windows, batch_size=4)
    assert len(inputs.batches) == 2  # batches of 4 and 2 windows
    for b, block in enumerate(loaded.blocks()):
        linears = loaded.block_linears(b)
        groups = loaded.block_groups(b)
        for stage in groups:  # one group at a time, as sequential quantization does
            stats = capture.collect_stats(block, linears, [stage], inputs)
            for name in stage:
                assert stats[name].n_tokens == 6 * 32
                # each batch's x^T x is summed in fp32, so agreement is to fp32 rounding of H's scale
                scale = expected[name].abs().max().item()
                torch.testing.assert_close(stats[name].H, expected[name], rtol=1e-5, atol=1e-6 * scale)
        inputs.batches = capture.run_block(block, inputs)


def test_early_stop_skips_the_rest_of_the_block(tiny_llama_dir):
    loaded = load_model(str(tiny_llama_dir))
    windows = torch.randint(0, loaded.model.config.vocab_size, (2, 16))
    inputs = capture.block_inputs(loaded, windows, batch_size=2)
    block, linears = loaded.blocks()[0], loaded.block_linears(0)
    seen = []
    handle = linears["model.layers.0.mlp.down_proj"].register_forward_pre_hook(lambda *_: seen.append(1))
    capture.collect_stats(block, linears, [["model.layers.0.self_attn.q_proj"]], inputs)
    handle.remove()
    assert seen == []
