"""Load a model: a Hugging Face directory, a GGUF file, a named embedded default, or `hf:owner/name`.

Nothing loads the whole model. The model is a skeleton built from its config with its parameters
on the meta device; what lies outside the blocks (embedding, final norm, head) is read once in
float32, and each block's parameters are read from the memory-mapped file when a stage needs
that block (`block_weights`), as a dict of float32 tensors the runner calls the block with, and
dropped after. `in_memory=True` keeps every block read once (faster when the model fits).
A GGUF file's dequantized weights are its reference.
"""

from __future__ import annotations

import copy

import logging
import os
from dataclasses import dataclass, field
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mixq.errors import MixqError
from mixq.models.architectures import Family, family
from mixq.models.embedded import EMBEDDED, resolve_embedded
from mixq.models.layout import Layout, TensorRef, find_blocks, find_final_norm, module_name
from mixq.models.gguf_file import read_gguf
from mixq.models.source import GGUFSource, SafetensorsSource, WeightSource, gguf_metadata_parsed_once

log = logging.getLogger(__name__)

HUB_PREFIX = "hf:"
SLICE_BYTES = 1 << 26  # float32 bytes of a matrix read at once by `row_slices`


@dataclass
class LoadedModel:
    spec: str  # what the user named: resolvable again by `load_model`
    model: nn.Module  # the skeleton: parameters on the meta device, buffers real
    tokenizer: Any
    family: Family
    source: WeightSource
    layout: Layout
    residents: dict[str, torch.Tensor]  # parameters outside the blocks, float32 (untied embedding, head: read on use)
    in_memory: bool = False
    _cache: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)

    @property
    def config(self):
        return self.model.config

    @property
    def n_blocks(self) -> int:
        return len(self.layout.block_layouts)

    def kv_values_per_token(self) -> int | None:
        """Values each attention block keeps in its KV cache per token (keys and values of every KV
        head), from the config; None where the config does not say."""
        config = self.config.get_text_config()
        heads = getattr(config, "num_attention_heads", None)
        if not heads:
            return None
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return 2 * kv_heads * head_dim

    def experts_per_token(self) -> int | None:
        """Experts each token is routed to (top-k), from the config; None for a dense model."""
        if not any(ref.expert is not None for ref in self.plannable().values()):
            return None
        k = getattr(self.config.get_text_config(), "num_experts_per_tok", None)
        if not k:
            raise MixqError(f"{self.spec}: a mixture of experts whose config does not say how many experts a token "
                            "is routed to (num_experts_per_tok)")
        return int(k)

    def blocks(self) -> nn.ModuleList:
        return self.model.get_submodule(self.layout.blocks)

    def block_tensors(self, b: int) -> dict[str, TensorRef]:
        """The plannable matrices of block `b`, by name, in forward order."""
        return {t.name: t for t in self.layout.block_layouts[b].tensors}

    def block_stages(self, b: int) -> list[list[str]]:
        """Block `b`'s matrices grouped by shared input (one H), in forward order."""
        return [list(s) for s in self.layout.block_layouts[b].stages]

    def quantizable(self) -> dict[str, TensorRef]:
        """Every plannable matrix of the blocks, by name."""
        return {n: t for b in range(self.n_blocks) for n, t in self.block_tensors(b).items()}

    @property
    def tied_embedding(self) -> bool:
        """True when the output layer reuses the token embedding (quantizing one changes both)."""
        return self.layout.tied

    @property
    def head_name(self) -> str:
        """The output matrix as a plannable tensor: named after the embedding when the two are tied."""
        return self.layout.embedding if self.tied_embedding else self.layout.head

    def rounded_only(self) -> list[str]:
        """Plannable tensors outside the blocks, which no block method rounds: an untied input
        embedding (a lookup, no H: rtn only) and the output matrix (rtn only when tied, since its second
        role as the embedding has no H; untied, GPTQ too)."""
        return ([] if self.tied_embedding else [self.layout.embedding]) + [self.head_name]

    def rtn_only(self) -> list[str]:
        """Of those, the ones without a whole H, which only RTN rounds: the untied input embedding, or
        the tied output matrix."""
        return [self.head_name] if self.tied_embedding else [self.layout.embedding]

    @property
    def hidden_size(self) -> int:
        return self.model.get_parameter(self.embedding_key).shape[1]

    @property
    def embedding_key(self) -> str:
        return f"{self.layout.embedding}.weight"

    def embedding(self, source: WeightSource | None = None) -> torch.Tensor:
        """The input embedding matrix (float32): resident when tied to the head, else read now."""
        if self.tied_embedding and source is None:
            return self.residents[self.embedding_key]
        return self.read(self.embedding_key, source)

    def head(self, source: WeightSource | None = None) -> torch.Tensor:
        """The output matrix (float32): the embedding when tied, else read now (an untied head is
        as large as the embedding, so it is held only by the stage that runs it)."""
        if self.tied_embedding:
            return self.embedding(source)
        return self.read(f"{self.layout.head}.weight", source)

    def row_slices(self, name: str) -> Iterator[slice]:
        """Consecutive slices of the rows of parameter `name`, each at most SLICE_BYTES in float32:
        how a matrix too large to hold twice (an embedding, an output matrix) is read."""
        rows, cols = self.model.get_parameter(name).shape[:2]
        step = max(1, SLICE_BYTES // (4 * cols))
        for start in range(0, rows, step):
            yield slice(start, min(rows, start + step))

    def embedding_rows(self, ids: torch.Tensor, source: WeightSource | None = None) -> torch.Tensor:
        """Rows `ids` (sorted, distinct) of the input embedding (float32), from `source` (default: the
        model's own), read a slice of the vocabulary at a time."""
        if self.tied_embedding and source is None:
            return self.residents[self.embedding_key][ids]
        out = torch.empty(len(ids), self.hidden_size)
        for rows in self.row_slices(self.embedding_key):
            lo, hi = torch.searchsorted(ids, torch.tensor([rows.start, rows.stop])).tolist()
            if hi > lo:
                out[lo:hi] = self.read(self.embedding_key, source, rows)[ids[lo:hi] - rows.start]
        return out

    def head_rows(self, rows: slice, source: WeightSource | None = None) -> torch.Tensor:
        """Rows `rows` of the output matrix (float32), read alone: what streams the head over the
        vocabulary without holding it whole."""
        if self.tied_embedding and source is None:
            return self.residents[self.embedding_key][rows]
        return self.read(self.embedding_key if self.tied_embedding else f"{self.layout.head}.weight", source, rows)

    @property
    def vocab_size(self) -> int:
        """Rows of the output matrix."""
        return self.model.get_parameter(f"{self.layout.head}.weight").shape[0]

    def plannable(self) -> dict[str, TensorRef]:
        """Every tensor a plan decides on: the block matrices, the input embedding when it is not tied,
        and the output (tied: embedding) matrix last."""
        out = dict(self.quantizable())
        for name in self.rounded_only():
            shape = tuple(self.model.get_parameter(f"{name}.weight").shape)
            out[name] = TensorRef(name, f"{name}.weight", "head" if name == self.head_name else "embedding", shape)
        return out

    def parameters(self) -> dict[str, tuple[int, ...]]:
        """Shape of every parameter, tied ones once."""
        return {n: tuple(p.shape) for n, p in self.model.named_parameters()}

    @property
    def n_weights(self) -> int:
        return sum(int(torch.Size(s).numel()) for s in self.parameters().values())

    def stored_tensors(self) -> dict[str, tuple[int, ...]]:
        """What an output file stores, by name: every parameter, but each expert stack as its experts'
        (out, in) matrices `STACK.E.weight`, since each expert takes its own format."""
        stacks = {t.param: t for t in self.quantizable().values() if t.expert is not None}
        out: dict[str, tuple[int, ...]] = {}
        for name, shape in self.parameters().items():
            if name in stacks:
                ref = stacks[name]
                base = ref.name.rsplit(".", 1)[0]
                out.update({f"{base}.{e}.weight": ref.shape for e in range(shape[0])})
            else:
                out[name] = shape
        return out

    def read(self, name: str, source: WeightSource | None = None, rows: slice | None = None) -> torch.Tensor:
        """One parameter as float32, from `source` (default: the model's own), checked; with `rows`
        (a slice, step 1), only those rows of a matrix."""
        source = source or self.source
        shape = tuple(self.model.get_parameter(name).shape)
        if rows is not None:
            shape = (len(range(*rows.indices(shape[0]))), *shape[1:])
        try:
            t = source.get(name) if rows is None else source.rows(name, rows)
        except KeyError:
            raise MixqError(f"{self.spec}: no tensor {name} in its weights") from None
        # A copy unless the source made new memory: a view of the mapped file must not be written to.
        t = t.float() if source.fresh else t.to(torch.float32, copy=True)
        if t.numel() != torch.Size(shape).numel():
            raise MixqError(f"{self.spec}: {name} holds {t.numel()} values, the config wants {shape}")
        t = t.reshape(shape)
        if not all_finite(t):
            raise MixqError(f"model {self.spec} has NaN or infinite values in {name}")
        return t.contiguous()

    def residents_from(self, source: WeightSource | None, matrices: bool = True) -> dict[str, torch.Tensor]:
        """The parameters outside the blocks as `source` (default: the model's own) has them, with the
        output matrix (a tied head shares the embedding's): what the runner's `logits` reads. Without
        `matrices`, only the small ones (norms, biases), neither embedding nor output matrix."""
        head = f"{self.layout.head}.weight"
        names = [n for n in self.residents if n != head and (matrices or n != self.embedding_key)]
        out = dict(self.residents) if source is None else {n: self.read(n, source) for n in names}
        if not matrices:
            return {n: out[n] for n in names}
        out[head] = out[self.embedding_key] if self.tied_embedding else self.head(source)
        return out

    def block_weights(self, b: int, source: WeightSource | None = None) -> dict[str, torch.Tensor]:
        """Block `b`'s parameters (names inside the block) as float32 tensors the caller may modify."""
        if source is None and b in self._cache:
            return {k: v.clone() for k, v in self._cache[b].items()}
        prefix = self.layout.block_prefix(b)
        weights = {n: self.read(prefix + n, source) for n, _ in self.blocks()[b].named_parameters()}
        if source is None and self.in_memory:
            self._cache[b] = {k: v.clone() for k, v in weights.items()}
        return weights


def skeleton(config) -> nn.Module:
    """The model built from its config with parameters on the meta device (buffers real). Attention
    through SDPA where the family has it (softcapped attention, sinks: eager)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    error = None
    for attention in ("sdpa", "eager"):
        try:
            with init_empty_weights(include_buffers=False):
                return AutoModelForCausalLM.from_config(config, attn_implementation=attention).eval()
        except ValueError as e:
            error = e
    raise MixqError(f"model type {config.model_type!r} is not a causal language model transformers can build: "
                    f"{error}")


def materialize(loaded: LoadedModel, source: WeightSource | None = None, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A complete transformers model of `loaded` in `dtype` with the weights of `source` (default:
    its own): the one place the whole model is held, for sampling the data-free calibration text
    with a KV cache (done once and cached on disk) and for checks against transformers itself. Each
    block is cast as it is read, so no float32 copy of the whole model is made for another dtype."""
    # Its own config: a caller may change the model's attention implementation (sampling does), which
    # transformers records in the config, and the skeleton's blocks read theirs from the same object.
    model = skeleton(copy.deepcopy(loaded.config))
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in loaded.residents_from(source).items()}
    state[loaded.embedding_key] = loaded.embedding(source).to(dtype)
    for b in range(loaded.n_blocks):
        prefix = loaded.layout.block_prefix(b)
        state.update({prefix + n: w.to(dtype) for n, w in loaded.block_weights(b, source).items()})
    model.load_state_dict(state, strict=False, assign=True)
    if loaded.tied_embedding:
        model.get_submodule(loaded.layout.head).weight = model.get_submodule(loaded.layout.embedding).weight
    return model.eval().requires_grad_(False)


def all_finite(t: torch.Tensor, chunk: int = 1 << 22) -> bool:
    """No NaN or infinity in `t`, checked a slice at a time (a whole-tensor isfinite makes float-sized
    temporaries: 1.6 GB for a 152k x 1536 head)."""
    flat = t.reshape(-1)
    return all(bool(torch.isfinite(flat[i : i + chunk]).all()) for i in range(0, flat.numel(), chunk))


def _resolve(spec: str) -> tuple[str, Path | str, str | None]:
    """(canonical spec, location for transformers, GGUF file name or None)."""
    if spec in EMBEDDED:
        path = resolve_embedded(spec)
        return spec, path.parent, path.name
    if spec.startswith(HUB_PREFIX):
        return spec, spec[len(HUB_PREFIX):], None
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
        return str(path.resolve()), path, None
    if path.suffix == ".gguf":
        return str(path.resolve()), path.parent, path.name
    raise MixqError(f"{path}: expected a .gguf file or a model directory")


def model_path(spec: str) -> Path | None:
    """The file or directory a model spec reads its weights from (None for a hub id)."""
    _, location, gguf_file = _resolve(spec)
    if not Path(location).exists():
        return None
    return Path(location) / gguf_file if gguf_file else Path(location)


def source_gguf(spec: str) -> Path | None:
    """The GGUF file a model spec names (directly or as an embedded default), else None."""
    if spec in EMBEDDED:
        path = resolve_embedded(spec)
        return path if path.suffix == ".gguf" else None
    path = Path(spec)
    return path if path.suffix == ".gguf" and path.is_file() else None


def load_model(spec: str, in_memory: bool = False) -> LoadedModel:
    """Resolve `spec` and load its skeleton, tokenizer and resident weights, with one clear error for
    anything wrong."""
    import transformers

    transformers.logging.set_verbosity_error()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    spec, location, gguf_file = _resolve(spec)
    path = Path(location) / gguf_file if gguf_file else None
    reader = _read_gguf(path) if path else None
    with gguf_metadata_parsed_once(path, reader):
        return _load(spec, location, gguf_file, reader, in_memory)


def _load(spec: str, location: Path | str, gguf_file: str | None, reader, in_memory: bool) -> LoadedModel:
    from transformers import AutoConfig, AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        config = AutoConfig.from_pretrained(str(location), **kwargs)
    except Exception as e:
        raise MixqError(f"cannot read the model config of {spec}: {e}") from None
    fam = family(config.model_type)
    if not fam.tested:
        log.warning("model type %s is not among those mixq is tested on; trying it", config.model_type)
    # The eager expert loop indexes each expert's matrix, which is how mixq sees routed tokens.
    config._experts_implementation = "eager"
    model = skeleton(config)
    model.eval().requires_grad_(False)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(location), **kwargs)
    except Exception as e:
        raise MixqError(f"cannot load the tokenizer of {spec}: {e}") from None
    if gguf_file:
        source: WeightSource = GGUFSource(Path(location) / gguf_file, reader, model, config.model_type)
    elif spec.startswith(HUB_PREFIX):
        from huggingface_hub import snapshot_download

        source = SafetensorsSource(Path(snapshot_download(str(location), allow_patterns=["*.json", "*.safetensors"])))
    else:
        source = SafetensorsSource(Path(location))

    text_config = config.get_text_config()
    blocks = find_blocks(model, text_config.num_hidden_layers)
    embedding = module_name(model, model.get_input_embeddings(), "input embedding")
    head = module_name(model, model.get_output_embeddings(), "output layer")
    tied = bool(getattr(text_config, "tie_word_embeddings", False)) and f"{head}.weight" not in source
    if tied:  # one parameter in the skeleton too, so that it is counted and stored once
        model.get_submodule(head).weight = model.get_submodule(embedding).weight
    layout = Layout(blocks, embedding, find_final_norm(model, blocks), head, tied, ())
    block_params = f"{blocks}."
    loaded = LoadedModel(spec, model, tokenizer, fam, source, layout, {}, in_memory)
    # An untied embedding is read only to embed windows, an untied head only to make logits: each
    # is read then, not kept.
    read_on_use = {f"{head}.weight"} | (set() if tied else {f"{embedding}.weight"})
    for name, _ in model.named_parameters(remove_duplicate=False):
        if name.startswith(block_params) or name in read_on_use:
            continue
        loaded.residents[name] = loaded.read(name)
    if tied:
        loaded.residents[f"{head}.weight"] = loaded.residents[f"{embedding}.weight"]
    from mixq.runner import discover_block_layouts, release_memory

    loaded.layout = Layout(blocks, embedding, layout.final_norm, head, tied, discover_block_layouts(loaded))
    release_memory()  # parsing metadata and probing a block leave ~0.2 GB of freed heap behind
    log.info("loaded %s (%s, %d blocks)", spec, config.model_type, loaded.n_blocks)
    return loaded


def _read_gguf(path: Path):
    """The GGUF file's reader (its header checked first), or one clear error."""
    reader = read_gguf(path)
    if "general.architecture" not in reader.fields:
        raise MixqError(f"cannot read GGUF file {path}: it has no general.architecture")
    return reader
