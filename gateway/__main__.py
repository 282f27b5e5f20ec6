"""``slai-serve gateway``: the gRPC GatewayService and the OpenAI HTTP API in one process.

    slai-serve gateway --scheduler 127.0.0.1:50061 --grpc-port 50051 --http-port 8000 \\
        --model-dir ~/.cache/slai-serve/models/smollm2-135m-instruct [--api-keys keys.yaml]

Every flag also reads an environment variable (``SLAI_GATEWAY_*``), handy in compose;
the service token shared with the scheduler is ``SLAI_SERVICE_TOKEN`` (or the file in
``SLAI_SERVICE_TOKEN_FILE`` / ``--service-token-file``), the same variable every service reads.
Listens on loopback unless ``--host`` says otherwise. The ``--api-keys`` file is
followed while the gateway runs (gateway/key_file.py). SIGTERM/SIGINT drain: health
NOT_SERVING, no new calls, in-flight streams get ``--drain-timeout`` seconds, then end
with a "gateway is shutting down" error. Health follows the scheduler's (checked every
``--health-interval`` seconds).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys

from contract.model_files import default_model_dir, is_converted
from contract.tiers import FREE_TBT_S, PAYING_TBT_S
from gateway.auth import open_store
from gateway.config import POOL_ROUTING_RULES, GatewayConfig, default_tier_policies
from gateway.key_file import ReloadingKeyStore
from wire import service_auth
from wire.service_main import run_service, serve_until_signal


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
                        help="scheduler address host:port (env SLAI_GATEWAY_SCHEDULER); one pool")
    parser.add_argument("--pools", default=_env("POOLS", ""),
                        help="schedulers to route across, one per pool: comma-separated host:port, or one DNS "
                             "name that resolves to several addresses (env SLAI_GATEWAY_POOLS); overrides "
                             "--scheduler")
    parser.add_argument("--pool-routing", default=_env("POOL_ROUTING", "jsw"), choices=POOL_ROUTING_RULES,
                        help="how a request's pool is chosen: jsw = least outstanding work (default), p2c = the "
                             "less loaded of two random pools, round-robin (env SLAI_GATEWAY_POOL_ROUTING)")
    parser.add_argument("--host", default=_env("HOST", "127.0.0.1"),
                        help="listen host for gRPC and HTTP (env SLAI_GATEWAY_HOST; 0.0.0.0: every interface)")
    parser.add_argument("--grpc-port", type=int, default=int(_env("GRPC_PORT", 50051)), help="gRPC port")
    parser.add_argument("--http-port", type=int, default=int(_env("HTTP_PORT", 8000)),
                        help="OpenAI-compatible HTTP port (-1: no HTTP)")
    parser.add_argument("--model-dir", default=_env("MODEL_DIR", ""),
                        help="model folder with tokenizer.json (+ chat template, config.json); "
                             "'default' = the embedded SmolLM2 (converted on first use)")
    parser.add_argument("--model-name", default=_env("MODEL_NAME", ""), help="served model id (default: folder name)")
    parser.add_argument("--api-keys", default=_env("API_KEYS", ""),
                        help="JSON/YAML key file (key -> tier), re-read within ~1 s of a change; without it "
                             "everyone gets --default-tier")
    parser.add_argument("--default-tier", default=_env("DEFAULT_TIER", "paying"), choices=("paying", "free"))
    parser.add_argument("--paying-tbt", type=float, default=PAYING_TBT_S, help="paying tier TBT objective, seconds")
    parser.add_argument("--free-tbt", type=float, default=FREE_TBT_S, help="free tier TBT objective, seconds")
    parser.add_argument("--paying-ttft", type=float, default=0.0, help="paying tier TTFT objective (0 = scheduler's)")
    parser.add_argument("--free-ttft", type=float, default=0.0, help="free tier TTFT objective (0 = scheduler's)")
    parser.add_argument("--default-max-tokens", type=int, default=256)
    parser.add_argument("--max-model-len", type=int, default=0, help="0 = from the model's config.json")
    parser.add_argument("--max-concurrent-requests", type=int, default=1024,
                        help="requests in flight before RESOURCE_EXHAUSTED / 429")
    parser.add_argument("--drain-timeout", type=float, default=float(_env("DRAIN_TIMEOUT", 10.0)),
                        help="seconds in-flight streams get on SIGTERM; then they end with 'gateway is shutting "
                             "down' (env SLAI_GATEWAY_DRAIN_TIMEOUT)")
    parser.add_argument("--health-interval", type=float, default=float(_env("HEALTH_INTERVAL", 0.5)),
                        help="seconds between checks of the scheduler's health; the gateway is NOT_SERVING "
                             "while the scheduler is (env SLAI_GATEWAY_HEALTH_INTERVAL)")
    parser.add_argument("--stream-buffer-tokens", type=int, default=int(_env("STREAM_BUFFER_TOKENS", 512)),
                        help="tokens the gateway reads ahead of a client that is not reading; then it stops "
                             "reading the scheduler's stream (env SLAI_GATEWAY_STREAM_BUFFER_TOKENS)")
    parser.add_argument("--stream-stall-timeout", type=float, default=float(_env("STREAM_STALL_TIMEOUT", 30.0)),
                        help="abort a request (freeing its KV) whose client took nothing for this many seconds "
                             "with its buffer full; 0 = never (env SLAI_GATEWAY_STREAM_STALL_TIMEOUT)")
    parser.add_argument("--request-timeout", type=_at_least(float, 0.01), default=_env("REQUEST_TIMEOUT", "3600"),
                        help="seconds a request may run from its arrival at the gateway; then it is aborted "
                             "(freeing its KV) and ends with DEADLINE_EXCEEDED / 504 (env SLAI_GATEWAY_REQUEST_TIMEOUT)")
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
    parser.add_argument("--keep-alive-timeout", type=_at_least(float, 0.01), default=_env("KEEP_ALIVE_TIMEOUT", "30"),
                        help="seconds an idle HTTP keep-alive connection stays open; above clients' own 5 s so a "
                             "reused connection is never closed under a request (env SLAI_GATEWAY_KEEP_ALIVE_TIMEOUT)")
    parser.add_argument("--log-level", default=_env("LOG_LEVEL", "INFO"))
    service_auth.add_arguments(parser, listener=False)


def config_from_args(args: argparse.Namespace) -> GatewayConfig:
    if args.stream_buffer_tokens < 1:
        raise ValueError(f"--stream-buffer-tokens must be >= 1, got {args.stream_buffer_tokens}")
    if not args.stream_stall_timeout >= 0:
        raise ValueError(f"--stream-stall-timeout must be >= 0 (0 = never), got {args.stream_stall_timeout:g}")
    tiers = default_tier_policies()
    tiers["paying"] = dataclasses.replace(tiers["paying"], tbt_slo_s=args.paying_tbt, ttft_slo_s=args.paying_ttft)
    tiers["free"] = dataclasses.replace(tiers["free"], tbt_slo_s=args.free_tbt, ttft_slo_s=args.free_ttft)
    from gateway.pools import dns_name, resolve_pools
    pools = resolve_pools(args.pools) if args.pools else ()
    return GatewayConfig(
        scheduler_address=pools[0] if pools else args.scheduler, pools=pools, pool_routing=args.pool_routing,
        pools_dns=(dns_name(args.pools) or "") if args.pools else "",
        grpc_address=f"{args.host}:{args.grpc_port}", http_host=args.host,
        http_port=args.http_port, model_dir=args.model_dir, model_name=args.model_name,
        default_max_tokens=args.default_max_tokens, max_concurrent_requests=args.max_concurrent_requests,
        max_model_len=args.max_model_len, drain_timeout_s=args.drain_timeout, default_tier=args.default_tier,
        health_interval_s=args.health_interval, stream_buffer_tokens=args.stream_buffer_tokens,
        stream_stall_timeout_s=args.stream_stall_timeout, max_body_bytes=args.max_body_bytes,
        header_timeout_s=args.header_timeout, body_timeout_s=args.body_timeout, max_connections=args.max_connections,
        keep_alive_timeout_s=args.keep_alive_timeout, request_timeout_s=args.request_timeout,
        tiers=tiers, service_token=service_auth.read_service_token(args.service_token_file))


def resolve_model_dir(model_dir: str) -> str:
    """``default`` (or nothing): the embedded model's folder, which the executor converts once."""
    if model_dir not in ("", "default"):
        return model_dir
    path = default_model_dir()
    if not is_converted(path):
        raise ValueError(f"--model-dir: the embedded model is not converted yet at {path}; start an executor "
                         "once (`slai-serve executor`), run `make model`, or use `slai-serve up`, which converts it")
    return str(path)


async def serve(config: GatewayConfig, api_keys: str = "") -> None:
    from gateway.server import start_gateway
    from gateway.service import GenerationService
    from gateway.tokenizer import ModelTokenizer
    from telemetry import names, tracing
    log = logging.getLogger("gateway")
    tracing.init_tracing(names.SERVICE_GATEWAY)  # no-op unless OTEL_* is set
    tokenizer = ModelTokenizer.from_dir(config.model_dir, name=config.model_name)
    keys = (ReloadingKeyStore(api_keys, config.default_tier, config.tiers) if api_keys
            else open_store(config.default_tier, config.tiers))
    _warn_exposure(log, config, keys.enabled)
    service = GenerationService(config, tokenizer)
    running = await start_gateway(config, service, keys)
    log.info("gateway up: gRPC :%d, HTTP %s, model %s (max_model_len %d), scheduler(s) %s (routing %s), keys %s",
             running.grpc_port, running.http_port, service.model_name, service.max_model_len,
             ",".join(config.pool_addresses), config.pool_routing, "on" if keys.enabled else "off")
    await serve_until_signal(lambda: running.stop(config.drain_timeout_s), log, config.drain_timeout_s)


def _warn_exposure(log: logging.Logger, config: GatewayConfig, keys_enabled: bool) -> None:
    """The gateway is the public front: say what an open configuration gives away."""
    host = config.http_host
    if not keys_enabled and not service_auth.is_loopback_host(host):
        log.warning("no --api-keys on %s: every client gets the %r tier", host, config.default_tier)
    for address in config.pool_addresses:
        sched_host = address.rsplit(":", 1)[0]
        if not config.service_token and not address.startswith("unix:") \
                and not service_auth.is_loopback_host(sched_host):
            log.warning("no service token: the scheduler at %s refuses the gateway unless it runs with "
                        "--insecure-no-auth (set %s)", address, service_auth.SERVICE_TOKEN_ENV)


def run(args: argparse.Namespace) -> int:
    async def main() -> int:
        config = config_from_args(args)  # a bad flag value or configuration (e.g. the service token): exit 2
        config = dataclasses.replace(config, model_dir=resolve_model_dir(config.model_dir))
        await serve(config, args.api_keys)
        return 0

    return run_service(args.log_level, main, logging.getLogger("gateway"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="slai-serve gateway", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
