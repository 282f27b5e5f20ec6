"""``slai-serve client "prompt"``: stream a completion from a running gateway to the terminal.

    slai-serve client "What is the capital of France?" --chat --max-tokens 32
    slai-serve client "Once upon a time" --gateway 127.0.0.1:50051 --temperature 0.8 --seed 1
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="the prompt (with --chat: the user message)")
    parser.add_argument("--chat", action="store_true", help="send as a chat message (the model's chat template)")
    parser.add_argument("--system", default=None, help="with --chat: a system message")
    parser.add_argument("--max-tokens", type=int, default=0, help="0 = the server's default")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--ignore-eos", action="store_true")
    parser.add_argument("--gateway", default=os.environ.get("SLAI_GATEWAY", "127.0.0.1:50051"),
                        help="gateway gRPC address (env SLAI_GATEWAY)")
    parser.add_argument("--api-key", default=os.environ.get("SLAI_API_KEY"), help="API key (env SLAI_API_KEY)")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--stats", action="store_true", help="print usage and timings to stderr at the end")


async def _run(args: argparse.Namespace) -> int:
    import grpc

    from gateway.client import Completion, GatewayClient

    kw = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
              seed=args.seed, stop=args.stop, ignore_eos=args.ignore_eos)
    if args.chat:
        msgs = ([("system", args.system)] if args.system else []) + [("user", args.prompt)]
        kw["messages"] = msgs
    else:
        kw["prompt"] = args.prompt
    out = Completion()
    t0 = time.monotonic()
    first = None
    async with GatewayClient(args.gateway, api_key=args.api_key, timeout_s=args.timeout) as client:
        try:
            async for d in client.stream(**kw):
                if first is None and d.token_ids:
                    first = time.monotonic() - t0
                out.add(d)
                if d.text:
                    sys.stdout.write(d.text)
                    sys.stdout.flush()
        except grpc.RpcError as exc:
            sys.stdout.write("\n")
            print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    sys.stdout.write("\n")
    if args.stats:
        total = time.monotonic() - t0
        print(f"[{out.finish_reason}] prompt {out.prompt_tokens} tokens, completion {out.completion_tokens} tokens; "
              f"client TTFT {first or 0:.3f} s, total {total:.3f} s; scheduler TTFT "
              f"{out.timings.ttft_s if out.timings else 0:.3f} s", file=sys.stderr)
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_run(args))
    except KeyboardInterrupt:
        return 130
