"""``slai-serve bench-serve``: replay a workload against a running gateway (the live twin of ``sim``).

    slai-serve up --fake --api-keys keys.yaml &
    slai-serve bench-serve --gateway 127.0.0.1:50051 --qps 20 --num-requests 512 \\
        --api-keys keys.yaml --max-prompt-len 512 --max-output-len 128 --json

The workload comes from :func:`simulator.workloads.make_workload` (same seed, same
arrivals, lengths and tiers as the simulator). Each request is sent at its
arrival time on its own gRPC stream with ``ignore_eos`` and ``max_tokens`` =
its output length. The gateway takes text, so a prompt of exactly N tokens is a
single-token word repeated (checked with the model's tokenizer). A request's
tier comes from its API key: ``--paying-key`` / ``--free-key``, ``--api-keys`` (the
gateway's key file; one key per tier is picked), or by default the demo key file
that ``slai-serve up`` gives its gateway (slai_serve/demo_keys.py).

Metrics are computed by :mod:`simulator.metrics` from client-side timestamps (one
clock: this process), so the JSON has the same keys and definitions as
``slai-serve sim --json``; it adds rejected/error counts. ``--max-prompt-len``/``--max-output-len``
clip lengths with :func:`simulator.workloads.clip_lengths`, as ``sim`` does with the same options.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from contract.tiers import FREE_TBT_S, PAYING_TBT_S
from simulator.workloads import clip_lengths  # shared with ``sim --max-prompt-len/--max-output-len``
from slai_serve.bench_http import request_record


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gateway", default="127.0.0.1:50051", help="gateway gRPC address")
    p.add_argument("--http", default="", metavar="URL",
                   help="replay over OpenAI HTTP at this base URL instead of gRPC (any OpenAI-compatible server, "
                        "e.g. http://127.0.0.1:8000 or a vLLM server)")
    p.add_argument("--priority", action="store_true",
                   help="with --http: send vLLM's `priority` field (paying 0, free 1) for `vllm serve "
                        "--scheduling-policy priority`")
    p.add_argument("--qps", type=float, required=True, help="nominal Poisson arrival rate")
    g = p.add_argument_group("workload (same meaning as in `slai-serve sim`)")
    g.add_argument("--num-requests", type=int, default=256)
    g.add_argument("--trace", default=None, metavar="PATH|paper", help="length trace CSV; default: synthetic knots")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--clip-factor", type=float, default=3.0, help="clip each Poisson gap at this / QPS; 0 disables")
    g.add_argument("--paying-prob", type=float, default=0.05)
    g.add_argument("--paying-tbt", type=float, default=PAYING_TBT_S, help="paying TBT SLO for attainment (match the gateway)")
    g.add_argument("--free-tbt", type=float, default=FREE_TBT_S, help="free TBT SLO for attainment (match the gateway)")
    g.add_argument("--max-prompt-len", type=int, default=0, help="clip prompt lengths (0 = model limit only)")
    g.add_argument("--max-output-len", type=int, default=0, help="clip output lengths (0 = model limit only)")
    a = p.add_argument_group("tiers")
    a.add_argument("--api-keys", default="", help="the gateway's key file: one key per tier is used")
    a.add_argument("--paying-key", default="", help="API key of the paying tier")
    a.add_argument("--free-key", default="", help="API key of the free tier")
    a.add_argument("--no-keys", action="store_true", help="send no API keys (every request gets the gateway's "
                                                          "default tier); default: the demo key file `up` uses")
    p.add_argument("--model-dir", default="", help="tokenizer folder used to build exact-length prompts "
                                                   "(default: the converted SmolLM2)")
    p.add_argument("--scheduler", default="", help="scheduler address: adds policy and preemption counts "
                                                     "from its Stats RPC (with the stack's SLAI_SERVICE_TOKEN)")
    p.add_argument("--service-token-file", default=None, metavar="PATH",
                   help="file with the scheduler's service token (default: $SLAI_SERVICE_TOKEN_FILE, "
                        "else $SLAI_SERVICE_TOKEN)")
    p.add_argument("--timeout", type=float, default=600.0, help="per-request deadline, seconds")
    p.add_argument("--records-out", default=None, metavar="FILE", help="write per-request JSON lines here")
    p.add_argument("--json", action="store_true", help="print one JSON object")


@dataclass(slots=True)
class PromptBuilder:
    """Prompts of an exact token length from single-token words.

    ``prompt(n, index)`` makes the prompts of different requests differ in their
    first tokens (``index`` in binary, ``word`` for 0 and ``alt`` for 1, over the
    first :attr:`MARK_TOKENS` positions): with prefix caching on (the scheduler's
    default) identical prompts would share their KV blocks and skip most of their
    prefill, which the trace's requests (and the simulator's, which carry no token
    ids) do not. Without ``index`` the prompt is ``word`` repeated.
    """

    MARK_TOKENS = 16  # one KV block (docs/scheduler.md, *Prefix caching*): distinct first blocks share nothing

    word: str
    num_special: int  # tokens the tokenizer adds around any prompt (BOS/EOS)
    max_model_len: int
    alt: str = ""  # a second single-token word that mixes freely with ``word`` ("" : none found)

    @classmethod
    def from_model_dir(cls, model_dir: str) -> PromptBuilder:
        from gateway.tokenizer import ModelTokenizer

        tok = ModelTokenizer.from_dir(model_dir)
        word, _ = tok.repeatable_token()
        num_special = len(tok.encode(word)) - 1
        assert len(tok.encode(word * 10)) == 10 + num_special
        return cls(word, num_special, tok.max_model_len, _mixing_word(tok, word, num_special))

    def prompt(self, num_tokens: int, index: int | None = None) -> str:
        n = max(1, num_tokens - self.num_special)
        if index is None or not self.alt:
            return self.word * n
        k = min(n, self.MARK_TOKENS)
        mark = "".join(self.alt if (index >> i) & 1 else self.word for i in range(k))
        return mark + self.word * (n - k)


def _mixing_word(tok, word: str, num_special: int) -> str:
    """A single-token word other than ``word`` such that any mix of the two encodes to one token per piece."""
    pattern = [(i * 7 + i // 3) % 2 for i in range(64)]  # both orders, runs of one and two
    for alt in (" a", " the", " hello", " x", " of", " and"):
        if alt == word or len(tok.encode(alt, add_special_tokens=False)) != 1:
            continue
        text = "".join(alt if b else word for b in pattern)
        if len(tok.encode(text)) == len(pattern) + num_special:
            return alt
    return ""


def tier_keys(args: argparse.Namespace) -> dict[str, str | None]:
    """One key per tier: ``--paying-key``/``--free-key``, else from ``--api-keys``, else (unless
    ``--no-keys``) from the demo key file that ``slai-serve up`` gives its gateway by default."""
    keys: dict[str, str | None] = {"paying": args.paying_key or None, "free": args.free_key or None}
    key_file = args.api_keys
    if not key_file and not getattr(args, "no_keys", False) and not all(keys.values()):
        from slai_serve.demo_keys import demo_keys_path

        path = demo_keys_path()
        key_file = str(path) if path.is_file() else ""
    if key_file:
        from gateway.auth import load_key_file

        store = load_key_file(key_file)
        for tier in keys:
            keys[tier] = keys[tier] or store.key_for_tier(tier)
    return keys


async def replay(gateway: str, items: list, builder: PromptBuilder, keys: dict[str, str | None],
                 max_prompt: int = 0, max_output: int = 0, timeout_s: float = 600.0) -> tuple[Any, dict]:
    """Send every item at its arrival time; return (MetricsCollector, extra counters)."""
    import grpc

    from gateway.client import build_request
    from simulator.metrics import MetricsCollector
    from wire import enums
    from wire.pb.slai.v1 import common_pb2, gateway_pb2_grpc

    collector = MetricsCollector()
    errors: Counter = Counter()
    records: list[dict] = []
    timings: dict[str, dict[str, float]] = {}  # req_id -> its RequestTimings (scheduler clock), when finished
    from wire.grpc_server import message_size_options

    channel = grpc.aio.insecure_channel(gateway, options=message_size_options())
    stub = gateway_pb2_grpc.GatewayServiceStub(channel)
    meta = {t: (("authorization", f"Bearer {k}"),) if k else None for t, k in keys.items()}
    t0 = time.monotonic() + 0.2  # a little slack to build the first requests

    async def one(index: int, item) -> None:
        p_len, o_len = clip_lengths(item.prompt_len, item.output_len, max_prompt, max_output, builder.max_model_len)
        req = build_request(builder.prompt(p_len, index), max_tokens=o_len, ignore_eos=True,
                            request_id=f"bench-{item.req_id}-{int(t0 * 1e3) % 10**9}")
        collector.register(item.req_id, item.arrival_s, item.tier, item.tbt_slo_s, p_len, o_len)
        delay = t0 + item.arrival_s - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        finish = None
        try:
            call = stub.Generate(req, metadata=meta.get(item.tier), timeout=timeout_s)
            async for chunk in call:
                now = time.monotonic() - t0
                done = chunk.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED
                if done:
                    finish = enums.FINISH_FROM_PB[chunk.finish_reason]
                    if chunk.HasField("timings"):  # the same request on the scheduler's clock
                        t = chunk.timings
                        timings[item.req_id] = {"ttft_s": t.ttft_s, "e2e_s": t.e2e_s, "max_tbt_s": t.max_tbt_s}
                collector.on_token(item.req_id, now, len(chunk.token_ids), finish)
        except grpc.aio.AioRpcError as exc:
            errors[exc.code().name] += 1
            finish = f"error:{exc.code().name}"
        records.append(request_record(item, collector.records[item.req_id], p_len, o_len, finish))

    wall0 = time.monotonic()
    await asyncio.gather(*(one(i, it) for i, it in enumerate(items)))
    wall = time.monotonic() - wall0
    await channel.close()
    extra = {"num_rejected": errors.get("RESOURCE_EXHAUSTED", 0), "num_errors": sum(errors.values()),
             "errors_by_code": dict(errors), "wall_time_s": wall, "_records": records, "_timings": timings}
    return collector, extra


def scheduler_stats(address: str, service_token: str = "") -> dict[str, Any] | None:
    """Policy and counters from the scheduler's Stats RPC (None when unreachable or refused)."""
    import grpc

    from wire.pb.slai.v1 import scheduler_pb2, scheduler_pb2_grpc
    from wire.service_auth import SERVICE_TOKEN_ENV, call_metadata

    try:
        with grpc.insecure_channel(address) as ch:
            st = scheduler_pb2_grpc.SchedulerServiceStub(ch).Stats(scheduler_pb2.StatsRequest(), timeout=5.0,
                                                                   metadata=call_metadata(service_token))
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
            print(f"bench-serve: the scheduler refused Stats ({exc.details()}); set {SERVICE_TOKEN_ENV} to the "
                  "stack's service token", file=sys.stderr)
        return None
    steps = sum(e.num_steps for e in st.executors)

    def step_weighted(field: str) -> float:  # a mean over all executors' steps
        return sum(getattr(e, field) * e.num_steps for e in st.executors) / steps if steps else 0.0

    return {"policy": st.policy, "num_preemptions": sum(e.num_preemptions for e in st.executors),
            "num_steps": steps, "mean_batch_s": step_weighted("mean_batch_s"),
            "mean_rpc_overhead_s": step_weighted("mean_rpc_overhead_s"),
            "mean_executor_wait_s": step_weighted("mean_executor_wait_s"),
            "num_steps_planned_ahead": sum(e.num_steps_planned_ahead for e in st.executors),
            "mean_plan_ahead_lead_s": step_weighted("mean_plan_ahead_lead_s"),
            "num_tbt_samples": st.num_tbt_samples, "tbt_p50_s": st.tbt_p50_s, "tbt_p99_s": st.tbt_p99_s}


def run(args: argparse.Namespace) -> int:
    from contract.model_files import default_model_dir

    if args.priority and not args.http:
        raise ValueError("--priority is a field of the HTTP body: use it with --http")
    from simulator.workloads import effective_qps, make_workload

    model_dir = args.model_dir or str(default_model_dir())
    if not Path(model_dir, "tokenizer.json").is_file():
        print(f"bench-serve: no tokenizer.json in {model_dir} (give --model-dir)", file=sys.stderr)
        return 2
    builder = PromptBuilder.from_model_dir(model_dir)
    items = make_workload(args.num_requests, args.qps, seed=args.seed, trace=args.trace,
                          clip_factor=args.clip_factor if args.clip_factor > 0 else None,
                          paying_prob=args.paying_prob, paying_tbt_s=args.paying_tbt, free_tbt_s=args.free_tbt,
                          max_total=builder.max_model_len)
    keys = tier_keys(args)
    unkeyed = sorted({it.tier for it in items if not keys.get(it.tier)})
    if unkeyed:
        print(f"bench-serve: no API key for tier(s) {', '.join(unkeyed)}: those requests get the gateway's "
              "default tier (give --api-keys, or start the stack with `slai-serve up`'s demo keys)", file=sys.stderr)
    token = ""
    if args.scheduler:
        from wire.service_auth import read_service_token

        token = read_service_token(args.service_token_file)
    before = scheduler_stats(args.scheduler, token) if args.scheduler else None
    if args.http:
        from slai_serve.bench_http import replay_http

        collector, extra = asyncio.run(replay_http(args.http, items, builder, keys, args.priority,
                                                   args.max_prompt_len, args.max_output_len, args.timeout))
    else:
        collector, extra = asyncio.run(replay(args.gateway, items, builder, keys, args.max_prompt_len,
                                              args.max_output_len, args.timeout))
    records = extra.pop("_records")
    extra.pop("_timings", None)
    if extra["errors_by_code"].get("UNAUTHENTICATED") and not (args.api_keys or args.paying_key or args.free_key):
        print("bench-serve: the gateway refused the demo keys (UNAUTHENTICATED): it runs with another key file; "
              "give --api-keys FILE, or --no-keys", file=sys.stderr)
    if args.records_out:
        with open(args.records_out, "w") as fh:
            for r in sorted(records, key=lambda r: r["arrival_s"]):
                fh.write(json.dumps(r) + "\n")
    s = collector.summary()
    s.update(extra)
    s.update({"qps": args.qps, "effective_qps": effective_qps(items), "gateway": args.http or args.gateway,
              "num_requests": args.num_requests, "trace": args.trace or "synthetic", "seed": args.seed,
              "paying_prob": args.paying_prob, "max_prompt_len": args.max_prompt_len,
              "max_output_len": args.max_output_len, "tiers_keyed": sorted(t for t, k in keys.items() if k)})
    after = scheduler_stats(args.scheduler, token) if args.scheduler else None
    if before and after:
        s["policy"] = after["policy"]
        s["num_preemptions"] = after["num_preemptions"] - before["num_preemptions"]
        s["num_steps"] = after["num_steps"] - before["num_steps"]
    from simulator.metrics import SloCriterion

    crit = SloCriterion(tbt_p99_max_paying_s=args.paying_tbt, tbt_p99_max_free_s=args.free_tbt)
    s["meets_slo"] = crit.passes(s)
    s["slo_margin"] = crit.margin(s)
    out = _clean(s)
    if args.json:
        json.dump(out, sys.stdout, sort_keys=True)
        sys.stdout.write("\n")
        return 0
    for k in ("qps", "effective_qps", "num_requests", "num_finished", "num_rejected", "num_errors", "ttft_p50_s",
              "ttft_p99_s", "ttft_p50_s_by_tier", "tbt_p99_s_by_tier", "slo_attainment_by_tier",
              "throughput_tokens_per_s", "meets_slo", "wall_time_s"):
        print(f"{k:28s} {out.get(k)}")
    return 0


def _clean(value: Any) -> Any:
    """JSON-safe: NaN/inf -> None, numpy scalars -> Python."""
    import math

    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
