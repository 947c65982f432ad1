"""`--device cuda` against `--device cpu`: the same commands agree. Skipped without a CUDA device;
on a machine with one, `python -m pytest -q tests/test_device.py` checks the CUDA paths.

Passes run their matmuls in float32 (`--fp32-passes`) so that the two devices differ only by the
order of their sums: the statistics then agree to ~1e-6, and the quantizers (on the CPU either way)
round the same weights the same way but for rare ties.
"""

import json
import math

import pytest
import torch

from mixq.cli import main
from mixq.export import native
from mixq.profile import Profile

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ("cpu", "cuda")


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    cap = capsys.readouterr()
    assert code == 0, cap.err


def calibration(text_file):
    return ["--calib-text", text_file, "--calib-windows", 8, "--calib-len", 64, "--fp32-passes"]


def quantized(capsys, tmp_path, model, text_file, *extra) -> dict[str, tuple[dict, object]]:
    """Per device: (info, output directory) of `mixq quantize` with `extra`, evaluated on the text."""
    outputs = {}
    for device in DEVICES:
        out = tmp_path / device
        run(capsys, "quantize", model, *calibration(text_file), "--eval-text", text_file, "--eval-windows", 4,
            "--eval-len", 64, "--device", device, *extra, "--out", out)
        outputs[device] = (json.loads((out / native.INFO_FILE).read_text()), out)
    return outputs


def assert_same_quality(outputs: dict) -> None:
    (cpu, _), (cuda, _) = outputs["cpu"], outputs["cuda"]
    assert cuda["device"] == "cuda" and cpu["device"] == "cpu"
    assert cuda["plan"] == cpu["plan"]
    (a,), (b,) = cpu["evaluations"].values(), cuda["evaluations"].values()
    assert b["ppl"] == pytest.approx(a["ppl"], rel=1e-3)
    assert b["kl_mean"] == pytest.approx(a["kl_mean"], rel=0.02)
    assert abs(b["top1"] - a["top1"]) <= 0.01


@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_quantize_and_eval_agree(tiny_llama_dir, text_file, tmp_path, capsys, method):
    outputs = quantized(capsys, tmp_path, tiny_llama_dir, text_file, "--bits", 3, "--group-size", 32,
                        "--method", method)
    assert_same_quality(outputs)
    sources = {d: native.NativeSource(out) for d, (_, out) in outputs.items()}
    for name in outputs["cpu"][0]["plan"]:
        key = f"{name}.weight"
        a, b = sources["cpu"].get(key), sources["cuda"].get(key)
        assert (a != b).float().mean() < 0.01, name  # rounding ties at most


def test_block_reconstruction_on_cuda(tiny_llama_dir, text_file, tmp_path, capsys):
    """Learned rounding trains on the device: its losses fall there as on the CPU."""
    outputs = quantized(capsys, tmp_path, tiny_llama_dir, text_file, "--bits", 3, "--group-size", 32,
                        "--method", "block", "--norm-tuning", "--block-steps", 5, "--block-batch", 2)
    for info, _ in outputs.values():
        assert len(info["block_losses"]) == 2 and all(after <= before for before, after in info["block_losses"])
    (a,), (b,) = (info["evaluations"].values() for info, _ in outputs.values())
    assert b["kl_mean"] == pytest.approx(a["kl_mean"], rel=0.2)  # trained in bfloat16: near, not equal


def test_profile_agrees(tiny_llama_dir, text_file, tmp_path, capsys):
    """Statistics, Fisher diagonal, errors and KL points measured on the device equal the CPU's."""
    profiles = {}
    for device in DEVICES:
        path = tmp_path / f"{device}.profile"
        run(capsys, "profile", tiny_llama_dir, *calibration(text_file), "--bits-options", "2,3,4", "--group-sizes",
            "32", "--held-out-windows", 2, "--held-out-len", 64, "--fisher-windows", 2, "--device", device,
            "--out", path)
        profiles[device] = Profile.load(path)
    cpu, cuda = profiles["cpu"], profiles["cuda"]
    for kind in ("hessian", "fisher"):
        finite = torch.isfinite(torch.from_numpy(cpu.errors[kind]))
        assert torch.equal(finite, torch.isfinite(torch.from_numpy(cuda.errors[kind])))
        a, b = (torch.from_numpy(p.errors[kind])[finite] for p in (cpu, cuda))
        assert torch.allclose(b, a, rtol=1e-2, atol=1e-9), kind
    measured = [(t, o) for t in range(len(cpu.tensors)) for o in range(len(cpu.options))
                if not math.isnan(cpu.measured[t, o])]
    assert measured
    for t, o in measured:
        assert cuda.measured[t, o] == pytest.approx(cpu.measured[t, o], rel=0.02, abs=1e-7)


def test_sampling_on_cuda(tiny_llama_dir, monkeypatch, tmp_path):
    """The data-free calibration text decodes on the device: valid tokens, as varied as the CPU's."""
    from mixq import data
    from mixq.models import load_model

    loaded = load_model(str(tiny_llama_dir))
    for d in DEVICES:
        monkeypatch.setattr(data, "CACHE_DIR", tmp_path / d)  # each device samples, not reads the other's
        windows = data.sample_windows(loaded, 4, 32, seed=0, device=d)
        assert windows.shape == (4, 32) and windows.device.type == "cpu"
        assert 0 <= int(windows.min()) and int(windows.max()) < loaded.vocab_size
        assert len(windows[:, 1:].unique()) > 8
