"""The `mixq` command. Every subcommand has --help; bad input ends in one line and exit code 2."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path

from mixq import __version__
from mixq.atomic import atomic_write_text
from mixq.errors import MixqError

log = logging.getLogger("mixq")

DEFAULT_CALIB = dict(windows=64)
DEFAULT_EVAL = dict(windows=40)
DEFAULT_SEQ_LEN = 512  # tokens per window of every kind, unless the model's context is shorter
EVAL_SEED = 1  # sampled evaluation text must not be the calibration text (seed 0)
HELD_OUT_SEED = 2  # the profile's end-to-end measurements use yet other samples
PROFILE_FILE = "mixq.profile"  # where `quantize --budget` keeps the profile it measured
# flags that change no checkpointed state: a resumed run may differ in them
JOB_FLAGS_OF_NO_CONSEQUENCE = ("out", "overwrite", "restart", "run", "verbose", "quiet", "in_memory", "eval_text",
                               "eval_windows", "eval_len")


def _group_size(value: str) -> int:
    if value in ("channel", "ch", "0"):
        return 0
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'channel', got {value!r}") from None


def _int_list(value: str) -> tuple[int, ...]:
    return tuple(_group_size(v) for v in value.split(","))


def _str_list(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def _text_file(value: str) -> Path:
    """A text file checked before any long work starts."""
    from mixq.data import read_text

    read_text(Path(value))
    return Path(value)


def _add_memory(p: argparse.ArgumentParser) -> None:
    p.add_argument("--in-memory", action="store_true", help="keep every block's weights in memory once read "
                   "(faster on models that fit; default: read each block from the file when it is needed)")
    p.add_argument("--device", default="auto", help="where the blocks run (sampling, statistics, KL, evaluation): "
                   "auto (default: CUDA when torch sees it, else the CPU), cpu, cuda or cuda:N; the per-matrix "
                   "quantizers run on the CPU")


def _device(args: argparse.Namespace):
    from mixq.runner import compute_device

    return compute_device(args.device)


def _passes_dtype(args: argparse.Namespace, device):
    """The matmul precision of the passes over the calibration windows: float32 with --fp32-passes,
    else the device's fast one (bfloat16 where it multiplies it in hardware)."""
    import torch

    from mixq.runner import fast_matmul_dtype

    return torch.float32 if args.fp32_passes else fast_matmul_dtype(device)


def _add_calibration(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("calibration")
    g.add_argument("--calib-text", type=_text_file, help="calibration text file (default: text sampled "
                   "from the model itself)")
    g.add_argument("--calib-windows", type=int, default=DEFAULT_CALIB["windows"], help="windows (default 64)")
    g.add_argument("--calib-len", type=int, help="tokens per window (default 512, or the model's context if shorter)")
    g.add_argument("--seed", type=int, default=0, help="seed of calibration sampling (default 0)")


def _add_method_settings(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("methods")
    g.add_argument("--no-act-order", action="store_true", help="GPTQ: visit columns in storage order")
    g.add_argument("--damp", type=float, default=0.01, help="GPTQ: dampening, fraction of mean diag(H)")
    g.add_argument("--no-clip-search", action="store_true", help="use each group's full range")
    g.add_argument("--init", default="gptq", help="adaquant/cd/block: the method they refine "
                   "(rtn or gptq; default gptq)")
    g.add_argument("--steps", type=int, default=100, help="adaquant: signed-gradient steps per layer (default 100)")
    g.add_argument("--no-learn-scale", action="store_true", help="adaquant/block: train the rounding only, "
                   "not the int formats' group scales")
    g.add_argument("--block-steps", type=int, default=40, help="block: steps per transformer block (default 40)")
    g.add_argument("--block-batch", type=int, default=4, help="block: calibration windows per step (default 4)")
    g.add_argument("--block-target", choices=("fp", "local"), default="fp", help="block and norm tuning: match the "
                   "full-precision model's block outputs (fp, default) or the fp block on quantized inputs (local)")
    g.add_argument("--norm-tuning", action="store_true", help="train each block's norm weights on its output")
    g.add_argument("--fp32-training", action="store_true", help="block and norm tuning: matmuls in float32 "
                   "(default: bfloat16 in their training and forward passes where the device multiplies bfloat16 in "
                   "hardware, 2.3-3x faster there)")
    g.add_argument("--bias-correction", action="store_true", help="biases absorb their layer's mean output error")
    g.add_argument("--fp32-passes", action="store_true", help="the passes over the calibration windows that "
                   "capture each layer's inputs (quantize and profile), in float32 (default: bfloat16 matmuls "
                   "where the device multiplies bfloat16 in hardware, float32 statistics either way)")


def _add_profile_settings(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("option space and profile")
    g.add_argument("--target", choices=tuple(_targets()), help="the engine the result is for: only the options "
                   "it runs, tied as it fuses them (" + "; ".join(f"{t.name}: {t.summary}" for t in _targets().values())
                   + "); default: any of mixq's formats")
    g.add_argument("--formats", type=_str_list, help="format families or names to consider: int (mixq's "
                   "integer grids, the default), gguf (llama.cpp's ggml types; the budget is then the exported "
                   "GGUF's size), or names such as q4_k,q6_k")
    g.add_argument("--bits-options", type=_int_list, help="bit widths to consider (default 2,3,4,5,6,8)")
    g.add_argument("--group-sizes", type=_int_list, help="group sizes to consider (default 32,64,128)")
    g.add_argument("--methods", type=_str_list, help="methods to consider: rtn, gptq, cd, adaquant, block (default "
                   "rtn,gptq; adaquant and block are measured on a few blocks and predicted for the rest)")
    g.add_argument("--no-keep", action="store_true", help="do not allow keeping a tensor at 16 bits")
    g.add_argument("--space", type=Path, help="JSON file with the option space (keys: bits, group_sizes, "
                   "methods, symmetric, keep_16bit); flags override it")
    g.add_argument("--tie", default="none", help="none; fused: matrices of a block that read one input share "
                   "one option (q/k/v, gate/up, all experts of a stack); experts: only each stack's experts do; "
                   "all-experts: every expert of the model does; fused+all-experts: both")
    g.add_argument("--fisher-windows", type=int, default=8, help="calibration windows with a backward pass (default 8)")
    g.add_argument("--measure", type=_str_list, default=(),
                   help="formats whose end-to-end KL is measured per tensor to calibrate the error model "
                   "(default: 3 and 4 bits at the largest group size)")
    g.add_argument("--held-out-windows", type=int, default=4, help="windows for those measurements (default 4)")
    g.add_argument("--held-out-text", type=_text_file, help="text for those measurements (default: text sampled "
                   "from the model; text like what the model will read ranks tensors as its users will, "
                   "bench/results/heldout.md)")
    g.add_argument("--row-fraction", type=float, default=1.0, help="profile this share of each tensor's rows "
                   "and scale up (errors and measured KL; rows are independent in every format), never fewer than 512 rows "
                   "of a matrix: large models")
    g.add_argument("--measure-every", type=int, default=1, help="measure only the tensors of every n-th block, "
                   "the first n and the last; the others' error model is interpolated over depth from their kind's measured "
                   "ones (default 1: all; large models: 4)")
    g.add_argument("--held-out-len", type=int, help="tokens per window (default 512, or the model's context if "
                   "shorter)")


def _add_latency_limit(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("latency")
    g.add_argument("--max-latency", help="with --budget, --max-loss or --device-budget: the plan's time per "
                   "decoded token (the table's matrix products, with its engine fit if it has one) is at most "
                   "this, as measured here: 40ms, 40ms/token, 0.04s, or a speed: 25tok/s")
    g.add_argument("--latency", type=Path, help="the latency table measured on this machine (`mixq bench-device`); "
                   "with --device-budget, one per device that holds blocks: cpu=cpu.latency,gpu0=gpu0.latency")


def _add_device_budget(p: argparse.ArgumentParser) -> None:
    dv = p.add_argument_group("devices")
    dv.add_argument("--device-budget", help="memory of each device, e.g. gpu0=6GiB,cpu=10GiB: blocks are placed "
                    "in layer order (the host, then the accelerators as named) and typed together so each device "
                    "holds its blocks' weights and KV cache; without cpu the host keeps only the token embedding "
                    "(--budget, if given, still limits the whole file)")
    dv.add_argument("--offload", default="auto", help="with --device-budget: auto (default) solves how many "
                    "blocks leave the host; a number fixes it, as llama.cpp's -ngl counts (blocks, then the output)")
    dv.add_argument("--context", type=int, default=4096, help="with --device-budget: tokens of KV cache each "
                    "device holds for its blocks, in f16 (default 4096; 0 leaves it out)")


def _targets():
    from mixq.export import TARGETS

    return TARGETS


def _add_job_settings(p: argparse.ArgumentParser) -> None:
    """What `quantize` and `profile` share: memory, calibration, methods, option space, resuming."""
    p.add_argument("--restart", action="store_true", help="discard the checkpoints of an interrupted run of "
                   "this output (.OUT.resume) instead of continuing from them")
    _add_memory(p)
    _add_calibration(p)
    _add_method_settings(p)
    _add_profile_settings(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mixq", description="Fit a neural network to a budget with the least loss of quality."
    )
    parser.add_argument("--version", action="version", version=f"mixq {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more detail")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)
    model_help = "smollm2-135m, a .gguf file, a Hugging Face model directory, or hf:owner/name"

    q = sub.add_parser("quantize", help="quantize a model (one format, or the best mix for a budget)",
                       description="Quantize the linears of the transformer blocks block by block: with one "
                       "format and method, or with --budget, the plan of least predicted loss that fits.")
    q.add_argument("model", help=model_help)
    q.add_argument("--out", type=Path, required=True, help="output directory (written atomically)")
    q.add_argument("--budget", help="size of the whole file: 3.0bpw, 60MB, 58MiB (plans a mix of options)")
    q.add_argument("--profile", type=Path, help="with --budget: reuse this profile instead of measuring")
    q.add_argument("--estimator", default="hessian+kl", help="with --budget: hessian+kl (default), fisher+kl, "
                   "hessian or fisher")
    q.add_argument("--bits", type=int, default=4, help="uniform: bits per weight code, 2-8 (default 4)")
    q.add_argument("--group-size", type=_group_size, default=128,
                   help="uniform: input weights per scale: 16-1024 (power of two) or 'channel' (default 128)")
    q.add_argument("--sym", action="store_true", help="symmetric grid (no zero points stored)")
    q.add_argument("--format", help="uniform: a format by name instead of --bits/--group-size: int4-g64, q4_k, "
                   "q6_k, ... (a ggml type falls back as llama.cpp does on rows it does not fit)")
    q.add_argument("--max-kl", type=float, help="the smallest plan whose predicted KL to the reference is at "
                   "most this (instead of --budget)")
    q.add_argument("--method", default="gptq", help="uniform: rtn, gptq (default), cd (coordinate descent from "
                   "gptq), adaquant (learned rounding per layer) or block (learned rounding per transformer block)")
    q.add_argument("--eval-text", type=_text_file, help="evaluate on this text right after quantizing")
    q.add_argument("--eval-windows", type=int, default=DEFAULT_EVAL["windows"])
    q.add_argument("--eval-len", type=int, help="tokens per window (default 512, or the model's context if shorter)")
    q.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    _add_latency_limit(q)
    _add_device_budget(q)
    _add_job_settings(q)
    q.set_defaults(run=cmd_quantize)

    e = sub.add_parser("eval", help="measure a quantized model against its reference",
                       description="Reload a `mixq quantize` output and measure perplexity, KL divergence to "
                       "the unquantized model and top-1 agreement on the same windows.")
    e.add_argument("dir", type=Path, help="output directory of `mixq quantize`")
    e.add_argument("--text", type=_text_file, help="evaluation text (default: held-out text sampled from "
                   f"the model, seed {EVAL_SEED})")
    e.add_argument("--windows", type=int, default=DEFAULT_EVAL["windows"], help="non-overlapping windows (default 40)")
    e.add_argument("--seq-len", type=int, help="tokens per window (default 512, or the model's context if shorter)")
    _add_memory(e)
    e.set_defaults(run=cmd_eval)

    p = sub.add_parser("profile", help="measure every tensor in every option (bytes, errors)",
                       description="Build a sensitivity profile: for every quantizable tensor and option, its "
                       "exact bytes and error estimates, plus measured end-to-end KL points.")
    p.add_argument("model", help=model_help)
    p.add_argument("--out", type=Path, required=True, help="profile file to write (e.g. runs/smol.profile)")
    p.add_argument("--sym", action="store_true", help="symmetric grids")
    _add_job_settings(p)
    p.set_defaults(run=cmd_profile)

    pl = sub.add_parser("plan", help="choose options for a budget, or print the whole frontier",
                        description="Solve for the plan of least predicted loss under a budget (exact MILP), "
                        "or trace the loss/size frontier over the whole feasible range.")
    pl.add_argument("profile", type=Path, help="a profile written by `mixq profile`")
    pl.add_argument("--budget", help="size of the whole file: 3.0bpw, 60MB, 58MiB")
    pl.add_argument("--max-loss", type=float, help="the smallest plan whose predicted loss is at most this")
    pl.add_argument("--frontier", action="store_true", help="print the frontier and plot it")
    pl.add_argument("--plot", type=Path, help="frontier plot (default: PROFILE.frontier.png)")
    pl.add_argument("--axis", choices=("bytes", "latency"), default="bytes", help="the frontier's cost: the file's "
                    "size (default), or the time per decoded token of a latency table (--latency)")
    pl.add_argument("--estimator", default="hessian+kl", help="hessian+kl (default), fisher+kl, hessian, fisher")
    pl.add_argument("--out", type=Path, help="write the plan as JSON")
    _add_latency_limit(pl)
    _add_device_budget(pl)
    pl.set_defaults(run=cmd_plan)

    d = sub.add_parser("bench-device", help="time every matrix shape in every option with the target engine's "
                       "kernels on this machine", description="Measure, with the engine's own kernels, the time of "
                       "each matrix product a plan can use (each shape in each option; a decoded token, and "
                       "optionally a prefill batch): a latency table for `--max-latency`. Give a profile (exactly "
                       "its options) or a model (the target's default options); --fit runs whole exported files in "
                       "the engine's benchmark and fits the time the products do not account for.")
    d.add_argument("model", nargs="?", help="a model whose shapes to time (or --profile)")
    d.add_argument("--profile", type=Path, help="time the options of this profile")
    d.add_argument("--target", default="gguf", choices=tuple(n for n, t in _targets().items() if t.kernels),
                   help="the engine whose kernels run (default gguf: llama.cpp)")
    d.add_argument("--out", type=Path, required=True, help="the latency table to write (JSON)")
    d.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads the engine will run with "
                   "(default: every logical CPU)")
    d.add_argument("--repeats", type=int, default=5, help="measurements per case (default 5; the table keeps each)")
    d.add_argument("--prefill-tokens", type=int, default=0, help="also time products of this many tokens at once")
    d.add_argument("--fit", type=Path, nargs="+", help="exported files (e.g. GGUFs of the model in a few types, "
                   "or vLLM directories) to run in the engine's own benchmark: fits what the table misses "
                   "(measured = scale x products + overhead), which --max-latency then uses; alone, adds the fit to "
                   "the table at --out (or writes a table of the files' own products)")
    d.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    d.set_defaults(run=cmd_bench_device)

    r = sub.add_parser("report", help="write one self-contained HTML page about a profile and its runs",
                       description="The frontier (predicted, and the runs' measured KL with 95% intervals), "
                       "each tensor's sensitivity and each plan's allocation as heat maps, and the measured "
                       "table, as one HTML file with inline SVG figures.")
    r.add_argument("inputs", type=Path, nargs="+", help="a profile file and/or `mixq quantize` output directories")
    r.add_argument("--out", type=Path, required=True, help="the HTML file to write")
    r.add_argument("--budget", help="also show the allocation of the profile's plan for this budget")
    r.add_argument("--estimator", default="hessian+kl", help="hessian+kl (default), fisher+kl, hessian, fisher")
    r.add_argument("--latency", type=Path, help="a latency table measured here (`mixq bench-device`): also the "
                   "frontier against the time per decoded token")
    r.set_defaults(run=cmd_report)

    from mixq.export import TARGETS

    x = sub.add_parser("export", help="write a quantized model for another engine (llama.cpp, transformers, vLLM)",
                       description="Convert a `mixq quantize` output to another engine's format, every value "
                       "carried over exactly and checked before the output appears. Targets: "
                       + "; ".join(f"{t.name}: {t.summary}" for t in TARGETS.values()) + ".")
    x.add_argument("dir", type=Path, help="output directory of `mixq quantize`")
    x.add_argument("--to", choices=tuple(TARGETS), required=True, help="target engine format")
    x.add_argument("out", type=Path, help="file or directory to write (written atomically)")
    x.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    x.set_defaults(run=cmd_export)
    return parser


def cmd_report(args: argparse.Namespace) -> None:
    from mixq.report_page import read_inputs, render

    profile, runs = read_inputs(args.inputs)
    latency = None
    if args.latency is not None:
        from mixq.latency import decode_limit

        if profile is None:
            raise MixqError("--latency needs a profile among the inputs (its shapes and options are timed)")
        latency = decode_limit(profile, *_latency_table(args.latency), math.inf)
    atomic_write_text(args.out, render(profile, runs, args.estimator, args.budget, latency))
    print(f"wrote {args.out} ({args.out.stat().st_size:,} bytes)")


def cmd_export(args: argparse.Namespace) -> None:
    from mixq.export import get_target

    start = time.perf_counter()
    wrote = get_target(args.to).export(args.dir, args.out, args.overwrite)
    print(f"wrote {args.out} in {time.perf_counter() - start:.1f} s: {wrote}")


def _method_settings(args: argparse.Namespace):
    from mixq.methods import BLOCK_METHODS, REFINING, MethodSettings, get_method

    if args.init in BLOCK_METHODS or args.init in REFINING:
        raise MixqError(f"--init {args.init}: a refining method starts from a one-shot method (rtn or gptq)")
    get_method(args.init)
    if args.steps < 0 or args.block_steps < 0 or args.block_batch < 1:
        raise MixqError("--steps and --block-steps must be >= 0, --block-batch >= 1")
    return MethodSettings(clip_search=not args.no_clip_search, damp=args.damp, act_order=not args.no_act_order,
                          init=args.init, steps=args.steps, learn_scale=not args.no_learn_scale)


def _reconstruct_settings(args: argparse.Namespace):
    from mixq.reconstruct import ReconstructSettings

    return ReconstructSettings(steps=args.block_steps, batch_windows=args.block_batch, target=args.block_target,
                               norm_tuning=args.norm_tuning, bias_correction=args.bias_correction, seed=args.seed,
                               bf16=not args.fp32_training)


def _profile_settings(args: argparse.Namespace):
    import dataclasses

    from mixq.options import OptionSpace
    from mixq.profile import ProfileSettings

    target = _targets()[args.target] if args.target else None
    space = OptionSpace.from_file(args.space) if args.space else OptionSpace()
    if target is not None and not args.space:
        space = dataclasses.replace(space, formats=target.formats)
    overrides = dict(formats=args.formats, bits=args.bits_options, group_sizes=args.group_sizes, methods=args.methods)
    space = dataclasses.replace(space, **{k: v for k, v in overrides.items() if v},
                                symmetric=args.sym or space.symmetric, keep_16bit=space.keep_16bit and not args.no_keep)
    space.options()  # validates bits, group sizes and methods before any long work
    device = _device(args)
    return ProfileSettings(space=space, method_settings=_method_settings(args), fisher_windows=args.fisher_windows,
                           measure=tuple(args.measure), measure_every=args.measure_every, target=args.target,
                           tie=target.tie if target is not None and target.tie != "none" else args.tie,
                           row_fraction=args.row_fraction, reconstruct=_reconstruct_settings(args),
                           capture_dtype=_passes_dtype(args, device), device=str(device))


def _calibration(args: argparse.Namespace):
    from mixq.data import WindowSpec

    return WindowSpec(args.calib_windows, args.calib_len, args.calib_text, args.seed)


def _held_out(args: argparse.Namespace):
    """The profile's held-out windows: from --held-out-text at random offsets, else sampled, each with
    its own seed (not the calibration's)."""
    from mixq.data import WindowSpec

    return WindowSpec(args.held_out_windows, args.held_out_len, args.held_out_text, HELD_OUT_SEED)


def _resolve_window_lengths(args: argparse.Namespace, loaded) -> None:
    """Window lengths left unset become 512 tokens, or the model's context if shorter."""
    context = getattr(loaded.config.get_text_config(), "max_position_embeddings", None) or DEFAULT_SEQ_LEN
    for flag in ("calib_len", "held_out_len", "eval_len", "seq_len"):
        if hasattr(args, flag) and getattr(args, flag) is None:
            setattr(args, flag, min(DEFAULT_SEQ_LEN, context))


def _check_windows(args: argparse.Namespace, loaded, profiled: bool) -> None:
    """Every window setting of this job against the model's limits, before any long work."""
    from mixq.data import WindowSpec, check_windows

    _resolve_window_lengths(args, loaded)
    check_windows(loaded, _calibration(args), "--calib-windows/--calib-len")
    if profiled:
        check_windows(loaded, _held_out(args), "--held-out-windows/--held-out-len")
    if getattr(args, "eval_text", None):
        check_windows(loaded, WindowSpec(args.eval_windows, args.eval_len), "--eval-windows/--eval-len")


def _checkpoints(args: argparse.Namespace, loaded):
    """The work directory of this job's output: resumed if it holds a run of the same inputs."""
    import torch

    from mixq.checkpoint import Checkpoints, file_identity, work_dir
    from mixq.models import model_path

    files = model_path(loaded.spec)
    inputs = {
        "mixq_version": __version__, "command": args.command, "threads": torch.get_num_threads(),
        "settings": {k: v for k, v in vars(args).items() if k not in JOB_FLAGS_OF_NO_CONSEQUENCE},
        "model_files": file_identity(files) if files else loaded.spec,
        **{f"{flag}_file": file_identity(getattr(args, flag)) for flag in ("calib_text", "held_out_text", "profile")
           if getattr(args, flag, None)},
    }
    checkpoints = Checkpoints(work_dir(args.out), inputs, restart=args.restart)
    if checkpoints.resumed:
        print(f"mixq: resuming from {checkpoints.directory} (--restart discards it)", file=sys.stderr)
        for stale in Path(args.out).parent.glob(f".{Path(args.out).name}.*.partial"):  # a killed run's scratch
            shutil.rmtree(stale, ignore_errors=True)
    return checkpoints


def _run_profile(loaded, args: argparse.Namespace, settings, checkpoints):
    """The job's profile: measured (resuming its phases from `checkpoints`), or the one an interrupted
    run finished there."""
    from mixq.data import load_windows
    from mixq.profile import CHECKPOINTS, Profile, build_profile

    saved = checkpoints.path(PROFILE_FILE)
    if saved.is_file():
        return Profile.load(saved)
    calib = load_windows(loaded, _calibration(args), first=False, device=settings.device)
    held_out_spec = _held_out(args)
    held_out = load_windows(loaded, held_out_spec, first=False, device=settings.device)
    profile = build_profile(loaded, calib, held_out, settings, checkpoints)
    profile.info["held_out"] = held_out_spec.describe()
    checkpoints.ensure()
    profile.save(saved)
    checkpoints.remove(CHECKPOINTS)  # the profile holds all they held
    return profile


def cmd_profile(args: argparse.Namespace) -> None:
    from mixq.atomic import check_output_dir
    from mixq.models import load_model

    settings = _profile_settings(args)
    check_output_dir(args.out, overwrite=True)
    loaded = load_model(args.model, in_memory=args.in_memory)
    _check_windows(args, loaded, profiled=True)
    checkpoints = _checkpoints(args, loaded)
    profile = _run_profile(loaded, args, settings, checkpoints)
    profile.save(args.out)
    checkpoints.discard()
    s = profile.info["seconds"]
    print(f"wrote {args.out}: {len(profile.tensors)} tensors x {len(profile.options)} options, "
          f"{int(sum(1 for v in profile.measured.flat if v == v))} measured points, {s['total']:.0f} s "
          f"(capture {s['capture']:.0f}, Fisher {s['fisher']:.0f}, quantize {s['quantize']:.0f}, "
          f"measure {s['measure']:.0f})")


def cmd_bench_device(args: argparse.Namespace) -> None:
    from mixq.export import get_target
    from mixq.latency import LatencyTable, Machine, fit_engine, measure, show_seconds

    if args.model is not None and args.profile is not None:
        raise MixqError("give a model or --profile, not both")
    if args.threads < 1 or args.repeats < 1 or args.prefill_tokens < 0:
        raise MixqError("--threads and --repeats must be at least 1, --prefill-tokens at least 0")
    kernels = get_target(args.target).kernels
    start = time.perf_counter()
    if args.model is None and args.profile is None:
        if not args.fit:
            raise MixqError("give a model or --profile (the shapes and options to time), or --fit FILE ... to fit "
                            "the engine on exported files")
        if args.out.exists() and not args.overwrite:
            table = LatencyTable.load(args.out)  # the table at --out gains the engine's fit
            table.check_machine(kernels)
        else:  # a table of the files' own products only, streaming through the largest file
            table = LatencyTable(args.target, Machine.here(args.threads, kernels.engine()), {},
                                 max(_stored_bytes(Path(f)) for f in args.fit))
    else:
        if args.out.exists() and not args.overwrite:
            raise MixqError(f"output {args.out} already exists (pass --overwrite to replace it)")
        cases, stream_bytes = _cases_to_time(args, kernels)
        table = measure(cases, kernels, args.threads, args.repeats, args.target, stream_bytes)
        worst = max(table.seconds, key=table.spread)
        print(f"{len(table.seconds)} cases ({len({c[1:3] for c in table.seconds})} shapes) timed {args.repeats} "
              f"times with {table.machine.engine} on {table.machine.cpu}, {args.threads} threads, streaming "
              f"{table.stream_bytes / 1e6:,.0f} MB of weights; largest spread {table.spread(worst):.0%} "
              f"({' '.join(map(str, worst))})")
    if args.fit:
        table.fit = fit_engine(table, args.fit, kernels, args.repeats)
        fit = table.fit
        print(f"engine fit: measured = {fit.scale:.3f} x products + {fit.overhead * 1e3:.3f} ms per token")
        for name, products, measured in fit.points:
            print(f"  {name}: products {show_seconds(products)}, fitted {show_seconds(fit.predict(products))}, "
                  f"measured {show_seconds(measured)} (fitted is {fit.predict(products) / measured - 1:+.1%})")
    table.save(args.out)
    print(f"wrote {args.out} in {time.perf_counter() - start:.0f} s")


def _stored_bytes(path: Path) -> int:
    """Bytes of an exported model: a file, or a directory's files."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def _cases_to_time(args: argparse.Namespace, kernels) -> tuple[set, int]:
    """Every product a plan can run (of the profile's options, or of the model in the target's default
    ones), and the model's bytes at a typical plan, which each product streams through."""
    from mixq.export import get_target
    from mixq.latency import matmul_cases, model_bytes, profile_allowed, profile_cases

    tokens = [1] + ([args.prefill_tokens] if args.prefill_tokens > 1 else [])
    if args.profile:
        from mixq.profile import Profile

        profile = Profile.load(args.profile)
        return ({c for n in tokens for c in profile_cases(profile, kernels, n)},
                model_bytes(profile.nbytes, profile_allowed(profile)))
    from mixq.models import load_model
    from mixq.options import OptionSpace
    from mixq.profile import OptionTable

    loaded = load_model(args.model)
    table = OptionTable.build(loaded, OptionSpace(formats=get_target(args.target).formats), args.target)
    plannable = loaded.plannable()
    kinds = [plannable[t].kind for t in table.tensors]
    shapes = [tuple(plannable[t].shape) for t in table.tensors]
    names = [o.name for o in table.options]
    return ({c for n in tokens for _, _, c in matmul_cases(table.tensors, kinds, shapes, names, table.allowed,
                                                            kernels, n) if c is not None},
            model_bytes(table.nbytes, table.allowed))


def _latency_setting(args: argparse.Namespace, along_latency: bool = False):
    """(bound in seconds, latency table, the target's kernels) of --max-latency/--latency, checked
    before any long work (bound inf: a table only, for a frontier along latency); None without them."""
    from mixq.latency import parse_latency

    if args.max_latency is None and not along_latency:
        if args.latency is not None:
            raise MixqError("--latency is the table for --max-latency (or a frontier along --axis latency)")
        return None
    if args.latency is None:
        raise MixqError(f"{'--max-latency' if args.max_latency else '--axis latency'} needs --latency TABLE, the "
                        "times measured here by `mixq bench-device`")
    bound = math.inf if args.max_latency is None else parse_latency(args.max_latency)
    return bound, *_latency_table(args.latency)


def _latency_table(path: Path):
    """A latency table measured on this machine, and its target's kernels."""
    from mixq.export import get_target
    from mixq.latency import LatencyTable

    table = LatencyTable.load(path)
    kernels = get_target(table.target).kernels
    table.check_machine(kernels)
    return table, kernels


def _latency_limits(setting, profile) -> list:
    from mixq.latency import decode_limit

    if setting is None or math.isinf(setting[0]):
        return []
    return [decode_limit(profile, setting[1], setting[2], setting[0])]


def _limited(plan) -> str:
    from mixq.latency import show_seconds

    return "".join(f", {name} {show_seconds(v)}" for name, v in plan.limited.items())


def cmd_plan(args: argparse.Namespace) -> None:
    from mixq.plan import Budget, closed_form_plan, frontier_plans, plan_for_budget, plan_for_loss
    from mixq.profile import Profile
    from mixq.report import markdown_table, plan_summary, plot_frontier

    if args.device_budget:
        return _plan_for_devices(args)
    if not (args.budget or args.frontier or args.max_loss is not None):
        raise MixqError("give --budget, --max-loss, --frontier or --device-budget")
    if args.budget and args.max_loss is not None:
        raise MixqError("give either --budget or --max-loss, not both")
    profile = Profile.load(args.profile)
    setting = _latency_setting(args, along_latency=args.axis == "latency")
    limits = _latency_limits(setting, profile)
    if args.axis != "bytes" and not args.frontier:
        raise MixqError("--axis is the cost along which --frontier is traced")
    if limits and not (args.budget or args.max_loss is not None):
        raise MixqError("--max-latency limits a plan for --budget or --max-loss")
    if args.frontier:
        from mixq.latency import decode_limit

        axis = None if args.axis == "bytes" else decode_limit(profile, setting[1], setting[2], math.inf)
        start = time.perf_counter()
        plans = frontier_plans(profile, args.estimator, axis)
        seconds = time.perf_counter() - start
        step = max(1, len(plans) // 24)
        shown = plans[::step] + plans[-1:]
        headers = ["bpw", "bytes (at most)", f"predicted loss ({args.estimator})"]
        rows = [[p.bpw, p.max_file_bytes, p.predicted_loss] for p in shown]
        if axis is not None:
            headers.insert(0, axis.name)
            rows = [[axis.show(p.limited[axis.name]), *row] for p, row in zip(shown, rows)]
        print(markdown_table(headers, rows))
        plot = args.plot or args.profile.with_name(args.profile.name + ".frontier.png")
        plot_frontier(plans, plot, f"{profile.model}: {args.estimator}", axis)
        span = (f"{plans[0].bpw:.3f} to {plans[-1].bpw:.3f} bpw" if axis is None else
                f"{axis.show(plans[0].limited[axis.name])} to {axis.show(plans[-1].limited[axis.name])}")
        print(f"{len(plans)} frontier plans from {span} in {seconds:.3f} s; plot: {plot}")
    if args.budget:
        budget = Budget.parse(args.budget)
        start = time.perf_counter()
        plan = plan_for_budget(profile, budget, args.estimator, limits)
        seconds = time.perf_counter() - start
        baq, continuous = closed_form_plan(profile, budget, args.estimator)
        print(plan_summary(plan))
        print(f"\nsolved in {seconds:.2f} s: {plan.bpw:.4f} bpw, at most {plan.max_file_bytes:,} bytes "
              f"(budget {budget.total_bytes(profile.n_weights):,}), predicted loss {plan.predicted_loss:.5g}"
              f"{_limited(plan)}; "
              f"closed form (BAQ): continuous {continuous:.5g}, rounded plan {baq.predicted_loss:.5g} "
              f"at {baq.bpw:.4f} bpw")
    if args.max_loss is not None:
        start = time.perf_counter()
        plan = plan_for_loss(profile, args.max_loss, args.estimator, limits)
        print(plan_summary(plan))
        print(f"\nsolved in {time.perf_counter() - start:.2f} s: the smallest plan with predicted loss <= "
              f"{args.max_loss:g} ({args.estimator}): {plan.bpw:.4f} bpw, at most {plan.max_file_bytes:,} bytes, "
              f"predicted loss {plan.predicted_loss:.5g}{_limited(plan)}")
    if args.out and (args.budget or args.max_loss is not None):
        atomic_write_text(args.out, json.dumps(plan.as_dict(), indent=2) + "\n")


def _plan_for_devices(args: argparse.Namespace) -> None:
    """`mixq plan --device-budget`: types and placement solved together, printed per device."""
    from mixq.profile import Profile

    if args.max_loss is not None or args.frontier:
        raise MixqError("--device-budget plans for memory per device (with --budget and --max-latency if given): "
                        "--max-loss and --frontier do not combine with it")
    start = time.perf_counter()
    plan, placement = _device_plan(args, Profile.load(args.profile))
    seconds = time.perf_counter() - start
    print(f"\nsolved in {seconds:.2f} s: {plan.bpw:.4f} bpw, at most {plan.max_file_bytes:,} bytes, predicted loss "
          f"{plan.predicted_loss:.5g}{_limited(plan)}; llama.cpp: {placement.llama_cpp_flags()} -c {args.context} "
          "(its compute buffers come on top of what is held here)")
    if args.out:
        atomic_write_text(args.out, json.dumps(dict(plan.as_dict(), placement=placement.as_dict()), indent=2) + "\n")


def _device_budget(args: argparse.Namespace):
    """--device-budget with --context and --offload, checked."""
    from mixq.placement import DeviceBudget

    if args.context < 0:
        raise MixqError(f"--context must be 0 or more tokens, got {args.context}")
    if args.offload != "auto" and not args.offload.isdigit():
        raise MixqError(f"--offload is auto or a number of blocks (llama.cpp's -ngl), got {args.offload!r}")
    return DeviceBudget.parse(args.device_budget)


def _device_plan(args: argparse.Namespace, profile):
    """(plan, placement) for --device-budget (with --budget, --offload, --context, --max-latency), and
    what each device holds, printed."""
    from mixq.placement import plan_for_devices, show_bytes
    from mixq.plan import Budget
    from mixq.report import markdown_table, plan_summary

    devices = _device_budget(args)
    plan, placement = plan_for_devices(profile, devices, args.estimator, args.context,
                                       Budget.parse(args.budget) if args.budget else None,
                                       None if args.offload == "auto" else int(args.offload),
                                       _device_time_limits(args, devices, profile))
    print(plan_summary(plan))
    rows = []
    for name, d in placement.as_dict()["devices"].items():
        used = d["weights"] + d["kv_cache"] + placement.fixed
        blocks = f"{d['blocks'][0]}-{d['blocks'][1]}" if d["blocks"] else "-"
        rows.append([name, blocks, "yes" if d["output"] else "no", show_bytes(d["weights"]), show_bytes(d["kv_cache"]),
                     show_bytes(used) + ("" if d["capacity"] is None else f" of {show_bytes(d['capacity'])}")])
    print()
    print(markdown_table(["device", "blocks", "output", "weights", f"KV cache ({args.context} tokens)", "held"], rows))
    return plan, placement


def _device_time_limits(args: argparse.Namespace, devices, profile) -> list:
    """One decode-time limit per device for --max-latency with --device-budget: each device that holds
    blocks needs its own latency table (--latency gpu0=gpu.latency,cpu=cpu.latency; a single table
    serves a single such device)."""
    import numpy as np

    from mixq.latency import decode_limit, parse_latency, show_seconds
    from mixq.plan import Limit

    if args.max_latency is None:
        if args.latency is not None:
            raise MixqError("--latency is the table for --max-latency")
        return []
    if args.latency is None:
        raise MixqError("--max-latency needs --latency, the times measured by `mixq bench-device` on each device")
    bound = parse_latency(args.max_latency)
    holding = [d.name for d in devices.devices if d.holds_blocks]
    text = str(args.latency)
    if "=" in text:
        paths = dict(part.split("=", 1) for part in text.split(","))
    elif len(holding) == 1:
        paths = {holding[0]: text}
    else:
        raise MixqError(f"--max-latency over several devices needs a latency table for each of {', '.join(holding)}: "
                        f"--latency {','.join(f'{d}={d}.latency' for d in holding)}")
    unknown = sorted(set(paths) - {d.name for d in devices.devices})
    if unknown or set(holding) - set(paths):
        raise MixqError(f"--latency names {unknown[0]}, which --device-budget does not" if unknown else
                        f"--latency has no table for {sorted(set(holding) - set(paths))[0]}")
    limits = []
    for d in devices.devices:
        if d.name in paths:
            limits.append(decode_limit(profile, *_latency_table(Path(paths[d.name])), bound))
        else:  # a host the user did not name only looks up the token embedding
            limits.append(Limit("decode time per token", np.zeros(profile.nbytes.shape), bound, show_seconds))
    return limits


def cmd_quantize(args: argparse.Namespace) -> None:
    import torch

    from mixq.atomic import atomic_dir, check_output_dir
    from mixq.data import WindowSpec, load_windows
    from mixq.export import TARGETS, native
    from mixq.formats import parse_format
    from mixq.formats.integer import IntFormat
    from mixq.methods import get_method
    from mixq.models import load_model
    from mixq.options import Option
    from mixq.plan import Budget, plan_for_budget, plan_for_loss
    from mixq.profile import Profile
    from mixq.quantize import quantize_model, uniform_plan

    check_output_dir(args.out, args.overwrite)
    device = _device(args)
    settings = _method_settings(args)
    reconstruct = _reconstruct_settings(args)
    info: dict = {"mixq_version": __version__}
    planned = args.budget or args.max_kl is not None or args.device_budget
    if args.budget and args.max_kl is not None:
        raise MixqError("give either --budget or --max-kl, not both")
    if args.device_budget:
        if args.max_kl is not None:
            raise MixqError("--device-budget plans for memory per device (and --budget): not with --max-kl")
        _device_budget(args)  # checked before minutes of profiling
    if args.max_kl is not None and not args.max_kl > 0:
        raise MixqError(f"--max-kl must be positive, got {args.max_kl}")
    if (args.max_latency or args.latency) and not planned:
        raise MixqError("--max-latency limits a plan: give --budget, --max-kl or --device-budget")
    latency = None if args.device_budget else _latency_setting(args)
    if planned:
        budget = Budget.parse(args.budget) if args.budget else None
        profile_settings = None if args.profile else _profile_settings(args)
        profile = Profile.load(args.profile) if args.profile else None
        loaded = load_model(args.model, in_memory=args.in_memory)
        if profile is not None:
            profile.check_model(loaded)
        _check_windows(args, loaded, profiled=profile is None)
        checkpoints = _checkpoints(args, loaded)
        if profile is None:
            if budget is not None:
                _check_feasible(loaded, budget, profile_settings)  # before minutes of profiling
            profile = _run_profile(loaded, args, profile_settings, checkpoints)
        limits = _latency_limits(latency, profile)
        if args.device_budget:
            plan, placement = _device_plan(args, profile)
            info["placement"] = placement.as_dict()
            description = (f"plan for {args.device_budget} ({args.estimator}){_limited(plan)}; llama.cpp: "
                           f"{placement.llama_cpp_flags()} -c {args.context}")
        elif budget is not None:
            plan = plan_for_budget(profile, budget, args.estimator, limits)
            description = f"plan for {budget} ({args.estimator}){_limited(plan)}"
        else:
            plan = plan_for_loss(profile, args.max_kl, args.estimator, limits)
            description = f"smallest plan with predicted loss <= {args.max_kl:g} ({args.estimator}){_limited(plan)}"
        options = {t: Option.parse(o) for t, o in plan.options.items()}
        info.update(budget=str(budget) if budget else None, max_kl=args.max_kl,
                    plan_summary=plan.as_dict() | {"options": None},
                    profile_seconds=profile.info["seconds"]["total"] if not args.profile else 0.0)
    else:
        # validates the format (bits, group size) before loading anything
        fmt = parse_format(args.format) if args.format else IntFormat(args.bits, args.group_size, symmetric=args.sym)
        get_method(args.method)
        loaded = load_model(args.model, in_memory=args.in_memory)
        _check_windows(args, loaded, profiled=False)
        checkpoints = _checkpoints(args, loaded)
        options = uniform_plan(loaded, Option(fmt.name, args.method), args.target)
        info.update(settings={"format": fmt.name, "method": args.method})
        description = f"{fmt.name} {args.method}"

    calib = _calibration(args)
    windows = load_windows(loaded, calib, first=False, device=device)
    passes = _passes_dtype(args, device)
    with atomic_dir(args.out, overwrite=args.overwrite) as tmp:
        start = time.perf_counter()
        # Finished blocks' tensors wait in the work directory, not in memory, with the last block's state.
        result = quantize_model(loaded, windows, options, settings, reconstruct=reconstruct, checkpoints=checkpoints,
                                matmul_dtype=passes, device=device)
        seconds = time.perf_counter() - start
        info.update(
            model=loaded.spec, method_settings=vars(settings), reconstruct_settings=vars(reconstruct),
            passes="bfloat16 matmuls" if passes == torch.bfloat16 else "float32",
            block_losses=result.block_losses, calibration=calib.describe(), quantize_seconds=seconds,
            threads=torch.get_num_threads(), device=str(device), rare_experts=result.rare_experts,
            plan={name: opt.name for name, opt in result.options.items()}, output_errors=result.output_errors,
            evaluations={},
        )
        formats = {n: (result.tensors.format(n).name, result.tensors.shape(n)) for n in result.tensors}
        info["exportable_to"] = [t.name for t in TARGETS.values() if t.accepts(loaded, formats)]
        storage = native.save(tmp, loaded, result, info)
        del result
        if planned and not args.profile:
            profile.save(tmp / PROFILE_FILE)  # reusable: mixq plan DIR/mixq.profile, --profile
        exported = profile.info.get("container", "safetensors") if planned else "safetensors"
        if args.budget and exported == "safetensors" and storage.file_bytes > budget.total_bytes(storage.n_weights):
            raise MixqError(f"internal error: {storage.file_bytes:,} bytes exceed the budget {budget}")
        if args.eval_text:
            # Evaluate exactly what was written, so `mixq eval` reproduces these numbers.
            spec = WindowSpec(args.eval_windows, args.eval_len, args.eval_text)
            report = _evaluate(loaded, native.NativeSource(tmp), spec, device)
            info = native.read_info(tmp)
            info["evaluations"][spec.describe()] = report
            native.write_info(tmp, info)
            _print_quality(args.out, storage.bpw, seconds, report, info.get("plan_summary"))
    checkpoints.discard()
    print(f"wrote {args.out}: {description}, {storage.file_bytes:,} bytes, "
          f"{storage.bpw:.3f} bits per weight (whole file), quantized in {seconds:.0f} s")
    if exported != "safetensors":
        what = "its GGUF" if exported == "gguf" else f"the model.safetensors of its {exported} export"
        print(f"{what} (mixq export {args.out} --to {exported} OUT) will be at most {plan.max_file_bytes:,} bytes")


def _check_feasible(loaded, budget, settings) -> None:
    from mixq.plan import budget_infeasible
    from mixq.profile import smallest_file

    n_weights = loaded.n_weights
    smallest = smallest_file(loaded, settings.space, settings.target)
    if smallest > budget.total_bytes(n_weights):
        raise budget_infeasible(budget, smallest, n_weights)


def cmd_eval(args: argparse.Namespace) -> None:
    from mixq.data import WindowSpec, check_windows
    from mixq.export import native
    from mixq.models import load_model

    device = _device(args)
    info = native.read_info(args.dir)
    quantized = native.NativeSource(args.dir)
    loaded = load_model(info["model"], in_memory=args.in_memory)
    _resolve_window_lengths(args, loaded)
    spec = WindowSpec(args.windows, args.seq_len, args.text, seed=EVAL_SEED)
    check_windows(loaded, spec, "--windows/--seq-len")
    report = _evaluate(loaded, quantized, spec, device)
    info["evaluations"][spec.describe()] = report
    native.write_info(args.dir, info)
    _print_quality(args.dir, info["storage"]["bpw"], info["quantize_seconds"], report, info.get("plan_summary"))


def _evaluate(loaded, quantized, spec, device) -> dict:
    """Evaluate the weights of `quantized` against the model's own on `device`; sampled windows come
    from the model."""
    from mixq.data import load_windows
    from mixq.evaluate import evaluate

    windows = load_windows(loaded, spec, first=True, device=device)
    return evaluate(loaded, windows, quantized, device=device).as_dict()


def _print_quality(path: Path, bpw: float, quantize_seconds: float, report: dict, plan: dict | None) -> None:
    from mixq.report import QUALITY_HEADERS, markdown_table, quality_row

    print(f"\n{path}: {report['n_windows']} windows x {report['seq_len']} tokens")
    headers, row = [*QUALITY_HEADERS, "quantize s"], [*quality_row(bpw, report), quantize_seconds]
    if plan is not None:  # the error model's prediction next to the measurement
        headers.insert(2, "predicted loss")
        row.insert(2, plan["predicted_loss"])
    print(markdown_table(headers, [row]))


def _silence_progress_bars() -> None:
    """Every tqdm bar off, mixq's and its libraries' (tqdm reads TQDM_DISABLE only when imported,
    which torch's import has done already)."""
    from functools import partialmethod

    from tqdm import std

    std.tqdm.__init__ = partialmethod(std.tqdm.__init__, disable=True)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.quiet:
            _silence_progress_bars()
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="mixq: %(message)s")
        args.run(args)
    except MixqError as e:
        print(f"mixq: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a lost file system: what failed, without a traceback
        where = f": {e.filename}" if e.filename else ""
        print(f"mixq: error: {e.strerror or e}{where} (an interrupted quantize or profile resumes when rerun)",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mixq: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
