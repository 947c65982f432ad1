"""Quality of a model against its reference, on the same token windows for every model.

- perplexity: exp of the mean next-token negative log-likelihood over all windows;
- KL divergence KL(p_ref || p_model) of the next-token distributions, per token: mean and 99th
  percentile;
- top-1 agreement: how often both models put the same token first.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@dataclass(frozen=True)
class Report:
    n_windows: int
    seq_len: int
    ppl: float
    kl_mean: float | None = None
    kl_p99: float | None = None
    top1: float | None = None
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


def next_token_logprobs(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """(B, T-1, V) log-probabilities of the token after each position but the last."""
    return F.log_softmax(model(batch, use_cache=False).logits[:, :-1].float(), dim=-1)


def reference_logprobs(reference: torch.nn.Module, windows: torch.Tensor, batch_size: int = 4) -> list[torch.Tensor]:
    """The reference's log-probabilities per batch, to compare many models without recomputing them
    (fp32: about 4 GB for 40 windows of 512 tokens and a 49k vocabulary)."""
    with torch.no_grad():
        return [next_token_logprobs(reference, b) for b in tqdm(windows.split(batch_size), desc="reference", unit="batch")]


def evaluate(
    model: torch.nn.Module,
    windows: torch.Tensor,
    reference: torch.nn.Module | list[torch.Tensor] | None = None,
    batch_size: int = 4,
    desc: str = "evaluating",
) -> Report:
    """Perplexity of `model` on `windows` (n, seq_len); KL and top-1 against `reference` if given,
    either a model or its `reference_logprobs` on the same windows and batch size."""
    start = time.perf_counter()
    nll_sum, n_tokens, agree = 0.0, 0, 0
    kls: list[torch.Tensor] = []
    with torch.no_grad():
        for i, batch in enumerate(tqdm(windows.split(batch_size), desc=desc, unit="batch")):
            targets = batch[:, 1:]  # (B, T-1)
            logp = next_token_logprobs(model, batch)  # (B, T-1, V)
            nll_sum += -logp.gather(-1, targets.unsqueeze(-1)).double().sum().item()
            n_tokens += targets.numel()
            if reference is not None:
                ref = reference[i] if isinstance(reference, list) else next_token_logprobs(reference, batch)
                kls.append((ref.exp() * (ref - logp)).sum(-1).flatten().double())
                agree += (ref.argmax(-1) == logp.argmax(-1)).sum().item()
            del logp
    n, seq_len = windows.shape
    fields: dict = {}
    if reference is not None:
        kl = torch.cat(kls).clamp(min=0)  # tiny negatives are fp32 rounding
        fields = dict(kl_mean=kl.mean().item(), kl_p99=torch.quantile(kl, 0.99).item(), top1=agree / n_tokens)
    return Report(
        n_windows=n, seq_len=seq_len, ppl=math.exp(nll_sum / n_tokens), seconds=time.perf_counter() - start, **fields
    )
