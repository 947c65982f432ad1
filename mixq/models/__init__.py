"""Load a model: a Hugging Face directory, a GGUF file, a named embedded default, or `hf:owner/name`.

Every model is loaded in fp32 as the reference; a GGUF file's dequantized weights are its reference.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mixq.errors import MixqError
from mixq.models.architectures import Architecture, architecture
from mixq.models.embedded import EMBEDDED, resolve_embedded

log = logging.getLogger(__name__)

HUB_PREFIX = "hf:"


@dataclass
class LoadedModel:
    spec: str  # what the user named: resolvable again by `load_model`
    model: nn.Module
    tokenizer: Any
    arch: Architecture

    def blocks(self) -> nn.ModuleList:
        return self.model.get_submodule(self.arch.blocks)

    def block_linears(self, index: int) -> dict[str, nn.Linear]:
        """The quantizable linears of block `index`, by full name, in forward order."""
        block = self.blocks()[index]
        prefix = f"{self.arch.blocks}.{index}"
        return {
            f"{prefix}.{name}": block.get_submodule(name)
            for group in self.arch.input_groups
            for name in group
        }

    def block_groups(self, index: int) -> list[list[str]]:
        """Full names of block `index`'s linears, grouped by shared input, in forward order."""
        prefix = f"{self.arch.blocks}.{index}"
        return [[f"{prefix}.{name}" for name in group] for group in self.arch.input_groups]

    def quantizable(self) -> dict[str, nn.Linear]:
        """Every linear of the transformer blocks, by full name."""
        out: dict[str, nn.Linear] = {}
        for i in range(len(self.blocks())):
            out.update(self.block_linears(i))
        return out

    @property
    def head_name(self) -> str:
        """The output matrix as a plannable tensor: named after the embedding when the two are tied."""
        return self.arch.embedding if self.tied_embedding else self.arch.head

    def plannable(self) -> dict[str, nn.Module]:
        """Every tensor a plan decides on: the block linears, the input embedding when it is not tied,
        and the output (tied: embedding) matrix last."""
        return {**self.quantizable(), **{n: self.model.get_submodule(n) for n in self.rounded_only()}}

    def rounded_only(self) -> list[str]:
        """Plannable tensors only ever rounded (rtn): an untied input embedding (a lookup, no H) and
        the output matrix (whose tied second role as the embedding has no H either)."""
        return ([] if self.tied_embedding else [self.arch.embedding]) + [self.head_name]

    @property
    def tied_embedding(self) -> bool:
        """True when the output layer reuses the token embedding (quantizing one changes both)."""
        head = self.model.get_submodule(self.arch.head).weight
        return head is self.model.get_submodule(self.arch.embedding).weight


def load_model(spec: str) -> LoadedModel:
    """Resolve `spec` and load model and tokenizer, with one clear error for anything wrong."""
    if spec in EMBEDDED:
        return _load_gguf(resolve_embedded(spec), spec)
    if spec.startswith(HUB_PREFIX):
        return _load_hf(spec[len(HUB_PREFIX):], spec)
    path = Path(spec)
    if not path.exists():
        known = ", ".join(sorted(EMBEDDED))
        raise MixqError(
            f"model {spec!r} not found: give a GGUF file, a Hugging Face model directory, "
            f"hf:owner/name, or one of: {known}"
        )
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise MixqError(f"{path} is not a Hugging Face model directory (no config.json)")
        return _load_hf(str(path), str(path.resolve()))
    if path.suffix == ".gguf":
        return _load_gguf(path, str(path.resolve()))
    raise MixqError(f"{path}: expected a .gguf file or a model directory")


def source_gguf(spec: str) -> Path | None:
    """The GGUF file a model spec names (directly or as an embedded default), else None."""
    if spec in EMBEDDED:
        path = resolve_embedded(spec)
        return path if path.suffix == ".gguf" else None
    path = Path(spec)
    return path if path.suffix == ".gguf" and path.is_file() else None


def _load_gguf(path: Path, spec: str) -> LoadedModel:
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
        field = reader.fields["general.architecture"]
        model_type = bytes(field.parts[field.data[0]]).decode()
    except Exception as e:  # the gguf package raises many kinds on corrupt input
        raise MixqError(f"cannot read GGUF file {path}: {e}") from None
    arch = architecture(model_type)
    return _from_pretrained(str(path.parent), spec, arch, gguf_file=path.name)


def _load_hf(location: str, spec: str) -> LoadedModel:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(location)
    except Exception as e:
        raise MixqError(f"cannot read the model config of {location}: {e}") from None
    arch = architecture(config.model_type)
    return _from_pretrained(location, spec, arch)


def _from_pretrained(location: str, spec: str, arch: Architecture, **kwargs: Any) -> LoadedModel:
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.logging.set_verbosity_error()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            location, dtype=torch.float32, attn_implementation="sdpa", **kwargs
        )
    except MixqError:
        raise
    except Exception as e:
        raise MixqError(f"cannot load model {spec}: {e}") from None
    model.eval().requires_grad_(False)
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise MixqError(f"model {spec} has NaN or infinite values in {name}")
    log.info("loaded %s (%s, %d blocks)", spec, arch.family, len(model.get_submodule(arch.blocks)))
    return LoadedModel(spec=spec, model=model, tokenizer=tokenizer, arch=arch)
