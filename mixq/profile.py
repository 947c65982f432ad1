"""Profile: for every plannable tensor and every option, its exact bytes and its predicted error.

Raw estimators, per (tensor, option), from one quantization of the tensor with that option:
- `hessian`: tr(dW H dW^T), H = sum x^T x of the tensor's input on the calibration windows;
- `fisher`: sum F * dW^2, F the squared gradients of the calibration loss (empirical Fisher
  diagonal) accumulated over a few backward passes.
Measured points: the KL divergence to the reference on held-out windows when only that tensor is
quantized with that option, for a few options per tensor (`measure`). `calibrate` fits the error
model that turns raw errors into predicted KL, and `predicted(estimator)` gives the table a plan
minimises: `hessian` and `fisher` raw, `hessian+kl` and `fisher+kl` calibrated (the default).
For a target whose engine rounds the inputs of its products (llama.cpp: `Target.input_block`), the
`inputs` table holds that rounding's output error per option (sum_j error_j * ||W[:, j]||^2, in the
hessian's units), and the calibrated estimators add its predicted KL to each option's.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file
from tqdm.auto import tqdm

from mixq import capture
from mixq.atomic import save_tensors
from mixq.checkpoint import Checkpoints
from mixq.errors import MixqError
from mixq.export import get_target
from mixq.export.native import header_bound, kept_nbytes
from mixq.formats import QTensor, parse_format
from mixq.formats.integer import IntFormat
from mixq.memory import available_bytes
from mixq.methods import BLOCK_METHODS, MethodSettings, get_method, output_error, quantize_many
from mixq.methods.gptq import one_factorisation_per_h
from mixq.models import LoadedModel, source_gguf
from mixq.options import KEEP_OPTION, Option, OptionSpace
from mixq.reconstruct import ReconstructSettings, mse, reconstruct_block
from mixq.runner import BlockRunner, fast_matmul_dtype

LEARNED = ("adaquant", *sorted(BLOCK_METHODS))  # measured on a few blocks, predicted for the rest

log = logging.getLogger(__name__)
ESTIMATORS = ("hessian+kl", "fisher+kl", "hessian", "fisher")
INPUTS = "inputs"  # the errors table of the engine's input rounding (no estimator of its own)
PROFILE_VERSION = "3"  # 2: weight fingerprints; 3: each tensor's block
FINGERPRINT_LEN = 64  # weights of each tensor's first row that identify the model a profile measured
FINGERPRINT_RTOL = 2.0**-7  # storage precision may differ (bf16 keeps 8 bits): anything beyond is another model


@dataclass
class Profile:
    model: str
    tensors: list[str]
    kinds: list[str]  # the tensor's role, shared across blocks: "self_attn.q_proj", "head", ...
    blocks: list[int]  # the block each tensor is in; -1 outside the blocks (embedding, head)
    shapes: list[tuple[int, int]]
    options: list[str]
    nbytes: np.ndarray  # (T, O) exact bytes of each tensor in each option
    errors: dict[str, np.ndarray]  # raw estimator -> (T, O); inf where the option is not allowed
    measured: np.ndarray  # (T, O) KL when only this tensor is quantized; NaN where not measured
    fixed_bytes: int  # every parameter no plan decides on (norms), at its storage width
    header_bytes: int  # upper bound of the saved file's header, whatever the plan
    n_weights: int
    tie_groups: list[list[int]]
    info: dict[str, Any] = field(default_factory=dict)
    importance: dict[str, np.ndarray] = field(default_factory=dict)  # diag(H) per tensor: RTN needs no more
    fingerprint: np.ndarray = field(default_factory=lambda: np.zeros((0, FINGERPRINT_LEN), np.float32))  # (T, .)

    def predicted(self, estimator: str, engine_inputs: bool = True) -> np.ndarray:
        """(T, O) predicted loss of each option of each tensor under `estimator`. The calibrated ones
        add the KL of the engine's rounding of each option's inputs (`inputs`), priced as output
        error by the hessian's calibration: the two errors are independent, so their KLs add.
        `engine_inputs=False`: the weights' part alone (what `measure_kl` measures)."""
        if estimator not in ESTIMATORS:
            raise MixqError(f"unknown estimator {estimator!r}; known: {', '.join(ESTIMATORS)}")
        raw = self.errors.get(estimator.split("+")[0])
        if raw is None or not np.isfinite(raw).any():
            raise MixqError(f"this profile has no {estimator.split('+')[0]} errors (profiled with --fisher-windows 0?)")
        if not estimator.endswith("+kl"):
            return raw
        predicted = calibrate(raw, self.measured, self.kinds, self.blocks)
        if engine_inputs and INPUTS in self.errors:
            predicted = predicted + calibrate(self.errors["hessian"], self.measured, self.kinds, self.blocks,
                                              evaluated_at=self.errors[INPUTS])
        return predicted

    def check_model(self, loaded: LoadedModel) -> None:
        """Refuse a model other than the one this profile measured: its tensors, their shapes and
        the first weights of each must match (up to a storage precision of bf16 or better)."""
        mine = loaded.plannable()
        missing = [n for n in self.tensors if n not in mine]
        if missing or len(mine) != len(self.tensors):
            what = f"has no tensor {missing[0]}" if missing else f"has {len(mine)} tensors to plan, not {len(self.tensors)}"
            raise MixqError(f"the profile was built on {self.model}; {loaded.spec} {what}")
        for name, shape in zip(self.tensors, self.shapes):
            if tuple(mine[name].shape) != tuple(shape):
                raise MixqError(f"the profile was built on {self.model}; {loaded.spec}'s {name} is "
                                f"{tuple(mine[name].shape)}, not {tuple(shape)}")
        theirs = weight_fingerprint(loaded, self.tensors)
        scale = np.abs(self.fingerprint).max(axis=1, keepdims=True)
        off = (np.abs(theirs - self.fingerprint) > FINGERPRINT_RTOL * scale).any(axis=1)
        if off.any():
            t = int(np.argmax(off))
            raise MixqError(f"the profile was built on {self.model}; {loaded.spec} has other weights "
                            f"(first in {self.tensors[t]}): profile this model, or give the model the profile measured")

    def save(self, path: Path) -> None:
        arrays = {"nbytes": self.nbytes, "measured": self.measured, "fingerprint": self.fingerprint}
        arrays.update({f"errors.{k}": v for k, v in self.errors.items()})
        arrays.update({f"importance.{k}": v for k, v in self.importance.items()})
        meta = dict(
            version=PROFILE_VERSION, model=self.model, tensors=self.tensors, kinds=self.kinds, blocks=self.blocks,
            shapes=self.shapes, options=self.options, fixed_bytes=self.fixed_bytes,
            header_bytes=self.header_bytes, n_weights=self.n_weights,
            tie_groups=self.tie_groups, info=self.info,
        )
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_tensors({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}, path,
                     metadata={"mixq.profile": json.dumps(meta)})

    @classmethod
    def load(cls, path: Path) -> Profile:
        try:
            arrays = load_file(str(path))
            from safetensors import safe_open

            with safe_open(str(path), framework="np") as f:
                meta = json.loads((f.metadata() or {})["mixq.profile"])
        except FileNotFoundError:
            raise MixqError(f"profile {path} not found") from None
        except Exception as e:
            raise MixqError(f"cannot read profile {path}: {e}") from None
        if meta.get("version") != PROFILE_VERSION:
            raise MixqError(f"profile {path} has version {meta.get('version')}, expected {PROFILE_VERSION}")
        errors = {k.split(".", 1)[1]: v for k, v in arrays.items() if k.startswith("errors.")}
        importance = {k.split(".", 1)[1]: v for k, v in arrays.items() if k.startswith("importance.")}
        meta.pop("version")
        try:
            meta["shapes"] = [tuple(int(n) for n in s) for s in meta["shapes"]]
            profile = cls(nbytes=arrays["nbytes"], measured=arrays["measured"], errors=errors, importance=importance,
                          fingerprint=arrays["fingerprint"], **meta)
            problem = profile._inconsistency()
        except (KeyError, TypeError, ValueError) as e:
            problem = f"{type(e).__name__}: {e}"
        if problem:
            raise MixqError(f"profile {path} is inconsistent: {problem}")
        return profile

    def _inconsistency(self) -> str | None:
        """What in a loaded profile contradicts itself (it came from a file), or None."""
        lists = (self.tensors, self.kinds, self.options, self.shapes, self.tie_groups)
        if not all(isinstance(x, list) for x in lists) or not isinstance(self.info, dict):
            return "its tables of names, shapes and tie groups are not lists"
        T, O = len(self.tensors), len(self.options)
        if not all(isinstance(x, str) for x in (self.model, *self.tensors, *self.kinds, *self.options)):
            return "names are not all strings"
        if len(set(self.tensors)) != T or len(self.kinds) != T or len(self.shapes) != T or len(self.blocks) != T:
            return (f"{T} tensors but {len(self.kinds)} kinds, {len(self.shapes)} shapes and {len(self.blocks)} "
                    "block indices (or repeated names)")
        if not all(type(b) is int and b >= -1 for b in self.blocks):
            return "a block index is not an integer of -1 or more"
        if any(len(s) != 2 or min(s) < 1 for s in self.shapes):
            return "a shape is not (rows, columns)"
        for name, table in [("nbytes", self.nbytes), ("measured", self.measured), *self.errors.items()]:
            if table.shape != (T, O) or table.dtype.kind not in "fiu":
                return f"its {name} table is {table.shape} {table.dtype}, not ({T}, {O}) numbers"
        if (self.nbytes < 0).any():
            return "negative byte counts"
        if self.fingerprint.shape != (T, FINGERPRINT_LEN):
            return f"its weight fingerprint is {self.fingerprint.shape}, not ({T}, {FINGERPRINT_LEN})"
        columns = {name: shape[1] for name, shape in zip(self.tensors, self.shapes)}
        if any(v.shape != (columns.get(name, -1),) for name, v in self.importance.items()):
            return "its importance vectors do not match the tensors"
        if not all(isinstance(g, list) and g and all(type(i) is int for i in g) for g in self.tie_groups) or \
                sorted(i for g in self.tie_groups for i in g) != list(range(T)):
            return "its tie groups do not split its tensors into groups"
        if not all(type(n) is int and n >= 0 for n in (self.fixed_bytes, self.header_bytes, self.n_weights)):
            return "byte or weight counts are not non-negative integers"
        for option in self.options:
            Option.parse(option)  # an unknown format or method: its own clear error
        return None


def weight_fingerprint(loaded: LoadedModel, tensors: list[str]) -> np.ndarray:
    """(T, FINGERPRINT_LEN): the first weights of the first row of each tensor's parameter (an
    expert stack's first expert for each of its experts; zero-padded)."""
    refs = loaded.plannable()
    out = np.zeros((len(tensors), FINGERPRINT_LEN), np.float32)
    for t, name in enumerate(tensors):
        row = loaded.read(refs[name].param, rows=slice(0, 1)).reshape(-1)[:FINGERPRINT_LEN]
        out[t, : len(row)] = row.numpy()
    return out


def calibrate(raw: np.ndarray, measured: np.ndarray, kinds: list[str], blocks: list[int],
              evaluated_at: np.ndarray | None = None) -> np.ndarray:
    """Predicted KL = alpha_t * raw^beta, fitted on the measured points (and evaluated at the
    errors `evaluated_at`, in raw's units, if given, instead of at raw itself).

    beta is shared by all tensors (fitted within tensors, in log space); alpha_t is per tensor where
    the tensor has measured points. Elsewhere it is interpolated over depth (log-linearly by block,
    the nearest measured block beyond the ends) among the measured tensors of its kind: alpha moves
    tenfold from the first blocks to the last for v, o and down (the residual stream grows, so one
    unit of output error matters less), which one value per kind cannot follow. A kind with no
    measured tensor takes the median of all.
    """
    ok = np.isfinite(measured) & (measured > 0) & np.isfinite(raw) & (raw > 0)
    if not ok.any():
        raise MixqError("the profile has no measured KL points to calibrate on; use an uncalibrated estimator")
    x = np.where(ok, np.log(np.where(ok, raw, 1)), np.nan)
    y = np.where(ok, np.log(np.where(ok, measured, 1)), np.nan)
    counts = ok.sum(axis=1)
    multi = counts >= 2
    if multi.any():
        xc = x[multi] - np.nanmean(x[multi], axis=1, keepdims=True)
        yc = y[multi] - np.nanmean(y[multi], axis=1, keepdims=True)
        beta = float(np.nansum(xc * yc) / max(np.nansum(xc * xc), 1e-12))
    else:
        beta = 1.0
    log_alpha = np.full(raw.shape[0], np.nan)
    has = counts > 0
    log_alpha[has] = np.nanmean(y[has] - beta * x[has], axis=1)
    overall = float(np.nanmedian(log_alpha))
    by_kind: dict[str, dict[int, list[float]]] = {}  # kind -> block -> log alphas (experts share a block)
    for t in np.nonzero(has)[0]:
        by_kind.setdefault(kinds[t], {}).setdefault(blocks[t], []).append(log_alpha[t])
    for t in np.nonzero(~has)[0]:
        at = by_kind.get(kinds[t])
        if at is None:
            log_alpha[t] = overall
        else:
            depth = sorted(at)
            log_alpha[t] = float(np.interp(blocks[t], depth, [np.median(at[b]) for b in depth]))
    errors = raw if evaluated_at is None else evaluated_at
    with np.errstate(divide="ignore"):
        return np.where(np.isfinite(errors), np.exp(log_alpha)[:, None] * np.power(errors, beta), np.inf)


TIE_RULES = ("none", "fused", "experts", "all-experts", "fused+all-experts")


def tie_groups(loaded: LoadedModel, tensors: list[str], tie: str) -> list[list[int]]:
    """Groups of tensor indices that share one option: none; fused: the matrices of each block that
    read one input (q/k/v, gate/up; an expert stack's experts); experts: only each stack's experts
    (what engines without per-expert kernels need); all-experts: every expert of the model (what
    transformers reads compressed experts with: one scheme); fused+all-experts: both (vLLM, which
    fuses q/k/v and gate/up, and reads a compressed-tensors export's experts in one scheme)."""
    if tie not in TIE_RULES:
        raise MixqError(f"unknown tie rule {tie!r}: {', '.join(TIE_RULES)}")
    if tie == "none":
        return [[t] for t in range(len(tensors))]
    refs = loaded.plannable()
    if tie in ("all-experts", "fused+all-experts"):
        others = tie_groups(loaded, tensors, "none" if tie == "all-experts" else "fused")
        experts = [t for g in others for t in g if refs[tensors[t]].expert is not None]
        return [experts] * bool(experts) + [g for g in others if refs[tensors[g[0]]].expert is None]
    index = {n: t for t, n in enumerate(tensors)}
    groups = []
    for b in range(loaded.n_blocks):
        for stage in loaded.block_stages(b):
            if tie == "fused" or refs[stage[0]].expert is not None:
                groups.append([index[n] for n in stage])
            else:
                groups += [[index[n]] for n in stage]
    groups += [[index[name]] for name in loaded.rounded_only()]
    return groups


@dataclass(frozen=True)
class ProfileSettings:
    space: OptionSpace = OptionSpace()
    method_settings: MethodSettings = MethodSettings()
    fisher_windows: int = 8  # calibration windows given a backward pass for the Fisher estimator
    measure: tuple[str, ...] = ()  # formats measured end to end per tensor (default: measure_formats)
    tie: str = "none"
    batch_size: int = 8
    measure_every: int = 1  # KL points for the tensors of `measured_blocks` only (others: interpolated)
    row_fraction: float = 1.0  # errors (and measured KL) from this share of each tensor's rows, scaled up
    # ... but never fewer rows than this: the rows of a small matrix (a GQA model's k_proj, 2 heads of
    # 128 rows in Qwen2.5-1.5B) differ widely in how much their error moves the output (a head's
    # rotary frequencies): 32 of those 256 rows put k_proj's KL point 1.4-1.8x below the whole matrix's,
    # while keeping them all costs little
    min_rows: int = 512
    reconstruct: ReconstructSettings = ReconstructSettings()  # the `block` method's settings
    gain_blocks: int = 2  # blocks on which the learned-rounding methods' gains are measured
    # matmuls of the statistics passes (sums in float32); None: the device's fast one (fast_matmul_dtype)
    capture_dtype: torch.dtype | None = None
    target: str | None = None  # the engine the plan is for (mixq.export): only options it stores
    device: str = field(default="cpu", repr=False)  # where blocks run (a resumed profile may move)
    # KL points: later blocks from the reference's tapes (measure_kl), where bfloat16 products are fast
    taped_kl: bool = True


def measure_formats(space: OptionSpace, allowed: frozenset[str] | None = None) -> tuple[str, ...]:
    """Formats measured end to end by default, among those `allowed` (default: all of the space): for
    the int grids 3 and 4 bits (else the two lowest) at the largest group; for ggml types Q3_K and
    Q4_K, plus Q4_0 and Q5_0 for rows k-quants do not fit."""
    names = [n for n in space.format_names() if allowed is None or n in allowed]
    ints = [f for f in map(parse_format, names) if isinstance(f, IntFormat)]
    if ints:
        widths = sorted({f.bits for f in ints})
        bits = [b for b in space.bits if b in (3, 4) and b in widths] or widths[:2]
        return tuple(max((f for f in ints if f.bits == b), key=lambda f: f.group_size or 1 << 30).name for b in bits)
    preferred = [n for n in ("q3_k", "q4_k", "q4_0", "q5_0") if n in names]
    return tuple(preferred or names[:2])


@dataclass(frozen=True)
class OptionTable:
    """Which options each plannable tensor may take, and what each costs in bytes; no data needed."""

    tensors: list[str]
    options: list[Option]
    allowed: np.ndarray  # (T, O) bool
    nbytes: np.ndarray  # (T, O) int64

    @classmethod
    def build(cls, loaded: LoadedModel, space: OptionSpace, target: str | None = None) -> OptionTable:
        """With `target`, a tensor is allowed only the options that target stores for it."""
        plannable = loaded.plannable()
        tensors = list(plannable)
        space_options = space.options()
        # The input embedding (a lookup) has no H, and a tied output matrix's second role is that
        # embedding, so error compensation through H would be one-sided: both are only rounded (rtn).
        # An untied output matrix has its whole H (the final hidden states): it also takes GPTQ.
        head_options = [Option(o.format, "rtn") for o in space_options if not o.is_keep]
        untied_head_options = head_options + [o for o in space_options if o.method == "gptq"]
        # A target may store experts in other formats than the space's (compressed-tensors: symmetric twins)
        has_experts = any(ref.expert is not None for ref in plannable.values())
        expert_options = space_options if target is None or not has_experts else list(dict.fromkeys(
            o if o.is_keep else Option(get_target(target).expert_format(o.format)[0], o.method) for o in space_options))
        options = list(dict.fromkeys([*space_options, *head_options, *expert_options, KEEP_OPTION]))
        shapes = [plannable[t].shape for t in tensors]
        allowed = np.array([[o in (space_options if plannable[t].expert is None else expert_options) and o.fits(shape)
                             for o in options] for t, shape in zip(tensors, shapes)])
        for name in loaded.rounded_only():
            t = tensors.index(name)
            own = head_options if name in loaded.rtn_only() else untied_head_options
            allowed[t] = [(o in own or (o.is_keep and space.keep_16bit)) and o.fits(shapes[t]) for o in options]
        if target is not None:
            stores = get_target(target)
            allowed &= np.array([[stores.refuses(loaded, t, o.format, s) is None for o in options]
                                 for t, s in zip(tensors, shapes)])
        if not allowed.any(axis=1).all():
            t = int(np.nonzero(~allowed.any(axis=1))[0][0])
            within = f" that {target} stores" if target else ""
            raise MixqError(f"no option of the option space{within} fits {tensors[t]} {shapes[t]}")
        # Options a tensor cannot take are priced at 0 bytes; `allowed` keeps every plan off them. A
        # target that declares its own layout prices what it stores as its file stores it.
        priced = get_target(target).nbytes if target is not None else None

        def cost(o: Option, shape: tuple[int, int], stored_by_target: bool) -> int:
            if not o.fits(shape):
                return 0
            if priced is not None and stored_by_target and not o.is_keep:
                return priced(o.format, shape)
            return o.nbytes(shape)

        nbytes = np.array([[cost(o, s, bool(allowed[t, i])) for i, o in enumerate(options)]
                           for t, s in enumerate(shapes)], np.int64)
        return cls(tensors, options, allowed, nbytes)


def fixed_bytes(loaded: LoadedModel, tensors: list[str]) -> int:
    """Bytes of every parameter no plan decides on (norms), at its storage width."""
    planned = {f"{n}.weight" for n in tensors}
    return sum(kept_nbytes(shape) for n, shape in loaded.stored_tensors().items() if n not in planned)


def container(loaded: LoadedModel, space: OptionSpace, target: str | None = None) -> str:
    """The file a budget measures: the target's own when it declares its bytes; with no target, the
    exported GGUF when every format is a ggml type and the model came from a GGUF that llama.cpp
    takes; else mixq's own safetensors."""
    if target is not None:
        return target if get_target(target).overhead is not None else "safetensors"
    from_gguf = source_gguf(loaded.spec) is not None and get_target("gguf").model_refusal(loaded) is None
    return "gguf" if space.ggml_only and from_gguf else "safetensors"


def overhead_bytes(loaded: LoadedModel, tensors: list[str], space: OptionSpace, target: str | None = None) -> int:
    """Bytes of the file beyond every parameter's data (a bound that holds for any plan)."""
    measured = container(loaded, space, target)
    if measured == "safetensors":
        return header_bound(loaded, tensors)
    return get_target(measured).overhead(loaded, tensors)


def smallest_file(loaded: LoadedModel, space: OptionSpace, target: str | None = None) -> int:
    """The smallest file any plan over this option space can make (checked before profiling)."""
    table = OptionTable.build(loaded, space, target)
    smallest = np.where(table.allowed, table.nbytes, np.iinfo(np.int64).max).min(axis=1).sum()
    return int(smallest) + fixed_bytes(loaded, table.tensors) + overhead_bytes(loaded, table.tensors, space, target)


def build_profile(
    loaded: LoadedModel, calib: torch.Tensor, held_out: torch.Tensor, settings: ProfileSettings = ProfileSettings(),
    checkpoints: Checkpoints | None = None,
) -> Profile:
    """Measure every tensor in every option. The model's weights are left as they were.

    With `checkpoints`, each phase's results are saved as it goes (the Fisher diagonal; the errors
    after each block; the learned-rounding gains; the KL points after each starting block), and a
    run that finds them continues where the last one stopped."""
    timings: dict[str, float] = {}
    start = time.perf_counter()
    plannable = loaded.plannable()
    target = None if settings.target is None else get_target(settings.target)
    if target is not None:
        problem = target.model_refusal(loaded)
        if problem:
            raise MixqError(f"--target {settings.target}: {problem}")
    table = OptionTable.build(loaded, settings.space, settings.target)
    tensors, options = table.tensors, table.options
    # the engine's input rounding of each option (None: inputs multiplied as they are)
    input_block = [None if target is None or o.is_keep else target.input_block(o.format) for o in options]
    input_blocks = sorted({w for w in input_block if w is not None})
    names = [o.name for o in options]
    # Each tensor measures the default formats among those it may take (a target may refuse some).
    measure_fmts = {t: settings.measure or measure_formats(settings.space, frozenset(
        options[o].format for o in np.nonzero(table.allowed[t])[0].tolist())) for t in range(len(tensors))}
    unknown = set(settings.measure) - {o.format for o in options}
    if unknown:
        raise MixqError(f"formats to measure {sorted(unknown)} are not in the option space")

    t0 = time.perf_counter()
    saved = checkpoints.load(FISHER_CHECKPOINT) if checkpoints else None
    if saved:
        fisher, timings["fisher"] = saved[0], saved[1]["seconds"]
    else:
        # No Fisher windows: no backward pass (large models), and no fisher estimator in this profile.
        fisher = fisher_diagonal(loaded, calib[: settings.fisher_windows], tensors,
                                 settings.device) if settings.fisher_windows else {}
        timings["fisher"] = time.perf_counter() - t0
        if checkpoints:
            checkpoints.save(FISHER_CHECKPOINT, fisher, {"seconds": timings["fisher"]})

    T, O = len(tensors), len(options)
    block_of = {name: b for b in range(loaded.n_blocks) for name in loaded.block_tensors(b)}
    blocks_measured = measured_blocks(loaded.n_blocks, settings.measure_every)
    measured_tensor = [block_of.get(name, 0) in blocks_measured for name in tensors]
    errors = {k: np.full((T, O), np.inf) for k in ("hessian", "fisher", *([INPUTS] if input_blocks else []))}
    # Per tensor and measured format, the better method's result: the one a plan would pick.
    to_measure: dict[tuple[int, str], tuple[int, float, tuple[torch.Tensor, QTensor]]] = {}
    index = {name: t for t, name in enumerate(tensors)}
    importance: dict[str, np.ndarray] = {}
    rare: dict[str, int] = {}
    timings["capture"] = timings["quantize"] = 0.0
    resume_at, done = None, False
    written: dict[tuple[int, str], str] = {}  # checkpoint file of each quantized tensor to measure
    saved = checkpoints.load(CAPTURE_CHECKPOINT) if checkpoints else None
    if saved:
        resume_at, done = _restore_capture(checkpoints, *saved, errors, importance, to_measure, written, rare, timings)
    passes = settings.capture_dtype or fast_matmul_dtype(settings.device)
    t0 = time.perf_counter()
    progress = tqdm(total=T, desc="profiling tensors", unit="tensor", initial=len(importance))
    # one block at a time; after a resume, from the block after the last one saved
    for block_stats, matrices, batches in [] if done else capture.iter_stats(
            loaded, calib, settings.batch_size, passes, resume_at, settings.device, input_blocks):
        t1 = time.perf_counter()
        timings["capture"] += t1 - t0
        rare.update(capture.rare_experts(block_stats, plannable))
        with one_factorisation_per_h():  # a stage's matrices share one H; each is fitted at several group lengths
            for name, layer_stats in block_stats.items():
                t = index[name]
                W_full = matrices[name].cpu()  # the quantizers run on the CPU (see quantize.py)
                H = layer_stats.H.cpu()
                importance[name] = torch.diag(H).float().numpy()
                # Rows are independent in every format and method: a random share of them, scaled up,
                # estimates the whole tensor's error (and, perturbed alone, its KL) at a fraction of the cost.
                rows = sample_rows(W_full.shape[0], settings.row_fraction, seed=t, min_rows=settings.min_rows)
                W = W_full[rows]
                row_scale = W_full.shape[0] / len(rows)
                H32 = H.float()  # for the errors of every option: float32 matmuls are ~3x faster here
                if input_blocks:  # every row: one product per width (an embedding's lookup rounds nothing)
                    column_norms = W_full.double().square().sum(dim=0)
                    rounded = {w: float(e.cpu() @ column_norms) for w, e in layer_stats.rounding.items()}
                by_method: dict[str, list[int]] = {}
                for o in np.nonzero(table.allowed[t])[0].tolist():
                    if input_blocks:
                        errors[INPUTS][t, o] = 0.0 if input_block[o] is None else rounded.get(input_block[o], 0.0)
                    if options[o].is_keep:
                        errors["hessian"][t, o] = 0.0
                        if fisher:
                            errors["fisher"][t, o] = 0.0
                    else:  # a learned method is priced from its start, scaled by its measured gain below
                        method = options[o].method
                        priced_by = settings.method_settings.init if method in LEARNED else method
                        by_method.setdefault(priced_by, []).append(o)
                for method, opts in by_method.items():
                    fmts = [parse_format(options[o].format) for o in opts]
                    for o, q in zip(opts, quantize_many(method, W, H, fmts, settings.method_settings)):
                        W_hat = q.dequantize()
                        errors["hessian"][t, o] = row_scale * output_error(W, W_hat, H32)
                        if fisher:
                            errors["fisher"][t, o] = row_scale * float((fisher[name][rows] * (W_hat - W) ** 2).sum())
                        key = (t, options[o].format)
                        measurable = measured_tensor[t] and options[o].format in measure_fmts[t]
                        if measurable and options[o].method not in LEARNED and (
                            key not in to_measure or errors["hessian"][t, o] < to_measure[key][1]
                        ):
                            to_measure[key] = (o, errors["hessian"][t, o], (rows, q))
                progress.update()
        captured = list(block_stats)
        del block_stats
        t0 = time.perf_counter()
        timings["quantize"] += t0 - t1
        if checkpoints and (batches is not None or loaded.head_name in captured):
            next_block = block_of[captured[0]] + 1 if batches is not None else loaded.n_blocks
            _save_capture(checkpoints, next_block, batches, errors, importance, to_measure, written, rare, timings)
    progress.close()
    t0 = time.perf_counter()
    saved = checkpoints.load(GAINS_CHECKPOINT) if checkpoints else None
    if saved:
        gains = {(m, f): g for m, f, g in saved[1]["gains"]}
    else:
        learned = sorted({o.method for o in options if o.method in LEARNED})
        gain_fmts = sorted({f for fmts in measure_fmts.values() for f in fmts}, key=bits_per_weight)
        gains = learned_gains(loaded, calib, gain_fmts, learned, settings) if learned else {}
        if checkpoints:
            checkpoints.save(GAINS_CHECKPOINT, {}, {"gains": [[m, f, g] for (m, f), g in gains.items()]})
    measured_fmts = sorted({f for _, f in gains}, key=bits_per_weight)
    for o, option in enumerate(options):
        if option.method in LEARNED:
            near = min(measured_fmts, key=lambda f: abs(bits_per_weight(f) - bits_per_weight(option.format)))
            for estimator in ("hessian", "fisher"):  # the input rounding does not depend on the method
                errors[estimator][:, o] *= gains[(option.method, near)]
    timings["gains"] = time.perf_counter() - t0
    chosen = {(t, o): quantized for (t, _), (o, _, quantized) in to_measure.items()}
    t0 = time.perf_counter()
    measured = np.full((T, O), np.nan)
    saved = checkpoints.load(KL_CHECKPOINT) if checkpoints else None
    points_done = {(t, o): kl for t, o, kl in saved[1]["points"]} if saved else {}

    def save_points(points: dict[tuple[int, int], float]) -> None:
        if checkpoints:
            checkpoints.save(KL_CHECKPOINT, {}, {"points": [[t, o, kl] for (t, o), kl in points.items()]})

    taped = settings.taped_kl and tapes_fit(loaded, held_out.numel(), torch.device(settings.device))
    for (t, o), kl in measure_kl(loaded, held_out, tensors, chosen, settings.batch_size,
                                 done=points_done, save=save_points, device=settings.device, taped=taped).items():
        rows = plannable[tensors[t]].shape[0]
        measured[t, o] = kl * rows / len(sample_rows(rows, settings.row_fraction, seed=t, min_rows=settings.min_rows))
    timings["measure"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - start

    return Profile(
        model=loaded.spec, tensors=tensors, kinds=[plannable[n].kind for n in tensors],
        blocks=[block_of.get(n, -1) for n in tensors],
        shapes=[plannable[n].shape for n in tensors], options=names, nbytes=table.nbytes,
        errors=errors, measured=measured, fixed_bytes=fixed_bytes(loaded, tensors), header_bytes=overhead_bytes(loaded, tensors, settings.space, settings.target),
        n_weights=loaded.n_weights,
        tie_groups=tie_groups(loaded, tensors, settings.tie),
        info=dict(calibration_windows=list(calib.shape), held_out_windows=list(held_out.shape),
                  fisher_windows=min(settings.fisher_windows, len(calib)), seconds=timings,
                  container=container(loaded, settings.space, settings.target), target=settings.target,
                  input_blocks=input_blocks,
                  row_fraction=settings.row_fraction, kl_later_blocks="taped" if taped else "float32",
                  passes="bfloat16 matmuls" if passes == torch.bfloat16 else "float32",
                  learned_gains={f"{m}:{f}": g for (m, f), g in gains.items()},
                  rare_experts=rare, expert_tokens=expert_tokens(loaded, tensors, importance),
                  experts_per_token=loaded.experts_per_token(),
                  kv_values_per_token=loaded.kv_values_per_token()),
        importance=importance, fingerprint=weight_fingerprint(loaded, tensors),
    )


FISHER_CHECKPOINT = "profile-fisher.safetensors"
CAPTURE_CHECKPOINT = "profile-capture.safetensors"  # errors so far, and the hidden states entering the next block
GAINS_CHECKPOINT = "profile-gains.safetensors"
KL_CHECKPOINT = "profile-kl.safetensors"
CHECKPOINTS = "profile-*.safetensors"  # the above, and each block's quantized tensors to measure


def _save_capture(checkpoints: Checkpoints, next_block: int, batches: list[torch.Tensor] | None,
                  errors: dict[str, np.ndarray], importance: dict[str, np.ndarray],
                  to_measure: dict[tuple[int, str], tuple[int, float, tuple[torch.Tensor, QTensor]]],
                  written: dict[tuple[int, str], str], rare: dict[str, int], timings: dict[str, float]) -> None:
    """The capture phase's state after a block (`batches` None: after the head, the phase is done).
    The quantized tensors to measure that are new since the last save go to a file of their own
    (`written` says where each one is), so each is written once, not once per later block."""
    new = {key: entry for key, entry in to_measure.items() if key not in written}
    if new:
        name = f"profile-measure-{min(t for t, _ in new):05d}.safetensors"  # its group's first tensor: unique
        tensors = {}
        for (t, fmt), (_, _, (rows, q)) in new.items():
            tensors[f"{t}.{fmt}.rows"] = rows
            tensors.update({f"{t}.{fmt}.{part}": x for part, x in q.format.pack(q).items()})
        checkpoints.save(name, tensors, {})
        written.update(dict.fromkeys(new, name))
    tensors = {f"errors.{k}": torch.from_numpy(v) for k, v in errors.items()}
    tensors.update({f"importance.{n}": torch.from_numpy(v) for n, v in importance.items()})
    tensors.update({f"batch.{i}": x for i, x in enumerate(batches or [])})
    measure = [[t, fmt, o, err, list(q.shape), written[(t, fmt)]] for (t, fmt), (o, err, (_, q)) in to_measure.items()]
    checkpoints.save(CAPTURE_CHECKPOINT, tensors, {
        "next_block": next_block, "done": batches is None, "batches": len(batches or []), "measure": measure,
        "rare": rare, "seconds": {k: timings[k] for k in ("capture", "quantize")}})


def _restore_capture(checkpoints: Checkpoints, tensors: dict[str, torch.Tensor], state: dict[str, Any],
                     errors: dict[str, np.ndarray], importance: dict[str, np.ndarray],
                     to_measure: dict[tuple[int, str], tuple[int, float, tuple[torch.Tensor, QTensor]]],
                     written: dict[tuple[int, str], str], rare: dict[str, int], timings: dict[str, float],
                     ) -> tuple[tuple[int, list[torch.Tensor]] | None, bool]:
    """Fill the capture phase's tables from its checkpoint; returns where `iter_stats` resumes, and
    whether the phase was done."""
    for k in errors:
        if f"errors.{k}" not in tensors:  # e.g. an inputs table, from a mixq that had none
            raise MixqError(f"checkpoint {checkpoints.path(CAPTURE_CHECKPOINT)} has no {k} errors (made by "
                            "another mixq version); rerun with --restart")
        errors[k][...] = tensors[f"errors.{k}"].numpy()
    importance.update({k.removeprefix("importance."): v.numpy() for k, v in tensors.items()
                       if k.startswith("importance.")})
    files: dict[str, dict[str, torch.Tensor]] = {}
    for t, fmt, o, err, shape, name in state["measure"]:
        if name not in files:
            saved = checkpoints.load(name)
            if saved is None:
                raise MixqError(f"checkpoint {checkpoints.path(name)} is missing; rerun with --restart")
            files[name] = saved[0]
        prefix = f"{t}.{fmt}."
        stored = files[name]
        parts = {k.removeprefix(prefix): v for k, v in stored.items() if k.startswith(prefix) and k != prefix + "rows"}
        to_measure[(t, fmt)] = (o, err, (stored[prefix + "rows"], parse_format(fmt).unpack(parts, tuple(shape))))
        written[(t, fmt)] = name
    rare.update(state["rare"])
    timings.update(state["seconds"])
    batches = [tensors[f"batch.{i}"] for i in range(state["batches"])]
    log.info("profile resumed at block %d", state["next_block"])
    return (state["next_block"], batches), state["done"]


def measured_blocks(n_blocks: int, every: int) -> set[int]:
    """The blocks whose tensors get KL points at `--measure-every` n: every n-th, the last, and each of
    the first n. Alpha moves with depth (see calibrate), so both ends are measured; and it moves
    fastest at the start: in Qwen2.5-1.5B v_proj's and o_proj's alphas fall 120-170x from block 0
    (where the massive activations are written) to block 3, and interpolating between those two put
    blocks 1 and 2 4-12x above block 3 (measured: block 1 is as sensitive as block 0, block 2 as block 3)."""
    return set(range(0, n_blocks, every)) | set(range(min(every, n_blocks))) | {n_blocks - 1}


def bits_per_weight(fmt: str) -> float:
    rows, cols = 256, 3072  # a shape every registered format fits
    return 8 * parse_format(fmt).nbytes((rows, cols)) / (rows * cols)


def expert_tokens(loaded: LoadedModel, tensors: list[str], importance: dict[str, np.ndarray]) -> dict[str, float]:
    """Routing frequency of each expert on the calibration text: the share of tokens its first matrix
    saw (tr H / the stack's total), by tensor name. It enters the predicted loss through H already:
    an expert's error is summed over the tokens routed to it, so rarely used experts cost less."""
    refs = loaded.plannable()
    totals: dict[str, float] = {}
    for n in tensors:
        if refs[n].expert is not None:
            totals[refs[n].param] = totals.get(refs[n].param, 0.0) + float(importance[n].sum())
    return {n: float(importance[n].sum()) / max(totals[refs[n].param], 1e-30)
            for n in tensors if refs[n].expert is not None}


def learned_gains(
    loaded: LoadedModel, calib: torch.Tensor, formats: list[str], methods: list[str], settings: ProfileSettings
) -> dict[tuple[str, str], float]:
    """(learned method, format) -> the block output error after the method divided by that of its start.

    Measured on `gain_blocks` evenly spaced blocks, each quantized alone with every matrix in one
    format, on the unquantized model's inputs; the median over blocks. The profile multiplies a
    learned option's start errors by this ratio (the nearest measured format's, by bits per weight).
    """
    n_blocks = loaded.n_blocks
    chosen = sorted({(i + 1) * n_blocks // (settings.gain_blocks + 1) for i in range(settings.gain_blocks)})
    ms = settings.method_settings
    ratios: dict[tuple[str, str], list[float]] = {}
    runner = BlockRunner(loaded, device=settings.device)
    batches = runner.embed(calib, settings.batch_size)
    progress = tqdm(total=len(chosen) * len(formats) * len(methods), desc="measuring learned-rounding gains",
                    unit="run")
    for b in range(max(chosen) + 1):
        weights = runner.block_weights(b)
        if b in chosen:
            refs, prefix = loaded.block_tensors(b), loaded.layout.block_prefix(b)
            stats, targets = capture.stats_and_outputs(runner, b, weights, batches)
            originals = {n: r.view(weights, prefix).clone() for n, r in refs.items()}
            for f in formats:
                fmt = parse_format(f)
                names = [n for n in refs if fmt.fits(refs[n].shape)]
                starts = {n: get_method(ms.init)(originals[n].cpu(), stats[n].H.cpu(), fmt, ms) for n in names}
                trial = {k: v.clone() for k, v in weights.items()}
                for n in names:
                    refs[n].view(trial, prefix).copy_(starts[n].dequantize())
                base = mse(runner.run(b, trial, batches), targets)
                for method in methods:
                    if method == "adaquant":
                        adjusted = {k: v.clone() for k, v in trial.items()}
                        for n in names:
                            q = get_method(method)(originals[n].cpu(), stats[n].H.cpu(), fmt, ms)
                            refs[n].view(adjusted, prefix).copy_(q.dequantize())
                        ratio = mse(runner.run(b, adjusted, batches), targets) / max(base, 1e-30)
                    else:  # before and after measured alike (in the reconstruction's precision)
                        run = {n: (originals[n], starts[n]) for n in names}
                        r = reconstruct_block(runner, b, {k: v.clone() for k, v in trial.items()}, run, batches,
                                              targets, settings.reconstruct, ms.learn_scale,
                                              {n: torch.diag(stats[n].H) for n in names})
                        ratio = r.loss_after / max(r.loss_before, 1e-30)
                    ratios.setdefault((method, f), []).append(ratio)
                    progress.update()
        batches = targets if b in chosen else runner.run(b, weights, batches)
    progress.close()
    return {k: float(np.median(v)) for k, v in ratios.items()}


def fisher_diagonal(loaded: LoadedModel, windows: torch.Tensor, tensors: list[str],
                    device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Sum over windows of the squared gradient of the window's mean next-token loss, per matrix.

    Block by block, one block's weights in memory at a time: a forward pass keeps each block's
    input per window; the backward pass walks the blocks from the last, recomputing each one with
    gradients, and carries the gradient of its input to the block before. The embedding's share
    comes from the gradient reaching block 0 (for a tied matrix it adds to the head's). Computed on
    `device`, returned on the CPU.
    """
    runner = BlockRunner(loaded, device=device)
    refs = loaded.plannable()
    layout = loaded.layout
    wanted = set(tensors)
    fisher = {n: torch.zeros(refs[n].shape, device=runner.device) for n in tensors}
    inputs: list[list[torch.Tensor]] = []  # inputs[b][w]: window w entering block b
    x = runner.embed(windows, 1)
    for b in tqdm(range(loaded.n_blocks), desc="Fisher (forward)", unit="block"):
        inputs.append(x)
        x = runner.run(b, runner.block_weights(b), x)
    grads = []
    residents = dict(runner.head())
    head_key, embedding_key = f"{layout.head}.weight", f"{layout.embedding}.weight"
    residents[head_key] = residents[head_key].detach().requires_grad_(True)
    if loaded.tied_embedding:
        residents[embedding_key] = residents[head_key]
    for ids, h in zip(windows.split(1), x):
        h = h.detach().requires_grad_(True)
        logits = runner.logits(h[:, :-1], residents)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1).to(logits.device))
        g_h, g_head = torch.autograd.grad(loss, [h, residents[head_key]])
        grads.append(g_h)
        if loaded.head_name in wanted:
            fisher[loaded.head_name] += g_head ** 2
    for b in tqdm(reversed(range(loaded.n_blocks)), total=loaded.n_blocks, desc="Fisher (backward)", unit="block"):
        weights = {k: v.requires_grad_(True) for k, v in runner.block_weights(b).items()}
        block_refs = [r for r in loaded.block_tensors(b).values() if r.name in wanted]
        prefix = layout.block_prefix(b)
        for w in range(len(grads)):
            x_in = inputs[b][w].detach().requires_grad_(True)
            y = runner.call(b, weights, x_in)
            g_x, *g_w = torch.autograd.grad(y, [x_in, *weights.values()], grads[w], allow_unused=True)
            by_name = dict(zip(weights, g_w))
            for r in block_refs:
                g = by_name[r.param.removeprefix(prefix)]
                if g is not None:
                    fisher[r.name] += r.view({r.param.removeprefix(prefix): g}, prefix).float() ** 2
            grads[w] = g_x
        inputs[b] = []
    # The embedding's role as a lookup: from the gradient reaching block 0. A tied matrix adds it to
    # its head role's squares (the cross term of the two roles is dropped).
    if layout.embedding in wanted or loaded.tied_embedding and loaded.head_name in wanted:
        residents[embedding_key] = loaded.embedding().detach().requires_grad_(True)
        for ids, g in zip(windows.split(1), grads):
            h0 = runner.embed_with_grad(ids, residents)
            fisher[layout.embedding] += torch.autograd.grad(h0, residents[embedding_key], g)[0].to(runner.device) ** 2
    return {n: f.cpu() for n, f in fisher.items()}


def sample_rows(n_rows: int, fraction: float, seed: int, min_rows: int = 1) -> torch.Tensor:
    """Indices of a seeded random `fraction` of `n_rows` rows (all of them at 1.0), sorted, never
    fewer than `min_rows` (all, if there are fewer)."""
    keep = max(min(n_rows, min_rows), round(n_rows * fraction), 1)
    if keep >= n_rows:
        return torch.arange(n_rows)
    return torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed))[:keep].sort().values


class KLToReference:
    """Mean KL(reference || model) over every token of some windows, from the reference's hidden
    states leaving the last block (`final`, per batch).

    Where the logits are linear in the final norm's output n, z = (n W^T + b) / c (no soft-capping),
    and the model keeps the reference's head, per token
        KL = logsumexp(z') - logsumexp(z) - e . (n' - n) / c,   e = sum_i p_i W_i,
    with p the reference's probabilities: logsumexp(z), n and e are computed once, so a point costs
    one product with the output matrix and a logsumexp, never a pass over (tokens, vocabulary)
    probabilities (which cost 4x more). Both logsumexps come from float32 logits alike, so their
    rounding (a bias of about 1e-5 of the logits on this CPU, as large as the smallest KLs) cancels;
    e and the dot product are float64. Otherwise both sides' log-probabilities are compared, a
    chunk of tokens at a time.
    """

    def __init__(self, runner: BlockRunner, final: list[torch.Tensor]):
        self.runner, self.final = runner, final
        self.n_tokens = sum(h.shape[0] * h.shape[1] for h in final)
        linear = not getattr(runner.loaded.config.get_text_config(), "final_logit_softcapping", None)
        self.terms = [self._reference_terms(h) for h in final] if linear else None

    def _reference_terms(self, h: torch.Tensor) -> list[tuple[slice, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per chunk of tokens: (the chunk, logsumexp(z) float64, n, e float64)."""
        W = self.runner.head()[f"{self.runner.loaded.layout.head}.weight"].float()
        flat = h.reshape(-1, h.shape[-1])
        terms = []
        for s in self.runner.token_chunks(h):
            n = self.runner.normed(flat[s], self.runner.head())
            z = self.runner.projected(n)
            lse = torch.logsumexp(z, dim=-1)
            terms.append((s, lse.double(), n, self._expected_rows((z - lse[:, None]).exp_(), W)))
        return terms

    @staticmethod
    def _expected_rows(p: torch.Tensor, W: torch.Tensor, rows: int = 8192) -> torch.Tensor:
        """e = p @ W in float64, a slice of vocabulary rows at a time."""
        e = torch.zeros(p.shape[0], W.shape[1], dtype=torch.float64, device=p.device)
        for v in range(0, W.shape[0], rows):
            e += p[:, v : v + rows].double() @ W[v : v + rows].double()
        return e

    def __call__(self, final: list[torch.Tensor], residents: dict[str, torch.Tensor] | None = None) -> float:
        """The mean KL of a model whose last block left `final`, its head in `residents` (default:
        the reference's own)."""
        runner = self.runner
        total = 0.0
        with torch.no_grad():
            if self.terms is not None and residents is None:
                for h, terms in zip(final, self.terms):
                    flat = h.reshape(-1, h.shape[-1])
                    for s, lse_ref, n_ref, expected in terms:
                        n = runner.normed(flat[s], runner.head())
                        lse = torch.logsumexp(runner.projected(n), dim=-1).double()
                        shift = runner.scaled((expected * (n.double() - n_ref.double())).sum(-1))
                        total += (lse - lse_ref - shift).sum().item()
            else:
                for ref, h in zip(self.final, final):
                    ref_flat, flat = ref.reshape(-1, ref.shape[-1]), h.reshape(-1, h.shape[-1])
                    for s in runner.token_chunks(h):
                        log_p = F.log_softmax(runner.logits(ref_flat[s]), dim=-1)
                        log_q = F.log_softmax(runner.logits(flat[s], residents), dim=-1)
                        total += (log_p.exp() * (log_p - log_q)).sum(dtype=torch.float64).item()
        return max(total, 0.0) / self.n_tokens


TAPE_SHARE = 0.5  # of the free memory, the most the KL points' tapes may take


def tape_bytes(loaded: LoadedModel, tokens: int) -> int:
    """Bytes of the KL points' tapes (`runner.LinearTape`) over `tokens`: every block's distinct
    matrix inputs and its matrices' outputs, in float32."""
    refs = loaded.plannable()
    per_token = sum(refs[stage[0]].shape[1] + sum(refs[n].shape[0] for n in stage)
                    for b in range(loaded.n_blocks) for stage in loaded.block_stages(b))
    return 4 * tokens * per_token


def tapes_fit(loaded: LoadedModel, tokens: int, device: torch.device) -> bool:
    """Whether the KL points can run taped: a dense model (routing would change which tokens meet
    which matrix) on a device that multiplies bfloat16 fast (replayed in float32, a block costs more
    than its plain float32 run), whose tapes take at most TAPE_SHARE of the free memory."""
    return (loaded.experts_per_token() is None and fast_matmul_dtype(device) == torch.bfloat16
            and tape_bytes(loaded, tokens) <= TAPE_SHARE * available_bytes(device))


def measure_kl(
    loaded: LoadedModel,
    windows: torch.Tensor,
    tensors: list[str],
    items: dict[tuple[int, int], tuple[torch.Tensor, QTensor]],
    batch_size: int,
    matmul_dtype: torch.dtype = torch.float32,
    done: dict[tuple[int, int], float] | None = None,
    save: Callable[[dict[tuple[int, int], float]], None] | None = None,
    device: torch.device | str = "cpu",
    taped: bool = False,
) -> dict[tuple[int, int], float]:
    """Mean KL(reference || model) on `windows` with only tensor t replaced: items[(t, o)] holds the
    rows replaced and their QTensor. Points in `done` are taken as measured; `save` is given the
    points measured so far after each group of them (a resumable run keeps them).

    The reference's hidden states and its terms of the KL are computed once. The points of one block
    then run together: each replaces its matrix in that block, and all of them go through the rest
    of the model in one sweep, so each later block is read once per starting block.

    With `taped` (for a dense model: `tapes_fit`), the blocks after a point's own run from the
    reference run's tapes (`runner.LinearTape`): only the difference to
    the reference is multiplied, in bfloat16. A point then differs from its float32 value by well
    under a percent (bench/results/speed.md), at a fraction of the float32 products' time.
    """
    runner = BlockRunner(loaded, matmul_dtype, device)
    refs = loaded.plannable()
    layout = loaded.layout
    block_of = {n: b for b in range(loaded.n_blocks) for n in loaded.block_tensors(b)}
    hidden = [runner.embed(windows, batch_size)]  # hidden[b]: the batches entering block b
    tapes: list[list] = []  # tapes[b]: block b's products on each batch of the reference run
    taped = taped and loaded.experts_per_token() is None
    for b in tqdm(range(loaded.n_blocks), desc="reference for KL", unit="block"):
        if taped:
            out, tape = runner.run_taped(b, runner.block_weights(b), hidden[-1])
            tapes.append(tape)
        else:
            out = runner.run(b, runner.block_weights(b), hidden[-1])
        hidden.append(out)
    kl_of = KLToReference(runner, hidden[-1])

    def replaced(W: torch.Tensor, item: tuple[torch.Tensor, QTensor]) -> torch.Tensor:
        rows, q = item
        return W.detach().float().index_copy(0, rows.to(W.device), q.dequantize().to(W.device))

    result = dict(done or {})
    by_start: dict[int, list[tuple[int, int]]] = {}
    for (t, o) in items:
        if (t, o) not in result:
            by_start.setdefault(block_of.get(tensors[t], -1), []).append((t, o))
    progress = tqdm(total=len(items), desc="measuring KL per tensor", unit="point", initial=len(result))
    for (t, o) in by_start.pop(-1, []):  # the embedding and the head: outside the blocks
        name = tensors[t]
        residents = dict(runner.head())
        key = f"{name}.weight"
        residents[key] = replaced(residents[key] if key in residents else loaded.embedding().to(runner.device),
                                  items[(t, o)])
        if loaded.tied_embedding:
            residents[f"{layout.head}.weight"] = residents[f"{layout.embedding}.weight"] = residents[key]
        if name == layout.embedding:  # block 0 reads it: rerun everything
            final = runner.embed(windows, batch_size, residents)
            for b in range(loaded.n_blocks):
                final = runner.run(b, runner.block_weights(b), final)
        else:
            final = hidden[-1]
        result[(t, o)] = kl_of(final, residents)
        progress.update()
    if save and result:
        save(result)
    for start in sorted(by_start):
        points = by_start[start]
        weights = runner.block_weights(start)
        prefix = layout.block_prefix(start)
        streams = []
        for (t, o) in points:
            ref = refs[tensors[t]]
            trial = dict(weights)
            trial[ref.param.removeprefix(prefix)] = weights[ref.param.removeprefix(prefix)].clone()
            ref.view(trial, prefix).copy_(replaced(ref.view(weights, prefix), items[(t, o)]))
            streams.append(runner.run(start, trial, hidden[start]))
        for b in range(start + 1, loaded.n_blocks):
            later = runner.block_weights(b)
            streams = runner.run_from_tapes(b, later, streams, tapes[b]) if taped else [
                runner.run(b, later, x) for x in streams]
        for point, final in zip(points, streams):
            result[point] = kl_of(final)
            progress.update()
        if save:
            save(result)
    progress.close()
    return result
