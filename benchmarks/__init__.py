"""Benchmarks: run from a checkout's root as ``python -m benchmarks.NAME`` (never installed, never in images).

    executor_sweep        executor step times over a grid, decode throughput vs transformers, a fitted cost model
    scheduler_decision    the core's decision time, memory per request, RPC round trip, executor idle per step
    gateway_relay         tokens per second one gateway relays over many streams
    scheduler_fanout      how many executors one scheduler drives: its CPU at N executors x R running requests
    telemetry_overhead    cost of tracing and metrics per step (in process)
    tracing_overhead_e2e  tracing on vs off through a whole local stack
    soak                  many streams for a long time: lost or duplicated tokens, errors, memory per process
    sim_speed             simulator speed (wall and CPU) of checkouts run back to back
    sim_identity          md5 of `slai-serve sim --json` per policy in two checkouts: a speed-up must not change plans
"""
