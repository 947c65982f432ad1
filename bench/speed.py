"""Speed of the stages that dominate a run, each against the way it was done before, in one run.

    python bench/speed.py --text ../shared/data/wikitext-2-raw/wiki.test.raw

On SmolLM2-135M (the embedded default model):
- sampling calibration text (the data-free default): transformers' own decoding (float32 weights,
  `DynamicCache`, SDPA attention, one token per step for a batch of windows) against mixq's
  (`mixq.decode`: weights in the device's fast precision, a preallocated cache and a one-token
  attention), both drawing with `mixq.data.draw`, on the same batch; and mixq's decoding in the
  other precision;
- within mixq's decoding, drawing the tokens: one float64 inversion of each row's distribution
  over the whole vocabulary (before) against `mixq.data.draw`'s inversion by chunks, from the same
  uniform numbers (the windows drawn are compared);
- one block over a batch of windows, float32 against bfloat16 matmuls (`BlockRunner`'s
  `matmul_dtype`), averaged over every block;
- capture's H += x^T x over one batch (random rows, as many as the block pass's tokens) for each
  input width of the model and Qwen2.5-1.5B's 8960-wide down_proj: one whole product against
  `capture.add_gram`'s panels (and whether their bits agree);
- one measured KL point of the profile: the full-vocabulary sum over the reference's stored
  log-probabilities (what the profile did before) against `KLToReference`, timed on the KL alone
  (the remaining blocks are the same for both), and the two values compared on real points (every
  matrix of three blocks quantized alone to int3-g128 and int4-g128 by RTN);
- the blocks after a point's own block: float32 forwards against replaying them from the
  reference run's tapes with bfloat16 differences (`runner.LinearTape`), timed per block and
  compared on the same points.

"now" is what mixq does on this machine: its passes multiply in `runner.fast_matmul_dtype` (bfloat16
only where the CPU has it in hardware) and its KL points run taped only there (`profile.tapes_fit`);
"before" is the other way, which mixq did before it chose (bfloat16 passes and tapes on any CPU, or
float32 passes before bfloat16 ones came in).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("TQDM_DISABLE", "1")  # read when tqdm is imported

from provenance import commit, machine  # noqa: E402

from mixq.atomic import atomic_write_text  # noqa: E402
from mixq.report import markdown_table  # noqa: E402


def timed(fn, repeats: int = 1) -> tuple[float, object]:
    """Seconds per call (the best of `repeats`) and the last result."""
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def precisions() -> tuple[torch.dtype, torch.dtype]:
    """(the precision mixq's passes take on this CPU, the other one)."""
    from mixq.runner import fast_matmul_dtype

    picked = fast_matmul_dtype("cpu")
    return picked, torch.float32 if picked == torch.bfloat16 else torch.bfloat16


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def decode_transformers(loaded, n: int, seq_len: int, seed: int) -> torch.Tensor:
    """transformers' own cached decoding loop in float32, drawing as mixq does."""
    from transformers import DynamicCache

    from mixq.data import draw
    from mixq.decode import cache_argument
    from mixq.models import materialize

    model = materialize(loaded, dtype=torch.float32)
    model.set_attn_implementation("sdpa")
    gen = torch.Generator().manual_seed(seed)
    bos = loaded.tokenizer.bos_token_id
    ids = torch.full((n, seq_len), bos if bos is not None else loaded.tokenizer.eos_token_id)
    kwarg = cache_argument(model)
    with torch.no_grad():
        cache = DynamicCache()
        for pos in range(1, seq_len):
            ids[:, pos] = draw(model(ids[:, pos - 1 : pos], use_cache=True, **{kwarg: cache}).logits[:, -1], gen)
    return ids


def draw_whole_vocabulary(logits: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """How tokens were drawn before: one float64 inversion over the whole vocabulary."""
    z = logits.double() - logits.max(dim=-1, keepdim=True).values
    cdf = torch.where(z > -80, z.exp(), 0.0).cumsum(dim=-1)
    u = torch.rand(len(cdf), 1, dtype=torch.float64, generator=gen) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=cdf.shape[1] - 1)


def sampling_rows(loaded, n: int, seq_len: int) -> list[list]:
    """transformers' decoding loop against mixq's; then mixq's with tokens drawn as before (one
    float64 inversion over the whole vocabulary) against now (by chunks), from the same uniform
    numbers. Each sampling call gets an empty cache directory."""
    from mixq import data

    tokens = n * (seq_len - 1)
    base_s, _ = timed(lambda: decode_transformers(loaded, n, seq_len, seed=0))

    picked, other = precisions()

    def sample(draw, dtype: torch.dtype = picked) -> tuple[float, float, torch.Tensor]:
        """Seconds of the whole sampling in `dtype`, seconds inside `draw`, and the windows drawn."""
        chosen, inside = data.draw, []

        def timed_draw(logits, gen):
            start = time.perf_counter()
            tokens = draw(logits, gen)
            inside.append(time.perf_counter() - start)
            return tokens

        with tempfile.TemporaryDirectory() as cache:
            data.CACHE_DIR, data.draw = Path(cache), timed_draw
            try:
                seconds, ids = timed(lambda: data.sample_windows(loaded, n, seq_len, seed=0, batch_size=n,
                                                                 dtype=dtype))
            finally:
                data.draw = chosen
        return seconds, sum(inside), ids

    mixq_s, draw_s, ids = sample(data.draw)
    other_s, _, _ = sample(data.draw, other)
    whole_s, whole_draw_s, ids_whole = sample(draw_whole_vocabulary)
    same = int((ids == ids_whole).sum())
    return [["sampling", f"{n} x {seq_len} tokens, one batch", "transformers float32, DynamicCache, SDPA",
             f"{base_s:.1f} s ({tokens / base_s:.0f} tok/s)", f"mixq.decode {dtype_name(picked)}",
             f"{mixq_s:.1f} s ({tokens / mixq_s:.0f} tok/s)", f"{base_s / mixq_s:.2f}x"],
            ["sampling: precision", "the same", f"mixq.decode {dtype_name(other)}",
             f"{other_s:.1f} s ({tokens / other_s:.0f} tok/s)", f"mixq.decode {dtype_name(picked)}",
             f"{mixq_s:.1f} s ({tokens / mixq_s:.0f} tok/s)", f"{other_s / mixq_s:.2f}x"],
            ["sampling: drawing the tokens", "the same; time inside the draws (whole sampling)",
             "float64 inversion, whole vocabulary", f"{whole_draw_s:.1f} s ({whole_s:.1f} s)",
             f"inversion by chunks of 1024 (same token at {same} of {ids.numel()} places)",
             f"{draw_s:.1f} s ({mixq_s:.1f} s)", f"{whole_draw_s / draw_s:.2f}x"]]


def block_rows(loaded, windows: torch.Tensor) -> list[list]:
    from mixq.runner import BlockRunner

    seconds = {}
    for dtype in (torch.float32, torch.bfloat16):
        runner = BlockRunner(loaded, dtype)
        batches = runner.embed(windows, len(windows))
        runner.run(0, loaded.block_weights(0), batches)  # warm-up: oneDNN picks its kernels
        total = 0.0
        for b in range(loaded.n_blocks):
            weights = loaded.block_weights(b)
            s, out = timed(lambda: runner.run(b, weights, batches), repeats=2)
            total += s
            if dtype == torch.float32:
                batches = out  # each block on its true input (bfloat16 timed on the same inputs)
        seconds[dtype] = total / loaded.n_blocks
    picked, other = precisions()
    label = {torch.float32: "float32 matmuls", torch.bfloat16: "bfloat16 matmuls (autocast)"}
    return [["one block pass", f"{windows.numel()} tokens, mean of {loaded.n_blocks} blocks", label[other],
             f"{seconds[other] * 1e3:.0f} ms", label[picked], f"{seconds[picked] * 1e3:.0f} ms",
             f"{seconds[other] / seconds[picked]:.2f}x"]]


def gram_rows(loaded, tokens: int, extra_widths: tuple[int, ...]) -> list[list]:
    """H += x^T x over one batch of `tokens` random rows, per distinct matrix input width of the
    model and of `extra_widths`: one product (before) against capture's panels."""
    from mixq.capture import add_gram

    widths = sorted({loaded.plannable()[stage[0]].shape[1] for b in range(loaded.n_blocks)
                     for stage in loaded.block_stages(b)})
    rows = []
    for cols in widths + [c for c in extra_widths if c not in widths]:
        x = torch.randn(tokens, cols, generator=torch.Generator().manual_seed(cols))
        whole, panels = torch.zeros(cols, cols), torch.zeros(cols, cols)
        before, _ = timed(lambda: whole.addmm_(x.T, x), repeats=5)
        now, _ = timed(lambda: add_gram(panels, x), repeats=5)
        whole.zero_().addmm_(x.T, x)
        panels.zero_()
        add_gram(panels, x)
        same = "the same bits" if torch.equal(whole, panels) else \
            f"max relative difference {((whole - panels).abs().max() / whole.abs().max()).item():.1e}"
        where = "" if cols in widths else " (not this model's: Qwen2.5-1.5B's down_proj)"
        rows.append([f"H += x^T x, {cols} columns{where}", f"{tokens} tokens; {same}", "one product",
                     f"{before * 1e3:.0f} ms", "panels (`capture.add_gram`)", f"{now * 1e3:.0f} ms",
                     f"{before / now:.2f}x"])
    return rows


def kl_rows(loaded, windows: torch.Tensor) -> tuple[list[list], list[list]]:
    """Times of one KL point's two parts, before and after, and the values both ways on real points."""
    from mixq.formats import parse_format
    from mixq.methods import MethodSettings, get_method
    from mixq.profile import KLToReference, tapes_fit
    from mixq.runner import BlockRunner

    runner = BlockRunner(loaded)
    hidden, tapes = [runner.embed(windows, len(windows))], []
    for b in range(loaded.n_blocks):
        out, tape = runner.run_taped(b, loaded.block_weights(b), hidden[-1])
        hidden.append(out)
        tapes.append(tape)
    reference_log_probs = [torch.cat([F.log_softmax(runner.logits(h.reshape(-1, h.shape[-1])[s]), -1)
                                      for s in runner.token_chunks(h)]) for h in hidden[-1]]
    n_tokens = windows.numel()

    def kl_full(final: list[torch.Tensor]) -> float:
        total = 0.0
        for ref, h in zip(reference_log_probs, final):
            flat = h.reshape(-1, h.shape[-1])
            log_q = torch.cat([F.log_softmax(runner.logits(flat[s]), -1) for s in runner.token_chunks(h)])
            total += (ref.exp() * (ref - log_q)).sum().item()
        return max(total, 0.0) / n_tokens

    def later_blocks(start: int, x: list[torch.Tensor], taped: bool) -> list[torch.Tensor]:
        for b in range(start + 1, loaded.n_blocks):
            weights = loaded.block_weights(b)
            x = runner.run_from_tapes(b, weights, [x], tapes[b])[0] if taped else runner.run(b, weights, x)
        return x

    setup_s, kl_terms = timed(lambda: KLToReference(runner, hidden[-1]))
    values = []
    times = {"full": [], "terms": [], "float32": [], "taped": []}
    blocks_run = 0
    starts = [0, loaded.n_blocks // 2, loaded.n_blocks - 1]
    for start in starts:
        weights = loaded.block_weights(start)
        prefix = loaded.layout.block_prefix(start)
        for name, ref in loaded.block_tensors(start).items():
            W = ref.view(weights, prefix).float()
            for fmt in ("int3-g128", "int4-g128"):
                q = get_method("rtn")(W, torch.eye(W.shape[1]), parse_format(fmt), MethodSettings())
                trial = dict(weights)
                key = ref.param.removeprefix(prefix)
                trial[key] = weights[key].clone()
                ref.view(trial, prefix).copy_(q.dequantize())
                first = runner.run(start, trial, hidden[start])
                f32_s, final = timed(lambda: later_blocks(start, first, taped=False))
                taped_s, final_taped = timed(lambda: later_blocks(start, first, taped=True))
                blocks_run += loaded.n_blocks - 1 - start
                full_s, full = timed(lambda: kl_full(final))
                terms_s, terms = timed(lambda: kl_terms(final))
                taped = kl_terms(final_taped)
                for k, v in (("full", full_s), ("terms", terms_s), ("float32", f32_s), ("taped", taped_s)):
                    times[k].append(v)
                values.append([name.removeprefix("model.layers."), fmt, f"{full:.6f}", f"{terms:.6f}",
                               f"{abs(terms - full) / full:.1e}", f"{taped:.6f}", f"{(taped - terms) / terms:+.1e}"])
    full_s, terms_s = (sum(v) / len(v) for v in (times["full"], times["terms"]))
    per_block = {k: sum(times[k]) / blocks_run for k in ("float32", "taped")}
    label = {"float32": "float32 forward", "taped": "replayed from the reference's tapes (bfloat16 differences)"}
    now = "taped" if tapes_fit(loaded, n_tokens, torch.device("cpu")) else "float32"
    before = "float32" if now == "taped" else "taped"
    rows = [["KL of one profile point", f"{n_tokens} tokens, vocabulary {loaded.vocab_size}, mean of {len(values)}",
             "stored log-probs, full-vocabulary sum", f"{full_s:.2f} s", "KLToReference",
             f"{terms_s:.2f} s (+{setup_s:.1f} s once)", f"{full_s / terms_s:.2f}x"],
            ["one block after a KL point's own", f"{n_tokens} tokens, mean of {blocks_run} blocks run by the "
             f"{len(values)} points", label[before], f"{per_block[before] * 1e3:.0f} ms",
             label[now], f"{per_block[now] * 1e3:.0f} ms", f"{per_block[before] / per_block[now]:.2f}x"]]
    return rows, values


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--text", type=Path, required=True)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--windows", type=int, default=4, help="windows of --seq-len tokens for blocks and KL")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--sample", default="64x128", help="sampled windows x tokens (default 64x128)")
    ap.add_argument("--gram-widths", type=int, nargs="*", default=[8960],
                    help="input widths timed for H besides the model's own (default: Qwen2.5-1.5B's down_proj)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "speed.md")
    args = ap.parse_args()

    from mixq.data import WindowSpec, load_windows
    from mixq.models import load_model

    loaded = load_model(args.model)
    windows = load_windows(loaded, WindowSpec(args.windows, args.seq_len, args.text))
    n, seq = (int(v) for v in args.sample.split("x"))
    rows = sampling_rows(loaded, n, seq) + block_rows(loaded, windows) + gram_rows(
        loaded, windows.numel(), tuple(args.gram_widths))
    kl, values = kl_rows(loaded, windows)
    rows += kl
    command = "python bench/speed.py " + " ".join(a if " " not in a else repr(a) for a in sys.argv[1:])
    text = "\n".join([
        "# Speed of the dominant stages, against the way each was done before",
        "",
        f"- Command: `{command}`",
        f"- Made at commit {commit()}",
        f"- Machine: {machine()}",
        f"- Model: {args.model}; windows: the first {args.windows} x {args.seq_len} tokens of {args.text.name}",
        "- Baselines measured in the same run (the `before` columns); the KL of a point is timed on",
        "  the KL alone: the blocks after the quantized one run the same way for both.",
        f"- mixq's choice on this machine (`now`): passes in {dtype_name(precisions()[0])} "
        "(`runner.fast_matmul_dtype`); `before`: the other way.",
        "",
        markdown_table(["stage", "work", "before", "before time", "now", "now time", "speed-up"], rows),
        "",
        "## The KL of a point, every way, on real points",
        "",
        "Every matrix of three blocks quantized alone (RTN) to int3-g128 and int4-g128; the rest of",
        "the model as it was. The first three KLs run the later blocks in float32: by the",
        "full-vocabulary sum (before) and by `KLToReference` (now), `relative difference` being",
        "|now - before| / before; `KL taped` runs them from the reference's tapes (`runner.LinearTape`,",
        "what the profile does where bfloat16 products are fast) and `change` is its signed relative",
        "difference to `KL now`.",
        "",
        markdown_table(["tensor", "format", "KL before", "KL now", "relative difference", "KL taped", "change"],
                       values),
        "",
    ])
    atomic_write_text(args.out, text)
    print(text)


if __name__ == "__main__":
    main()
