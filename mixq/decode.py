"""Autoregressive decoding on CPU at the speed of its matrix products: a preallocated KV cache and
a one-token attention, for sampling the data-free calibration text.

transformers' own decoding spends most of a step elsewhere on CPU: `DynamicCache` concatenates
the whole cache at every token, and the CPU kernel of scaled_dot_product_attention is slow for a
single query (bench/results/speed.md times both loops). Here each layer's keys and values live in
buffers sized for the whole sequence, the keys stored transposed so that `q @ k^T` reads them in
place, and attention for one query is two batched products per group of query heads sharing a
key head.
"""

from __future__ import annotations

import inspect

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.cache_utils import Cache, DynamicLayer
from transformers.masking_utils import sdpa_mask

ATTENTION = "mixq_decode"


class PreallocatedLayer(DynamicLayer):
    """One layer's cache in buffers of `capacity` positions; `update` writes in place and returns
    views of the filled part (keys as a transposed view of a (batch, heads, dim, capacity) buffer)."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, k_dim = key_states.shape
        self.device = key_states.device
        self.key_buffer = key_states.new_empty(batch, heads, k_dim, self.capacity, dtype=torch.float32)
        self.value_buffer = value_states.new_empty(batch, heads, self.capacity, value_states.shape[-1], dtype=torch.float32)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[2]
        if end > self.capacity:
            raise ValueError(f"KV cache holds {self.capacity} positions, asked for {end}")
        self.key_buffer[..., self.length : end] = key_states.transpose(2, 3)
        self.value_buffer[:, :, self.length : end] = value_states
        self.length = end
        self.keys = self.key_buffer[..., :end].transpose(2, 3)
        self.values = self.value_buffer[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length


def preallocated_cache(n_layers: int, capacity: int) -> Cache:
    return Cache(layers=[PreallocatedLayer(capacity) for _ in range(n_layers)])


def cache_argument(model: torch.nn.Module) -> str:
    """The name under which the model's forward takes its KV cache: transformers 5.2x renamed
    `past_key_values` to `cache` (the old name still works there, with a deprecation warning)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def one_token_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None,
                        s_aux=None, **kwargs):
    """Attention of query (batch, heads, q_len, dim) over key/value (batch, kv_heads, t, dim), as
    transformers' attention functions are called: the query heads of one key head are gathered into
    one matrix, so keys and values are read once per key head and never repeated. Scores and
    softmax in float32; `softcap` (Gemma 2) and attention sinks `s_aux` (gpt-oss) as in the
    models' own eager attention."""
    batch, heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    # bmm over (batch x key heads) matrices: unlike a 4-D matmul it reads the cache's strided views
    # without copying them.
    q = query.reshape(batch * kv_heads, group * q_len, dim).to(key.dtype)
    keys_t = key.transpose(2, 3).reshape(batch * kv_heads, dim, -1)
    scale = dim**-0.5 if scaling is None else scaling
    scores = torch.bmm(q, keys_t).float().view(batch, kv_heads, group * q_len, -1) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is None and q_len > 1:  # causal, left implicit by the mask function
        t = key.shape[2]
        attention_mask = torch.ones(q_len, t, dtype=torch.bool, device=scores.device).tril(t - q_len)
    if attention_mask is not None:
        mask = attention_mask.expand(batch, heads, q_len, -1).reshape(batch, kv_heads, group * q_len, -1)
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    if s_aux is not None:
        sinks = s_aux.float().reshape(1, kv_heads, group, 1, 1).expand(batch, -1, -1, q_len, 1)
        scores = torch.cat([scores, sinks.reshape(batch, kv_heads, group * q_len, 1)], dim=-1)
        probs = torch.softmax(scores, dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    out = torch.bmm(probs.to(value.dtype).reshape(batch * kv_heads, group * q_len, -1),
                    value.reshape(batch * kv_heads, -1, value.shape[-1]))
    return out.reshape(batch, heads, q_len, -1).transpose(1, 2).to(query.dtype), None


AttentionInterface.register(ATTENTION, one_token_attention)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)
