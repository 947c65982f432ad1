"""Every table in bench/results, re-made at the checked-out commit, in one command (`make bench`).

Each step is one benchmark script, run as a user would run it; its runs go under
runs/bench-COMMIT/, so a rerun at the same commit resumes (finished steps are skipped, a step's
own --resume reuses its finished rows) and a new commit starts afresh. A work tree that differs
from its commit is refused: every table states the commit it was made at. A step that fails is
reported and the others still run; the exit status says whether all passed.

    python bench/run_all.py --text ../shared/data/wikitext-2-raw/wiki.test.raw [--only uniform,calibration]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import ROOT, commit  # noqa: E402
from vs_llama_cpp import QWEN_STANDIN  # noqa: E402


def steps(text: Path, runs: Path) -> dict[str, list[str]]:
    """name -> the script and its arguments, in the order they run (stand-ins first: others read them)."""
    t = ["--text", str(text)]
    return {
        "standin": ["bench/standin.py", *t],
        "uniform": ["bench/uniform.py", *t, "--runs", str(runs / "uniform"), "--resume"],
        "calibration": ["bench/calibration.py", *t, "--runs", str(runs / "calibration"), "--resume"],
        "allocation": ["bench/allocation.py", *t, "--profile", str(runs / "smol-standin.profile")],
        "ggml_rounding": ["bench/ggml_rounding.py", "--work", str(runs / "rounding")],
        "speed": ["bench/speed.py", *t],
        "phases": ["bench/phases.py", *t, "--work", str(runs / "phases")],
        "models": ["bench/models.py", *t],
        "deploy": ["bench/deploy.py", *t, "--work", str(runs / "deploy")],
        "gguf": ["bench/vs_llama_cpp.py", *t, "--work", str(runs / "gguf")],
        "latency": ["bench/latency.py", *t, "--work", str(runs / "gguf")],  # reuses the gguf step's files
        # the gguf step's files at Q3_K_M's size, split by tensor kind
        "attribution": ["bench/attribute_kl.py", *t, "--model", str(QWEN_STANDIN), "--files",
                        *[str(runs / "gguf" / QWEN_STANDIN.stem / f) for f in
                          ("mixq-Q3_K_M-rtn.gguf", "mixq-Q3_K_M-gptq.gguf", "llama-Q3_K_M-imatrix.gguf")]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", type=Path, required=True, help="evaluation text (WikiText-2 test)")
    parser.add_argument("--only", help="comma-separated step names (default: all)")
    args = parser.parse_args()
    made_at = commit()
    if made_at.endswith("(with uncommitted changes)"):
        sys.exit("mixq: error: the work tree differs from its commit: commit first, every table states it")
    runs = ROOT / "runs" / f"bench-{made_at}"
    runs.mkdir(parents=True, exist_ok=True)
    todo = steps(args.text.resolve(), runs)
    if args.only:
        unknown = set(args.only.split(",")) - set(todo)
        if unknown:
            sys.exit(f"mixq: error: unknown steps {sorted(unknown)}; known: {', '.join(todo)}")
        todo = {k: v for k, v in todo.items() if k in args.only.split(",")}
    failed = []
    for name, command in todo.items():
        done = runs / f"{name}.done"
        if done.exists():
            print(f"== {name}: done at this commit, skipped", flush=True)
            continue
        print(f"== {name}: {' '.join(command)}", flush=True)
        start = time.perf_counter()
        if subprocess.run([sys.executable, *command], cwd=ROOT).returncode == 0:
            done.write_text(f"{time.perf_counter() - start:.0f} s\n")
        else:
            failed.append(name)
            print(f"== {name}: failed, going on", flush=True)
    if failed:
        sys.exit(f"mixq: error: steps failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
