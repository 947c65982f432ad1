"""Does GPTQ's gain hold off its calibration text? Per tensor of a few blocks of a model, the output
error tr(dW H dW^T) of RTN and of GPTQ, both fitted with H from the calibration windows (text
sampled from the model, mixq's default), measured with that H (in sample) and with H from held-out
WikiText windows (out of sample), each per token. A plan's types are taken from `--plan-bytes` (the
profile's plan at that size) or one `--format` for every tensor.

    python bench/gptq_holdout.py --text ../shared/data/wikitext-2-raw/wiki.test.raw --model REF.gguf \\
        --profile PROFILE --plan-bytes 924456448 --blocks 3 14
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import commit, machine  # noqa: E402

from mixq import capture
from mixq.data import WindowSpec, load_windows
from mixq.formats import parse_format
from mixq.methods import MethodSettings, get_method, output_error
from mixq.models import load_model
from mixq.options import Option


def block_stats(loaded, windows: torch.Tensor, blocks: set[int]) -> dict[str, capture.LayerStats]:
    """LayerStats of every tensor of `blocks` (the walk stops after the last of them)."""
    out, last = {}, max(blocks)
    b = -1
    for stats, _, batches in capture.iter_stats(loaded, windows, 8, torch.bfloat16):
        if batches is None:  # the untied embedding
            continue
        b += 1
        if b in blocks:
            out.update(stats)
        if b == last:
            break
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--text", type=Path, required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--profile", type=Path, help="with --plan-bytes: the plan's type per tensor")
    p.add_argument("--plan-bytes", type=int)
    p.add_argument("--format", help="one type for every tensor instead of a plan")
    p.add_argument("--blocks", type=int, nargs="+", default=[3])
    p.add_argument("--windows", type=int, default=32)
    p.add_argument("--damp", type=float, nargs="+", default=[0.01])
    args = p.parse_args()

    loaded = load_model(args.model)
    calib = load_windows(loaded, WindowSpec(args.windows, 512, seed=0))  # vs_llama_cpp's calibration
    held_out = load_windows(loaded, WindowSpec(args.windows, 512, args.text), first=True)
    blocks = set(args.blocks)
    fitted, judged = block_stats(loaded, calib, blocks), block_stats(loaded, held_out, blocks)
    if args.format:
        types = {name: args.format for name in fitted}
    else:
        from mixq.plan import Budget, plan_for_budget
        from mixq.profile import Profile

        plan = plan_for_budget(Profile.load(args.profile), Budget(args.plan_bytes, "bytes"), "hessian+kl")
        types = {name: Option.parse(plan.options[name]).format for name in fitted}
    print(f"machine: {machine()}; commit {commit()}")
    print("| tensor | type | method | in sample / rtn | held out / rtn |")
    print("|---|---|---|---|---|")
    params = loaded.plannable()
    for name, stats in fitted.items():
        if types[name] == "f16":
            continue
        W, fmt = loaded.read(params[name].param), parse_format(types[name])
        H_in, H_out = stats.H.double() / stats.n_tokens, judged[name].H.double() / judged[name].n_tokens
        rtn = get_method("rtn")(W, stats.H, fmt, MethodSettings(clip_grid=4)).dequantize()
        base = output_error(W, rtn, H_in), output_error(W, rtn, H_out)
        for damp in args.damp:
            q = get_method("gptq")(W, stats.H, fmt, MethodSettings(clip_grid=4, damp=damp)).dequantize()
            print(f"| {name} | {types[name]} | gptq damp {damp} | {output_error(W, q, H_in) / base[0]:.3f} | "
                  f"{output_error(W, q, H_out) / base[1]:.3f} |", flush=True)


if __name__ == "__main__":
    main()
