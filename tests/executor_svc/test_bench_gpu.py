"""``python -m benchmarks.executor_sweep`` end to end (tiny sweep), and GPU-only checks (never in CI)."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from tests.executor_svc.helpers import MAX_NEW, Driver, hf_greedy, same_prefix


def test_bench_executor_smoke(tmp_path):
    from benchmarks import executor_sweep as bench
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--model", "tiny-mistral", "--prefill-tokens", "0,16", "--decodes", "0,2",
                              "--contexts", "32", "--repeats", "1", "--warmup", "0", "--batches", "2",
                              "--gen-tokens", "3", "--no-baselines", "--profile", "--out", str(tmp_path)])
    assert bench.run(args) == 0
    header = (tmp_path / "steps.csv").read_text().splitlines()[0].split(",")
    assert {"num_prefill_tokens", "num_decodes", "decode_context", "forward_ms", "total_ms", "cpu_ms"} <= set(header)
    profile = (tmp_path / "profile.txt").read_text()
    assert profile.count("## ") == 3 and "16 prefill + 2 decodes @ ctx 32" in profile and "aten::" in profile
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["throughput"][0]["batch"] == 2 and report["throughput"][0]["runner_tok_s"] > 0
    assert len(report["medians"]) == 3  # (16, 0), (0, 2), (16, 2)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("backend", ["sdpa", "flash-attn"])
def test_gpu_paged_equals_generate(backend):
    from executor_svc import attention
    from executor_svc.models import load_model
    from executor_svc.runner import ModelRunner
    from tests.executor_svc.helpers import random_prompt

    if backend == "flash-attn" and not attention.HAS_FLASH_ATTN:
        pytest.skip("flash_attn is not installed")
    # fp16 for flash-attn (it has no fp32 kernels); fp32 for SDPA keeps greedy ties away
    dtype = torch.float16 if backend == "flash-attn" else torch.float32
    loaded = load_model("tiny-mistral", device="cuda", dtype=dtype)
    prompts = {f"p{n}": random_prompt(n, n) for n in (5, 17, 40, 64)}
    refs = {rid: hf_greedy(loaded.model, p, MAX_NEW) for rid, p in prompts.items()}
    runner = ModelRunner(loaded, num_blocks=96, attention_backend=backend)
    assert runner.info().attention_backend == backend and runner.info().device.startswith("cuda")
    drv = Driver(runner, num_blocks=96, shuffle_blocks=3)
    for rid, p in prompts.items():
        drv.add(rid, p, MAX_NEW)
    drv.step(chunk=7)
    drv.preempt("p17")
    done = drv.run(chunk=7)
    for rid, ref in refs.items():
        assert same_prefix(done[rid], ref), rid


@pytest.mark.gpu
@needs_cuda
def test_gpu_kv_sized_from_free_memory():
    from executor_svc.runner import ModelRunner

    runner = ModelRunner("tiny-mistral", device="cuda", memory_fraction=0.05)
    free, _ = torch.cuda.mem_get_info()
    assert runner.info().num_blocks * runner.info().kv_bytes_per_block <= 0.05 * (free + runner.kv.nbytes) * 1.01
