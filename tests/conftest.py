"""Shared fixtures: a tiny random Llama saved as a Hugging Face directory, and a small text."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

WORDS = ("the of and to in is was for on as with by at from his an were are which this be or it "
         "has had not first one their its new after who they have her she two been other when there "
         "all during into school time may years more most only over city some world would where later "
         "up such used many can state about national out known university united then made").split()


def make_text(n_words: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_words // 12):
        lines.append(" ".join(rng.choice(WORDS) for _ in range(12)) + " .")
    return "\n".join(lines) + "\n"


# Every architecture family the README lists, as a tiny config: 2 blocks, hidden 64, 4 experts for MoE.
FAMILY_CONFIGS = {
    "llama": {}, "mistral": {}, "qwen2": {}, "qwen3": {}, "olmo2": {}, "granite": {}, "phi3": {},
    "gemma2": dict(sliding_window=16, query_pre_attn_scalar=16),
    "gemma3_text": dict(sliding_window=16, query_pre_attn_scalar=16, layer_types=["sliding_attention", "full_attention"]),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=16,
                    layer_types=["sliding_attention", "full_attention"], rope_parameters=None),
}
MOE = ("qwen2_moe", "qwen3_moe", "mixtral", "gpt_oss")


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, ".": 3, **{w: i + 4 for i, w in enumerate(dict.fromkeys(WORDS))}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<unk>")


def save_tiny_model(path: Path, model_type: str = "llama", seed: int = 0, tied: bool = True,
                    dtype=torch.float32, tokenizer=None, **config) -> Path:
    """A 2-block model of `model_type` (hidden 64, vocab from `tokenizer`, by default a word-level
    one) with random weights, saved as a Hugging Face directory (safetensors) in `dtype`; `config`
    overrides the model's config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fast = tokenizer or word_tokenizer()
    extra = {k: v for k, v in FAMILY_CONFIGS[model_type].items() if v is not None} | config
    config = AutoConfig.for_model(model_type, **dict(
        vocab_size=len(fast), hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
        tie_word_embeddings=tied, bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id or 0) | extra)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    if model_type in MOE:  # routers that prefer some experts, as trained ones do
        for name, p in model.named_parameters():
            if p.dim() == 3 or "router" in name or name.endswith("mlp.gate.weight"):
                p.data.normal_(0, 0.1 if p.dim() == 3 else 0.5)
    model = model.to(dtype)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


def save_tiny_llama(path: Path, model_type: str = "llama", seed: int = 0, tied: bool = True) -> Path:
    return save_tiny_model(path, model_type, seed, tied)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Tiny random models by family, built once per session when first asked for."""
    made: dict[str, Path] = {}
    root = tmp_path_factory.mktemp("families")

    def get(model_type: str) -> Path:
        if model_type not in made:
            made[model_type] = save_tiny_model(root / model_type, model_type, dtype=torch.bfloat16)
        return made[model_type]

    return get


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "words.txt"
    path.write_text(make_text(6000))
    return path


@pytest.fixture(scope="session")
def smollm2():
    from mixq.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def gguf_profile(tiny_llama_dir, text_file, tmp_path_factory) -> Path:
    """A profile of the tiny llama over the ggml types (rtn, no Fisher pass)."""
    from mixq.cli import main

    path = tmp_path_factory.mktemp("latency") / "tiny.profile"
    assert main([str(a) for a in ["-q", "profile", tiny_llama_dir, "--calib-text", text_file, "--calib-windows", 8,
                                  "--calib-len", 64, "--held-out-windows", 2, "--held-out-len", 64,
                                  "--fisher-windows", 0, "--formats", "gguf", "--methods", "rtn", "--out", path]]) == 0
    return path
