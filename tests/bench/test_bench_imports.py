"""bench.sim / workloads / cost_models / metrics must run without grpc or torch."""

import subprocess
import sys

FORBIDDEN = ("grpc", "torch", "google.protobuf", "opentelemetry")


def test_sim_modules_do_not_import_grpc_or_torch():
    code = ("import sys, bench.sim, bench.workloads, bench.cost_models, bench.metrics, bench.capacity, "
            "bench.sim_cli, bench.capacity_cli, bench.sim_cluster; print('\\n'.join(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    bad = [m for m in out if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)]
    assert not bad, f"simulator modules pulled in {bad}"
