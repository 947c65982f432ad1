"""Quality of a model against its reference, on the same token windows for every model.

- perplexity: exp of the mean next-token negative log-likelihood over all windows;
- KL divergence KL(p_ref || p_model) of the next-token distributions, per token: mean and 99th
  percentile;
- top-1 agreement: how often both models put the same token first.

The mean KL comes with a 95% bootstrap interval over windows (tokens of one window are not
independent, windows nearly are): a difference between two models inside it is not one.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mixq.models import LoadedModel
from mixq.models.source import WeightSource
from mixq.runner import BlockRunner, release_memory


@dataclass(frozen=True)
class Report:
    n_windows: int
    seq_len: int
    ppl: float
    kl_mean: float | None = None
    kl_p99: float | None = None
    top1: float | None = None
    kl_ci95: tuple[float, float] | None = None  # bootstrap interval of kl_mean over windows
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


def final_hidden(runner: BlockRunner, windows: torch.Tensor, batch_size: int, source: WeightSource | None,
                 residents: dict[str, torch.Tensor], desc: str) -> list[torch.Tensor]:
    """Hidden states leaving the last block for every batch of windows, one block in memory at a time."""
    loaded = runner.loaded
    batches = runner.embed(windows, batch_size, residents, source)
    for b in tqdm(range(loaded.n_blocks), desc=desc, unit="block"):
        batches = runner.run(b, runner.block_weights(b, source), batches)
        release_memory()
    return batches


def reference_hidden(loaded: LoadedModel, windows: torch.Tensor, batch_size: int = 4,
                     device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """The reference's last hidden states on `windows`: pass them to `evaluate` to compare many models
    without rerunning it (small: windows x seq_len x hidden floats, not x vocab)."""
    return final_hidden(BlockRunner(loaded, device=device), windows, batch_size, None, loaded.residents, "reference")


class VocabStream:
    """Per-token statistics of log-softmax(logits) from logits that arrive a slice of the vocabulary
    at a time (an online log-sum-exp), so that no output matrix and no (tokens, vocabulary) array is
    ever held whole: the normaliser, the argmax, the target's logit and, for a KL, the expectation
    under these logits of their difference to another model's."""

    def __init__(self, targets: torch.Tensor):
        n, device = targets.numel(), targets.device
        self.targets = targets
        self.max = torch.full((n,), -math.inf, device=device)
        self.sum = torch.zeros(n, dtype=torch.float64, device=device)  # sum exp(logit - max)
        self.cross = torch.zeros(n, dtype=torch.float64, device=device)  # sum exp(logit - max) * (logit - other)
        self.argmax = torch.zeros(n, dtype=torch.long, device=device)
        self.target_logit = torch.zeros(n, device=device)

    def add(self, tokens: slice, vocab: slice, logits: torch.Tensor, other: torch.Tensor | None = None) -> None:
        """Take in `logits` (tokens, vocabulary slice) and optionally the other model's on the same."""
        old = self.max[tokens]
        top, where = logits.max(-1)
        new = torch.maximum(old, top)
        weight = torch.exp(logits - new[:, None])
        rescale = torch.exp((old - new).double())
        self.sum[tokens] = self.sum[tokens] * rescale + weight.sum(-1, dtype=torch.float64)
        if other is not None:
            self.cross[tokens] = self.cross[tokens] * rescale + (weight * (logits - other)).sum(-1, dtype=torch.float64)
        self.argmax[tokens] = torch.where(top > old, where + vocab.start, self.argmax[tokens])  # ties: first
        self.max[tokens] = new
        at = self.targets[tokens] - vocab.start
        inside = (at >= 0) & (at < logits.shape[1])
        self.target_logit[tokens][inside] = logits[inside, at[inside]]

    def log_normaliser(self) -> torch.Tensor:
        return self.max.double() + self.sum.log()

    def nll(self) -> torch.Tensor:
        """Negative log-likelihood of each target (float64)."""
        return self.log_normaliser() - self.target_logit.double()

    def kl_to(self, other: VocabStream) -> torch.Tensor:
        """KL(these || other) per token, when `add` was given the other's logits."""
        return self.cross / self.sum - self.log_normaliser() + other.log_normaliser()


def evaluate(
    loaded: LoadedModel,
    windows: torch.Tensor,
    quantized: WeightSource | None = None,
    batch_size: int = 4,
    reference: list[torch.Tensor] | None = None,
    device: torch.device | str = "cpu",
) -> Report:
    """Perplexity on `windows` (n, seq_len) of the model with the weights of `quantized` (default: its
    own); with `quantized`, also KL and top-1 against the model's own weights, the reference (its
    `reference_hidden`, computed here unless given).

    Both models stream through the runner block by block; the head streams over slices of the
    vocabulary (each model's output matrix read a slice at a time) and chunks of tokens, on `device`.
    """
    start = time.perf_counter()
    runner = BlockRunner(loaded, device=device)
    small = loaded.residents_from(quantized, matrices=False)  # norms and biases; the embedding is read on use
    hidden = final_hidden(runner, windows, batch_size, quantized, small,
                          "evaluating" if quantized is not None else "reference")
    if quantized is not None and reference is None:
        reference = reference_hidden(loaded, windows, batch_size, device)
    width = loaded.hidden_size
    targets = windows[:, 1:].reshape(-1).to(runner.device)  # the last position predicts nothing here

    def normed(batches: list[torch.Tensor], residents: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([runner.normed(h[:, :-1].reshape(-1, width), residents) for h in batches])

    x = normed(hidden, small)
    del hidden
    model = VocabStream(targets)
    x_ref = normed(reference, loaded.residents) if quantized is not None else None
    ref = VocabStream(targets) if quantized is not None else None
    ref_slices = runner.head_slices() if ref is not None else None
    with torch.no_grad():
        for rows, W, b in runner.head_slices(quantized, small):
            W_ref, b_ref = next(ref_slices)[1:] if ref_slices is not None else (None, None)
            for s in runner.token_chunks(x.unsqueeze(0), rows.stop - rows.start):
                logits = runner.scaled(F.linear(x[s], W, b).float())
                model.add(s, rows, logits)
                if ref is not None:
                    ref.add(s, rows, runner.scaled(F.linear(x_ref[s], W_ref, b_ref).float()), other=logits)
            del W, W_ref
            release_memory()
    n, seq_len = windows.shape
    fields: dict = {}
    if ref is not None:
        kl = ref.kl_to(model).clamp(min=0).cpu()  # tiny negatives are rounding
        fields = dict(kl_mean=kl.mean().item(), kl_p99=torch.quantile(kl, 0.99).item(),
                      top1=(ref.argmax == model.argmax).double().mean().item(),
                      kl_ci95=bootstrap_interval(kl.view(n, seq_len - 1).mean(1)))
    return Report(n_windows=n, seq_len=seq_len, ppl=math.exp(model.nll().mean().item()),
                  seconds=time.perf_counter() - start, **fields)


BOOTSTRAP_RESAMPLES = 2000


def bootstrap_interval(per_window: torch.Tensor, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """The percentile bootstrap interval of the mean of `per_window` (windows resampled with
    replacement, seeded: the same values give the same interval)."""
    n = len(per_window)
    picks = torch.randint(0, n, (BOOTSTRAP_RESAMPLES, n), generator=torch.Generator().manual_seed(seed))
    means = per_window.double()[picks].mean(1)
    lo, hi = torch.quantile(means, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)).tolist()
    return lo, hi


@dataclass(frozen=True)
class Agreement:
    """How closely another engine's next-token distributions follow ours on the same windows."""

    kl_to_engine: float  # mean KL(ours || engine) per token
    kl_from_engine: float  # mean KL(engine || ours) per token
    top1: float  # share of positions where both put the same token first
    n_tokens: int


def agreement_with_top_k(engine: list[list[dict[int, float]]], log_probs: torch.Tensor) -> Agreement:
    """Compare an engine that reports only its top-k log-probabilities per position (engine[w][i]:
    token -> log-probability at position i of window w) with a full log-softmax `log_probs`
    (windows, positions, vocabulary). Both KLs are taken over the reported tokens plus one bucket
    for the rest of the vocabulary: lower bounds on the full KLs, tight when the top k hold nearly
    all the mass."""
    to_engine, from_engine, same = [], [], 0
    for w, window in enumerate(engine):
        for i, top in enumerate(window):
            ids = torch.tensor(list(top.keys()), dtype=torch.long)
            theirs = torch.tensor(list(top.values()), dtype=torch.float64)
            ours = log_probs[w, i, ids].double()
            tail_theirs, tail_ours = (max(1 - float(lp.exp().sum()), 1e-12) for lp in (theirs, ours))
            log_ratio = theirs - ours
            from_engine.append(float((theirs.exp() * log_ratio).sum()) + tail_theirs * math.log(tail_theirs / tail_ours))
            to_engine.append(float((ours.exp() * -log_ratio).sum()) + tail_ours * math.log(tail_ours / tail_theirs))
            same += int(ids[theirs.argmax()] == log_probs[w, i].argmax())
    n = len(to_engine)
    return Agreement(sum(to_engine) / n, sum(from_engine) / n, same / n, n)
