"""Where a benchmark table comes from: machine, commit, reference model, and how it is written.

Every table in bench/results states these; the functions here are the one place that says them.
"""

from __future__ import annotations

import json
import platform
import re
import subprocess
from pathlib import Path

import torch

from mixq.atomic import atomic_write_text
from mixq.data import CACHE_DIR

ROOT = Path(__file__).resolve().parent.parent
STANDIN_DIR = CACHE_DIR / "standins"
SMOLLM2_STANDIN = STANDIN_DIR / "smollm2-135m" / "hf"
REFERENCE_LINE = "- Reference: "
EARLIER_HEADING = "## Earlier run, on another reference"


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}, Python {platform.python_version()}"


def commit() -> str:
    """The checked-out commit, with a mark when the work tree differs from it."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    # The result tables themselves are left out: a benchmark rewrites its own as rows come in.
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/results"],
                           cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return head + (" (with uncommitted changes)" if dirty else "")


def standin_record(model: str) -> dict | None:
    """bench/standin.py's record of the stand-in `model` (its hf/ directory or its F32 GGUF), if it is one."""
    path = Path(model).expanduser()
    for candidate in (path / "standin.json", path.parent / "standin.json"):
        if path.exists() and candidate.is_file():
            return json.loads(candidate.read_text())
    return None


def model_name(model: str) -> str:
    """A table title's name for `model`."""
    record = standin_record(model)
    if record is None:
        return model
    source = record["settings"]["model"]  # an embedded model's name, or a shipped GGUF's path
    return f"{Path(source).stem if source.endswith('.gguf') else source} (full-precision stand-in)"


def reference(model: str) -> str:
    """What the unquantized model of a table is, in one sentence: the reference every KL is taken to."""
    record = standin_record(model)
    if record is None:
        return (f"`{model}` as loaded by mixq; a shipped GGUF model's weights dequantized lie on its grid, "
                "which flatters any quantizer measured against them")
    kl = record["kl"]["bf16_hf" if Path(model).expanduser().is_dir() else "f32_gguf"]
    return (f"the full-precision stand-in of `{record['settings']['model']}` (`bench/standin.py`, seed "
            f"{record['settings']['seed']}: its shipped weights plus the rounding noise they lost; "
            f"{record['weights']['mean_rel_change']:.3f} mean relative weight change, KL {kl['kl_mean']:.3f} "
            f"to the shipped model), loaded from `{model}`")


def reference_of(text: str) -> str | None:
    match = re.search(f"^{re.escape(REFERENCE_LINE)}(.*)$", text, re.M)
    return match.group(1) if match else None


def earlier_rows(out: Path, new_text: str) -> str:
    """The section of `out` to keep below a new table: its earlier run on another reference.

    A table re-run on a new reference keeps the old one, labelled, so the difference stays
    visible (only the latest such run); a re-run on the same reference carries the earlier section
    over unchanged.
    """
    if not out.exists():
        return ""
    old = out.read_text()
    if EARLIER_HEADING in old:
        kept = old[old.index(EARLIER_HEADING):]
        current = old[:old.index(EARLIER_HEADING)]
    else:
        kept, current = "", old
    if reference_of(current) is not None and reference_of(current) == reference_of(new_text):
        return kept
    body = re.sub(r"^(#+) ", r"##\1 ", current.strip(), flags=re.M)
    return (f"{EARLIER_HEADING} (kept for comparison: it predates the code above and its reference is "
            f"another)\n\n{body}\n")


def write_result(out: Path, text: str, commands: list[str]) -> None:
    """Write a result table with the command of each of its rows, atomically, and show it."""
    text += "\nEach row was made by:\n```\n" + "\n".join(commands) + "\n```\n"
    earlier = earlier_rows(out, text)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, text + ("\n" + earlier if earlier else ""))
    print(text, flush=True)
