"""A full-precision stand-in of a shipped quantized GGUF model: weights that lie on no grid.

A shipped quantized file's dequantized weights lie on its grid, which flatters any quantizer that
is measured against them. The stand-in adds back, to each weight of a quantized tensor, independent
uniform noise U(-step/2, +step/2), where step is the quantization step of the weight's (sub-)block
in the shipped ggml format: Q4_1/Q8_0 its fp16 scale d, the k-quants d * sc of its sub-block. That
is the rounding the shipped file removed, drawn again. Tensors stored as F32/F16/BF16 keep their
values. The noise is seeded per tensor (seed and tensor name), so the result does not depend on the
order or chunking in which tensors are processed.

Writes, into --out (default ~/.cache/mixq/standins/NAME):
- NAME-standin-f32.gguf: every tensor as F32, same names and order, every metadata and tokenizer
  field of the source, general.file_type ALL_F32, plus mixq.standin.seed and mixq.standin.source;
- hf/: a Hugging Face directory in bfloat16 (config, tokenizer, model.safetensors), converted from
  that GGUF by transformers;
- standin.json: the stand-in's weight change (||W' - W|| / ||W|| per tensor), its own KL to the
  shipped model on held-out text (the F32 GGUF and the bf16 directory each), and wall times.
Each output is written under a temporary name and renamed; outputs already there are kept, and
a complete standin.json with the same settings means there is nothing left to do.

    .venv/bin/python bench/standin.py [--model smollm2-135m | --model FILE.gguf] [--seed 0]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType
from gguf.quants import dequantize
from tqdm.auto import tqdm

from mixq.errors import MixqError
from mixq.export.gguf import copy_field
from mixq.formats import QTensor
from mixq.formats.ggml import GGML_FORMATS

# Types whose levels are evenly spaced, so a weight's rounding step is its (sub-)block scale; the IQ
# codebooks' spacing varies by level.
STEPPED = {name: fmt for name, fmt in GGML_FORMATS.items() if fmt.codebook is None}
from mixq.models.gguf_file import read_gguf

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TEXT = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
KEPT_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)
# The header's own fields, the architecture (GGUFWriter writes it first) and the file type, which changes.
NOT_COPIED = ("GGUF.", "general.architecture", "general.file_type")
SEED_KEY, SOURCE_KEY = "mixq.standin.seed", "mixq.standin.source"
CHUNK_WEIGHTS = 1 << 22  # weights processed at once: temporaries stay small on a 152k x 1536 embedding
TOKENIZER_SAMPLE_CHARS = 50_000  # of the held-out text, tokenized by both outputs' tokenizers
MAX_STEP_FRACTION = 0.5 + 1e-4  # |W' - W| / step, with slack for float32 rounding of the sum


# -- the stand-in itself ------------------------------------------------------------------------

def standin_weights(weights: torch.Tensor, step: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """`weights` (float32) plus independent noise U(-step/2, +step/2) per weight, drawn from `gen`:
    the rounding to a grid of that step, put back. `step` has the shape of `weights`."""
    noise = torch.rand(weights.shape, generator=gen, dtype=torch.float32) - 0.5  # exact: rand is k * 2**-24
    return weights + noise * step


def block_steps(q: QTensor) -> torch.Tensor:
    """Each weight's quantization step: |scale| of its sub-block (Q4_1, Q8_0: d; k-quants: d * sc,
    which the symmetric k-quants may store negative)."""
    return q.format.expand(q.scale).abs()


def tensor_generator(seed: int, name: str) -> torch.Generator:
    """A generator for one tensor's noise, from the seed and the tensor's name only."""
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little"))


def matrix_shape(t) -> tuple[int, int]:
    """A GGUF tensor as (rows, cols): ggml's first dimension is the row (and block) direction."""
    cols = int(t.shape[0])
    return int(t.n_elements) // cols, cols


def shipped_chunks(t) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor | None]]:
    """Slices of rows of GGUF tensor `t` with the shipped weights there, (rows, cols) float32 as gguf-py
    dequantizes them, and each weight's step (None for a tensor stored as floats)."""
    rows, cols = matrix_shape(t)
    data = t.data.reshape(rows, -1)
    fmt = None
    if t.tensor_type not in KEPT_TYPES:
        fmt = STEPPED.get(t.tensor_type.name.lower())
        if fmt is None:
            raise MixqError(f"{t.name} is stored as {t.tensor_type.name}, whose quantization step mixq does not "
                            f"know (it reads {', '.join(sorted(STEPPED))} and float types)")
    per_chunk = max(1, CHUNK_WEIGHTS // cols)
    for start in range(0, rows, per_chunk):
        where = slice(start, min(rows, start + per_chunk))
        chunk = np.array(data[where])  # a copy: torch takes no read-only view of the mapped file
        shipped = torch.from_numpy(dequantize(chunk, t.tensor_type).reshape(-1, cols))
        if fmt is None:
            yield where, shipped, None
            continue
        q = fmt.unpack({"blocks": torch.from_numpy(chunk)}, (where.stop - where.start, cols))
        if not torch.equal(q.dequantize(), shipped):  # the steps must be those of exactly these weights
            raise MixqError(f"{t.name}: mixq's {fmt.name} unpacking disagrees with gguf-py's dequantization")
        yield where, shipped, block_steps(q)


def standin_tensor(t, seed: int) -> np.ndarray:
    """The stand-in of GGUF tensor `t` as float32, in the tensor's numpy shape."""
    out = np.empty(matrix_shape(t), dtype=np.float32)
    gen = tensor_generator(seed, t.name)
    for rows, shipped, step in shipped_chunks(t):
        out[rows] = (shipped if step is None else standin_weights(shipped, step, gen)).numpy()
    return out.reshape(numpy_shape(t))


def numpy_shape(t) -> tuple[int, ...]:
    return tuple(reversed([int(n) for n in t.shape]))


# -- outputs ------------------------------------------------------------------------------------

def write_standin_gguf(source: Path, out: Path, seed: int) -> None:
    """Write the stand-in of GGUF file `source` to `out` as an all-F32 GGUF, one tensor at a time
    (tensor infos go first, so no tensor is held beyond the one being written)."""
    reader = read_gguf(source)
    tmp = out.with_name(f".{out.name}.partial")
    writer = GGUFWriter(tmp, str(reader.fields["general.architecture"].contents()))
    try:
        for key, field in reader.fields.items():
            if not key.startswith(NOT_COPIED):
                copy_field(writer, key, field)
        writer.add_file_type(LlamaFileType.ALL_F32)
        writer.add_uint32(SEED_KEY, seed)
        writer.add_string(SOURCE_KEY, source.name)
        for t in reader.tensors:
            writer.add_tensor_info(t.name, numpy_shape(t), np.dtype(np.float32), 4 * int(t.n_elements))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in tqdm(reader.tensors, desc="stand-in GGUF", unit="tensor"):
            writer.write_tensor_data(standin_tensor(t, seed))
        writer.close()
        tmp.replace(out)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)


def standin_seed(path: Path) -> int | None:
    """The seed a stand-in GGUF was made with, or None if it is no stand-in."""
    field = read_gguf(path).fields.get(SEED_KEY)
    return None if field is None else int(field.contents())


def write_hf(gguf_path: Path, out: Path) -> None:
    """The bf16 Hugging Face directory of a GGUF file, as transformers converts it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    from mixq.atomic import atomic_dir
    from mixq.models.source import gguf_metadata_parsed_once

    kwargs = dict(gguf_file=gguf_path.name)
    with atomic_dir(out, overwrite=True) as tmp, gguf_metadata_parsed_once():
        # Dequantized to plain modules: a model whose weights stay in GGUF blocks cannot be saved.
        model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), dtype=torch.bfloat16,
                                                     quantization_config=GgufConfig(dequantize=True), **kwargs)
        model.save_pretrained(tmp)
        del model
        AutoTokenizer.from_pretrained(str(gguf_path.parent), **kwargs).save_pretrained(tmp)


# -- checks and measurements --------------------------------------------------------------------

def weight_change(source: Path, standin: Path) -> dict:
    """Compare the written stand-in with the shipped weights, tensor by tensor: same names, order and
    shapes, all F32; float tensors unchanged; quantized ones moved by at most half a step. Returns
    ||W' - W|| / ||W|| of the quantized tensors (mean, max, over all of them together, per type)."""
    shipped_tensors = read_gguf(source).tensors
    written = read_gguf(standin).tensors
    if [t.name for t in written] != [t.name for t in shipped_tensors]:
        raise MixqError(f"{standin} does not hold the tensors of {source} in the same order")
    relative: dict[str, tuple[str, float]] = {}
    total_diff = total_norm = worst = 0.0
    for t, w in tqdm(list(zip(shipped_tensors, written)), desc="checking", unit="tensor"):
        if w.tensor_type != GGMLQuantizationType.F32 or numpy_shape(w) != numpy_shape(t):
            raise MixqError(f"{standin}: {t.name} is not F32 of shape {numpy_shape(t)}")
        standin_values = w.data.reshape(matrix_shape(t))
        diff = norm = 0.0
        for rows, shipped, step in shipped_chunks(t):
            moved = torch.from_numpy(np.array(standin_values[rows])) - shipped
            if step is None:
                if moved.any():
                    raise MixqError(f"{standin}: {t.name} is stored as floats in the source but was changed")
                continue
            if (moved[step == 0] != 0).any():
                raise MixqError(f"{standin}: {t.name} moved weights whose step is 0")
            fraction = (moved.abs() / step)[step > 0]
            worst = max(worst, float(fraction.max())) if fraction.numel() else worst
            diff += float(moved.double().square().sum())
            norm += float(shipped.double().square().sum())
        if t.tensor_type not in KEPT_TYPES:
            relative[t.name] = (t.tensor_type.name, math.sqrt(diff / norm) if norm > 0 else 0.0)
            total_diff, total_norm = total_diff + diff, total_norm + norm
    if worst > MAX_STEP_FRACTION:
        raise MixqError(f"{standin}: a weight moved {worst:.4f} of its step, more than half")
    if not relative:
        raise MixqError(f"{source} holds no quantized tensor: it is its own full-precision reference")
    by_type: dict[str, list[float]] = {}
    for kind, r in relative.values():
        by_type.setdefault(kind, []).append(r)
    values = [r for _, r in relative.values()]
    return dict(
        mean_rel_change=sum(values) / len(values), max_rel_change=max(values),
        total_rel_change=math.sqrt(total_diff / total_norm), max_step_fraction=worst,
        n_changed=len(relative), n_kept=len(written) - len(relative),
        by_type={k: dict(tensors=len(v), mean_rel_change=sum(v) / len(v)) for k, v in sorted(by_type.items())},
    )


def check_outputs(gguf_path: Path, hf_dir: Path, sample: str):
    """Load both outputs with mixq; both tokenizers split `sample` alike, and every parameter of the
    bf16 directory is the F32 GGUF's, rounded to bf16. Returns the two loaded models."""
    from mixq.models import load_model

    f32, bf16 = load_model(str(gguf_path)), load_model(str(hf_dir))
    if f32.tokenizer(sample)["input_ids"] != bf16.tokenizer(sample)["input_ids"]:
        raise MixqError(f"the tokenizer of {hf_dir} splits text unlike that of {gguf_path}")
    if f32.parameters() != bf16.parameters():
        raise MixqError(f"{hf_dir} and {gguf_path} do not have the same parameters")
    for name in f32.parameters():
        if not torch.equal(f32.read(name).bfloat16().float(), bf16.read(name)):
            raise MixqError(f"{hf_dir}: {name} is not the stand-in GGUF's, rounded to bf16")
    return f32, bf16


def measure_kl(model: str, standins: dict, text: Path, n_windows: int, seq_len: int) -> dict:
    """The shipped model's perplexity, and KL(shipped || stand-in) with each stand-in's perplexity, on
    the first windows of `text`."""
    from mixq.data import WindowSpec, load_windows
    from mixq.evaluate import evaluate, reference_hidden
    from mixq.models import load_model

    shipped = load_model(model)
    windows = load_windows(shipped, WindowSpec(n_windows, seq_len, text))
    out = dict(windows=list(windows.shape), shipped_ppl=evaluate(shipped, windows).ppl)
    reference = reference_hidden(shipped, windows)
    for kind, loaded in standins.items():
        out[kind] = evaluate(shipped, windows, loaded.source, reference=reference).as_dict()
    return out


# -- the script ---------------------------------------------------------------------------------

def resolve(model: str) -> tuple[str, Path]:
    """(name, GGUF path) of an embedded model or a GGUF file."""
    from mixq.models import source_gguf
    from mixq.models.embedded import EMBEDDED

    path = source_gguf(model)
    if path is None:
        raise MixqError(f"{model!r} is neither a GGUF file nor an embedded GGUF model ({', '.join(EMBEDDED)})")
    return (model if model in EMBEDDED else path.stem), path


def run(args: argparse.Namespace) -> dict:
    from mixq.atomic import atomic_write_text
    from mixq.data import CACHE_DIR, read_text

    name, source = resolve(args.model)
    out = (args.out or CACHE_DIR / "standins" / name).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    gguf_path, hf_dir, result_path = out / f"{name}-standin-f32.gguf", out / "hf", out / "standin.json"
    settings = dict(model=args.model, source=str(source), seed=args.seed, text=str(args.text.resolve()),
                    windows=args.windows, seq_len=args.seq_len)
    if gguf_path.exists():
        seed = standin_seed(gguf_path)
        if seed != args.seed:
            raise MixqError(f"{gguf_path} exists with seed {seed}, not {args.seed}: remove it or give another --out")
        if result_path.exists() and hf_dir.is_dir():
            done = json.loads(result_path.read_text())
            if done.get("settings") == settings:
                print(f"{result_path} is complete for these settings; nothing to do")
                return done
    seconds: dict[str, float | None] = dict(gguf=None, hf=None)
    start = time.perf_counter()
    if not gguf_path.exists():
        write_standin_gguf(source, gguf_path, args.seed)
        seconds["gguf"] = time.perf_counter() - start
        if hf_dir.exists():  # made from a GGUF that is gone: stale
            print(f"replacing {hf_dir}, made from an earlier stand-in GGUF")
    if seconds["gguf"] is not None or not (hf_dir / "model.safetensors").is_file():
        t0 = time.perf_counter()
        write_hf(gguf_path, hf_dir)
        seconds["hf"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    weights = weight_change(source, gguf_path)
    f32, bf16 = check_outputs(gguf_path, hf_dir, read_text(args.text)[:TOKENIZER_SAMPLE_CHARS])
    seconds["check"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    kl = measure_kl(args.model, {"f32_gguf": f32, "bf16_hf": bf16}, args.text, args.windows, args.seq_len)
    seconds["kl"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - start

    sys.path.insert(0, str(ROOT / "bench"))
    from provenance import commit, machine

    result = dict(settings=settings, gguf=str(gguf_path), hf=str(hf_dir), weights=weights, kl=kl,
                  seconds=seconds, commit=commit(), machine=machine())
    atomic_write_text(result_path, json.dumps(result, indent=2) + "\n")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="an embedded GGUF model or a GGUF file")
    parser.add_argument("--out", type=Path, help="output directory (default ~/.cache/mixq/standins/NAME)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="held-out text for the KL")
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args()
    try:
        result = run(args)
    except MixqError as e:
        parser.exit(1, f"error: {e}\n")
    w, kl = result["weights"], result["kl"]
    print(f"stand-in: {result['gguf']}\n          {result['hf']}")
    print(f"weights: ||W'-W||/||W|| mean {w['mean_rel_change']:.4f} over {w['n_changed']} quantized tensors "
          f"(max {w['max_rel_change']:.4f}, all together {w['total_rel_change']:.4f}); "
          f"{w['n_kept']} float tensors unchanged")
    print(f"shipped ppl {kl['shipped_ppl']:.3f} on {kl['windows'][0]} x {kl['windows'][1]} tokens")
    for kind in ("f32_gguf", "bf16_hf"):
        r = kl[kind]
        print(f"KL(shipped || stand-in {kind}): mean {r['kl_mean']:.5f}, p99 {r['kl_p99']:.4f}, "
              f"top-1 {r['top1']:.4f}, ppl {r['ppl']:.3f}")
    print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in result["seconds"].items() if v is not None))


if __name__ == "__main__":
    main()
