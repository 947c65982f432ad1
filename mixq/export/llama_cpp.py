"""llama.cpp beside mixq: its converter, where its binaries are, reading what llama-perplexity saves, and
timing its matrix products (ggml's kernels, through scripts/ggml-matmul-time.cpp).

Source and tools come from scripts/build-llama-cpp, which fetches the llama.cpp source inside the
pinned llama-cpp-python sdist and builds the tools (never a native build: -march=native emits AMX
code that crashes on some CPUs); MIXQ_LLAMA_CPP_SRC and MIXQ_LLAMA_CPP_BIN point at an existing
source tree and build instead.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGUFReader

from mixq.errors import MixqError
from mixq.models.gguf_file import read_gguf

BUILD_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "build-llama-cpp"


def _build_script(env_var: str, *args: str) -> Path:
    if env_var in os.environ:
        return Path(os.environ[env_var])
    if not BUILD_SCRIPT.is_file():
        raise MixqError(f"llama.cpp: set {env_var} (the build script ships with mixq's source tree)")
    proc = subprocess.run([str(BUILD_SCRIPT), *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise MixqError(f"fetching or building llama.cpp failed:\n{proc.stderr[-2000:]}")
    return Path(proc.stdout.strip().splitlines()[-1])


def tools_dir() -> Path:
    """Directory holding llama-quantize, llama-imatrix, llama-perplexity, llama-completion and
    ggml-matmul-time (built on first use, about 4 minutes on 2 cores, then cached)."""
    return _build_script("MIXQ_LLAMA_CPP_BIN")


def engine_build() -> str:
    """Which llama.cpp the tools are: the pinned llama-cpp-python version, or the user's build."""
    if "MIXQ_LLAMA_CPP_BIN" in os.environ:
        return f"llama.cpp at {os.environ['MIXQ_LLAMA_CPP_BIN']}"
    default = re.search(r'VERSION="\$\{LLAMA_CPP_PYTHON_VERSION:-([^}]+)\}"', BUILD_SCRIPT.read_text())
    return f"llama.cpp of llama-cpp-python {os.environ.get('LLAMA_CPP_PYTHON_VERSION', default[1])}"


def file_matmuls(gguf: Path) -> list[tuple[str, int, int, int]]:
    """The (ggml type, rows, cols, 1) matrix products llama.cpp runs for one decoded token of a GGUF:
    every matrix but the token embedding, which is looked up (unless the output reuses it), and of a
    layer's experts (one 3-D tensor) the expert_used_count that a token is routed to."""
    reader = read_gguf(gguf)
    names = {t.name for t in reader.tensors}
    cases = []
    for t in reader.tensors:
        if len(t.shape) == 3:  # (cols, rows, experts)
            cols, rows, _ = (int(n) for n in t.shape)
            cases += [(t.tensor_type.name.lower(), rows, cols, 1)] * experts_used(reader, gguf)
        elif len(t.shape) == 2 and (t.name != "token_embd.weight" or "output.weight" not in names):
            cols, rows = (int(n) for n in t.shape)
            cases.append((t.tensor_type.name.lower(), rows, cols, 1))
    return cases


def experts_used(reader, gguf: Path) -> int:
    """A GGUF's experts per token ({arch}.expert_used_count)."""
    arch = reader.fields.get("general.architecture")
    field = arch and reader.fields.get(f"{arch.contents()}.expert_used_count")
    if field is None:
        raise MixqError(f"{gguf}: it holds experts but no expert_used_count")
    return int(field.contents())


def decode_seconds(gguf: Path, threads: int, tokens: int = 64, repeats: int = 3) -> float:
    """llama-bench's own measure of a GGUF's decoding: seconds per generated token (mean over
    `repeats` runs of `tokens` tokens)."""
    out = subprocess.run([str(tools_dir() / "llama-bench"), "-m", str(gguf), "-p", "0", "-n", str(tokens), "-t",
                          str(threads), "-r", str(repeats), "-o", "json"], capture_output=True, text=True)
    if out.returncode != 0:
        raise MixqError(f"llama-bench failed on {gguf}: {out.stderr.strip().splitlines()[-1:] or out.returncode}")
    runs = [r for r in json.loads(out.stdout) if r.get("n_gen", 0) > 0]
    return 1.0 / runs[0]["avg_ts"]


def time_matmuls(cases: list[tuple[str, int, int, int]], threads: int, repeats: int, stream_bytes: int
                 ) -> dict[tuple[str, int, int, int], list[float]]:
    """Each case's (ggml type, rows, cols, tokens) matrix product timed `repeats` times with ggml's CPU
    kernels, as llama.cpp runs them with `threads` threads (its repacked layouts included), cycling
    through copies of the weights `stream_bytes` in all."""
    from mixq.latency import run_timer

    return run_timer([str(tools_dir() / "ggml-matmul-time"), "--threads", str(threads), "--repeats", str(repeats),
                      "--stream-bytes", str(stream_bytes)], cases, "ggml-matmul-time")


def llama_cpp_source() -> Path:
    """The pinned llama.cpp source tree (fetched on first use, not built)."""
    return _build_script("MIXQ_LLAMA_CPP_SRC", "--source")


def convert_hf_to_gguf(model_dir: Path, out: Path) -> None:
    """Run llama.cpp's own converter (pinned source, fetched on first use) on a Hugging Face directory,
    writing every tensor as F32. It runs in its own process so that it imports the gguf-py of its
    source tree, whatever version of the gguf package mixq has."""
    script = llama_cpp_source() / "convert_hf_to_gguf.py"
    proc = subprocess.run([sys.executable, str(script), str(model_dir), "--outtype", "f32", "--outfile", str(out)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        raise MixqError(f"llama.cpp's converter cannot convert this model: {lines[-1] if lines else proc.returncode}")


@dataclass
class SavedLogProbs:
    """What `llama-perplexity --kl-divergence-base FILE` saves: the tokens of each chunk and, for the
    second half of each chunk, every vocabulary entry's log-probability (16-bit, within 16 nats of the
    top one; anything lower is stored as the floor)."""

    n_ctx: int
    tokens: np.ndarray  # (n_chunks, n_ctx) int32, as llama.cpp evaluated them
    log_probs: np.ndarray  # (n_chunks, n_ctx - 1 - n_ctx // 2, n_vocab) float32, positions n_ctx//2 .. n_ctx-2

    @property
    def first(self) -> int:
        return self.n_ctx // 2


def read_saved_log_probs(path: Path, model: Path) -> SavedLogProbs:
    """The file `llama-perplexity -m model --kl-divergence-base path` wrote. It saves the text's tokens,
    but evaluates every chunk with its first token replaced by BOS where the vocabulary adds one
    (the text's first token is then BOS): `tokens` are put back as evaluated."""
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
    tokens = tokens.copy()
    bos = GGUFReader(model).get_field("tokenizer.ggml.bos_token_id")
    if bos is not None and tokens[0, 0] == bos.contents():
        tokens[:, 0] = tokens[0, 0]
    return SavedLogProbs(n_ctx, tokens, log_probs)
