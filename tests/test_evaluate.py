"""Evaluation metrics: perplexity, KL divergence and top-1 agreement."""

import math

from mixq.data import WindowSpec, load_windows
from mixq.evaluate import evaluate
from mixq.models import load_model


def test_a_model_against_itself(tiny_llama_dir, text_file):
    loaded = load_model(str(tiny_llama_dir))
    windows = load_windows(loaded, WindowSpec(3, 32, text_file))
    report = evaluate(loaded, windows, loaded.source)
    assert report.kl_mean == 0 and report.top1 == 1
    assert report.n_windows == 3 and report.seq_len == 32
    # a random model is close to uniform over its vocabulary
    vocab = loaded.config.vocab_size
    assert 0.5 * vocab < report.ppl < 2 * vocab and math.isfinite(report.ppl)
    assert evaluate(loaded, windows).ppl == report.ppl  # no second model: perplexity alone
