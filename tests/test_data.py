"""Windows sampled from the model: the data-free default."""

import pytest
import torch

from mixq import data
from mixq.data import draw, sample_windows
from mixq.models import load_model, materialize


def test_draw_follows_the_distribution():
    logits = torch.tensor([[0.0, 1.0, 2.0, -torch.inf, 0.5]]).repeat(40000, 1)
    tokens = draw(logits, torch.Generator().manual_seed(0))
    freq = torch.bincount(tokens, minlength=5).double() / len(tokens)
    expected = torch.softmax(logits[0].double(), -1)
    assert freq[3] == 0  # probability zero: never drawn
    assert torch.allclose(freq, expected, atol=0.01), (freq, expected)


@pytest.mark.parametrize("vocab, chunk", [(3000, 1024), (2048, 1024), (50, 7), (1, 1024)])
def test_draw_by_chunks_picks_what_inverting_the_whole_distribution_picks(vocab, chunk):
    """Same uniform numbers, same tokens as a float64 inversion over the whole vocabulary, for
    vocabularies that are and are not a whole number of chunks."""
    logits = torch.randn(64, vocab, generator=torch.Generator().manual_seed(vocab)) * 4
    ours, theirs = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for _ in range(20):
        z = logits.double() - logits.double().max(dim=-1, keepdim=True).values
        cdf = z.exp().cumsum(dim=-1)
        u = torch.rand(len(cdf), 1, dtype=torch.float64, generator=theirs) * cdf[:, -1:]
        assert torch.equal(draw(logits, ours, chunk), torch.searchsorted(cdf, u, right=True).squeeze(1))


def test_sampled_windows_equal_decoding_without_a_cache(tiny_llama_dir, tmp_path, monkeypatch):
    """The batched, cached sampler draws what a plain loop recomputing every prefix draws from the
    same random numbers; the result is cached on disk and read back."""
    monkeypatch.setattr(data, "CACHE_DIR", tmp_path)
    loaded = load_model(str(tiny_llama_dir))
    windows = sample_windows(loaded, n=5, seq_len=12, seed=3, batch_size=2, dtype=torch.float32)
    model, bos = materialize(loaded), loaded.tokenizer.bos_token_id
    gen = torch.Generator().manual_seed(3)
    expected = torch.full((5, 12), bos)
    with torch.no_grad():
        for start in range(0, 5, 2):
            ids = expected[start : start + 2]
            for pos in range(1, 12):
                ids[:, pos] = draw(model(ids[:, :pos], use_cache=False).logits[:, -1], gen)
    assert torch.equal(windows, expected)
    assert len(set(windows[:, 1:].flatten().tolist())) > 10  # a random model's text is varied
    assert list(tmp_path.glob("samples/*.safetensors"))
    def no_model(*args):
        raise AssertionError("sampled again instead of reading the cache")

    monkeypatch.setattr("mixq.models.materialize", no_model)
    assert torch.equal(sample_windows(loaded, n=5, seq_len=12, seed=3, batch_size=2, dtype=torch.float32), windows)
