"""Logprobs ride from the executor through the scheduler to the Submit stream unchanged (issue 15).

The core attaches each token's value to its event; the dispatcher keeps them aligned when it coalesces
events the client has not taken; requests that did not ask get none.
"""

from __future__ import annotations

from scheduler_svc.core.request import Request
from scheduler_svc.core.token_event import TokenEvent
from scheduler_svc.dispatcher import RequestStream
from tests.scheduler_svc.helpers import (
    RecordingRunner,
    collect,
    start_stack,
    submit_msg,
    tokens_of,
)


async def test_logprobs_reach_the_stream_aligned_with_tokens_and_prompt_once():
    st = await start_stack([RecordingRunner()])
    try:
        asking = submit_msg("asking", prompt_len=20, max_tokens=5)
        asking.sampling.logprobs = 2
        asking.sampling.prompt_logprobs = 0
        plain = submit_msg("plain", prompt_len=20, max_tokens=5)
        events = await collect(st.stub, asking)
        plain_events = await collect(st.stub, plain)
    finally:
        await st.close()
    tokens = tokens_of(events)
    lps = [lp for ev in events for lp in ev.logprobs]
    assert len(lps) == len(tokens) == 5
    assert [lp.token.token_id for lp in lps] == tokens and all(len(lp.token.top_token_ids) == 2 for lp in lps)
    assert [lp.has_prompt for lp in lps] == [True, False, False, False, False]
    assert [t.token_id for t in lps[0].prompt] == list(asking.prompt_token_ids)[1:]
    assert not any(ev.logprobs for ev in plain_events)


async def test_coalesced_events_keep_logprobs_aligned():
    s = RequestStream(Request(req_id="r", num_prompt_tokens=3, max_tokens=9, arrival_s=0.0))
    s.put(TokenEvent("r", (1,), None, 1.0, True, 3, 1))  # no logprobs (e.g. only prompt ones were asked for)
    s.put(TokenEvent("r", (2,), None, 1.1, False, 3, 2, None, 0.1, ("b",)))
    s.put(TokenEvent("r", (3,), None, 1.2, False, 3, 3, None, 0.1, ("c",)))
    ev = await s.get()  # all three, coalesced: the client took none of them yet
    assert list(ev.token_ids) == [1, 2, 3] and list(ev.logprobs) == [None, "b", "c"]
