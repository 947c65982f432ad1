"""Profiles on the tiny Llama: exact bytes, allowed options, the error model, and files that round-trip."""

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from mixq.cli import main
from mixq.data import WindowSpec, load_windows
from mixq.errors import MixqError
from mixq.models import load_model
from mixq.options import KEEP, Option, OptionSpace
from mixq.profile import Profile, ProfileSettings, build_profile, calibrate

SPACE = OptionSpace(bits=(2, 4, 8), group_sizes=(32, 64), methods=("rtn", "gptq"))


@pytest.fixture(scope="module")
def tiny_profile(tiny_llama_dir, text_file):
    loaded = load_model(str(tiny_llama_dir))
    calib = load_windows(loaded, WindowSpec(8, 64, text_file), first=False)
    held_out = load_windows(loaded, WindowSpec(3, 64, text_file, seed=9), first=False)
    settings = ProfileSettings(space=SPACE, measure=("int2-g64", "int4-g64"), batch_size=4)
    before = {n: p.clone() for n, p in loaded.residents.items()}
    profile = build_profile(loaded, calib, held_out, settings)
    for n, p in loaded.residents.items():  # profiling leaves the model as it was
        assert p.equal(before[n]), n
    return profile


def test_profile_tables(tiny_profile):
    p = tiny_profile
    assert len(p.tensors) == 15 and p.tensors[-1] == "model.embed_tokens"  # 2 x 7 linears + tied head
    for t, shape in enumerate(p.shapes):
        for o, name in enumerate(p.options):
            assert p.nbytes[t, o] == Option.parse(name).nbytes(shape)
    keep = p.options.index(KEEP)
    assert (p.errors["hessian"][:, keep] == 0).all()
    head = p.tensors.index("model.embed_tokens")
    for o, name in enumerate(p.options):  # the tied embedding is only rounded, or kept
        assert np.isfinite(p.errors["hessian"][head, o]) == (name.endswith("-rtn") or name == KEEP)
    finite = np.isfinite(p.errors["hessian"])
    assert (p.errors["hessian"][finite] >= 0).all() and np.array_equal(finite, np.isfinite(p.errors["fisher"]))
    # two measured formats per tensor, each at its better method
    assert (np.isfinite(p.measured).sum(axis=1) == 2).all()
    # lower bits, more error: for every tensor the int2 error exceeds the int4 one
    i2, i4 = p.options.index("int2-g64-rtn"), p.options.index("int4-g64-rtn")
    assert (p.errors["hessian"][:, i2] > p.errors["hessian"][:, i4]).all()
    assert "inputs" not in p.errors  # no target, no engine rounding its inputs


def test_profile_round_trip(tiny_profile, tmp_path):
    path = tmp_path / "tiny.profile"
    tiny_profile.save(path)
    back = Profile.load(path)
    assert back.tensors == tiny_profile.tensors and back.options == tiny_profile.options
    assert back.shapes == tiny_profile.shapes and back.tie_groups == tiny_profile.tie_groups
    assert np.array_equal(back.nbytes, tiny_profile.nbytes)
    assert np.array_equal(back.measured, tiny_profile.measured, equal_nan=True)
    for k in tiny_profile.errors:
        assert np.array_equal(back.errors[k], tiny_profile.errors[k])
    assert (back.fixed_bytes, back.header_bytes, back.n_weights) == (
        tiny_profile.fixed_bytes, tiny_profile.header_bytes, tiny_profile.n_weights)


def test_corrupt_profile_is_refused(tmp_path):
    bad = tmp_path / "bad.profile"
    bad.write_bytes(b"not a profile")
    with pytest.raises(MixqError, match="cannot read profile"):
        Profile.load(bad)


def test_calibration_recovers_a_power_law():
    rng = np.random.default_rng(0)
    raw = rng.random((6, 4)) * 10 + 0.1
    raw[:, 3] = 0  # a kept option
    truth = np.array([1, 2, 3, 4, 5, 6.0])[:, None] * raw**1.5
    measured = np.full_like(raw, np.nan)
    measured[:5, :2] = truth[:5, :2]  # tensor 5 has no measurements
    kinds = ["a", "b", "a", "b", "c", "c"]
    pred = calibrate(raw, measured, kinds, [0, 0, 1, 1, 0, 1])
    assert np.allclose(pred[:5], truth[:5])
    assert np.allclose(pred[5], 5 * raw[5] ** 1.5)  # its kind's alpha (tensor 4)
    assert (pred[:, 3] == 0).all()


def test_calibration_interpolates_over_depth():
    """An unmeasured tensor's alpha comes from the measured ones of its kind at the blocks around it
    (log-linearly), the nearest beyond the ends; not one value for the whole kind."""
    raw = np.full((6, 1), 2.0)
    alphas = np.array([100.0, 10.0, 1.0])  # measured at blocks 0, 4 and 8
    measured = np.full_like(raw, np.nan)
    measured[:3, 0] = alphas * raw[:3, 0]
    pred = calibrate(raw, measured, ["v"] * 6, [0, 4, 8, 2, 6, 9])
    assert np.allclose(pred[3:, 0] / raw[3:, 0], [np.sqrt(1000), np.sqrt(10), 1.0])


def test_fused_tie_groups(tiny_llama_dir, tiny_profile):
    from mixq.profile import tie_groups

    loaded = load_model(str(tiny_llama_dir))
    groups = tie_groups(loaded, tiny_profile.tensors, "fused")
    named = [[tiny_profile.tensors[t].rsplit(".", 1)[-1] for t in g] for g in groups]
    assert named[:4] == [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]
    assert sorted(t for g in groups for t in g) == list(range(len(tiny_profile.tensors)))  # a partition
    with pytest.raises(MixqError, match="tie rule"):
        tie_groups(loaded, tiny_profile.tensors, "pairs")


@pytest.mark.parametrize("rule", ["experts", "fused"])
def test_expert_tie_groups(tiny_models, rule):
    from mixq.profile import tie_groups

    loaded = load_model(str(tiny_models("qwen3_moe")))
    tensors = list(loaded.plannable())
    groups = [[tensors[t] for t in g] for g in tie_groups(loaded, tensors, rule)]
    stacks = [g for g in groups if ".experts." in g[0]]
    assert len(stacks) == 2 * 2 and all(len(g) == 4 for g in stacks)  # 2 blocks x (gate/up, down) x 4 experts
    assert all(len({n.rsplit(".", 1)[0] for n in g}) == 1 for g in stacks)  # one stack per group
    attention = [g for g in groups if "self_attn" in g[0]]
    assert len(attention) == (2 * 2 if rule == "fused" else 2 * 4)  # q/k/v tied only by the fused rule
    assert sorted(n for g in groups for n in g) == sorted(tensors)


def test_fused_and_all_experts_tie_groups(tiny_models):
    """vLLM's rule: q/k/v and gate/up tied as fused, and every expert of the model in one group."""
    from mixq.profile import tie_groups

    loaded = load_model(str(tiny_models("qwen3_moe")))
    tensors = list(loaded.plannable())
    groups = [[tensors[t] for t in g] for g in tie_groups(loaded, tensors, "fused+all-experts")]
    experts = [g for g in groups if any(".experts." in n for n in g)]
    assert len(experts) == 1 and len(experts[0]) == 2 * 2 * 4  # 2 blocks x (gate/up, down) x 4 experts
    assert all(".experts." in n for n in experts[0])
    assert sum(1 for g in groups if g[0].endswith("q_proj") and len(g) == 3) == 2  # q/k/v of each block
    assert sorted(n for g in groups for n in g) == sorted(tensors)


def test_measured_blocks():
    from mixq.profile import measured_blocks

    assert measured_blocks(28, 3) == {0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27}
    assert measured_blocks(28, 7) == {0, 1, 2, 3, 4, 5, 6, 7, 14, 21, 27}
    assert measured_blocks(5, 1) == set(range(5)) == measured_blocks(5, 9)


def test_measure_every_and_no_fisher(tmp_path, text_file):
    """--measure-every 2 on five blocks measures blocks 0, 1, 2 and 4 (the first two, every second, the
    last; and the embedding) only; --fisher-windows 0 leaves no fisher estimator."""
    from conftest import save_tiny_model

    loaded = load_model(str(save_tiny_model(tmp_path / "five", num_hidden_layers=5)))
    calib = load_windows(loaded, WindowSpec(4, 64, text_file), first=False)
    held_out = load_windows(loaded, WindowSpec(2, 64, text_file, seed=9), first=False)
    settings = ProfileSettings(space=OptionSpace(bits=(2, 4), group_sizes=(32,), methods=("rtn",)),
                               measure=("int2-g32", "int4-g32"), fisher_windows=0, measure_every=2, batch_size=4)
    p = build_profile(loaded, calib, held_out, settings)
    measured = {p.tensors[t] for t in np.nonzero(np.isfinite(p.measured).any(axis=1))[0]}
    assert measured == {n for n in p.tensors if any(f".layers.{b}." in n for b in (0, 1, 2, 4))} | {"model.embed_tokens"}
    assert np.isfinite(p.predicted("hessian+kl")).all(axis=1).any()  # block 3: interpolated
    with pytest.raises(MixqError, match="no fisher errors"):
        p.predicted("fisher+kl")


def test_untied_embedding_is_planned(tmp_path, text_file):
    """An untied input embedding is a plannable tensor (rtn or kept), profiled, measured and quantized; the
    untied output matrix takes GPTQ as well."""
    from conftest import save_tiny_llama

    from mixq.plan import Budget, plan_for_budget
    from mixq.quantize import quantize_model

    loaded = load_model(str(save_tiny_llama(tmp_path / "untied", tied=False)))
    assert not loaded.tied_embedding
    assert list(loaded.plannable())[-2:] == ["model.embed_tokens", "lm_head"]
    calib = load_windows(loaded, WindowSpec(4, 64, text_file), first=False)
    held_out = load_windows(loaded, WindowSpec(2, 64, text_file, seed=9), first=False)
    space = OptionSpace(bits=(2, 4), group_sizes=(32,), methods=("rtn", "gptq"))
    p = build_profile(loaded, calib, held_out, ProfileSettings(space=space, measure=("int2-g32", "int4-g32"), batch_size=4))
    emb = p.tensors.index("model.embed_tokens")
    assert np.isfinite(p.measured[emb]).any()
    assert all(o.endswith(("-rtn", KEEP)) for o, e in zip(p.options, p.errors["hessian"][emb]) if np.isfinite(e))
    # The untied output matrix has its whole H: GPTQ is offered there, and lowers its error below RTN's.
    head, int4 = p.tensors.index("lm_head"), [p.options.index(f"int4-g32-{m}") for m in ("rtn", "gptq")]
    assert p.errors["hessian"][head, int4[1]] < p.errors["hessian"][head, int4[0]] < np.inf
    plan = plan_for_budget(p, Budget(4.5, "bpw"), "hessian+kl")
    options = {t: Option.parse(o) for t, o in plan.options.items()}
    options["lm_head"] = Option.parse("int4-g32-gptq")
    result = quantize_model(loaded, calib, options, batch_size=4)
    assert "model.embed_tokens" in result.tensors
    before = loaded.embedding()
    assert not result.tensors["model.embed_tokens"].dequantize().equal(before)
    rtn = quantize_model(loaded, calib, options | {"lm_head": Option.parse("int4-g32-rtn")}, batch_size=4)
    assert result.output_errors["lm_head"] < rtn.output_errors["lm_head"]


def test_row_fraction_estimates_the_whole(tiny_llama_dir, text_file):
    """Errors from half the rows, scaled up, are close to the full ones; diag(H) is kept per tensor."""
    loaded = load_model(str(tiny_llama_dir))
    calib = load_windows(loaded, WindowSpec(4, 64, text_file), first=False)
    held_out = load_windows(loaded, WindowSpec(2, 64, text_file, seed=9), first=False)
    space = OptionSpace(bits=(2, 4), group_sizes=(32,), methods=("rtn",))

    def profile(fraction):
        settings = ProfileSettings(space=space, measure=("int2-g32", "int4-g32"), batch_size=4, row_fraction=fraction,
                                   min_rows=1)
        return build_profile(loaded, calib, held_out, settings)

    full, half = profile(1.0), profile(0.5)
    ok = np.isfinite(full.errors["hessian"]) & (full.errors["hessian"] > 0)
    ratio = half.errors["hessian"][ok] / full.errors["hessian"][ok]
    assert 0.5 < np.median(ratio) < 2.0 and not np.allclose(ratio, 1.0)
    assert set(half.importance) == set(half.tensors) and half.importance["lm_head" if "lm_head" in half.tensors
                                                                          else "model.embed_tokens"].ndim == 1


def test_sampled_rows_keep_small_matrices_whole():
    import torch

    from mixq.profile import sample_rows

    assert sample_rows(256, 1 / 8, seed=3, min_rows=512).equal(torch.arange(256))
    big = sample_rows(8960, 1 / 8, seed=3, min_rows=512)
    assert len(big) == 1120 and len(set(big.tolist())) == 1120 and big.equal(big.sort().values)
    assert len(sample_rows(1536, 1 / 8, seed=3, min_rows=512)) == 512


@pytest.mark.parametrize("family", ["llama", "granite", "gemma2"])
def test_kl_to_reference_equals_its_definition(tiny_models, family):
    """The KL the profile measures, from precomputed reference terms (linear heads: llama tied,
    granite with its logit scaling and here a head bias) or from both sides' log-probabilities
    (gemma2's soft-capped logits), equals sum p (log p - log q) over every token."""
    import torch
    import torch.nn.functional as F

    from mixq.profile import KLToReference
    from mixq.runner import BlockRunner

    loaded = load_model(str(tiny_models(family)))
    runner = BlockRunner(loaded)
    gen = torch.Generator().manual_seed(0)
    if family == "granite":
        loaded.config.get_text_config().logits_scaling = 0.5
        head = loaded.layout.head
        runner._head = {**runner.head(), f"{head}.bias": torch.randn(loaded.vocab_size, generator=gen)}
    reference = [torch.randn(2, 7, loaded.hidden_size, generator=gen) for _ in range(2)]
    model = [h + torch.randn(h.shape, generator=gen) for h in reference]
    kl = KLToReference(runner, reference)
    assert (kl.terms is None) == (family == "gemma2")
    log_p = [F.log_softmax(runner.logits(h).double(), -1) for h in reference]  # float64: the ground truth
    log_q = [F.log_softmax(runner.logits(h).double(), -1) for h in model]
    expected = sum((p.exp() * (p - q)).sum().item() for p, q in zip(log_p, log_q)) / 28
    assert expected > 1e-3
    assert kl(model) == pytest.approx(expected, rel=1e-4)  # float32 logits on both sides
    assert kl(reference) < 1e-6


@pytest.mark.parametrize("taped", [False, True])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_measure_kl_equals_a_full_forward_with_one_matrix_replaced(tiny_models, family, taped):
    """Each point of measure_kl (blocks run one by one from the replaced matrix's block, points of a
    block in one sweep, reference terms precomputed) equals the KL of transformers' own forward of
    the whole model with that matrix replaced: to float32's rounding, or with the later blocks
    replayed from tapes (bfloat16 differences) to a few parts in a thousand."""
    import torch
    import torch.nn.functional as F

    from mixq.formats import parse_format
    from mixq.methods import MethodSettings, get_method
    from mixq.models import materialize
    from mixq.profile import measure_kl

    loaded = load_model(str(tiny_models(family)))
    refs = loaded.plannable()
    tensors = [n for n in refs if refs[n].kind in ("self_attn.q_proj", "mlp.down_proj", "self_attn.v_proj")]
    windows = torch.randint(0, loaded.vocab_size, (3, 24), generator=torch.Generator().manual_seed(1))
    items = {}
    for t, name in enumerate(tensors):
        W = loaded.read(refs[name].param).float()
        rows = torch.arange(0, W.shape[0], 2)  # a row subset, as the profile's row sampling measures
        # 40x the weights: a tiny random model barely reacts to its own matrices quantized
        q = get_method("rtn")(40 * W[rows], torch.eye(W.shape[1]), parse_format("int2-g32"), MethodSettings())
        items[(t, 0)] = (rows, q)
    measured = measure_kl(loaded, windows, tensors, items, batch_size=2, taped=taped)

    model = materialize(loaded).eval()
    with torch.no_grad():
        log_p = F.log_softmax(model(windows).logits.double(), -1)
        for (t, o), (rows, q) in items.items():
            param = model.get_parameter(refs[tensors[t]].param)
            original = param.detach().clone()
            param.data[rows] = q.dequantize()
            log_q = F.log_softmax(model(windows).logits.double(), -1)
            param.data.copy_(original)
            expected = float((log_p.exp() * (log_p - log_q)).sum(-1).mean())
            assert expected > 1e-4
            assert measured[(t, o)] == pytest.approx(expected, rel=3e-3 if taped else 1e-4), (tensors[t], measured[(t, o)], expected)


JSON = st.recursive(st.none() | st.booleans() | st.integers(-3, 10**12) | st.floats(allow_nan=True) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
                    max_leaves=8)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_lying_profile_is_one_clear_error(tiny_profile, tmp_path, capsys, data):
    """Any key of a real profile's metadata replaced, dropped or cut short, or a table reshaped: `mixq
    plan` either plans or ends in one `mixq: error:` line, never another exception."""
    from safetensors.numpy import load_file, save_file

    path = tmp_path / "real.profile"
    tiny_profile.save(path)
    with safe_open(str(path), framework="np") as f:
        meta = json.loads(f.metadata()["mixq.profile"])
    arrays = load_file(str(path))
    key = data.draw(st.sampled_from(sorted(meta) + sorted(arrays)))
    how = data.draw(st.sampled_from(("replace", "drop", "shorten")))
    where = meta if key in meta else arrays
    if how == "drop":
        del where[key]
    elif key in arrays:
        arrays[key] = arrays[key][:-1] if how == "shorten" else np.zeros(data.draw(st.integers(0, 3)), np.float32)
    elif how == "shorten" and isinstance(meta[key], list) and meta[key]:
        meta[key] = meta[key][:-1]
    else:
        meta[key] = data.draw(JSON)
    lying = tmp_path / "lying.profile"
    save_file(arrays, str(lying), metadata={"mixq.profile": json.dumps(meta)})
    capsys.readouterr()
    code = main(["plan", str(lying), "--budget", "5bpw"])
    err = capsys.readouterr().err
    assert code == 0 or (code == 2 and err.startswith("mixq: error: ") and err.count("\n") == 1), err
