"""``slai-serve gateway``: the gRPC GatewayService and the OpenAI HTTP API in one process.

    slai-serve gateway --scheduler 127.0.0.1:50061 --grpc-port 50051 --http-port 8000 \\
        --model-dir ~/.cache/slai-serve/models/smollm2-135m-instruct [--api-keys keys.yaml]

Every flag also reads an environment variable (``SLAI_GATEWAY_*``), handy in compose.
SIGTERM/SIGINT drain: health NOT_SERVING, no new calls, in-flight streams get
``--drain-timeout`` seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import sys

from common.grpc_server import wait_for_stop_signal
from gateway.auth import load_key_file, open_store
from gateway.config import GatewayConfig, default_tier_policies


def _env(name: str, default):
    return os.environ.get(f"SLAI_GATEWAY_{name}", default)


def _at_least(kind, low):
    """An argparse type: ``kind`` values >= ``low`` (argparse names the flag in the error)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not value >= low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {text}")
        return value
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scheduler", default=_env("SCHEDULER", "127.0.0.1:50061"),
                        help="scheduler address host:port (env SLAI_GATEWAY_SCHEDULER)")
    parser.add_argument("--host", default=_env("HOST", "0.0.0.0"), help="listen host for gRPC and HTTP")
    parser.add_argument("--grpc-port", type=int, default=int(_env("GRPC_PORT", 50051)), help="gRPC port")
    parser.add_argument("--http-port", type=int, default=int(_env("HTTP_PORT", 8000)),
                        help="OpenAI-compatible HTTP port (-1: no HTTP)")
    parser.add_argument("--model-dir", default=_env("MODEL_DIR", ""),
                        help="model folder with tokenizer.json (+ chat template, config.json); "
                             "'default' = the embedded SmolLM2 (converted on first use)")
    parser.add_argument("--model-name", default=_env("MODEL_NAME", ""), help="served model id (default: folder name)")
    parser.add_argument("--api-keys", default=_env("API_KEYS", ""),
                        help="JSON/YAML key file (key -> tier); without it everyone gets --default-tier")
    parser.add_argument("--default-tier", default=_env("DEFAULT_TIER", "paying"), choices=("paying", "free"))
    parser.add_argument("--paying-tbt", type=float, default=0.1, help="paying tier TBT objective, seconds")
    parser.add_argument("--free-tbt", type=float, default=0.5, help="free tier TBT objective, seconds")
    parser.add_argument("--paying-ttft", type=float, default=0.0, help="paying tier TTFT objective (0 = scheduler's)")
    parser.add_argument("--free-ttft", type=float, default=0.0, help="free tier TTFT objective (0 = scheduler's)")
    parser.add_argument("--default-max-tokens", type=int, default=256)
    parser.add_argument("--max-model-len", type=int, default=0, help="0 = from the model's config.json")
    parser.add_argument("--max-concurrent-requests", type=int, default=1024,
                        help="requests in flight before RESOURCE_EXHAUSTED / 429")
    parser.add_argument("--drain-timeout", type=float, default=10.0, help="seconds in-flight streams get on stop")
    # NOTE: string defaults go through ``type`` too, so a bad SLAI_GATEWAY_* value is named like a bad flag.
    parser.add_argument("--max-body-bytes", type=_at_least(int, 1024), default=_env("MAX_BODY_BYTES", str(4 << 20)),
                        help="largest HTTP request body and gRPC request message; larger gets 413 / "
                             "RESOURCE_EXHAUSTED (env SLAI_GATEWAY_MAX_BODY_BYTES)")
    parser.add_argument("--header-timeout", type=_at_least(float, 0.01), default=_env("HEADER_TIMEOUT", "10"),
                        help="seconds an HTTP request's headers may take, then 408 and close "
                             "(env SLAI_GATEWAY_HEADER_TIMEOUT)")
    parser.add_argument("--body-timeout", type=_at_least(float, 0.01), default=_env("BODY_TIMEOUT", "30"),
                        help="seconds an HTTP request's body may take after its headers, then 408 and close "
                             "(env SLAI_GATEWAY_BODY_TIMEOUT)")
    parser.add_argument("--max-connections", type=_at_least(int, 1), default=_env("MAX_CONNECTIONS", "2048"),
                        help="open HTTP connections; one more gets 503 and is closed "
                             "(env SLAI_GATEWAY_MAX_CONNECTIONS)")
    parser.add_argument("--log-level", default=_env("LOG_LEVEL", "INFO"))


def config_from_args(args: argparse.Namespace) -> GatewayConfig:
    tiers = default_tier_policies()
    tiers["paying"] = dataclasses.replace(tiers["paying"], tbt_slo_s=args.paying_tbt, ttft_slo_s=args.paying_ttft)
    tiers["free"] = dataclasses.replace(tiers["free"], tbt_slo_s=args.free_tbt, ttft_slo_s=args.free_ttft)
    return GatewayConfig(
        scheduler_address=args.scheduler, grpc_address=f"{args.host}:{args.grpc_port}", http_host=args.host,
        http_port=args.http_port, model_dir=args.model_dir, model_name=args.model_name,
        default_max_tokens=args.default_max_tokens, max_concurrent_requests=args.max_concurrent_requests,
        max_model_len=args.max_model_len, drain_timeout_s=args.drain_timeout, default_tier=args.default_tier,
        tiers=tiers, max_body_bytes=args.max_body_bytes, header_timeout_s=args.header_timeout,
        body_timeout_s=args.body_timeout, max_connections=args.max_connections)


def resolve_model_dir(model_dir: str) -> str:
    if model_dir in ("", "default"):
        from executor_svc.models import ensure_default_model  # converts once; needs the executor extra

        return str(ensure_default_model())
    return model_dir


async def serve(config: GatewayConfig, api_keys: str = "") -> None:
    from gateway.server import start_gateway
    from gateway.service import GenerationService
    from gateway.tokenizer import ModelTokenizer

    from common import names, telemetry

    log = logging.getLogger("gateway")
    telemetry.init_tracing(names.SERVICE_GATEWAY)  # no-op unless OTEL_* is set
    tokenizer = ModelTokenizer.from_dir(config.model_dir, name=config.model_name)
    keys = (load_key_file(api_keys, config.default_tier, config.tiers) if api_keys
            else open_store(config.default_tier, config.tiers))
    service = GenerationService(config, tokenizer)
    running = await start_gateway(config, service, keys)
    log.info("gateway up: gRPC :%d, HTTP %s, model %s (max_model_len %d), scheduler %s, keys %s",
             running.grpc_port, running.http_port, service.model_name, service.max_model_len,
             config.scheduler_address, "on" if keys.enabled else "off")
    await wait_for_stop_signal()
    log.info("draining (%.0f s)", config.drain_timeout_s)
    await running.stop(config.drain_timeout_s)
    telemetry.shutdown_tracing()


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = config_from_args(args)
    config = dataclasses.replace(config, model_dir=resolve_model_dir(config.model_dir))
    asyncio.run(serve(config, args.api_keys))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="slai-serve gateway", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
