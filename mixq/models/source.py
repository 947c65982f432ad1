"""Where a model's weights are read from, one tensor at a time, never the whole model at once.

A source maps Hugging Face parameter names to tensors read on demand from memory-mapped files:
- `SafetensorsSource`: a Hugging Face directory (one `model.safetensors` or shards with an index);
  tensors come back in their stored dtype (bf16 stays bf16 until a stage computes with it);
- `GGUFSource`: a GGUF file; each tensor is dequantized alone (float32) and passed through
  transformers' own per-architecture processor (q/k row order, Gemma's norm offset), so the
  values equal what `from_pretrained(gguf_file=...)` would give.
"""

from __future__ import annotations

import contextlib
import copy
import json
import mmap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from mixq.errors import MixqError


@contextlib.contextmanager
def gguf_metadata_parsed_once(path: Path | None = None, reader=None) -> Iterator[None]:
    """Within the block, a GGUF file's metadata is parsed once, not once per config, tokenizer and
    tensor map (each parse reads every vocabulary entry in Python: ~3 s for SmolLM2's 49k, ~20 s for
    a 152k vocabulary); `reader`, mixq's checked reader of `path`, stands in for gguf's own there.
    gguf-py's tensor-name map is built once per architecture, not once per module of the model
    (transformers' name mapping recurses over ~400 of them). transformers imports its parser,
    gguf's reader and the name map at each call, so patching the modules suffices."""
    import functools

    import gguf
    import transformers.modeling_gguf_pytorch_utils as utils

    originals = {(utils, "load_gguf_checkpoint"): utils.load_gguf_checkpoint,
                 (gguf, "GGUFReader"): gguf.GGUFReader,
                 (gguf, "get_tensor_name_map"): gguf.get_tensor_name_map}
    parse_gguf, gguf_reader, name_map = originals.values()
    cache: dict[str, dict] = {}

    def parse(path, return_tensors=False, **kwargs):
        if return_tensors:
            return parse_gguf(path, return_tensors=return_tensors, **kwargs)
        key = str(path)
        if key not in cache:
            cache[key] = parse_gguf(path, return_tensors=False, **kwargs)
        return copy.deepcopy(cache[key])

    def read(file, *args, **kwargs):
        same = reader is not None and not args and not kwargs and Path(file).resolve() == Path(path).resolve()
        return reader if same else gguf_reader(file, *args, **kwargs)

    utils.load_gguf_checkpoint, gguf.GGUFReader = parse, read
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        for (module, name), value in originals.items():
            setattr(module, name, value)


class WeightSource:
    """Tensors by parameter name; `names` lists every tensor the source holds."""

    names: set[str]
    fresh = False  # True when `get` returns new memory (else it may be a view of a mapped file)

    def get(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def rows(self, name: str, rows: slice) -> torch.Tensor:
        """Rows `rows` (a slice, step 1) of a matrix. Sources that can read a slice alone override
        this; here the whole matrix is read."""
        return self.get(name)[rows]

    def expert_keys(self, name: str) -> list[list[str]] | None:
        """Each expert's keys in the source where it lists an expert stack's experts as linears of
        their own, else None."""
        return None

    def checkpoint_key(self, name: str) -> str:
        """The key parameter `name` is stored under in the source (what other engines load it by)."""
        return name

    def __contains__(self, name: str) -> bool:
        return name in self.names


class SafetensorsSource(WeightSource):
    def __init__(self, directory: Path):
        directory = Path(directory)
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                files = sorted(set(weight_map.values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise MixqError(f"cannot read {index}: {e}") from None
            if not all(isinstance(f, str) and Path(f).name == f for f in files):
                raise MixqError(f"{index} names weight files outside its directory")
        elif (directory / "model.safetensors").is_file():
            files = ["model.safetensors"]
        elif any(directory.glob("*.bin")) or any(directory.glob("*.pt")):
            raise MixqError(f"{directory} holds only pickled weights (*.bin), which mixq never loads; convert "
                            "them to safetensors first (model.save_pretrained(dir, safe_serialization=True))")
        else:
            raise MixqError(f"{directory} holds no model.safetensors")
        self._where: dict[str, Path] = {}
        for file in files:
            try:
                with safe_open(str(directory / file), framework="pt") as handle:
                    keys = handle.keys()
            except Exception as e:
                raise MixqError(f"cannot read {directory / file}: {e}") from None
            self._where.update({key: directory / file for key in keys})
        self.names = set(self._where)

    def __contains__(self, name: str) -> bool:
        try:
            self.get(name)
            return True
        except KeyError:
            return False

    def get(self, name: str) -> torch.Tensor:
        return self._read(name, None)

    def rows(self, name: str, rows: slice) -> torch.Tensor:
        return self._read(name, rows)

    def checkpoint_key(self, name: str) -> str:
        renamed = name.replace(".mlp.", ".block_sparse_moe.")  # Mixtral's checkpoint name of its MoE
        return renamed if name not in self._where and renamed in self._where else name

    def _read(self, name: str, rows: slice | None) -> torch.Tensor:
        key = self.checkpoint_key(name)
        if key in self._where:
            # A view of the file, mapped while the view lives: the file is opened per tensor so that
            # pages read once do not stay resident (a handle kept open keeps every page it touched,
            # the whole model by the end of a run).
            try:
                with safe_open(str(self._where[key]), framework="pt") as f:
                    return f.get_tensor(key) if rows is None else f.get_slice(key)[rows]
            except Exception as e:  # the file changed since it was opened, or lies about a tensor
                raise MixqError(f"cannot read {key} from {self._where[key]}: {e}") from None
        stack = self._stack(name)
        return stack if rows is None else stack[rows]

    def _stack(self, name: str) -> torch.Tensor:
        experts = self.expert_keys(name)
        if experts is None:
            raise KeyError(name)
        return torch.stack([torch.cat([self.get(key) for key in keys]) for keys in experts])

    def expert_keys(self, name: str) -> list[list[str]] | None:
        """For an expert stack transformers fuses at load from a checkpoint that lists experts as
        linears (Qwen-MoE: experts.E.{gate,up,down}_proj; Mixtral: block_sparse_moe.experts.E.{w1,w3,w2}),
        each expert's checkpoint keys, whose rows in order are the expert's; None for any other name."""
        prefix, _, kind = name.rpartition(".")
        for path, parts in ((prefix, {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}),
                            (prefix.replace(".mlp.", ".block_sparse_moe."), {"gate_up_proj": ("w1", "w3"),
                                                                             "down_proj": ("w2",)})):
            keys = parts.get(kind, ())
            if keys and f"{path}.0.{keys[0]}.weight" in self._where:
                n = 0
                while f"{path}.{n}.{keys[0]}.weight" in self._where:
                    n += 1
                return [[f"{path}.{e}.{key}.weight" for key in keys] for e in range(n)]
        return None


ROW_READABLE = ("token_embd.weight", "output.weight")  # GGUF tensors read a slice of rows at a time
DEQUANTIZE_ROWS = 2048  # rows dequantized at once: gguf-py's temporaries are several times their output


def dequantize_rows(data: np.ndarray, qtype) -> np.ndarray:
    """gguf-py's dequantization, a slice of rows at a time into one float32 array."""
    import gguf

    if data.ndim != 2 or data.shape[0] <= DEQUANTIZE_ROWS:
        return gguf.quants.dequantize(data, qtype)
    first = gguf.quants.dequantize(data[:DEQUANTIZE_ROWS], qtype)
    out = np.empty((data.shape[0], first.shape[1]), dtype=np.float32)
    out[:DEQUANTIZE_ROWS] = first
    for start in range(DEQUANTIZE_ROWS, data.shape[0], DEQUANTIZE_ROWS):
        out[start : start + DEQUANTIZE_ROWS] = gguf.quants.dequantize(data[start : start + DEQUANTIZE_ROWS], qtype)
    return out


def file_mapping(array: np.ndarray) -> mmap.mmap | None:
    """The memory map under a view of a GGUF reader's data, however many views deep (the reader's
    own data is a plain view of its np.memmap), or None for data in memory."""
    while array is not None:
        mapping = getattr(array, "_mmap", None)
        if mapping is not None:
            return mapping
        array = getattr(array, "base", None)
    return None


def _drop_pages(t) -> None:
    """Let the kernel drop the mapped file pages of a GGUF tensor just dequantized: they stay in
    the page cache but leave this process's resident set, which would otherwise grow to the whole
    file over a run."""
    mapping = file_mapping(t.data)
    if mapping is None:
        return
    start = t.data_offset // mmap.PAGESIZE * mmap.PAGESIZE
    mapping.madvise(mmap.MADV_DONTNEED, start, t.data_offset + int(t.n_bytes) - start)


class GGUFSource(WeightSource):
    fresh = True

    def __init__(self, path: Path, reader, skeleton: torch.nn.Module, model_type: str):
        import transformers.modeling_gguf_pytorch_utils as utils
        from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

        config = utils.load_gguf_checkpoint(str(path), return_tensors=False)["config"]
        self.arch = str(reader.fields["general.architecture"].contents())  # llama.cpp's name of it
        self._processor = TENSOR_PROCESSORS.get(self.arch, TensorProcessor)(config=config)
        to_hf = get_gguf_hf_weights_map(skeleton, self._processor, model_type=model_type)
        self._tensors: dict[str, list] = {}  # several GGUF tensors may make one (experts' gate and up)
        for t in reader.tensors:
            # Expert stacks are mapped without their ".weight" (as transformers' processors look them up).
            hf = to_hf.get(t.name) or to_hf.get(t.name.removesuffix(".weight"))
            if hf is not None:
                self._tensors.setdefault(hf, []).append(t)
        # Only the tensors are read from here on; the parsed metadata (for a 152k vocabulary about
        # 0.5 GB of small arrays) is left to the garbage collector.
        reader.fields.clear()
        self._to_hf = to_hf
        self.names = set(self._tensors)

    def get(self, name: str) -> torch.Tensor:
        return self._read(name, None)

    def rows(self, name: str, rows: slice) -> torch.Tensor:
        """Only the rows' blocks are dequantized for the token embedding and the output matrix (no
        architecture's processor changes their rows); any other tensor is read whole (processors
        reorder q/k rows by head, merge experts)."""
        parts = self._tensors[name]
        if len(parts) == 1 and parts[0].name in ROW_READABLE:
            return self._read(name, rows)
        return self.get(name)[rows]

    def row_origins(self, name: str) -> tuple[list[tuple[str, tuple[int, ...]]], torch.Tensor]:
        """Where each row of parameter `name` comes from: its GGUF tensors (name, rows shape without
        the row width) and, shaped like `name` without its last dimension, each row's number, counted
        across those tensors in order. Found by giving transformers' processor numbered rows, so
        whatever it does to them (merging experts' gate and up) is seen, not restated."""
        scratch: dict = {"tensors": {}}
        parts, start = [], 0
        for t in self._tensors[name]:
            rows_shape = tuple(int(n) for n in reversed(t.shape.tolist()))[:-1]
            count = int(np.prod(rows_shape))
            if start + count > 1 << 24:  # float32 holds every integer below this
                raise MixqError(f"{name} has over 16.7M rows in its GGUF tensors")
            numbers = np.arange(start, start + count, dtype=np.float32).reshape(*rows_shape, 1)
            result = self._processor.process(weights=numbers, name=t.name, tensor_key_mapping=self._to_hf,
                                             parsed_parameters=scratch)
            parts.append((t.name, rows_shape))
            start += count
        out = scratch["tensors"].get(name)
        out = torch.as_tensor(np.asarray(result.weights)) if out is None else torch.as_tensor(out)
        return parts, out[..., 0].round().long()

    def _read(self, name: str, rows: slice | None) -> torch.Tensor:
        scratch: dict = {"tensors": {}}
        for t in self._tensors[name]:
            data = t.data if rows is None else t.data[rows]
            result = self._processor.process(weights=dequantize_rows(data, t.tensor_type), name=t.name,
                                             tensor_key_mapping=self._to_hf, parsed_parameters=scratch)
        out = scratch["tensors"].get(name)  # processors that merge tensors (MoE experts) leave them here
        if out is None:
            weights = result.weights
            if not (weights.flags.owndata and weights.flags.writeable and weights.flags.c_contiguous):
                weights = np.array(weights)  # an F32 tensor comes back as the read-only mapped file itself
            out = torch.from_numpy(weights)
        for t in self._tensors[name]:
            _drop_pages(t)
        return out
