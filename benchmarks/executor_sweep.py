"""``python -m benchmarks.executor_sweep``: step-time sweep and decode throughput of ModelRunner.

1. Sweep: every combination of fresh prefill tokens x number of decodes x decode
   context runs ``--repeats`` times (after ``--warmup``); each step's timings go
   to ``steps.csv`` / ``steps.json`` with the columns ``contract.cost_models``
   reads (``num_prefill_tokens, num_decodes, decode_context`` = SUM of the
   decodes' KV context, ``chunk_context``, ``forward_ms``, ``total_ms``...).
   When ``contract.cost_models`` is importable, a cost model is fitted to the
   medians and saved as ``cost_model.json``.
2. Throughput: N requests x ``--gen-tokens`` greedy tokens (EOS ignored) through
   the runner at batch 1, 8, 32, 64, against ``model.generate`` (batch 1) and
   transformers' continuous batching ``generate_batch`` (same N) on the same
   model object; ratios printed and saved in ``throughput.json``.

Decode requests are placed at their context length without computing their
prompts (timing does not depend on KV values): see ``_place_decodes``.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import statistics
import sys
import time
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="default | tiny-mistral | tiny-llama | mistral-7b | <folder>")
    p.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="float32 | float16 | bfloat16 (default: fp32 on CPU, fp16 on CUDA)")
    p.add_argument("--kv-blocks", type=int, default=None, help="KV blocks (default: sized for the sweep)")
    p.add_argument("--prefill-tokens", default="0,32,128,256", help="comma list of fresh prefill chunk sizes")
    p.add_argument("--decodes", default="0,1,8,32", help="comma list of decode counts")
    p.add_argument("--contexts", default="128,512", help="comma list of decode KV context lengths")
    p.add_argument("--shared-prefix", type=int, default=0,
                   help="tokens (a multiple of 16) at the start of every decode's context that it shares, "
                        "block for block, with the other decodes of its group (prefix caching)")
    p.add_argument("--prefix-groups", type=int, default=1, help="groups of decodes sharing one prefix each")
    p.add_argument("--scatter-blocks", action="store_true",
                   help="hand out KV blocks in random order (default: consecutive, as a fresh cache does)")
    p.add_argument("--no-cascade", action="store_true",
                   help="every decode gathers its whole context (no cascade attention over shared prefixes)")
    p.add_argument("--no-packed-linears", action="store_true",
                   help="bf16: torch's linear layers instead of prepacked, fused ones (ModelRunner(packed_linears=False))")
    p.add_argument("--no-cpu-kernels", action="store_true",
                   help="torch's ops instead of the C++ kernels (ModelRunner(cpu_kernels=False))")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--batches", default="1,8,32,64", help="throughput batch sizes ('' to skip)")
    p.add_argument("--gen-tokens", type=int, default=32, help="tokens generated per request (throughput)")
    p.add_argument("--prompt-tokens", type=int, default=16, help="prompt length (throughput)")
    p.add_argument("--no-baselines", action="store_true", help="skip generate / generate_batch")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--profile", action="store_true",
                   help="torch.profiler op table of each sweep point's last repeat -> profile.txt")
    p.add_argument("--out", default="out/bench-executor", help="output folder")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


class _BumpAlloc:
    """Hands out block ids; the bench frees everything between configurations."""

    def __init__(self, num_blocks: int, block_size: int, scatter: bool = False) -> None:
        self.free = list(range(num_blocks - 1, -1, -1))
        if scatter:
            random.Random(0).shuffle(self.free)
        self.block_size = block_size

    def take(self, num_tokens: int) -> list[int]:
        n = -(-num_tokens // self.block_size)
        if n > len(self.free):
            raise RuntimeError(f"bench needs more KV blocks (use --kv-blocks); {len(self.free)} left, {n} wanted")
        return [self.free.pop() for _ in range(n)]

    def give(self, blocks: list[int]) -> None:
        self.free.extend(blocks)


def _place_decodes(runner, alloc: _BumpAlloc, n: int, context: int, extra: int, rng: random.Random,
                   prefix: int = 0, groups: int = 1):
    """Register ``n`` decodes at ``context`` tokens; returns ``{req_id: blocks it owns}``.

    With ``prefix`` > 0, decode ``i`` belongs to group ``i % groups`` and its first
    ``prefix`` tokens are the group's: the group's first request owns those blocks,
    the others read them as a cached prefix (``num_computed_tokens = prefix``),
    exactly what the scheduler's prefix cache sends.
    """
    # NOTE: bench-only shortcut. Registers n requests as if their `context`-token
    # prompts had been computed (check + apply + commit, no forward), so sweeping
    # 64 decodes at context 512 does not cost 32 k prefill tokens per point.
    from contract.plan import BatchPlan, NewRequestSlice
    from executor_svc.request_cache import RequestCache

    if prefix % alloc.block_size or not 0 <= prefix < context:
        raise SystemExit(f"--shared-prefix must be a multiple of {alloc.block_size} below the context {context}")
    groups = max(1, min(groups, n)) if prefix else n
    reqs: dict[str, list[int]] = {}
    shared: dict[int, tuple[tuple[int, ...], list[int]]] = {}  # group -> (prefix tokens, prefix blocks)
    firsts, rest = [], []
    for i in range(n):
        rid = f"d{context}-{i}"
        g = i % groups
        if prefix and g in shared:
            ptoks, pblocks = shared[g]
            own = alloc.take(context - prefix + extra)
            toks = ptoks + tuple(rng.randrange(3, 1000) for _ in range(context - prefix))
            rest.append(NewRequestSlice(req_id=rid, token_ids=toks, num_tokens=context,
                                        block_ids=tuple(pblocks + own), num_computed_tokens=prefix,
                                        num_new_tokens=context - prefix, sample=True))
        else:
            own = alloc.take(context + extra)
            toks = tuple(rng.randrange(3, 1000) for _ in range(context))
            shared[g] = (toks[:prefix], own[: prefix // alloc.block_size])
            firsts.append(NewRequestSlice(req_id=rid, token_ids=toks, num_tokens=context, block_ids=tuple(own),
                                          num_new_tokens=context, sample=True))
        reqs[rid] = own
    for new in (firsts, rest):  # a cached prefix must be computed in an earlier plan than its readers
        if new:
            plan = BatchPlan(new=tuple(new))
            runner.requests.check(plan)
            RequestCache.commit(runner.requests.apply(plan), {s.req_id: 5 for s in new})
    return reqs


def sweep(runner, args) -> list[dict]:
    from contract.plan import BatchPlan, CachedRequestSlice, NewRequestSlice

    rng = random.Random(0)
    alloc = _BumpAlloc(runner.kv.num_blocks, runner.kv.block_size, args.scatter_blocks)
    rows: list[dict] = []
    steps_per_point = args.warmup + args.repeats
    seen_prefill_only: set[int] = set()
    step_id = 0
    for context in _ints(args.contexts):
        for num_decodes in _ints(args.decodes):
            if num_decodes == 0 and context != _ints(args.contexts)[0]:
                continue  # prefill-only points do not depend on the decode context
            reqs = _place_decodes(runner, alloc, num_decodes, context, steps_per_point * 8, rng,
                                  args.shared_prefix, args.prefix_groups)
            computed = {rid: context for rid in reqs}
            for prefill in _ints(args.prefill_tokens):
                if prefill == 0 and num_decodes == 0 or (num_decodes == 0 and prefill in seen_prefill_only):
                    continue
                if num_decodes == 0:
                    seen_prefill_only.add(prefill)
                for rep in range(steps_per_point):
                    new = ()
                    blocks: list[int] = []
                    if prefill:
                        blocks = alloc.take(prefill)
                        toks = tuple(rng.randrange(3, 1000) for _ in range(prefill))
                        new = (NewRequestSlice(req_id=f"p{step_id}", token_ids=toks, num_tokens=prefill,
                                               block_ids=tuple(blocks), num_new_tokens=prefill, sample=True),)
                    cached = tuple(CachedRequestSlice(req_id=rid, num_computed_tokens=computed[rid], num_new_tokens=1,
                                                      is_decode=True, sample=True) for rid in reqs)
                    plan = BatchPlan(step_id=step_id, new=new, cached=cached)
                    cpu0 = time.thread_time_ns()
                    if args.profile and rep == steps_per_point - 1:  # the last repeat of each point
                        result = _profiled(runner, plan, f"{prefill} prefill + {num_decodes} decodes @ ctx {context}",
                                           Path(args.out) / "profile.txt")
                    else:
                        result = runner.execute(plan)
                    cpu_ms = (time.thread_time_ns() - cpu0) / 1e6
                    step_id += 1
                    for rid in reqs:
                        computed[rid] += 1
                    if prefill:
                        runner.release([f"p{step_id - 1}"])
                        alloc.give(blocks)
                    if rep >= args.warmup:
                        rows.append(_row(prefill, num_decodes, context, computed, reqs, result, cpu_ms))
            runner.release(list(reqs))
            for blocks in reqs.values():
                alloc.give(blocks)
            if rows:
                r = rows[-1]
                print(f"  ctx {context:5d}  decodes {num_decodes:3d}  last: prefill {r['num_prefill_tokens']:5d}"
                      f"  forward {r['forward_ms']:8.2f} ms  cpu {r['cpu_ms']:8.2f} ms", flush=True)
    return rows


def _profiled(runner, plan, title: str, path: Path):
    """Run ``plan`` under ``torch.profiler``; append its op table (by self time) to ``path``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        result = runner.execute(plan)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=48)
    with path.open("a") as f:
        f.write(f"## {title}: forward {result.forward_ns / 1e6:.1f} ms\n{table}\n")
    return result


def _row(prefill: int, num_decodes: int, context: int, computed: dict, reqs: dict, result, cpu_ms: float) -> dict:
    dctx = sum(computed[r] - 1 for r in reqs)  # context each decode attended to (its num_computed_tokens)
    return {
        "num_prefill_tokens": prefill, "num_decodes": num_decodes, "context_len": context if num_decodes else 0,
        "decode_context": dctx, "chunk_context": prefill * prefill,
        "prepare_ms": result.prepare_ns / 1e6, "forward_ms": result.forward_ns / 1e6,
        "sample_ms": result.sample_ns / 1e6, "total_ms": result.total_ns / 1e6,
        # NOTE: CPU time of the calling thread, all of the step's compute with --threads 1;
        # unlike wall time it barely moves when other jobs share the cores (docs/executor.md)
        "cpu_ms": cpu_ms,
    }


def runner_generate(runner, prompts: list[list[int]], max_new: int) -> float:
    """Greedy generation of all prompts as one continuous batch; returns seconds."""
    from contract.plan import BatchPlan, CachedRequestSlice, NewRequestSlice

    alloc = _BumpAlloc(runner.kv.num_blocks, runner.kv.block_size)
    t0 = time.perf_counter()
    new = []
    for i, p in enumerate(prompts):
        blocks = alloc.take(len(p) + max_new)  # whole lifetime up front: decodes add no blocks
        new.append(NewRequestSlice(req_id=f"g{i}", token_ids=tuple(p), num_tokens=len(p), block_ids=tuple(blocks),
                                   num_new_tokens=len(p), sample=True))
    runner.execute(BatchPlan(step_id=0, new=tuple(new)))
    for k in range(1, max_new):
        cached = tuple(CachedRequestSlice(req_id=f"g{i}", num_computed_tokens=len(p) + k - 1, num_new_tokens=1,
                                          is_decode=True, sample=True) for i, p in enumerate(prompts))
        runner.execute(BatchPlan(step_id=k, cached=cached))
    elapsed = time.perf_counter() - t0
    runner.release([f"g{i}" for i in range(len(prompts))])
    return elapsed


def hf_generate(model, prompt: list[int], max_new: int) -> float:
    import torch

    ids = torch.tensor([prompt], device=model.device)
    t0 = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, min_new_tokens=max_new,
                   do_sample=False, pad_token_id=0)
    return time.perf_counter() - t0


def hf_generate_batch(model, prompts: list[list[int]], max_new: int) -> float:
    from transformers import ContinuousBatchingConfig, GenerationConfig

    gen = GenerationConfig(max_new_tokens=max_new, do_sample=False, eos_token_id=-1, pad_token_id=0)
    # NOTE: without num_blocks, continuous batching sizes its paged cache from free
    # *host* memory on CPU (GBs, zero-filled per call): 4 tokens took 32 s. Give it
    # what the requests need, like the runner gets.
    need = sum(-(-(len(p) + max_new) // 16) for p in prompts)
    cb = ContinuousBatchingConfig(page_size=16, num_blocks=need + 16, max_batch_tokens=1024, scheduler_type="fifo")
    t0 = time.perf_counter()
    model.generate_batch(prompts, generation_config=gen, continuous_batching_config=cb)
    return time.perf_counter() - t0


def throughput(runner, args) -> list[dict]:
    model = runner.model
    rng = random.Random(1)
    batches = _ints(args.batches)
    prompts = [[rng.randrange(3, 1000) for _ in range(args.prompt_tokens)] for _ in range(max(batches))]
    total = lambda b: b * args.gen_tokens  # noqa: E731
    runner_generate(runner, prompts[:1], 4)  # warm up
    out = []
    base1 = None
    if not args.no_baselines:
        impl = model.config._attn_implementation
        try:
            model.set_attn_implementation("sdpa")
            hf_generate(model, prompts[0], 4)  # warm up
            hf_generate_batch(model, prompts[:2], 4)  # warm up its manager's first-use costs
            base1 = total(1) / hf_generate(model, prompts[0], args.gen_tokens)
        finally:
            model.set_attn_implementation(impl)
    for b in batches:
        ours = total(b) / runner_generate(runner, prompts[:b], args.gen_tokens)
        row = {"batch": b, "runner_tok_s": ours, "generate_bs1_tok_s": base1}
        if not args.no_baselines:
            impl = model.config._attn_implementation
            try:
                model.set_attn_implementation("sdpa")
                row["generate_batch_tok_s"] = total(b) / hf_generate_batch(model, prompts[:b], args.gen_tokens)
            finally:
                model.set_attn_implementation(impl)  # generate_batch may switch it
            row["ratio_vs_generate_bs1"] = ours / base1
            row["ratio_vs_generate_batch"] = ours / row["generate_batch_tok_s"]
        out.append(row)
        print("  " + "  ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
              flush=True)
    return out


def _medians(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["num_prefill_tokens"], r["num_decodes"], r["context_len"]), []).append(r)
    return [{**g[0], **{k: statistics.median(x[k] for x in g) for k in g[0] if k.endswith("_ms")},
             "decode_context": statistics.median(x["decode_context"] for x in g)} for g in groups.values()]


def run(args: argparse.Namespace) -> int:
    from executor_svc.runner import ModelRunner

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.txt").unlink(missing_ok=True)
    need_tokens = (max(_ints(args.decodes) or [0]) * (max(_ints(args.contexts) or [0]) + 64)
                   + max(_ints(args.prefill_tokens) or [0])
                   + max(_ints(args.batches) or [0]) * (args.prompt_tokens + args.gen_tokens))
    num_blocks = args.kv_blocks or need_tokens // 16 + 64
    t0 = time.perf_counter()
    runner = ModelRunner(args.model, load_format=args.load_format, device=args.device, dtype=args.dtype,
                         num_blocks=num_blocks, num_threads=args.threads, cascade_attention=not args.no_cascade,
                         packed_linears=False if args.no_packed_linears else None,
                         cpu_kernels=False if args.no_cpu_kernels else None)
    info = runner.info()
    import torch

    print(f"model {info.model} on {info.device} ({info.dtype}, {info.attention_backend}, "
          f"{torch.get_num_threads()} threads), "
          f"{info.num_blocks} KV blocks, loaded in {time.perf_counter() - t0:.1f} s", flush=True)
    report: dict = {"info": {k: getattr(info, k) for k in info.__slots__}, "args": vars(args)}
    rows = sweep(runner, args) if _ints(args.prefill_tokens) and _ints(args.decodes) else []
    if rows:
        with (out / "steps.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        (out / "steps.json").write_text(json.dumps({"info": report["info"], "steps": rows}, indent=1))
        report["medians"] = _medians(rows)
        report["cost_model"] = _fit(out / "steps.csv", out / "cost_model.json")
    if _ints(args.batches):
        report["throughput"] = throughput(runner, args)
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    print(f"wrote {out}/ in {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


def _fit(steps_csv: Path, model_json: Path) -> dict | None:
    try:
        from contract.cost_models import fit_cost_model, load_timings
    except ImportError:
        return None  # no fitter in this build: the timings are the product
    rows = load_timings(steps_csv, "forward_ms")
    if len(rows) < 2:  # e.g. one point swept for --profile: nothing to fit
        return None
    # NOTE: keep the better of the absolute and relative fits: on noisy CPU data
    # the absolute hinge fit sometimes lands on a knee that fits the data points
    # but predicts nonsense through max(a0, a1 + b x) (rmse > the data's range).
    fits = [fit_cost_model(rows, name="executor-sweep", relative=rel) for rel in (False, True)]
    model, diag = min(fits, key=lambda f: f[1]["rmse_ms"])
    model.save(model_json, extra=diag)
    print(f"  cost model: {model.to_dict()}  rmse {diag['rmse_ms']:.2f} ms, mape {diag['mape']:.1%}", flush=True)
    return {"model": model.to_dict(), "fit": diag}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.executor_sweep", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
