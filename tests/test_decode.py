"""Decoding with the preallocated KV cache and the one-token attention gives the logits of the
model's own full forward, on families with grouped heads, sliding windows, soft-capping and sinks."""

import pytest
import torch

from mixq import decode
from mixq.models import load_model, materialize


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2", "gemma3_text", "gpt_oss", "phi3"])
def test_cached_decoding_equals_the_full_forward(tiny_models, family):
    loaded = load_model(str(tiny_models(family)))
    seq = 40  # longer than the tiny models' sliding window (16)
    ids = torch.randint(4, loaded.config.vocab_size, (3, seq), generator=torch.Generator().manual_seed(1))
    model = materialize(loaded)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        model.set_attn_implementation(decode.ATTENTION)
        cache = {decode.cache_argument(model): decode.preallocated_cache(loaded.n_blocks, seq)}
        steps = [model(ids[:, p : p + 1], use_cache=True, **cache).logits[:, -1] for p in range(seq)]
    torch.testing.assert_close(torch.stack(steps, 1), full, rtol=1e-4, atol=1e-4 * full.abs().max().item())


def test_one_token_attention_with_several_queries_is_causal():
    """Given no mask (transformers leaves causal masks implicit), a block of queries attends to the
    keys up to its own position: the result equals scaled_dot_product_attention's causal one."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 6, 5, 8, generator=gen)
    k, v = torch.randn(2, 3, 9, 8, generator=gen), torch.randn(2, 3, 9, 8, generator=gen)

    class Heads:
        pass

    out, _ = decode.one_token_attention(Heads(), q, k, v, None)
    mask = torch.ones(5, 9, dtype=torch.bool).tril(4)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(out, expected.transpose(1, 2))


def test_the_cache_refuses_to_overflow():
    layer = decode.PreallocatedLayer(capacity=2)
    k = torch.zeros(1, 1, 2, 4)
    layer.update(k, k)
    with pytest.raises(ValueError, match="holds 2 positions"):
        layer.update(k[:, :, :1], k[:, :, :1])
