"""Simulator cost in CPU instructions (valgrind), per checkout: a speed measure that load does not disturb.

    python -m benchmarks.sim_instructions --checkouts /path/to/old,. [--num-requests 300 --qps 1]

On the shared 2-core machine CPU times of identical runs vary by 5-10 % (docs/results.md, *Simulator
speed*); an instruction count does not. Each checkout runs ``simulator.sim.simulate`` for ``slai`` on the
paper trace (seed 42) under ``valgrind --tool=cachegrind --cache-sim=no``, twice: once with only a
20-request warm-up (imports, lazily loaded modules) and once with the warm-up and then ``--num-requests``
requests; the difference is the simulation's own instructions, printed in total and per step. Needs
valgrind; about a minute per checkout for 300 requests (valgrind runs the interpreter ~40x slower).
Instructions are not time (cache misses, branch misses), so confirm a gain with ``benchmarks.sim_speed``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

CHILD = """
import sys
from simulator.sim import simulate
from simulator.workloads import make_workload
simulate("slai", make_workload(20, float(sys.argv[2]), seed=42, trace="paper"), record_steps=False)  # warm-up
n = int(sys.argv[1])
if n:
    r = simulate("slai", make_workload(n, float(sys.argv[2]), seed=42, trace="paper"), record_steps=False)
    print(r.num_steps)
"""


def instructions(checkout: Path, n: int, qps: float) -> tuple[int, int]:
    """(instructions, steps) of the run with ``n`` requests (0: warm-up only)."""
    env = {**os.environ, "PYTHONPATH": str(checkout), "PYTHONHASHSEED": "0"}
    cmd = ["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null",
           sys.executable, "-c", CHILD, str(n), str(qps)]
    out = subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True, check=True)
    m = re.search(r"I\s+refs:\s+([\d,]+)", out.stderr)
    if m is None:
        raise RuntimeError(f"no instruction count in valgrind's output:\n{out.stderr[-2000:]}")
    steps = int(out.stdout.split()[-1]) if n else 0
    return int(m.group(1).replace(",", "")), steps


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkouts", default=".", help="comma-separated checkout roots")
    ap.add_argument("--num-requests", type=int, default=300)
    ap.add_argument("--qps", type=float, default=1.0)
    args = ap.parse_args(argv)
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed")
    if args.num_requests < 1:
        raise SystemExit("--num-requests must be >= 1")
    for root in (Path(p).resolve() for p in args.checkouts.split(",") if p):
        base, _ = instructions(root, 0, args.qps)
        total, steps = instructions(root, args.num_requests, args.qps)
        sim = total - base
        print(f"{root}: {steps} steps, {sim / 1e6:.0f} M instructions, {sim / steps / 1e3:.1f} k per step", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
