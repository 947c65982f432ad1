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


def save_tiny_llama(path: Path, model_type: str = "llama", seed: int = 0, tied: bool = True) -> Path:
    """A 2-block Llama (hidden 64, vocab from a word-level tokenizer) with random weights."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, ".": 3, **{w: i + 4 for i, w in enumerate(dict.fromkeys(WORDS))}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    config = AutoConfig.for_model(
        model_type, vocab_size=len(vocab), hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tied,
        bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "words.txt"
    path.write_text(make_text(6000))
    return path


@pytest.fixture(scope="session")
def smollm2():
    from mixq.models import load_model

    return load_model("smollm2-135m")
