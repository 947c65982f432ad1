"""Targets: the engines a quantized model is exported to, one file each under mixq/export/.

mixq's own layout (native.py) is what `mixq quantize` writes; `mixq export DIR --to TARGET OUT` turns it
into a target's file. A target declares which formats it stores (`refusal`: why a tensor of a shape
cannot be stored in a format, or None), which source models it takes (`model_refusal`), and writes
(`export`). `--target` on quantize/profile restricts the option space with the same declaration, so
a plan made for a target is always exportable to it; a target that declares its file's bytes
(`nbytes` per matrix, `overhead` per file) has a budget measured in its own file; one that declares
its engine's `kernels` can have its matrix products timed here (`mixq bench-device`) and plans limited
in time per token; one whose engine rounds the inputs of its products (`input_block`: llama.cpp's
8-bit blocks) has that error priced with each option. Adding a target is adding a file that calls
`register`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mixq.errors import MixqError
from mixq.latency import Kernels
from mixq.export.native import KEPT_FORMATS
from mixq.models import LoadedModel


def _any_model(loaded: LoadedModel) -> str | None:
    return None


@dataclass(frozen=True)
class Target:
    name: str
    summary: str  # what the export writes, for --help
    refusal: Callable[[str, tuple[int, int]], str | None]  # (format name, (rows, cols)) -> why not, or None
    export: Callable[[Path, Path, bool], str]  # (mixq output dir, out, overwrite) -> a line saying what it wrote
    model_refusal: Callable[[LoadedModel], str | None] = _any_model  # why not this model at all, or None
    quantizes_embeddings: bool = True  # False: the embedding and output matrix stay at 16 bits
    tie: str = "none"  # matrices that must share one option (profile.TIE_RULES): what the engine fuses
    formats: tuple[str, ...] = ("int",)  # the option space's formats when the user names none
    # Bytes of a (rows, cols) matrix in a format in the target's file; None: as mixq stores it.
    nbytes: Callable[[str, tuple[int, int]], int] | None = None
    # Bytes of the target's file beyond the parameters' data, for any plan over the planned tensors (a
    # bound); None: a budget for this target measures mixq's own file.
    overhead: Callable[[LoadedModel, list[str]], int] | None = None
    kernels: Kernels | None = None  # its engine's matrix products, timed on this machine; None: not here
    # How its engine rounds a matrix's inputs before multiplying them with a matrix stored in a format:
    # the width of the 8-bit blocks it rounds them to (`formats.ggml.rounded_inputs`), or None where it
    # multiplies them as they are. The profile prices that rounding with each option (`Profile.predicted`).
    input_block: Callable[[str], int | None] = lambda fmt: None
    # The format a mixture of experts' experts take here in place of a format (the option space offers
    # it to them instead), and why it is not that format itself; identity: experts take any format.
    expert_format: Callable[[str], tuple[str, str | None]] = lambda fmt: (fmt, None)

    def refuses(self, loaded: LoadedModel, name: str, fmt: str, shape: tuple[int, int]) -> str | None:
        """Why tensor `name` of `loaded` cannot be stored here in format `fmt`, or None if it can."""
        if fmt in KEPT_FORMATS:
            return None
        if not self.quantizes_embeddings and name in loaded.rounded_only():
            return f"{self.name} keeps the embedding and output matrix at 16 bits"
        why = self.refusal(fmt, shape)
        ref = loaded.plannable().get(name)
        return why if why or ref is None or ref.expert is None else self.expert_format(fmt)[1]

    def check(self, loaded: LoadedModel, formats: dict[str, tuple[str, tuple[int, int]]]) -> None:
        """Raise one clear error if `loaded` with `formats` (tensor -> (format, shape)) cannot be exported here."""
        problems = [p for p in [self.model_refusal(loaded)] if p]
        for name, (fmt, shape) in formats.items():
            why = self.refuses(loaded, name, fmt, shape)
            if why:
                problems.append(f"{name} is stored as {fmt}: {why}")
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise MixqError(f"cannot export to {self.name}: {problems[0]}{more}; quantize with --target {self.name}")

    def accepts(self, loaded: LoadedModel, formats: dict[str, tuple[str, tuple[int, int]]]) -> bool:
        try:
            self.check(loaded, formats)
        except MixqError:
            return False
        return True


TARGETS: dict[str, Target] = {}


def register(target: Target) -> Target:
    TARGETS[target.name] = target
    return target


def stored_formats(model_dir: Path) -> dict[str, tuple[str, tuple[int, int]]]:
    """tensor name -> (format, shape) of every quantized matrix of a mixq output directory."""
    from mixq.export.native import StoredModel

    entries = StoredModel(model_dir).entries
    return {n.removesuffix(".weight"): (e["format"], tuple(e["shape"])) for n, e in entries.items()
            if e["format"] not in KEPT_FORMATS}


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise MixqError(f"unknown target {name!r}; known: {', '.join(TARGETS)}")
    return TARGETS[name]


from mixq.export import compressed_tensors, gguf, recipe, vllm  # noqa: E402,F401  (register the targets)
