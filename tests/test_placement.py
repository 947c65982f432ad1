"""Blocks placed on devices and typed together: the MILP against brute force on small instances,
the KV cache against llama.cpp's own count, and `mixq plan --device-budget` end to end."""

import itertools
import json
import re
import subprocess

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mixq.cli import main
from mixq.errors import MixqError
from mixq.placement import TIE_RTOL, Device, DeviceBudget, kv_cache_bytes, solve_placement
from mixq.plan import Limit


def legal_placements(n_blocks: int, n_dev: int, host_holds_blocks: bool):
    """Device of each block and of the output as llama.cpp splits layers: blocks in device order, the
    output on the host or, once every block has left it, with the last block."""
    for blocks in itertools.combinations_with_replacement(range(n_dev), n_blocks):
        if not host_holds_blocks and 0 in blocks:
            continue
        outputs = ([0] if host_holds_blocks else []) + ([blocks[-1]] if blocks[0] != 0 else [])
        for out in outputs:
            yield (*blocks, out)


def held(choice, device_of, position, nbytes, kv, copied, n_dev):
    """Bytes on each device and the devices' seconds, counted the plain way."""
    out = np.zeros(n_dev, dtype=np.int64)
    for t, o in enumerate(choice):
        d = 0 if position[t] < 0 else device_of[position[t]]
        out[d] += nbytes[t, o]
        if copied[t]:  # the token embedding the output is copied from
            out[0] += nbytes[t, o]
    for k, b in enumerate(kv):
        out[device_of[k]] += b
    return out


def seconds_of(choice, device_of, position, time):
    return sum(time[0 if position[t] < 0 else device_of[position[t]]][t, o] for t, o in enumerate(choice))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10**6), n_blocks=st.integers(1, 3), per_block=st.integers(1, 2), O=st.integers(1, 3),
       n_dev=st.integers(1, 3), tie=st.booleans(), embedding=st.sampled_from(["tied", "own", "none"]),
       host_holds=st.booleans(), frac=st.floats(0.0, 1.0), timed=st.booleans(), time_frac=st.floats(0.0, 1.0))
def test_placement_equals_brute_force(seed, n_blocks, per_block, O, n_dev, tie, embedding, host_holds, frac, timed,
                                      time_frac):
    rng = np.random.default_rng(seed)
    position = [k for k in range(n_blocks) for _ in range(per_block)] + [n_blocks]
    if embedding == "own":
        position.append(-1)
    position = np.array(position)
    T = len(position)
    loss = rng.exponential(1.0, (T, O))
    loss[rng.random((T, O)) < 0.2] = np.inf
    loss[:, 0] = rng.exponential(1.0, T)  # every tensor has an option
    nbytes = rng.integers(1, 60, (T, O))
    kv = rng.integers(0, 30, n_blocks)
    copied = np.array([embedding == "tied" and p == n_blocks for p in position])
    groups = ([[t for t in range(T) if position[t] == p] for p in sorted(set(position.tolist()))] if tie
              else [[t] for t in range(T)])
    host_holds = host_holds or n_dev == 1
    total = int(nbytes.max(axis=1).sum() + kv.sum())
    caps = [int(c) for c in rng.integers(0, total + 1, n_dev)]
    caps[0] = int(frac * total)
    devices = DeviceBudget((Device("cpu", caps[0] if host_holds else np.inf, host_holds),
                            *(Device(f"gpu{i}", caps[i]) for i in range(1, n_dev))))
    time = [rng.uniform(0.5, 2.0) * rng.exponential(1.0, (T, O)) for _ in range(n_dev)]
    bound = None
    if timed:
        fastest = sum(min(time[d][t, o] for d in range(n_dev) for o in range(O) if np.isfinite(loss[t, o]))
                      for t in range(T))
        bound = fastest * (1 + 2 * time_frac)
    limits = [Limit("time", time[d], bound) for d in range(n_dev)] if timed else []

    feasible = []  # (loss, seconds or -offloaded) of every plan within the limits
    choices = [[o for o in range(O) if all(np.isfinite(loss[t, o]) for t in g)] for g in groups]
    for device_of in legal_placements(n_blocks, n_dev, host_holds):
        for picks in itertools.product(*choices):
            choice = np.empty(T, dtype=int)
            for g, o in zip(groups, picks):
                choice[g] = o
            on = held(choice, device_of, position, nbytes, kv, copied, n_dev)
            if (on > [d.capacity for d in devices.devices]).any():
                continue
            secs = seconds_of(choice, device_of, position, time)
            if timed and secs > bound * (1 + 1e-9):
                continue
            feasible.append((loss[np.arange(T), choice].sum(), secs if timed else -sum(d != 0 for d in device_of)))

    if not feasible:
        with pytest.raises(MixqError):
            solve_placement(loss, nbytes, groups, position, kv, copied, devices, time_limits=limits)
        return
    alloc, placement = solve_placement(loss, nbytes, groups, position, kv, copied, devices, time_limits=limits)
    device_of = placement.device_of
    assert tuple(device_of) in set(legal_placements(n_blocks, n_dev, host_holds))
    on = held(alloc.choice, device_of, position, nbytes, kv, copied, n_dev)
    assert (on <= [d.capacity for d in devices.devices]).all()
    assert tuple(on) == tuple(np.add(placement.weights, placement.kv_cache))
    least = min(f[0] for f in feasible)
    assert least * (1 - 1e-9) <= alloc.loss <= least * (1 + TIE_RTOL)  # float sums in another order
    # Of the plans of least loss, the fastest (between those the solver is asked for and those it accepts).
    fastest_asked = min(f[1] for f in feasible if f[0] <= least * (1 + TIE_RTOL / 2))
    fastest_accepted = min(f[1] for f in feasible if f[0] <= least * (1 + TIE_RTOL))
    if timed:
        secs = seconds_of(alloc.choice, device_of, position, time)
        assert secs <= bound * (1 + 1e-9) and placement.seconds == pytest.approx(secs)
        assert fastest_accepted * (1 - 1e-9) <= secs <= fastest_asked * (1 + 1e-6)
    elif host_holds:
        assert -fastest_asked <= placement.offloaded() <= -fastest_accepted


def test_device_budgets_are_parsed_in_layer_order():
    budget = DeviceBudget.parse("gpu0=6GiB, CPU=10GB,gpu1=512MiB")
    assert [(d.name, d.capacity, d.holds_blocks) for d in budget.devices] == [
        ("cpu", 10 * 10**9, True), ("gpu0", 6 * 2**30, True), ("gpu1", 512 * 2**20, True)]
    only_gpu = DeviceBudget.parse("gpu0=6GiB").devices
    assert only_gpu[0].name == "cpu" and not only_gpu[0].holds_blocks and only_gpu[0].capacity == np.inf
    for bad, message in [("gpu0=4bpw", "a size"), ("gpu0", "NAME=SIZE"), ("gpu0=6GiB,gpu0=2GiB", "twice"),
                         ("gpu0=6 parsecs", "unknown unit")]:
        with pytest.raises(MixqError, match=message):
            DeviceBudget.parse(bad)


def test_the_llama_cpp_flags_count_blocks_then_the_output():
    from mixq.placement import Placement

    devices = DeviceBudget.parse("cpu=1GB,gpu0=1GB,gpu1=1GB").devices
    some = Placement(devices, (0, 0, 1, 2, 2, 0), (0, 0, 0), (0, 0, 0), 0, 0)  # 5 blocks, the output on the host
    every = Placement(devices, (1, 1, 1, 2, 2, 2), (0, 0, 0), (0, 0, 0), 0, 0)
    assert some.llama_cpp_flags() == "-ngl 3 --tensor-split 1,2"
    assert every.llama_cpp_flags() == "-ngl 6 --tensor-split 3,3"


def llama_cpp_host_load(gguf, context: int) -> tuple[float, float]:
    """(MiB of weights, MiB of KV cache) llama.cpp allocates on the host for `gguf`, loaded without mmap
    (so each buffer is what it holds)."""
    from mixq.export.llama_cpp import tools_dir

    log = subprocess.run([str(tools_dir() / "llama-completion"), "-m", str(gguf), "-c", str(context), "-n", "1", "-p",
                          "hi", "-no-cnv", "-t", "1", "-v", "-lm", "none"], capture_output=True, text=True,
                         timeout=300).stderr
    buffers = re.findall(r"load_tensors:\s+(CPU\S*) model buffer size =\s*([0-9.]+) MiB", log)
    final = dict(buffers[-2:] if buffers[-1][0] == "CPU_REPACK" else buffers[-1:])  # the second load: CPU, CPU_REPACK
    return sum(map(float, final.values())), float(re.search(r"llama_kv_cache: size =\s*([0-9.]+) MiB", log)[1])


@pytest.mark.slow
def test_the_host_holds_what_llama_cpp_allocates(smollm2, tmp_path):
    """SmolLM2 at 2048 tokens in llama.cpp: its KV cache is what kv_cache_bytes counts. Its tied output
    matrix is a second copy of the token embedding where llama.cpp repacks it (Q4_0: held twice, as the
    placement counts it) and shares the embedding's memory where it does not (Q5_0: held once, so the
    placement's count is one embedding above, a bound)."""
    from gguf import GGUFReader

    from mixq.export.llama_cpp import tools_dir
    from mixq.models import source_gguf

    refs = list(smollm2.plannable().values())
    kv = kv_cache_bytes([r.name for r in refs], [r.kind for r in refs], [r.shape for r in refs], 2048)
    for kind, copies in [("Q4_0", 2), ("Q5_0", 1)]:
        gguf = tmp_path / f"{kind}.gguf"
        subprocess.run([str(tools_dir() / "llama-quantize"), "--allow-requantize", "--pure",
                        str(source_gguf(smollm2.spec)), str(gguf), kind, "2"], check=True, capture_output=True,
                       timeout=600)
        weights_mib, kv_mib = llama_cpp_host_load(gguf, 2048)
        assert len(kv) == 30 and kv.sum() / 2**20 == pytest.approx(kv_mib, abs=0.005)
        assert 30 * smollm2.kv_values_per_token() * 2048 * 2 == kv.sum()  # the config's count, the same
        tensors = {t.name: int(t.n_bytes) for t in GGUFReader(gguf).tensors}
        assert "output.weight" not in tensors  # tied
        held = sum(tensors.values()) + (copies - 1) * tensors["token_embd.weight"]
        assert weights_mib == pytest.approx(held / 2**20, abs=0.02), kind


def test_plan_for_device_budgets(gguf_profile, tmp_path, capsys):
    """The tiny llama split over a host and an accelerator (2 blocks, each with 64 KiB of KV cache at 512
    tokens): each device holds what the JSON says, within its memory, and the printed flags say the
    same split."""
    out = tmp_path / "plan.json"
    assert main(["plan", str(gguf_profile), "--device-budget", "gpu0=130KiB,cpu=130KiB", "--context", "512",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    saved = json.loads(out.read_text())
    devices = saved["placement"]["devices"]
    assert set(devices) == {"cpu", "gpu0"}
    for name, cap in [("cpu", 130 * 2**10), ("gpu0", 130 * 2**10)]:
        d = devices[name]
        assert d["capacity"] == cap and d["weights"] + d["kv_cache"] <= cap
    assert devices["cpu"]["blocks"] and devices["gpu0"]["blocks"]  # neither device alone holds the model
    assert devices["cpu"]["blocks"][1] + 1 == devices["gpu0"]["blocks"][0]
    n_gpu = devices["gpu0"]["blocks"][1] - devices["gpu0"]["blocks"][0] + 1 + devices["gpu0"]["output"]
    assert f"llama.cpp: -ngl {n_gpu} -c 512" in printed
    # Room for all: of the least lossy plans, the one with every block and the output off the host,
    # unless --offload fixes the count; a count that cannot fit is one clear error.
    assert main(["plan", str(gguf_profile), "--device-budget", "gpu0=1MiB,cpu=1MiB", "--context", "512"]) == 0
    assert "llama.cpp: -ngl 3 " in capsys.readouterr().out
    assert main(["plan", str(gguf_profile), "--device-budget", "gpu0=1MiB,cpu=1MiB", "--context", "512",
                 "--offload", "1"]) == 0
    assert "llama.cpp: -ngl 1 " in capsys.readouterr().out
    assert main(["plan", str(gguf_profile), "--device-budget", "gpu0=130KiB,cpu=130KiB", "--context", "512",
                 "--offload", "0"]) == 2
    assert "another --offload" in capsys.readouterr().err
    assert main(["plan", str(gguf_profile), "--device-budget", "gpu0=200KiB,cpu=200KiB"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mixq: error: the devices") and "smallest plan needs" in err[0]
    assert main(["plan", str(gguf_profile), "--device-budget", "gpu0=1GiB", "--max-latency", "5ms"]) == 2
    assert "--max-latency needs --latency" in capsys.readouterr().err


def test_a_latency_limit_over_devices_prices_each_block_where_it_runs(gguf_profile, tmp_path, capsys):
    """Two tables: the accelerator's products 4x faster than the host's. A time limit between the
    all-on-host and the all-offloaded times is met; one below every plan's names the least."""
    from mixq.latency import LatencyTable
    from mixq.profile import Profile
    from test_latency import here, made_up_table

    profile = Profile.load(gguf_profile)
    host = made_up_table(profile, here())
    fast = LatencyTable(host.target, host.machine, {c: [s / 4 for s in v] for c, v in host.seconds.items()},
                        host.stream_bytes)
    host.save(tmp_path / "cpu.latency")
    fast.save(tmp_path / "gpu0.latency")
    tables = f"cpu={tmp_path / 'cpu.latency'},gpu0={tmp_path / 'gpu0.latency'}"
    common = ["plan", str(gguf_profile), "--context", "512", "--latency", tables]

    out = tmp_path / "plan.json"
    assert main([*common, "--device-budget", "gpu0=130KiB,cpu=130KiB", "--max-latency", "1s", "--out", str(out)]) == 0
    split = json.loads(out.read_text())
    seconds = split["limited"]["decode time per token"]
    ngl = int(re.search(r"-ngl (\d+)", capsys.readouterr().out)[1])
    assert 0 < ngl < 3 and seconds > 0  # the memory forces a split
    # With room for every block on the accelerator, a limit under the split's time is met by moving
    # blocks there.
    bound = f"{seconds * 0.6 * 1e6:.4f}"
    assert main([*common, "--device-budget", "gpu0=1MiB,cpu=1MiB", "--max-latency", f"{bound}us",
                 "--out", str(out)]) == 0
    assert json.loads(out.read_text())["limited"]["decode time per token"] <= float(bound) * 1e-6 * (1 + 1e-9)
    assert int(re.search(r"-ngl (\d+)", capsys.readouterr().out)[1]) > ngl
    assert main([*common, "--device-budget", "gpu0=1MiB,cpu=1MiB", "--max-latency", "1us"]) == 2
    assert "the least is" in capsys.readouterr().err


def test_quantize_for_device_budgets_records_the_split(tiny_llama_dir, gguf_profile, text_file, tmp_path, capsys):
    """`mixq quantize --device-budget` applies the placed plan: the output holds its options and the
    split, the same as `mixq plan --device-budget` solves."""
    from mixq.export import native

    out = tmp_path / "q"
    assert main(["quantize", str(tiny_llama_dir), "--profile", str(gguf_profile), "--device-budget",
                 "gpu0=130KiB,cpu=130KiB", "--context", "512", "--out", str(out), "--calib-text", str(text_file),
                 "--calib-windows", "4", "--calib-len", "64"]) == 0
    printed = capsys.readouterr().out
    info = json.loads((out / native.INFO_FILE).read_text())
    devices = info["placement"]["devices"]
    assert devices["cpu"]["blocks"] == [0, 0] and devices["gpu0"]["blocks"] == [1, 1]
    assert "llama.cpp: -ngl 1 -c 512" in printed
    planned = tmp_path / "plan.json"
    assert main(["plan", str(gguf_profile), "--device-budget", "gpu0=130KiB,cpu=130KiB", "--context", "512",
                 "--out", str(planned)]) == 0
    options = json.loads(planned.read_text())["options"]
    assert all(options[t] == o for t, o in info["plan"].items())  # what was quantized is the placed plan
    assert all(options[t] == "f16" for t in set(options) - set(info["plan"]))


def test_the_kv_cache_of_a_fused_qkv_model_comes_from_its_config(tiny_models, text_file, tmp_path, capsys):
    """Phi-3 projects q, k and v in one matrix, so the profile records the config's KV heads: each
    device's KV cache is 2 x KV heads x head dim values per token, per block it holds."""
    from mixq.models import load_model

    source = tiny_models("phi3")
    config = load_model(str(source)).config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_block = 2 * config.num_key_value_heads * head_dim * 512 * 2
    profile = tmp_path / "phi3.profile"
    assert main([str(a) for a in ["-q", "profile", source, "--calib-text", text_file, "--calib-windows", 4,
                                  "--calib-len", 64, "--held-out-windows", 2, "--held-out-len", 64,
                                  "--fisher-windows", 0, "--methods", "rtn", "--out", profile]]) == 0
    out = tmp_path / "plan.json"
    assert main(["plan", str(profile), "--device-budget", "gpu0=1GiB,cpu=1GiB", "--context", "512",
                 "--out", str(out)]) == 0
    devices = json.loads(out.read_text())["placement"]["devices"]
    held_blocks = {name: d["blocks"][1] - d["blocks"][0] + 1 if d["blocks"] else 0 for name, d in devices.items()}
    assert sum(held_blocks.values()) == config.num_hidden_layers
    assert all(devices[name]["kv_cache"] == n * per_block for name, n in held_blocks.items())
