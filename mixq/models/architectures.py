"""Per-architecture adapters: where the blocks are and which linears each block holds.

No graph tracing: a family is described by the path to its list of blocks and its linears,
grouped by the input they share (q/k/v read the same normed hidden state, so one H serves all
three). Groups are listed in forward order, which sequential quantization follows.
"""

from __future__ import annotations

from dataclasses import dataclass

from mixq.errors import MixqError


@dataclass(frozen=True)
class Architecture:
    family: str
    blocks: str  # attribute path to the nn.ModuleList of transformer blocks
    input_groups: tuple[tuple[str, ...], ...]  # linear names inside a block, by shared input
    embedding: str
    final_norm: str
    head: str
    gguf_permutes_qk: bool  # llama.cpp's converter reorders q/k rows for its rotary embedding


_LLAMA_LIKE = dict(
    blocks="model.layers",
    input_groups=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    ),
    embedding="model.embed_tokens",
    final_norm="model.norm",
    head="lm_head",
)

ARCHITECTURES: dict[str, Architecture] = {
    name: Architecture(family=name, gguf_permutes_qk=name != "qwen2", **_LLAMA_LIKE)
    for name in ("llama", "qwen2", "mistral")
}


def architecture(model_type: str) -> Architecture:
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise MixqError(
            f"unsupported architecture {model_type!r}; supported: {', '.join(sorted(ARCHITECTURES))}"
        ) from None
