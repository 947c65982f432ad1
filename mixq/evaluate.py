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
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


def final_hidden(runner: BlockRunner, windows: torch.Tensor, batch_size: int, source: WeightSource | None,
                 residents: dict[str, torch.Tensor], desc: str) -> list[torch.Tensor]:
    """Hidden states leaving the last block for every batch of windows, one block in memory at a time."""
    loaded = runner.loaded
    batches = runner.embed(windows, batch_size, residents)
    for b in tqdm(range(loaded.n_blocks), desc=desc, unit="block"):
        batches = runner.run(b, loaded.block_weights(b, source), batches)
        release_memory()
    return batches


def reference_hidden(loaded: LoadedModel, windows: torch.Tensor, batch_size: int = 4) -> list[torch.Tensor]:
    """The reference's last hidden states on `windows`: pass them to `evaluate` to compare many models
    without rerunning it (small: windows x seq_len x hidden floats, not x vocab)."""
    return final_hidden(BlockRunner(loaded), windows, batch_size, None, loaded.residents, "reference")


def evaluate(
    loaded: LoadedModel,
    windows: torch.Tensor,
    quantized: WeightSource | None = None,
    batch_size: int = 4,
    reference: list[torch.Tensor] | None = None,
) -> Report:
    """Perplexity on `windows` (n, seq_len) of the model with the weights of `quantized` (default: its
    own); with `quantized`, also KL and top-1 against the model's own weights, the reference (its
    `reference_hidden`, computed here unless given).

    Both models stream through the runner block by block; the head runs over chunks of tokens.
    """
    start = time.perf_counter()
    runner = BlockRunner(loaded)
    model_residents = loaded.residents_from(quantized)
    hidden = final_hidden(runner, windows, batch_size, quantized, model_residents,
                          "evaluating" if quantized is not None else "reference")
    if quantized is not None and reference is None:
        reference = reference_hidden(loaded, windows, batch_size)
    nll_sum, n_tokens, agree = 0.0, 0, 0
    kls: list[torch.Tensor] = []
    with torch.no_grad():
        for i, batch in enumerate(windows.split(batch_size)):
            h = hidden[i][:, :-1].reshape(-1, hidden[i].shape[-1])  # the last position predicts nothing here
            targets = batch[:, 1:].reshape(-1)
            for s in runner.token_chunks(h.unsqueeze(0)):
                logp = F.log_softmax(runner.logits(h[s], model_residents), dim=-1)
                nll_sum += -logp.gather(-1, targets[s].unsqueeze(-1)).double().sum().item()
                if quantized is not None:
                    r = reference[i][:, :-1].reshape(-1, h.shape[-1])[s]
                    ref = F.log_softmax(runner.logits(r), dim=-1)
                    kls.append((ref.exp() * (ref - logp)).sum(-1).double())
                    agree += (ref.argmax(-1) == logp.argmax(-1)).sum().item()
                del logp
                release_memory()  # a chunk's logits are freed in an order that fragments the heap
            n_tokens += targets.numel()
    n, seq_len = windows.shape
    fields: dict = {}
    if quantized is not None:
        kl = torch.cat(kls).clamp(min=0)  # tiny negatives are fp32 rounding
        fields = dict(kl_mean=kl.mean().item(), kl_p99=torch.quantile(kl, 0.99).item(), top1=agree / n_tokens)
    return Report(
        n_windows=n, seq_len=seq_len, ppl=math.exp(nll_sum / n_tokens), seconds=time.perf_counter() - start, **fields
    )
