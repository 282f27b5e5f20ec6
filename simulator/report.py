"""Markdown tables and PNG plots from ``compare``'s results (matplotlib, Agg backend)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TIER_KEYS = ("paying", "free")


def _f(v: Any, nd: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def _tier(r: dict, key: str, tier: str) -> Any:
    return (r.get(key) or {}).get(tier)


def markdown(results: dict[str, Any], img_prefix: str = "") -> str:
    cfg = results["config"]
    bound = results["stability_bound"]
    policies = cfg["policies"]
    lines = ["# Simulated comparison", "",
             f"Command: `{cfg.get('command', '')}`", "",
             f"Workload: {cfg['num_requests']} requests per point, trace `{cfg['trace']}`, seed {cfg['seed']}, "
             f"Poisson gaps clipped at {cfg['clip_factor']}/QPS, paying probability {cfg['paying_prob']}; "
             f"cost model `{cfg['cost_model']['name']}` (+{cfg['cost_model']['overhead_ms']} ms/step); "
             f"{cfg['num_blocks']} KV blocks; overrides {cfg['overrides'] or 'none'}.", "",
             f"Stability bound (Li, Dai, Peng): λ·(E[P]+E[D]) < b/t_b with b = {bound['token_budget']}, "
             f"t_b = {1e3 * bound['t_b_s']:.2f} ms, E[P]+E[D] = {bound['mean_prompt'] + bound['mean_output']:.1f} "
             f"→ λ < {bound['lambda_max_effective_qps']:.3f} req/s effective = "
             f"**{bound['lambda_max_nominal_qps']:.3f} nominal QPS** (clipping raises the rate by "
             f"{bound['lambda_max_effective_qps'] / bound['lambda_max_nominal_qps']:.3f}×).", ""]
    caps = results.get("capacity")
    if caps:
        lines += capacity_table(results)
    at = results.get("at_reference_capacity")
    if at:
        rows = {r["policy"]: r for r in at["rows"]}
        base = rows.get(at["reference_policy"], {}).get("ttft_p50_s")
        lines += [f"## All policies at {at['reference_policy']}'s capacity ({at['qps']:.3f} QPS)", "",
                  f"| policy | TTFT p50 (s) | vs {at['reference_policy']} | TTFT p99 (s) | p50 paying | p50 free | "
                  "TBT p99 paying | TBT p99 free | preemptions |", "|---|---|---|---|---|---|---|---|---|"]
        for p in policies:
            r = rows.get(p)
            if not r:
                continue
            rel = f"{100 * (r['ttft_p50_s'] / base - 1):+.1f}%" if base and r.get("ttft_p50_s") else "–"
            lines.append(f"| {p} | {_f(r['ttft_p50_s'])} | {rel} | {_f(r['ttft_p99_s'])} | "
                         f"{_f(_tier(r, 'ttft_p50_s_by_tier', 'paying'))} | {_f(_tier(r, 'ttft_p50_s_by_tier', 'free'))} | "
                         f"{_f(_tier(r, 'tbt_p99_s_by_tier', 'paying'))} | {_f(_tier(r, 'tbt_p99_s_by_tier', 'free'))} | "
                         f"{r['num_preemptions']} |")
        lines.append("")
    ref = (at or {}).get("reference_policy", "sarathi-fcfs")
    if ref in policies and "slai" in policies:
        g = {(r["policy"], r["qps"]): r for r in results["grid"]}
        lines += [f"## SLAI vs {ref} over the grid (median TTFT, all users)", "",
                  f"| QPS | slai p50 (s) | {ref} p50 (s) | change | slai p99 (s) | {ref} p99 (s) |",
                  "|---|---|---|---|---|---|"]
        for q in cfg["qps_grid"]:
            a, b = g.get(("slai", q)), g.get((ref, q))
            if not a or not b or not a.get("ttft_p50_s") or not b.get("ttft_p50_s"):
                continue
            lines.append(f"| {q:.2f} | {_f(a['ttft_p50_s'])} | {_f(b['ttft_p50_s'])} | "
                         f"{100 * (a['ttft_p50_s'] / b['ttft_p50_s'] - 1):+.1f}% | {_f(a['ttft_p99_s'], 2)} | "
                         f"{_f(b['ttft_p99_s'], 2)} |")
        lines.append("")
    lines += ["## Grid", "",
              "TTFT and TBT in seconds; *stable* / *paper* = meets that capacity criterion; drain = last token "
              "after the last arrival.", "",
              "| policy | QPS | eff. QPS | TTFT p50 | TTFT p99 | p50 paying | p50 free | p99 paying | p99 free | "
              "TBT p99 paying | TBT p99 free | attain. paying | attain. free | tok/s out | preempt. | drain (s) | "
              "stable | paper |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["grid"]:
        lines.append(
            f"| {r['policy']} | {r['qps']:.2f} | {r['effective_qps']:.2f} | {_f(r['ttft_p50_s'])} | {_f(r['ttft_p99_s'], 2)} | "
            f"{_f(_tier(r, 'ttft_p50_s_by_tier', 'paying'))} | {_f(_tier(r, 'ttft_p50_s_by_tier', 'free'))} | "
            f"{_f(_tier(r, 'ttft_p99_s_by_tier', 'paying'), 2)} | {_f(_tier(r, 'ttft_p99_s_by_tier', 'free'), 2)} | "
            f"{_f(_tier(r, 'tbt_p99_s_by_tier', 'paying'))} | {_f(_tier(r, 'tbt_p99_s_by_tier', 'free'))} | "
            f"{_f(_tier(r, 'slo_attainment_by_tier', 'paying'), 4)} | {_f(_tier(r, 'slo_attainment_by_tier', 'free'), 4)} | "
            f"{_f(r.get('throughput_tokens_per_s'), 0)} | {r['num_preemptions']} | {_f(r.get('drain_s'), 1)} | "
            f"{_f(r.get('meets_slo_stable', r['meets_slo']))} | {_f(r.get('meets_slo_paper'))} |")
    lines.append("")
    qr = results.get("queue_runs")
    if qr:
        lines += [f"## Queue length at {qr['qps']} QPS", "",
                  "| policy | TTFT p50 (s) | TTFT p99 (s) | unfinished | sim time (s) | preemptions |", "|---|---|---|---|---|---|"]
        for p, r in qr["runs"].items():
            lines.append(f"| {p} | {_f(r['ttft_p50_s'])} | {_f(r['ttft_p99_s'], 1)} | {r['num_unfinished']} | "
                         f"{r['sim_time_s']:.0f} | {r['num_preemptions']} |")
        lines.append("")
    lines += ["## Plots", ""]
    for name, title in (("ttft_vs_qps.png", "TTFT vs QPS"), ("tbt_vs_qps.png", "P99 TBT vs QPS"),
                        ("capacity.png", "Capacity"), ("queue_length.png", "Queue length over time")):
        lines.append(f"![{title}]({img_prefix}{name})")
    lines.append("")
    return "\n".join(lines)


def capacity_table(results: dict[str, Any]) -> list[str]:
    """Markdown lines: every policy's stable and paper capacity side by side."""
    cfg, caps = results["config"], results["capacity"]
    crit, policies = cfg["criterion"], cfg["policies"]
    bound = results["stability_bound"]["lambda_max_nominal_qps"]
    chosen = cfg.get("capacity_criterion", "stable")
    ref = (results.get("at_reference_capacity") or {}).get("reference_policy", "sarathi-fcfs")
    ref_cap = caps.get(ref, {}).get("capacity_qps")
    tiers = ", ".join(f"{t} ≤ {v} s" for t, v in (crit.get("ttft_p99_max_by_tier") or {}).items())
    lines = ["## Capacity", "",
             f"**Paper criterion**: pooled median TTFT < {crit['ttft_p50_max_s']} s, P99 TBT paying ≤ "
             f"{crit['tbt_p99_max_paying_s']} s and free ≤ {crit['tbt_p99_max_free_s']} s, every request finished. "
             "**Stable criterion**: the paper's, also over the steady-state window (requests arriving after "
             f"{cfg.get('steady_fraction', 0.5):.0%} of the arrival span), P99 TTFT ≤ {crit.get('ttft_p99_max_s')} s"
             f"{' (per tier: ' + tiers + ')' if tiers else ''} over the run and the window, and keeping up (last "
             f"request done ≤ {crit.get('drain_max_s')} s after the last arrival, or finished/offered rate ≥ "
             f"{crit.get('min_throughput_ratio')}). Bisection to ±{results.get('tol', 0.02)} QPS; stability bound "
             f"{bound:.3f} QPS. `{chosen}` leads.", "",
             f"| policy | stable (QPS) | of bound | binding | P99 TTFT at stable cap. (s) | paper (QPS) | of bound | "
             f"paper binding | P99 TTFT at paper cap. (s) | {chosen} vs {ref} | runs |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in policies:
        c = caps[p]
        st, pa = c["by_criterion"]["stable"], c["by_criterion"]["paper"]
        rel = f"{100 * (c['capacity_qps'] / ref_cap - 1):+.1f}%" if ref_cap else "–"
        flag = " ⚠ above bound" if pa["capacity_qps"] > bound else ""
        lines.append(f"| {p} | {st['capacity_qps']:.3f} | {100 * st['capacity_qps'] / bound:.1f}% | "
                     f"{st['binding_constraint'] or '–'} | {_f((st.get('at_capacity') or {}).get('ttft_p99_s'), 2)} | "
                     f"{pa['capacity_qps']:.3f}{flag} | {100 * pa['capacity_qps'] / bound:.1f}% | "
                     f"{pa['binding_constraint'] or '–'} | {_f((pa.get('at_capacity') or {}).get('ttft_p99_s'), 2)} | "
                     f"{rel} | {st['num_trials'] + pa['num_trials']} |")
    return lines + [""]


def plots(results: dict[str, Any], out_dir: Path, queue_runs: dict[str, Any] | None = None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = results["config"]
    policies = cfg["policies"]
    by_pol = {p: [r for r in results["grid"] if r["policy"] == p] for p in policies}
    crit = cfg["criterion"]
    written = []
    styles = {p: ("-" if i < 7 else "--") for i, p in enumerate(policies)}

    # TTFT: rows median / P99, columns all / paying / free
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5), sharex=True)
    for row, (q, label) in enumerate(((50, "median"), (99, "P99"))):
        for col, tier in enumerate((None,) + TIER_KEYS):
            ax = axes[row][col]
            for p in policies:
                rs = by_pol[p]
                key = f"ttft_p{q}_s"
                ys = [r[key] if tier is None else _tier(r, key + "_by_tier", tier) for r in rs]
                ax.plot([r["qps"] for r in rs], ys, styles[p], marker="o", ms=3, label=p)
            if q == 50:
                ax.axhline(crit["ttft_p50_max_s"], color="k", lw=0.8, ls=":")
            ax.set_yscale("log")
            ax.set_title(f"{label} TTFT, {tier or 'all users'}")
            ax.grid(alpha=0.3, which="both")
            if row == 1:
                ax.set_xlabel("QPS (nominal)")
            if col == 0:
                ax.set_ylabel("seconds")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    written.append(out_dir / "ttft_vs_qps.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    # P99 TBT per tier
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharex=True)
    for ax, tier in zip(axes, TIER_KEYS):
        for p in policies:
            rs = by_pol[p]
            ax.plot([r["qps"] for r in rs], [_tier(r, "tbt_p99_s_by_tier", tier) for r in rs], styles[p],
                    marker="o", ms=3, label=p)
        ax.axhline(crit[f"tbt_p99_max_{tier}_s"], color="k", lw=0.8, ls=":")
        ax.set_yscale("log")
        ax.set_title(f"P99 TBT, {tier} tier (SLO dotted)")
        ax.set_xlabel("QPS (nominal)")
        ax.set_ylabel("seconds")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    written.append(out_dir / "tbt_vs_qps.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    caps = results.get("capacity")
    if caps:
        bound = results["stability_bound"]["lambda_max_nominal_qps"]
        fig, ax = plt.subplots(figsize=(10, 4.5))
        xs = list(range(len(policies)))
        for off, name, hatch in ((-0.2, "stable", None), (0.2, "paper", "//")):
            vals = [caps[p]["by_criterion"][name]["capacity_qps"] for p in policies]
            bars = ax.bar([x + off for x in xs], vals, width=0.4, hatch=hatch, label=f"{name} criterion",
                          color=["C%d" % (i % 10) for i in range(len(policies))], edgecolor="k", lw=0.5)
            for b, v in zip(bars, vals):
                ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.2f}\n{100 * v / bound:.0f}%", ha="center",
                        va="bottom", fontsize=7)
        ax.set_xticks(xs, policies)
        ax.axhline(bound, color="k", ls="--", lw=1, label=f"stability bound {bound:.2f} QPS")
        ax.set_ylabel("capacity (nominal QPS)")
        ax.set_ylim(0, bound * 1.4)
        ax.set_title("Capacity: stable (plain) and paper's criterion (hatched)")
        ax.legend(loc="upper left")
        plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
        fig.tight_layout()
        written.append(out_dir / "capacity.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

    if queue_runs and queue_runs.get("runs"):
        fig, axes = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
        for p, r in queue_runs["runs"].items():
            st = r["steps"]
            axes[0].plot(st["t"], st["num_waiting"], lw=1, label=f"{p}")
            axes[1].plot(st["t"], [100 * v for v in st["kv_used"]], lw=1, label=p)
        axes[0].set_ylabel("requests waiting (not holding KV)")
        n_req = next(iter(queue_runs["runs"].values())).get("num_requests", cfg["num_requests"])
        axes[0].set_title(f"Queue length over time at {queue_runs['qps']} QPS ({n_req} requests per run)")
        axes[0].legend()
        axes[0].grid(alpha=0.3)
        axes[1].set_ylabel("KV blocks used (%)")
        axes[1].set_xlabel("simulated time (s)")
        axes[1].grid(alpha=0.3)
        fig.tight_layout()
        written.append(out_dir / "queue_length.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written


def write_report(results: dict[str, Any], out_dir: Path) -> None:
    out_dir = Path(out_dir)
    queue_runs = results.get("queue_runs")
    has_steps = queue_runs and all("steps" in r for r in queue_runs.get("runs", {}).values())
    if not has_steps and (out_dir / "queue_runs.json").is_file():
        queue_runs = json.loads((out_dir / "queue_runs.json").read_text())
    (out_dir / "results.md").write_text(markdown(results))
    plots(results, out_dir, queue_runs)
