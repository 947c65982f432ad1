"""The `mixq` command. Every subcommand has --help; bad input ends in one line and exit code 2."""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import time
from pathlib import Path

from mixq import __version__
from mixq.errors import MixqError

log = logging.getLogger("mixq")

DEFAULT_CALIB = dict(windows=64, seq_len=512)
DEFAULT_EVAL = dict(windows=40, seq_len=512)
EVAL_SEED = 1  # sampled evaluation text must not be the calibration text (seed 0)


def _group_size(value: str) -> int:
    if value in ("channel", "ch", "0"):
        return 0
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'channel', got {value!r}") from None


def _text_file(value: str) -> Path:
    """A text file checked before any long work starts."""
    from mixq.data import read_text

    read_text(Path(value))
    return Path(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mixq", description="Fit a neural network to a budget with the least loss of quality."
    )
    parser.add_argument("--version", action="version", version=f"mixq {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more detail")
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a model and save it", description="Quantize every linear "
                       "layer of the transformer blocks with one format and method, block by block.")
    q.add_argument("model", help="smollm2-135m, a .gguf file, a Hugging Face model directory, or hf:owner/name")
    q.add_argument("--out", type=Path, required=True, help="output directory (written atomically)")
    q.add_argument("--bits", type=int, default=4, help="bits per weight code, 2-8 (default 4)")
    q.add_argument("--group-size", type=_group_size, default=128,
                   help="input weights per scale: 16-1024 (power of two) or 'channel' (default 128)")
    q.add_argument("--sym", action="store_true", help="symmetric grid (no zero points stored)")
    q.add_argument("--method", default="gptq", help="rtn or gptq (default gptq)")
    q.add_argument("--no-act-order", action="store_true", help="GPTQ: visit columns in storage order")
    q.add_argument("--damp", type=float, default=0.01, help="GPTQ: dampening, fraction of mean diag(H)")
    q.add_argument("--no-clip-search", action="store_true", help="use each group's full range")
    q.add_argument("--calib-text", type=_text_file, help="calibration text file (default: text sampled "
                   "from the model itself)")
    q.add_argument("--calib-windows", type=int, default=DEFAULT_CALIB["windows"], help="calibration windows (default 64)")
    q.add_argument("--calib-len", type=int, default=DEFAULT_CALIB["seq_len"], help="tokens per window (default 512)")
    q.add_argument("--seed", type=int, default=0, help="seed of calibration sampling (default 0)")
    q.add_argument("--eval-text", type=_text_file, help="evaluate on this text right after quantizing")
    q.add_argument("--eval-windows", type=int, default=DEFAULT_EVAL["windows"])
    q.add_argument("--eval-len", type=int, default=DEFAULT_EVAL["seq_len"])
    q.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    q.set_defaults(run=cmd_quantize)

    e = sub.add_parser("eval", help="measure a quantized model against its reference",
                       description="Reload a `mixq quantize` output and measure perplexity, KL divergence to "
                       "the unquantized model and top-1 agreement on the same windows.")
    e.add_argument("dir", type=Path, help="output directory of `mixq quantize`")
    e.add_argument("--text", type=_text_file, help="evaluation text (default: held-out text sampled from "
                   f"the model, seed {EVAL_SEED})")
    e.add_argument("--windows", type=int, default=DEFAULT_EVAL["windows"], help="non-overlapping windows (default 40)")
    e.add_argument("--seq-len", type=int, default=DEFAULT_EVAL["seq_len"], help="tokens per window (default 512)")
    e.set_defaults(run=cmd_eval)
    return parser


def cmd_quantize(args: argparse.Namespace) -> None:
    from mixq.atomic import atomic_dir, check_output_dir
    from mixq.data import WindowSpec, load_windows
    from mixq.export import native
    from mixq.formats.integer import IntFormat
    from mixq.methods import MethodSettings, get_method
    from mixq.models import load_model
    from mixq.quantize import Option, quantize_model, uniform_plan

    fmt = IntFormat(args.bits, args.group_size, symmetric=args.sym)  # validates bits and group size
    get_method(args.method)
    check_output_dir(args.out, args.overwrite)
    settings = MethodSettings(
        clip_search=not args.no_clip_search, damp=args.damp, act_order=not args.no_act_order
    )
    calib = WindowSpec(args.calib_windows, args.calib_len, args.calib_text, args.seed)

    loaded = load_model(args.model)
    windows = load_windows(loaded, calib, first=False)
    reference = copy.deepcopy(loaded.model) if args.eval_text else None
    start = time.perf_counter()
    result = quantize_model(loaded, windows, uniform_plan(loaded, Option(fmt.name, args.method)), settings)
    seconds = time.perf_counter() - start
    info = {
        "mixq_version": __version__,
        "model": loaded.spec,
        "settings": {"format": fmt.name, "method": args.method, **vars(settings)},
        "calibration": calib.describe(),
        "quantize_seconds": seconds,
        "plan": {name: opt.name for name, opt in result.options.items()},
        "output_errors": result.output_errors,
        "evaluations": {},
    }
    with atomic_dir(args.out, overwrite=args.overwrite) as tmp:
        storage = native.save(tmp, loaded, result.tensors, info)
        if reference is not None:
            # Evaluate exactly what was written, so `mixq eval` reproduces these numbers.
            native.apply_weights(loaded, native.load_weights(tmp))
            spec = WindowSpec(args.eval_windows, args.eval_len, args.eval_text)
            report = _evaluate(loaded, reference, spec)
            info = native.read_info(tmp)
            info["evaluations"][spec.describe()] = report
            native.write_info(tmp, info)
            _print_quality(args.out, storage.bpw, seconds, report)
    print(f"wrote {args.out}: {fmt.name} {args.method}, {storage.file_bytes:,} bytes, "
          f"{storage.bpw:.3f} bits per weight (whole file), quantized in {seconds:.0f} s")


def cmd_eval(args: argparse.Namespace) -> None:
    from mixq.data import WindowSpec
    from mixq.export import native
    from mixq.models import load_model

    info = native.read_info(args.dir)
    weights = native.load_weights(args.dir)
    loaded = load_model(info["model"])
    reference = copy.deepcopy(loaded.model)
    native.apply_weights(loaded, weights)
    spec = WindowSpec(args.windows, args.seq_len, args.text, seed=EVAL_SEED)
    report = _evaluate(loaded, reference, spec)
    info["evaluations"][spec.describe()] = report
    native.write_info(args.dir, info)
    _print_quality(args.dir, info["storage"]["bpw"], info["quantize_seconds"], report)


def _evaluate(loaded, reference, spec) -> dict:
    """Evaluate `loaded.model` against `reference`; sampled windows come from the reference."""
    from mixq.data import load_windows
    from mixq.evaluate import evaluate
    from mixq.models import LoadedModel

    source = LoadedModel(loaded.spec, reference, loaded.tokenizer, loaded.arch)
    windows = load_windows(source, spec, first=True)
    return evaluate(loaded.model, windows, reference=reference).as_dict()


def _print_quality(path: Path, bpw: float, quantize_seconds: float, report: dict) -> None:
    from mixq.report import QUALITY_HEADERS, markdown_table, quality_row

    print(f"\n{path}: {report['n_windows']} windows x {report['seq_len']} tokens")
    print(markdown_table((*QUALITY_HEADERS, "quantize s"), [[*quality_row(bpw, report), quantize_seconds]]))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="mixq: %(message)s")
        args.run(args)
    except MixqError as e:
        print(f"mixq: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mixq: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
