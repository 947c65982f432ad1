"""Models in: load time, peak resident memory, time per block and KL at int4-g128 GPTQ, per model.

    python bench/models.py --text ../shared/data/wikitext-2-raw/wiki.test.raw

Each measurement runs in a fresh child process, so its peak RSS (getrusage ru_maxrss) is its own:
- `transformers`: the baseline, the whole model loaded by transformers in float32 (what mixq did
  before its runner): load time and peak RSS;
- `mixq`: `load_model` (skeleton, embedding and head) then `quantize_model` int4-g128 GPTQ over the
  calibration windows and `evaluate` against the reference, streamed one block at a time; peak RSS
  of the whole job.
Calibration: random windows (seed 0) of the second half of --text; evaluation: its first windows,
which lie in the first half. (The data-free default, text sampled from the model, would take most
of an hour to sample for the 1.5B model on this CPU.) Tiny random models of every tested family
(built as the tests build them) run on a small word text.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

from provenance import commit, machine  # noqa: E402

from mixq.atomic import atomic_write_text  # noqa: E402
from mixq.report import markdown_table  # noqa: E402


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_transformers(model: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from mixq.models import _resolve

    _, location, gguf_file = _resolve(model)
    start = time.perf_counter()
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    m = AutoModelForCausalLM.from_pretrained(str(location), dtype=torch.float32, **kwargs)
    return dict(load_s=time.perf_counter() - start, peak_rss_mib=peak_rss_mib(),
                n_weights=sum(p.numel() for p in m.parameters()))


def child_mixq(model: str, calib: dict, eval_text: str, eval_windows: int, eval_len: int) -> dict:
    import torch

    from mixq.data import WindowSpec, load_windows
    from mixq.evaluate import evaluate
    from mixq.export import native
    from mixq.formats.integer import IntFormat
    from mixq.models import load_model
    from mixq.options import Option
    from mixq.quantize import quantize_model, uniform_plan

    start = time.perf_counter()
    loaded = load_model(model)
    load_s = time.perf_counter() - start
    rss_loaded = peak_rss_mib()
    windows = load_windows(loaded, WindowSpec(calib["windows"], calib["seq_len"], Path(calib["text"]), 0), first=False)
    plan = uniform_plan(loaded, Option(IntFormat(4, 128).name, "gptq"))
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        result = quantize_model(loaded, windows, plan, spool=Path(tmp) / "spool")  # as `mixq quantize` does
        quantize_s = time.perf_counter() - start
        storage = native.save(Path(tmp), loaded, result, {"model": loaded.spec})
        del result
        eval_ids = load_windows(loaded, WindowSpec(eval_windows, eval_len, Path(eval_text)), first=True)
        report = evaluate(loaded, eval_ids, native.NativeSource(Path(tmp)))
    return dict(load_s=load_s, rss_after_load_mib=rss_loaded, peak_rss_mib=peak_rss_mib(),
                n_blocks=loaded.n_blocks, n_weights=loaded.n_weights, quantize_s=quantize_s,
                block_s=quantize_s / loaded.n_blocks, bpw=storage.bpw, kl_mean=report.kl_mean, ppl=report.ppl,
                eval_s=report.seconds, threads=torch.get_num_threads(), eval_windows=list(eval_ids.shape))


def child_imports() -> dict:
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import mixq.models  # noqa: F401

    return dict(peak_rss_mib=peak_rss_mib())


def run_child(kind: str, **kwargs) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(dict(kind=kind, **kwargs))],
                         capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"{kind} {kwargs.get('model')}: {out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def tiny_models(work: Path) -> dict[str, str]:
    import torch
    from conftest import FAMILY_CONFIGS, make_text, save_tiny_model

    (work / "words.txt").write_text(make_text(20000))
    return {f: str(save_tiny_model(work / f, f, dtype=torch.bfloat16)) for f in FAMILY_CONFIGS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--text", type=Path, help="evaluation text (WikiText-2 test)")
    parser.add_argument("--models", default="smollm2-135m,qwen2.5-1.5b,tiny",
                        help="smollm2-135m, qwen2.5-1.5b (the shipped Q4_K_M GGUF), tiny (every family), or paths")
    parser.add_argument("--calib-windows", type=int, default=32)
    parser.add_argument("--eval-windows", type=int, default=20)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "models.md")
    args = parser.parse_args()
    if args.child:
        job = json.loads(args.child)
        kind = job.pop("kind")
        children = {"transformers": child_transformers, "mixq": child_mixq, "imports": child_imports}
        print(json.dumps(children[kind](**job)))
        return
    if args.text is None:
        parser.error("--text is required")
    start = time.time()
    interpreter_mib = run_child("imports")["peak_rss_mib"]
    rows = []
    work = Path(tempfile.mkdtemp(prefix="mixq-bench-models-"))
    text = args.text.read_text(encoding="utf-8")
    calib_text = work / "calibration.txt"
    calib_text.write_text(text[len(text) // 2 :], encoding="utf-8")
    names = args.models.split(",")
    models: list[tuple[str, str, dict]] = []
    for name in names:
        if name == "tiny":
            words = str(work / "words.txt")
            models += [(f"tiny {f}", path, dict(windows=16, seq_len=128, text=words, eval_text=words, eval_windows=4,
                                                eval_len=128)) for f, path in tiny_models(work).items()]
        else:
            path = name
            if name == "qwen2.5-1.5b":
                from vs_llama_cpp import qwen_gguf

                path = str(qwen_gguf())
            models.append((name, path, dict(windows=args.calib_windows, seq_len=512, text=str(calib_text),
                                            eval_text=str(args.text), eval_windows=args.eval_windows, eval_len=512)))
    for label, path, c in models:
        calib = dict(windows=c["windows"], seq_len=c["seq_len"], text=c["text"])
        base = run_child("transformers", model=path)
        ours = run_child("mixq", model=path, calib=calib, eval_text=c["eval_text"], eval_windows=c["eval_windows"],
                         eval_len=c["eval_len"])
        fp32_mib = 4 * ours["n_weights"] / 2**20
        rows.append([label, ours["n_blocks"], f"{fp32_mib:.0f}", f"{base['load_s']:.1f}", f"{base['peak_rss_mib']:.0f}",
                     f"{ours['load_s']:.1f}", f"{ours['rss_after_load_mib']:.0f}", f"{ours['peak_rss_mib']:.0f}",
                     f"{100 * ours['peak_rss_mib'] / fp32_mib:.0f}%" if fp32_mib >= 100 else "-", f"{ours['block_s']:.2f}",
                     f"{ours['bpw']:.3f}", f"{ours['kl_mean']:.4g}", f"{ours['ppl']:.3f}"])
        print(markdown_table(HEADERS, rows[-1:]), flush=True)
        write(args, rows, interpreter_mib, start)


HEADERS = ["model", "blocks", "fp32 MiB", "transformers load s", "transformers peak RSS MiB", "mixq load s",
           "mixq RSS after load MiB", "mixq peak RSS MiB", "peak / fp32", "quantize s per block", "bpw",
           "KL mean", "ppl"]


def write(args, rows, interpreter_mib: float, start) -> None:
    text = f"""# Models in: memory, time and quality through the block runner

- Command: `python bench/models.py --text {args.text} --models {args.models}`
- Made at commit {commit()}
- Machine: {machine()}, torch threads as set by default
- Reference: each model's own weights (the shipped GGUF files dequantized: SmolLM2's Q4_1 and
  Qwen2.5-Coder-1.5B-Instruct's Q4_K_M; tiny random models in bf16 safetensors).
- Baseline measured in the same run: the whole model loaded by transformers in float32
  (`from_pretrained(..., dtype=float32)`), what mixq did before the runner, in its own process.
- mixq: int4-g128 GPTQ on every block matrix, calibration {args.calib_windows} x 512 tokens at random
  offsets in the second half of the text (tiny models: 16 x 128 of a word text), then KL to the
  reference on the first {args.eval_windows} x 512 tokens of the text (tiny: 4 x 128), both streamed
  one block at a time, finished blocks spooled to disk as `mixq quantize` does (its default passes:
  bfloat16 matmuls, float32 statistics). Peak RSS is the child
  process's ru_maxrss over load, quantization, save and evaluation (it would count mapped file pages
  too; mixq releases those after reading each tensor). A process that only imports
  torch, transformers and mixq peaks at {interpreter_mib:.0f} MiB; "peak / fp32" is left out where
  that dominates (models under 100 MiB in float32).

{markdown_table(HEADERS, rows)}

Written in {time.time() - start:.0f} s.
"""
    atomic_write_text(args.out, text)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
