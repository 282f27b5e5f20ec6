"""The policy registry: name -> (class, config overrides). No import-time side effects."""

from __future__ import annotations

from typing import Any

from scheduler_svc.core.config import SchedulerConfig
from scheduler_svc.core.policies.base import Policy
from scheduler_svc.core.policies.edf import EdfPolicy
from scheduler_svc.core.policies.fairbatching import FairBatchingPolicy
from scheduler_svc.core.policies.qoserve import QoServePolicy
from scheduler_svc.core.policies.rad import RadPolicy
from scheduler_svc.core.policies.sarathi import SarathiPolicy
from scheduler_svc.core.policies.slai import SlaiPolicy
from scheduler_svc.core.policies.slai_adaptive import SlaiAdaptivePolicy
from scheduler_svc.core.policies.vllm_prefill_first import VllmPrefillFirstPolicy
from scheduler_svc.core.policies.vllm_priority import VllmPriorityPolicy

# name -> (policy class, overrides applied on top of the caller's config, description)
POLICIES: dict[str, tuple[type[Policy], dict[str, Any], str]] = {
    "slai": (SlaiPolicy, {"fcfs": False, "user_priority": True, "fixed_offset": False},
             "SLAI, SPF with paying first, dynamic offset 5/10 (the paper's final default)"),
    "slai-spf-dynamic": (SlaiPolicy, {"fcfs": False, "user_priority": False, "fixed_offset": False},
                         "SLAI, SPF, dynamic offset"),
    "slai-spf-fixed": (SlaiPolicy, {"fcfs": False, "user_priority": False, "fixed_offset": True,
                                    "below_memory_limit_offset": 10.0},
                       "SLAI, SPF, fixed offset 10"),
    "slai-fcfs-fixed": (SlaiPolicy, {"fcfs": True, "user_priority": False, "fixed_offset": True,
                                     "below_memory_limit_offset": 10.0},
                        "SLAI, FCFS, fixed offset 10"),
    "sarathi-fcfs": (SarathiPolicy, {"fcfs": True, "user_priority": False}, "Sarathi-Serve, FCFS"),
    "sarathi-spf": (SarathiPolicy, {"fcfs": False, "user_priority": False}, "Sarathi-Serve, shortest prompt first"),
    "vllm": (VllmPrefillFirstPolicy, {"fcfs": True, "user_priority": False},
             "vLLM v0 prefill-first, whole prompts"),
    "edf": (EdfPolicy, {"fcfs": False, "user_priority": True}, "earliest TBT deadline first + SPF prefill"),
    "slai-adaptive": (SlaiAdaptivePolicy, {"fcfs": False, "user_priority": True, "fixed_offset": False,
                                           "memory_limit": 0.8},
                      "SLAI + slack-sized steps capped by KV use + no decode deferral above 80% KV + aging SRPT"
                      " (this project's refinement)"),
    "rad": (RadPolicy, {"fcfs": True, "user_priority": False},
            "Resource-Aware Dynamic: tiled budget + MaxWeight prefill/decode split"),
    # 2025-2026 baselines (docs/results.md); each file's docstring says what was implemented
    "fairbatching": (FairBatchingPolicy, {"fcfs": True, "user_priority": False},
                     ("FairBatching-style (arXiv 2510.14392): slack-sized steps, decodes deferred while they"
                      " have slack, prefills by TTFT deadline")),
    "qoserve": (QoServePolicy, {"fcfs": False, "user_priority": True},
                ("QoServe/Niyama-style (arXiv 2503.22562): dynamic chunking, hybrid deadline/length priority,"
                 " relegation of free requests predicted to miss TTFT")),
    "vllm-priority": (VllmPriorityPolicy, {"fcfs": True, "user_priority": True},
                      ("vLLM v1 --scheduling-policy priority: tier as priority, FCFS within, chunked prefill,"
                       " preempts the lowest-priority latest arrival")),
}
# the 2025-2026 baselines beside the paper's (issue 14)
NEW_BASELINES = ("fairbatching", "qoserve", "vllm-priority")

PAPER_POLICIES = ("slai", "slai-spf-dynamic", "slai-spf-fixed", "slai-fcfs-fixed",
                  "sarathi-fcfs", "sarathi-spf", "vllm")


def policy_names() -> list[str]:
    return list(POLICIES)


def policy_config(name: str, overrides: list[str] | tuple[str, ...] = (),
                  base: SchedulerConfig | None = None) -> SchedulerConfig:
    """The config a policy runs with: ``base``, then the variant's settings, then
    the user's ``name=value`` overrides (which win: ``--set fcfs=true`` on ``slai``
    means FCFS)."""
    try:
        _, variant, _ = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose from {', '.join(POLICIES)}") from None
    return (base or SchedulerConfig()).replace(**variant).with_overrides(list(overrides))


def make_policy(name: str, config: SchedulerConfig | None = None,
                overrides: list[str] | tuple[str, ...] = ()) -> Policy:
    """Build a fresh policy with :func:`policy_config` (``config`` is the base)."""
    cfg = policy_config(name, overrides, config)  # raises ValueError for an unknown name
    return POLICIES[name][0](cfg)
