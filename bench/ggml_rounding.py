"""Rounding onto ggml's grids: mixq's RTN (importance-weighted search), GPTQ and coordinate descent
vs llama.cpp's own quantizer (llama-quantize, with and without an imatrix), per tensor of a GGUF
model (default: the full-precision SmolLM2-135M stand-in's F32 GGUF), by the layer's output error
tr(dW H dW^T) with H from mixq's calibration windows.

llama.cpp's files come from `llama-quantize --pure` of an F32 GGUF of the reference weights; its
imatrix from `llama-imatrix` on the same calibration text. On SmolLM2 only the 1536-wide down_proj
rows fit the 256-wide types (llama.cpp falls back on the others), so their rows cover 30 tensors and
the 32-wide types all 210. A shipped model's weights lie on its grid (SmolLM2: Q4_1), which Q4_K and
Q5_1 reproduce nearly exactly: measure on a stand-in.

    python bench/ggml_rounding.py [--model FILE.gguf]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFReader
from gguf.quants import dequantize

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import REFERENCE_LINE, STANDIN_DIR, commit, earlier_rows, machine, model_name, reference  # noqa: E402
from vs_llama_cpp import run  # noqa: E402

from mixq import capture  # noqa: E402
from mixq.atomic import atomic_write_text  # noqa: E402
from mixq.data import WindowSpec, load_windows  # noqa: E402
from mixq.export.gguf import name_map_of, qk_row_order  # noqa: E402
from mixq.export.llama_cpp import tools_dir  # noqa: E402
from mixq.export.recipe import NEEDS_IMATRIX  # noqa: E402
from mixq.formats.ggml import GGML_FORMATS  # noqa: E402
from mixq.methods import MethodSettings, output_error, quantize_many, supports  # noqa: E402
from mixq.models import load_model, source_gguf  # noqa: E402
from mixq.report import markdown_table  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# llama-quantize's file type whose --pure default is each ggml type: its own name, except that the
# IQ2_S file type is made of IQ2_XS tensors and IQ2_M of IQ2_S ones (llama-quant.cpp).
PURE_FILE_TYPE = {"iq2_s": "IQ2_M"}
CACHE = Path(os.environ.get("MIXQ_CACHE", Path.home() / ".cache" / "mixq"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib-windows", type=int, default=32)
    ap.add_argument("--model", default=str(STANDIN_DIR / "smollm2-135m" / "smollm2-135m-standin-f32.gguf"),
                    help="a GGUF model (default: the SmolLM2 stand-in's F32 GGUF that bench/standin.py writes)")
    ap.add_argument("--methods", default="rtn,gptq,cd")
    ap.add_argument("--work", type=Path, help="llama.cpp's files (default: ~/.cache/mixq/bench-rounding/MODEL)")
    args = ap.parse_args()
    work = args.work or CACHE / "bench-rounding" / Path(args.model).stem
    (work / "logs").mkdir(parents=True, exist_ok=True)
    start = time.time()
    binp = tools_dir()
    loaded = load_model(args.model)
    source = source_gguf(loaded.spec)
    calib = load_windows(loaded, WindowSpec(args.calib_windows, 512, seed=0))
    text = work / "calib.txt"
    calib_text = "\n\n".join(loaded.tokenizer.decode(w, skip_special_tokens=True) for w in calib)
    # bytes: the sampled text may hold carriage returns, which reading it as text would translate
    if text.is_file() and text.read_bytes() != calib_text.encode():  # llama.cpp's imatrix read other text
        for stale in [work / "imatrix.gguf", *work.glob("*-imatrix.gguf")]:
            stale.unlink()
    text.write_text(calib_text)
    f32 = work / "f32.gguf"
    if not f32.is_file():
        run([str(binp / "llama-quantize"), "--allow-requantize", str(source), str(f32), "F32"], work / "logs" / "f32.log")
    imatrix = work / "imatrix.gguf"
    if not imatrix.is_file():
        run([str(binp / "llama-imatrix"), "-m", str(f32), "-f", str(text), "-o", str(imatrix), "--chunks",
             str(args.calib_windows), "-t", "2"], work / "logs" / "imatrix.log")

    linears = loaded.quantizable()
    name_map = name_map_of(GGUFReader(source))
    heads = {"q_proj": loaded.config.num_attention_heads, "k_proj": loaded.config.num_key_value_heads}
    llama: dict[tuple[str, bool], dict[str, torch.Tensor]] = {}  # (type, imatrix) -> tensor -> W_hat
    for name in GGML_FORMATS:
        for with_imatrix in (True,) if name in NEEDS_IMATRIX else (False, True):  # llama.cpp refuses those
            out = work / f"{name}{'-imatrix' if with_imatrix else ''}.gguf"
            if not out.is_file():
                extra = ["--imatrix", str(imatrix)] if with_imatrix else []
                run([str(binp / "llama-quantize"), "--pure", *extra, str(f32), str(out),
                     PURE_FILE_TYPE.get(name, name.upper())],
                    work / "logs" / f"{out.name}.log")
            by_name = {t.name: t for t in GGUFReader(out).tensors}
            got = {}
            for tensor, linear in linears.items():
                t = by_name[name_map.get_name(f"{tensor}.weight", try_suffixes=(".weight",))]
                if t.tensor_type.name.lower() != name:
                    continue  # llama.cpp fell back to another type for these rows
                W_hat = dequantize(t.data, t.tensor_type).reshape(linear.shape)
                kind = tensor.rsplit(".", 1)[-1]
                if loaded.family.gguf_permutes_qk and kind in heads:  # back to Hugging Face's row order
                    W_hat = W_hat[np.argsort(qk_row_order(len(W_hat), heads[kind]))]
                got[tensor] = torch.from_numpy(np.ascontiguousarray(W_hat, dtype=np.float32))
            llama[(name, with_imatrix)] = got

    errors: dict[str, dict[str, list[float]]] = {n: {} for n in GGML_FORMATS}  # type -> maker -> per tensor
    stats = capture.capture_all(loaded, calib, batch_size=8)
    settings = MethodSettings()
    for tensor, linear in linears.items():
        W, H = loaded.read(linear.param), stats[tensor].H
        fits = [n for n in GGML_FORMATS if tensor in llama[(n, True)]]
        for method in args.methods.split(","):
            done = [n for n in fits if supports(method, GGML_FORMATS[n])]  # lattices: rtn and gptq
            for n, q in zip(done, quantize_many(method, W, H, [GGML_FORMATS[n] for n in done], settings)):
                errors[n].setdefault(f"mixq {method}", []).append(output_error(W, q.dequantize(), H))
        for n in fits:
            for with_imatrix in (True,) if n in NEEDS_IMATRIX else (False, True):
                maker = "llama.cpp imatrix" if with_imatrix else "llama.cpp"
                errors[n].setdefault(maker, []).append(output_error(W, llama[(n, with_imatrix)][tensor], H))
    write_report(args, errors, time.time() - start)


def write_report(args, errors: dict, seconds: float) -> None:
    rows = []
    for name, by_maker in errors.items():
        if not by_maker:
            continue
        base = np.array(by_maker["llama.cpp imatrix"])
        for maker, errs in by_maker.items():
            e = np.array(errs)
            rows.append([name.upper(), maker, len(e), f"{e.sum():.4g}", f"{np.median(e / base):.3f}",
                         f"{(e < base).mean():.2f}" if maker.startswith("mixq") else "-"])
    text = "\n".join([
        f"# Rounding onto ggml's grids: mixq vs llama.cpp's quantizer, per tensor of {model_name(args.model)}",
        "",
        f"Command: `python bench/ggml_rounding.py --calib-windows {args.calib_windows} --model {args.model} "
        f"--methods {args.methods}`  ",
        f"Machine: {machine()}; commit {commit()}; {seconds:.0f} s.  ",
        "",
        f"{REFERENCE_LINE}{reference(args.model)}.",
        "",
        f"Error: tr(dW H dW^T) per tensor, H from {args.calib_windows} x 512 tokens sampled from the model "
        "(the same text llama-imatrix read). Ratio: per tensor, error / llama.cpp-with-imatrix's error.",
        "",
        markdown_table(["type", "quantizer", "tensors", "summed error", "median ratio to llama.cpp imatrix",
                        "share of tensors below llama.cpp imatrix"], rows),
        "",
    ])
    out = ROOT / "bench" / "results" / "ggml_rounding.md"
    atomic_write_text(out, text + ("\n" + earlier if (earlier := earlier_rows(out, text)) else ""))
    print(text)


if __name__ == "__main__":
    main()
