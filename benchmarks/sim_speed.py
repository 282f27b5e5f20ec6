"""Simulator speed of one or more checkouts, back to back: wall and CPU time of the same simulation.

    python -m benchmarks.sim_speed --checkouts /path/to/old,. --rounds 3 [--num-requests 16384 --qps 1]

Each round runs ``simulator.sim.simulate`` for ``slai`` on the paper trace (seed 42) once per checkout, in
a fresh process with that checkout on ``PYTHONPATH``, alternating, and reports simulated seconds per wall
second (what ``slai-serve sim`` prints as ``sim_speed``) and per CPU second of the process. On a shared
machine the CPU-time figure is the one to compare (docs/results.md, *Simulator speed*); the best of the
rounds is printed per checkout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

CHILD = """
import json, sys, time
from simulator.sim import simulate
from simulator.workloads import make_workload
items = make_workload(int(sys.argv[1]), float(sys.argv[2]), seed=42, trace="paper")
c0 = time.process_time()
r = simulate(sys.argv[3], items, record_steps=False)
cpu = time.process_time() - c0
print(json.dumps({"sim_s": r.sim_time_s, "wall_s": r.wall_time_s, "cpu_s": cpu, "steps": r.num_steps}))
"""


def one(checkout: Path, n: int, qps: float, policy: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    out = subprocess.run([sys.executable, "-c", CHILD, str(n), str(qps), policy], cwd=checkout, env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkouts", default=".", help="comma-separated checkout roots")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--num-requests", type=int, default=16384)
    ap.add_argument("--qps", type=float, default=1.0)
    ap.add_argument("--policy", default="slai")
    args = ap.parse_args(argv)
    roots = [Path(p).resolve() for p in args.checkouts.split(",") if p]
    best: dict[Path, dict] = {}
    for rnd in range(args.rounds):
        for root in roots:
            r = one(root, args.num_requests, args.qps, args.policy)
            print(f"round {rnd + 1} {root}: {r['steps']} steps, {r['sim_s']:.0f} s simulated, wall {r['wall_s']:.2f} s "
                  f"({r['sim_s'] / r['wall_s']:.0f}x), cpu {r['cpu_s']:.2f} s ({r['sim_s'] / r['cpu_s']:.0f}x)", flush=True)
            if root not in best or r["cpu_s"] < best[root]["cpu_s"]:
                best[root] = r
    for root, r in best.items():
        print(f"best {root}: {r['sim_s'] / r['wall_s']:.0f}x wall, {r['sim_s'] / r['cpu_s']:.0f}x cpu "
              f"({1e6 * r['cpu_s'] / r['steps']:.1f} us cpu per step)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
