"""GGUF export from a Hugging Face source: llama.cpp's own converter (pinned source) writes the metadata
and tokenizer and shows where each matrix goes; the file loads in the pinned llama.cpp, whose
log-probabilities agree with mixq's evaluation of the same quantized weights.

The models are tiny random ones of each family llama.cpp runs, with SmolLM2's real BPE tokenizer
(the converter identifies a tokenizer by its pre-tokenizer, so a made-up one is refused). Their
weights are drawn wide enough (initializer_range 0.2) that the next-token distributions are far from
uniform: a matrix placed wrongly (rows out of order, a vector left untransformed) moves llama.cpp's
log-probabilities by as much as quantizing does, and the test asks for 20x less.
"""

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFReader

from conftest import save_tiny_model
from test_llama_cpp import llama_cpp_log_probs
from mixq.cli import main
from mixq.data import WindowSpec, load_windows
from mixq.export import native
from mixq.export.gguf import ALIGNMENT_SLACK, export_gguf
from mixq.export.llama_cpp import llama_cpp_source
from mixq.formats import parse_format
from mixq.models import load_model, materialize, source_gguf
from mixq.options import KEEP, OptionSpace
from mixq.plan import Budget
from mixq.profile import Profile, ProfileSettings, build_profile, calibrate
from mixq.quantize import QuantizedModel

pytestmark = pytest.mark.slow
N_CTX, N_CHUNKS = 64, 4
# Families whose tiny models llama.cpp and transformers compute alike (KL < 1e-5 unquantized), with the
# tokenizer each is given: SmolLM2's, or Qwen2's vocabulary from llama.cpp's own test vocabularies
# (qwen2's tokenizer class replaces SmolLM2's pre-tokenizer with its own). phi3 is given a GPT-2
# tokenizer, as Phi-4 has (the converter reads a SentencePiece model otherwise); the Gemmas a
# SentencePiece model trained here with Gemma's special pieces, as their converter reads `tokenizer.model`.
# llama.cpp takes Gemma 3's layer pattern as five sliding-window layers to one global (the converter
# writes none), so the 2-layer gemma3_text has both layers sliding. llama's q/k/v/o carry biases, so
# vectors the converter takes as they are are covered; mistral, olmo2, qwen2_moe and mixtral have an
# output matrix of their own (llama.cpp's olmo2 and qwen2moe require one).
# The mixtures of experts (a layer's experts are one GGUF tensor, so they share a type) route on
# routers drawn to prefer some experts, as conftest's tiny MoE models do.
FAMILIES = {"llama": dict(attention_bias=True), "mistral": dict(tied=False), "qwen2": {}, "qwen3": {},
            "olmo2": dict(tied=False), "granite": {}, "phi3": {}, "qwen2_moe": dict(tied=False),
            "mixtral": dict(tied=False), "gemma2": {},
            "gemma3_text": dict(layer_types=["sliding_attention"] * 2)}
QWEN2_VOCAB = "ggml-vocab-qwen2.gguf"
PRE_TOKENIZER = {"qwen2": "qwen2", "qwen2_moe": "qwen2", "gemma2": "default", "gemma3_text": "default"}  # else SmolLM2's


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    path = source_gguf("smollm2-135m")
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def sentencepiece_model(root: Path) -> Path:
    """A SentencePiece BPE model with Gemma's special pieces at Gemma's ids (pad, eos, bos, unk, then
    mask and the turn markers), trained on the test text, as `root/tokenizer.model`."""
    import sentencepiece

    from conftest import make_text

    root.mkdir(parents=True, exist_ok=True)
    (root / "corpus.txt").write_text(make_text(20000))
    sentencepiece.SentencePieceTrainer.train(
        input=str(root / "corpus.txt"), model_prefix=str(root / "tokenizer"), vocab_size=512, model_type="bpe",
        byte_fallback=True, pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>",
        bos_piece="<bos>", unk_piece="<unk>", user_defined_symbols=["<mask>", "<start_of_turn>", "<end_of_turn>"],
        minloglevel=2)
    return root / "tokenizer.model"


def tokenizer_for(model_type: str, smollm2_tokenizer, scratch: Path):
    """The tokenizer a tiny model of `model_type` is saved with (see FAMILIES)."""
    from transformers import AutoTokenizer, GemmaTokenizer

    if model_type in ("qwen2", "qwen2_moe"):
        return AutoTokenizer.from_pretrained(llama_cpp_source() / "models", gguf_file=QWEN2_VOCAB)
    if model_type.startswith("gemma"):  # transformers converts the SentencePiece model (with protobuf)
        return GemmaTokenizer.from_pretrained(sentencepiece_model(scratch).parent)
    return smollm2_tokenizer


def as_gpt2_tokenizer(model_dir: Path) -> None:
    config_file = model_dir / "tokenizer_config.json"
    config_file.write_text(json.dumps(json.loads(config_file.read_text()) | {"tokenizer_class": "GPT2Tokenizer"}))


def mixed_export(source: Path, tmp: Path) -> tuple[Path, Path]:
    """Every matrix in one of five ggml types (cycled; the experts of a stack share one), saved by mixq
    and exported to GGUF."""
    loaded = load_model(str(source))
    types = itertools.cycle(["q8_0", "q5_1", "q5_0", "q4_1", "q4_0"])
    type_of: dict[str, str] = {}
    result = QuantizedModel()
    for name, ref in loaded.plannable().items():
        W = loaded.read(ref.param)
        W = W if ref.expert is None else W[ref.expert]
        fmt = type_of.setdefault(ref.param if ref.expert is not None else name, next(types))
        result.tensors[name] = parse_format(fmt).fit(W, torch.ones(W.shape[1]), clip_grid=4)
    run = tmp / "run"
    run.mkdir()
    native.save(run, loaded, result, {"model": loaded.spec})
    export_gguf(run, tmp / "out.gguf")
    return run, tmp / "out.gguf"


def mean_kl(theirs, model) -> float:
    with torch.no_grad():
        logits = model(torch.from_numpy(theirs.tokens).long()).logits.float()
    ours = torch.log_softmax(logits, dim=-1)[:, theirs.first : N_CTX - 1].numpy()
    return float((np.exp(theirs.log_probs) * (theirs.log_probs - ours)).sum(-1).mean())


@pytest.mark.parametrize("model_type", FAMILIES)
def test_export_from_hugging_face_runs_in_llama_cpp(model_type, smollm2_tokenizer, tmp_path):
    # llama.cpp gives a model named like Phi-3 Phi-3's SentencePiece special tokens: this one is Phi-4-like.
    name = "tiny-phi4" if model_type == "phi3" else f"tiny-{model_type}"
    tokenizer = tokenizer_for(model_type, smollm2_tokenizer, tmp_path / "tokenizer")
    source = save_tiny_model(tmp_path / name, model_type, initializer_range=0.2, tokenizer=tokenizer,
                             **FAMILIES[model_type])
    if model_type == "phi3":
        as_gpt2_tokenizer(source)
    if model_type.startswith("gemma"):  # transformers saves tokenizer.json only; Gemma's converter reads the model
        shutil.copy(tmp_path / "tokenizer" / "tokenizer.model", source)
    run, gguf_path = mixed_export(source, tmp_path)

    reader = GGUFReader(gguf_path)
    assert reader.fields["tokenizer.ggml.pre"].contents() == PRE_TOKENIZER.get(model_type, "smollm")
    assert reader.fields["general.name"].contents().lower().startswith("tiny")  # named after the source
    types = {t.tensor_type.name for t in reader.tensors}
    assert {"Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "F32"} <= types

    theirs = llama_cpp_log_probs(gguf_path, tmp_path, N_CTX, N_CHUNKS)
    loaded = load_model(str(source))
    to_mixq = mean_kl(theirs, materialize(loaded, native.NativeSource(run)))
    to_unquantized = mean_kl(theirs, materialize(loaded))
    assert to_unquantized > 1e-3, "the model's distributions are too flat to tell placements apart"
    assert to_mixq < to_unquantized / 20, (to_mixq, to_unquantized)


def test_a_tokenizer_llama_cpp_does_not_know_is_one_clear_error(tiny_llama_dir, text_file, tmp_path, capsys):
    """The tiny test models' word-level tokenizer has no llama.cpp pre-tokenizer: refused, nothing written."""
    out = tmp_path / "q4_0"
    assert main(["quantize", str(tiny_llama_dir), "--format", "q4_0", "--method", "rtn", "--calib-text", str(text_file),
                 "--calib-windows", "2", "--calib-len", "32", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["export", str(out), "--to", "gguf", str(tmp_path / "m.gguf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mixq: error: llama.cpp's converter cannot convert this model") and "pre-tokenizer" in err
    assert err.count("\n") == 1 and list(tmp_path.glob("*.gguf")) == [] and list(tmp_path.glob(".*")) == []


@pytest.mark.parametrize("model_type,formats", [("llama", "gguf"), ("llama", "int4-g32,int5-g32,int8-g32-sym"),
                                                ("mixtral", "gguf")])
def test_a_budget_for_the_gguf_target_is_the_exported_file(model_type, formats, smollm2_tokenizer, text_file, tmp_path,
                                                           capsys):
    """--target gguf measures the budget in the GGUF that the export writes (metadata and tokenizer from
    llama.cpp's converter included): the file is at most the predicted size, which is within the
    alignment bound of it and within the budget. Integer grids count as the ggml types they are
    written as (int4-g32 takes Q4_1's 20 bytes per 32 weights, not mixq's 18.5). A mixture of experts'
    plan gives each layer's experts one type, as its one GGUF tensor needs."""
    source = save_tiny_model(tmp_path / "tiny", model_type, tied=False, tokenizer=smollm2_tokenizer)
    out, gguf_path = tmp_path / "q", tmp_path / "q.gguf"
    assert main(["quantize", str(source), "--budget", "8bpw", "--target", "gguf", "--formats", formats,
                 "--calib-text", str(text_file), "--calib-windows", "8", "--calib-len", "64", "--out", str(out)]) == 0
    assert main(["export", str(out), "--to", "gguf", str(gguf_path)]) == 0
    summary = json.loads((out / native.INFO_FILE).read_text())["plan_summary"]
    size, predicted = gguf_path.stat().st_size, summary["max_file_bytes"]
    n_tensors = len(GGUFReader(gguf_path).tensors)
    assert size <= predicted <= Budget.parse("8bpw").total_bytes(summary["n_weights"])
    assert predicted - size <= ALIGNMENT_SLACK * n_tensors
    assert len({t.tensor_type for t in GGUFReader(gguf_path).tensors}) >= 3  # a mix, not one type


def test_experts_of_one_layer_in_two_types_are_refused(smollm2_tokenizer, tmp_path, capsys):
    """A plan made without --target gguf may give one layer's experts different types; llama.cpp keeps
    them in one tensor of one type: one clear error, nothing written."""
    source = save_tiny_model(tmp_path / "tiny-mixtral", "mixtral", tied=False, tokenizer=smollm2_tokenizer)
    loaded = load_model(str(source))
    result = QuantizedModel()
    for i, (name, ref) in enumerate(loaded.plannable().items()):
        W = loaded.read(ref.param)
        W = W if ref.expert is None else W[ref.expert]
        result.tensors[name] = parse_format("q8_0" if i % 2 else "q4_0").fit(W, torch.ones(W.shape[1]), clip_grid=4)
    run = tmp_path / "run"
    run.mkdir()
    native.save(run, loaded, result, {"model": loaded.spec})
    capsys.readouterr()
    assert main(["export", str(run), "--to", "gguf", str(tmp_path / "m.gguf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mixq: error: llama.cpp stores blk.0.ffn_") and "--target gguf" in err, err
    assert err.count("\n") == 1 and list(tmp_path.glob("*.gguf")) == [] and list(tmp_path.glob(".*")) == []


def test_the_gguf_target_prices_llama_cpps_input_rounding(smollm2_tokenizer, tmp_path, text_file):
    """With --target gguf every option carries the output error of llama.cpp rounding the matrix's
    inputs: one value per block width (Q8_0 for the 32-wide types, Q8_K for the 256-wide ones, the
    larger), none for a kept matrix. The calibrated estimators add its KL to each option's (unless asked
    for the weights' part alone); the raw ones do not; a saved profile keeps it."""
    loaded = load_model(str(save_tiny_model(tmp_path / "wide", tokenizer=smollm2_tokenizer, hidden_size=256,
                                            intermediate_size=512, head_dim=64)))
    calib = load_windows(loaded, WindowSpec(4, 64, text_file), first=False)
    held_out = load_windows(loaded, WindowSpec(2, 64, text_file, seed=9), first=False)
    space = OptionSpace(formats=("q4_0", "q8_0", "q4_k"), methods=("rtn",))
    p = build_profile(loaded, calib, held_out, ProfileSettings(space=space, measure=("q4_0", "q4_k"), target="gguf",
                                                               fisher_windows=0, batch_size=4))
    inputs, o = p.errors["inputs"], {name: p.options.index(name) for name in p.options}
    assert p.info["input_blocks"] == [32, 256]
    assert (inputs[:, o[KEEP]] == 0).all()
    assert np.array_equal(inputs[:, o["q4_0-rtn"]], inputs[:, o["q8_0-rtn"]])
    assert (inputs[:, o["q4_k-rtn"]] > inputs[:, o["q4_0-rtn"]]).all() and (inputs[:, o["q4_0-rtn"]] > 0).all()
    weights_only = p.predicted("hessian+kl", engine_inputs=False)
    assert np.array_equal(weights_only, calibrate(p.errors["hessian"], p.measured, p.kinds, p.blocks))
    added = p.predicted("hessian+kl") - weights_only
    assert (added[:, o[KEEP]] == 0).all() and (added[:, o["q4_k-rtn"]] > added[:, o["q4_0-rtn"]]).all()
    assert (added[:, o["q4_0-rtn"]] > 0).all()
    assert p.predicted("hessian") is p.errors["hessian"]
    p.save(tmp_path / "p.profile")
    assert np.array_equal(Profile.load(tmp_path / "p.profile").errors["inputs"], inputs)
