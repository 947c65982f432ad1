"""Token windows for calibration and evaluation: from a text file, or sampled from the model.

Sampled windows are the data-free default: sequences drawn from the unquantized model itself,
starting from its BOS token, with a fixed seed. They are cached under ~/.cache/mixq (safetensors,
keyed by model, seed and shape), so a second run with the same settings skips generation.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from mixq.atomic import save_tensors
from mixq.errors import MixqError
from mixq.memory import release_memory
from mixq.models import LoadedModel
from mixq.runner import fast_matmul_dtype

log = logging.getLogger(__name__)

CACHE_DIR = Path(os.environ.get("MIXQ_CACHE", Path.home() / ".cache" / "mixq"))


@dataclass(frozen=True)
class WindowSpec:
    """Where windows come from: a text file, or model samples when `text` is None."""

    n_windows: int
    seq_len: int
    text: Path | None = None
    seed: int = 0

    def describe(self) -> str:
        source = f"text {self.text}" if self.text else f"samples from the model (seed {self.seed})"
        return f"{self.n_windows} x {self.seq_len} tokens of {source}"


def check_windows(loaded: LoadedModel, spec: WindowSpec, flags: str = "windows") -> None:
    """One clear error, before any work, for windows the model cannot take: fewer than one window of
    2 tokens, windows longer than the model's context, or more tokens than memory holds as the
    float32 hidden states a pass keeps (its inputs and outputs). `flags` names the options that set them."""
    if spec.n_windows < 1 or spec.seq_len < 2:
        raise MixqError(f"{flags}: need at least one window of at least 2 tokens")
    text_config = loaded.config.get_text_config()
    context = getattr(text_config, "max_position_embeddings", None)
    if context and spec.seq_len > context:
        raise MixqError(f"{flags}: windows of {spec.seq_len} tokens are longer than the model's context of {context}")
    hidden_bytes = 2 * spec.n_windows * spec.seq_len * text_config.hidden_size * 4
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if hidden_bytes > memory:
        raise MixqError(f"{flags}: {spec.n_windows} windows of {spec.seq_len} tokens need {hidden_bytes / 2**30:.1f} "
                        f"GiB of hidden states, more than this machine's {memory / 2**30:.1f} GiB")


def load_windows(loaded: LoadedModel, spec: WindowSpec, first: bool = True,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """Windows as a (n_windows, seq_len) int64 tensor (on the CPU).

    From text, `first` takes the first non-overlapping windows (evaluation); otherwise windows
    start at random offsets drawn with the seed (calibration). Samples are drawn on `device`.
    """
    check_windows(loaded, spec)
    if spec.text is None:
        return sample_windows(loaded, spec.n_windows, spec.seq_len, spec.seed, device=device)
    ids = tokenize_file(loaded.tokenizer, spec.text)
    n_available = len(ids) // spec.seq_len
    if n_available < 1:
        raise MixqError(f"{spec.text} holds {len(ids)} tokens, fewer than one window of {spec.seq_len}")
    if first:
        n = min(spec.n_windows, n_available)
        if n < spec.n_windows:
            log.warning("%s holds only %d windows of %d tokens", spec.text, n, spec.seq_len)
        return ids[: n * spec.seq_len].view(n, spec.seq_len)
    gen = torch.Generator().manual_seed(spec.seed)
    starts = torch.randint(0, len(ids) - spec.seq_len + 1, (spec.n_windows,), generator=gen)
    return torch.stack([ids[s : s + spec.seq_len] for s in starts.tolist()])


def read_text(path: Path) -> str:
    """The UTF-8 text of a file, or one clear error if it is missing, unreadable or empty."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MixqError(f"text file {path} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise MixqError(f"cannot read text file {path}: {e}") from None
    if not text.strip():
        raise MixqError(f"text file {path} is empty")
    return text


def tokenize_file(tokenizer, path: Path) -> torch.Tensor:
    text = read_text(path)
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.int64)


SAMPLER = "bf16-2"  # names how samples are drawn: part of the cache key, so a new sampler never reads old samples


def sample_windows(loaded: LoadedModel, n: int, seq_len: int, seed: int, batch_size: int = 64,
                   dtype: torch.dtype | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
    """Sequences sampled from the model in `dtype` (temperature 1, no truncation), cached on disk.
    By default the model decodes in the device's fast precision (`runner.fast_matmul_dtype`:
    bfloat16 where the device multiplies it in hardware, else float32), which the cache key names.

    Decoding is memory-bound (each step reads every weight for one token per sequence), so the
    sequences are decoded together in large batches with a preallocated KV cache (`mixq.decode`),
    and tokens are drawn by inverting each row's cumulative distribution (one uniform number per
    row; the exponential draws of `torch.multinomial` cost more than the model's forward here).
    The model decodes on `device`; the uniform numbers come from a CPU generator on any device.
    """
    dtype = dtype or fast_matmul_dtype(device)
    key = f"{_model_key(loaded)}-{SAMPLER}-{str(dtype).removeprefix('torch.')}-s{seed}-{n}x{seq_len}"
    cache = CACHE_DIR / "samples" / f"{key}.safetensors"
    if cache.is_file():
        return load_file(cache)["ids"]
    from mixq import decode
    from mixq.models import materialize

    model, tok = materialize(loaded, dtype=dtype).to(device), loaded.tokenizer
    model.set_attn_implementation(decode.ATTENTION)
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    gen = torch.Generator().manual_seed(seed)
    cache_kwarg = decode.cache_argument(model)
    windows = torch.full((n, seq_len), bos, dtype=torch.int64)
    progress = tqdm(total=n * (seq_len - 1), desc="sampling calibration text", unit="token", unit_scale=True)
    with torch.no_grad():
        for start in range(0, n, batch_size):
            ids = windows[start : start + batch_size].to(device)
            past = decode.preallocated_cache(loaded.n_blocks, seq_len)
            for pos in range(1, seq_len):
                logits = model(ids[:, pos - 1 : pos], use_cache=True, **{cache_kwarg: past}).logits[:, -1]
                ids[:, pos] = draw(logits, gen)
                progress.update(len(ids))
            windows[start : start + batch_size] = ids.cpu()
    progress.close()
    del model
    release_memory()
    cache.parent.mkdir(parents=True, exist_ok=True)
    save_tensors({"ids": windows}, cache)
    return windows


def draw(logits: torch.Tensor, gen: torch.Generator, chunk: int = 1024) -> torch.Tensor:
    """One token per row of `logits` (rows, vocab), drawn from softmax(logits) by inverting its
    cumulative distribution at a uniform number from `gen`: first over the sums of `chunk`
    consecutive tokens, then within the chosen chunk. Weights in float32, sums in float64; a
    float64 cumulative sum over the whole vocabulary took twice as long (bench/results/speed.md)."""
    rows, vocab = logits.shape
    z = logits.float()
    z = z - z.max(dim=-1, keepdim=True).values
    # Below exp(-80) float32 turns subnormal, which slows x86 arithmetic a hundredfold; a token that
    # unlikely (2e-35 times the likeliest) is never drawn either way.
    weights = torch.nn.functional.pad(z.clamp_(min=-80).exp_(), (0, -vocab % chunk)).view(rows, -1, chunk)
    chunk_cdf = weights.sum(dim=-1, dtype=torch.float64).cumsum(dim=-1)
    u = torch.rand(rows, 1, dtype=torch.float64, generator=gen).to(z.device) * chunk_cdf[:, -1:]
    picked = torch.searchsorted(chunk_cdf, u, right=True).clamp_(max=chunk_cdf.shape[1] - 1)
    before = torch.where(picked > 0, chunk_cdf.gather(1, (picked - 1).clamp(min=0)), 0.0)
    inside = weights[torch.arange(rows, device=z.device), picked.squeeze(1)].double().cumsum(dim=-1)
    token = torch.searchsorted(inside, u - before, right=True).clamp_(max=chunk - 1)
    return (picked * chunk + token).squeeze(1).clamp_(max=vocab - 1)


def _model_key(loaded: LoadedModel) -> str:
    """A content hash of the model: its embedding and first block's weights."""
    h = hashlib.sha256(loaded.config.model_type.encode())
    tensors = [loaded.embedding(), *loaded.block_weights(0).values()]
    for t in tensors:
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
