"""``slai-serve scheduler``: the scheduler service in front of one or more executors.

    slai-serve scheduler --policy slai --executors 127.0.0.1:50071,127.0.0.1:50072 --port 50061 \
        [--routing least-work|round-robin|power-of-two] [--set token_budget=256 ...] \
        [--max-queued-requests 10000 --max-queued-tokens 8000000]

Health turns SERVING once an executor has answered Info/Warmup. SIGTERM drains:
NOT_SERVING, in-flight streams get ``--grace-s``, then executors are released.

Listens on loopback unless ``--host`` says otherwise; /metrics follows ``--host``
(or ``--metrics-host``). With a service token (``SLAI_SERVICE_TOKEN`` or
``--service-token-file``) every RPC but health needs it, and the executors get it
too; without one a non-loopback ``--host`` needs ``--insecure-no-auth``
(wire/service_auth.py, docs/gateway.md *Security*).
"""

from __future__ import annotations

import argparse
import logging

from scheduler_svc.config import ROUTINGS, ServiceConfig
from scheduler_svc.core.policies.registry import POLICIES
from wire import service_auth
from wire.service_main import run_service, serve_until_signal

log = logging.getLogger("scheduler_svc")


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = ServiceConfig()
    p.add_argument("--policy", default=d.policy, choices=list(POLICIES))
    p.add_argument("--executors", required=True, help="comma-separated executor addresses (host:port or unix:PATH)")
    p.add_argument("--host", default="127.0.0.1", help="listen host (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=50061)
    p.add_argument("--uds", default=None, help="serve on this unix socket path instead of host:port")
    p.add_argument("--metrics-host", default=None, help="listen host of /metrics (default: --host)")
    service_auth.add_arguments(p)
    p.add_argument("--routing", default=d.routing, choices=ROUTINGS,
                   help="how new requests pick an executor (default: least outstanding work in tokens)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="NAME=VALUE",
                   help="override a SchedulerConfig field (repeatable), e.g. --set token_budget=256")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None,
                   help="share the KV of full blocks between requests with a common prompt prefix "
                        "(default on; same as --set enable_prefix_caching=true|false, and wins over it)")
    p.add_argument("--max-queued-requests", type=int, default=d.max_queued_requests)
    p.add_argument("--max-queued-tokens", type=int, default=d.max_queued_tokens)
    p.add_argument("--paying-tbt-s", type=float, default=d.paying_tbt_s)
    p.add_argument("--free-tbt-s", type=float, default=d.free_tbt_s)
    p.add_argument("--step-timeout-s", type=float, default=d.step_timeout_s)
    p.add_argument("--kv-blocks-cap", type=int, default=0, help="cap each executor's KV blocks (paper: 14733)")
    p.add_argument("--no-pipeline", dest="pipeline", action="store_false",
                   help="plan each step only after the previous result (lockstep); default: plan ahead")
    p.add_argument("--pipeline-lead-ms", type=float, default=1e3 * d.pipeline_lead_s,
                   help="plan ahead this long before the running step's predicted end")
    p.add_argument("--stream-buffer-tokens", type=int, default=d.stream_buffer_tokens,
                   help="tokens a Submit stream may hold that its client has not read before its stall timer runs")
    p.add_argument("--stream-stall-timeout", type=float, default=d.stream_stall_timeout_s,
                   help="abort a request (freeing its KV) whose client left --stream-buffer-tokens tokens "
                        "unread for this many seconds; 0 = never")
    p.add_argument("--grace-s", type=float, default=5.0)
    p.add_argument("--log-level", default="INFO")


def _overrides(args: argparse.Namespace) -> tuple[str, ...]:
    """``--set`` pairs, then ``--[no-]enable-prefix-caching`` (applied last, so it wins)."""
    flag = getattr(args, "enable_prefix_caching", None)
    tail = () if flag is None else (f"enable_prefix_caching={'true' if flag else 'false'}",)
    return tuple(args.overrides) + tail


def config_from_args(args: argparse.Namespace) -> ServiceConfig:
    """The service config, with the service token read from its file or the environment."""
    if args.pipeline_lead_ms < 0:
        raise ValueError(f"--pipeline-lead-ms must be >= 0, got {args.pipeline_lead_ms:g}")
    if args.stream_buffer_tokens < 1:
        raise ValueError(f"--stream-buffer-tokens must be >= 1, got {args.stream_buffer_tokens}")
    if not args.stream_stall_timeout >= 0:
        raise ValueError(f"--stream-stall-timeout must be >= 0 (0 = never), got {args.stream_stall_timeout:g}")
    return ServiceConfig(
        policy=args.policy, executors=tuple(a.strip() for a in args.executors.split(",") if a.strip()),
        routing=args.routing, overrides=_overrides(args), max_queued_requests=args.max_queued_requests,
        max_queued_tokens=args.max_queued_tokens, paying_tbt_s=args.paying_tbt_s, free_tbt_s=args.free_tbt_s,
        step_timeout_s=args.step_timeout_s, kv_blocks_cap=args.kv_blocks_cap, pipeline=args.pipeline,
        pipeline_lead_s=args.pipeline_lead_ms / 1e3, stream_buffer_tokens=args.stream_buffer_tokens,
        stream_stall_timeout_s=args.stream_stall_timeout,
        service_token=service_auth.read_service_token(args.service_token_file))


async def _main(args: argparse.Namespace) -> int:
    from scheduler_svc.server import serve
    from telemetry import names, tracing
    from telemetry.metrics import SchedulerMetrics, metrics_port, start_metrics_server
    config = config_from_args(args)
    if not config.executors:
        raise SystemExit("--executors: give at least one address")
    service_auth.check_exposure("scheduler", None if args.uds else args.host, config.service_token,
                                args.insecure_no_auth)
    tracing.init_tracing(names.SERVICE_SCHEDULER)  # no-op unless OTEL_* is set
    metrics = SchedulerMetrics()
    start_metrics_server(metrics_port(names.SCHEDULER_METRICS_PORT), metrics.registry,  # SLAI_METRICS_PORT=-1: off
                         addr=args.metrics_host or args.host)
    address = f"unix:{args.uds}" if args.uds else f"{args.host}:{args.port}"
    srv, dispatcher = await serve(config, address, metrics=metrics)
    log.info("scheduler (%s, routing %s) on %s, executors %s", config.policy, config.routing,
             address if args.uds else f"{args.host}:{srv.port}", ", ".join(config.executors))

    async def stop() -> None:
        await srv.stop(args.grace_s)
        await dispatcher.close()

    await serve_until_signal(stop, log, args.grace_s)
    return 0


def run(args: argparse.Namespace) -> int:
    return run_service(args.log_level, lambda: _main(args), log)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m scheduler_svc")
    add_arguments(parser)
    raise SystemExit(run(parser.parse_args()))
