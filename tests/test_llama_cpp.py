"""Interop with llama.cpp (built from the pinned llama-cpp-python sdist): a GGUF exported by mixq, with
every ggml type mixq writes, loads in llama.cpp, whose log-probabilities agree with mixq's own
evaluation of the same quantized weights on the same tokens, and whose perplexity is sane.

Tolerance: llama.cpp multiplies quantized weights by activations it quantizes to 8 bits itself (and
keeps its saved log-probs at 16 bits), so agreement is close, not exact. The yardstick is the source
GGUF itself: llama.cpp on the shipped SmolLM2 file vs transformers on its dequantized weights gives
mean KL 0.012 and 96% same top-1 on this text. mixq's export must agree with mixq as well: mean
KL(llama.cpp || mixq) at most 1.5x the source's (and below 0.03), same top-1 at 93% or more.
"""

import itertools
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFReader

from mixq.export import native
from mixq.export.gguf import export_gguf
from mixq.export.llama_cpp import SavedLogProbs, read_saved_log_probs, tools_dir
from mixq.formats import parse_format
from mixq.models import load_model, materialize
from mixq.quantize import QuantizedModel

pytestmark = pytest.mark.slow
TEXT = Path(__file__).parent / "data" / "prose.txt"
N_CTX, N_CHUNKS = 128, 4


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """SmolLM2 with its tensors spread over every ggml type that fits them (and integer grids equal to
    ggml types), saved and exported."""
    tmp = tmp_path_factory.mktemp("llama_cpp")
    loaded = load_model("smollm2-135m")
    # integer grids that are ggml types, written as Q4_0, Q5_1 and Q8_0
    wide = itertools.cycle(["q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "iq4_nl", "int4-g32-sym", "int5-g32", "int8-g32-sym"])
    k_quants = itertools.cycle(["q6_k", "q5_k", "q4_k", "q3_k", "q2_k", "iq4_xs", "iq3_s", "iq3_xxs", "iq2_s",
                                "iq2_xs", "iq2_xxs"])
    result = QuantizedModel()
    for name, ref in loaded.plannable().items():
        W = loaded.read(ref.param)
        fmt = parse_format(next(k_quants) if W.shape[1] % 256 == 0 else next(wide))
        result.tensors[name] = fmt.fit(W, torch.ones(W.shape[1]), clip_grid=4)
    run = tmp / "run"
    run.mkdir()
    native.save(run, loaded, result, {"model": loaded.spec})
    counts, _ = export_gguf(run, tmp / "mix.gguf")
    return loaded, tmp / "mix.gguf", counts, run


def test_every_type_is_written_and_metadata_is_kept(exported):
    loaded, path, counts, _ = exported
    assert {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS", "IQ3_S", "IQ3_XXS", "IQ2_S", "IQ2_XS", "IQ2_XXS", "Q8_0",
            "Q5_1", "Q5_0", "Q4_1", "Q4_0", "IQ4_NL", "F32"} <= set(counts)
    ours, source = GGUFReader(path), GGUFReader(loaded_source(loaded))
    for key, field in source.fields.items():
        if key.startswith("GGUF.") or key == "general.file_type":
            continue
        assert key in ours.fields, key
        assert ours.fields[key].contents() == field.contents(), key
    assert [t.name for t in ours.tensors] == [t.name for t in source.tensors]


def loaded_source(loaded):
    from mixq.models import source_gguf

    return source_gguf(loaded.spec)


def llama_cpp_log_probs(gguf: Path, tmp: Path, n_ctx: int = N_CTX, n_chunks: int = N_CHUNKS) -> SavedLogProbs:
    """llama-perplexity's log-probabilities for `gguf` on the test text."""
    saved = tmp / f"{gguf.stem}.logprobs"
    out = subprocess.run(
        [str(tools_dir() / "llama-perplexity"), "-m", str(gguf), "-f", str(TEXT), "-c", str(n_ctx),
         "--chunks", str(n_chunks), "-t", "2", "--kl-divergence-base", str(saved)],
        capture_output=True, text=True,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return read_saved_log_probs(saved, gguf)


def llama_cpp_vs_torch(gguf: Path, model: torch.nn.Module, tmp: Path) -> tuple[float, float, float]:
    """(mean KL(llama.cpp || torch), same top-1 rate, llama.cpp's perplexity) on the same tokens."""
    theirs = llama_cpp_log_probs(gguf, tmp)
    assert theirs.tokens.shape == (N_CHUNKS, N_CTX)
    with torch.no_grad():
        logits = model(torch.from_numpy(theirs.tokens).long()).logits.float()
    ours = torch.log_softmax(logits, dim=-1)[:, theirs.first : N_CTX - 1].numpy()
    kl = (np.exp(theirs.log_probs) * (theirs.log_probs - ours)).sum(-1)
    top1 = (theirs.log_probs.argmax(-1) == ours.argmax(-1)).mean()
    targets = theirs.tokens[:, theirs.first + 1 :]
    ppl = np.exp(-np.take_along_axis(theirs.log_probs, targets[..., None], -1).mean())
    return float(kl.mean()), float(top1), float(ppl)


def test_llama_cpp_agrees_with_mixq(exported, tmp_path):
    loaded, path, _, run = exported
    kl, top1, ppl = llama_cpp_vs_torch(path, materialize(loaded, native.NativeSource(run)), tmp_path)
    source_kl, _, source_ppl = llama_cpp_vs_torch(loaded_source(loaded), materialize(loaded), tmp_path)
    assert kl <= min(1.5 * source_kl, 0.03), (kl, source_kl)
    assert top1 >= 0.93
    assert ppl < 3 * source_ppl, (ppl, source_ppl)  # sane: low-bit types cost some, not everything


def test_generates_text(exported):
    _, path, _, _ = exported
    out = subprocess.run(
        [str(tools_dir() / "llama-completion"), "-m", str(path), "-p", "The capital of France is", "-n", "8",
         "--temp", "0", "-t", "2", "-no-cnv"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert len(out.stdout.strip()) > len("The capital of France is")


def test_llama_quantize_applies_the_recipe(exported, tmp_path):
    """The plan as a --tensor-type-file: llama.cpp's own quantizer gives every tensor the plan's type."""
    from mixq.export import get_target

    loaded, path, _, run = exported
    recipe = tmp_path / "types.txt"
    message = get_target("llama-quantize-recipe").export(run, recipe, False)
    assert "--imatrix IMATRIX.gguf MODEL" in message and "iq3_xxs only with an imatrix" in message
    lines = recipe.read_text().split()
    imatrix = tmp_path / "imatrix.gguf"  # llama-quantize makes IQ3_XXS only with one
    made = subprocess.run(
        [str(tools_dir() / "llama-imatrix"), "-m", str(loaded_source(loaded)), "-f", str(TEXT), "-o", str(imatrix),
         "-c", str(N_CTX), "--chunks", str(N_CHUNKS), "-t", "2"],
        capture_output=True, text=True, timeout=600,
    )
    assert made.returncode == 0, made.stdout[-2000:] + made.stderr[-2000:]
    out = subprocess.run(
        [str(tools_dir() / "llama-quantize"), "--allow-requantize", "--tensor-type-file", str(recipe),
         "--imatrix", str(imatrix), str(loaded_source(loaded)), str(tmp_path / "requantized.gguf"), "Q8_0", "2"],
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    ours = {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}
    theirs = {t.name: t.tensor_type.name for t in GGUFReader(tmp_path / "requantized.gguf").tensors}
    matrices = [line.split("=")[0].strip("^$").replace("\\", "") for line in lines]
    assert len(matrices) == 211 and set(matrices) <= set(theirs)
    assert {n: theirs[n] for n in matrices} == {n: ours[n] for n in matrices}


def test_rows_a_type_does_not_fit_fall_back_as_llama_quantize_does(exported, tmp_path):
    """SmolLM2's ffn_gate rows are 576 wide, no multiple of 256: given each 256-wide type in turn,
    llama-quantize stores the type that mixq's uniform plans fall back to (`GGMLFormat.fallback`)."""
    from mixq.formats.ggml import GGML_FORMATS

    loaded, _, _, _ = exported
    types = [name for name, fmt in GGML_FORMATS.items() if fmt.fallback]
    wanted = {f"blk.{i}.ffn_gate.weight": name for i, name in enumerate(types)}
    recipe = tmp_path / "types.txt"
    recipe.write_text("".join(f"^{re.escape(tensor)}$={name}\n" for tensor, name in wanted.items()))
    out = subprocess.run(
        [str(tools_dir() / "llama-quantize"), "--allow-requantize", "--tensor-type-file", str(recipe),
         str(loaded_source(loaded)), str(tmp_path / "requantized.gguf"), "Q8_0", "2"],
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    theirs = {t.name: t.tensor_type.name for t in GGUFReader(tmp_path / "requantized.gguf").tensors}
    assert len(wanted) >= 8
    assert {t: theirs[t] for t in wanted} == {t: GGML_FORMATS[n].fallback.upper() for t, n in wanted.items()}
