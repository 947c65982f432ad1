"""Uniform quantization of a model (default: the full-precision SmolLM2-135M stand-in): RTN vs GPTQ at int2/3/4 (group 128) and int8 per channel.

Every row is one `mixq quantize` run, exactly as a user would type it, with calibration text
sampled from the model (the data-free default) and evaluation on the first N windows of the text.
Writes bench/results/uniform.md.

    python bench/uniform.py --text ../shared/data/wikitext-2-raw/wiki.test.raw
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import tempfile
import sys
import time
from pathlib import Path

from mixq.data import WindowSpec, load_windows
from mixq.evaluate import evaluate
from mixq.export import native
from mixq.export.native import INFO_FILE, storage_plan
from mixq.models import load_model
from mixq.quantize import QuantizedModel
from mixq.report import markdown_table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import REFERENCE_LINE, SMOLLM2_STANDIN, commit, machine, model_name, reference, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = [(bits, "128", method) for bits in (2, 3, 4) for method in ("rtn", "gptq")]
CONFIGS += [(8, "channel", method) for method in ("rtn", "gptq")]


def reference_row(model: str, text: Path, n_windows: int, seq_len: int) -> list:
    """The unquantized model stored at 16 bits, measured against its fp32 self."""
    loaded = load_model(model)
    plan = storage_plan(loaded, {})
    bpw = 8 * sum(nb for _, _, nb in plan.values()) / loaded.n_weights
    windows = load_windows(loaded, WindowSpec(n_windows, seq_len, text), first=True)
    with tempfile.TemporaryDirectory() as tmp:  # every parameter at the width mixq keeps it at
        native.save(Path(tmp), loaded, QuantizedModel(), {"model": loaded.spec})
        r = evaluate(loaded, windows, native.NativeSource(Path(tmp)))
    return ["16-bit (none)", "-", bpw, r.ppl, r.kl_mean, r.kl_p99, r.top1, 0.0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", type=Path, required=True, help="evaluation text (WikiText-2 test)")
    parser.add_argument("--model", default=str(SMOLLM2_STANDIN),
                        help="the model to quantize (default: the SmolLM2 stand-in that bench/standin.py writes)")
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "bench-uniform")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "uniform.md")
    parser.add_argument("--resume", action="store_true", help="reuse runs in --runs already evaluated on these windows")
    args = parser.parse_args()

    start = time.perf_counter()
    rows = [reference_row(args.model, args.text, args.windows, args.seq_len)]
    commands, reused = [], 0
    for bits, group, method in CONFIGS:
        out = args.runs / f"int{bits}-{group}-{method}"
        cmd = ["mixq", "quantize", args.model, "--bits", str(bits), "--group-size", group, "--method", method,
               "--eval-text", str(args.text), "--eval-windows", str(args.windows), "--eval-len", str(args.seq_len),
               "--out", str(out), "--overwrite"]
        commands.append(shlex.join(cmd))
        eval_key = WindowSpec(args.windows, args.seq_len, args.text).describe()
        done = out / INFO_FILE
        if args.resume and done.exists() and eval_key in json.loads(done.read_text())["evaluations"]:
            reused += 1
        else:
            print("$", commands[-1], flush=True)
            subprocess.run([sys.executable, "-m", "mixq.cli", *cmd[1:]], check=True)
        info = json.loads(done.read_text())
        report = info["evaluations"][eval_key]
        rows.append([f"int{bits} g{group}" if group != "channel" else f"int{bits} per channel", method,
                     info["storage"]["bpw"], report["ppl"], report["kl_mean"], report["kl_p99"], report["top1"],
                     info["quantize_seconds"]])
        calibration = info["calibration"]

    headers = ["format", "method", "bpw (whole file)", "ppl", "KL mean", "KL p99", "top-1", "quantize s"]
    table = markdown_table(headers, rows)
    text = f"""# Uniform quantization: RTN vs GPTQ on {model_name(args.model)}

Command: `python bench/uniform.py --text {args.text} --model {args.model}` ({(time.perf_counter() - start) / 60:.0f} min in all{
    f"; {reused} of the runs reused from an earlier invocation with --resume" if reused else ""})

Machine: {machine()}; mixq at commit {commit()}

{REFERENCE_LINE}{reference(args.model)}.
- Calibration: {calibration}, the default of `mixq quantize`.
- Evaluation: the first {args.windows} non-overlapping windows of {args.seq_len} tokens of `{args.text.name}`;
  KL is KL(reference || quantized) per next token, top-1 the share of tokens where both rank the same token first.
- Quantized: every linear of the blocks; the tied embedding/output matrix stays fp16 and the norms fp32,
  all counted in bpw, which is 8 x (size of model.safetensors) / (number of weights).
- Asymmetric grids, fp16 scales, b-bit zero points; clipping search on; GPTQ with act-order, damp 0.01, true-sequential.

{table}
"""
    write_result(args.out, text, commands)


if __name__ == "__main__":
    main()
