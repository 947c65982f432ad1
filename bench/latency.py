"""mixq's plan under a decode-time limit against llama.cpp's files of equal or lower measured speed.

For each limit (the time per decoded token llama-bench measures on one of llama.cpp's files), mixq
plans the least-loss GGUF whose predicted time, from its latency table and engine fit, is within
it; that file is made, decoded by llama-bench and judged by llama-perplexity like every other. Each
mixq file is compared with the llama.cpp file of least KLD among those that decode at least as
fast as it measured, and its predicted time with its measured one.

Reference and everything shared with bench/vs_llama_cpp.py (the F32 reference, its logits, the
calibration text, the imatrix, llama.cpp's files and their KLD) are made or reused by its
functions in the same work folder. mixq's side: a profile over ggml's legacy, IQ4 and k-quant types
(vs_llama_cpp's shortcuts), a latency table of the profile's products timed with llama.cpp's
kernels (`mixq bench-device`), fitted on llama.cpp's files decoded by llama-bench.

    python bench/latency.py --text ../shared/data/wikitext-2-raw/wiki.test.raw                 # Qwen stand-in
    python bench/latency.py --text ... --model ~/.cache/mixq/standins/smollm2-135m/smollm2-135m-standin-f32.gguf

Run it on a quiet machine: the timings are the result. Cached per file (decode times per thread
count), so a stopped run resumes; bench/results/latency.md is rewritten at the end.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import REFERENCE_LINE, commit, machine, model_name, reference, write_result  # noqa: E402
from vs_llama_cpp import (  # noqa: E402  (the head-to-head's reference, files and judge)
    llama_bin, llama_files, measure, mixq_gguf, mixq_profile, prepare, ratio_interval, reference_arguments,
)

ROOT = Path(__file__).resolve().parent.parent
# llama.cpp's files (each with the imatrix), and the ones whose measured time is a limit for mixq
LLAMA_TYPES = ("Q3_K_S", "Q3_K_M", "Q4_0", "IQ4_NL", "IQ4_XS", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K",
               "Q8_0")
LIMIT_TYPES = ("Q3_K_M", "Q4_K_M", "Q5_K_M")
FORMATS = ("q3_k", "q4_0", "iq4_nl", "iq4_xs", "q4_k", "q5_0", "q5_k", "q6_k", "q8_0")
TARGET_RATIO = 0.7  # mixq's KLD over the best llama.cpp file at least as fast (issue 17)


def decode_time(gguf: Path, work: Path, threads: int) -> float:
    """llama-bench's seconds per decoded token of `gguf` (cached per file and thread count)."""
    from mixq.export.llama_cpp import decode_seconds

    cached = work / "decode" / f"{gguf.name}.t{threads}.json"
    if cached.is_file():
        return json.loads(cached.read_text())["seconds"]
    seconds = decode_seconds(gguf, threads, tokens=64, repeats=5)
    cached.parent.mkdir(exist_ok=True)
    cached.write_text(json.dumps(dict(file=gguf.name, threads=threads, seconds=seconds)))
    return seconds


def latency_table(path: Path, profile, llama: list[Path], threads: int):
    """The profile's products timed with llama.cpp's kernels, fitted on llama.cpp's files (cached)."""
    from mixq.export import get_target
    from mixq.latency import LatencyTable, fit_engine, measure as time_products, model_bytes, profile_allowed
    from mixq.latency import profile_cases

    kernels = get_target("gguf").kernels
    if path.is_file():
        table = LatencyTable.load(path)
        table.check_machine(kernels)
        return table, kernels
    table = time_products(profile_cases(profile, kernels), kernels, threads, 5, "gguf",
                          model_bytes(profile.nbytes, profile_allowed(profile)))
    table.fit = fit_engine(table, llama, kernels, repeats=5)
    table.save(path)
    return table, kernels


def main() -> None:
    ap = reference_arguments(__doc__.splitlines()[0])
    ap.add_argument("--llama-types", nargs="+", default=LLAMA_TYPES)
    ap.add_argument("--limits", nargs="+", default=LIMIT_TYPES, help="llama.cpp types whose decode time is a limit")
    args = ap.parse_args()
    args.plain_types = []  # llama_files: imatrix files only (llama.cpp's strongest)
    start = time.time()
    binp = llama_bin()
    work, reference_path, imatrix = prepare(args, binp)
    llama_files(args, work, binp, reference_path, imatrix, lambda: None)
    loaded, profile = mixq_profile(work / "mixq-latency.profile", reference_path, args.calib_windows, FORMATS)
    llama = [work / f"llama-{t}-imatrix.gguf" for t in args.llama_types
             if (work / f"llama-{t}-imatrix.gguf").is_file()]
    rows = []
    for f in llama:
        row = measure(binp, work, f, args.text, args.chunks, args.threads)
        rows.append(dict(row, maker="llama.cpp", kind=f.stem.split("-")[1], seconds=decode_time(f, work, args.threads)))

    from mixq.latency import decode_limit
    from mixq.plan import Budget, InfeasibleLimits, plan_for_budget

    refused = []
    table, kernels = latency_table(work / f"latency-t{args.threads}.json", profile, llama, args.threads)
    for kind in args.limits:
        bound = next(r["seconds"] for r in rows if r["kind"] == kind)
        limit = decode_limit(profile, table, kernels, bound)
        try:
            plan = plan_for_budget(profile, Budget(16.0, "bpw"), "hessian+kl", [limit])
        except InfeasibleLimits as e:  # faster than any plan over mixq's options here: said in the table
            refused.append(f"- At {kind}'s speed ({bound * 1e3:.2f} ms/token): {e}.")
            continue
        digest = hashlib.sha256(json.dumps(plan.options, sort_keys=True).encode()).hexdigest()[:8]
        out = work / f"mixq-at-{kind}-speed-t{args.threads}-{digest}.gguf"  # a new table may plan anew
        if not out.is_file():
            mixq_gguf(loaded, profile, plan, out, work)
        row = measure(binp, work, out, args.text, args.chunks, args.threads, into="measured-latency")
        rows.append(dict(row, maker="mixq", kind=kind, limit=bound, predicted=plan.limited[limit.name],
                         seconds=decode_time(out, work, args.threads)))
    write_report(args, work, rows, refused, table, reference_path, start)


def write_report(args, work: Path, rows: list[dict], refused: list[str], table, reference_path: Path,
                 start: float) -> None:
    from mixq.latency import show_seconds
    from mixq.report import markdown_table

    def ms(seconds: float) -> str:
        return f"{seconds * 1e3:.2f}"

    theirs = sorted((r for r in rows if r["maker"] == "llama.cpp"), key=lambda r: r["seconds"])
    ours = [r for r in rows if r["maker"] == "mixq"]
    files = markdown_table(
        ["maker", "file", "bytes", "bpw", "measured ms/token", "tok/s", "mean KLD", "same top", "PPL"],
        [[r["maker"], r["kind"] if r["maker"] == "llama.cpp" else f"at {r['kind']}'s speed", r["bytes"],
          f"{8 * r['bytes'] / r['n_weights']:.3f}", ms(r["seconds"]), f"{1 / r['seconds']:.1f}", f"{r['kld']:.5f}",
          f"{r['same_top']:.4f}", f"{r['ppl']:.4f}"] for r in sorted(rows, key=lambda r: r["seconds"])])
    versus = []
    for r in ours:
        faster = [t for t in theirs if t["seconds"] <= r["seconds"]]
        best = min(faster, key=lambda t: t["kld"]) if faster else None
        ratio = r["kld"] / best["kld"] if best else None
        versus.append([
            f"{r['kind']} ({ms(r['limit'])})", ms(r["predicted"]), ms(r["seconds"]),
            f"{r['predicted'] / r['seconds'] - 1:+.1%}", f"{r['kld']:.5f}",
            f"{best['kind']} ({ms(best['seconds'])})" if best else "none as fast",
            f"{best['kld']:.5f}" if best else "", f"{ratio:.3f}" if ratio else "",
            ratio_interval(work, r, best) if best else "", ("yes" if ratio <= TARGET_RATIO else "no") if ratio else ""])
    fit = table.fit
    command = "python bench/latency.py " + shlex.join(sys.argv[1:])
    text = "\n".join([
        f"# Decode speed: mixq under a time limit vs llama.cpp's files on {model_name(str(reference_path))}",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine()}; llama.cpp timings with {args.threads} threads; commit {commit()}; "
        f"{time.time() - start:.0f} s in the last invocation (finished files and measurements are reused).",
        "",
        REFERENCE_LINE + reference(str(reference_path)) + ".",
        f"- Speed: llama-bench, 64 decoded tokens x 5 repeats, {args.threads} threads. Quality: llama-perplexity, "
        f"{args.chunks} chunks x 512 tokens of WikiText-2 test, KL divergence to the reference's logits.",
        f"- llama.cpp's files: each type with the imatrix (llama-imatrix on {args.calib_windows} x 512 tokens "
        "sampled from the reference by mixq).",
        f"- mixq: the exact plan of least predicted loss whose predicted time per token is within the limit (no "
        f"byte limit), over {', '.join(f.upper() for f in FORMATS)} or F16, profiled and quantized as in "
        "bench/vs_llama_cpp.py (one-shot RTN with diag(H)). Its latency table times every product of the profile "
        f"with llama.cpp's kernels ({len(table.seconds)} cases, streaming {table.stream_bytes / 1e6:,.0f} MB of "
        f"weights); the engine fit on the llama.cpp files below is measured = {fit.scale:.3f} x products + "
        f"{fit.overhead * 1e3:.3f} ms (worst fitted error on them "
        f"{max(abs(fit.predict(p) / m - 1) for _, p, m in fit.points):.1%}).",
        "",
        files,
        "",
        f"Each mixq file against the llama.cpp file of least KLD among those measured at least as fast (target: "
        f"KLD ratio <= {TARGET_RATIO}; its 95% interval bootstraps both files' per-chunk KLDs over the {args.chunks} "
        "chunks together), and mixq's predicted time against its measured one (target: within 10%):",
        "",
        markdown_table(["limit (llama.cpp type's ms)", "mixq predicted ms", "mixq measured ms", "predicted error",
                        "mixq KLD", "best llama.cpp as fast", "its KLD", "ratio", "ratio 95% interval",
                        f"<= {TARGET_RATIO}"], versus),
        "",
        *refused,
        "",
        f"Fastest llama.cpp file: {theirs[0]['kind']} at {show_seconds(theirs[0]['seconds'])}." if theirs else "",
    ])
    write_result(ROOT / "bench" / "results" / "latency.md", text, [command])


if __name__ == "__main__":
    main()
