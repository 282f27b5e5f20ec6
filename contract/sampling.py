"""How an executor samples a request's tokens: the sampling part of the scheduler -> executor contract."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How the executor samples this request's tokens. Opaque to every policy."""

    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # nucleus mass in (0, 1]
    top_k: int = 0  # 0 = disabled
    seed: int | None = None  # per-request seed: same seed, same tokens
    stop_token_ids: tuple[int, ...] = ()  # the core finishes a request on these...
    ignore_eos: bool = False  # ...unless this is set (trace replay / benchmarks)

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
