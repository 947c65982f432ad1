"""GGUF files of other architectures, written by llama.cpp's own converter from tiny random models.

The converter comes with llama.cpp's source (the pinned llama-cpp-python sdist that
scripts/build-llama-cpp unpacks). It needs a tokenizer it recognises, so these models carry
SmolLM2's. transformers' GGUF config reader leaves some sizes at their defaults (Qwen3's head_dim,
Qwen3-MoE's expert width), so the tiny models use those defaults.
"""

import subprocess
import sys

import pytest
import torch
from conftest import FAMILY_CONFIGS

from mixq.cli import main
from mixq.export.llama_cpp import tools_dir
from mixq.models import load_model
from mixq.models.embedded import resolve_embedded

pytestmark = pytest.mark.slow
GGUF_FAMILIES = {
    "qwen3": dict(head_dim=128),
    "gemma3_text": dict(head_dim=16),
    "qwen3_moe": dict(head_dim=128, moe_intermediate_size=768),
}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    converter = tools_dir().parent.parent / "src" / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
    smol = resolve_embedded("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(str(smol.parent), gguf_file=smol.name)
    root = tmp_path_factory.mktemp("gguf")
    out = {}
    for family, sizes in GGUF_FAMILIES.items():
        extra = {k: v for k, v in FAMILY_CONFIGS[family].items() if v is not None} | sizes
        config = AutoConfig.for_model(
            family, vocab_size=len(tokenizer), hidden_size=64, intermediate_size=160, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **extra)
        torch.manual_seed(0)
        hf = root / family
        AutoModelForCausalLM.from_config(config).save_pretrained(hf)
        tokenizer.save_pretrained(hf)
        gguf = root / f"{family}.gguf"
        proc = subprocess.run([sys.executable, str(converter), str(hf), "--outtype", "f32", "--outfile", str(gguf)],
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-2000:]
        out[family] = (hf, gguf)
    return out


@pytest.mark.parametrize("family", list(GGUF_FAMILIES))
def test_gguf_weights_equal_the_hugging_face_ones(converted, family):
    hf, gguf = converted[family]
    ours, theirs = load_model(str(gguf)), load_model(str(hf))
    assert ours.config.model_type == family and list(ours.plannable()) == list(theirs.plannable())
    for b in range(theirs.n_blocks):
        a, c = ours.block_weights(b), theirs.block_weights(b)
        assert a.keys() == c.keys()
        for name in c:
            torch.testing.assert_close(a[name], c[name], rtol=0, atol=0, msg=name)
    for name in theirs.residents:
        torch.testing.assert_close(ours.residents[name], theirs.residents[name], rtol=0, atol=0)
    rows = slice(7, 300)  # the output matrix read a slice of rows at a time
    assert torch.equal(ours.head_rows(rows), ours.head()[rows])
    assert torch.equal(ours.head_rows(rows), theirs.head_rows(rows))
    q_proj = "model.layers.0.self_attn.q_proj.weight"  # rows reordered by transformers' processor: read whole
    assert torch.equal(ours.read(q_proj, rows=slice(16, 40)), theirs.read(q_proj)[16:40])


@pytest.mark.parametrize("family", list(GGUF_FAMILIES))
def test_quantize_a_gguf_to_a_ggml_type(converted, text_file, tmp_path, capsys, family):
    _, gguf = converted[family]
    code = main([str(a) for a in ("quantize", gguf, "--format", "q4_k", "--calib-text", text_file,
                                  "--calib-windows", 4, "--calib-len", 64, "--eval-text", text_file,
                                  "--eval-windows", 2, "--eval-len", 64, "--out", tmp_path / "q")])
    assert code == 0, capsys.readouterr().err
    assert "KL mean" in capsys.readouterr().out


def test_a_mixture_of_experts_from_a_gguf_exports_to_gguf(converted, text_file, tmp_path, capsys):
    """A mixed plan of a Qwen3-MoE GGUF (each layer's experts one type, their gate and up merged into one
    stack on load) written back as GGUF: read again, every matrix, each expert's included, is exactly
    the weights mixq's own output holds."""
    from mixq.export.native import NativeSource

    _, gguf = converted["qwen3_moe"]
    out, exported = tmp_path / "q", tmp_path / "q.gguf"
    code = main([str(a) for a in ("quantize", gguf, "--budget", "8bpw", "--target", "gguf", "--formats", "gguf",
                                  "--calib-text", text_file, "--calib-windows", 4, "--calib-len", 64,
                                  "--fisher-windows", 0, "--out", out)])
    assert code == 0, capsys.readouterr().err
    assert main(["export", str(out), "--to", "gguf", str(exported)]) == 0
    ours, written = NativeSource(out), load_model(str(exported))
    stacks = [p for p in ours.names if ".experts." in p]
    assert stacks and len({ours._entries[n]["format"] for n in ours._entries if ".experts." in n}) >= 2  # a mix
    for b in range(written.n_blocks):
        prefix = written.layout.block_prefix(b)
        for name, weight in written.block_weights(b).items():
            if weight.dim() >= 2:
                assert torch.equal(weight, ours.get(prefix + name)), name
