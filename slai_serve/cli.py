"""The ``slai-serve`` command: one entry point, one module per subcommand.

Each subcommand lives in its own module that defines ``add_arguments(parser)``
and ``run(args) -> int``. Modules are imported only when their subcommand runs,
so ``slai-serve sim`` never imports torch or grpc.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "up": ("slai_serve.launch", "start executor(s), scheduler and gateway locally and wait until healthy"),
    "gateway": ("gateway.__main__", "run the gateway (gRPC + OpenAI-compatible HTTP)"),
    "scheduler": ("scheduler_svc.__main__", "run the scheduler service"),
    "executor": ("executor_svc.__main__", "run an executor (model worker)"),
    "sim": ("simulator.sim_cli", "simulate one policy at one load with the scheduling core"),
    "capacity": ("simulator.capacity_cli", "find the highest QPS that meets the SLOs (simulator)"),
    "compare": ("simulator.compare", "run every policy over a QPS grid; write tables and plots"),
    "fit-cost-model": ("simulator.fit_cli", "fit a step-time cost model from recorded executor timings"),
    "bench-serve": ("slai_serve.bench_serve", "replay a workload against a running gateway"),
    "agree": ("slai_serve.agree", "run the live stack (fake executor sleeping a cost model) and the simulator "
                                  "on one workload; print both"),
    "client": ("gateway.client_cli", "stream a completion from a running gateway"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slai-serve", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    name = argv[0]
    if name not in SUBCOMMANDS:
        parser.error(f"unknown command {name!r}; choose from {', '.join(SUBCOMMANDS)}")
    module_name, help_text = SUBCOMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            print(f"slai-serve {name}: not available in this build ({module_name} is missing)", file=sys.stderr)
            return 2
        raise
    sub = argparse.ArgumentParser(prog=f"slai-serve {name}", description=help_text)
    module.add_arguments(sub)
    args = sub.parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except (ValueError, OSError) as exc:
        # bad input (a setting, a path, a value out of range): one clear line, not a traceback
        print(f"slai-serve {name}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
