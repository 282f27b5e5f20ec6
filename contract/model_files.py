"""Where the embedded default model's files live: the executor converts them once, the gateway
reads its tokenizer from the same folder, and ``slai-serve up`` makes sure they exist."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
MODEL_CACHE_ENV = "SLAI_MODEL_CACHE"  # overrides the folder


def default_model_dir() -> Path:
    """The converted default model's folder (``$SLAI_MODEL_CACHE`` overrides)."""
    root = os.environ.get(MODEL_CACHE_ENV)
    if root:
        return Path(root).expanduser()
    return Path.home() / ".cache" / "slai-serve" / "models" / DEFAULT_MODEL_NAME


def is_converted(path: Path) -> bool:
    """The folder holds a complete conversion (weights, config and tokenizer)."""
    return all((path / name).is_file() for name in ("config.json", "model.safetensors", "tokenizer.json"))
