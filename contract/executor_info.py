"""What an executor tells the scheduler about itself (``Info`` / ``Warmup``)."""

from __future__ import annotations

from dataclasses import dataclass

FAKE_MODEL = "fake"  # the model a FakeRunner reports: no model runs, steps take what its cost model says


@dataclass(frozen=True, slots=True)
class ExecutorInfo:
    """The executor's model, device and KV geometry, as its runner reports them."""

    model: str = ""  # preset name, model folder, or FAKE_MODEL
    device: str = "cpu"  # "cpu", "cuda:0", ...
    dtype: str = "float32"
    attention_backend: str = "sdpa"  # "flash-attn" | "sdpa" | "fake"
    block_size: int = 16
    num_blocks: int = 0
    max_model_len: int = 0  # longest sequence (prompt + outputs) the runner accepts
    vocab_size: int = 0
    eos_token_ids: tuple[int, ...] = ()
    num_layers: int = 0
    kv_bytes_per_block: int = 0
    ready: bool = False  # warmed up: the KV cache exists and a step can run

    @property
    def runs_model_on_cpu(self) -> bool:
        """A model's forward runs on this host's CPU (not a GPU, not a fake runner's sleep)."""
        return self.device == "cpu" and self.model != FAKE_MODEL
