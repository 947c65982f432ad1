"""What the block runner cannot discover from a model's module tree, per model type.

Everything else (where the blocks are, which matrices a block multiplies by, in what order and on
which inputs, expert stacks and their orientation, rotary embeddings, masks, the head's soft-cap)
is found by looking at the skeleton or by watching one block run (models/layout.py, runner.py).
A model type not listed here is attempted all the same; what it lacks is named in the error.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    model_type: str
    gguf_permutes_qk: bool = False  # llama.cpp's converter reorders q/k rows for its rotary embedding
    # Kinds (names inside a block) left at 16 bits by default: routers decide which experts run, and
    # a small error there moves whole tokens to other experts; shared experts see every token.
    kept: tuple[str, ...] = ()

    @property
    def tested(self) -> bool:
        return self.model_type in FAMILIES


_DENSE = ("mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "olmo2", "granite")
_SHARED_EXPERT = ("mlp.gate", "mlp.shared_expert_gate", "mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj",
                  "mlp.shared_expert.down_proj")

FAMILIES: dict[str, Family] = {
    "llama": Family("llama", gguf_permutes_qk=True),
    **{name: Family(name, gguf_permutes_qk=name == "mistral") for name in _DENSE},
    "qwen2_moe": Family("qwen2_moe", kept=_SHARED_EXPERT),
    "qwen3_moe": Family("qwen3_moe", kept=("mlp.gate",)),
    "mixtral": Family("mixtral", kept=("mlp.gate",)),
    "gpt_oss": Family("gpt_oss", kept=("mlp.router",)),
}


def family(model_type: str) -> Family:
    return FAMILIES.get(model_type, Family(model_type))
