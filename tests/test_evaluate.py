"""Evaluation metrics: perplexity, KL divergence and top-1 agreement."""

import math

import pytest

from mixq.data import WindowSpec, load_windows
from mixq.evaluate import bootstrap_interval, evaluate
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


@pytest.mark.parametrize(("model_type", "tied"), [("gemma2", False), ("gemma3_text", False), ("granite", True)])
def test_streamed_head_equals_full_logits(tmp_path, text_file, monkeypatch, model_type, tied):
    """KL, top-1 and perplexity from the head streamed over slices of the vocabulary (6 rows at a
    time, ragged last slice; a few tokens per chunk) equal those of transformers' own full logits,
    with soft-capping (gemma2) and logit scaling (granite), tied and untied heads."""
    import torch
    import torch.nn.functional as F
    from conftest import save_tiny_model

    from mixq import models, runner
    from mixq.models import materialize
    from mixq.models.source import SafetensorsSource

    save_tiny_model(tmp_path / "a", model_type, seed=0, tied=tied)
    other = SafetensorsSource(save_tiny_model(tmp_path / "b", model_type, seed=1, tied=tied))
    loaded = load_model(str(tmp_path / "a"))
    windows = load_windows(loaded, WindowSpec(3, 24, text_file))
    monkeypatch.setattr(models, "SLICE_BYTES", 4 * loaded.hidden_size * 6)
    monkeypatch.setattr(runner, "CHUNK_BYTES", 4 * 7 * 5)
    assert loaded.vocab_size % 6 != 0
    report = evaluate(loaded, windows, other, batch_size=2)

    with torch.no_grad():
        ref = F.log_softmax(materialize(loaded)(windows, use_cache=False).logits[:, :-1].float(), -1)
        ours = F.log_softmax(materialize(loaded, other)(windows, use_cache=False).logits[:, :-1].float(), -1)
    kl = (ref.exp() * (ref - ours)).sum(-1)
    nll = -ours.gather(-1, windows[:, 1:, None]).mean()
    assert report.kl_mean == pytest.approx(kl.mean().item(), rel=1e-4)
    assert report.kl_p99 == pytest.approx(torch.quantile(kl.flatten(), 0.99).item(), rel=1e-4)
    assert report.top1 == pytest.approx((ref.argmax(-1) == ours.argmax(-1)).double().mean().item())
    assert report.ppl == pytest.approx(math.exp(nll.item()), rel=1e-5)
    assert report.kl_mean > 0.01  # two different random models: the comparison is not trivial
    per_window = kl.mean(-1).double()  # the interval resamples windows: the same as from these values
    assert report.kl_ci95 == pytest.approx(bootstrap_interval(per_window), rel=1e-4)
    lo, hi = report.kl_ci95
    assert per_window.min() * (1 - 1e-4) <= lo < report.kl_mean < hi <= per_window.max() * (1 + 1e-4)


def test_bootstrap_interval_covers_the_mean_as_often_as_it_says():
    """Over many samples of 40 windows from a skewed distribution of known mean, the 95% interval
    holds the true mean in about 95% of them (percentile bootstrap undercovers a little on skew)."""
    import torch

    g = torch.Generator().manual_seed(0)
    true_mean = 0.3
    hits = 0
    for trial in range(300):
        sample = torch.empty(40).exponential_(1 / true_mean, generator=g)
        lo, hi = bootstrap_interval(sample, seed=trial)
        assert lo <= sample.mean().item() <= hi
        hits += lo <= true_mean <= hi
    assert 0.88 <= hits / 300 <= 0.99
    assert bootstrap_interval(torch.full((5,), 0.2)) == pytest.approx((0.2, 0.2))
