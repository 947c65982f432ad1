"""Evaluation metrics: perplexity, KL divergence and top-1 agreement."""

import math

import torch

from mixq.data import WindowSpec, load_windows
from mixq.evaluate import evaluate, reference_logprobs
from mixq.models import load_model


def test_cached_reference_gives_the_same_report(tiny_llama_dir, text_file):
    ref, other = load_model(str(tiny_llama_dir)), load_model(str(tiny_llama_dir))
    with torch.no_grad():
        for p in other.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    windows = load_windows(ref, WindowSpec(5, 32, text_file))
    direct = evaluate(other.model, windows, reference=ref.model, batch_size=2)
    cached = evaluate(other.model, windows, reference=reference_logprobs(ref.model, windows, 2), batch_size=2)
    assert direct.kl_mean > 0
    for key in ("ppl", "kl_mean", "kl_p99", "top1"):
        assert getattr(direct, key) == getattr(cached, key)


def test_a_model_against_itself(tiny_llama_dir, text_file):
    loaded = load_model(str(tiny_llama_dir))
    windows = load_windows(loaded, WindowSpec(3, 32, text_file))
    report = evaluate(loaded.model, windows, reference=loaded.model)
    assert report.kl_mean == 0 and report.top1 == 1
    assert report.n_windows == 3 and report.seq_len == 32
    # a random model is close to uniform over its vocabulary
    vocab = loaded.model.config.vocab_size
    assert 0.5 * vocab < report.ppl < 2 * vocab and math.isfinite(report.ppl)
