"""Layer-wise calibration (default: the full-precision SmolLM2-135M stand-in): RTN, GPTQ, coordinate
descent, adaquant and block reconstruction (and ablations of them, by name with --rows), against
Intel AutoRound at the same bits, group size and calibration tokens, at 25 and 200 (its default) iterations.

mixq rows are `mixq quantize` runs as a user types them; AutoRound runs in its own environment
(bench/autoround_run.py with ~/.cache/mixq/autoround-venv/bin/python; auto-round is no dependency of
mixq) on the very token ids mixq calibrates on, and its dequantized weights are evaluated here on
the same windows against the same reference. Rows run in the order given and are reused with
--resume, so the table can be built over several invocations. Writes bench/results/calibration.md.

    python bench/calibration.py --text ../shared/data/wikitext-2-raw/wiki.test.raw

Bias correction needs linears with biases (Qwen2's q/k/v), so its rows run only when named:

    python bench/calibration.py --text ../shared/data/wikitext-2-raw/wiki.test.raw --model QWEN.gguf \
        --bits 3 --rows rtn "rtn + bias correction" --runs runs/bench-bias --out bench/results/bias_correction.md
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from safetensors.torch import load_file, save_file

from mixq.data import CACHE_DIR, WindowSpec, load_windows
from mixq.evaluate import evaluate
from mixq.export.native import INFO_FILE, storage_plan
from mixq.models import load_model, materialize
from mixq.models.source import WeightSource
from mixq.report import markdown_table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import REFERENCE_LINE, SMOLLM2_STANDIN, commit, machine, model_name, reference, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
AUTOROUND_PYTHON = CACHE_DIR / "autoround-venv" / "bin" / "python"
# (name, extra `mixq quantize` flags) in the order they run and are listed; "autoround" rows run AutoRound instead.
ROWS = [
    ("rtn", ["--method", "rtn"]),
    ("rtn + norm tuning", ["--method", "rtn", "--norm-tuning"]),
    ("gptq", ["--method", "gptq"]),
    ("gptq + norm tuning", ["--method", "gptq", "--norm-tuning"]),
    ("cd", ["--method", "cd"]),
    ("adaquant", ["--method", "adaquant"]),
    ("adaquant + norm tuning", ["--method", "adaquant", "--norm-tuning"]),
    ("block", ["--method", "block"]),
    ("block + norm tuning", ["--method", "block", "--norm-tuning"]),
    ("block (sym grid)", ["--method", "block", "--sym"]),
    ("block (25 steps)", ["--method", "block", "--block-steps", "25"]),
    # AutoRound's default amount of work: 200 steps of 8 windows per block.
    ("block (200 steps x 8)", ["--method", "block", "--block-steps", "200", "--block-batch", "8"]),
    ("block (start rtn)", ["--method", "block", "--init", "rtn"]),
    ("block (local targets)", ["--method", "block", "--target", "local"]),
    ("block (fp32 training)", ["--method", "block", "--fp32-training"]),
    # Only where the linears have biases (Qwen2's q/k/v): `--rows rtn "rtn + bias correction" ...`
    ("rtn + bias correction", ["--method", "rtn", "--bias-correction"]),
    ("gptq + bias correction", ["--method", "gptq", "--bias-correction"]),
    ("autoround", []),
]
DEFAULT_ROWS = ("rtn", "gptq", "cd", "adaquant", "block", "block + norm tuning", "autoround")


def autoround_inputs(model: str, calib: WindowSpec, work: Path) -> tuple[Path, Path]:
    """The reference as a Hugging Face directory and the calibration ids, for AutoRound to read."""
    hf_dir, ids_file = work / "reference-hf", work / "calib-ids.safetensors"
    if hf_dir.is_dir() and ids_file.is_file():
        return hf_dir, ids_file
    from transformers import AutoModelForCausalLM

    loaded = load_model(model)
    save_file({"ids": load_windows(loaded, calib, first=False).contiguous()}, ids_file)
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):  # a GGUF-loaded model refuses save_pretrained
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(materialize(loaded).state_dict(), strict=True)
    plain.save_pretrained(hf_dir)
    loaded.tokenizer.save_pretrained(hf_dir)
    return hf_dir, ids_file


class AutoRoundSource(WeightSource):
    """The model's own weights with AutoRound's dequantized matrices in place of its linears'."""

    def __init__(self, loaded, tensors: dict):
        self._loaded, self._tensors = loaded, tensors
        self.names = loaded.source.names | set(tensors)

    def get(self, name: str):
        return self._tensors[name] if name in self._tensors else self._loaded.source.get(name)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", type=Path, required=True, help="evaluation text (WikiText-2 test)")
    parser.add_argument("--model", default=str(SMOLLM2_STANDIN),
                        help="the model (default: the SmolLM2 stand-in that bench/standin.py writes)")
    parser.add_argument("--bits", type=int, nargs="+", default=[3, 4])
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--calib-windows", type=int, default=64)
    parser.add_argument("--calib-text", type=Path, help="calibration text (default: samples from the model, seed 0)")
    parser.add_argument("--autoround-iters", type=int, nargs="+", default=[25, 200],
                        help="AutoRound rows, one per number of iterations (its default is 200)")
    parser.add_argument("--autoround-batch", type=int, default=8)
    parser.add_argument("--autoround-fp32", action="store_true",
                        help="tune AutoRound in fp32 (default: its own default on a CPU, bf16 autocast)")
    parser.add_argument("--rows", nargs="+", help=f"names of rows to run (default: {', '.join(DEFAULT_ROWS)})")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "bench-calibration")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "calibration.md")
    parser.add_argument("--resume", action="store_true", help="reuse finished rows in --runs")
    parser.add_argument("--report-only", action="store_true", help="write the table from finished rows only")
    return parser


def main() -> None:
    args = build_parser().parse_args()

    start = time.perf_counter()
    args.runs.mkdir(parents=True, exist_ok=True)
    calib = WindowSpec(args.calib_windows, 512, args.calib_text, 0)
    eval_spec = WindowSpec(args.windows, args.seq_len, args.text)
    rows_wanted = [r for r in ROWS if r[0] in (args.rows or DEFAULT_ROWS)]
    args.resume = args.resume or args.report_only
    results, commands, quantized = [], [], []
    for name, flags, iters in [(n, f, i) for n, f in rows_wanted
                               for i in (args.autoround_iters if n == "autoround" else [None])]:
        for bits in args.bits:
            slug = f"int{bits}-g{args.group_size}-" + name.replace(" ", "-").replace("(", "").replace(")", "").replace("+-", "")
            out = args.runs / (slug if iters is None else f"{slug}-{iters}")
            finished = (out.with_suffix(".eval.json") if name == "autoround" else out / INFO_FILE).exists()
            if args.report_only and not finished:
                continue
            if name == "autoround":
                row, cmd = autoround_row(args, bits, iters, calib, out, eval_spec)
            else:
                cmd = ["mixq", "quantize", args.model, "--bits", str(bits), "--group-size", str(args.group_size),
                       *flags, "--calib-windows", str(args.calib_windows),
                       *(["--calib-text", str(args.calib_text)] if args.calib_text else []), "--eval-text", str(args.text),
                       "--eval-windows", str(args.windows), "--eval-len", str(args.seq_len), "--out", str(out),
                       "--overwrite"]
                done = out / INFO_FILE
                if not (args.resume and done.exists() and eval_spec.describe() in json.loads(done.read_text())["evaluations"]):
                    print("$", shlex.join(cmd), flush=True)
                    subprocess.run([sys.executable, "-m", "mixq.cli", *cmd[1:]], check=True)
                info = json.loads(done.read_text())
                r = info["evaluations"][eval_spec.describe()]
                grid = "sym" if "--sym" in flags else "asym"
                wall = f"{info['quantize_seconds']:.1f}" + ("*" if info.get("threads", 2) < 2 else "")
                row = [f"int{bits} g{args.group_size} {grid}", f"mixq {name}", info["storage"]["bpw"], r["kl_mean"],
                       r["kl_p99"], r["top1"], r["ppl"], wall]
            commands.append(shlex.join(cmd))
            results.append(row)
            if name != "autoround":
                quantized = list(info["output_errors"])
            write_table(args, results, commands, calib, start, quantized)


def autoround_row(args, bits: int, iters: int, calib: WindowSpec, out: Path, eval_spec: WindowSpec) -> tuple[list, list[str]]:
    hf_dir, ids_file = autoround_inputs(args.model, calib, args.runs)
    weights = out.with_suffix(".safetensors")
    cmd = [str(AUTOROUND_PYTHON), "bench/autoround_run.py", "--model", str(hf_dir), "--calib", str(ids_file),
           "--bits", str(bits), "--group-size", str(args.group_size), "--iters", str(iters),
           "--batch-size", str(args.autoround_batch), "--out", str(weights), *([] if args.autoround_fp32 else ["--amp"])]
    meta_file, report_file = weights.with_suffix(".json"), out.with_suffix(".eval.json")
    if not (args.resume and report_file.exists()):
        print("$", shlex.join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)
        loaded = load_model(args.model)
        tensors = load_file(weights)
        rep = evaluate(loaded, load_windows(loaded, eval_spec, first=True), AutoRoundSource(loaded, tensors))
        # Stored as mixq would store AutoRound's grid: symmetric int, fp16 scales, no zero points.
        plan = storage_plan(loaded, {n: f"int{bits}-g{args.group_size}-sym" for n in tensors})
        n_weights = loaded.n_weights
        report_file.write_text(json.dumps(dict(kl_mean=rep.kl_mean, kl_p99=rep.kl_p99, top1=rep.top1, ppl=rep.ppl,
                                               bpw=8 * sum(nb for _, _, nb in plan.values()) / n_weights)))
    meta, r = json.loads(meta_file.read_text()), json.loads(report_file.read_text())
    row = [f"int{bits} g{args.group_size} sym", f"AutoRound {meta['auto_round_version']} ({meta['iters']} iters, "
           f"batch {meta['batch_size']}{', bf16 amp' if meta['amp'] else ''})", r["bpw"], r["kl_mean"], r["kl_p99"], r["top1"], r["ppl"],
           meta["seconds_quantize"]]
    return row, cmd


def reproduce(args) -> str:
    """The flags that shape the table's rows (not --rows, --resume or --report-only)."""
    flags = ["--text", str(args.text)]
    for flag in ("model", "bits", "group_size", "windows", "calib_windows", "calib_text"):
        value, default = getattr(args, flag), build_parser().get_default(flag)
        if value != default:
            flags += [f"--{flag.replace('_', '-')}", *map(str, value if isinstance(value, list) else [value])]
    return shlex.join(flags)


def write_table(args, results: list, commands: list[str], calib: WindowSpec, start: float, quantized: list[str]) -> None:
    headers = ["grid", "method", "bpw (whole model)", "KL mean", "KL p99", "top-1", "ppl", "wall s"]
    n_blocks = len({n.split(".")[2] for n in quantized if n.split(".")[1:2] == ["layers"]})
    text = f"""# Layer-wise calibration on {model_name(args.model)}: mixq's methods against Intel AutoRound

Command: `python bench/calibration.py {reproduce(args)}` ({(time.perf_counter() - start) / 60:.0f} min in
this invocation; rows of earlier invocations reused with --resume)

Machine: {machine()}; mixq at commit {commit()}

{REFERENCE_LINE}{reference(args.model)}.
- Quantized: all {len(quantized)} linears of the {n_blocks} blocks, int{'/int'.join(map(str, args.bits))}, group {args.group_size};
  the embedding and output matrices are kept at 16 bits and the norms at fp32 for this table.
  bpw counts the whole model (payload; mixq rows: the whole file).
- Calibration, the same for every row: {calib.describe()}{"" if args.calib_text else " (mixq's data-free default)"};
  AutoRound is given exactly these token ids.
- Evaluation: the first {args.windows} windows of {args.seq_len} tokens of `{args.text.name}`; KL(reference || quantized)
  per token, its mean and 99th percentile, top-1 agreement with the reference, perplexity.
- mixq grids are asymmetric (b-bit zero points); AutoRound's default grid is symmetric (levels -2^(b-1)..2^(b-1)-1).
- Learned rounding trains with its matmuls in bf16 (autocast) in both tools: mixq's default, and AutoRound's
  default on a CPU (`amp`); the `fp32 training` row trains mixq in float32.
- wall s: mixq's quantize time and AutoRound's `quantize()` call, both with their calibration forward passes
  and without loading the model; all on both cores alone, except rows marked * (one thread, while another
  benchmark ran on the other core: not comparable with the others).

{markdown_table(headers, results)}
"""
    write_result(args.out, text, commands)


if __name__ == "__main__":
    main()
