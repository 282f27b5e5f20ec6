"""The scheduler -> executor contract: one step's plan, and what the executor reports back.

The scheduler never hands its mutable ``Request`` objects to a runner. A plan
sends a request's full data once (``NewRequestSlice``), then only deltas
(``CachedRequestSlice``). Finished and preempted ids ride in the next plan so the
executor can drop its per-request state without an extra RPC.

Every field has a default so adding one does not break callers.

NOTE: the values made per decode per step (``CachedRequestSlice`` and
the scheduler's ``TokenEvent``), and ``PlanStats`` made every step, are ``NamedTuple``s, not
frozen dataclasses: they are just as immutable, and building one costs 0.3 us
instead of 1 us, which is most of a decode's cost in the simulator and the live
scheduler's decision time. Positional construction order is part of their contract.

Stdlib only, importing nothing of this project but ``contract``: the scheduler, the
executor, the simulator and the wire codec all meet here.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import NamedTuple

from contract.sampling import SamplingParams


@dataclass(frozen=True, slots=True)
class NewRequestSlice:
    """First appearance of a request on an executor (or after a preemption)."""

    req_id: str = ""
    token_ids: tuple[int, ...] = ()  # prompt (+ outputs so far, after a recompute); () in the simulator
    num_tokens: int = 0  # len(token_ids) even when ids are not carried (simulator)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    block_ids: tuple[int, ...] = ()  # KV placement for the whole prompt, in token order
    # a cached prefix (prefix caching): whole blocks whose KV another request computed; the
    # first num_computed_tokens / block_size block_ids are shared, read-only
    num_computed_tokens: int = 0
    num_new_tokens: int = 0  # tokens of token_ids to compute in this step
    sample: bool = False  # this chunk completes the sequence: sample a token
    # prompt tokens at the start of token_ids (the rest are outputs, after a recompute); 0 = all of them.
    # The executor needs it for penalties, min_tokens and prompt logprobs (contract/sampling.py).
    num_prompt_tokens: int = 0


class CachedRequestSlice(NamedTuple):
    """A request the executor already knows: a prefill continuation or a decode."""

    req_id: str = ""
    new_block_ids: tuple[int, ...] = ()  # blocks appended since the last plan
    num_computed_tokens: int = 0  # KV tokens before this step (lets the executor check it is in sync)
    num_new_tokens: int = 0  # 1 for a decode; a chunk length for a paused prefill
    is_decode: bool = False  # decode: the new token is the last sampled one
    sample: bool = False  # this chunk completes the sequence (always True for a decode)


class PlanStats(NamedTuple):
    """What the policy decided, for telemetry and tests. Not needed to execute.

    A ``NamedTuple`` for the same reason as the slices: one is built every step.
    """

    num_prefill_tokens: int = 0  # tokens in prefill chunks
    num_decodes: int = 0  # decode tokens (critical + non-critical)
    num_critical_decodes: int = 0  # SLAI: decodes past their last schedulable time
    num_noncritical_decodes: int = 0
    num_preempted: int = 0  # requests preempted while building this plan
    kv_used_fraction: float = 0.0  # after this plan's allocations
    offset: float = 0.0  # SLAI's delta in force for this step (0 for other policies)
    num_waiting: int = 0  # waiting + paused prefills after this plan
    num_running: int = 0  # requests holding KV after this plan
    prefix_cache_queries: int = 0  # prompt tokens of the requests admitted by this plan (prefix caching on)
    prefix_cache_hits: int = 0  # of those, tokens found in the prefix cache (not computed)


@dataclass(frozen=True, slots=True)
class BatchPlan:
    """One iteration's work for one executor."""

    step_id: int = 0
    new: tuple[NewRequestSlice, ...] = ()
    cached: tuple[CachedRequestSlice, ...] = ()
    finished_ids: tuple[str, ...] = ()  # release these (finished or aborted since last plan)
    preempted_ids: tuple[str, ...] = ()  # release these too; they come back as `new` later
    stats: PlanStats = field(default_factory=PlanStats)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.new) + sum(s.num_new_tokens for s in self.cached)

    @property
    def num_seqs(self) -> int:
        return len(self.new) + len(self.cached)

    @property
    def is_empty(self) -> bool:
        """No forward pass needed (there may still be ids to release)."""
        return not self.new and not self.cached

    def sampling_ids(self) -> tuple[str, ...]:
        """Requests that must get a sampled token in this step's result."""
        # list comprehensions, not generators: called once per simulated step, and twice as fast
        # (a CachedRequestSlice by index: c[0] req_id, c[5] sample)
        if not self.new:
            return tuple([c[0] for c in self.cached if c[5]])
        return tuple([s.req_id for s in self.new if s.sample] + [c[0] for c in self.cached if c[5]])

    def scheduled_ids(self) -> tuple[str, ...]:
        return tuple(s.req_id for s in self.new) + tuple(s.req_id for s in self.cached)


@dataclass(frozen=True, slots=True)
class StepResult:
    """What a runner reports for a plan: sampled tokens and measured durations."""

    step_id: int = 0
    req_ids: tuple[str, ...] = ()  # requests that sampled a token this step
    token_ids: tuple[int, ...] = ()  # [len(req_ids)], aligned with req_ids
    prepare_ns: int = 0  # building inputs from the plan
    forward_ns: int = 0  # the model forward pass
    sample_ns: int = 0  # sampling
    total_ns: int = 0  # the runner took the plan up -> its result was ready
    idle_ns: int = 0  # the executor's wait for this plan since its previous step ended (0 if unknown)
    # () unless a sampling request asked for logprobs; else aligned with req_ids: a
    # contract.logprobs.SampleLogprobs or None per request (opaque to the scheduler's core)
    logprobs: tuple = ()


def _fast_init(cls: type) -> type:
    """Give the frozen, slotted dataclass ``cls`` an ``__init__`` that stores through its slots' descriptors.

    NOTE: a plan and a result are built every step (the simulator's hot path). The generated ``__init__`` of a
    frozen class stores each field with ``object.__setattr__(self, name, value)``, which looks the name up
    again; the slot descriptor's ``__set__`` does the same store at about half the cost of the whole call.
    Same signature, defaults and default factories as the generated one (built from ``fields(cls)``).
    """
    ns: dict[str, object] = {"_MISSING": MISSING}
    params, body = [], []
    for i, f in enumerate(fields(cls)):
        ns[f"_set{i}"] = getattr(cls, f.name).__set__
        if f.default is not MISSING:
            ns[f"_dflt{i}"] = f.default
            params.append(f"{f.name}=_dflt{i}")
            body.append(f"    _set{i}(self, {f.name})")
        elif f.default_factory is not MISSING:
            ns[f"_fact{i}"] = f.default_factory
            params.append(f"{f.name}=_MISSING")
            body.append(f"    _set{i}(self, _fact{i}() if {f.name} is _MISSING else {f.name})")
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: every field needs a default")
    # the source is made only of the class's own field names (as dataclasses itself builds __init__)
    exec(f"def __init__(self, {', '.join(params)}):\n" + "\n".join(body) + "\n", ns)  # noqa: S102
    init = ns["__init__"]
    init.__qualname__ = f"{cls.__name__}.__init__"
    cls.__init__ = init
    return cls


_fast_init(BatchPlan)
_fast_init(StepResult)
