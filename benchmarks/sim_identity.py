"""Do two checkouts make the same plans? md5 of ``slai-serve sim --json`` per policy, run from each checkout.

    python -m benchmarks.sim_identity --checkouts /work/main,. [--big]

Runs every policy in ``policy_names()`` on the paper trace (2,000 requests at 3 QPS, seed 42, one
run each) and, with ``--big``, ``slai`` on 16,384 requests at 1 QPS, in each checkout (its own
``PYTHONPATH``), and prints the md5 of each JSON output with the timing fields (``wall_time_s``,
``sim_speed``) removed. A speed-up of the core or the simulator must leave every md5 unchanged
(docs/results.md, *Simulator speed*). Policies missing from a checkout are reported as such.
Exit 1 when any md5 differs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

TIMING_FIELDS = ("wall_time_s", "sim_speed")


def sim_md5(checkout: Path, policy: str, num_requests: int, qps: float) -> str:
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    cmd = [sys.executable, "-m", "slai_serve.cli", "sim", "--policy", policy, "--qps", str(qps), "--num-requests",
           str(num_requests), "--trace", "paper", "--seed", "42", "--json"]
    out = subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return f"error: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}"
    d = json.loads(out.stdout)
    for k in TIMING_FIELDS:
        d.pop(k, None)
    return hashlib.md5(json.dumps(d, sort_keys=True).encode()).hexdigest()


def policies_of(checkout: Path) -> list[str]:
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    code = "from scheduler_svc.core.policies.registry import policy_names; print(','.join(policy_names()))"
    out = subprocess.run([sys.executable, "-c", code], cwd=checkout, env=env, capture_output=True, text=True,
                         check=True)
    return out.stdout.strip().split(",")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkouts", default=".", help="comma-separated checkout roots to compare")
    ap.add_argument("--num-requests", type=int, default=2000)
    ap.add_argument("--qps", type=float, default=3.0)
    ap.add_argument("--big", action="store_true", help="also slai on 16,384 requests at 1 QPS")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    roots = [Path(p).resolve() for p in args.checkouts.split(",") if p]
    names = sorted({p for r in roots for p in policies_of(r)})
    runs = [(p, args.num_requests, args.qps) for p in names]
    if args.big:
        runs.append(("slai", 16384, 1.0))
    table = {}
    for policy, n, qps in runs:
        key = f"{policy}@{n}x{qps:g}"
        table[key] = {str(r): (sim_md5(r, policy, n, qps) if policy in policies_of(r) else "missing") for r in roots}
        row = table[key]
        same = len(set(row.values())) == 1
        if not args.json:
            print(f"{key:32s} {'same' if same else 'DIFFERENT'}  " + "  ".join(v[:12] for v in row.values()),
                  flush=True)
    if args.json:
        json.dump(table, sys.stdout, indent=1, sort_keys=True)
        sys.stdout.write("\n")
    return 0 if all(len(set(r.values())) == 1 for r in table.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
