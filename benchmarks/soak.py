"""Soak: many concurrent streams against a local stack for a long time; count every token.

    python -m benchmarks.soak --fake --streams 256 --duration 600 --out out/soak-fake.json
    python -m benchmarks.soak --streams 16 --duration 1800 --max-tokens 16:64 --out out/soak-real.json

Starts ``slai-serve up`` (as :class:`slai_serve.launch.LocalStack`, free ports) and keeps
``--streams`` requests in flight for ``--duration`` seconds, half over the gateway's gRPC
API and half over OpenAI HTTP/SSE (``--api``). Every request asks for an exact number of
tokens (``ignore_eos``) and is checked when it ends:

* lost or duplicated tokens: the client received a different number of token ids than it
  asked for, or than the scheduler's final usage says it generated. With ``--fake`` the
  token ids themselves are checked too: FakeRunner's tokens are consecutive ids
  (``executor_svc.fake_runner.fake_token``), so a lost or repeated token breaks the run;
* errors, by kind (gRPC status or HTTP status);
* resident memory of each service process, sampled every ``--rss-every`` seconds.

Prints one JSON summary (and writes it with ``--out``): requests, tokens, tokens/s, lost,
duplicated, errors, and each process's RSS at start, at the end and at its peak, with the
time series. Not part of the test suite: it runs for minutes by design.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path

import grpc
import httpx
import psutil

from gateway.client import GatewayClient
from slai_serve.launch import LocalStack

PROMPT = "Tell me a long story about a lighthouse keeper and the sea."


class Tally:
    """What every finished request contributed."""

    def __init__(self) -> None:
        self.requests = 0
        self.tokens = 0
        self.lost = 0  # tokens asked for and never delivered
        self.duplicated = 0  # tokens delivered beyond what was asked for
        self.order_breaks = 0  # --fake only: a token that does not follow its predecessor
        self.errors: Counter[str] = Counter()
        self.examples: list[str] = []

    def check(self, api: str, asked: int, ids: list[int], usage: int, vocab: int, fake: bool) -> None:
        self.requests += 1
        self.tokens += len(ids)
        got = len(ids)
        if got < asked:
            self.lost += asked - got
        if got > asked:
            self.duplicated += got - asked
        if usage != got and len(self.examples) < 10:
            self.examples.append(f"{api}: usage {usage} but {got} ids received (asked {asked})")
        if fake:
            # consecutive ids; FakeRunner skips an EOS id by taking the next one (a step of 2)
            breaks = sum(1 for a, b in zip(ids, ids[1:]) if (b - a) % vocab not in (1, 2))
            self.order_breaks += breaks
            if breaks and len(self.examples) < 10:
                self.examples.append(f"{api}: {breaks} out-of-order ids in {ids[:20]}...")

    def error(self, kind: str) -> None:
        self.errors[kind] += 1


async def one_grpc(client: GatewayClient, rid: str, max_tokens: int, tally: Tally, vocab: int, fake: bool) -> None:
    try:
        res = await client.generate(PROMPT, max_tokens=max_tokens, ignore_eos=True, request_id=rid)
    except grpc.aio.AioRpcError as exc:
        tally.error(f"grpc {exc.code().name}")
        return
    tally.check("grpc", max_tokens, res.token_ids, res.completion_tokens, vocab, fake)


async def one_http(http: httpx.AsyncClient, rid: str, max_tokens: int, tally: Tally, vocab: int, fake: bool) -> None:
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "ignore_eos": True, "stream": True, "request_id": rid,
            "stream_options": {"include_usage": True}, "return_token_ids": True}
    ids: list[int] = []
    usage = -1
    try:
        async with http.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                tally.error(f"http {r.status_code}")
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                ev = json.loads(line[6:])
                if "error" in ev:
                    tally.error(f"http stream error: {ev['error'].get('type')}")
                    return
                for ch in ev.get("choices", ()):
                    ids.extend(ch.get("token_ids") or ())
                if ev.get("usage"):
                    usage = ev["usage"]["completion_tokens"]
    except httpx.HTTPError as exc:
        tally.error(f"http {type(exc).__name__}")
        return
    if usage < 0:
        tally.error("http stream without usage")
        return
    # HTTP chunks carry text; token ids only where the gateway returns them. Without ids,
    # usage against the number asked for is the check.
    tally.check("http", max_tokens, ids if ids else [0] * usage, usage, vocab, fake and bool(ids))


def rss_sample(stack: LocalStack) -> dict[str, int]:
    out = {}
    for p in stack.procs:
        if p.popen is None or p.popen.poll() is not None:
            continue
        try:
            out[p.name] = psutil.Process(p.popen.pid).memory_info().rss
        except psutil.Error:
            pass
    return out


async def soak(args: argparse.Namespace) -> dict:
    stack = LocalStack(fake=args.fake, gateway_grpc_port=0, http_port=0, scheduler_port=0, executor_port=0,
                       metrics_port=-1, log_dir="", num_executors=args.executors, policy=args.policy,
                       executor_args=list(args.executor_arg), startup_timeout_s=600.0)
    lo, _, hi = args.max_tokens.partition(":")
    lo_tokens, hi_tokens = int(lo), int(hi or lo)
    tally, rng = Tally(), random.Random(args.seed)
    rss: list[dict] = []
    vocab = 49152 if not args.fake else 32000
    with stack:
        t0 = time.monotonic()
        end = t0 + args.duration
        rss.append({"t": 0.0, **rss_sample(stack)})
        counter = iter(range(10**12))

        async def worker(i: int, client: GatewayClient, http: httpx.AsyncClient) -> None:
            api = "grpc" if args.api == "grpc" or (args.api == "both" and i % 2 == 0) else "http"
            while time.monotonic() < end:
                rid = f"soak-{next(counter)}"
                n = rng.randint(lo_tokens, hi_tokens)
                if api == "grpc":
                    await one_grpc(client, rid, n, tally, vocab, args.fake)
                else:
                    await one_http(http, rid, n, tally, vocab, args.fake)

        async def sampler() -> None:
            while time.monotonic() < end:
                await asyncio.sleep(args.rss_every)
                rss.append({"t": round(time.monotonic() - t0, 1), **rss_sample(stack)})
                print(f"[{time.monotonic() - t0:6.0f} s] requests {tally.requests} tokens {tally.tokens} "
                      f"lost {tally.lost} dup {tally.duplicated} errors {sum(tally.errors.values())}",
                      file=sys.stderr, flush=True)

        limits = httpx.Limits(max_connections=args.streams, max_keepalive_connections=args.streams)
        async with GatewayClient(stack.gateway_address, timeout_s=args.request_timeout) as client, \
                httpx.AsyncClient(base_url=stack.http_base, timeout=args.request_timeout, limits=limits) as http:
            await asyncio.gather(sampler(), *(worker(i, client, http) for i in range(args.streams)))
        elapsed = time.monotonic() - t0
        rss.append({"t": round(elapsed, 1), **rss_sample(stack)})
        log_dir = stack.log_dir
    names = sorted({k for s in rss for k in s if k != "t"})
    return {
        "config": {"fake": args.fake, "streams": args.streams, "duration_s": args.duration, "api": args.api,
                   "max_tokens": args.max_tokens, "executors": args.executors, "policy": args.policy},
        "elapsed_s": round(elapsed, 1), "requests": tally.requests, "tokens": tally.tokens,
        "tokens_per_s": round(tally.tokens / elapsed, 1), "lost": tally.lost, "duplicated": tally.duplicated,
        "order_breaks": tally.order_breaks, "errors": dict(tally.errors), "examples": tally.examples,
        "rss_mib": {n: {"start": _mib(rss[0].get(n)), "end": _mib(rss[-1].get(n)),
                        "peak": _mib(max((s.get(n, 0) for s in rss), default=0))} for n in names},
        "rss_series": rss, "logs": log_dir,
    }


def _mib(v: int | None) -> float | None:
    return None if v is None else round(v / 2**20, 1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fake", action="store_true", help="FakeRunner executors (no model)")
    p.add_argument("--streams", type=int, default=256, help="requests kept in flight")
    p.add_argument("--duration", type=float, default=600.0, help="seconds")
    p.add_argument("--api", choices=("grpc", "http", "both"), default="both")
    p.add_argument("--max-tokens", default="32:256", help="tokens per request, LO:HI drawn uniformly")
    p.add_argument("--executors", type=int, default=1)
    p.add_argument("--policy", default="slai")
    p.add_argument("--executor-arg", action="append", default=[], help="extra executor flag (repeatable)")
    p.add_argument("--rss-every", type=float, default=10.0, help="seconds between memory samples")
    p.add_argument("--request-timeout", type=float, default=600.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="also write the JSON summary here")
    args = p.parse_args(argv)
    result = asyncio.run(soak(args))
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    summary = {k: v for k, v in result.items() if k != "rss_series"}
    print(json.dumps(summary, indent=1))
    bad = result["lost"] or result["duplicated"] or result["order_breaks"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
