"""llama.cpp's tools beside mixq: where the binaries are, and reading what llama-perplexity saves.

The tools are built by scripts/build-llama-cpp from the llama.cpp source inside the pinned
llama-cpp-python sdist (never a native build: -march=native emits AMX code that crashes on some
CPUs); MIXQ_LLAMA_CPP_BIN points at an existing build instead.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mixq.errors import MixqError

BUILD_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "build-llama-cpp"


def tools_dir() -> Path:
    """Directory holding llama-quantize, llama-imatrix, llama-perplexity and llama-completion
    (built on first use, about 4 minutes on 2 cores, then cached)."""
    if "MIXQ_LLAMA_CPP_BIN" in os.environ:
        return Path(os.environ["MIXQ_LLAMA_CPP_BIN"])
    if not BUILD_SCRIPT.is_file():
        raise MixqError("llama.cpp's tools: set MIXQ_LLAMA_CPP_BIN (the build script ships with the source tree)")
    proc = subprocess.run([str(BUILD_SCRIPT)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise MixqError(f"building llama.cpp's tools failed:\n{proc.stderr[-2000:]}")
    return Path(proc.stdout.strip().splitlines()[-1])


@dataclass
class SavedLogProbs:
    """What `llama-perplexity --kl-divergence-base FILE` saves: the tokens of each chunk and, for the
    second half of each chunk, every vocabulary entry's log-probability (16-bit, within 16 nats of the
    top one; anything lower is stored as the floor)."""

    n_ctx: int
    tokens: np.ndarray  # (n_chunks, n_ctx) int32
    log_probs: np.ndarray  # (n_chunks, n_ctx - 1 - n_ctx // 2, n_vocab) float32, positions n_ctx//2 .. n_ctx-2

    @property
    def first(self) -> int:
        return self.n_ctx // 2


def read_saved_log_probs(path: Path) -> SavedLogProbs:
    data = Path(path).read_bytes()
    if data[:8] != b"_logits_":
        raise MixqError(f"{path} is not a llama-perplexity logits file")
    n_ctx, n_vocab, n_chunks = np.frombuffer(data, np.int32, 3, offset=8).tolist()
    offset = 20
    tokens = np.frombuffer(data, np.int32, n_chunks * n_ctx, offset).reshape(n_chunks, n_ctx)
    offset += tokens.nbytes
    nv = 2 * ((n_vocab + 1) // 2) + 4  # two floats (scale, floor) then one uint16 per entry, padded
    n_pos = n_ctx - 1 - n_ctx // 2
    raw = np.frombuffer(data, np.uint16, n_chunks * n_pos * nv, offset).reshape(n_chunks, n_pos, nv)
    head = np.ascontiguousarray(raw[..., :4]).view(np.float32)  # (chunks, pos, 2)
    scale, floor = head[..., :1], head[..., 1:2]
    log_probs = floor + scale * raw[..., 4 : 4 + n_vocab].astype(np.float32)
    return SavedLogProbs(n_ctx, tokens.copy(), log_probs)
