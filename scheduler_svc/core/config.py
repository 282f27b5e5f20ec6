"""Scheduler configuration: one frozen dataclass, paper values as defaults.

Policies read the fields they need; variants in the registry override some.
Every field can be set from the command line as ``--set name=value``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

# min_prefill_chunk's value for an executor that runs a model on a CPU (one KV block: a prompt still moves
# every step while steps shrink to fit a TBT objective; docs/scheduler.md, "Small steps on a CPU")
CPU_MIN_PREFILL_CHUNK = 16


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    # --- shared mechanics (every policy) ---
    token_budget: int = field(default=512, metadata={"help": "max tokens per iteration (tau)"})
    max_num_seqs: int = field(default=128, metadata={"help": "max requests holding KV (alpha)"})
    max_decodes: int = field(default=128, metadata={"help": "max decode tokens per iteration (beta); SLAI, EDF, RAD"})
    max_model_len: int = field(default=8192, metadata={"help": "prompt + max_tokens above this is ignored"})
    block_size: int = field(default=16, metadata={"help": "tokens per KV block"})
    watermark: float = field(default=0.01, metadata={"help": "free fraction of blocks kept at admission"})
    enable_prefix_caching: bool = field(default=True, metadata={
        "help": "share the KV of full blocks between requests with the same prefix (needs token ids)"})
    default_tbt_s: float = field(default=0.2, metadata={"help": "TBT SLO of a request that carries none"})
    default_ttft_s: float = field(default=0.5, metadata={"help": "TTFT objective of a request that carries none (EDF laxity)"})
    # --- waiting-queue order ---
    fcfs: bool = field(default=False, metadata={"help": "True: arrival order; False: shortest prompt first"})
    user_priority: bool = field(default=True, metadata={"help": "with SPF, paying requests first"})
    # --- SLAI ---
    fixed_offset: bool = field(default=False, metadata={"help": "SLAI: always use below_memory_limit_offset"})
    below_memory_limit_offset: float = field(default=5.0, metadata={"help": "SLAI delta below memory_limit"})
    above_memory_limit_offset: float = field(default=10.0, metadata={"help": "SLAI delta at/above memory_limit"})
    memory_limit: float = field(default=0.96, metadata={
        "help": "KV used fraction that switches SLAI's offset (slai-adaptive: from it on, no decode is deferred)"})
    mean_estimator: str = field(default="cumulative", metadata={"help": "batch-time estimator: cumulative | ewma(a)"})
    # --- vLLM-style baseline ---
    max_num_batched_tokens: int = field(default=8192, metadata={"help": "vllm: max prompt tokens in one prefill batch"})
    # --- EDF baseline ---
    edf_lookahead: float = field(default=2.0, metadata={"help": "edf: a decode is due when deadline - now <= this x mean batch"})
    edf_prefill_order: str = field(default="spf", metadata={"help": "edf: prefill order spf | fcfs | laxity"})
    # --- slai-adaptive ---
    max_token_budget: int = field(default=2048, metadata={"help": "slai-adaptive: largest step, in tokens"})
    tile_slack_fraction: float = field(default=0.8, metadata={
        "help": "slai-adaptive: a step may take this share of the tightest decode slack"})
    aging_tokens_per_s: float = field(default=100.0, metadata={
        "help": "slai-adaptive: SPF aging, prompt tokens forgiven per second of waiting"})
    kv_step_low: float = field(default=0.5, metadata={
        "help": "slai-adaptive: KV used fraction above which the step budget shrinks from max_token_budget"})
    kv_step_high: float = field(default=0.95, metadata={
        "help": "slai-adaptive: KV used fraction at which the step budget reaches kv_min_token_budget"})
    kv_min_token_budget: int = field(default=384, metadata={
        "help": "slai-adaptive: step budget at kv_step_high KV use (>= max_token_budget: no KV cap)"})
    min_prefill_chunk: int = field(default=-1, metadata={
        "help": "slai-adaptive: >0 lets a slack-sized step fall below token_budget, to the ready decodes plus "
                "the prefill that fits the slack but at least this many prefill tokens (for hosts where a "
                "token_budget step outlasts a TBT objective, such as CPUs); 0: token_budget is the floor; "
                f"-1 (auto): the scheduler service picks {CPU_MIN_PREFILL_CHUNK} for an executor running a model "
                "on a CPU, else 0 (the simulator: 0)"})
    ttft_urgent_fraction: float = field(default=0.5, metadata={
        "help": "slai-adaptive: a request with a TTFT objective jumps the prefill order once it has waited "
                "this share of the objective"})
    # --- RAD ---
    tile_size: int = field(default=16, metadata={"help": "rad: budget and chunks are multiples of this"})
    # --- 2025-2026 baselines (fairbatching and qoserve also use max_token_budget, tile_slack_fraction) ---
    min_token_budget: int = field(default=128, metadata={
        "help": "fairbatching, qoserve: smallest slack-sized step, in tokens"})
    hybrid_alpha: float = field(default=1.0, metadata={
        "help": "qoserve: weight of the predicted prefill time in the hybrid priority (0 = EDF on TTFT deadlines)"})
    relegation: bool = field(default=True, metadata={
        "help": "qoserve: relegate free-tier requests predicted to miss their TTFT objective"})

    def __post_init__(self) -> None:
        positive = ("token_budget", "max_num_seqs", "max_decodes", "max_model_len", "block_size",
                    "max_num_batched_tokens", "tile_size", "kv_min_token_budget", "min_token_budget")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.memory_limit <= 1:
            raise ValueError(f"memory_limit must be in (0, 1], got {self.memory_limit}")
        if not 0 <= self.kv_step_low < self.kv_step_high <= 1:
            raise ValueError(f"need 0 <= kv_step_low < kv_step_high <= 1, got {self.kv_step_low}, {self.kv_step_high}")
        if not 0 <= self.ttft_urgent_fraction <= 1:
            raise ValueError(f"ttft_urgent_fraction must be in [0, 1], got {self.ttft_urgent_fraction}")
        if self.default_tbt_s <= 0 or self.default_ttft_s <= 0:
            raise ValueError("default_tbt_s and default_ttft_s must be > 0")
        if self.min_prefill_chunk < -1:
            raise ValueError(f"min_prefill_chunk must be >= 0, or -1 for auto, got {self.min_prefill_chunk}")
        if self.hybrid_alpha < 0:
            raise ValueError(f"hybrid_alpha must be >= 0, got {self.hybrid_alpha}")
        if self.edf_prefill_order not in ("spf", "fcfs", "laxity"):
            raise ValueError(f"edf_prefill_order must be spf, fcfs or laxity, got {self.edf_prefill_order!r}")

    def replace(self, **changes: object) -> SchedulerConfig:
        return dataclasses.replace(self, **changes)

    def with_overrides(self, pairs: list[str] | tuple[str, ...]) -> SchedulerConfig:
        """Apply ``name=value`` strings, converting to each field's type."""
        types = {f.name: f.type for f in dataclasses.fields(self)}
        changes: dict[str, object] = {}
        for pair in pairs:
            name, sep, raw = pair.partition("=")
            name = name.strip().replace("-", "_")
            if not sep or name not in types:
                raise ValueError(f"bad setting {pair!r}: expected name=value with name in {sorted(types)}")
            kind = types[name]
            if kind in ("bool", bool):
                low = raw.strip().lower()
                if low not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError(f"{name} expects true/false, got {raw!r}")
                changes[name] = low in ("1", "true", "yes")
            elif kind in ("int", int):
                changes[name] = int(raw)
            elif kind in ("float", float):
                changes[name] = float(raw)
            else:
                changes[name] = raw.strip()
        return self.replace(**changes)
