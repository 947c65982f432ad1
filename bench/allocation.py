"""Allocation under a budget (default: the full-precision SmolLM2-135M stand-in): uniform, a
llama.cpp-style rule mix, and mixq's plans.

For each budget (whole-file bits per weight, the tied embedding planned like every other tensor):
- uniform: one format and method for every block linear, and for the embedding/output matrix its
  own option of least predicted loss that still fits (as a mixed plan may give it); of these, the
  plan of least predicted loss;
- rule mix: a base format everywhere, two more bits for v_proj and down_proj in the first and last
  eighth of the blocks and every third block between (llama.cpp's use_more_bits), 6 bits for the
  tied embedding/output; the largest base that fits;
- mixq: the exact plan of each estimator.
Every plan is quantized by the same sequential pipeline as `mixq quantize --budget`, saved (its
size is the file's), and evaluated on the same windows against cached reference log-probs.

    python bench/allocation.py --text ../shared/data/wikitext-2-raw/wiki.test.raw
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from mixq.cli import HELD_OUT_SEED
from mixq.atomic import atomic_write_text
from mixq.checkpoint import Checkpoints, work_dir
from mixq.data import WindowSpec, load_windows
from mixq.evaluate import evaluate, reference_hidden
from mixq.export import native
from mixq.methods import MethodSettings
from mixq.models import LoadedModel, load_model
from mixq.options import Option, OptionSpace
from mixq.plan import Budget, Plan, capacity, plan_for_budget, plan_from_options
from mixq.profile import ESTIMATORS, LEARNED, Profile, ProfileSettings, build_profile
from mixq.quantize import quantize_model
from mixq.report import fmt_interval, markdown_table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import (  # noqa: E402  (shared provenance of bench results)
    REFERENCE_LINE, SMOLLM2_STANDIN, commit, earlier_rows, machine, model_name, reference,
)

ROOT = Path(__file__).resolve().parent.parent
REFERENCE_MODEL = "hessian+kl"  # every row's predicted loss is priced with this error model
HEADERS = ["budget", "plan", "bpw (whole file)", f"predicted ({REFERENCE_MODEL})", "KL mean", "KL 95% interval", "ppl",
           "top-1", "plan s", "quantize s"]


def block_index(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[2]) if len(parts) > 3 and parts[1] == "layers" else None


def uniform_plan(profile: Profile, loaded: LoadedModel, fmt: str, method: str, budget: Budget) -> Plan | None:
    """Every block linear in `fmt`-`method`, the embedding/output matrix in the option of least
    predicted loss that keeps the plan within the budget (None: nothing fits)."""
    base = {t: f"{fmt}-{method}" for t in profile.tensors if t != loaded.head_name}
    if not all(o in profile.options for o in base.values()):
        return None
    head = profile.tensors.index(loaded.head_name)
    allowed = [o for i, o in enumerate(profile.options) if np.isfinite(profile.errors["hessian"][head, i])]
    plans = fitting([plan_from_options(profile, base | {loaded.head_name: o}, REFERENCE_MODEL, f"uniform {fmt} {method}")
                     for o in allowed], profile, budget)
    return min(plans, key=lambda p: p.predicted_loss, default=None)


def more_bits(block: int, n_blocks: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth of the blocks and every third between."""
    return block < n_blocks // 8 or block >= 7 * n_blocks // 8 or (block - n_blocks // 8) % 3 == 2


def rule_options(profile: Profile, loaded: LoadedModel, bits: int, group: int) -> dict[str, str] | None:
    """Base `bits` everywhere; v_proj and down_proj of the favoured blocks get the next width >= bits + 2."""
    n_blocks = len(loaded.blocks())
    widths = sorted({int(o[3]) for o in profile.options if o.startswith("int")})
    boosted = next((b for b in widths if b >= bits + 2), widths[-1])
    options = {}
    for t in profile.tensors:
        block = block_index(t)
        if t == loaded.head_name:
            options[t] = f"int6-g{group}-rtn"
        elif block is not None and t.endswith(("v_proj", "down_proj")) and more_bits(block, n_blocks):
            options[t] = f"int{boosted}-g{group}-gptq"
        else:
            options[t] = f"int{bits}-g{group}-gptq"
    return options if all(o in profile.options for o in options.values()) else None


def fitting(plans: list[Plan], profile: Profile, budget: Budget) -> list[Plan]:
    return [p for p in plans if p.planned_bytes <= capacity(profile, budget)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", type=Path, required=True, help="evaluation text (WikiText-2 test)")
    parser.add_argument("--model", default=str(SMOLLM2_STANDIN),
                        help="the model (default: the SmolLM2 stand-in that bench/standin.py writes)")
    parser.add_argument("--budgets", default="3.0,3.5,4.0,4.5,5.0", help="bits per weight, comma separated")
    parser.add_argument("--estimators", default=",".join(ESTIMATORS))
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--calib-windows", type=int, default=64)
    parser.add_argument("--profile", type=Path, default=ROOT / "runs" / "smol-standin.profile",
                        help="reused when it exists (it must have been measured on --model), else measured and saved there")
    parser.add_argument("--methods", default="rtn,gptq", help="the option space's methods, e.g. rtn,gptq,block; "
                        "the uniform row takes its best method")
    parser.add_argument("--bits-options", default="2,3,4,5,6,8")
    parser.add_argument("--group-sizes", default="32,64,128")
    parser.add_argument("--measure-every", type=int, default=1)
    parser.add_argument("--fisher-windows", type=int, default=8, help="0 skips the backward passes (no fisher estimators)")
    parser.add_argument("--no-rule", action="store_true", help="skip the llama.cpp-style rule mix")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "allocation.md")
    args = parser.parse_args()
    start = time.perf_counter()

    loaded = load_model(args.model, in_memory=True)
    # The first windows of the default calibration sample (64 x 512, seed 0), shared with `mixq quantize`.
    calib = load_windows(loaded, WindowSpec(max(64, args.calib_windows), 512, None, 0))[: args.calib_windows]
    windows = load_windows(loaded, WindowSpec(args.windows, args.seq_len, args.text), first=True)
    reference = reference_hidden(loaded, windows)

    if args.profile.exists():
        profile, profile_seconds = Profile.load(args.profile), None
        profile.check_model(loaded)
    else:
        held_out = load_windows(loaded, WindowSpec(4, 512, None, HELD_OUT_SEED))
        space = OptionSpace(bits=tuple(int(b) for b in args.bits_options.split(",")),
                            group_sizes=tuple(int(g) for g in args.group_sizes.split(",")),
                            methods=tuple(args.methods.split(",")))
        settings = ProfileSettings(space=space, measure_every=args.measure_every, fisher_windows=args.fisher_windows)
        # a stopped run resumes its profile from the last block or KL group it saved
        checkpoints = Checkpoints(work_dir(args.profile), {"model": args.model, "calib_windows": args.calib_windows,
                                                           "settings": repr(settings)})
        if checkpoints.resumed:
            print(f"resuming the profile from {checkpoints.directory}", flush=True)
        profile = build_profile(loaded, calib, held_out, settings, checkpoints)
        profile.save(args.profile)
        checkpoints.discard()
        profile_seconds = profile.info["seconds"]["total"]

    learned_methods = [m for m in args.methods.split(",") if m in LEARNED]
    without_learned = dataclasses.replace(profile, errors={
        k: np.where([o.rsplit("-", 1)[-1] in LEARNED for o in profile.options], np.inf, v)
        for k, v in profile.errors.items()})
    rows: list[list] = []
    predicted: list[float] = []
    measured: list[float] = []
    for value in args.budgets.split(","):
        budget = Budget.parse(f"{value}bpw")
        candidates = {}
        formats = sorted({o.rsplit("-", 1)[0] for o in profile.options if o != "f16"})
        methods = [m for m in args.methods.split(",") if m != "rtn"] or ["rtn"]
        uniform = [p for f in formats for m in methods if (p := uniform_plan(profile, loaded, f, m, budget))]
        if uniform:
            candidates["uniform"] = (min(uniform, key=lambda p: p.predicted_loss), None)
        rule = [] if args.no_rule else fitting([p for b in (2, 3, 4, 5, 6) for g in (32, 64, 128) if (o := rule_options(profile, loaded, b, g))
                        for p in [plan_from_options(profile, o, REFERENCE_MODEL, f"rule int{b}-g{g}")]], profile, budget)
        if rule:
            candidates["rule mix"] = (max(rule, key=lambda p: p.planned_bytes), None)
        for estimator in args.estimators.split(","):
            t0 = time.perf_counter()
            plan = plan_for_budget(profile, budget, estimator)
            candidates[f"mixq {estimator}"] = (plan, time.perf_counter() - t0)
            if learned_methods:  # the same space without the learned methods, for what they add
                t0 = time.perf_counter()
                plan = plan_for_budget(without_learned, budget, estimator)
                candidates[f"mixq {estimator} (no {'/'.join(learned_methods)})"] = (plan, time.perf_counter() - t0)
        for label, (plan, plan_seconds) in candidates.items():
            options = {t: Option.parse(o) for t, o in plan.options.items()}
            t0 = time.perf_counter()
            result = quantize_model(loaded, calib, options, MethodSettings())
            quantize_seconds = time.perf_counter() - t0
            with tempfile.TemporaryDirectory() as tmp:
                storage = native.save(Path(tmp), loaded, result, {"model": loaded.spec})
                report = evaluate(loaded, windows, native.NativeSource(Path(tmp)), reference=reference)
            assert storage.file_bytes <= budget.total_bytes(storage.n_weights), (label, storage.file_bytes)
            pred = plan_from_options(profile, plan.options, REFERENCE_MODEL, "").predicted_loss
            predicted.append(pred)
            measured.append(report.kl_mean)
            name = plan.solver if label in ("uniform", "rule mix") else label
            rows.append([str(budget), name, storage.bpw, pred, report.kl_mean, fmt_interval(report.kl_ci95),
                         report.ppl, report.top1, plan_seconds, quantize_seconds])
            print(markdown_table(HEADERS, rows[-1:]), flush=True)
            write_report(args, rows, predicted, measured, profile, profile_seconds, len(windows), start, done=False)

    write_report(args, rows, predicted, measured, profile, profile_seconds, len(windows), start, done=True)


def write_report(args, rows, predicted, measured, profile, profile_seconds, n_windows, start, done) -> None:
    rho = spearmanr(predicted, measured).statistic if len(rows) >= 3 else float("nan")
    table = markdown_table(HEADERS, rows)
    estimators = args.estimators.split(",")
    ratios = []  # measured KL of each mixq plan / the uniform plan's, per budget
    for value in args.budgets.split(","):
        label = str(Budget.parse(f"{value}bpw"))
        kl = {r[1]: r[4] for r in rows if r[0] == label}
        uniform = next((v for k, v in kl.items() if k.startswith("uniform")), None)
        if uniform:
            ratios.append([label, *(kl[f"mixq {e}"] / uniform if f"mixq {e}" in kl else None for e in estimators)])
    profile_note = (f"measured in this run in {profile_seconds:.0f} s" if profile_seconds is not None
                    else f"reused from {args.profile} (measured in {profile.info['seconds']['total']:.0f} s)")
    learned = [m for m in args.methods.split(",") if m in LEARNED]
    # The plain run owns the file; a run whose option space has learned methods is its own section.
    heading = (f"## With learned rounding in the option space: methods {args.methods}" if learned
               else f"# Allocation under a budget: {model_name(args.model)}")
    text = f"""{heading}

Command: `python bench/allocation.py {" ".join(sys.argv[1:])}` ({(time.perf_counter() - start) / 60:.0f} min)

Machine: {machine()}; mixq at commit {commit()}

{REFERENCE_LINE}{reference(args.model)}.
- Calibration: {args.calib_windows} x 512 tokens sampled from the model (seed 0); profile {profile_note}.
- Evaluation: the first {n_windows} windows of {args.seq_len} tokens of `{args.text.name}`, KL(reference || quantized).
- bpw: the whole saved file (tied embedding, norms, header) over all weights. Budgets are upper bounds.
- KL 95% interval: bootstrap over the evaluation windows.
- Spearman rank correlation of predicted loss vs measured KL over all {len(rows)} plans: **{rho:.3f}**.

{table}

mixq's measured KL / the uniform plan's, per budget and estimator (target <= 0.7):

{markdown_table(["budget", *estimators], ratios)}
"""
    if not done:
        text += f"\n**Partial: {len(rows)} plans measured so far; the run is still going.**\n"
    if learned and args.out.exists():
        kept = args.out.read_text().split(f"\n{heading}\n")[0].rstrip("\n")
        text = f"{kept}\n\n{text}"
    elif earlier := earlier_rows(args.out, text):
        text += "\n" + earlier
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, text)
    if done:
        print(text)


if __name__ == "__main__":
    main()
