"""Fixtures for executor tests: one tiny random model per session, references cached."""

from __future__ import annotations

import pytest

from tests.executor_svc.helpers import MAX_NEW, PROMPT_LENGTHS, hf_greedy, random_prompt

try:
    import torch
except ImportError:  # a build without the [executor] extra: only the torch-free tests run
    torch = None
    collect_ignore = ["test_runner_greedy.py", "test_plan_validation.py", "test_sampling.py",
                      "test_models_kv.py", "test_smollm2.py", "test_bench_gpu.py"]


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """NOTE: one intra-op thread. On a 2-core CI machine shared with other jobs,
    two OpenMP threads that spin-wait on each other ran `generate` 10x slower
    (10.6 s vs 1.1 s for 12 SmolLM2 tokens); one thread is immune to that."""
    if torch is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny():
    """tiny-mistral with random weights (seed 0), shared by all tests in the session."""
    from executor_svc.models import load_model

    return load_model("tiny-mistral", seed=0)


@pytest.fixture(scope="session")
def prompts() -> dict[str, list[int]]:
    return {f"p{n}": random_prompt(n, n) for n in PROMPT_LENGTHS}


@pytest.fixture(scope="session")
def references(tiny, prompts) -> dict[str, list[int]]:
    """Greedy ``model.generate`` of each prompt alone, on the same model object."""
    return {rid: hf_greedy(tiny.model, p, MAX_NEW) for rid, p in prompts.items()}


@pytest.fixture
def make_runner(tiny):
    from executor_svc.runner import ModelRunner

    def make(num_blocks: int = 64, **kw) -> ModelRunner:
        return ModelRunner(tiny, num_blocks=num_blocks, **kw)

    return make
