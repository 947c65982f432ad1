"""Time per phase of a whole mixq run (profile, plan, quantize, export) and, in the same run, the
machine's matmul rate and llama.cpp's llama-imatrix + llama-quantize on the same model and
calibration tokens. Writes bench/results/phases.md.

    python bench/phases.py --text ../shared/data/wikitext-2-raw/wiki.test.raw

Default model: the full-precision SmolLM2-135M stand-in (bench/standin.py), as a Hugging Face
directory for mixq and as its F32 GGUF for llama.cpp. Both tools calibrate on the same text
(--calib-windows x --calib-len tokens of --text); mixq's data-free sampling is timed by speed.py.

Each command runs in its own process under /usr/bin/time (wall seconds, peak RSS); the profile's
phases come from its own clock (`seconds` in the profile's info). The work of a phase is counted as
the matrix products of its linear layers (attention's score products, norms and elementwise work
left out), from the model's shapes and what the profile measured:
- capture: one forward of every block over the calibration tokens (in the profile's `passes`
  precision: bfloat16 where the CPU multiplies it in hardware), and H = sum x^T x of each distinct
  input, the head's included (float32: the products of `capture.add_gram`'s panels, about
  tokens x cols^2 each);
- fisher: forward and backward (3x) of the whole model, head included, over its windows;
- errors (the profile's quantize phase): per tensor, GPTQ's updates for each stack of grids that
  share a group length (k grids x rows x cols^2) and one (rows x cols) x (cols x cols) product per
  option for tr(dW H dW^T); RTN's fits are elementwise and not counted;
- KL points: the reference pass, then per point the blocks from its own to the last and the head
  (the blocks after its own in bfloat16 where they ran taped: runner.LinearTape).
Each phase's share of the machine: the time its work would take at the machine's own matmul rate in
each precision (measured here), over the time it took.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import REFERENCE_LINE, SMOLLM2_STANDIN, commit, machine, model_name, reference, write_result  # noqa: E402

from mixq.capture import gram_panels  # noqa: E402
from mixq.export.llama_cpp import engine_build, tools_dir  # noqa: E402
from mixq.formats import parse_format  # noqa: E402
from mixq.models import load_model  # noqa: E402
from mixq.profile import Profile  # noqa: E402
from mixq.report import markdown_table  # noqa: E402
from mixq.runner import fast_matmul_dtype  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def matmul_rate(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of the best of `repeats` n x n x n products in `dtype`."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    best = float("inf")
    for _ in range(repeats + 1):  # the first warms up
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def timed(cmd: list[str], log: Path, resume: bool) -> tuple[float, float]:
    """Run `cmd` under /usr/bin/time -v: (wall seconds, peak RSS in MiB), both read from its log
    (`log`, with the command's output); with `resume`, a log of the same command that finished is reused."""
    line = 'Command being timed: "' + " ".join(cmd) + '"'
    done = log.is_file() and line in log.read_text() and "Exit status: 0" in log.read_text()
    if not (resume and done):
        print("$", shlex.join(cmd), flush=True)
        with log.open("w") as out:
            subprocess.run(["/usr/bin/time", "-v", *cmd], stdout=out, stderr=subprocess.STDOUT, check=True, cwd=ROOT)
    text = log.read_text()
    h, m, sec = re.findall(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (?:(\d+):)?(\d+):([\d.]+)", text)[-1]
    rss_kb = re.findall(r"Maximum resident set size \(kbytes\): (\d+)", text)[-1]
    return 3600 * int(h or 0) + 60 * int(m) + float(sec), int(rss_kb) / 1024


def phase_gflop(profile: Profile, loaded) -> dict[str, dict[str, float]]:
    """Matrix-product GFLOP of each phase of the profile, per precision (see the module's docstring)."""
    refs = loaded.plannable()
    block_of = {n: b for b in range(loaded.n_blocks) for n in loaded.block_tensors(b)}
    block_params = np.zeros(loaded.n_blocks)
    for name, b in block_of.items():
        block_params[b] += np.prod(refs[name].shape)
    head = np.prod(refs[loaded.head_name].shape) if loaded.head_name in refs else 0
    held_out, calib_tokens = int(np.prod(profile.info["held_out_windows"])), int(np.prod(profile.info["calibration_windows"]))
    fisher_tokens = profile.info["fisher_windows"] * profile.info["calibration_windows"][1]
    errors = 0.0
    for t, name in enumerate(profile.tensors):
        rows, cols = profile.shapes[t]
        allowed = [profile.options[o] for o in np.nonzero(np.isfinite(profile.errors["hessian"][t]))[0]]
        stacks: dict[int, int] = {}
        for option in allowed:
            fmt_name, _, method = option.rpartition("-")
            if method == "gptq":
                glen = parse_format(fmt_name).group_len(cols)
                stacks[glen] = stacks.get(glen, 0) + 1
        errors += sum(k * rows * cols**2 for k in stacks.values())
        errors += sum(2 * rows * cols**2 for option in allowed if option != "f16")
    later = np.append(np.cumsum(block_params[::-1])[::-1], 0)  # parameters of blocks b..last
    starts = [block_of[profile.tensors[t]] for t, _ in np.argwhere(np.isfinite(profile.measured))
              if profile.tensors[t] in block_of]
    # the reference pass, then per point its own block and the head in float32 and the later blocks
    # in bfloat16 where they ran taped (only the difference to the reference multiplied)
    own = 2 * held_out * (later[0] + sum(block_params[b] + head for b in starts))
    after = 2 * held_out * sum(later[b + 1] for b in starts)
    taped = profile.info.get("kl_later_blocks") == "taped"
    measure = {"float32": own / 1e9, "bfloat16": after / 1e9} if taped else {"float32": (own + after) / 1e9}
    inputs = [refs[stage[0]].shape[1] for b in range(loaded.n_blocks) for stage in loaded.block_stages(b)]
    if head:
        inputs.append(refs[loaded.head_name].shape[1])
    statistics = 2 * calib_tokens * sum((j - i) * (cols - i) for cols in inputs for i, j in gram_panels(cols))
    capture = {"float32": statistics / 1e9}
    passes = "float32" if profile.info.get("passes") == "float32" else "bfloat16"  # bfloat16 before it was recorded
    capture[passes] = capture.get(passes, 0.0) + 2 * calib_tokens * block_params.sum() / 1e9
    return {"capture": capture,
            "fisher": {"float32": 6 * fisher_tokens * (block_params.sum() + head) / 1e9},
            "quantize": {"float32": errors / 1e9}, "measure": measure}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--text", type=Path, required=True, help="calibration text for both tools")
    ap.add_argument("--model", default=str(SMOLLM2_STANDIN), help="what mixq reads (default: SmolLM2's stand-in)")
    ap.add_argument("--gguf", type=Path, help="what llama.cpp reads (default: the stand-in's F32 GGUF beside --model)")
    ap.add_argument("--calib-windows", type=int, default=64)
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--budget", default="4.5bpw")
    ap.add_argument("--llama-type", default="Q4_K_M")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-phases")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "phases.md")
    ap.add_argument("--resume", action="store_true", help="reuse the commands that finished (their logs in --work)")
    args = ap.parse_args()
    gguf = args.gguf or next(Path(args.model).parent.glob("*-f32.gguf"))
    args.work.mkdir(parents=True, exist_ok=True)
    w = args.work
    threads = torch.get_num_threads()
    # Where the CPU has no bfloat16 products torch emulates them, hundreds of times slower: mixq then
    # computes in float32, and the emulated rate is only shown, from smaller products.
    bf16_fast = fast_matmul_dtype("cpu") == torch.bfloat16
    rates = {"float32": matmul_rate(torch.float32), "bfloat16": matmul_rate(torch.bfloat16, 2048 if bf16_fast else 512)}
    calib = ["--calib-text", str(args.text), "--calib-windows", str(args.calib_windows), "--calib-len", str(args.calib_len)]
    mixq = [sys.executable, "-m", "mixq.cli"]
    profile_file, out_dir = w / "model.profile", w / "quantized"
    commands = {
        "profile": [*mixq, "profile", args.model, *calib, "--out", str(profile_file), "--restart"],
        "plan": [*mixq, "plan", str(profile_file), "--budget", args.budget, "--out", str(w / "plan.json")],
        "quantize": [*mixq, "quantize", args.model, "--profile", str(profile_file), "--budget", args.budget, *calib,
                     "--out", str(out_dir), "--overwrite"],
        "llama-imatrix": [str(tools_dir() / "llama-imatrix"), "-m", str(gguf), "-f", str(args.text), "-c",
                          str(args.calib_len), "--chunks", str(args.calib_windows), "-t", str(threads), "-o",
                          str(w / "imatrix.gguf")],
        "llama-quantize": [str(tools_dir() / "llama-quantize"), "--imatrix", str(w / "imatrix.gguf"), str(gguf),
                           str(w / f"{args.llama_type}.gguf"), args.llama_type, str(threads)],
    }
    measured = {}
    for name, cmd in list(commands.items()):
        measured[name] = timed(cmd, w / f"{name}.log", args.resume)
        if name == "quantize":  # export where the plan can go: the default space also quantizes what
            # compressed-tensors keeps at 16 bits (the embedding), which only a --target profile avoids
            targets = json.loads((out_dir / "mixq.json").read_text())["exportable_to"]
            if targets:
                export = [*mixq, "export", str(out_dir), "--to", targets[0], str(w / "exported"), "--overwrite"]
                commands["export"] = export
                measured["export"] = timed(export, w / "export.log", args.resume)

    profile = Profile.load(profile_file)
    loaded = load_model(args.model)
    gflop = phase_gflop(profile, loaded)
    seconds = profile.info["seconds"]
    info = json.loads((out_dir / "mixq.json").read_text())
    rows = []
    names = {"capture": "capture (statistics passes)", "fisher": "Fisher (forward + backward)",
             "quantize": "errors (every tensor x option)", "measure": f"KL points ({np.isfinite(profile.measured).sum()})"}
    for phase in ("capture", "fisher", "quantize", "measure"):
        work, took = gflop[phase], seconds[phase]
        at_machine_rate = sum(g / rates[dtype] for dtype, g in work.items())
        rows.append([names[phase], f"{took:.1f}", " + ".join(f"{g:.0f} {dtype}" for dtype, g in work.items()),
                     f"{sum(work.values()) / took:.0f}", f"{at_machine_rate:.1f}", f"{at_machine_rate / took:.2f}"])
    load_and_save = measured["profile"][0] - seconds["total"]
    rows.append(["profile: load, sample held-out text, save", f"{load_and_save:.1f}", "", "", "", ""])
    rows.append(["**profile, wall**", f"**{measured['profile'][0]:.1f}**", "", "", "", ""])
    rows.append(["plan (solve, `mixq plan`)", f"{measured['plan'][0]:.1f}", "", "", "", ""])
    rows.append(["quantize to the plan (capture, GPTQ, write)", f"{info['quantize_seconds']:.1f}", "", "", "", ""])
    rows.append(["`mixq quantize --profile`, wall", f"{measured['quantize'][0]:.1f}", "", "", "", ""])
    if "export" in measured:
        rows.append([f"export to {commands['export'][5]}, wall", f"{measured['export'][0]:.1f}", "", "", "", ""])
    else:
        rows.append(["export: none (the plan quantizes the embedding, which no export target stores)", "", "", "", "", ""])
    mixq_total = sum(measured[k][0] for k in ("profile", "quantize", "export") if k in measured)
    llama_total = measured["llama-imatrix"][0] + measured["llama-quantize"][0]
    rows.append([f"**mixq: {' + '.join(k for k in ('profile', 'quantize', 'export') if k in measured)}**",
                 f"**{mixq_total:.1f}**", "", "", "", ""])
    rows.append([f"llama-imatrix ({args.calib_windows} x {args.calib_len} tokens)", f"{measured['llama-imatrix'][0]:.1f}",
                 "", "", "", ""])
    rows.append([f"llama-quantize {args.llama_type} with that imatrix", f"{measured['llama-quantize'][0]:.1f}", "", "", "", ""])
    rows.append(["**llama.cpp: imatrix + quantize**", f"**{llama_total:.1f}**", "", "", "", ""])
    peaks = [[name, f"{rss:.0f}"] for name, (_, rss) in measured.items()]

    text = f"""# Time per phase: mixq's profile, plan, quantize and export against llama.cpp's imatrix + quantize ({model_name(args.model)})

Command: `python bench/phases.py {shlex.join(sys.argv[1:])}`

Machine: {machine()}; mixq at commit {commit()}; llama.cpp: {engine_build()}

{REFERENCE_LINE}{reference(args.model)}; llama.cpp reads `{gguf.name}`.
- Calibration, both tools: {args.calib_windows} x {args.calib_len} tokens of `{args.text.name}`; mixq's KL points on
  {profile.info['held_out_windows'][0]} x {profile.info['held_out_windows'][1]} held-out tokens sampled from the model.
- mixq: the default option space ({len(profile.options)} options, {len(profile.tensors)} tensors), plan and quantize
  at {args.budget}; llama.cpp: {args.llama_type} with the imatrix.
- Matmul rate of this machine, measured in this run (2048^3 products, best of 5): {rates['float32']:.0f} GFLOP/s
  float32, {rates['bfloat16']:.0f} GFLOP/s bfloat16{"" if bf16_fast else " (512^3 products: emulated by torch on this CPU, so mixq's passes run in float32)"}.
- GFLOP: the matrix products of each phase's linear layers (bench/phases.py's docstring says how they
  are counted); share = the seconds its work takes at the machine's rates / the seconds it took.

| phase | seconds | GFLOP | GFLOP/s | seconds at the machine's matmul rate | share |
|---|---|---|---|---|---|
""" + "\n".join("| " + " | ".join(r) + " |" for r in rows) + f"""

mixq against llama.cpp: {mixq_total / llama_total:.1f}x the time.

Peak RSS per command:

{markdown_table(["command", "peak RSS MiB"], peaks)}
"""
    write_result(args.out, text, [shlex.join(cmd) for cmd in commands.values()])


if __name__ == "__main__":
    main()
