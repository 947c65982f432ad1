"""Which held-out text calibrates the error model: one tensor's KL measured on several held-out texts.

mixq's error model is fitted to KL points measured end to end on held-out windows, by default text
sampled from the model. A judge on other text (WikiText) or longer windows may rank tensor kinds
differently: each chosen tensor, quantized alone (RTN with the profile's importance, every row) onto
each chosen type, has its KL measured on each held-out spec as the profile measures its points
(`measure_kl`, taped), next to what the profile predicts for it. Ratios between columns show how
much each kind's sensitivity depends on the text and on the window length.

    python bench/heldout_text.py --text ../shared/data/wikitext-2-raw/wiki.test.raw \\
        --model REFERENCE.gguf --profile mixq.profile \\
        --tensors model.layers.12.self_attn.q_proj:q4_k,iq4_xs lm_head:q5_k,q6_k \\
        --specs sampled:2x256 sampled:2x512 text:2x512 text:4x256
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import commit, machine, model_name, reference, write_result  # noqa: E402

from mixq.cli import HELD_OUT_SEED
from mixq.data import WindowSpec, load_windows
from mixq.formats import parse_format
from mixq.methods import MethodSettings
from mixq.models import load_model
from mixq.profile import Profile, measure_kl

ROOT = Path(__file__).resolve().parent.parent


def parse_spec(spec: str, text: Path) -> tuple[str, WindowSpec, bool]:
    """'sampled:2x512' or 'text:4x256' -> (column label, windows, take the first windows)."""
    source, _, shape = spec.partition(":")
    n, _, length = shape.partition("x")
    if source not in ("sampled", "text") or not n.isdigit() or not length.isdigit():
        raise SystemExit(f"bad --specs entry {spec!r}: expected sampled:NxLEN or text:NxLEN")
    if source == "sampled":
        return f"sampled {n} x {length}", WindowSpec(int(n), int(length), seed=HELD_OUT_SEED), False
    return f"{text.name} {n} x {length}", WindowSpec(int(n), int(length), text), True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--text", type=Path, required=True, help="text for the text:NxLEN specs (WikiText-2 test)")
    p.add_argument("--model", required=True, help="the full-precision reference (F32 GGUF or HF directory)")
    p.add_argument("--profile", type=Path, required=True, help="mixq's profile of the reference")
    p.add_argument("--tensors", nargs="+", required=True, help="MODULE:TYPE,TYPE,... (types as the profile names them, less -rtn)")
    p.add_argument("--specs", nargs="+", required=True, help="held-out texts: sampled:NxLEN or text:NxLEN")
    p.add_argument("--clip-grid", type=int, default=4, help="the profile's range search (bench/vs_llama_cpp.py's)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "heldout.md")
    args = p.parse_args()

    start = time.time()
    loaded = load_model(args.model)
    profile = Profile.load(args.profile)
    profile.check_model(loaded)
    predicted = profile.predicted("hessian+kl", engine_inputs=False)  # beside KLs of the weights alone
    refs, clip = loaded.plannable(), MethodSettings(clip_grid=args.clip_grid).clip()
    points = []  # (module, type, tensor index, option index)
    items = {}
    for entry in args.tensors:
        module, _, types = entry.partition(":")
        if module not in refs or not types:
            raise SystemExit(f"bad --tensors entry {entry!r}: expected one of the model's matrices, then :TYPE,...")
        t = profile.tensors.index(module)
        weight = loaded.read(refs[module].param)
        for qtype in types.split(","):
            o = profile.options.index(f"{qtype}-rtn")
            quantized = parse_format(qtype).fit(weight, torch.from_numpy(profile.importance[module]), *clip)
            items[(t, o)] = (torch.arange(weight.shape[0]), quantized)
            points.append((module, qtype, t, o))
    columns = []
    for spec in args.specs:
        label, windows_spec, first = parse_spec(spec, args.text)
        windows = load_windows(loaded, windows_spec, first=first)
        columns.append((label, measure_kl(loaded, windows, profile.tensors, items, batch_size=1, taped=True)))
        print(f"{label}: done at {time.time() - start:.0f} s", flush=True)

    first_label = columns[0][0]
    lines = ["| tensor | type | predicted | " + " | ".join(label for label, _ in columns) + " | "
             + " | ".join(f"{label} / {first_label}" for label, _ in columns[1:]) + " |",
             "|---" * (3 + 2 * len(columns) - 1) + "|"]
    for module, qtype, t, o in points:
        kls = [kl[(t, o)] for _, kl in columns]
        lines.append(f"| {module} | {qtype} | {predicted[t, o]:.3e} | " + " | ".join(f"{v:.3e}" for v in kls)
                     + " | " + " | ".join(f"{v / kls[0]:.2f}" for v in kls[1:]) + " |")
    text = (f"# Held-out text and the error model on {model_name(args.model)}\n\n"
            f"Machine: {machine()}; commit {commit()}; {time.time() - start:.0f} s.\n\n"
            f"- Reference: {reference(args.model)}.\n"
            f"- Each row: the tensor alone quantized (RTN with the profile's importance, {args.clip_grid} range "
            f"shrinks, every row), its end-to-end KL to the reference measured as the profile measures its points "
            f"(`measure_kl`, the later blocks replayed from tapes) on each held-out text; sampled windows are "
            f"mixq's data-free default (seed {HELD_OUT_SEED}), text windows the first of `{args.text.name}`. "
            f"Predicted: the profile `{args.profile}` (hessian+kl) for that tensor and type.\n\n"
            + "\n".join(lines) + "\n")
    write_result(args.out, text, ["python bench/heldout_text.py " + " ".join(sys.argv[1:])])


if __name__ == "__main__":
    main()
