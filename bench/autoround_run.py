"""Intel AutoRound (SignRound) as a baseline: quantize a Hugging Face model's block linears on the
given calibration token ids and write the dequantized (fake-quantized) weights.

Runs with the separate AutoRound environment's python, never mixq's: it imports nothing from mixq
and auto-round is no dependency of mixq.

    ~/.cache/mixq/autoround-venv/bin/python bench/autoround_run.py \
        --model ~/.cache/mixq/smollm2-135m-hf-fp32 --calib ~/.cache/mixq/smollm2-calib-s0-64x512.safetensors \
        --bits 4 --group-size 128 --iters 200 --batch-size 8 --out /tmp/ar-w4g128.safetensors

--calib holds one (nsamples, seqlen) int64 tensor under key "ids"; every row is one calibration
sample, used as is (nsamples and seqlen are its shape; nothing is downloaded or re-tokenized).
--out gets fp32 tensors named like `model.layers.0.self_attn.q_proj.weight`, one per quantized
linear; a JSON of the same stem records the settings and timings.

AutoRound's default on a bf16-capable CPU is to cast the model to bf16 and tune under autocast
("amp"); here the model stays fp32 unless --amp is given.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="Hugging Face model directory (loaded in fp32)")
    p.add_argument("--calib", required=True, help="safetensors file with an (n, seqlen) int64 tensor 'ids'")
    p.add_argument("--bits", type=int, required=True)
    p.add_argument("--group-size", type=int, required=True, help="input columns per scale; -1 = per channel")
    p.add_argument("--asym", action="store_true", help="asymmetric (zero point); default symmetric")
    p.add_argument("--iters", type=int, required=True, help="SignSGD steps per transformer block")
    p.add_argument("--batch-size", type=int, required=True, help="calibration samples per step")
    p.add_argument("--out", required=True, help="output .safetensors (a .json sidecar goes beside it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=None, help="rounding lr (AutoRound default: 1/iters)")
    p.add_argument("--minmax-lr", type=float, default=None, help="min/max scale lr (default: same as lr)")
    p.add_argument("--scale-dtype", default="fp16", choices=["fp16", "fp32", "bf16"],
                   help="dtype the scales are rounded to (AutoRound default fp16)")
    p.add_argument("--amp", action="store_true", help="AutoRound's default bf16 autocast tuning (off: fp32)")
    p.add_argument("--max-blocks", type=int, default=None,
                   help="quantize only the first K blocks (quick tests only)")
    args = p.parse_args(argv)
    if args.bits < 1 or args.bits > 8:
        p.error("--bits must be in 1..8")
    if args.iters < 1:
        p.error("--iters must be >= 1 (0 would be AutoRound's RTN path, not SignRound)")
    if args.batch_size < 1:
        p.error("--batch-size must be >= 1")
    return args


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _block_linears(model) -> tuple[str, list[str], dict[str, list[str]]]:
    """The decoder blocks' path and names, and each block's nn.Linear names (full module names)."""
    import torch

    blocks_path = "model.layers"
    blocks = model.get_submodule(blocks_path)
    names = [f"{blocks_path}.{i}" for i in range(len(blocks))]
    linears = {
        b: [f"{b}.{n}" for n, m in model.get_submodule(b).named_modules() if isinstance(m, torch.nn.Linear)]
        for b in names
    }
    return blocks_path, names, linears


def run(args: argparse.Namespace) -> dict:
    t_start = time.perf_counter()
    import torch
    from safetensors.torch import load_file, save_file

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never reach a hub
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    import auto_round
    import transformers
    from auto_round import AutoRound
    from auto_round.algorithms.quantization.sign_round.config import SignRoundConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _seed_everything(args.seed)

    ids = load_file(args.calib)["ids"]
    if ids.dim() != 2 or ids.dtype != torch.int64:
        raise SystemExit(f"{args.calib}: 'ids' must be a 2-D int64 tensor, got {tuple(ids.shape)} {ids.dtype}")
    nsamples, seqlen = ids.shape
    batch_size = min(args.batch_size, nsamples)

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)

    _, block_names, linears = _block_linears(model)
    chosen = block_names if args.max_blocks is None else block_names[: args.max_blocks]
    expected = [n for b in chosen for n in linears[b]]
    originals = {n: model.get_submodule(n).weight.detach().clone() for n in expected}

    # One dict per sample, exactly our token ids. A non-string dataset is iterated as is by
    # LLMCalibrator.calib (no download, no tokenization); our own attention mask keeps AutoRound from
    # deriving one from the tokenizer's pad id. AutoRound zeroes the mask's last position in place
    # (a workaround of theirs) and drops the last position (and any pad-id position) from the loss.
    dataset = [
        {"input_ids": ids[i : i + 1].clone(), "attention_mask": torch.ones(1, seqlen, dtype=torch.long)}
        for i in range(nsamples)
    ]
    pad_id = getattr(tokenizer, "pad_token_id", None)
    loss_dropped = nsamples + (int((ids[:, :-1] == pad_id).sum()) if pad_id is not None else 0)

    scheme = {"bits": args.bits, "group_size": args.group_size, "sym": not args.asym,
              "data_type": "int", "act_bits": 16}
    config = SignRoundConfig(iters=args.iters, lr=args.lr, minmax_lr=args.minmax_lr)
    ar = AutoRound(
        model,
        tokenizer=tokenizer,
        scheme=scheme,
        alg_configs=config,
        dataset=dataset,
        nsamples=nsamples,
        seqlen=seqlen,
        batch_size=batch_size,
        seed=args.seed,
        device_map="cpu",
        amp=args.amp,
        scale_dtype=args.scale_dtype,
        low_cpu_mem_usage=False,
        enable_torch_compile=False,
        to_quant_block_names=[chosen] if args.max_blocks is not None else None,
    )

    t_q = time.perf_counter()
    qmodel, layer_config = ar.quantize()
    seconds_quantize = time.perf_counter() - t_q

    quantized = sorted(
        n for n, c in layer_config.items() if int(c.get("bits", 16) or 16) <= 8
    )
    if sorted(expected) != quantized:
        extra = sorted(set(quantized) - set(expected))
        missing = sorted(set(expected) - set(quantized))
        raise SystemExit(f"AutoRound quantized an unexpected set of layers: extra {extra[:5]}, missing {missing[:5]}")

    out: dict[str, torch.Tensor] = {}
    for n in expected:
        m = qmodel.get_submodule(n)
        if not hasattr(m, "scale"):
            raise SystemExit(f"{n} has no scale after quantize(): not quantized in place")
        # WrapperLinear.unwrapper copies the best-loss qdq weight into weight.data.
        out[f"{n}.weight"] = m.weight.detach().to(torch.float32).contiguous().clone()

    cfg = ar.quantize_config
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(out_path, lambda p: save_file(out, str(p), metadata={"format": "pt"}))

    info = {
        "auto_round_version": auto_round.__version__,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "model": str(Path(args.model).resolve()),
        "calib": str(Path(args.calib).resolve()),
        "bits": args.bits,
        "group_size": args.group_size,
        "sym": not args.asym,
        "iters": args.iters,
        "batch_size": batch_size,
        "gradient_accumulate_steps": cfg.gradient_accumulate_steps,
        "nsamples": nsamples,
        "seqlen": seqlen,
        "lr": float(cfg.lr),
        "minmax_lr": float(cfg.minmax_lr),
        "enable_minmax_tuning": cfg.enable_minmax_tuning,
        "enable_quanted_input": cfg.enable_quanted_input,
        "not_use_best_mse": cfg.not_use_best_mse,
        "scale_dtype": args.scale_dtype,
        "amp": bool(ar.model_context.amp),
        "amp_dtype": str(ar.model_context.amp_dtype),
        "seed": args.seed,
        "blocks": len(chosen),
        "loss_positions_dropped": loss_dropped,
        "threads": torch.get_num_threads(),
        "seconds_quantize": round(seconds_quantize, 3),
        "seconds_total": None,
        "n_tensors": len(out),
        "changed_tensors": sum(int(not torch.equal(out[f"{n}.weight"], originals[n])) for n in expected),
    }
    info["seconds_total"] = round(time.perf_counter() - t_start, 3)
    json_path = out_path.with_suffix(".json")
    _atomic_write(json_path, lambda p: p.write_text(json.dumps(info, indent=2) + "\n"))
    return info


def main(argv: list[str] | None = None) -> int:
    info = run(parse_args(argv))
    print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
