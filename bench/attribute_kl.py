"""Where a quantized file's KL comes from: the reference with one kind of tensor quantized at a time.

For each GGUF file of the same model (mixq's and llama.cpp's at one size, say), and for each tensor
kind (q_proj, down_proj, the embedding, the output matrix, ...), the reference model is evaluated
with only that kind's tensors taken from the file (dequantized) and every other tensor left at full
precision; its mean KL to the reference, with a bootstrap interval over windows, is that kind's
share. The shares of all kinds sum to about the whole file's KL (the last row measures it), so two
files of equal size can be compared kind by kind: where one spends its bytes better, and where an
allocator's error model misjudged a kind. `--blocks KIND` splits one kind by block as well. With
`--profile`, each row also shows what mixq's error model (hessian+kl) predicts for those tensors at
the file's types, so its misjudgements show kind by kind, for llama.cpp's allocation as for mixq's.

    python bench/attribute_kl.py --text ../shared/data/wikitext-2-raw/wiki.test.raw \\
        --model REFERENCE.gguf --files mixq-Q3_K_M.gguf llama-Q3_K_M-imatrix.gguf
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import commit, machine, model_name, reference, write_result  # noqa: E402

from mixq.data import WindowSpec, load_windows
from mixq.evaluate import evaluate, reference_hidden
from mixq.models import load_model
from mixq.models.layout import block_and_kind
from mixq.models.source import WeightSource

ROOT = Path(__file__).resolve().parent.parent


class Swapped(WeightSource):
    """The reference's tensors, except those `chosen` by name, which come from `other`."""

    fresh = True

    def __init__(self, reference: WeightSource, other: WeightSource, chosen: set[str]):
        self.reference, self.other, self.chosen = reference, other, chosen
        self.names = reference.names

    def _source(self, name: str) -> WeightSource:
        return self.other if name in self.chosen else self.reference

    def get(self, name: str) -> torch.Tensor:
        return self._source(name).get(name)

    def rows(self, name: str, rows: slice) -> torch.Tensor:
        return self._source(name).rows(name, rows)


def tensor_kinds(loaded) -> dict[str, list[str]]:
    """Every plannable matrix's parameter name, grouped by kind (the embedding and the output matrix
    each a kind of their own), in forward order."""
    kinds: dict[str, list[str]] = {}
    for ref in loaded.plannable().values():
        block, kind = block_and_kind(ref.param)
        kinds.setdefault(kind if block is not None else ref.param, []).append(ref.param)
    return kinds


def file_bits(path: Path) -> dict[str, tuple[int, int, str]]:
    """Per GGUF tensor name: (bytes, weights, type name)."""
    from gguf import GGUFReader

    return {t.name: (int(t.n_bytes), int(t.n_elements), t.tensor_type.name) for t in GGUFReader(str(path)).tensors}


def kind_of_gguf(name: str) -> str:
    """llama.cpp's tensor kind: blk.3.attn_q.weight -> attn_q."""
    parts = name.removesuffix(".weight").split(".")
    return parts[2] if parts[0] == "blk" else parts[0]


def types_line(bits: dict, gguf_kind: str) -> tuple[float, str]:
    """(bits per weight, 'Q4_K x27, Q5_K x1') of one llama.cpp tensor kind in a file."""
    rows = [v for n, v in bits.items() if n.endswith(".weight") and kind_of_gguf(n) == gguf_kind]
    counts: dict[str, int] = {}
    for _, _, t in rows:
        counts[t] = counts.get(t, 0) + 1
    bpw = 8 * sum(b for b, _, _ in rows) / max(1, sum(e for _, e, _ in rows))
    return bpw, ", ".join(f"{t} x{c}" for t, c in sorted(counts.items(), key=lambda x: -x[1]))


def gguf_name(param: str) -> str:
    """llama.cpp's name of a parameter: model.layers.3.self_attn.q_proj.weight -> blk.3.attn_q.weight."""
    block, kind = block_and_kind(param)
    return f"blk.{block}.{GGUF_KIND[kind]}.weight" if block is not None else f"{GGUF_KIND[param]}.weight"


def predicted_alone(profile, module_of: dict[str, str], bits: dict, names: list[str]) -> float:
    """The profile's predicted KL (hessian+kl, summed) of `names` at the types the file gave them;
    NaN if a type is not among the profile's options."""
    import numpy as np

    pred = profile.predicted("hessian+kl", engine_inputs=False)  # beside KLs of the weights alone
    index = {t: i for i, t in enumerate(profile.tensors)}
    total = 0.0
    for name in names:
        qtype = bits[gguf_name(name)][2]
        option = "f16" if qtype in ("F16", "BF16", "F32") else f"{qtype.lower()}-rtn"
        if option not in profile.options:
            return float("nan")
        total += float(pred[index[module_of[name]], profile.options.index(option)])
    return total if np.isfinite(total) else float("nan")


# mixq's parameter kind -> llama.cpp's tensor kind, for the bits column (transformers' GGUF names).
GGUF_KIND = {"self_attn.q_proj.weight": "attn_q", "self_attn.k_proj.weight": "attn_k",
             "self_attn.v_proj.weight": "attn_v", "self_attn.o_proj.weight": "attn_output",
             "mlp.gate_proj.weight": "ffn_gate", "mlp.up_proj.weight": "ffn_up", "mlp.down_proj.weight": "ffn_down",
             "model.embed_tokens.weight": "token_embd", "lm_head.weight": "output"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--text", type=Path, required=True, help="evaluation text (WikiText-2 test)")
    p.add_argument("--model", required=True, help="the full-precision reference (F32 GGUF or HF directory)")
    p.add_argument("--files", type=Path, nargs="+", required=True, help="quantized GGUF files of the same model")
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--profile", type=Path, help="mixq's profile of the reference: adds its predictions")
    p.add_argument("--blocks", nargs="*", default=[], help="kinds (mixq's names) to split by block as well")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "attribution.md")
    args = p.parse_args()

    start = time.time()
    loaded = load_model(args.model)
    windows = load_windows(loaded, WindowSpec(args.windows, args.seq_len, args.text), first=True)
    ref_hidden = reference_hidden(loaded, windows)
    kinds = tensor_kinds(loaded)
    profile = None
    if args.profile:
        from mixq.profile import Profile

        profile = Profile.load(args.profile)
        profile.check_model(loaded)
        module_of = {ref.param: module for module, ref in loaded.plannable().items()}
    predicted_header = ("| predicted |", "|-----------|") if profile else ("", "")
    lines = []
    for path in args.files:
        quantized = load_model(str(path)).source
        bits = file_bits(path)
        lines += [f"\n### {path.name}\n", "| tensors | bpw | types | KL alone | 95% interval " + predicted_header[0],
                  "|---------|-----|-------|----------|--------------" + predicted_header[1]]
        groups = [(kind, names) for kind, names in kinds.items()]
        for kind in args.blocks:
            groups += [(f"{kind} of block {block_and_kind(n)[0]}", [n]) for n in kinds[kind]]
        groups.append(("all (the whole file)", [n for names in kinds.values() for n in names]))
        for label, names in groups:
            report = evaluate(loaded, windows, Swapped(loaded.source, quantized, set(names)), reference=ref_hidden)
            block, kind = block_and_kind(names[0])
            gguf_kind = GGUF_KIND.get(kind if block is not None else names[0], "")
            bpw, types = types_line(bits, gguf_kind)
            if block is not None and len(names) == 1:
                b, e, t = bits[gguf_name(names[0])]
                bpw, types = 8 * b / e, t
            if label.startswith("all"):
                bpw = 8 * sum(b for b, _, _ in bits.values()) / sum(e for _, e, _ in bits.values())
                types = ""
            lo, hi = report.kl_ci95
            row = f"| {label} | {bpw:.3f} | {types} | {report.kl_mean:.5f} | {lo:.5f}-{hi:.5f} |"
            if profile:
                row += f" {predicted_alone(profile, module_of, bits, names):.5f} |"
            lines.append(row)
            print(lines[-1], flush=True)
    text = (f"# Per-kind KL attribution on {model_name(args.model)}\n\n"
            f"Machine: {machine()}; commit {commit()}; {time.time() - start:.0f} s.\n\n"
            f"- Reference: {reference(args.model)}.\n"
            f"- Each row: the reference with only those tensors taken from the file (dequantized by mixq's GGUF "
            f"reader), mean KL to the reference over {args.windows} x {args.seq_len} tokens of `{args.text.name}` "
            f"(the first windows), with a 95% bootstrap interval over windows. bpw counts the file's bytes of "
            f"those tensors." + (f" Predicted: what mixq's profile `{args.profile}` predicts for those tensors at "
                                 f"the file's types (hessian+kl, summed over the tensors; calibrated on held-out text "
                                 f"sampled from the model, so its scale differs from WikiText's)." if profile else "")
            + "\n" + "\n".join(lines) + "\n")
    write_result(args.out, text, ["python bench/attribute_kl.py " + " ".join(sys.argv[1:])])


if __name__ == "__main__":
    main()
