"""RAD: Resource-Aware Dynamic scheduling, as reconstructed in docs/rad.md.

The paper's text was not available; its abstract names two principles,
*optimal tiling* and *dynamic resource allocation*. This policy implements them
as follows (our reconstruction, made precise):

Tiling. The step budget is ``B = floor(token_budget / tile_size) * tile_size``
and every step is filled to exactly ``B`` tokens whenever that much admissible
work exists (chunks take exactly the budget that is left): the policy is
work-conserving at the tile the cost model says is efficient.

Dynamic allocation: a MaxWeight (backpressure) split of each step between the
two classes of work, with weights in *requests*, the unit in which a step makes
progress:

* ``w_d`` = number of decode-ready requests (each decode token advances one);
* ``w_p`` = prefill backlog in tokens / mean prompt length (the number of
  mean-sized requests that prefill tokens stand for; the mean is a running
  estimate over arrivals).

MaxWeight maximises ``w_d * x_d + w_p * x_p / mean_prompt`` over the step's
feasible set ``x_d + x_p <= B, x_d <= min(decode-ready, max_decodes)``. The
objective is linear, so the optimum is a vertex: if ``w_d >= w_p`` every
decode-ready request gets its token (up to the cap) and prefill takes the rest;
otherwise prefill takes the budget first and decodes take what is left.
Decodes are served longest-waiting first (oldest last token), which bounds each
request's gap. KV shortage preempts the most recent paused prefill, then the
decode itself, as SLAI does.

Why it is throughput-optimal, and when: see docs/rad.md (work conservation at a
fixed tile gives stability for ``lambda * (mean prompt + mean output) < B / T(B)``
in the single-engine model; the MaxWeight split keeps KV memory draining so the
bound is not lost to memory when decodes pile up).
"""

from __future__ import annotations

from scheduler_svc.core.batch_builder import BatchBuilder
from scheduler_svc.core.policies.paused_prefills import PausedPrefillPolicy
from scheduler_svc.core.request import Request


class RadPolicy(PausedPrefillPolicy):
    name = "rad"

    def __init__(self, config=None) -> None:
        super().__init__(config)
        self._prompt_sum = 0
        self._prompt_n = 0
        self.last_split = "decode-first"  # for telemetry and tests

    @property
    def budget(self) -> int:
        c = self.config
        return max(c.tile_size, (c.token_budget // c.tile_size) * c.tile_size)

    @property
    def mean_prompt(self) -> float:
        return self._prompt_sum / self._prompt_n if self._prompt_n else 1.0

    def on_arrival(self, req: Request, now: float) -> None:
        self._prompt_sum += req.num_prompt_tokens
        self._prompt_n += 1
        super().on_arrival(req, now)

    def on_step_end(self, served: list[Request], now: float) -> None:
        self.track_served(served)

    def weights(self) -> tuple[float, float]:
        """(w_d, w_p) in requests, as in the module docstring."""
        core = self.core
        decode_ready = sum(1 for r in core.running.values() if r.is_decode)
        prefill_tokens = core.num_waiting_tokens + sum(r.num_uncomputed_tokens for r in self.paused)
        return float(decode_ready), prefill_tokens / self.mean_prompt

    def _decodes(self, b: BatchBuilder) -> None:
        cap = min(self.config.max_decodes, b.token_budget)
        ready = [r for r in self.core.running.values() if r.is_decode and not b.is_scheduled(r)]
        ready.sort(key=lambda r: (r.last_token_s if r.last_token_s is not None else -1.0, r.seq))
        n = 0
        for req in ready:
            if n >= cap or b.num_tokens >= b.token_budget:
                break
            if req.req_id in self.core.running and b.add_decode(req, self._victim):
                n += 1

    def schedule(self, b: BatchBuilder, now: float) -> None:
        b.token_budget = self.budget
        w_d, w_p = self.weights()
        if w_d >= w_p:
            self.last_split = "decode-first"
            self._decodes(b)
            self.schedule_prefills(b, now)
        else:
            self.last_split = "prefill-first"
            self.schedule_prefills(b, now)
            self._decodes(b)
