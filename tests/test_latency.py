"""Latency tables (`mixq bench-device`) and plans limited in time per decoded token."""

import json
from pathlib import Path

import numpy as np
import pytest

from mixq.cli import main
from mixq.errors import MixqError
from mixq.export import get_target
from mixq.latency import LatencyTable, Machine, decode_limit, parse_latency, profile_cases
from mixq.plan import Budget, plan_for_budget
from mixq.profile import Profile

GGUF = get_target("gguf").kernels
# Made-up times per kernel type and weight: fewer bits are faster here, 16 bits slowest.
SECONDS_PER_WEIGHT = {"q4_0": 1e-9, "q4_1": 1.1e-9, "iq4_nl": 1.2e-9, "q5_0": 1.5e-9, "q5_1": 1.6e-9,
                      "q8_0": 2e-9, "f16": 4e-9}


@pytest.fixture(scope="module")
def gguf_profile(tiny_llama_dir, text_file, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("latency") / "tiny.profile"
    assert main([str(a) for a in ["-q", "profile", tiny_llama_dir, "--calib-text", text_file, "--calib-windows", 8,
                                  "--calib-len", 64, "--held-out-windows", 2, "--held-out-len", 64,
                                  "--fisher-windows", 0, "--formats", "gguf", "--methods", "rtn", "--out", path]]) == 0
    return path


def made_up_table(profile: Profile, machine: Machine) -> LatencyTable:
    cases = profile_cases(profile, GGUF)
    return LatencyTable("gguf", machine, {c: [SECONDS_PER_WEIGHT[c[0]] * c[1] * c[2] * f for f in (0.9, 1.0, 1.2)]
                                          for c in cases})


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
    seconds = {c: np.median(s) for c, s in GGUF.time(cases, 1, 3).items()}
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
