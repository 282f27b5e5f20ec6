"""The simulator (and contract.cost_models) must run without grpc or torch."""

import subprocess
import sys

FORBIDDEN = ("grpc", "torch", "google.protobuf", "opentelemetry")


def test_sim_modules_do_not_import_grpc_or_torch():
    code = ("import sys, simulator.sim, simulator.plan_ahead, simulator.workloads, contract.cost_models, simulator.metrics, simulator.capacity, "
            "simulator.sim_cli, simulator.capacity_cli, simulator.cluster; print('\\n'.join(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    bad = [m for m in out if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)]
    assert not bad, f"simulator modules pulled in {bad}"
