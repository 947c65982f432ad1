"""Latency tables (`mixq bench-device`) and plans limited in time per decoded token."""

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import save_tiny_model
from mixq.cli import main
from mixq.errors import MixqError
from mixq.export import get_target, native
from mixq.options import Option
from mixq.latency import EngineFit, LatencyTable, Machine, decode_limit, parse_latency, profile_cases
from mixq.plan import Budget, plan_for_budget
from mixq.profile import Profile

GGUF = get_target("gguf").kernels
# Made-up times per kernel type and weight: fewer bits are faster here, 16 bits slowest.
SECONDS_PER_WEIGHT = {"q4_0": 1e-9, "q4_1": 1.1e-9, "iq4_nl": 1.2e-9, "q5_0": 1.5e-9, "q5_1": 1.6e-9,
                      "q8_0": 2e-9, "f16": 4e-9}


def made_up_table(profile: Profile, machine: Machine) -> LatencyTable:
    cases = profile_cases(profile, GGUF)
    return LatencyTable("gguf", machine, {c: [SECONDS_PER_WEIGHT[c[0]] * c[1] * c[2] * f for f in (0.9, 1.0, 1.2)]
                                          for c in cases}, stream_bytes=10**6)


def here() -> Machine:
    return Machine.here(1, GGUF.engine())


def test_a_latency_limit_is_met_at_the_least_loss(gguf_profile):
    profile = Profile.load(gguf_profile)
    table = made_up_table(profile, here())
    budget = Budget.parse("16bpw")
    free = plan_for_budget(profile, budget, "hessian+kl", [decode_limit(profile, table, GGUF, 1.0)])
    fastest_bound = sum(min(table.time(c) for c in profile_cases(profile, GGUF) if c[1:3] == tuple(s))
                        for s, k in zip(profile.shapes, profile.kinds) if k != "embedding")
    bound = (free.limited["decode time per token"] + fastest_bound) / 2
    limited = plan_for_budget(profile, budget, "hessian+kl", [decode_limit(profile, table, GGUF, bound)])
    assert free.limited["decode time per token"] > bound  # the limit binds
    assert limited.limited["decode time per token"] <= bound * (1 + 1e-9)
    assert limited.predicted_loss >= free.predicted_loss and limited.options != free.options
    # The plan's time is its matrices' medians summed (the lookup-only embedding costs nothing).
    plannable = dict(zip(profile.tensors, zip(profile.kinds, profile.shapes)))
    total = sum(table.time((GGUF.kernel_of(opt.rsplit("-", 1)[0] if opt != "f16" else "f16"), *plannable[t][1], 1))
                for t, opt in limited.options.items() if plannable[t][0] != "embedding")
    assert total == pytest.approx(limited.limited["decode time per token"], rel=1e-9)


def test_an_engine_fit_scales_the_products_and_adds_its_overhead(gguf_profile):
    profile = Profile.load(gguf_profile)
    table = made_up_table(profile, here())
    budget = Budget.parse("16bpw")
    products = plan_for_budget(profile, budget, "hessian+kl", [decode_limit(profile, table, GGUF, 1.0)])
    table.fit = EngineFit(scale=1.5, overhead=2e-6, points=())
    fitted = plan_for_budget(profile, budget, "hessian+kl", [decode_limit(profile, table, GGUF, 1.0)])
    assert fitted.options == products.options
    assert fitted.limited["decode time per token"] == pytest.approx(
        1.5 * products.limited["decode time per token"] + 2e-6, rel=1e-9)
    # A bound just under the free plan's fitted time binds; the same bound without the fit would not.
    bound = 0.99 * fitted.limited["decode time per token"]
    limited = plan_for_budget(profile, budget, "hessian+kl", [decode_limit(profile, table, GGUF, bound)])
    assert limited.limited["decode time per token"] <= bound * (1 + 1e-9) and limited.options != products.options


def test_experts_cost_the_products_a_token_is_routed_to(text_file, tmp_path):
    """An expert's product runs only for the tokens routed to it: a plan's time counts each expert by
    its routing share times the experts per token, so a layer's experts (one GGUF tensor of one type)
    cost top-k products of one expert, which is what llama.cpp runs for the exported file."""
    from transformers import AutoTokenizer

    from mixq.export.llama_cpp import file_matmuls
    from mixq.latency import products_per_token
    from mixq.models import source_gguf

    vocab = source_gguf("smollm2-135m")
    source = save_tiny_model(tmp_path / "tiny", "mixtral", tied=False,
                             tokenizer=AutoTokenizer.from_pretrained(vocab.parent, gguf_file=vocab.name))
    top_k = json.loads((source / "config.json").read_text())["num_experts_per_tok"]
    path = tmp_path / "moe.profile"
    assert main([str(a) for a in ["-q", "profile", source, "--target", "gguf", "--formats", "gguf", "--methods", "rtn",
                                  "--fisher-windows", 0, "--calib-text", text_file, "--calib-windows", 8,
                                  "--calib-len", 64, "--held-out-windows", 2, "--held-out-len", 64,
                                  "--out", path]]) == 0
    profile = Profile.load(path)
    runs = products_per_token(profile)
    experts = [t for t, n in enumerate(profile.tensors) if ".experts." in n]
    stacks = {profile.tensors[t].rsplit(".", 1)[0] for t in experts}
    assert len(stacks) == 4  # gate/up and down of each of the two blocks
    for stack in stacks:
        members = [t for t in experts if profile.tensors[t].startswith(stack + ".")]
        assert runs[members].sum() == pytest.approx(top_k)
        assert np.ptp(runs[members]) > 0.05 * runs[members].mean()  # the routers prefer some experts
    assert (runs[[t for t in range(len(runs)) if t not in experts]] == 1).all()

    table = made_up_table(profile, here())
    free = plan_for_budget(profile, Budget.parse("16bpw"), "hessian+kl", [decode_limit(profile, table, GGUF, 1.0)])
    bound = 0.8 * free.limited["decode time per token"]
    table.save(tmp_path / "t.latency")
    out, gguf_path = tmp_path / "q", tmp_path / "q.gguf"
    assert main(["quantize", str(source), "--profile", str(path), "--budget", "16bpw", "--target", "gguf",
                 "--max-latency", f"{bound * 1e3:.9f}ms", "--latency", str(tmp_path / "t.latency"),
                 "--calib-text", str(text_file), "--calib-windows", "8", "--calib-len", "64", "--out", str(out)]) == 0
    assert main(["export", str(out), "--to", "gguf", str(gguf_path)]) == 0
    planned = json.loads((out / native.INFO_FILE).read_text())["plan"]

    def seconds(case):  # the made-up table's law for any product, the file's split gate and up included
        return SECONDS_PER_WEIGHT[case[0]] * case[1] * case[2]

    expert_shapes = {tuple(profile.shapes[t]) for t in experts}
    in_file = sum(seconds(c) for c in file_matmuls(gguf_path)
                  if (c[1], c[2]) in expert_shapes or (2 * c[1], c[2]) in expert_shapes)
    in_plan = sum(runs[t] * seconds((GGUF.kernel_of(Option.parse(planned[profile.tensors[t]]).format),
                                     *profile.shapes[t], 1)) for t in experts)
    assert in_file == pytest.approx(in_plan, rel=1e-6)
    assert set(planned) == set(profile.tensors)  # kept stages (nothing to round) are recorded too
    profile.info.pop("experts_per_token")  # a profile made before latency limits took experts
    with pytest.raises(MixqError, match="profile the model again"):
        products_per_token(profile)


def test_plan_command_with_a_latency_limit(gguf_profile, tmp_path, capsys):
    profile = Profile.load(gguf_profile)
    made_up_table(profile, here()).save(tmp_path / "t.latency")
    common = ["plan", str(gguf_profile), "--budget", "16bpw", "--latency", str(tmp_path / "t.latency")]
    assert main([*common, "--max-latency", "1s"]) == 0
    assert "decode time per token" in capsys.readouterr().out
    assert main([*common, "--max-latency", "1us"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mixq: error: no plan has a decode time per token of at most 0.001 ms/token") and "least" in err
    assert main([*common, "--max-latency", "40 parsecs"]) == 2
    assert "expected a positive time per token" in capsys.readouterr().err
    assert main(["plan", str(gguf_profile), "--budget", "16bpw", "--max-latency", "1s"]) == 2
    assert "--max-latency needs --latency" in capsys.readouterr().err


def test_frontier_along_the_time_per_token(gguf_profile, tmp_path, capsys):
    """`plan --frontier --axis latency`: plans from the fastest to the least lossy, each time slower
    and less lossy, drawn; `report --latency` adds the same frontier to the page."""
    profile = Profile.load(gguf_profile)
    table = tmp_path / "t.latency"
    made_up_table(profile, here()).save(table)
    plot = tmp_path / "frontier.png"
    assert main(["plan", str(gguf_profile), "--frontier", "--axis", "latency", "--latency", str(table),
                 "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    rows = [line.split("|")[1:-1] for line in out.splitlines() if "ms/token" in line and line.startswith("|")]
    times = [float(r[0].split()[0]) for r in rows]
    losses = [float(r[-1]) for r in rows]
    assert len(rows) > 3 and times == sorted(times) and losses == sorted(losses, reverse=True)
    assert times[0] < times[-1] / 2 and plot.read_bytes()[:4] == b"\x89PNG"
    assert main(["plan", str(gguf_profile), "--frontier", "--axis", "latency"]) == 2
    assert "--axis latency needs --latency TABLE" in capsys.readouterr().err
    page = tmp_path / "report.html"
    assert main(["report", str(gguf_profile), "--latency", str(table), "--out", str(page)]) == 0
    assert re.findall(r"<h2>(.*?)</h2>", page.read_text()) == ["Frontier", "Frontier in time", "Sensitivity"]
    assert page.read_text().count("<svg") == 3


def test_a_table_from_another_machine_or_model_is_refused(gguf_profile, tmp_path, capsys):
    profile = Profile.load(gguf_profile)
    elsewhere = Machine("Another CPU", 64, 1, GGUF.engine())
    made_up_table(profile, elsewhere).save(tmp_path / "other.latency")
    with pytest.raises(MixqError, match="measured on another machine .Another CPU"):
        LatencyTable.load(tmp_path / "other.latency").check_machine(GGUF)
    table = made_up_table(profile, here())
    table.seconds = {c: s for c, s in table.seconds.items() if c[1:3] != (160, 64)}  # no gate/up times
    table.save(tmp_path / "partial.latency")
    assert main(["plan", str(gguf_profile), "--budget", "16bpw", "--max-latency", "1s", "--latency",
                 str(tmp_path / "partial.latency")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mixq: error: the latency table has no time for") and "160x64" in err and err.count("\n") == 1


@pytest.mark.parametrize("text", ["", "{}", '{"version": 1, "target": "gguf"}', "\x00\x01garbage"])
def test_a_corrupt_table_is_one_clear_error(text, tmp_path):
    (tmp_path / "t.latency").write_text(text)
    with pytest.raises(MixqError, match="is not a latency table written by `mixq bench-device`"):
        LatencyTable.load(tmp_path / "t.latency")


def test_a_table_with_impossible_times_is_refused(gguf_profile, tmp_path):
    table = made_up_table(Profile.load(gguf_profile), here())
    table.save(tmp_path / "t.latency")
    data = json.loads((tmp_path / "t.latency").read_text())
    data["cases"][0]["seconds"][1] = -1.0
    (tmp_path / "t.latency").write_text(json.dumps(data))
    with pytest.raises(MixqError, match="has times"):
        LatencyTable.load(tmp_path / "t.latency")


def test_a_table_round_trips(gguf_profile, tmp_path):
    table = made_up_table(Profile.load(gguf_profile), here())
    table.save(tmp_path / "t.latency")
    again = LatencyTable.load(tmp_path / "t.latency")
    assert again == table and again.spread(next(iter(table.seconds))) == pytest.approx(0.3)


@pytest.mark.parametrize("text,seconds", [("40ms", 0.04), ("40ms/token", 0.04), ("0.5s", 0.5), ("25tok/s", 0.04),
                                          ("250us/tok", 250e-6)])
def test_latency_units(text, seconds):
    assert parse_latency(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["40", "fast", "-3ms", "0ms", "40 km/h"])
def test_latency_in_wrong_units_is_refused(text):
    with pytest.raises(MixqError, match="expected a positive time per token"):
        parse_latency(text)


@pytest.mark.slow
def test_ggml_kernels_time_larger_products_longer():
    """The timer runs ggml's own kernels: a product with 64 times the weights, or with 64 tokens
    instead of one, takes far longer."""
    cases = [("q4_0", 256, 256, 1), ("q4_0", 2048, 2048, 1), ("q4_0", 2048, 2048, 64)]
    seconds = {c: np.median(s) for c, s in GGUF.time(cases, 1, 3, 2**20).items()}
    assert seconds[cases[1]] > 8 * seconds[cases[0]]
    assert seconds[cases[2]] > 4 * seconds[cases[1]]


@pytest.mark.slow
def test_bench_device_on_a_profile(gguf_profile, tmp_path, capsys):
    out = tmp_path / "cpu.latency"
    assert main(["-q", "bench-device", "--profile", str(gguf_profile), "--out", str(out), "--threads", "1",
                 "--repeats", "2", "--prefill-tokens", "16"]) == 0
    assert "wrote" in capsys.readouterr().out
    table = LatencyTable.load(out)
    profile = Profile.load(gguf_profile)
    assert set(table.seconds) == profile_cases(profile, GGUF, 1) | profile_cases(profile, GGUF, 16)
    assert all(len(s) == 2 for s in table.seconds.values())
    assert main(["plan", str(gguf_profile), "--budget", "16bpw", "--max-latency", "1s", "--latency", str(out)]) == 0
    assert main(["bench-device", "--profile", str(gguf_profile), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


@pytest.mark.slow
def test_the_engine_fit_is_fitted_to_whole_files(smollm2, tmp_path, capsys):
    """SmolLM2 in three ggml types, each decoded by llama-bench: every product of each file is in
    the table, and the fit is the least-squares line through (sum of the file's products, measured
    time per token). How well it predicts is a timing, so bench/results/latency.md measures that."""
    from mixq.export.llama_cpp import tools_dir
    from mixq.models import source_gguf

    files = []
    for kind in ("F16", "Q8_0", "Q4_0"):  # Q4_0 runs in llama.cpp's repacked layout
        files.append(tmp_path / f"{kind}.gguf")
        subprocess.run([str(tools_dir() / "llama-quantize"), "--allow-requantize", str(source_gguf(smollm2.spec)),
                        str(files[-1]), kind, "2"], check=True, capture_output=True, timeout=600)
    out = tmp_path / "cpu.latency"
    assert main(["bench-device", "--fit", *map(str, files), "--out", str(out), "--threads", "1",
                 "--repeats", "3"]) == 0
    assert "engine fit: measured =" in capsys.readouterr().out
    table = LatencyTable.load(out)
    # 30 blocks of 7 matrices, and the tied token embedding, which is also the output product
    assert all(len(GGUF.file_cases(f)) == 211 and set(GGUF.file_cases(f)) <= set(table.seconds) for f in files)
    fit = table.fit
    names, products, measured = map(np.array, zip(*fit.points))
    assert list(names) == ["F16.gguf", "Q8_0.gguf", "Q4_0.gguf"]
    assert products[0] > 1.2 * products[2] and min(measured) > 0  # F16 streams 3.6x Q4_0's bytes
    scale, overhead = np.polyfit(products, measured, 1)
    if scale > 0:
        assert (fit.scale, fit.overhead) == pytest.approx((scale, overhead))
    else:  # the files ranked against their products: an offset only
        assert fit.scale == 1 and fit.overhead == pytest.approx(np.mean(measured - products))
