"""``slai-serve up``: executor(s), scheduler and gateway as local processes (what tests and demos run).

    slai-serve up                      # embedded SmolLM2 on CPU; gateway gRPC :50051, HTTP :8000
    slai-serve up --fake --executors 2 # model-free stack (FakeRunner), two executors
    slai-serve up --api-keys keys.yaml --policy sarathi
    slai-serve up --fake --pools 2 --executors 2 --gateways 2  # 2 pools x 2 executors behind 2 gateways

Without ``--api-keys`` the gateway gets the demo key file (one paying and one
free key, anonymous requests paying: slai_serve/demo_keys.py), which
``bench-serve`` uses to send its tiered workload; ``--no-demo-keys`` runs it
without any key file.

Processes start on loopback (or ``--host``, which their /metrics ports follow too) in
dependency order, each awaited until its ``grpc.health.v1`` status is SERVING. They
share one service token (``SLAI_SERVICE_TOKEN`` if set, else a random one per run),
handed over in their environment, never in argv (docs/gateway.md, *Security*). Then
``up`` supervises them (:meth:`LocalStack.supervise`): a child that dies is restarted
on the same address after a backoff (``--restart-backoff``, doubling per recent death
up to ``--restart-backoff-max``); the others reconnect to it by themselves (the
scheduler's drivers, the gateway's channel). A child that dies more than
``--crash-loop-restarts`` times within ``--crash-loop-window`` seconds stops the
stack with a non-zero exit. Ctrl-C / SIGTERM stop everything in reverse order
(gateway first, so in-flight streams drain), each with ``--drain-timeout``
seconds before SIGKILL. :class:`LocalStack` is the same thing as a context
manager for tests and ``bench-serve`` (which do not supervise).
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from contract.model_files import default_model_dir, is_converted
from slai_serve.health import wait_healthy

DEFAULT_GATEWAY_GRPC_PORT = 50051
DEFAULT_HTTP_PORT = 8000
DEFAULT_SCHEDULER_PORT = 50061
DEFAULT_EXECUTOR_PORT = 50071  # executor i listens on DEFAULT_EXECUTOR_PORT + i
DEFAULT_METRICS_PORT = 9101  # scheduler; executor i: 9102 + i


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def free_port_block(host: str = "127.0.0.1", n: int = 1, attempts: int = 200) -> int:
    """The first of ``n`` consecutive ports that are all free now (executor *i* listens on first + *i*)."""
    def can_bind(port: int) -> bool:
        try:
            with socket.socket() as s:
                s.bind((host, port))
            return True
        except OSError:
            return False

    for _ in range(attempts):
        first = free_port(host)
        if first + n - 1 <= 65535 and all(can_bind(first + k) for k in range(1, n)):
            return first
    raise OSError(f"no {n} consecutive free ports on {host}")


def ensure_model_dir() -> Path:
    """The converted default model, converting it once in a subprocess if needed."""
    path = default_model_dir()
    if is_converted(path):
        return path
    print(f"converting the embedded SmolLM2 into {path} (one time) ...", file=sys.stderr)
    out = subprocess.run([sys.executable, "-m", "executor_svc.models"], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"model conversion failed: {out.stderr[-2000:]}")
    return Path(out.stdout.strip().splitlines()[-1])


DEFAULT_RESTART_BACKOFF_S = 0.5
DEFAULT_RESTART_BACKOFF_MAX_S = 10.0
DEFAULT_CRASH_LOOP_RESTARTS = 5
DEFAULT_CRASH_LOOP_WINDOW_S = 60.0


def describe_exit(code: int | None) -> str:
    """``-9`` -> ``"-9 (SIGKILL)"``: a negative code is the signal that ended the process."""
    if code is not None and code < 0:
        try:
            return f"{code} ({signal.Signals(-code).name})"
        except ValueError:
            pass
    return str(code)


class CrashLoop(RuntimeError):
    """A child died more often than the stack's crash-loop limit allows."""

    def __init__(self, name: str, codes: list[int], window_s: float, max_restarts: int) -> None:
        times = f"{len(codes)} time{'s' if len(codes) != 1 else ''}"
        super().__init__(f"{name} is crash-looping: it exited {times} within {window_s:g} s "
                         f"(exit codes {', '.join(describe_exit(c) for c in codes)}; at most {max_restarts} "
                         f"restarts allowed, --crash-loop-restarts)")
        self.name = name
        self.codes = codes


@dataclass
class Proc:
    name: str
    argv: list[str]
    address: str  # health-check address
    env: dict[str, str] = field(default_factory=dict)
    popen: subprocess.Popen | None = None
    log_path: Path | None = None
    deaths: list[tuple[float, int]] = field(default_factory=list)  # (monotonic time, exit code) within the window
    restart_at: float | None = None  # dead, to be restarted at this monotonic time
    num_restarts: int = 0


@dataclass
class LocalStack:
    """Start/stop the three services as subprocesses. Ports 0 = pick free ones."""

    fake: bool = False
    model: str = "default"  # executor --model (with --fake: ignored)
    model_dir: str = ""  # gateway tokenizer folder; "" = the converted default model
    num_executors: int = 1  # per pool
    num_pools: int = 1  # schedulers, each with its own num_executors executors (docs/gateway.md, "Pools")
    num_gateways: int = 1  # every gateway routes across every pool
    policy: str = "slai"
    host: str = "127.0.0.1"
    gateway_grpc_port: int = DEFAULT_GATEWAY_GRPC_PORT
    http_port: int = DEFAULT_HTTP_PORT
    scheduler_port: int = DEFAULT_SCHEDULER_PORT
    executor_port: int = DEFAULT_EXECUTOR_PORT
    metrics_port: int = DEFAULT_METRICS_PORT  # -1: no metrics side ports
    api_keys: str = ""
    drain_timeout_s: float = 10.0
    startup_timeout_s: float = 600.0
    log_dir: str | None = None  # None: inherit this terminal; "" : a temp dir
    dtype: str = ""  # executor --dtype ("" = the executor's default); ignored with fake
    executor_threads: int = 0  # executor --threads (0 = torch's default); ignored with fake
    executor_args: list[str] = field(default_factory=list)
    scheduler_args: list[str] = field(default_factory=list)
    gateway_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)  # extra environment for every service (e.g. OTEL_*)
    # shared by the three services; "" = SLAI_SERVICE_TOKEN(_FILE) if set, else a random one at start()
    service_token: str = field(default="", repr=False)
    # supervision (only when supervise() is called, as ``up`` does)
    restart_backoff_s: float = DEFAULT_RESTART_BACKOFF_S
    restart_backoff_max_s: float = DEFAULT_RESTART_BACKOFF_MAX_S
    crash_loop_restarts: int = DEFAULT_CRASH_LOOP_RESTARTS
    crash_loop_window_s: float = DEFAULT_CRASH_LOOP_WINDOW_S
    procs: list[Proc] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.num_pools < 1 or self.num_executors < 1 or self.num_gateways < 1:
            raise ValueError("--pools, --executors and --gateways must be >= 1")
        self._gateway_ports = [self.gateway_grpc_port + g for g in range(self.num_gateways)]
        self._http_ports = [self.http_port + g if self.http_port > 0 else self.http_port
                            for g in range(self.num_gateways)]
        self._scheduler_ports = [self.scheduler_port + p for p in range(self.num_pools)]
        if self.executor_threads < 0:
            raise ValueError(f"--threads: must be >= 1 (0 = torch's default), got {self.executor_threads}")
        if not self.restart_backoff_s > 0:
            raise ValueError(f"--restart-backoff: must be > 0, got {self.restart_backoff_s:g}")
        if not self.restart_backoff_max_s >= self.restart_backoff_s:
            raise ValueError(f"--restart-backoff-max: must be >= --restart-backoff ({self.restart_backoff_s:g}), "
                             f"got {self.restart_backoff_max_s:g}")
        if self.crash_loop_restarts < 0:
            raise ValueError(f"--crash-loop-restarts: must be >= 0, got {self.crash_loop_restarts}")
        if not self.crash_loop_window_s > 0:
            raise ValueError(f"--crash-loop-window: must be > 0, got {self.crash_loop_window_s:g}")

    # ------------------------------------------------------------ addresses
    @property
    def gateway_address(self) -> str:
        return f"{self.host}:{self.gateway_grpc_port}"

    @property
    def gateway_addresses(self) -> list[str]:
        return [f"{self.host}:{port}" for port in self._gateway_ports]

    @property
    def scheduler_addresses(self) -> list[str]:
        """One per pool (the first is ``scheduler_address``)."""
        return [f"{self.host}:{port}" for port in self._scheduler_ports]

    def executor_addresses(self, pool: int) -> list[str]:
        first = self.executor_port + pool * self.num_executors
        return [f"{self.host}:{first + i}" for i in range(self.num_executors)]

    def _name(self, pool: int, what: str) -> str:
        """``scheduler`` / ``executor-0`` with one pool; ``pool1-scheduler`` ... with several."""
        return what if self.num_pools == 1 else f"pool{pool}-{what}"

    @property
    def http_base(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def scheduler_address(self) -> str:
        return f"{self.host}:{self.scheduler_port}"

    def endpoints(self) -> dict[str, str]:
        out = {"gateway_grpc": self.gateway_address, "openai_http": self.http_base + "/v1"}
        for g, addr in enumerate(self.gateway_addresses[1:], 1):
            out[f"gateway_grpc_{g}"] = addr
            if self.http_port >= 0:
                out[f"openai_http_{g}"] = f"http://{self.host}:{self._http_ports[g]}/v1"
        for p in range(self.num_pools):
            out[self._name(p, "scheduler").replace("-", "_")] = self.scheduler_addresses[p]
            for i, addr in enumerate(self.executor_addresses(p)):
                out[self._name(p, f"executor_{i}").replace("-", "_")] = addr
        return out

    # ------------------------------------------------------------ lifecycle
    def _resolve_ports(self) -> None:
        # NOTE: with several pools / gateways, port N is the first one's and the others follow it
        # (or each gets a free port when N is 0)
        def ports(first: int, n: int) -> list[int]:
            if first < 0:
                return [first] * n
            return [free_port(self.host) for _ in range(n)] if first == 0 else [first + k for k in range(n)]

        self._gateway_ports = ports(self.gateway_grpc_port, self.num_gateways)
        self._http_ports = ports(self.http_port, self.num_gateways)
        self._scheduler_ports = ports(self.scheduler_port, self.num_pools)
        self.gateway_grpc_port, self.http_port = self._gateway_ports[0], self._http_ports[0]
        self.scheduler_port = self._scheduler_ports[0]
        # NOTE: executors (and their metrics ports, after each scheduler's) use consecutive ports
        num_exec = self.num_executors * self.num_pools
        if self.executor_port == 0:
            self.executor_port = free_port_block(self.host, num_exec)
        if self.metrics_port == 0:
            self.metrics_port = free_port_block(self.host, num_exec + self.num_pools)

    def _spawn(self, proc: Proc) -> None:
        # NOTE: per-service settings (OTEL_SERVICE_NAME, SLAI_METRICS_PORT) win over the stack-wide ``env``
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env, **proc.env}
        if self.service_token:  # the environment, not argv: `ps` shows argv to every local user
            from wire.service_auth import SERVICE_TOKEN_ENV, SERVICE_TOKEN_FILE_ENV
            env.pop(SERVICE_TOKEN_FILE_ENV, None)
            env[SERVICE_TOKEN_ENV] = self.service_token
        cmd = [sys.executable, "-m", "slai_serve.cli", *proc.argv]
        out = None
        if self.log_dir is not None:
            log_dir = Path(self.log_dir or tempfile.mkdtemp(prefix="slai-up-"))
            self.log_dir = str(log_dir)
            log_dir.mkdir(parents=True, exist_ok=True)
            proc.log_path = log_dir / f"{proc.name}.log"
            out = open(proc.log_path, "ab")
        # NOTE: a new session, so Ctrl-C reaches only this launcher, which stops the
        # services in order (gateway first) instead of all at once.
        proc.popen = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT if out else None,
                                      start_new_session=True, cwd=str(Path(__file__).resolve().parent.parent))
        if out is not None:
            out.close()
        if not any(p is proc for p in self.procs):  # a restart reuses its entry
            self.procs.append(proc)

    def _wait(self, proc: Proc, service: str, deadline: float) -> None:
        try:
            wait_healthy(proc.address, service, max(deadline - time.monotonic(), 1.0), proc.popen, proc.name)
        except Exception as exc:
            tail = ""
            if proc.log_path and proc.log_path.is_file():
                tail = "\n" + proc.log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{exc}{tail}") from None

    def executor_argv(self, i: int) -> list[str]:
        """``slai-serve`` arguments of executor ``i`` (``executor_args`` last, so they win)."""
        argv = ["executor", "--host", self.host, "--port", str(self.executor_port + i)]
        if self.fake:
            return [*argv, "--fake", *self.executor_args]
        argv += ["--model", self.model]
        argv += ["--dtype", self.dtype] if self.dtype else []
        # NOTE: the stack's own services share these cores: decode steps leave one to them unless the
        # thread count is set (measured on 2 cores, docs/executor.md, 'Threads')
        argv += ["--threads", str(self.executor_threads)] if self.executor_threads else ["--small-step-threads", "auto"]
        return argv + self.executor_args

    def start(self) -> LocalStack:
        from wire.service_auth import read_service_token

        self._resolve_ports()
        if not self.service_token:
            self.service_token = (read_service_token(environ={**os.environ, **self.env})
                                  or secrets.token_urlsafe(32))
        deadline = time.monotonic() + self.startup_timeout_s
        model_dir = self.model_dir or str(ensure_model_dir())
        metrics = self.metrics_port
        try:
            for pool in range(self.num_pools):
                # pool p's /metrics ports: its scheduler's, then its executors'
                pm = metrics + pool * (self.num_executors + 1) if metrics >= 0 else -1
                for i, addr in enumerate(self.executor_addresses(pool)):
                    self._spawn(Proc(self._name(pool, f"executor-{i}"),
                                     self.executor_argv(pool * self.num_executors + i), addr,
                                     env={"SLAI_METRICS_PORT": str(pm + 1 + i if pm >= 0 else -1),
                                          "OTEL_SERVICE_NAME": "slai-executor"}))
            for p in list(self.procs):
                self._wait(p, "", deadline)
            for pool in range(self.num_pools):
                pm = metrics + pool * (self.num_executors + 1) if metrics >= 0 else -1
                self._spawn(Proc(self._name(pool, "scheduler"), [
                    "scheduler", "--policy", self.policy, "--executors", ",".join(self.executor_addresses(pool)),
                    "--host", self.host, "--port", str(self._scheduler_ports[pool]), *self.scheduler_args],
                    self.scheduler_addresses[pool],
                    env={"SLAI_METRICS_PORT": str(pm), "OTEL_SERVICE_NAME": "slai-scheduler"}))
            for p in self.procs[-self.num_pools:]:
                self._wait(p, "", deadline)
            route = (["--pools", ",".join(self.scheduler_addresses)] if self.num_pools > 1
                     else ["--scheduler", self.scheduler_address])
            for g in range(self.num_gateways):
                gw = ["gateway", *route, "--host", self.host,
                      "--grpc-port", str(self._gateway_ports[g]), "--http-port", str(self._http_ports[g]),
                      "--model-dir", model_dir, "--drain-timeout", str(self.drain_timeout_s)]
                if self.api_keys:
                    gw += ["--api-keys", self.api_keys]
                self._spawn(Proc("gateway" if g == 0 else f"gateway-{g}", gw + self.gateway_args,
                                 self.gateway_addresses[g], env={"OTEL_SERVICE_NAME": "slai-gateway"}))
            for p in self.procs[-self.num_gateways:]:
                self._wait(p, "slai.v1.GatewayService", deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def poll(self) -> Proc | None:
        """The first process that has exited, if any."""
        return next((p for p in self.procs if p.popen is not None and p.popen.poll() is not None), None)

    def supervise(self, now: float | None = None) -> list[str]:
        """One supervision pass (``up`` runs it every 0.2 s): restart children that died, with backoff.

        A dead child is restarted with the same command line and address after
        ``restart_backoff_s * 2**(deaths in the window - 1)`` seconds (at most ``restart_backoff_max_s``);
        the rest of the stack reconnects to it by itself. Nothing here blocks: a restarted child is not
        awaited until healthy. Returns one line per thing that happened; raises :class:`CrashLoop` when a
        child has died more than ``crash_loop_restarts`` times within ``crash_loop_window_s``.
        """
        now = time.monotonic() if now is None else now
        events: list[str] = []
        for p in self.procs:
            if p.popen is None:
                continue
            if p.restart_at is not None:
                if now >= p.restart_at:
                    p.restart_at = None
                    p.num_restarts += 1
                    self._spawn(p)
                    events.append(f"{p.name} restarted (pid {p.popen.pid}, restart {p.num_restarts})")
                continue
            code = p.popen.poll()
            if code is None:
                continue
            p.deaths = [(t, c) for t, c in p.deaths if now - t <= self.crash_loop_window_s] + [(now, code)]
            if len(p.deaths) > self.crash_loop_restarts:
                raise CrashLoop(p.name, [c for _, c in p.deaths], self.crash_loop_window_s, self.crash_loop_restarts)
            delay = min(self.restart_backoff_s * 2 ** (len(p.deaths) - 1), self.restart_backoff_max_s)
            p.restart_at = now + delay
            events.append(f"{p.name} exited with code {describe_exit(code)}; restarting in {delay:.1f} s")
        return events

    def stop(self) -> dict[str, int | None]:
        """SIGTERM in reverse start order (gateway, scheduler, executors); SIGKILL after the drain timeout."""
        codes: dict[str, int | None] = {}
        for p in reversed(self.procs):
            if p.popen is None:
                continue
            if p.popen.poll() is None:
                p.popen.send_signal(signal.SIGTERM)
                try:
                    p.popen.wait(self.drain_timeout_s + 5.0)
                except subprocess.TimeoutExpired:
                    p.popen.kill()
                    p.popen.wait(5.0)
            codes[p.name] = p.popen.returncode
        self.procs.clear()
        return codes

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ---------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fake", action="store_true", help="FakeRunner executors: no model, deterministic tokens")
    parser.add_argument("--model", default="default", help="executor model: 'default' (SmolLM2), preset or folder")
    parser.add_argument("--model-dir", default="", help="gateway tokenizer folder (default: the converted SmolLM2)")
    parser.add_argument("--executors", type=int, default=1, help="number of executor processes (per pool)")
    parser.add_argument("--pools", type=int, default=1,
                        help="pools to start: each is one scheduler with its own --executors executors; the "
                             "gateways route across them (gateway --pools)")
    parser.add_argument("--gateways", type=int, default=1, help="gateway processes, each routing across every pool")
    parser.add_argument("--policy", default="slai", help="scheduling policy (slai, sarathi, vllm, edf, rad, ...)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="listen host of every service and /metrics port (the services share a service token)")
    parser.add_argument("--grpc-port", type=int, default=DEFAULT_GATEWAY_GRPC_PORT, help="gateway gRPC (0 = any)")
    parser.add_argument("--http-port", type=int, default=DEFAULT_HTTP_PORT, help="OpenAI HTTP (0 = any)")
    parser.add_argument("--scheduler-port", type=int, default=DEFAULT_SCHEDULER_PORT)
    parser.add_argument("--executor-port", type=int, default=DEFAULT_EXECUTOR_PORT, help="first executor's port")
    parser.add_argument("--metrics-port", type=int, default=DEFAULT_METRICS_PORT,
                        help="scheduler /metrics port; executors use the next ones (-1 = off)")
    parser.add_argument("--api-keys", default="", help="gateway key file (key -> tier); default: the demo key file "
                                                       "(one paying and one free key, slai_serve/demo_keys.py)")
    parser.add_argument("--no-demo-keys", action="store_true",
                        help="without --api-keys, run the gateway without any key file (everyone paying)")
    parser.add_argument("--drain-timeout", type=float, default=10.0, help="seconds each service gets to drain")
    parser.add_argument("--startup-timeout", type=float, default=600.0)
    parser.add_argument("--log-dir", default=None, help="write one log per service here (default: this terminal)")
    parser.add_argument("--dtype", default=None, choices=("auto", "float32", "bfloat16", "float16"),
                        help="executor model dtype (default: the executor's, fp32 on CPU); auto: bf16 on a CPU "
                             "with amx_bf16/avx512_bf16 units (docs/executor.md, 'Data types')")
    parser.add_argument("--threads", type=int, default=0,
                        help="executor torch threads (0 = torch's default: one per core)")
    parser.add_argument("--executor-arg", action="append", default=[], help="extra executor flag (repeatable)")
    parser.add_argument("--scheduler-arg", action="append", default=[], help="extra scheduler flag (repeatable)")
    parser.add_argument("--gateway-arg", action="append", default=[], help="extra gateway flag (repeatable)")
    parser.add_argument("--restart-backoff", type=float, default=DEFAULT_RESTART_BACKOFF_S,
                        help="seconds before a child that died is restarted; doubles with each recent death")
    parser.add_argument("--restart-backoff-max", type=float, default=DEFAULT_RESTART_BACKOFF_MAX_S,
                        help="longest restart backoff, seconds")
    parser.add_argument("--crash-loop-restarts", type=int, default=DEFAULT_CRASH_LOOP_RESTARTS,
                        help="stop the stack (exit 1) when a child dies more often than this within "
                             "--crash-loop-window (0: stop at the first death)")
    parser.add_argument("--crash-loop-window", type=float, default=DEFAULT_CRASH_LOOP_WINDOW_S,
                        help="seconds over which a child's deaths are counted")


def stack_from_args(args: argparse.Namespace) -> LocalStack:
    api_keys = args.api_keys
    if not api_keys and not getattr(args, "no_demo_keys", False):
        from slai_serve.demo_keys import ensure_demo_keys

        api_keys = str(ensure_demo_keys())
    return LocalStack(fake=args.fake, model=args.model, model_dir=args.model_dir, num_executors=args.executors,
                      num_pools=args.pools, num_gateways=args.gateways,
                      policy=args.policy, host=args.host, gateway_grpc_port=args.grpc_port, http_port=args.http_port,
                      scheduler_port=args.scheduler_port, executor_port=args.executor_port,
                      metrics_port=args.metrics_port, api_keys=api_keys, drain_timeout_s=args.drain_timeout,
                      startup_timeout_s=args.startup_timeout, log_dir=args.log_dir,
                      dtype=args.dtype or "", executor_threads=args.threads, executor_args=args.executor_arg,
                      scheduler_args=args.scheduler_arg,
                      gateway_args=args.gateway_arg, restart_backoff_s=args.restart_backoff,
                      restart_backoff_max_s=args.restart_backoff_max, crash_loop_restarts=args.crash_loop_restarts,
                      crash_loop_window_s=args.crash_loop_window)


def run(args: argparse.Namespace) -> int:
    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signum

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        stack = stack_from_args(args)
    except ValueError as exc:  # a bad flag value
        print(f"slai-serve up: {exc}", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    try:
        stack.start()
    except Exception as exc:  # noqa: BLE001 - report and exit non-zero
        print(f"slai-serve up: {exc}", file=sys.stderr)
        return 1
    print(f"slai-serve stack up in {time.monotonic() - t0:.1f} s ({'fake executors' if args.fake else args.model}, "
          f"policy {args.policy}):")
    for name, addr in stack.endpoints().items():
        print(f"  {name:14s} {addr}")
    print("pids: " + ", ".join(f"{p.name}={p.popen.pid}" for p in stack.procs))
    print(f'try:  slai-serve client "What is the capital of France?" --chat --gateway {stack.gateway_address}')
    if stack.api_keys:
        print(f"keys: {stack.api_keys} (requests without a key get the key file's default tier; "
              "bench-serve sends each tier's key from it)" if not args.api_keys else f"keys: {stack.api_keys}")
    if stack.log_dir:
        print(f"logs: {stack.log_dir}")
    print("Ctrl-C to stop.", flush=True)
    rc = 0
    while stop["signal"] is None:
        try:
            events = stack.supervise()
        except CrashLoop as exc:
            print(f"slai-serve up: {exc}; stopping the stack", file=sys.stderr, flush=True)
            rc = 1
            break
        except Exception as exc:  # noqa: BLE001 - e.g. a restart that cannot spawn: never orphan the others
            print(f"slai-serve up: supervising failed ({type(exc).__name__}: {exc}); stopping the stack",
                  file=sys.stderr, flush=True)
            rc = 1
            break
        for line in events:
            print(f"slai-serve up: {line}", file=sys.stderr, flush=True)
        time.sleep(0.2)
    codes = stack.stop()
    print("stopped: " + ", ".join(f"{k}={v}" for k, v in codes.items()), flush=True)
    return rc
