"""The `mixq` command end to end on a tiny random Llama, and its handling of bad input."""

import json
import math

import pytest
import torch

from mixq.cli import main
from mixq.export import native


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    return code, capsys.readouterr()


def assert_refused(capsys, tmp_path, *argv, match=""):
    out = tmp_path / "out"
    code, cap = run(capsys, *argv, "--out", out)
    assert code == 2
    errors = [line for line in cap.err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("mixq: error:"), cap.err
    assert match in errors[0]
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []  # no partial output


def tiny_args(tiny_llama_dir, text_file):
    return ["quantize", tiny_llama_dir, "--calib-text", text_file, "--calib-windows", 8, "--calib-len", 64]


def test_quantize_then_eval_reproduces_metrics(tiny_llama_dir, text_file, tmp_path, capsys):
    out = tmp_path / "q"
    code, cap = run(capsys, *tiny_args(tiny_llama_dir, text_file), "--bits", 3, "--group-size", 32,
                    "--eval-text", text_file, "--eval-windows", 4, "--eval-len", 64, "--out", out)
    assert code == 0, cap.err
    info = json.loads((out / native.INFO_FILE).read_text())
    assert info["settings"]["format"] == "int3-g32" and len(info["plan"]) == 14  # 2 blocks x 7 linears
    assert info["device"] == ("cuda" if torch.cuda.is_available() else "cpu")  # --device auto
    (first,) = info["evaluations"].values()
    assert math.isfinite(first["ppl"]) and first["kl_mean"] > 0 and 0 < first["top1"] <= 1
    assert "bpw" in cap.out and "KL mean" in cap.out

    code, cap = run(capsys, "eval", out, "--text", text_file, "--windows", 4, "--seq-len", 64)
    assert code == 0, cap.err
    (again,) = json.loads((out / native.INFO_FILE).read_text())["evaluations"].values()
    for key in ("ppl", "kl_mean", "kl_p99", "top1"):
        assert again[key] == pytest.approx(first[key], rel=1e-6, abs=1e-9), key


def test_existing_output_needs_overwrite(tiny_llama_dir, text_file, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    code, cap = run(capsys, *tiny_args(tiny_llama_dir, text_file), "--out", tmp_path / "out")
    assert code == 2 and "--overwrite" in cap.err


def test_failure_leaves_no_output_but_a_resumable_run(tiny_llama_dir, text_file, tmp_path, capsys, monkeypatch):
    real_save = native.save

    def broken_save(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "out"))

    monkeypatch.setattr(native, "save", broken_save)
    command = [str(a) for a in (*tiny_args(tiny_llama_dir, text_file), "--out", tmp_path / "out")]
    assert main(command) == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith(f"mixq: error: No space left on device: {tmp_path / 'out'} (")
    assert [p.name for p in tmp_path.iterdir()] == [".out.resume"]  # every block's work, kept
    monkeypatch.setattr(native, "save", real_save)
    assert main(command) == 0
    assert "resuming from" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize(
    "extra, match",
    [(["--bits", "9"], "bits must be between 2 and 8"), (["--bits", "1"], "bits must be"),
     (["--group-size", "100"], "group size must be"), (["--method", "magic"], "unknown method"),
     # the model's own limits, before any work (the tiny model's context is 256 tokens)
     (["--calib-len", "300"], "--calib-len: windows of 300 tokens are longer than the model's context of 256"),
     (["--calib-windows", "1000000000"], "1000000000 windows of 64 tokens need 30517.6 GiB of hidden states"),
     (["--budget", "5bpw", "--held-out-len", "1000"], "--held-out-len: windows of 1000 tokens are longer"),
     (["--eval-text", "README.md", "--eval-len", "257"], "--eval-len: windows of 257 tokens are longer"),
     (["--calib-windows", "0"], "need at least one window")],
)
def test_out_of_range_settings(tiny_llama_dir, text_file, tmp_path, capsys, extra, match):
    assert_refused(capsys, tmp_path, *tiny_args(tiny_llama_dir, text_file), *extra, match=match)


@pytest.mark.parametrize("device,match", [
    ("banana", "--device 'banana': not a device name"),
    ("mps", "--device mps: mixq computes on cpu or cuda"),
    ("cuda:99", "--device cuda:99: this torch" if not torch.cuda.is_available() else "--device cuda:99: torch sees"),
])
def test_unusable_device(tiny_llama_dir, text_file, tmp_path, capsys, device, match):
    assert_refused(capsys, tmp_path, *tiny_args(tiny_llama_dir, text_file), "--device", device, match=match)
    code, cap = run(capsys, "eval", tmp_path / "nowhere", "--device", device)
    assert code == 2 and cap.err.startswith("mixq: error:") and match in cap.err


def test_missing_model(tmp_path, capsys):
    assert_refused(capsys, tmp_path, "quantize", tmp_path / "nope.gguf", match="not found")


def test_corrupt_gguf(tmp_path, capsys):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    assert_refused(capsys, tmp_path, "quantize", bad, match="cannot read GGUF")


def test_truncated_gguf(tmp_path, capsys):
    from mixq.models.embedded import resolve_embedded

    cut = tmp_path / "cut.gguf"
    cut.write_bytes(resolve_embedded("smollm2-135m").read_bytes()[:100_000])
    assert_refused(capsys, tmp_path, "quantize", cut, match="cannot read GGUF")


def test_architecture_that_cannot_work(tmp_path, capsys):
    """GPT-2 multiplies through Conv1D (addmm), which mixq does not quantize: one clear error."""
    from transformers import AutoModelForCausalLM, GPT2Config

    model_dir = tmp_path / "gpt2"
    AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(model_dir)
    assert_refused(capsys, tmp_path, "quantize", model_dir, match="multiplies by no matrix mixq can quantize")


def test_unsupported_architecture(tmp_path, capsys):
    from transformers import GPT2Config

    model_dir = tmp_path / "gpt2"
    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(model_dir)
    assert_refused(capsys, tmp_path, "quantize", model_dir, match="model.safetensors")


@pytest.mark.parametrize("content", [b"", b"  \n\n", b"\xff\xfe\x00bad utf-8 \xc3\x28"])
def test_bad_text(tiny_llama_dir, tmp_path, capsys, content):
    text = tmp_path / "t.txt"
    text.write_bytes(content)
    args = ["quantize", tiny_llama_dir, "--calib-text", text]
    assert_refused(capsys, tmp_path, *args, match=str(text))


def test_missing_text(tiny_llama_dir, tmp_path, capsys):
    args = ["quantize", tiny_llama_dir, "--calib-text", tmp_path / "none.txt"]
    assert_refused(capsys, tmp_path, *args, match="not found")


def test_eval_of_a_non_output_dir(tmp_path, capsys):
    code, cap = run(capsys, "eval", tmp_path)
    assert code == 2 and "not a mixq output directory" in cap.err


def test_profile_plan_and_budget(tiny_llama_dir, text_file, tmp_path, capsys):
    from mixq.plan import Budget

    profile = tmp_path / "tiny.profile"
    calib = ["--calib-text", text_file, "--calib-windows", 8, "--calib-len", 64]
    code, cap = run(capsys, "profile", tiny_llama_dir, *calib, "--bits-options", "2,3,4,8", "--group-sizes", "32,64",
                    "--held-out-len", 64, "--out", profile)
    assert code == 0, cap.err

    code, cap = run(capsys, "plan", profile, "--frontier", "--plot", tmp_path / "f.png")
    assert code == 0 and (tmp_path / "f.png").stat().st_size > 1000, cap.err

    code, cap = run(capsys, "plan", profile, "--budget", "0.5bpw")
    assert code == 2 and "infeasible" in cap.err and "smallest plan" in cap.err

    for budget in ("4.5bpw", "60KB"):
        out = tmp_path / budget
        code, cap = run(capsys, "quantize", tiny_llama_dir, "--budget", budget, "--profile", profile, *calib,
                        "--out", out)
        assert code == 0, cap.err
        info = json.loads((out / native.INFO_FILE).read_text())
        size = (out / native.WEIGHTS_FILE).stat().st_size
        assert size == info["storage"]["file_bytes"] <= Budget.parse(budget).total_bytes(info["storage"]["n_weights"])
        assert size <= info["plan_summary"]["max_file_bytes"]

    # The profile belongs to its model: the same model stored in bf16 is accepted, another one refused.
    from conftest import save_tiny_model

    same_in_bf16 = save_tiny_model(tmp_path / "bf16", seed=0, dtype=torch.bfloat16)
    code, cap = run(capsys, "quantize", same_in_bf16, "--budget", "4.5bpw", "--profile", profile, *calib,
                    "--out", tmp_path / "bf16-out")
    assert code == 0, cap.err
    other = save_tiny_model(tmp_path / "other", seed=1)
    assert_refused(capsys, tmp_path, "quantize", other, "--budget", "4.5bpw", "--profile", profile, *calib,
                   match="has other weights (first in model.layers.0.self_attn.q_proj)")
    wider = save_tiny_model(tmp_path / "wider", intermediate_size=192)
    assert_refused(capsys, tmp_path, "quantize", wider, "--budget", "4.5bpw", "--profile", profile, *calib,
                   match="mlp.gate_proj is (192, 64), not (160, 64)")



def test_held_out_text_calibrates_the_profile(tiny_llama_dir, text_file, tmp_path, capsys):
    """--held-out-text: the KL points are measured on that text (not on samples) and the profile says so."""
    import numpy as np

    from mixq.profile import Profile

    common = ["--calib-text", text_file, "--calib-windows", 8, "--calib-len", 64, "--bits-options", "3,4",
              "--group-sizes", "32", "--methods", "rtn", "--fisher-windows", 0, "--held-out-windows", 2,
              "--held-out-len", 64]
    profiles = {}
    for label, extra in (("sampled", []), ("text", ["--held-out-text", text_file])):
        profiles[label] = tmp_path / f"{label}.profile"
        code, cap = run(capsys, "profile", tiny_llama_dir, *common, *extra, "--out", profiles[label])
        assert code == 0, cap.err
    sampled, text = (Profile.load(profiles[k]) for k in ("sampled", "text"))
    assert "samples from the model (seed 2)" in sampled.info["held_out"]
    assert f"text {text_file}" in text.info["held_out"]
    measured = np.isfinite(text.measured)
    assert measured.sum() > 0 and np.array_equal(measured, np.isfinite(sampled.measured))
    assert not np.allclose(text.measured[measured], sampled.measured[measured], rtol=1e-3)
    assert_refused(capsys, tmp_path, "profile", tiny_llama_dir, *common, "--held-out-text", tmp_path / "none.txt",
                   match="none.txt")


def test_infeasible_budget_is_refused_before_profiling(tiny_llama_dir, text_file, tmp_path, capsys):
    assert_refused(capsys, tmp_path, "quantize", tiny_llama_dir, "--budget", "1bpw", "--calib-text", text_file,
                   match="infeasible")


def test_export_to_gguf_needs_ggml_types(tiny_llama_dir, text_file, tmp_path, capsys):
    out = tmp_path / "int3"
    code, _ = run(capsys, *tiny_args(tiny_llama_dir, text_file), "--bits", 3, "--group-size", 32, "--out", out)
    assert code == 0
    code, cap = run(capsys, "export", out, "--to", "gguf", tmp_path / "m.gguf")
    assert code == 2 and "is stored as int3-g32: llama.cpp reads ggml types only; the nearest to int3-g32 is q3_k" in cap.err
    assert not (tmp_path / "m.gguf").exists()


def test_export_with_a_truncated_source_gguf(tmp_path, capsys):
    from mixq.models.embedded import resolve_embedded

    cut = tmp_path / "cut.gguf"
    cut.write_bytes(resolve_embedded("smollm2-135m").read_bytes()[:100_000])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    native.write_info(run_dir, {"model": str(cut)})
    code, cap = run(capsys, "export", run_dir, "--to", "gguf", tmp_path / "m.gguf")
    assert code == 2 and "cannot read GGUF file" in cap.err and not (tmp_path / "m.gguf").exists()


def test_ggml_types_in_a_budgeted_plan(tiny_llama_dir, text_file, tmp_path, capsys):
    """On the tiny model (64- and 160-wide rows) only the 32-wide ggml types fit; a plan mixes them."""
    profile = tmp_path / "tiny.profile"
    calib = ["--calib-text", text_file, "--calib-windows", 8, "--calib-len", 64, "--held-out-windows", 2,
             "--held-out-len", 64, "--fisher-windows", 2]
    code, cap = run(capsys, "profile", tiny_llama_dir, *calib, "--formats", "gguf", "--methods", "rtn,gptq",
                    "--out", profile)
    assert code == 0, cap.err
    from mixq.profile import Profile

    p = Profile.load(profile)
    allowed = {o.rsplit("-", 1)[0] for o in p.options if (p.errors["hessian"][:, p.options.index(o)] < float("inf")).any()}
    assert allowed == {"q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "iq4_nl", "f16"}
    out = tmp_path / "mix"
    code, cap = run(capsys, "quantize", tiny_llama_dir, "--budget", "6.0bpw", "--profile", profile, *calib,
                    "--out", out)
    assert code == 0, cap.err
    formats = set(native.read_info(out)["plan"].values())
    assert formats <= {f"{f}-{m}" for f in ("q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "iq4_nl") for m in ("rtn", "gptq")} | {"f16"}
    assert len(formats) >= 2


def test_quality_bound_plans_and_learned_methods(tiny_llama_dir, text_file, tmp_path, capsys):
    from mixq.plan import plan_for_loss
    from mixq.profile import Profile

    profile = tmp_path / "tiny.profile"
    calib = ["--calib-text", text_file, "--calib-windows", 8, "--calib-len", 64]
    code, cap = run(capsys, "profile", tiny_llama_dir, *calib, "--bits-options", "3,4,8", "--group-sizes", "32",
                    "--methods", "gptq,adaquant,block", "--steps", 10, "--block-steps", 5, "--block-batch", 2,
                    "--no-keep", "--held-out-len", 64, "--out", profile)
    assert code == 0, cap.err
    p = Profile.load(profile)
    gains = p.info["learned_gains"]
    assert set(gains) == {"adaquant:int3-g32", "adaquant:int4-g32", "block:int3-g32", "block:int4-g32"}
    assert all(0 < g <= 1 for g in gains.values())  # a learned method keeps its start when it does not help

    import numpy as np

    loss = p.predicted("hessian+kl")
    smallest = np.argmin(np.where(np.isfinite(loss), p.nbytes, np.iinfo(np.int64).max), axis=1)
    bound = float(loss[np.arange(len(loss)), smallest].sum()) / 2  # half the loss of the smallest plan
    code, cap = run(capsys, "plan", profile, "--max-loss", bound, "--out", tmp_path / "plan.json")
    assert code == 0, cap.err
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["predicted_loss"] <= bound and plan["solver"] == "milp-loss"
    assert plan == plan_for_loss(p, bound).as_dict()

    code, cap = run(capsys, "plan", profile, "--max-loss", 1e-12)
    assert code == 2 and "no plan has a predicted loss of at most 1e-12" in cap.err

    out = tmp_path / "q"
    code, cap = run(capsys, "quantize", tiny_llama_dir, "--max-kl", bound, "--profile", profile, *calib,
                    "--block-steps", 5, "--block-batch", 2, "--out", out)
    assert code == 0, cap.err
    info = json.loads((out / native.INFO_FILE).read_text())
    assert info["plan_summary"]["predicted_loss"] <= bound
    assert_refused(capsys, tmp_path, "quantize", tiny_llama_dir, "--max-kl", 1e-12, "--profile", profile, *calib,
                   match="no plan has a predicted loss")


def test_block_method_from_the_command_line(tiny_llama_dir, text_file, tmp_path, capsys):
    out = tmp_path / "block"
    code, cap = run(capsys, *tiny_args(tiny_llama_dir, text_file), "--bits", 3, "--group-size", 32,
                    "--method", "block", "--norm-tuning", "--block-steps", 5, "--block-batch", 2, "--out", out)
    assert code == 0, cap.err
    info = json.loads((out / native.INFO_FILE).read_text())
    assert len(info["block_losses"]) == 2 and all(a <= b for b, a in info["block_losses"])
    assert_refused(capsys, tmp_path, *tiny_args(tiny_llama_dir, text_file), "--method", "block", "--init", "block",
                   match="--init block")


def test_quiet_shows_no_progress_bars(tiny_llama_dir, text_file, tmp_path, capsys, monkeypatch):
    from tqdm import std

    monkeypatch.setattr(std.tqdm, "__init__", std.tqdm.__init__)  # undone after the test
    code, cap = run(capsys, "-q", *tiny_args(tiny_llama_dir, text_file), "--out", tmp_path / "q")
    assert code == 0 and cap.err == "" and cap.out.startswith("wrote ")


def test_an_output_is_reread_before_it_is_renamed(tiny_llama_dir, text_file, tmp_path, capsys, monkeypatch):
    """A byte that changes on its way to disk (the last one: a packed code, stored last) is caught."""
    real_write = native.write_safetensors

    def write_and_flip(path, *args):
        real_write(path, *args)
        with open(path, "r+b") as f:
            f.seek(-1, 2)
            last = f.read(1)[0]
            f.seek(-1, 2)
            f.write(bytes([last ^ 1]))

    monkeypatch.setattr(native, "write_safetensors", write_and_flip)
    code, cap = run(capsys, *tiny_args(tiny_llama_dir, text_file), "--out", tmp_path / "out")
    assert code == 2 and cap.err.splitlines()[-1].startswith("mixq: error: internal error: ")
    assert "does not hold" in cap.err and not (tmp_path / "out").exists()
