"""``slai-serve executor``: serve ExecutorService around a model runner (or ``--fake``).

    slai-serve executor --model default --port 50071
    slai-serve executor --load-format dummy --preset mistral-7b --memory-fraction 0.9 --port 50071
    slai-serve executor --fake --kv-blocks 14733 --fake-cost paper --port 50071

The executor warms up at start (so its health check turns SERVING without a
scheduler, as docker-compose's ``depends_on: service_healthy`` needs); a
scheduler's ``Warmup`` may later cap the blocks further. SIGTERM drains.

Listens on loopback unless ``--host`` says otherwise; /metrics follows ``--host``
(or ``--metrics-host``). With a service token (``SLAI_SERVICE_TOKEN`` or
``--service-token-file``) every RPC but health needs it; without one a
non-loopback ``--host`` needs ``--insecure-no-auth`` (wire/service_auth.py).
"""

from __future__ import annotations

import argparse
import logging

from wire import service_auth
from wire.service_main import run_service, serve_until_signal

log = logging.getLogger("executor_svc")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _threads_or_auto(text: str) -> int | str:
    return "auto" if text == "auto" else _positive_int(text)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="'default' (SmolLM2-135M), a preset name, or a model folder")
    p.add_argument("--preset", default=None, help="random-weight model shape (e.g. tiny-llama, mistral-7b); "
                                                  "overrides --model")
    p.add_argument("--load-format", default="auto", choices=("auto", "dummy"), help="dummy = random weights")
    p.add_argument("--host", default="127.0.0.1", help="listen host (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=50071)
    p.add_argument("--uds", default=None, help="serve on this unix socket path instead of host:port")
    p.add_argument("--metrics-host", default=None, help="listen host of /metrics (default: --host)")
    service_auth.add_arguments(p)
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=("auto", "float32", "bfloat16", "float16"),
                   help="model dtype; default fp32 on CPU, fp16 on CUDA; auto: bf16 on a CPU with "
                        "amx_bf16/avx512_bf16, else fp32 (docs/executor.md, 'Data types')")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="torch intra-op threads (default: torch's choice, one per core)")
    p.add_argument("--small-step-threads", type=_threads_or_auto, default=None,
                   help="threads for steps of fewer than 256 tokens, i.e. decode steps; 'auto': one fewer than "
                        "--threads (default: as --threads; `slai-serve up` passes auto, docs/executor.md)")
    kv = p.add_mutually_exclusive_group()
    kv.add_argument("--kv-blocks", type=int, default=None, help="exact number of KV blocks")
    kv.add_argument("--memory-fraction", type=float, default=None, help="fraction of free device memory for KV")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--attention-backend", default=None, choices=("sdpa", "flash-attn"))
    p.add_argument("--no-cascade-attention", action="store_true",
                   help="decodes sharing prefix blocks each gather their whole context instead of attending "
                        "to the shared prefix once (docs/executor.md, 'Shared prefixes: cascade attention')")
    p.add_argument("--no-packed-linears", action="store_true",
                   help="CPU: keep torch's linear layers instead of weights prepacked for oneDNN (bf16; fp32 where "
                        "a probe at load measures them faster) with "
                        "q/k/v and gate/up fused (docs/executor.md, 'Prepacked linears')")
    p.add_argument("--no-cpu-kernels", action="store_true",
                   help="CPU: torch's ops instead of the C++ kernels (decode attention, KV write, sampling; "
                        "in bf16 also norms, rotary embedding, SiLU * up) that are compiled on first start "
                        "(docs/executor.md, 'C++ kernels (CPU)')")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup-tokens", type=int, default=512, help="size of the start-up warm-up step")
    p.add_argument("--fake", action="store_true", help="FakeRunner: deterministic tokens, no torch")
    p.add_argument("--fake-cost", default=None, help="with --fake: sleep each step for this cost model's time "
                                                     "('paper' or a cost-model JSON file)")
    p.add_argument("--grace-s", type=float, default=5.0, help="drain time on SIGTERM")
    p.add_argument("--log-level", default="INFO")


def build_runner(args: argparse.Namespace):
    if args.fake:
        from executor_svc.fake_runner import FakeRunner
        cost = None
        if args.fake_cost:
            from contract.cost_models import resolve_cost_model
            cost = resolve_cost_model(args.fake_cost).step_time_s
        return FakeRunner(num_blocks=args.kv_blocks or 14733, cost=cost, check_blocks=True,
                          max_model_len=args.max_model_len or 0)
    from executor_svc.runner import ModelRunner
    device = args.device
    if device is None:
        import torch
        device = "cuda" if torch.cuda.is_available() else "cpu"
    kw = dict(load_format=args.load_format, device=device, dtype=args.dtype, num_blocks=args.kv_blocks,
              max_model_len=args.max_model_len, attention_backend=args.attention_backend, seed=args.seed,
              num_threads=args.threads, small_step_threads=args.small_step_threads,
              cascade_attention=not args.no_cascade_attention,
              packed_linears=False if args.no_packed_linears else None,
              cpu_kernels=False if args.no_cpu_kernels else None)
    if args.memory_fraction is not None:
        kw["memory_fraction"] = args.memory_fraction
    return ModelRunner(args.preset or args.model, **kw)


async def _main(args: argparse.Namespace) -> int:
    from executor_svc.server import serve
    from telemetry import names, tracing
    from telemetry.metrics import ExecutorMetrics, metrics_port, start_metrics_server
    token = service_auth.read_service_token(args.service_token_file)
    service_auth.check_exposure("executor", None if args.uds else args.host, token, args.insecure_no_auth)
    tracing.init_tracing(names.SERVICE_EXECUTOR)  # no-op unless OTEL_* is set
    metrics = ExecutorMetrics()
    start_metrics_server(metrics_port(names.EXECUTOR_METRICS_PORT), metrics.registry,  # SLAI_METRICS_PORT=-1: off
                         addr=args.metrics_host or args.host)
    runner = build_runner(args)
    address = f"unix:{args.uds}" if args.uds else f"{args.host}:{args.port}"
    srv, servicer = await serve(runner, address, warmup=True, max_batch_tokens=args.warmup_tokens, metrics=metrics,
                                service_token=token)
    info = runner.info()
    log.info("executor serving on %s: model=%s device=%s dtype=%s backend=%s blocks=%d x %d",
             address if args.uds else f"{args.host}:{srv.port}", info.model, info.device, info.dtype,
             info.attention_backend, servicer.state.num_blocks, info.block_size)
    await serve_until_signal(lambda: srv.stop(args.grace_s), log, args.grace_s)
    return 0


def run(args: argparse.Namespace) -> int:
    return run_service(args.log_level, lambda: _main(args), log)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m executor_svc")
    add_arguments(parser)
    raise SystemExit(run(parser.parse_args()))
