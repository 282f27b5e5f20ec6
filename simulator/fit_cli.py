"""``slai-serve fit-cost-model IN --out FILE``: fit a step-time model from measured steps.

IN is a CSV or JSON file of steps with columns ``num_prefill_tokens``,
``num_decodes``, ``decode_context`` (SUM over the step's decodes of their KV
context; or ``decode_context_mean``), optional ``chunk_context`` (SUM of chunk x
context) and ``forward_ms`` or ``total_ms`` (``*_ns`` also accepted). The output
is a cost-model JSON file for ``slai-serve sim --cost-model FILE``.
"""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="measured step timings (CSV or JSON)")
    p.add_argument("--out", required=True, help="cost-model JSON file to write")
    p.add_argument("--time-column", default=None,
                   help="which time column to fit (default: first of forward_ms, total_ms, forward_ns, total_ns, ...)")
    p.add_argument("--name", default="fitted", help="model name stored in the file")
    p.add_argument("--overhead-ms", type=float, default=0.0,
                   help="fixed per-step overhead to store (e.g. scheduler + RPC time not in forward_ms)")
    p.add_argument("--relative", action="store_true", help="minimise relative instead of absolute error")
    p.add_argument("--terms", default=None,
                   help="comma list of extra terms to fit among num_decodes,sum_decode_context,sum_chunk_context "
                        "(default: every term whose column is non-zero)")


def run(args: argparse.Namespace) -> int:
    from contract.cost_models import fit_cost_model, load_timings

    rows = load_timings(args.input, args.time_column)
    terms = tuple(t.strip() for t in args.terms.split(",")) if args.terms else None
    model, diag = fit_cost_model(rows, name=args.name, overhead_ms=args.overhead_ms, relative=args.relative,
                                 terms=terms)
    model.save(args.out, extra=diag)
    json.dump({"model": model.to_dict(), "fit": diag, "out": args.out}, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0
