"""gRPC health checks: ``wait_healthy`` for the launcher, and the probe compose's health checks run.

    python -m slai_serve.health HOST:PORT [SERVICE]   # exit 0 iff grpc.health.v1 says SERVING
"""

from __future__ import annotations

import subprocess
import sys
import time


def wait_healthy(address: str, service: str = "", timeout_s: float = 60.0, proc: subprocess.Popen | None = None,
                 name: str = "") -> float:
    """Poll grpc.health.v1 until SERVING; raise if ``proc`` exits or time runs out. Returns seconds waited."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    t0 = time.monotonic()
    with grpc.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while True:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{name or address} exited with code {proc.returncode} before becoming healthy")
            try:
                resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1.0)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return time.monotonic() - t0
            except grpc.RpcError:
                pass
            if time.monotonic() - t0 > timeout_s:
                raise TimeoutError(f"{name or address} not healthy after {timeout_s:.0f} s")
            time.sleep(0.2)


def health_main(argv: list[str] | None = None) -> int:
    """``python -m slai_serve.health HOST:PORT [SERVICE]``: exit 0 iff grpc.health.v1 says SERVING (compose healthchecks)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print("usage: python -m slai_serve.health HOST:PORT [SERVICE]", file=sys.stderr)
        return 2
    try:
        with grpc.insecure_channel(argv[0]) as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=argv[1] if len(argv) > 1 else ""), timeout=3.0)
    except grpc.RpcError as exc:
        print(f"{argv[0]}: {exc.code().name}", file=sys.stderr)
        return 1
    ok = resp.status == health_pb2.HealthCheckResponse.SERVING
    print(f"{argv[0]}: {health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(health_main())
